"""Worker heartbeats in the results store: each worker process's latest beat and telemetry
(table ``workers``), which processes are alive, and whether a lease holder still is.

Liveness is judged by one clock, the database server's (:func:`db_now`): a heartbeat is
stamped with it, and its age is measured against it, so a worker host whose clock runs
behind or ahead is neither reported dead nor kept alive by it. Each beat also records the
host's skew (its clock minus the database's, seconds) for ``mlf workers`` to show."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from ml_framework.store.engine import read
from ml_framework.store.models import WorkerRow, as_utc

SKEW_SHOWN_S = 5.0
"""A worker host's clock skew is shown (``mlf workers``, the web UI) when over this, seconds."""


def db_now(conn: Connection) -> datetime:
    """The database server's current time, as an aware UTC datetime, read on ``conn``.

    PostgreSQL: ``clock_timestamp()`` (the wall time of the call, not of the transaction's
    start). SQLite: ``strftime('%Y-%m-%d %H:%M:%f', 'now')``, UTC to the millisecond (its
    ``CURRENT_TIMESTAMP`` has whole seconds only). The SQLite "server" is the library in
    this process, so on SQLite this is the local host's clock: a store on one host.
    """
    backend = conn.engine.dialect.name
    if backend == "sqlite":
        text = conn.execute(select(func.strftime("%Y-%m-%d %H:%M:%f", "now"))).scalar_one()
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    fn = func.clock_timestamp() if backend == "postgresql" else func.now()
    return as_utc(conn.execute(select(fn)).scalar_one()).astimezone(UTC)


@dataclass
class WorkerInfo:
    """One worker process's heartbeat and telemetry.

    Attributes:
        hostname: Celery node name, e.g. ``gpu0@host`` or ``cpu1@host``.
        pid: OS process id.
        started_at: process start (UTC, by the worker host's clock).
        last_seen_at: latest heartbeat (UTC, by the database server's clock).
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
        clock_skew_s: the worker host's clock minus the database server's, seconds,
            measured at the latest beat (positive: the host runs ahead); ``None`` from
            older workers. Set by :func:`heartbeat`; what the caller passes is ignored.
        age_s: seconds since the latest beat by the database server's clock, when read
            back by :func:`workers`; ``None`` in what a worker sends. Not stored.
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
    clock_skew_s: float | None = None
    age_s: float | None = None

    @property
    def notable_skew_s(self) -> float | None:
        """``clock_skew_s`` when its size is over :data:`SKEW_SHOWN_S` seconds, else ``None``."""
        skew = self.clock_skew_s
        return skew if skew is not None and abs(skew) > SKEW_SHOWN_S else None


def heartbeat(engine: Engine, info: WorkerInfo) -> None:
    """Record that worker process ``info.hostname`` is alive now, with its telemetry.

    The beat is stamped with the database server's time (:func:`db_now`), and the skew of
    this host's clock against it is measured (midpoint of the local clock around the read)
    and stored in ``clock_skew_s``.
    """
    values = asdict(info)
    del values["hostname"], values["age_s"]
    values["models"] = json.dumps(info.models)
    with engine.begin() as conn:
        before = time.time()
        now = db_now(conn)
        local = (before + time.time()) / 2
        values["last_seen_at"] = now
        values["clock_skew_s"] = round(local - now.timestamp(), 3)
        if not conn.execute(update(WorkerRow).where(WorkerRow.hostname == info.hostname).values(**values)).rowcount:
            conn.execute(insert(WorkerRow).values(hostname=info.hostname, **values))


def remove_worker(engine: Engine, hostname: str) -> None:
    """Forget a worker process's heartbeat (on clean shutdown)."""
    with engine.begin() as conn:
        conn.execute(delete(WorkerRow).where(WorkerRow.hostname == hostname))


def live_workers(engine: Engine, max_age_s: float) -> list[str]:
    """Hostnames of worker processes whose heartbeat is younger than ``max_age_s`` seconds
    by the database server's clock, sorted."""
    with read(engine) as conn:
        cutoff = db_now(conn) - timedelta(seconds=max_age_s)
        rows = conn.execute(select(WorkerRow.hostname, WorkerRow.last_seen_at)).all()
    return sorted(h for h, seen in rows if as_utc(seen) >= cutoff)


def workers(engine: Engine, max_age_s: float | None) -> list[WorkerInfo]:
    """Worker processes whose heartbeat is younger than ``max_age_s`` seconds by the
    database server's clock (all when ``None``), by hostname, each with its ``age_s``."""
    with read(engine) as conn:
        now = db_now(conn)
        rows = conn.execute(select(WorkerRow.__table__).order_by(WorkerRow.hostname)).mappings().all()
    cutoff = None if max_age_s is None else now - timedelta(seconds=max_age_s)
    out = []
    for row in rows:
        values = dict(row)
        values["models"] = json.loads(values["models"] or "[]")
        values["started_at"] = as_utc(values["started_at"])
        values["last_seen_at"] = as_utc(values["last_seen_at"])
        values["age_s"] = max(0.0, (now - values["last_seen_at"]).total_seconds())
        if cutoff is None or values["last_seen_at"] >= cutoff:
            out.append(WorkerInfo(**values))
    return out


def process_alive(conn: Connection, owner: str, max_age_s: float, db_time: datetime | None = None) -> bool:
    """Whether the process ``owner`` (``hostname:pid``) has beaten within the last
    ``max_age_s`` seconds by the database server's clock, read on ``conn`` (a restarted
    process under the same node name has another pid, so its predecessor counts as dead).

    ``db_time``: the database's now, when the caller read it already (:func:`db_now`);
    read on ``conn`` when ``None``."""
    hostname, _, pid = owner.rpartition(":")
    row = conn.execute(select(WorkerRow.pid, WorkerRow.last_seen_at).where(WorkerRow.hostname == hostname)).one_or_none()
    return (row is not None and str(row.pid) == pid
            and as_utc(row.last_seen_at) >= (db_time or db_now(conn)) - timedelta(seconds=max_age_s))
