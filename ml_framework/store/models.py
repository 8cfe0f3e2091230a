"""ORM tables of the results store (SQLAlchemy 2) and the one definition of each state.

Migrations in ``migrations/`` create the tables. The states of jobs and shards are
:class:`JobState` and :class:`ShardState`; which of them are open (may still change) is
written once, in their ``terminal`` / ``open`` properties, and the SQL the store runs takes
its state literals from them (:data:`OPEN_JOB`, :data:`OPEN_SHARD`, :func:`sql_in`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
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
        """True once the job can change no more (every state but PENDING and RUNNING)."""
        return self not in (JobState.PENDING, JobState.RUNNING)


class ShardState(str, enum.Enum):
    """Lifecycle of a shard. DONE and FAILED shards have all their rows recorded."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def open(self) -> bool:
        """True while the shard may still be claimed or recorded (PENDING, RUNNING)."""
        return self in (ShardState.PENDING, ShardState.RUNNING)


class ShardClaim(str, enum.Enum):
    """What a worker should do with a shard message it received (the answer of
    :func:`ml_framework.store.shards.claim`)."""

    RUN = "RUN"
    ALREADY_DONE = "ALREADY_DONE"
    CANCELLED = "CANCELLED"
    UNKNOWN_JOB = "UNKNOWN_JOB"
    BUSY = "BUSY"
    """Another live worker process holds the shard's lease (the broker redelivered a
    message whose first delivery is still running): do not run it; look again later."""
    GAVE_UP = "GAVE_UP"
    """The shard was started ``max_attempts`` times and never recorded (each time its
    worker died: a poison shard); it is now FAILED, every row with a "worker lost" error."""


class CallbackState(str, enum.Enum):
    """Delivery of a job's completion callback (``jobs.callback_state``; ``NULL``: no
    callback, or the job has not ended)."""

    PENDING = "pending"
    """Due (``callback_next_at`` ``NULL`` or passed), or being attempted by the API process
    that claimed it until ``callback_next_at``."""
    DELIVERED = "delivered"
    """The receiver answered 2xx."""
    FAILED = "failed"
    """Every attempt failed (``callback_max_attempts``), or the callback can no longer be
    sent (its host is no longer allowed, its owner has no secret)."""


OPEN_JOB: tuple[str, ...] = tuple(s.value for s in JobState if not s.terminal)
"""The ``jobs.state`` values of a job still open: ``('PENDING', 'RUNNING')``."""
FINISHED_JOB: tuple[str, ...] = tuple(s.value for s in JobState if s.terminal)
"""The ``jobs.state`` values of a job that has ended."""
OPEN_SHARD: tuple[str, ...] = tuple(s.value for s in ShardState if s.open)
"""The ``shards.state`` values of a shard not yet recorded: ``('PENDING', 'RUNNING')``."""


def sql_in(values: Iterable[str]) -> str:
    """``values`` as a SQL list of string literals, e.g. ``('PENDING', 'RUNNING')``: how
    the store's prebuilt statements name states. Only for the fixed state values above
    (no quoting of user data).

    Raises:
        ValueError: a value holding a quote.
    """
    values = list(values)
    if any("'" in v for v in values):
        raise ValueError(f"not a state value: {values!r}")
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


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
    output_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Where the job's results go instead of the results database: a prefix
    (``s3://bucket/prefix`` or a local directory) holding one Parquet file per shard."""
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Where the job's completion event is delivered (HTTP POST, signed); ``None``: no callback."""
    callback_state: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    """The callback's delivery: ``None`` (no callback or not yet due), ``pending``,
    ``delivered`` or ``failed`` (retries exhausted)."""
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """When the next delivery attempt is due (the database's clock)."""


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


class RevokedSessionRow(Base):
    """A browser session token (:mod:`producer.api.auth`) signed out before it expired, by
    the SHA-256 of the token (hex): refused until ``expires_at``, then pruned."""

    __tablename__ = "revoked_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


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
    clock_skew_s: Mapped[float | None] = mapped_column(Float, nullable=True)
