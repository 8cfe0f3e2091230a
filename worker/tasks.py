"""Celery task bodies of the worker: score one shard of a bulk job."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
import pyarrow as pa
from celery import Celery
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from ml_framework.datasets import decode_table, read_rows
from ml_framework.errors import DatasetError, MLFrameworkError, StoreUnavailableError
from ml_framework.logging import task_context
from ml_framework.paths import resolve_under
from ml_framework.protocol import (
    SCORE_ONLINE_TASK,
    SCORE_SHARD_TASK,
    DatasetRef,
    OnlineBatch,
    ScoreShard,
)
from ml_framework.settings import get_settings
from ml_framework.store import ResultStore, RowError, ShardClaim, WorkerInfo
from ml_framework.store.outputs import outputs_table
from worker import metrics, watchdog
from worker.conversion import to_inputs
from worker.devices import discover
from worker.online import score_online
from worker.registry import ModelRegistry
from worker.runtimes import Runtime
from worker.runtimes.base import records_table, to_record

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0
RATE_WINDOW_S = 60.0
STORE_RETRY_BACKOFF_MAX_S = 60
LEASE_MARGIN_S = 30
"""A shard's lease lasts ``task_time_limit_s`` plus this: the launcher kills a task at the
limit, so a live holder never outlasts its lease."""
BUSY_RECHECK_S = 20
"""A delivery of a shard that another live process runs is sent back to the queue, to look
again after this many seconds (the holder's heartbeat goes stale in as long)."""
# Connection-level failures (server down, SQLite locked): worth retrying. Data errors
# (a value the column refuses) are not: the shard is recorded as failed instead.
TRANSIENT_STORE_ERRORS = (OperationalError, InterfaceError, StoreUnavailableError)


@lru_cache(maxsize=1)
def get_store() -> ResultStore:
    """This process's results-store handle."""
    return ResultStore(get_settings().effective_database_url)


@lru_cache(maxsize=1)
def get_registry() -> ModelRegistry:
    """This process's model cache."""
    settings = get_settings()
    return ModelRegistry(settings.models_dir, settings.worker_threads, settings.worker_max_cached_models,
                         warmup_batch_size=min(settings.default_batch_size, 256))


def _rss_bytes() -> int | None:
    """Resident set size of this process, bytes (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Heartbeat:
    """Writes this process's heartbeat and telemetry to the results store every
    :data:`HEARTBEAT_INTERVAL_S` seconds, from a daemon thread.

    The task code adds to ``info.shards_done``, ``info.rows_done`` and ``info.oom_splits``
    (see :func:`count_rows`); rows/s is computed over the last :data:`RATE_WINDOW_S` seconds of beats. The GPU is
    the first one ``CUDA_VISIBLE_DEVICES`` shows this process (the launcher pins each
    process to one); its memory, utilisation, temperature and power come from NVML.
    """

    def __init__(self, hostname: str) -> None:
        self.info = WorkerInfo(hostname=hostname, pid=os.getpid(), started_at=datetime.now(UTC),
                               threads=get_settings().worker_threads)
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
        info.models = get_registry().loaded()
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
                get_store().heartbeat(self.sample())
                release_abandoned_leases()
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the worker
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(HEARTBEAT_INTERVAL_S)

    def stop(self) -> None:
        """Stop beating and remove the heartbeat row."""
        self._stop.set()
        try:
            get_store().remove_worker(self.hostname)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove heartbeat: %s", exc)


heartbeat: Heartbeat | None = None


def load_table(msg: ScoreShard) -> pa.Table:
    """The shard's rows: read from the data directory (by reference) or decoded (inline).

    Raises:
        DatasetPathError: the path leaves the data directory (checked before reading,
            :func:`ml_framework.paths.resolve_under`).
        DatasetError: the file is missing, or an inline shard holds the wrong number of rows.
    """
    src = msg.source
    if isinstance(src, DatasetRef):
        path = resolve_under(get_settings().data_dir, src.path)
        if not (path.is_file() or path.is_dir()):
            raise DatasetError(f"dataset {src.path!r} not found in the worker's data directory")
        return read_rows(path, src.format, src.row_start, src.row_end, msg.columns)
    table = decode_table(src.data_b64)
    if table.num_rows != msg.n_rows:
        raise DatasetError(f"inline shard holds {table.num_rows} rows, expected {msg.n_rows}")
    return table


@dataclass
class ShardOutcome:
    """The scored rows of one shard.

    Attributes:
        outputs: the rows that succeeded, as an output table (``row`` first, then one
            column per output key; see :func:`~worker.runtimes.base.records_table`).
        errors: one :class:`RowError` per row that did not, sorted by row.
        oom_splits: batches split after an out-of-memory error.
    """

    outputs: pa.Table
    errors: list[RowError]
    oom_splits: int = 0


def score_table(runtime: Runtime, table: pa.Table, columns: list[str], row_start: int, batch_size: int) -> ShardOutcome:
    """Score every row of ``table``; bad rows become row errors, the rest outputs.

    Args:
        runtime: the loaded model.
        table: the shard's rows; ``columns`` feed the model in ``inputs.columns`` order.
        row_start: dataset row number of ``table``'s first row.
        batch_size: rows per forward pass.

    Returns:
        A :class:`ShardOutcome` whose outputs and errors cover each row exactly once.
    """
    manifest = runtime.manifest
    x, rows, errors = to_inputs(table, columns, manifest.inputs, manifest.preprocessing, row_start)
    run = runtime.run(x, batch_size)
    return assemble(runtime, rows.tolist(), run.outputs, run.errors, errors, run.oom_splits)


def assemble(runtime: Runtime, rows: list[int], raw: list, failures: list[str | None],
             errors: list[RowError], oom_splits: int = 0) -> ShardOutcome:
    """Turn per-row raw outputs into an output table, and failures into row errors.

    The rows are converted together (:func:`records_table`); should that fail (outputs
    of different shapes), row by row (:func:`to_record`), so only the rows at fault fail.

    Args:
        rows: dataset row numbers of the converted rows, in the order of ``raw``.
        raw / failures: per converted row, its raw output or ``None``, and ``None`` or
            the failure (from :meth:`Runtime.run`).
        errors: row errors of conversion, for rows not in ``rows``; extended in place.

    Returns:
        A :class:`ShardOutcome` with errors sorted by row.
    """
    spec = runtime.manifest.outputs
    ok = [i for i, failure in enumerate(failures) if failure is None]
    errors.extend(RowError(rows[i], f"row {rows[i]}: {failures[i]}") for i in range(len(rows)) if failures[i] is not None)
    try:
        outputs, bad = (records_table(np.asarray([rows[i] for i in ok], dtype=np.int64),
                                      np.stack([raw[i] for i in ok]), spec) if ok else (outputs_table([]), []))
    except Exception:  # noqa: BLE001 - ragged or odd outputs: find the rows at fault one by one
        pairs: list[tuple[int, dict]] = []
        bad = []
        for i in ok:
            try:
                pairs.append((rows[i], to_record(raw[i], spec)))
            except Exception as exc:  # noqa: BLE001 - contract violation on this row
                bad.append((rows[i], str(exc)))
        outputs = outputs_table(pairs)
    errors.extend(RowError(row, f"row {row}: {message}") for row, message in bad)
    errors.sort(key=lambda e: e.row_index)
    return ShardOutcome(outputs, errors, oom_splits)


def count_rows(model: str, version: int, ok: int, failed: int, oom_splits: int = 0) -> None:
    """Add a recorded shard's rows to this process's heartbeat counters and metrics."""
    labels = metrics.model_labels(model, version)
    metrics.ROWS_SCORED.labels(**labels).inc(ok)
    metrics.ROW_ERRORS.labels(**labels).inc(failed)
    if heartbeat is not None:
        heartbeat.info.shards_done += 1
        heartbeat.info.rows_done += ok + failed
        heartbeat.info.oom_splits += oom_splits


def shard_failed(model: str, version: int, exc: BaseException | str) -> None:
    """Count a shard that failed as a whole, by the error's class (``reason`` label)."""
    reason = exc if isinstance(exc, str) else type(exc).__name__
    metrics.SHARD_FAILURES.labels(model=model, version=str(version), reason=reason).inc()


def queue_wait(msg: ScoreShard) -> None:
    """Observe how long ``msg`` waited between the producer's send and now."""
    if msg.enqueued_at is not None:
        metrics.QUEUE_WAIT.labels(queue="online" if msg.online else "bulk").observe(
            max(0.0, time.time() - msg.enqueued_at))


def every_row_failed(msg: ScoreShard, reason: str) -> list[RowError]:
    """One row error with ``reason`` for each row of the shard."""
    return [RowError(r, f"row {r}: {reason}") for r in range(msg.source.row_start, msg.source.row_end)]


def score_shard(task, /, **body: object) -> str:
    """Score one shard and record its outputs and row errors in one transaction.

    Returns:
        What happened: ``DONE``, ``FAILED`` (whole shard failed, every row has the
        error), ``ALREADY_DONE`` (redelivery), ``CANCELLED``, ``UNKNOWN_JOB``, ``GAVE_UP``
        (a poison shard, see ``max_shard_attempts``) or ``REJECTED`` (malformed message).

    Raises:
        celery.exceptions.Retry: the shard is running in another live process (the
            broker redelivered it): the message goes back to the queue for
            :data:`BUSY_RECHECK_S` seconds.
    """
    try:
        msg = ScoreShard.model_validate(body)
    except ValidationError as exc:
        log.error("rejecting malformed %s message: %s", SCORE_SHARD_TASK, exc)
        return "REJECTED"
    hostname = task.request.hostname or "worker"
    if msg.online:
        return _score_online(task.app, [msg], hostname)
    with task_context(job_id=msg.job_id, shard=msg.shard_index, model=f"{msg.model}/{msg.version}",
                      device=metrics.DEVICE):
        outcome = _score_bulk_shard(msg, hostname)
    if outcome is ShardClaim.BUSY:
        raise task.retry(countdown=BUSY_RECHECK_S)
    return outcome


def _score_online(app: Celery, requests: list[ScoreShard], hostname: str) -> str:
    watchdog.begin(f"{hostname}:{os.getpid()}")
    try:
        return score_online(app, requests, hostname)
    finally:
        watchdog.end()


def _score_bulk_shard(msg: ScoreShard, hostname: str) -> str | ShardClaim:
    store = get_store()
    settings = get_settings()
    owner = f"{hostname}:{os.getpid()}"
    claim = store.claim_shard(msg.job_id, msg.shard_index, hostname, settings.max_shard_attempts,
                              owner=owner, lease_s=settings.task_time_limit_s + LEASE_MARGIN_S)
    if claim is ShardClaim.GAVE_UP:
        log.error("job %s shard %d: started %d times and its worker died each time; failed as 'worker lost'",
                  msg.job_id, msg.shard_index, settings.max_shard_attempts)
        shard_failed(msg.model, msg.version, "WorkerLost")
        return claim.value
    if claim is ShardClaim.BUSY:
        log.warning("job %s shard %d: redelivered while another live worker process runs it; "
                    "checking again in %d s", msg.job_id, msg.shard_index, BUSY_RECHECK_S)
        return claim
    if claim is not ShardClaim.RUN:
        log.info("job %s shard %d: %s, skipped", msg.job_id, msg.shard_index, claim.value)
        return claim.value
    watchdog.begin(owner, msg.job_id, msg.shard_index)
    try:
        return _run_claimed_shard(store, msg, owner)
    except BaseException:
        # Not recorded (the store failed under it; the task is retried): give the lease
        # up, or every other process would find the shard busy until the lease ends.
        _abandoned.add((msg.job_id, msg.shard_index, owner))
        release_abandoned_leases()
        raise
    finally:
        watchdog.end()


_abandoned: set[tuple[str, int, str]] = set()
"""Leases of shards this process claimed but could not record, not yet given up (the
store was down): the heartbeat thread retries."""


def release_abandoned_leases() -> None:
    """Give up the leases in :data:`_abandoned`; those the store cannot take now stay."""
    for key in list(_abandoned):
        try:
            get_store().release_lease(*key)
        except Exception as exc:  # noqa: BLE001 - the store is down: the next beat retries
            log.debug("could not release lease %s yet: %s", key, exc)
            return
        _abandoned.discard(key)


def _run_claimed_shard(store: ResultStore, msg: ScoreShard, owner: str) -> str:
    queue_wait(msg)
    started = time.perf_counter()
    shard_error = None
    failure: BaseException | str | None = None
    try:
        runtime = get_registry().get(msg.model, msg.version)
        table = load_table(msg)
        outcome = score_table(runtime, table, msg.columns, msg.source.row_start, msg.batch_size)
    except Exception as exc:
        failure = exc
        if isinstance(exc, MLFrameworkError):
            shard_error = str(exc)
        else:
            log.exception("job %s shard %d failed", msg.job_id, msg.shard_index)
            shard_error = f"{type(exc).__name__}: {exc}"
        outcome = ShardOutcome([], every_row_failed(msg, f"shard failed: {shard_error}"))
    outputs, errors = outcome.outputs, outcome.errors
    try:
        recorded = store.complete_shard(msg.job_id, msg.shard_index, outputs, errors, shard_error=shard_error,
                                        oom_splits=outcome.oom_splits, owner=owner)
    except TRANSIENT_STORE_ERRORS:
        raise  # the store is unreachable: retried with backoff (see register)
    except Exception as exc:
        log.exception("job %s shard %d: the results store refused the shard's rows", msg.job_id, msg.shard_index)
        shard_error = f"results store refused the shard's rows: {type(exc).__name__}: {exc}"[:2000]
        failure = "StoreRefused"
        outputs, errors = [], every_row_failed(msg, shard_error)
        recorded = store.complete_shard(msg.job_id, msg.shard_index, outputs, errors, shard_error=shard_error,
                                        owner=owner)
    if not recorded:
        log.info("job %s shard %d: already recorded by another delivery, or its lease passed to another "
                 "process; nothing written", msg.job_id, msg.shard_index)
        return ShardClaim.ALREADY_DONE.value
    count_rows(msg.model, msg.version, len(outputs), len(errors), outcome.oom_splits)
    if failure is not None:
        shard_failed(msg.model, msg.version, failure)
    elapsed = time.perf_counter() - started
    log.info("job %s shard %d model %s/%d: %d rows ok, %d failed%s in %.2f s (%.0f rows/s)",
             msg.job_id, msg.shard_index, msg.model, msg.version, len(outputs), len(errors),
             f", {outcome.oom_splits} out-of-memory split(s)" if outcome.oom_splits else "", elapsed,
             (len(outputs) + len(errors)) / max(elapsed, 1e-9))
    return "FAILED" if shard_error else "DONE"


def score_online_batch(task, /, **body: object) -> str:
    """Score the online requests of one ``mlf.score_online`` message, with the others
    waiting on the online queue, as one dynamic batch (see :mod:`worker.online`).

    Returns:
        ``DONE``, or ``REJECTED`` (malformed message).
    """
    try:
        batch = OnlineBatch.model_validate(body)
    except ValidationError as exc:
        log.error("rejecting malformed %s message: %s", SCORE_ONLINE_TASK, exc)
        return "REJECTED"
    return _score_online(task.app, batch.requests, task.request.hostname or "worker")


def register(app: Celery) -> None:
    """Register the worker's tasks on ``app``.

    Store outages (connection errors) are retried with exponential backoff capped at 60 s,
    for as long as the outage lasts: giving up would drop the message and leave its shard
    PENDING for ever. The message stays unacknowledged until its retry is published.
    """
    for name, body in ((SCORE_SHARD_TASK, score_shard), (SCORE_ONLINE_TASK, score_online_batch)):
        app.task(
            name=name, bind=True, autoretry_for=TRANSIENT_STORE_ERRORS,
            retry_backoff=True, retry_backoff_max=STORE_RETRY_BACKOFF_MAX_S, max_retries=None,
        )(body)
