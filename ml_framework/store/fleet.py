"""Worker heartbeats in the results store: each worker process's latest beat and telemetry
(table ``workers``), which processes are alive, and whether a lease holder still is."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, insert, select, update

from ml_framework.store.engine import read
from ml_framework.store.models import WorkerRow, as_utc, utc_now


@dataclass
class WorkerInfo:
    """One worker process's heartbeat and telemetry.

    Attributes:
        hostname: Celery node name, e.g. ``gpu0@host`` or ``cpu1@host``.
        pid: OS process id.
        started_at / last_seen_at: process start and latest heartbeat (UTC).
        shards_done / rows_done: shards and rows this process recorded since it started.
        rows_per_s: rows scored per second over the last minute (wall clock).
        oom_splits: out-of-memory batch splits since start.
        models: ``name/version`` of each model loaded in the process.
        threads: framework intra-op threads.
        rss_bytes: resident host memory of the process, bytes.
        device_uuid / device_name: the GPU the process is pinned to (``None`` on CPU).
        device_memory_used_bytes / device_memory_total_bytes: device memory (all
            processes on the device), bytes, from NVML.
        device_utilization_pct: GPU utilisation, percent, NVML's last sample period.
        device_temperature_c / device_power_w: degrees Celsius, watts.
        broker: the broker the process listens on, password masked (see
            :func:`ml_framework.endpoints.broker_label`); ``None`` from older workers.
    """

    hostname: str
    pid: int
    started_at: datetime
    last_seen_at: datetime | None = None
    shards_done: int = 0
    rows_done: int = 0
    rows_per_s: float = 0.0
    oom_splits: int = 0
    models: list[str] = field(default_factory=list)
    threads: int | None = None
    rss_bytes: int | None = None
    device_uuid: str | None = None
    device_name: str | None = None
    device_memory_used_bytes: int | None = None
    device_memory_total_bytes: int | None = None
    device_utilization_pct: float | None = None
    device_temperature_c: float | None = None
    device_power_w: float | None = None
    broker: str | None = None


def heartbeat(engine: Engine, info: WorkerInfo) -> None:
    """Record that worker process ``info.hostname`` is alive now, with its telemetry."""
    values = asdict(info)
    del values["hostname"]
    values["models"] = json.dumps(info.models)
    values["last_seen_at"] = utc_now()
    with engine.begin() as conn:
        if not conn.execute(update(WorkerRow).where(WorkerRow.hostname == info.hostname).values(**values)).rowcount:
            conn.execute(insert(WorkerRow).values(hostname=info.hostname, **values))


def remove_worker(engine: Engine, hostname: str) -> None:
    """Forget a worker process's heartbeat (on clean shutdown)."""
    with engine.begin() as conn:
        conn.execute(delete(WorkerRow).where(WorkerRow.hostname == hostname))


def live_workers(engine: Engine, max_age_s: float) -> list[str]:
    """Hostnames of worker processes whose heartbeat is younger than ``max_age_s`` seconds,
    sorted."""
    cutoff = utc_now() - timedelta(seconds=max_age_s)
    with read(engine) as conn:
        rows = conn.execute(select(WorkerRow.hostname, WorkerRow.last_seen_at)).all()
    return sorted(h for h, seen in rows if as_utc(seen) >= cutoff)


def workers(engine: Engine, max_age_s: float | None) -> list[WorkerInfo]:
    """Worker processes whose heartbeat is younger than ``max_age_s`` seconds (all
    when ``None``), by hostname."""
    with read(engine) as conn:
        rows = conn.execute(select(WorkerRow.__table__).order_by(WorkerRow.hostname)).mappings().all()
    cutoff = None if max_age_s is None else utc_now() - timedelta(seconds=max_age_s)
    out = []
    for row in rows:
        values = dict(row)
        values["models"] = json.loads(values["models"] or "[]")
        values["started_at"] = as_utc(values["started_at"])
        values["last_seen_at"] = as_utc(values["last_seen_at"])
        if cutoff is None or values["last_seen_at"] >= cutoff:
            out.append(WorkerInfo(**values))
    return out


def process_alive(conn: Connection, owner: str, now: datetime, max_age_s: float) -> bool:
    """Whether the process ``owner`` (``hostname:pid``) has beaten within ``max_age_s``
    seconds of ``now``, read on ``conn`` (a restarted process under the same node name has
    another pid, so its predecessor counts as dead)."""
    hostname, _, pid = owner.rpartition(":")
    row = conn.execute(select(WorkerRow.pid, WorkerRow.last_seen_at).where(WorkerRow.hostname == hostname)).one_or_none()
    return (row is not None and str(row.pid) == pid
            and as_utc(row.last_seen_at) >= now - timedelta(seconds=max_age_s))
