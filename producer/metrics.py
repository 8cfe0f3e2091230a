"""Prometheus metrics of the fleet, read from the results store at scrape time.

Served by the HTTP API at ``/metrics``. Each scrape runs two small queries (jobs per state,
worker heartbeats); nothing is kept in the API process, so every API process (Uvicorn
worker) answers the same.

Metrics (labels in braces):

- ``mlf_jobs{state}`` (gauge): jobs in each state.
- ``mlf_jobs_by_owner{owner,state}`` (gauge): jobs by the name of the API key that
  submitted them (``owner="-"``: CLI and Python client), in each state present. Names,
  never keys; ``/metrics`` needs the ``metrics`` or ``admin`` role when keys are on.
- ``mlf_workers_live`` (gauge): worker processes with a heartbeat younger than 30 s
  (:data:`~ml_framework.constants.WORKER_LIVE_S`).
- ``mlf_worker_rows_per_second{worker}`` (gauge): rows/s of each worker over the last minute.
- ``mlf_worker_rows_total{worker}`` (counter): rows recorded by each worker since it started.
- ``mlf_worker_oom_splits_total{worker}`` (counter): out-of-memory batch splits since start.
- ``mlf_worker_gpu_memory_used_bytes{worker,device}`` (gauge): device memory in use, from
  NVML, as the worker's heartbeat reported it (``device`` is the GPU's UUID).
- ``mlf_worker_gpu_utilization_ratio{worker,device}`` (gauge): GPU utilisation, 0 to 1.
- ``mlf_queue_depth{queue}`` (gauge): messages waiting on each queue (online, bulk), read
  from the broker (Flower does not show this); bulk shards of all priorities together.
- ``mlf_broker_up`` (gauge): 1 when the broker answered this scrape, else 0.
- ``mlf_oldest_pending_job_age_seconds`` (gauge): age of the oldest job still PENDING
  (0 when none): a queue that is not moving shows here first.
- ``mlf_store_size_bytes`` (gauge): the results store on disk: the SQLite file and its WAL,
  or the store's PostgreSQL tables with indexes and TOAST.
- ``mlf_store_rows{table}`` (gauge): rows per table (PostgreSQL: the planner's estimate for
  tables of 100,000 rows or more).
- ``mlf_oldest_finished_job_age_seconds`` (gauge): seconds since the oldest finished job
  still kept ended (0 when none); with ``results_retention`` set it stays near the
  retention plus ``prune_interval_s``; above that, pruning is not running.

The workers' own metrics (rows scored, batch sizes and latencies, queue wait, model load
time, failures) are served by ``mlf worker`` itself; see :mod:`worker.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ml_framework.constants import WORKER_LIVE_S

if TYPE_CHECKING:
    from producer.client import Client

log = logging.getLogger(__name__)


class StoreCollector:
    """A prometheus-client collector reading jobs and heartbeats from the results store."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families listed in the module docstring."""
        jobs = GaugeMetricFamily("mlf_jobs", "Jobs in each state.", labels=["state"])
        for state, n in self.client.store.job_counts().items():
            jobs.add_metric([state], n)
        yield jobs
        owned = GaugeMetricFamily("mlf_jobs_by_owner", "Jobs by submitting API key name and state.",
                                  labels=["owner", "state"])
        for (owner, state), n in sorted(self.client.store.job_counts_by_owner().items(),
                                        key=lambda kv: (kv[0][0] or "", kv[0][1])):
            owned.add_metric([owner or "-", state], n)
        yield owned
        workers = self.client.workers(WORKER_LIVE_S)
        yield GaugeMetricFamily("mlf_workers_live", f"Worker processes with a heartbeat younger than {WORKER_LIVE_S:.0f} s.",
                                value=len(workers))
        rate = GaugeMetricFamily("mlf_worker_rows_per_second", "Rows/s over the last minute.", labels=["worker"])
        rows = CounterMetricFamily("mlf_worker_rows", "Rows recorded since the worker started.", labels=["worker"])
        ooms = CounterMetricFamily("mlf_worker_oom_splits", "Out-of-memory batch splits since start.",
                                   labels=["worker"])
        mem = GaugeMetricFamily("mlf_worker_gpu_memory_used_bytes", "Device memory in use (NVML, heartbeat).",
                                labels=["worker", "device"])
        util = GaugeMetricFamily("mlf_worker_gpu_utilization_ratio", "GPU utilisation, 0 to 1 (NVML, heartbeat).",
                                 labels=["worker", "device"])
        for w in workers:
            rate.add_metric([w.hostname], w.rows_per_s)
            rows.add_metric([w.hostname], w.rows_done)
            ooms.add_metric([w.hostname], w.oom_splits)
            if w.device_uuid and w.device_memory_used_bytes is not None:
                mem.add_metric([w.hostname, w.device_uuid], w.device_memory_used_bytes)
            if w.device_uuid and w.device_utilization_pct is not None:
                util.add_metric([w.hostname, w.device_uuid], w.device_utilization_pct / 100.0)
        yield from (rate, rows, ooms, mem, util)
        age = self.client.store.oldest_pending_age_s()
        yield GaugeMetricFamily("mlf_oldest_pending_job_age_seconds", "Age of the oldest PENDING job, seconds.",
                                value=age or 0.0)
        yield from self._store_metrics()
        depth = GaugeMetricFamily("mlf_queue_depth", "Messages waiting on each queue.", labels=["queue"])
        try:
            for queue, n in queue_depths(self.client).items():
                depth.add_metric([queue], n)
            up = 1
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail with the broker
            log.warning("cannot read queue depths from the broker: %s", exc)
            up = 0
        yield depth
        yield GaugeMetricFamily("mlf_broker_up", "1 when the broker answered this scrape.", value=up)


    def _store_metrics(self) -> Iterator[Metric]:
        """The store's size, rows per table and oldest finished job (see the module docstring)."""
        st = self.client.store.stats()
        yield GaugeMetricFamily("mlf_store_size_bytes", "Results store on disk, bytes.", value=st.size_bytes)
        rows = GaugeMetricFamily("mlf_store_rows", "Rows per results-store table.", labels=["table"])
        for table, n in st.rows.items():
            rows.add_metric([table], n)
        yield rows
        yield GaugeMetricFamily("mlf_oldest_finished_job_age_seconds",
                                "Seconds since the oldest finished job still kept ended.",
                                value=st.oldest_finished_age_s or 0.0)


def queue_depths(client: Client) -> dict[str, int]:
    """Messages waiting on the online and bulk queues, and on every other queue of ours
    that holds messages or PENDING jobs (a queue no worker consumes shows here too), by
    queue name (see :func:`producer.queues.list_queues`)."""
    from producer.queues import list_queues

    return {q.name: q.waiting for q in list_queues(client, consumers=False)}


def render(client: Client) -> tuple[bytes, str]:
    """The Prometheus text exposition of :class:`StoreCollector` and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(client))
    return generate_latest(registry), CONTENT_TYPE_LATEST
