"""ORM tables of the results store (SQLAlchemy 2). Migrations in ``migrations/`` create them."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    """Now, as the timezone-aware UTC timestamp every table stores."""
    return datetime.now(UTC)


def as_utc(ts: datetime | None) -> datetime | None:
    """``ts`` as an aware UTC timestamp: SQLite hands back naive datetimes, and every
    timestamp the store writes is UTC."""
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


class JobState(str, enum.Enum):
    """Lifecycle of a job. Terminal: SUCCEEDED, PARTIAL, FAILED, CANCELLED.

    PARTIAL means some rows failed (each with a row error) and the others succeeded;
    FAILED means no row succeeded.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    PARTIAL = "PARTIAL"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True once the job can change no more."""
        return self not in (JobState.PENDING, JobState.RUNNING)


class ShardState(str, enum.Enum):
    """Lifecycle of a shard. DONE and FAILED shards have all their rows recorded."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class Base(DeclarativeBase):
    """Declarative base of the results-store tables."""


class JobRow(Base):
    """One scoring job: its model, dataset, counters and state."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[int] = mapped_column(Integer)
    dataset: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    n_rows: Mapped[int] = mapped_column(Integer)
    n_shards: Mapped[int] = mapped_column(Integer)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)
    rows_ok: Mapped[int] = mapped_column(Integer, default=0)
    rows_failed: Mapped[int] = mapped_column(Integer, default=0)
    batch_size: Mapped[int] = mapped_column(Integer)
    oom_splits: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    model_load_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Longest model load and warm-up (a cold start) any shard of the job waited for, seconds."""
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """The client's idempotency key, unique per owner (see :mod:`ml_framework.store.idempotency`);
    cleared when the key's window has passed and it is used again, or the job was never sent."""
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SHA-256 (hex) of the request the key named: a repeat must match it."""


# a NULL owner (CLI, Python client) is one scope: NULLs are distinct in a unique index
Index("ux_jobs_idempotency_key", func.coalesce(JobRow.owner, ""), JobRow.idempotency_key, unique=True)


class DeletedJobRow(Base):
    """The tombstone of a deleted job: who owned it, so that deleting it again answers the
    same (idempotent) for its owner and 404 for anyone else. Pruned after
    ``deleted_job_retention``."""

    __tablename__ = "deleted_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ShardRow(Base):
    """One shard of a job: a row range and who ran it."""

    __tablename__ = "shards"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    shard_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    row_start: Mapped[int] = mapped_column(Integer)
    row_end: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rows_ok: Mapped[int] = mapped_column(Integer, default=0)
    rows_failed: Mapped[int] = mapped_column(Integer, default=0)
    oom_splits: Mapped[int] = mapped_column(Integer, default=0)
    batch_rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model_load_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Seconds the shard's worker spent loading and warming up the model first (a cold
    start), ``None`` when it was loaded already."""
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """``hostname:pid`` of the worker process that holds the running shard; only it may
    record the shard while the lease lasts."""
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The bulk shard's message body (JSON), to send again should the broker lose it."""


class ShardOutputRow(Base):
    """The outputs of one shard's rows that succeeded: one compressed Arrow IPC stream
    (see :mod:`ml_framework.store.outputs`), ``row`` first, then one column per output key."""

    __tablename__ = "shard_outputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    shard_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    row_start: Mapped[int] = mapped_column(Integer)
    """Smallest input row held (0-based)."""
    row_end: Mapped[int] = mapped_column(Integer)
    """One past the largest input row held."""
    n_rows: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RowErrorRow(Base):
    """Why one input row has no output; ``field`` names the column when one is to blame."""

    __tablename__ = "row_errors"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    row_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard_index: Mapped[int] = mapped_column(Integer)
    field: Mapped[str | None] = mapped_column(Text, nullable=True)
    message: Mapped[str] = mapped_column(Text)


class WorkerRow(Base):
    """Heartbeat of one worker process, with its telemetry (see ``WorkerInfo``)."""

    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)
    device_uuid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    device_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)
    models: Mapped[str] = mapped_column(Text, default="[]")
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    oom_splits: Mapped[int] = mapped_column(Integer, default=0)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    device_memory_used_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    device_memory_total_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    device_utilization_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_power_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    broker: Mapped[str | None] = mapped_column(String(1024), nullable=True)
