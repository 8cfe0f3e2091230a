"""``mlf worker``: start and supervise one Celery worker process per GPU (or N on CPU).

Each child is a separate OS process (``celery -A worker.app worker --pool threads
--concurrency 1``): no fork after a framework is initialised, one task at a time, its own
framework thread count. The task runs on the pool's one thread, so the process's main
thread keeps consuming broker events: heartbeats and task events reach Flower while a
long shard runs, and an idle process stops at once on SIGTERM.
The parent imports no ML framework. SIGTERM / SIGINT to the parent is forwarded to the
children as SIGTERM, Celery's warm shutdown (finish the running shard, take no new one);
children still alive after ``grace_s`` are killed, and their unacknowledged shards are
redelivered by the broker. A child that dies on its own is restarted with backoff, and
the leases of the shards it held are released so that their redelivery runs at once.
The parent also enforces the hard time limit of a task (:mod:`worker.watchdog`).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ml_framework.settings import Settings
from worker import metrics, watchdog

if TYPE_CHECKING:
    from ml_framework.store import ResultStore
from worker.devices import MEMORY_FRACTION_ENV, GpuDevice
from worker.metrics import DEVICE_ENV, MULTIPROC_ENV

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
LOOP_INTERVAL_S = 0.2
"""Seconds between the supervisor's checks of its children (a signal ends the pause)."""
ROOT_WARNING_FILTER = "ignore:You're running the worker with superuser privileges"
"""A ``PYTHONWARNINGS`` entry that hides Celery's warning about running as root."""


