"""Prometheus metrics of the worker processes (prometheus-client, multiprocess mode).

``mlf worker`` gives its processes a shared directory (``PROMETHEUS_MULTIPROC_DIR``), in
which each process's metrics live as memory-mapped files, and serves them all, summed
over the processes, on one port per host: ``http://<worker_metrics_host>:
<worker_metrics_port>/metrics`` (default 127.0.0.1:9191; see :func:`serve`). A process
started some other way (``celery -A worker.app worker``) keeps its metrics in memory,
unserved.

Labels: ``model`` (model name), ``version``, ``device`` (``gpu<index>`` as the launcher
numbers GPUs, or ``cpu``), ``queue``, ``reason``.

=====================================  =========  ==========================================
metric                                 type       what
=====================================  =========  ==========================================
``mlf_rows_scored_total``              counter    rows recorded with an output
``mlf_row_errors_total``               counter    rows recorded with a row error
``mlf_batches_total``                  counter    forward passes that succeeded
``mlf_batch_size_rows``                histogram  rows per forward pass
``mlf_batch_latency_seconds``          histogram  duration of one forward pass
``mlf_queue_wait_seconds``             histogram  from the producer's send to the shard's
                                                  start on a worker (label ``queue``:
                                                  ``bulk`` or ``online``)
``mlf_model_load_seconds``             histogram  model load and warm-up
``mlf_oom_splits_total``               counter    batches split after out-of-memory
``mlf_shard_failures_total``           counter    shards failed as a whole (label
                                                  ``reason``: the error's class)
``mlf_gpu_memory_used_bytes``          gauge      NVML, per device
``mlf_gpu_memory_total_bytes``         gauge      NVML, per device
``mlf_gpu_utilization_ratio``          gauge      NVML, 0 to 1, per device
=====================================  =========  ==========================================
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DEVICE_ENV = "MLF_WORKER_DEVICE"
"""Set by the launcher: ``gpu<index>`` or ``cpu``."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

DEVICE = os.environ.get(DEVICE_ENV, "cpu")
_MODEL = ["model", "version", "device"]
# Batch sizes: powers of two up to 4096 rows. Latencies: 1 ms to 2 min, roughly x2.5 apart.
SIZE_BUCKETS = tuple(float(2**k) for k in range(13))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

ROWS_SCORED = Counter("mlf_rows_scored", "Rows recorded with an output.", _MODEL)
ROW_ERRORS = Counter("mlf_row_errors", "Rows recorded with a row error.", _MODEL)
BATCHES = Counter("mlf_batches", "Forward passes that succeeded.", _MODEL)
BATCH_SIZE = Histogram("mlf_batch_size_rows", "Rows per forward pass.", _MODEL, buckets=SIZE_BUCKETS)
BATCH_LATENCY = Histogram("mlf_batch_latency_seconds", "Duration of one forward pass, seconds.", _MODEL,
                          buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("mlf_queue_wait_seconds", "From the producer's send to the shard's start, seconds.",
                       ["queue"], buckets=WAIT_BUCKETS)
MODEL_LOAD = Histogram("mlf_model_load_seconds", "Model load and warm-up, seconds.", _MODEL,
                       buckets=LATENCY_BUCKETS)
OOM_SPLITS = Counter("mlf_oom_splits", "Batches split in halves after an out-of-memory error.", _MODEL)
SHARD_FAILURES = Counter("mlf_shard_failures", "Shards failed as a whole, by the error's class.",
                         ["model", "version", "reason"])
GPU_MEMORY_USED = Gauge("mlf_gpu_memory_used_bytes", "Device memory in use (NVML), bytes.", ["device"],
                        multiprocess_mode="livemax")
GPU_MEMORY_TOTAL = Gauge("mlf_gpu_memory_total_bytes", "Device memory (NVML), bytes.", ["device"],
                         multiprocess_mode="livemax")
GPU_UTILIZATION = Gauge("mlf_gpu_utilization_ratio", "GPU utilisation over NVML's last sample period, 0 to 1.",
                        ["device"], multiprocess_mode="livemax")


def model_labels(name: str, version: int) -> dict[str, str]:
    """The ``model``, ``version`` and ``device`` labels of this process's metrics."""
    return {"model": name, "version": str(version), "device": DEVICE}


def make_multiproc_dir() -> Path:
    """A fresh, empty directory for the processes' metric files (removed by :func:`cleanup`).

    Its name carries the launcher's pid; directories left by launchers that died without
    cleaning up (SIGKILL) are removed first."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob("mlf-metrics-*-*"):
        try:
            owner = int(stale.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if owner != os.getpid() and not _alive(owner):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"mlf-metrics-{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def serve(path: Path, host: str, port: int):
    """Serve the metrics of every process writing under ``path``, summed, on
    ``http://host:port/metrics`` from a daemon thread; returns the server.

    Raises:
        OSError: the port is taken.
    """
    from prometheus_client import multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def process_dead(path: Path, pid: int) -> None:
    """Drop the live gauges of a process that exited (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path=str(path))


def cleanup(path: Path) -> None:
    """Remove the metric files' directory."""
    shutil.rmtree(path, ignore_errors=True)
