"""The per-process context of a worker: made once when the process starts, handed to every
task body (as arq's ``ctx``, or Triton's model instance state), instead of module globals.

It holds the settings, the results-store handle, the model registry, the prefetcher, the
heartbeat and the shard leases this process could not give up yet.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from datetime import UTC, datetime

from celery import Celery

from ml_framework.constants import HEARTBEAT_INTERVAL_S
from ml_framework.endpoints import broker_label
from ml_framework.protocol import DatasetRef, ScoreShard
from ml_framework.settings import Settings, get_settings
from ml_framework.store import ResultStore, WorkerInfo
from worker import metrics
from worker.devices import discover
from worker.pipeline import Prefetcher, ShardSource
from worker.registry import ModelRegistry

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0


def _rss_bytes() -> int | None:
    """Resident set size of this process, bytes (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class WorkerContext:
    """Everything one worker process keeps between tasks.

    Args:
        settings: the process's settings.
        hostname: its Celery node name (``gpu0-4242@host``).

    Attributes:
        registry: the process's loaded models.
        prefetcher: reads and converts shards ahead of the device (:mod:`worker.pipeline`).
        heartbeat: the heartbeat thread, once :meth:`start` ran.
        abandoned: leases ``(job_id, shard_index, owner)`` of shards this process claimed
            but could not record (the store was down), not yet given up.
    """

    def __init__(self, settings: Settings, hostname: str = "worker") -> None:
        self.settings = settings
        self.hostname = hostname
        self.registry = ModelRegistry(settings.models_dir, settings.worker_threads, settings.worker_max_cached_models,
                                      warmup_batch_size=min(settings.default_batch_size, 256),
                                      data_dir=settings.data_dir, settings=settings)
        self.prefetcher = Prefetcher()
        self.heartbeat: Heartbeat | None = None
        self.abandoned: set[tuple[str, int, str]] = set()
        self._store: ResultStore | None = None
        self._store_lock = threading.Lock()
        self._last_start: dict[str, int] = {}  # job id -> row_start of this process's last shard of it

    @property
    def store(self) -> ResultStore:
        """The results-store handle (opened, and migrated, on first use)."""
        with self._store_lock:
            if self._store is None:
                self._store = ResultStore(self.settings.effective_database_url, settings=self.settings)
            return self._store

    @property
    def owner(self) -> str:
        """``hostname:pid``: who holds the leases this process takes."""
        return f"{self.hostname}:{os.getpid()}"

    def start(self) -> None:
        """Open the store and start the heartbeat (the worker's ready hook calls this)."""
        try:
            self.store  # noqa: B018 - open the store (and run migrations) before the first shard
        except Exception as exc:  # noqa: BLE001 - shards retry until the store is reachable
            log.warning("results store not reachable yet: %s", exc)
        self.heartbeat = Heartbeat(self)
        self.heartbeat.start()

    def stop(self) -> None:
        """Stop the heartbeat and remove its row (the worker's shutdown hook calls this)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def release_abandoned_leases(self) -> None:
        """Give up the leases in :attr:`abandoned`; those the store cannot take now stay."""
        for key in list(self.abandoned):
            try:
                self.store.release_lease(*key)
            except Exception as exc:  # noqa: BLE001 - the store is down: the next beat retries
                log.debug("could not release lease %s yet: %s", key, exc)
                return
            self.abandoned.discard(key)

    def count_rows(self, ok: int, failed: int, oom_splits: int = 0) -> None:
        """Add a recorded shard's rows to the heartbeat's counters."""
        if self.heartbeat is not None:
            info = self.heartbeat.info
            info.shards_done += 1
            info.rows_done += ok + failed
            info.oom_splits += oom_splits

    def guess_next(self, msg: ScoreShard, source: ShardSource) -> ShardSource | None:
        """The shard of the same job this process will most likely run next: the same
        stride in the file as between its last two shards of the job (the next range when
        it ran none before), for :meth:`Prefetcher.pieces`. ``None`` for inline shards and
        CSV files."""
        if not isinstance(msg.source, DatasetRef) or msg.source.format == "csv":
            return None  # a CSV file has no random access: reading ahead would parse it twice
        length = source.row_end - source.row_start
        previous = self._last_start.get(msg.job_id)
        stride = source.row_start - previous if previous is not None and previous < source.row_start else length
        self._last_start = {msg.job_id: source.row_start}  # one job at a time is all a guess needs
        start = source.row_start + stride
        return ShardSource(start, start + length, source.columns, source.path, source.format, key=source.key)


def context(app: Celery) -> WorkerContext:
    """The context of this worker process (made on first use when the worker's ready hook
    has not made it: a task run outside ``mlf worker``, or a test)."""
    ctx = getattr(app, "mlf_context", None)
    if ctx is None:
        ctx = app.mlf_context = WorkerContext(get_settings())
    return ctx


class Heartbeat:
    """Writes this process's heartbeat and telemetry to the results store every
    :data:`HEARTBEAT_INTERVAL_S` seconds, from a daemon thread.

    The task code adds to ``info.shards_done``, ``info.rows_done`` and ``info.oom_splits``
    (see :meth:`WorkerContext.count_rows`); rows/s is computed over the last
    :data:`RATE_WINDOW_S` seconds of beats. The GPU is the first one ``CUDA_VISIBLE_DEVICES``
    shows this process (the launcher pins each process to one); its memory, utilisation,
    temperature and power come from NVML.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.info = WorkerInfo(hostname=ctx.hostname, pid=os.getpid(), started_at=datetime.now(UTC),
                               threads=ctx.settings.worker_threads, broker=broker_label(ctx.settings))
        self._samples: deque[tuple[float, int]] = deque()
        self._gpu = bool(discover().gpus)  # no NVML or no GPU: never ask again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlf-heartbeat", daemon=True)

    @property
    def hostname(self) -> str:
        """This process's Celery node name."""
        return self.info.hostname

    def start(self) -> None:
        """Begin beating in a daemon thread."""
        self._thread.start()

    def sample(self) -> WorkerInfo:
        """Refresh and return the telemetry the next beat writes."""
        info = self.info
        now, rows = time.monotonic(), info.rows_done
        self._samples.append((now, rows))
        while len(self._samples) > 1 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        t0, rows0 = self._samples[0]
        info.rows_per_s = (rows - rows0) / (now - t0) if now > t0 else 0.0
        info.models = self.ctx.registry.loaded()
        info.rss_bytes = _rss_bytes()
        if self._gpu:
            gpus = discover().gpus
            if gpus:
                g = gpus[0]
                info.device_uuid, info.device_name = g.uuid, g.name
                info.device_memory_used_bytes, info.device_memory_total_bytes = g.memory_used_bytes, g.memory_total_bytes
                info.device_utilization_pct, info.device_temperature_c, info.device_power_w = (
                    g.utilization_pct, g.temperature_c, g.power_w)
                if g.memory_used_bytes is not None:
                    metrics.GPU_MEMORY_USED.labels(device=metrics.DEVICE).set(g.memory_used_bytes)
                if g.memory_total_bytes is not None:
                    metrics.GPU_MEMORY_TOTAL.labels(device=metrics.DEVICE).set(g.memory_total_bytes)
                if g.utilization_pct is not None:
                    metrics.GPU_UTILIZATION.labels(device=metrics.DEVICE).set(g.utilization_pct / 100.0)
        return info

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.ctx.store.heartbeat(self.sample())
                self.ctx.release_abandoned_leases()
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the worker
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(HEARTBEAT_INTERVAL_S)

    def stop(self) -> None:
        """Stop beating and remove the heartbeat row."""
        self._stop.set()
        try:
            self.ctx.store.remove_worker(self.hostname)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove heartbeat: %s", exc)


__all__ = ["Heartbeat", "WorkerContext", "context"]