@dataclass
class ChildSpec:
    """How to start one worker process.

    Attributes:
        name: Celery node name, e.g. ``cpu0-4242@host`` (device, launcher id, host).
        argv: the command line.
        env: the full environment of the child.
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(repr=False)


def plan_children(
    settings: Settings,
    processes: int | None = None,
    threads: int | None = None,
    cores: int | None = None,
    *,
    gpus: Sequence[GpuDevice] = (),
    processes_per_device: int = 1,
    preload: Sequence[str] | None = None,
    launcher_id: str | None = None,
) -> list[ChildSpec]:
    """Work out the worker processes to start on this host.

    One process per GPU (``processes_per_device`` each), pinned with
    ``CUDA_VISIBLE_DEVICES=<uuid>`` and named ``gpu<index>-<launcher id>@host``; plus
    ``processes`` CPU processes, pinned to no GPU and named ``cpu<i>-<launcher id>@host``.
    The launcher id (default: this launcher's pid) keeps the node names of two launchers on
    one host apart: heartbeats, leases and Celery's control and events are keyed by node
    name. Several processes on one GPU
    each get ``1/processes_per_device`` of its memory (see
    :func:`worker.devices.memory_fraction`), so that one process's cache cannot starve
    the others.

    Args:
        processes: CPU processes; default none when there are GPUs, else
            ``settings.worker_processes`` or one per core.
        threads: intra-op threads per process; default ``settings.worker_threads`` or
            ``cores // all processes`` (at least 1), so that processes x threads = cores.
        cores: CPU cores to share; default ``os.cpu_count()``.
        gpus: devices to start processes for (see :func:`worker.devices.discover`).
        processes_per_device: worker processes per GPU.
        preload: models every process loads at start (``name`` or ``name:version``);
            default ``settings.worker_preload_models``.
        launcher_id: the part of the node names after the device (see
            :func:`check_launcher_id`); default this process's pid.

    Returns:
        One :class:`ChildSpec` per process.
    """
    cores = cores or os.cpu_count() or 1
    if processes is None:
        processes = 0 if gpus else (settings.worker_processes or cores)
    total = len(gpus) * processes_per_device + processes
    threads = threads or settings.worker_threads or max(1, cores // max(total, 1))
    host = os.uname().nodename
    launcher_id = check_launcher_id(str(os.getpid()) if launcher_id is None else launcher_id)
    debug = settings.logging_level.upper() == "DEBUG"
    # --quiet: no Celery banner per process (each says one line when ready: worker/app.py); DEBUG shows it.
    argv_base = [sys.executable, "-m", "celery", "-A", "worker.app", *([] if debug else ["--quiet"]), "worker",
                 "--pool", "threads", "--concurrency", "1", "-Q", f"{settings.online_queue},{settings.bulk_queue}",
                 "--loglevel", settings.logging_level]
    if settings.embedded_broker:
        # The SQLite transport has no broadcast: no mingle / gossip / broker heartbeats.
        argv_base += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    placements = [(f"gpu{g.index}" + (f"-{k}" if processes_per_device > 1 else ""), g.uuid, f"gpu{g.index}")
                  for g in gpus for k in range(processes_per_device)]
    placements += [(f"cpu{i}", "", "cpu") for i in range(processes)]
    children = []
    for prefix, device, label in placements:
        env = dict(os.environ)
        env.update({
            "ML_FRAMEWORK_WORKER_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
            "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            "TF_FORCE_GPU_ALLOW_GROWTH": env.get("TF_FORCE_GPU_ALLOW_GROWTH", "true"),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": device,
            DEVICE_ENV: label,
        })
        if device and processes_per_device > 1:  # share the GPU's memory, not race for it
            env[MEMORY_FRACTION_ENV] = f"{1 / processes_per_device:.6f}"
        if preload is not None:
            env["ML_FRAMEWORK_WORKER_PRELOAD_MODELS"] = ",".join(preload)
        if not debug:  # Celery's multi-line warning when run as root (containers): shown at DEBUG only
            env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), ROOT_WARNING_FILTER]))
        name = f"{prefix}-{launcher_id}@{host}"
        children.append(ChildSpec(name, [*argv_base, "-n", name], env))
    return children


_LAUNCHER_ID = re.compile(r"[A-Za-z0-9_.]{1,40}")


def check_launcher_id(launcher_id: str) -> str:
    """``launcher_id`` if it can go into a Celery node name (1 to 40 letters, digits, ``_``
    or ``.``: no ``@``, and no ``-``, which separates it from the device), else
    ``ValueError`` saying so."""
    if not _LAUNCHER_ID.fullmatch(launcher_id):
        raise ValueError(f"launcher name {launcher_id!r}: use 1 to 40 letters, digits, '_' or '.'")
    return launcher_id


def exit_now(code: int) -> None:
    """End this process with exit status ``code`` now: flush the logs and the standard
    streams, then ``os._exit``, skipping the interpreter's teardown of the native libraries
    ``mlf`` imports (Arrow's dataset threads, pandas, SQLAlchemy), which took a second or
    more on a loaded host, and 5 to 20 s in a worker process with PyTorch or TensorFlow
    loaded (py-spy: ``gc_collect_main`` after the last Python frame). For a process whose work is done and cleaned up: the launcher
    once :meth:`Supervisor.run` has returned (children reaped, their files, the metrics
    directory and the store closed), and a worker process once Celery has stopped
    (``worker/app.py``)."""
    import contextlib

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing left to say there
            stream.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM this process when its parent dies,
    so that children of a killed ``mlf worker`` do not run on unsupervised."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # from <linux/prctl.h>
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def terminate(*procs: subprocess.Popen, grace_s: float, names: Sequence[str] = ()) -> list[int]:
    """SIGTERM every one of ``procs`` at once (a warm shutdown for Celery and for ``mlf
    worker``), wait up to ``grace_s`` seconds for them all together, then SIGKILL those still
    running (logged, by ``names[i]`` if given, else by pid). Processes that already ended
    are only waited for. The launcher's shutdown and the tests' and demo's stop of ``mlf
    worker`` share it.

    Returns:
        The exit status of each process, in the order given.
    """
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            name = names[i] if i < len(names) else f"pid {proc.pid}"
            log.warning("worker %s did not stop within %.0f s; killing it", name, grace_s)
            proc.kill()
            proc.wait()
    return [proc.returncode for proc in procs]


class Supervisor:
    """Runs the children, restarts the ones that die, and shuts all down on a signal.

    Args:
        children: what to run.
        grace_s: seconds a child may take to finish its shard after SIGTERM.
        metrics_address: ``(host, port)`` to serve the children's metrics on, or ``None``.
        time_limit_s: a child whose task runs longer than this, seconds, is SIGKILLed and
            replaced (``None``: no limit).
        store_url: the results store, to release a dead child's shard leases and to
            record a shard killed by the time limit (``None``: neither).
        on_time_limit: ``fail`` records such a shard FAILED; ``retry`` leaves it to the
            broker's redelivery (see ``Settings.on_time_limit``).
        reconcile: called with the results store every ``reconcile_interval_s`` seconds
            to send again the shards whose messages the broker lost (see
            :mod:`worker.reconcile`); ``None`` (or no ``store_url``): never.
        prune: called with a results store of its own every ``prune_interval_s`` seconds,
            on a thread of its own (a long pass must not delay lease releases), to delete
            what retention let expire (see :func:`ml_framework.store.lifecycle.prune_pass`,
            which takes a database lock so that one host prunes at a time); ``None``: never.
        at_start: called once with the results store when the children start (on the
            background thread), e.g. to remove the broker bindings of dead workers
            (:mod:`worker.bindings`).
    """

    def __init__(self, children: list[ChildSpec], grace_s: float = 60.0,
                 metrics_address: tuple[str, int] | None = None, *, time_limit_s: float | None = None,
                 store_url: str | None = None, on_time_limit: str = "fail",
                 reconcile: Callable[[ResultStore], int] | None = None,
                 reconcile_interval_s: float = 60.0,
                 prune: Callable[[ResultStore], object] | None = None, prune_interval_s: float = 600.0,
                 at_start: Callable[[ResultStore], object] | None = None) -> None:
        self.children = children
        self.grace_s = grace_s
        self.metrics_address = metrics_address
        self.metrics_dir: Path | None = None
        self.metrics_port: int | None = None
        """The port the metrics are served on, once :meth:`run` started serving them."""
        self._metrics_server = None
        self.time_limit_s = time_limit_s
        self.store_url = store_url
        self.on_time_limit = on_time_limit
        self._store = None
        self.task_dir = Path(tempfile.mkdtemp(prefix=f"mlf-tasks-{os.getpid()}-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.time_limit_kills = 0
        self.reconcile = reconcile
        self.reconcile_interval_s = reconcile_interval_s
        self._next_reconcile = time.monotonic() + reconcile_interval_s
        self.prune = prune
        self.prune_interval_s = prune_interval_s
        self.at_start = at_start
        self._stop_pruning = threading.Event()
        # Store and broker calls run in order on one daemon thread (a daemon: a call that
        # hangs must not hold the launcher's exit either).
        self._background: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._reconciling = threading.Event()
        threading.Thread(target=self._run_background, name="mlf-supervisor-store", daemon=True).start()
        self._stopping = threading.Event()

    def _task_file(self, child: ChildSpec) -> Path:
        return self.task_dir / child.name

    def _start(self, child: ChildSpec) -> None:
        env = {**child.env, watchdog.TASK_FILE_ENV: str(self._task_file(child))}
        if self.metrics_dir is not None:
            env[MULTIPROC_ENV] = str(self.metrics_dir)
        self._task_file(child).unlink(missing_ok=True)
        self.procs[child.name] = subprocess.Popen(child.argv, env=env, preexec_fn=_die_with_parent)
        log.debug("started worker %s (pid %d)", child.name, self.procs[child.name].pid)  # it says when ready

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s: warm shutdown of %d worker(s)", signal.Signals(signum).name, len(self.procs))
        self._stopping.set()  # ends the loop's pause at once

    def run(self) -> int:
        """Start every child and supervise until a signal; return the exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.metrics_address is not None:
            self._serve_metrics(*self.metrics_address)
        if self.at_start is not None:
            self._with_store(self.at_start, "remove the broker bindings of dead workers from the broker")
        for child in self.children:
            self._start(child)
        if self.prune is not None and self.store_url is not None and self.prune_interval_s > 0:
            threading.Thread(target=self._prune_loop, name="mlf-supervisor-prune", daemon=True).start()
        next_start: dict[str, float] = {}
        while not self._stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                proc = self.procs.get(child.name)
                if child.name in next_start:
                    if now >= next_start[child.name]:
                        del next_start[child.name]
                        self._start(child)
                    continue
                if proc is not None and proc.poll() is None and self.time_limit_s is not None:
                    self._enforce_time_limit(child, proc)
                if proc is not None and proc.poll() is not None:
                    self._release_leases(child, proc.pid)
                    n = self.restarts.get(child.name, 0)
                    delay = RESTART_BACKOFF_S[min(n, len(RESTART_BACKOFF_S) - 1)]
                    self.restarts[child.name] = n + 1
                    log.warning("worker %s exited with %s; restarting in %.0f s", child.name,
                                proc.returncode, delay)
                    if self.metrics_dir is not None:
                        metrics.process_dead(self.metrics_dir, proc.pid)
                    next_start[child.name] = now + delay
            if (self.reconcile is not None and self.store_url is not None and now >= self._next_reconcile
                    and not self._reconciling.is_set()):
                self._next_reconcile = now + self.reconcile_interval_s
                self._reconciling.set()  # one pass at a time, however long the store or broker takes
                self._with_store(self._reconcile_once, "look for shards the broker lost (results store and broker)")
            self._stopping.wait(LOOP_INTERVAL_S)
        return self.shutdown()

    def _enforce_time_limit(self, child: ChildSpec, proc: subprocess.Popen) -> None:
        """SIGKILL ``proc`` if its task has run past the hard time limit; with
        ``on_time_limit="fail"``, record the shard FAILED."""
        task = watchdog.read(self._task_file(child))
        if task is None or task.pid != proc.pid or time.monotonic() - task.started <= self.time_limit_s:
            return
        what = "online requests" if task.job_id is None else f"job {task.job_id} shard {task.shard_index}"
        log.error("worker %s (pid %d): %s ran past the hard time limit of %.0f s; killing the process",
                  child.name, proc.pid, what, self.time_limit_s)
        proc.kill()
        proc.wait()
        self.time_limit_kills += 1
        if task.job_id is not None and task.shard_index is not None and self.on_time_limit == "fail":
            reason = (f"hard time limit exceeded: the shard ran longer than task_time_limit_s "
                      f"({self.time_limit_s:.0f} s) and its worker process was killed")
            self._with_store(lambda store: store.fail_running_shard(task.job_id, task.shard_index, task.owner,
                                                                    reason), "record the shard as failed in the results store")

    def _run_background(self) -> None:
        while True:
            self._background.get()()

    def _reconcile_once(self, store: ResultStore) -> None:
        try:
            self.reconcile(store)
        finally:
            self._reconciling.clear()

    def _prune_loop(self) -> None:
        """Every ``prune_interval_s`` seconds, ``prune(store)`` on a store of this thread's
        own, until shutdown. A failing pass is logged, and the next one tries again."""
        store = None
        while not self._stop_pruning.wait(self.prune_interval_s):
            try:
                if store is None:
                    from ml_framework.store import ResultStore

                    store = ResultStore(self.store_url, migrate=False)
                self.prune(store)
            except Exception as exc:  # noqa: BLE001 - the supervisor must keep supervising
                log.warning("could not prune the results store: %s", exc)
        if store is not None:
            store.close()

    def _release_leases(self, child: ChildSpec, pid: int) -> None:
        """Release the shard leases of ``child``'s dead process ``pid``."""
        self._with_store(lambda store: store.release_leases(f"{child.name}:{pid}"), "release its shard leases in the results store")

    def _with_store(self, action: Callable[[ResultStore], object], what: str) -> None:
        """Run ``action(store)`` on the supervisor's background thread, in order: a store
        that hangs must not stop the loop from killing and restarting processes. An
        unreachable store or broker is logged as ``could not <what>: <error>``, ``what``
        saying where (the broker's redelivery and the leases' heartbeat
        check still recover the shard, only later)."""
        if self.store_url is None:
            return

        def run() -> None:
            try:
                if self._store is None:
                    from ml_framework.store import ResultStore

                    self._store = ResultStore(self.store_url, migrate=False)
                action(self._store)
            except Exception as exc:  # noqa: BLE001 - the supervisor must keep supervising
                log.warning("could not %s: %s", what, exc)

        self._background.put(run)

    def shutdown(self) -> int:
        """SIGTERM every child, wait ``grace_s``, then SIGKILL the rest."""
        self._stop_pruning.set()
        terminate(*self.procs.values(), grace_s=self.grace_s, names=list(self.procs))
        log.info("all workers stopped")
        for path in self.task_dir.glob("*"):
            path.unlink(missing_ok=True)
        self.task_dir.rmdir()
        if self._store is not None:
            self._store.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.metrics_dir is not None:
            metrics.cleanup(self.metrics_dir)
        return 0

    def _serve_metrics(self, host: str, port: int) -> None:
        """Serve every child's Prometheus metrics, summed, on ``host:port`` (see
        :mod:`worker.metrics`). When ``port`` is taken (another ``mlf worker`` on this
        host), serve them on a free port the OS picks and say which in a warning: a
        Prometheus target on ``port`` does not see them. Sets :attr:`metrics_port`; an
        address that cannot be bound at all is logged, and the workers run without."""
        self.metrics_dir = metrics.make_multiproc_dir()
        try:
            self._metrics_server = metrics.serve(self.metrics_dir, host, port)
        except OSError as exc:
            try:
                self._metrics_server = metrics.serve(self.metrics_dir, host, 0)
            except OSError:
                log.error("cannot serve worker metrics on %s:%d (%s); running without them", host, port, exc)
                return
            self.metrics_port = self._metrics_server.server_address[1]
            log.warning("worker metrics port %s:%d is taken (%s; another `mlf worker` on this host?): serving "
                        "this launcher's metrics on http://%s:%d/metrics instead, which a Prometheus target on "
                        "port %d does not scrape; set worker_metrics_port to choose the port", host, port,
                        exc.strerror or exc, host, self.metrics_port, port)
            return
        self.metrics_port = port
        log.info("worker metrics on http://%s:%d/metrics", host, port)
