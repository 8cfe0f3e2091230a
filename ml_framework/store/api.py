"""The results-store API: the only code that writes jobs, shards, results and row errors
(deleting them is :mod:`ml_framework.store.lifecycle`'s, behind the methods here).

Every write that moves a shard is one transaction. Completing a shard is idempotent: the
shard row is flipped from PENDING/RUNNING to DONE/FAILED by a conditional UPDATE first, and
only the transaction that flipped it inserts rows, so a redelivered shard never
duplicates results (primary keys ``(job_id, shard_index)`` of ``shard_outputs`` and
``(job_id, row_index)`` of ``row_errors`` back this up).

A shard's outputs are stored as one columnar blob (:mod:`ml_framework.store.outputs`);
row errors, rare, one row each.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import (
    Boolean,
    DateTime,
    Engine,
    LargeBinary,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from ml_framework.errors import JobNotFoundError, StoreError, StoreUnavailableError
from ml_framework.store import idempotency, lifecycle
from ml_framework.store import outputs as shard_outputs
from ml_framework.store.engine import READ_ONLY, make_engine, upgrade
from ml_framework.store.lifecycle import PruneReport, StoreStats
from ml_framework.store.schema import (
    JobRow,
    JobState,
    RowErrorRow,
    ShardOutputRow,
    ShardRow,
    ShardState,
    WorkerRow,
    as_utc,
    utc_now,
)

_OPEN_SHARD = (ShardState.PENDING.value, ShardState.RUNNING.value)
_OPEN_JOB = (JobState.PENDING.value, JobState.RUNNING.value)
HOLDER_STALE_S = 20.0
"""A shard's holder whose heartbeat (every 5 s) is older than this is presumed dead, and
its lease void: four missed beats."""
_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's 32,766 bound parameters


@dataclass
class NewJob:
    """A job for :meth:`ResultStore.create_jobs` (see :meth:`ResultStore.create_job`).

    Attributes:
        output_schema: the columns the model's outputs become
            (:func:`~ml_framework.store.outputs.output_schema`); kept for a job without
            shards, whose results then still carry them.
    """

    job_id: str
    model: str
    model_version: int
    dataset: str
    n_rows: int
    shard_ranges: list[tuple[int, int]]
    batch_size: int
    priority: int = 0
    owner: str | None = None
    output_schema: pa.Schema | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None


_now = utc_now
_aware = as_utc


@dataclass(frozen=True)
class RowError:
    """Why one row has no output.

    Attributes:
        row_index: 0-based row of the dataset (header excluded).
        message: what was wrong, naming the value when there is one.
        field: the column to blame, if any.
    """

    row_index: int
    message: str
    field: str | None = None


# Hot-path statements of online requests, as prebuilt text: building and cache-keying an
# expression per call costs more than the round trip on a small request (measured: 3.9 ms
# for recording one request with expressions, most of it SQLAlchemy's statement
# construction and cache-key generation). Datetimes are bound with the column's type, so
# SQLite stores them exactly as the ORM does.
_TS = DateTime(timezone=True)
_INSERT_JOB = text(
    "INSERT INTO jobs (id, model, model_version, dataset, state, n_rows, n_shards, shards_done, rows_ok, "
    "rows_failed, batch_size, oom_splits, priority, owner, created_at, idempotency_key, request_hash) VALUES (:id, "
    ":model, :model_version, :dataset, 'PENDING', :n_rows, :n_shards, 0, 0, 0, :batch_size, 0, :priority, :owner, "
    ":now, :idempotency_key, :request_hash)"
).bindparams(bindparam("now", type_=_TS))
_INSERT_SHARD = text(
    "INSERT INTO shards (job_id, shard_index, row_start, row_end, state, attempts, deliveries, rows_ok, rows_failed, "
    "oom_splits) VALUES (:job_id, :shard_index, :row_start, :row_end, 'PENDING', 0, 0, 0, 0, 0)"
)
_FINISH_EMPTY_JOBS = text(  # a job without shards has nothing to wait for
    "UPDATE jobs SET state = 'SUCCEEDED', started_at = :now, finished_at = :now WHERE id IN :job_ids"
).bindparams(bindparam("now", type_=_TS), bindparam("job_ids", expanding=True))
_SET_MESSAGE = text("UPDATE shards SET message = :message WHERE job_id = :job_id AND shard_index = :shard_index "
                    "AND state IN ('PENDING', 'RUNNING')")
_INSERT_OUTPUTS = text(
    "INSERT INTO shard_outputs (job_id, shard_index, row_start, row_end, n_rows, data) "
    "VALUES (:job_id, :shard_index, :row_start, :row_end, :n_rows, :data)"
).bindparams(bindparam("data", type_=LargeBinary))
_INSERT_ROW_ERROR = text(
    "INSERT INTO row_errors (job_id, row_index, shard_index, field, message) "
    "VALUES (:job_id, :row_index, :shard_index, :field, :message)")
_FLIP_ONLINE_SHARDS = text(
    "UPDATE shards SET state = :state, finished_at = :now, worker = :worker, rows_ok = :ok, rows_failed = :failed, "
    "error = :error, oom_splits = :oom, batch_rows = :batch_rows, started_at = COALESCE(started_at, :now), "
    "attempts = attempts + 1, deliveries = deliveries + 1 "
    "WHERE shard_index = :shard_index AND job_id IN :job_ids AND state IN ('PENDING', 'RUNNING') "
    "RETURNING job_id"
).bindparams(bindparam("now", type_=_TS), bindparam("job_ids", expanding=True))
_BUMP_JOBS = text(  # SET expressions read the row as it was before the update (SQL standard)
    "UPDATE jobs SET shards_done = shards_done + :shards, rows_ok = rows_ok + :ok, "
    "rows_failed = rows_failed + :failed, oom_splits = oom_splits + :oom, "
    "state = CASE WHEN state NOT IN ('PENDING', 'RUNNING') OR shards_done + :shards < n_shards THEN state "
    "WHEN rows_ok + :ok = 0 THEN 'FAILED' WHEN rows_failed + :failed > 0 THEN 'PARTIAL' ELSE 'SUCCEEDED' END, "
    "finished_at = CASE WHEN state IN ('PENDING', 'RUNNING') AND shards_done + :shards >= n_shards THEN :now "
    "ELSE finished_at END, "
    "started_at = CASE WHEN :started THEN COALESCE(started_at, :now) ELSE started_at END "
    "WHERE id IN :job_ids"
).bindparams(bindparam("now", type_=_TS), bindparam("started", type_=Boolean), bindparam("job_ids", expanding=True))
_FINISHED_STATES = text(
    "SELECT id, state FROM jobs WHERE id IN :job_ids AND state NOT IN ('PENDING', 'RUNNING')"
).bindparams(bindparam("job_ids", expanding=True))
_FINISHED_OUTPUTS = text(
    "SELECT job_id, data FROM shard_outputs WHERE job_id IN :job_ids ORDER BY job_id, shard_index"
).bindparams(bindparam("job_ids", expanding=True))
_FINISHED_ERRORS = text(
    "SELECT job_id, row_index, field, message FROM row_errors WHERE job_id IN :job_ids"
).bindparams(bindparam("job_ids", expanding=True))


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job's progress.

    Attributes:
        rows_ok / rows_failed: rows recorded so far with an output / with a row error.
        shards_done: shards whose rows are all recorded (DONE or FAILED).
        oom_splits: batches that ran out of memory and were retried in halves.
        priority: 0 to 9 (9 most urgent), as submitted.
        model_load_s: the longest model load and warm-up a shard of this job waited for
            (a worker's cold start), seconds; ``None`` when every shard found its model
            loaded.
        owner: name of the API key that submitted the job; ``None`` from the CLI or the
            Python client.
    """

    job_id: str
    model: str
    model_version: int
    dataset: str
    state: JobState
    n_rows: int
    n_shards: int
    shards_done: int
    rows_ok: int
    rows_failed: int
    batch_size: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    oom_splits: int = 0
    priority: int = 0
    model_load_s: float | None = None
    owner: str | None = None

    @property
    def rows_done(self) -> int:
        """Rows recorded so far, with an output or an error."""
        return self.rows_ok + self.rows_failed

    @property
    def elapsed_s(self) -> float | None:
        """Seconds from the first shard start to the end (or to now while running)."""
        if self.started_at is None:
            return None
        return ((self.finished_at or _now()) - self.started_at).total_seconds()


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


class ShardClaim(str, enum.Enum):
    """What a worker should do with a shard message it received."""

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


class ResultStore:
    """Jobs, shards, results and row errors in a SQL database.

    Args:
        url: SQLAlchemy URL (SQLite or PostgreSQL).
        migrate: run the Alembic upgrade to the newest schema on open (idempotent).
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        if migrate:
            try:
                upgrade(self.engine)
            except (OperationalError, InterfaceError) as exc:
                raise StoreUnavailableError(f"cannot reach results store {self.engine.url!r}: {exc}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(f"cannot open results store {self.engine.url!r}: {exc}") from exc

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def _read(self):
        return self.engine.connect().execution_options(**{READ_ONLY: True})

    # ----------------------------------------------------------------- producer side
    def create_job(
        self,
        *,
        model: str,
        model_version: int,
        dataset: str,
        n_rows: int,
        shard_ranges: Sequence[tuple[int, int]],
        batch_size: int,
        priority: int = 0,
        owner: str | None = None,
        output_schema: pa.Schema | None = None,
    ) -> str:
        """Record a PENDING job and its PENDING shards; return the new job id (32 hex chars).

        A job without shards (a dataset without rows) is recorded SUCCEEDED: no worker
        has anything to do for it. Its results are empty, with the columns of
        ``output_schema`` (the model's outputs, see :class:`NewJob`).

        Args:
            owner: the name of the API key submitting the job (``None``: CLI, Python client).
        """
        job = NewJob(uuid.uuid4().hex, model, model_version, dataset, n_rows, list(shard_ranges), batch_size,
                     priority, owner, output_schema)
        self.create_jobs([job])
        return job.job_id

    def create_jobs(self, jobs: Sequence[NewJob]) -> None:
        """Record several PENDING jobs and their PENDING shards in one transaction (two
        multi-row INSERTs, whatever the number of jobs): online requests arriving together
        are recorded together. Jobs without shards are recorded SUCCEEDED (see
        :meth:`create_job`)."""
        with self.engine.begin() as conn:
            _insert_jobs(conn, jobs, _now())

    def create_job_once(self, job: NewJob, key: idempotency.Idempotency) -> tuple[str, bool]:
        """Record ``job`` under the idempotency ``key``, unless the key names a job already
        (see :mod:`ml_framework.store.idempotency`). Race-safe: of several callers with one
        key, exactly one records its job (a unique index); the others get that job's id.

        Args:
            job: the job to record; its key fields are set from ``key``.
            key: the idempotency key, its request hash, owner and window.

        Returns:
            ``(job id, created)``: ``job.job_id`` and ``True`` when it was recorded, else
            the id of the job the key names and ``False``.

        Raises:
            IdempotencyKeyReusedError: the key names a job submitted with another request.
        """
        job.idempotency_key, job.request_hash, job.owner = key.key, key.request_hash, key.owner
        try:
            with self.engine.begin() as conn:
                now = _now()
                existing = key.find(conn, now)
                if existing is not None:
                    return existing, False
                key.release_expired(conn, now)
                _insert_jobs(conn, [job], now)
        except IntegrityError:  # another caller recorded a job with this key first
            existing = self.idempotent_job(key)
            if existing is None:
                raise
            return existing, False
        return job.job_id, True

    def idempotent_job(self, key: idempotency.Idempotency) -> str | None:
        """The id of the job the idempotency ``key`` names (created within its window), or
        ``None``.

        Raises:
            IdempotencyKeyReusedError: the key names a job submitted with another request.
        """
        with self._read() as conn:
            return key.find(conn, _now())

    def release_idempotency_key(self, job_id: str) -> None:
        """Take the idempotency key off ``job_id`` (its messages could not be sent), so
        that a retry with the key submits a new job."""
        with self.engine.begin() as conn:
            idempotency.release(conn, job_id)

    def set_shard_messages(self, job_id: str, messages: Sequence[tuple[int, str]]) -> None:
        """Keep the message (JSON text, ``{"queue", "kwargs"}``) of each ``(shard_index,
        message)`` sent, so that a shard whose message the broker lost can be sent again
        (:meth:`orphaned_shards`); cleared when the shard is recorded."""
        if messages:
            with self.engine.begin() as conn:
                conn.execute(_SET_MESSAGE, [{"job_id": job_id, "shard_index": i, "message": m} for i, m in messages])

    def orphaned_shards(self, min_age_s: float, limit: int = 1000) -> list[tuple[str, int, str, int]]:
        """Open bulk shards that no worker holds: PENDING, or RUNNING with an ended lease
        or a dead holder, of open jobs created more than ``min_age_s`` seconds ago, with a
        kept message. Call it only when the broker holds no message for the bulk queue
        (none waiting, none unacknowledged): then their messages were lost.

        Returns:
            Up to ``limit`` ``(job_id, shard_index, message, job priority)``.
        """
        now = _now()
        with self._read() as conn:
            rows = conn.execute(
                select(ShardRow.job_id, ShardRow.shard_index, ShardRow.state, ShardRow.lease_owner,
                       ShardRow.lease_expires_at, JobRow.priority)
                .join(JobRow, JobRow.id == ShardRow.job_id)
                .where(JobRow.state.in_(_OPEN_JOB), ShardRow.state.in_(_OPEN_SHARD), ShardRow.message.is_not(None),
                       JobRow.created_at < now - timedelta(seconds=min_age_s))
                .order_by(JobRow.created_at, ShardRow.shard_index).limit(limit)
            ).all()
            lost = [r for r in rows if r.state == ShardState.PENDING.value or r.lease_owner is None
                    or r.lease_expires_at is None or _aware(r.lease_expires_at) <= now
                    or not _holder_alive(conn, r.lease_owner, now)]
            out = []
            for r in lost:
                message = conn.execute(select(ShardRow.message).where(
                    ShardRow.job_id == r.job_id, ShardRow.shard_index == r.shard_index)).scalar_one()
                out.append((r.job_id, r.shard_index, message, r.priority))
        return out

    def job(self, job_id: str) -> JobStatus:
        """Current status of ``job_id``.

        Raises:
            JobNotFoundError: no such job.
        """
        with self._read() as conn:
            row = conn.execute(select(JobRow.__table__).where(JobRow.id == job_id)).one_or_none()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r} in results store {self.engine.url!r}")
        return _job_status(row)

    def recent_jobs(self, limit: int = 50, *, owned_by: str | None = None) -> list[JobStatus]:
        """The jobs a job list shows: those still open (PENDING, RUNNING), newest first,
        then the most recently ended, ``limit`` in all. Each query walks an index (state,
        finished_at), so the cost does not grow with the jobs the store holds.

        Args:
            limit: most jobs returned.
            owned_by: only the jobs of this API key name; ``None``: every job.
        """
        jobs = select(JobRow.__table__)
        if owned_by is not None:
            jobs = jobs.where(JobRow.owner == owned_by)
        with self._read() as conn:
            rows = conn.execute(jobs.where(JobRow.state.in_(_OPEN_JOB))
                                .order_by(JobRow.created_at.desc()).limit(limit)).all()
            if len(rows) < limit:
                rows += conn.execute(jobs.where(JobRow.finished_at.is_not(None), JobRow.state.not_in(_OPEN_JOB))
                                     .order_by(JobRow.finished_at.desc()).limit(limit - len(rows))).all()
        return [_job_status(r) for r in rows]

    def row_errors(self, job_id: str, limit: int = 10) -> list[RowError]:
        """The first ``limit`` row errors of a job, by row (an index range of the primary
        key: cheap however many rows failed). Empty for an unknown job."""
        query = (select(RowErrorRow.row_index, RowErrorRow.message, RowErrorRow.field)
                 .where(RowErrorRow.job_id == job_id).order_by(RowErrorRow.row_index).limit(limit))
        with self._read() as conn:
            return [RowError(row, message, field_) for row, message, field_ in conn.execute(query)]

    def resolve_job_id(self, id_or_prefix: str, *, owned_by: str | None = None, min_prefix: int = 4) -> str:
        """The full id of the one job whose id is, or starts with, ``id_or_prefix``.

        Args:
            id_or_prefix: a job id or its first ``min_prefix`` or more hex characters.
            owned_by: look only among the jobs of this API key name (the HTTP API's
                callers); ``None``: among every job.
            min_prefix: fewest characters accepted (the HTTP API asks for 8).

        Raises:
            JobNotFoundError: no job matches, the prefix is too short, or several match.
        """
        prefix = id_or_prefix.strip().lower()
        if len(prefix) < min_prefix or not all(c in "0123456789abcdef" for c in prefix):
            raise JobNotFoundError(f"no job {id_or_prefix!r}: give the job id (32 hex characters) or at least "
                                   f"{min_prefix} of its first characters")
        query = select(JobRow.id).where(JobRow.id.startswith(prefix))
        if owned_by is not None:
            query = query.where(JobRow.owner == owned_by)
        with self._read() as conn:
            ids = conn.execute(query.limit(5)).scalars().all()
        if not ids:
            raise JobNotFoundError(f"no job {id_or_prefix!r} in results store {self.engine.url!r}")
        if len(ids) > 1:
            raise JobNotFoundError(f"job id prefix {id_or_prefix!r} is ambiguous: {', '.join(ids)}")
        return ids[0]

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job that has not finished: no shard starts after this; shards already
        running may still record their rows. A finished job is left as it is.

        Raises:
            JobNotFoundError: no such job.
        """
        self.job(job_id)
        # Rows are locked in the order every writer uses, shards before their job (claims
        # and recordings flip a shard, then update its job): the other order deadlocks on
        # PostgreSQL against a worker recording the same job (found with online requests
        # timing out while answered).
        open_job = select(JobRow.id).where(JobRow.id == job_id, JobRow.state.in_(_OPEN_JOB)).exists()
        with self.engine.begin() as conn:
            conn.execute(
                update(ShardRow)
                .where(ShardRow.job_id == job_id, ShardRow.state == ShardState.PENDING.value, open_job)
                .values(state=ShardState.CANCELLED.value, message=None)
            )
            conn.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state.in_(_OPEN_JOB))
                .values(state=JobState.CANCELLED.value, finished_at=_now())
            )
        return self.job(job_id)

    def delete_job(self, job_id: str) -> PruneReport | None:
        """Delete a job and everything it owns (shards, output blobs, row errors), leaving a
        tombstone; a PENDING or RUNNING job is cancelled first. Bounded transactions: see
        :mod:`ml_framework.store.lifecycle`.

        Args:
            job_id: the full job id.

        Returns:
            The rows and bytes deleted, or ``None`` if there was no such job (deleted
            already: deleting is idempotent).
        """
        return lifecycle.delete_job(self, job_id)

    def deleted_owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether job ``job_id`` (a full id) was deleted (its tombstone is still kept),
        and the name of the API key that owned it (``None``: CLI or Python client)."""
        return lifecycle.deleted_owner(self, job_id)

    def prune(self, *, results_retention_s: float | None, worker_retention_s: float | None = None,
              deleted_job_retention_s: float | None = None, dry_run: bool = False,
              limit: int = lifecycle.PRUNE_JOBS_PER_PASS, now: datetime | None = None) -> PruneReport:
        """One pass of retention: see :func:`ml_framework.store.lifecycle.prune`."""
        return lifecycle.prune(self, results_retention_s=results_retention_s, worker_retention_s=worker_retention_s,
                               deleted_job_retention_s=deleted_job_retention_s, dry_run=dry_run, limit=limit,
                               now=now)

    def stats(self) -> StoreStats:
        """Size in bytes, rows per table, age of the oldest finished job (see
        :class:`~ml_framework.store.lifecycle.StoreStats`)."""
        return lifecycle.stats(self)

    def results(self, job_id: str) -> pd.DataFrame:
        """Outputs and row errors of a job, in input row order.

        Returns:
            DataFrame indexed by ``row`` (0-based input row), one column per output key
            (e.g. ``prediction``, ``score``, ``probabilities``), plus ``error`` and
            ``error_field`` (``None`` on rows that succeeded). Rows not yet recorded are absent.

        Raises:
            JobNotFoundError: no such job.
        """
        return results_frame(*self._recorded_rows(job_id))

    def results_table(self, job_id: str) -> pa.Table:
        """Outputs and row errors of a job as one Arrow table, in input row order (what
        ``mlf results -o`` and the API's downloads write, without a pandas round trip).

        Returns:
            ``row`` (int64) first, one column per output key (null on rows that failed;
            integer labels stay integers), then ``error`` and ``error_field`` (text, null
            on rows that succeeded). Rows not yet recorded are absent.

        Raises:
            JobNotFoundError: no such job.
        """
        table, errors = self._recorded_rows(job_id)
        failed = pa.table({shard_outputs.ROW: pa.array([r for r, _, _ in errors], pa.int64()),
                           "error": pa.array([m for _, _, m in errors], pa.string()),
                           "error_field": pa.array([f for _, f, _ in errors], pa.string())})
        if table is None:
            return failed.sort_by(shard_outputs.ROW)
        nulls = pa.nulls(table.num_rows, pa.string())
        scored = table.append_column("error", nulls).append_column("error_field", nulls)
        merged = pa.concat_tables([scored, failed], promote_options="permissive") if errors else scored
        return merged.sort_by(shard_outputs.ROW)

    def finished(self, job_ids: Sequence[str]) -> dict[str, tuple[JobState, pa.Table | None, list]]:
        """The jobs among ``job_ids`` that have ended, with their recorded rows, in three
        queries whatever their number (how waiting online callers get their answers).

        Returns:
            ``{job_id: (state, outputs, errors)}`` for each terminal job, where ``outputs``
            is the output table (``row`` first, see :mod:`ml_framework.store.outputs`) or
            ``None`` when no row succeeded, and ``errors`` ``(row_index, field, message)``
            tuples, as :func:`results_frame` takes them. Unknown and unfinished jobs are absent.
        """
        states: dict[str, JobState] = {}
        tables: dict[str, list[pa.Table]] = defaultdict(list)
        errors: dict[str, list] = defaultdict(list)
        with self._read() as conn:
            for chunk in _chunks(list(job_ids)):
                ended = {job_id: JobState(state) for job_id, state in conn.execute(_FINISHED_STATES, {"job_ids": chunk})}
                if not ended:
                    continue
                states.update(ended)
                for job_id, data in conn.execute(_FINISHED_OUTPUTS, {"job_ids": list(ended)}):
                    tables[job_id].append(shard_outputs.decode(data))
                for job_id, row, field_, message in conn.execute(_FINISHED_ERRORS, {"job_ids": list(ended)}):
                    errors[job_id].append((row, field_, message))
        return {j: (state, shard_outputs.concat(tables.get(j, [])), errors.get(j, [])) for j, state in states.items()}

    def _recorded_rows(self, job_id: str, lo: int = 0, hi: int | None = None) -> tuple[pa.Table | None, list]:
        """The output table (``None`` when empty) and ``(row_index, field, message)`` rows
        of a job among input rows ``[lo, hi)`` (all when ``hi`` is ``None``). Raises
        ``JobNotFoundError``."""
        self.job(job_id)
        outs = select(ShardOutputRow.data).where(ShardOutputRow.job_id == job_id,  # n_rows 0: a job without rows
                                                 or_(ShardOutputRow.row_end > lo, ShardOutputRow.n_rows == 0))
        errs = select(RowErrorRow.row_index, RowErrorRow.field, RowErrorRow.message).where(
            RowErrorRow.job_id == job_id, RowErrorRow.row_index >= lo)
        if hi is not None:
            outs, errs = outs.where(ShardOutputRow.row_start < hi), errs.where(RowErrorRow.row_index < hi)
        with self._read() as conn:
            blobs = conn.execute(outs.order_by(ShardOutputRow.shard_index)).scalars().all()
            errors = conn.execute(errs).all()
        table = shard_outputs.concat([shard_outputs.decode(b) for b in blobs])
        if table is not None and (lo > 0 or hi is not None):
            rows = table.column(shard_outputs.ROW)
            keep = pc.greater_equal(rows, lo)
            if hi is not None:
                keep = pc.and_(keep, pc.less(rows, hi))
            table = table.filter(keep)
        return table, errors

    def results_page(self, job_id: str, offset: int, limit: int) -> list[dict]:
        """The recorded rows of a job among input rows ``[offset, offset + limit)``.

        Returns:
            One dict per recorded row, in row order: ``row``, the output keys (e.g.
            ``prediction``, ``score``, ``probabilities``) for rows that succeeded, or
            ``error`` and ``error_field`` for rows that failed. Rows not yet recorded are
            absent. Reads only the shards whose rows overlap the page: a page costs the
            same at any offset.

        Raises:
            JobNotFoundError: no such job.
        """
        table, errs = self._recorded_rows(job_id, offset, offset + limit)
        rows = [] if table is None else [{k: v for k, v in rec.items() if v is not None} for rec in table.to_pylist()]
        rows += [{"row": r, "error": m, "error_field": f} for r, f, m in errs]
        return sorted(rows, key=lambda d: d["row"])

    def job_counts(self) -> dict[str, int]:
        """Number of jobs in each :class:`JobState` (every state present, zeros included)."""
        with self._read() as conn:
            rows = conn.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        counts = {state.value: 0 for state in JobState}
        counts.update({state: n for state, n in rows})
        return counts

    def job_counts_by_owner(self) -> dict[tuple[str | None, str], int]:
        """Number of jobs by ``(owner, state)``, for the pairs that have any (owner ``None``:
        jobs from the CLI or the Python client)."""
        with self._read() as conn:
            rows = conn.execute(select(JobRow.owner, JobRow.state, func.count())
                                .group_by(JobRow.owner, JobRow.state)).all()
        return {(owner, state): n for owner, state, n in rows}

    def oldest_pending_age_s(self) -> float | None:
        """Seconds since the oldest PENDING job was created; ``None`` when none is."""
        with self._read() as conn:
            oldest = conn.execute(select(func.min(JobRow.created_at)).where(
                JobRow.state == JobState.PENDING.value)).scalar()
        return None if oldest is None else max(0.0, (_now() - _aware(oldest)).total_seconds())

    def pending_jobs_by_queue(self, job_ids: Sequence[str] | None = None, limit: int = 1000) -> dict[str, list[str]]:
        """PENDING bulk jobs (oldest first, at most ``limit``; only ``job_ids`` when given)
        by the broker queue their shards were sent to, read from each job's first kept
        shard message (online requests keep none, and are left out)."""
        query = (select(ShardRow.job_id, ShardRow.message).join(JobRow, JobRow.id == ShardRow.job_id)
                 .where(JobRow.state == JobState.PENDING.value, ShardRow.shard_index == 0,
                        ShardRow.message.is_not(None))
                 .order_by(JobRow.created_at).limit(limit))
        if job_ids is not None:
            query = query.where(JobRow.id.in_(list(job_ids)))
        with self._read() as conn:
            rows = conn.execute(query).all()
        by_queue: dict[str, list[str]] = defaultdict(list)
        for job_id, message in rows:
            try:
                by_queue[json.loads(message)["queue"]].append(job_id)
            except (ValueError, KeyError, TypeError):  # a message of an older version: no queue in it
                continue
        return dict(by_queue)

    def ping(self) -> None:
        """Run ``SELECT 1``. Raises ``StoreUnavailableError`` when the database is unreachable."""
        try:
            with self._read() as conn:
                conn.execute(select(1))
        except SQLAlchemyError as exc:
            raise StoreUnavailableError(f"results store {self.engine.url!r} unreachable: {exc}") from exc

    def live_workers(self, max_age_s: float = 30.0) -> list[str]:
        """Hostnames of worker processes whose heartbeat is younger than ``max_age_s``."""
        cutoff = _now() - timedelta(seconds=max_age_s)
        with self._read() as conn:
            rows = conn.execute(select(WorkerRow.hostname, WorkerRow.last_seen_at)).all()
        return sorted(h for h, seen in rows if _aware(seen) >= cutoff)

    def workers(self, max_age_s: float | None = 30.0) -> list[WorkerInfo]:
        """Worker processes whose heartbeat is younger than ``max_age_s`` seconds (all
        when ``None``), by hostname."""
        with self._read() as conn:
            rows = conn.execute(select(WorkerRow.__table__).order_by(WorkerRow.hostname)).mappings().all()
        cutoff = None if max_age_s is None else _now() - timedelta(seconds=max_age_s)
        out = []
        for row in rows:
            values = dict(row)
            values["models"] = json.loads(values["models"] or "[]")
            values["started_at"] = _aware(values["started_at"])
            values["last_seen_at"] = _aware(values["last_seen_at"])
            if cutoff is None or values["last_seen_at"] >= cutoff:
                out.append(WorkerInfo(**values))
        return out

    # ------------------------------------------------------------------- worker side
    def claim_shard(self, job_id: str, shard_index: int, worker: str, max_attempts: int | None = None, *,
                    owner: str | None = None, lease_s: float | None = None) -> ShardClaim:
        """Mark a shard RUNNING (counting the attempt) unless it is finished, cancelled, or
        held by another live worker process.

        Every call counts one delivery of the shard's message, whatever the outcome.

        Args:
            worker: the claiming worker's node name (shown in ``mlf status``).
            max_attempts: a shard already started this many times without being recorded
                (its workers died: SIGKILL, out of memory, a crash in native code) is not
                run again: it is recorded FAILED, every row with a "worker lost" error,
                and :attr:`ShardClaim.GAVE_UP` is returned. ``None``: no bound.
            owner: ``hostname:pid`` of the claiming process. With ``lease_s``, the claim
                takes a lease on the shard for ``lease_s`` seconds: while it lasts and the
                holder's heartbeat (same hostname and pid) is younger than
                :data:`HOLDER_STALE_S`, other deliveries get :attr:`ShardClaim.BUSY`, and
                only the holder may record the shard (:meth:`complete_shard`).
            lease_s: the lease's length, seconds: the longest a shard may run (the hard
                time limit) plus a margin.
        """
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(
                update(ShardRow).where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index)
                .values(deliveries=ShardRow.deliveries + 1)
            )
            job_state = conn.execute(select(JobRow.state).where(JobRow.id == job_id)).scalar_one_or_none()
            if job_state is None:
                return ShardClaim.UNKNOWN_JOB
            shard = conn.execute(
                select(ShardRow.state, ShardRow.attempts, ShardRow.row_start, ShardRow.row_end,
                       ShardRow.lease_owner, ShardRow.lease_expires_at)
                .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index)
            ).one_or_none()
            held = (shard is not None and shard.state == ShardState.RUNNING.value and shard.lease_owner
                    and shard.lease_owner != owner and shard.lease_expires_at is not None
                    and _aware(shard.lease_expires_at) > now and _holder_alive(conn, shard.lease_owner, now))
            if job_state == JobState.CANCELLED.value:
                if not held:  # a shard its live holder still runs keeps its rows when recorded
                    conn.execute(
                        update(ShardRow)
                        .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                               ShardRow.state.in_(_OPEN_SHARD))
                        .values(state=ShardState.CANCELLED.value, message=None)
                    )
                return ShardClaim.CANCELLED
            if shard is None or shard.state not in _OPEN_SHARD:
                return ShardClaim.ALREADY_DONE
            if held:
                return ShardClaim.BUSY
            if max_attempts is not None and shard.attempts >= max_attempts:
                reason = (f"worker lost: the shard was started {shard.attempts} times and its worker process died "
                          "each time before recording it (killed, out of memory, a crash in native code, or "
                          f"the hard time limit); max_shard_attempts is {max_attempts}")
                _record_failed(conn, job_id, shard_index, range(shard.row_start, shard.row_end), reason, now)
                return ShardClaim.GAVE_UP
            claimed = conn.execute(
                update(ShardRow)
                .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                       ShardRow.state.in_(_OPEN_SHARD))
                .values(state=ShardState.RUNNING.value, attempts=ShardRow.attempts + 1,
                        worker=worker, started_at=now, lease_owner=owner,
                        lease_expires_at=None if lease_s is None else now + timedelta(seconds=lease_s))
            ).rowcount
            if not claimed:
                return ShardClaim.ALREADY_DONE
            conn.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == JobState.PENDING.value)
                .values(state=JobState.RUNNING.value, started_at=now)
            )
        return ShardClaim.RUN

    def release_leases(self, owner: str) -> int:
        """End every lease ``owner`` (``hostname:pid``) holds, so that the next delivery of
        its shards runs them at once: called by the launcher when a worker process dies.

        Returns:
            The number of running shards released.
        """
        with self.engine.begin() as conn:
            return conn.execute(
                update(ShardRow)
                .where(ShardRow.lease_owner == owner, ShardRow.state == ShardState.RUNNING.value)
                .values(lease_expires_at=_now())
            ).rowcount

    def release_lease(self, job_id: str, shard_index: int, owner: str) -> bool:
        """End ``owner``'s lease on one shard it could not record (the results store failed
        under it; the task is retried), and uncount that start: the worker did not die.

        Returns:
            True if ``owner`` held the running shard.
        """
        with self.engine.begin() as conn:
            return bool(conn.execute(
                update(ShardRow)
                .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                       ShardRow.lease_owner == owner, ShardRow.state == ShardState.RUNNING.value)
                .values(lease_expires_at=_now(), attempts=ShardRow.attempts - 1)
            ).rowcount)

    def fail_running_shard(self, job_id: str, shard_index: int, owner: str, reason: str) -> bool:
        """Record a shard that ``owner`` was running as FAILED, every row with ``reason``:
        the launcher's answer to a shard that ran past the hard time limit.

        Returns:
            True if recorded; False if the shard was no longer open or held by ``owner``.
        """
        with self.engine.begin() as conn:
            shard = conn.execute(
                select(ShardRow.row_start, ShardRow.row_end)
                .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                       ShardRow.state == ShardState.RUNNING.value, ShardRow.lease_owner == owner)
            ).one_or_none()
            if shard is None:
                return False
            return _record_failed(conn, job_id, shard_index, range(shard.row_start, shard.row_end), reason, _now(),
                                  owner=owner)

    def complete_shard(
        self,
        job_id: str,
        shard_index: int,
        outputs: Sequence[tuple[int, dict]],
        errors: Sequence[RowError],
        *,
        shard_error: str | None = None,
        oom_splits: int = 0,
        batch_rows: int | None = None,
        owner: str | None = None,
        model_load_s: float | None = None,
    ) -> bool:
        """Record a shard's outputs and row errors in one transaction.

        Args:
            outputs: the output table (``row`` first, then one column per output key; see
                :mod:`ml_framework.store.outputs`), or ``(row_index, output)`` pairs, each
                output a JSON-serialisable dict. Stored as one compressed blob.
            errors: one :class:`RowError` per row without output.
            shard_error: set when the shard as a whole failed (then ``outputs`` is empty
                and every row has an error); the shard ends FAILED instead of DONE.
            oom_splits: batches of this shard split after an out-of-memory error; added
                to the job's count.
            batch_rows: rows of the gathered forward pass that scored this shard (online
                requests batched together); ``None`` for bulk shards.
            owner: the ``hostname:pid`` that claimed the shard: the rows are written only
                while the shard's lease is still this owner's (another process that took
                the shard over after the lease ended records it instead).
            model_load_s: seconds the worker spent loading the model for this shard (a
                cold start); the job keeps the longest.

        Returns:
            True if this call recorded the shard; False if it was already recorded (a
            redelivery) or its lease passed to another process, and nothing was written.
        """
        with self.engine.begin() as conn:
            return _record(conn, ShardOutcomeRecord(job_id, shard_index, shard_outputs.as_table(outputs), list(errors),
                                                    shard_error, oom_splits, batch_rows, model_load_s),
                           _now(), owner=owner)

    def record_online(self, records: Sequence[ShardOutcomeRecord], worker: str) -> list[bool]:
        """Record several online requests' shards in one transaction, without a separate
        claim: each shard goes from PENDING (or RUNNING) straight to DONE / FAILED, and is
        stamped with ``worker`` and a start time.

        The statements are set-based: records with the same counts share one conditional
        ``UPDATE ... RETURNING`` that flips their open shards, the rows go in one multi-row
        INSERT, and jobs with the same counts share one UPDATE that also finishes them. A
        dynamic batch of N single-row requests that all succeeded costs three statements,
        whatever N.

        Returns:
            Per record, True if this call recorded it (False: already recorded, or the
            job was cancelled).
        """
        if not records:
            return []
        now = _now()
        keys = [(r.job_id, r.shard_index) for r in records]
        by_values: dict[tuple, list[str]] = defaultdict(list)
        for r in records:  # a batch of single-row requests that all succeeded is one group
            by_values[_online_values(r)].append(r.job_id)
        with self.engine.begin() as conn:
            flipped: dict[tuple[str, int], tuple] = {}  # shard -> the values that flipped it
            for values, group in by_values.items():
                shard_index, state, ok, failed, error, oom, batch_rows = values
                for chunk in _chunks(group):
                    for (job_id,) in conn.execute(_FLIP_ONLINE_SHARDS, {
                            "state": state, "now": now, "worker": worker, "ok": ok, "failed": failed, "error": error,
                            "oom": oom, "batch_rows": batch_rows, "shard_index": shard_index, "job_ids": chunk}):
                        flipped[(job_id, shard_index)] = values
            ours: dict[tuple[str, int], ShardOutcomeRecord] = {}
            for key, r in zip(keys, records, strict=True):
                # the same shard twice in one batch is recorded once, from the record
                # whose values flipped it
                if key in flipped and key not in ours and _online_values(r) == flipped[key]:
                    ours[key] = r
            _insert_rows(conn, list(ours.values()))
            per_job: dict[str, list[int]] = {}
            for r in ours.values():
                counts = per_job.setdefault(r.job_id, [0, 0, 0, 0])
                for i, n in enumerate((1, len(r.outputs), len(r.errors), r.oom_splits)):
                    counts[i] += n
            by_counts: dict[tuple[int, ...], list[str]] = defaultdict(list)
            for job_id, counts in per_job.items():
                by_counts[tuple(counts)].append(job_id)
            for (shards, ok, failed, oom), job_ids in by_counts.items():
                _bump_jobs(conn, job_ids, shards, ok, failed, oom, now, started=True)
        chosen = {id(r) for r in ours.values()}
        return [id(r) in chosen for r in records]

    def shards(self, job_id: str) -> list[dict]:
        """Every shard of a job as a dict of its columns, by shard index."""
        with self._read() as conn:
            rows = conn.execute(
                select(ShardRow.__table__).where(ShardRow.job_id == job_id).order_by(ShardRow.shard_index)
            ).mappings().all()
        return [dict(r) for r in rows]

    def heartbeat(self, info: WorkerInfo) -> None:
        """Record that worker process ``info.hostname`` is alive now, with its telemetry."""
        values = asdict(info)
        del values["hostname"]
        values["models"] = json.dumps(info.models)
        values["last_seen_at"] = _now()
        with self.engine.begin() as conn:
            if not conn.execute(update(WorkerRow).where(WorkerRow.hostname == info.hostname).values(**values)).rowcount:
                conn.execute(insert(WorkerRow).values(hostname=info.hostname, **values))

    def remove_worker(self, hostname: str) -> None:
        """Forget a worker process's heartbeat (on clean shutdown)."""
        with self.engine.begin() as conn:
            conn.execute(delete(WorkerRow).where(WorkerRow.hostname == hostname))


def _job_status(row) -> JobStatus:
    """A :class:`JobStatus` from a row of the ``jobs`` table."""
    return JobStatus(
        job_id=row.id, model=row.model, model_version=row.model_version, dataset=row.dataset,
        state=JobState(row.state), n_rows=row.n_rows, n_shards=row.n_shards,
        shards_done=row.shards_done, rows_ok=row.rows_ok, rows_failed=row.rows_failed,
        batch_size=row.batch_size, created_at=_aware(row.created_at),
        started_at=_aware(row.started_at), finished_at=_aware(row.finished_at),
        oom_splits=row.oom_splits, priority=row.priority, model_load_s=row.model_load_s, owner=row.owner,
    )


@dataclass
class ShardOutcomeRecord:
    """What :meth:`ResultStore.record_online` writes for one shard (see
    :meth:`ResultStore.complete_shard` for the fields)."""

    job_id: str
    shard_index: int
    outputs: pa.Table | Sequence[tuple[int, dict]]
    errors: list[RowError]
    shard_error: str | None = None
    oom_splits: int = 0
    batch_rows: int | None = None
    model_load_s: float | None = None


def _record(conn, r: ShardOutcomeRecord, now: datetime, owner: str | None = None) -> bool:
    """Flip a claimed shard to DONE / FAILED if still open (and, with ``owner``, still
    leased to it), then insert its rows and update its job, on ``conn`` (inside the
    caller's transaction). False if the shard was not open or not ``owner``'s."""
    state = ShardState.FAILED if r.shard_error else ShardState.DONE
    values = {"state": state.value, "finished_at": now, "rows_ok": len(r.outputs), "rows_failed": len(r.errors),
              "error": r.shard_error, "oom_splits": r.oom_splits, "batch_rows": r.batch_rows,
              "model_load_s": r.model_load_s, "lease_expires_at": None, "message": None}
    where = [ShardRow.job_id == r.job_id, ShardRow.shard_index == r.shard_index, ShardRow.state.in_(_OPEN_SHARD)]
    if owner is not None:
        where.append(ShardRow.lease_owner == owner)
    flipped = conn.execute(update(ShardRow).where(*where).values(**values)).rowcount
    if not flipped:
        return False
    _insert_rows(conn, [r])
    _bump_jobs(conn, [r.job_id], 1, len(r.outputs), len(r.errors), r.oom_splits, now)
    if r.model_load_s is not None:  # a cold start: the job keeps the longest
        conn.execute(update(JobRow).where(JobRow.id == r.job_id, or_(
            JobRow.model_load_s.is_(None), JobRow.model_load_s < r.model_load_s)).values(model_load_s=r.model_load_s))
    return True


def _record_failed(conn, job_id: str, shard_index: int, rows: range, reason: str, now: datetime,
                   owner: str | None = None) -> bool:
    """:func:`_record` a shard that failed as a whole: every row of ``rows`` gets ``reason``."""
    errors = [RowError(i, f"row {i}: {reason}") for i in rows]
    return _record(conn, ShardOutcomeRecord(job_id, shard_index, [], errors, shard_error=reason), now, owner=owner)


def _holder_alive(conn, owner: str, now: datetime) -> bool:
    """Whether the process ``owner`` (``hostname:pid``) has beaten within
    :data:`HOLDER_STALE_S` seconds (a restarted process under the same node name has
    another pid, so its predecessor counts as dead)."""
    hostname, _, pid = owner.rpartition(":")
    row = conn.execute(select(WorkerRow.pid, WorkerRow.last_seen_at).where(WorkerRow.hostname == hostname)).one_or_none()
    return (row is not None and str(row.pid) == pid
            and _aware(row.last_seen_at) >= now - timedelta(seconds=HOLDER_STALE_S))


def _insert_jobs(conn, jobs: Sequence[NewJob], now: datetime) -> None:
    """Insert ``jobs`` and their shards (two multi-row INSERTs)."""
    conn.execute(_INSERT_JOB, [{
        "id": j.job_id, "model": j.model, "model_version": j.model_version, "dataset": j.dataset,
        "n_rows": j.n_rows, "n_shards": len(j.shard_ranges), "batch_size": j.batch_size, "now": now,
        "priority": j.priority, "owner": j.owner, "idempotency_key": j.idempotency_key,
        "request_hash": j.request_hash,
    } for j in jobs])
    shards = [{"job_id": j.job_id, "shard_index": i, "row_start": a, "row_end": b}
              for j in jobs for i, (a, b) in enumerate(j.shard_ranges)]
    if shards:
        conn.execute(_INSERT_SHARD, shards)
    empty = [j for j in jobs if not j.shard_ranges]
    if empty:  # no rows: SUCCEEDED at once, results empty with the model's output columns
        conn.execute(_FINISH_EMPTY_JOBS, {"now": now, "job_ids": [j.job_id for j in empty]})
        blobs = [{"job_id": j.job_id, "shard_index": 0, "row_start": 0, "row_end": 0, "n_rows": 0,
                  "data": shard_outputs.encode(j.output_schema.empty_table())}
                 for j in empty if j.output_schema is not None]
        if blobs:
            conn.execute(_INSERT_OUTPUTS, blobs)


def _chunks(items: list) -> Iterator[list]:
    """``items`` in slices of :data:`_IN_CHUNK`, one ``IN (...)`` list each."""
    for lo in range(0, len(items), _IN_CHUNK):
        yield items[lo:lo + _IN_CHUNK]


def _online_values(r: ShardOutcomeRecord) -> tuple:
    """What :meth:`ResultStore.record_online` writes into the shard row of ``r``."""
    state = ShardState.FAILED if r.shard_error else ShardState.DONE
    return (r.shard_index, state.value, len(r.outputs), len(r.errors), r.shard_error, r.oom_splits, r.batch_rows)


def _insert_rows(conn, records: Sequence[ShardOutcomeRecord]) -> None:
    """Insert the outputs (one compressed Arrow blob per shard) and row errors of
    ``records`` (one multi-row INSERT each)."""
    blobs = []
    for r in records:
        table = shard_outputs.as_table(r.outputs)
        if table.num_rows:
            rows = table.column(shard_outputs.ROW)
            blobs.append({"job_id": r.job_id, "shard_index": r.shard_index, "row_start": pc.min(rows).as_py(),
                          "row_end": pc.max(rows).as_py() + 1, "n_rows": table.num_rows,
                          "data": shard_outputs.encode(table)})
    if blobs:
        conn.execute(_INSERT_OUTPUTS, blobs)
    errors = [{"job_id": r.job_id, "row_index": e.row_index, "shard_index": r.shard_index,
               "field": e.field, "message": e.message}
              for r in records for e in r.errors]
    if errors:
        conn.execute(_INSERT_ROW_ERROR, errors)


def _bump_jobs(conn, job_ids: list[str], shards: int, ok: int, failed: int, oom_splits: int, now: datetime,
               *, started: bool = False) -> None:
    """Add the same counts to each job of ``job_ids`` and, for each still open whose shards
    are then all recorded, set its final state (FAILED when no row succeeded, PARTIAL when
    some failed, else SUCCEEDED), in one UPDATE: SET expressions read the row as it was
    before the update (SQL standard; PostgreSQL and SQLite both), so the new counts are
    written out in full. ``started`` also stamps ``started_at`` if unset."""
    for chunk in _chunks(job_ids):
        conn.execute(_BUMP_JOBS, {"shards": shards, "ok": ok, "failed": failed, "oom": oom_splits, "now": now,
                                  "started": started, "job_ids": chunk})


def results_frame(outputs: pa.Table | Sequence[tuple[int, dict | str]] | None,
                  errors: Sequence[tuple[int, str | None, str]]) -> pd.DataFrame:
    """Recorded rows as a DataFrame (see :meth:`ResultStore.results`).

    Args:
        outputs: the output table (``row`` first, see :mod:`ml_framework.store.outputs`),
            or ``(row_index, output)`` pairs (a dict each), or ``None``.
        errors: ``(row_index, field, message)`` triples.

    Returns:
        Indexed by ``row``, sorted; one column per output key, plus ``error`` and
        ``error_field`` (object dtype, ``None`` on rows that succeeded). With no rows
        and an output table without rows, that table's columns and types.
    """
    table = None if outputs is None else shard_outputs.as_table(outputs)
    n_ok, n_failed = (0 if table is None else table.num_rows), len(errors)
    if table is not None and not n_ok and not n_failed:  # a job without rows: its output columns, typed
        frame = table.drop_columns([shard_outputs.ROW]).to_pandas()
        frame.index = pd.Index([], dtype="int64", name="row")
        return frame.assign(error=pd.Series(dtype=object), error_field=pd.Series(dtype=object))
    rows = [] if table is None else table.column(shard_outputs.ROW).to_pylist()
    columns: dict[str, list] = {k: v + [None] * n_failed for k, v in shard_outputs.to_columns(table).items()}
    index = pd.Index(rows + [r for r, _, _ in errors], dtype="int64", name="row")
    # object dtype, None where absent (pandas would infer a string dtype with NaN)
    columns["error"] = pd.Series([None] * n_ok + [m for _, _, m in errors], index=index, dtype=object)
    columns["error_field"] = pd.Series([None] * n_ok + [f for _, f, _ in errors], index=index, dtype=object)
    frame = pd.DataFrame(columns, index=index)
    if n_failed and table is not None:
        # integer outputs (class labels) stay integers on the rows that failed, as nulls
        for name in table.column_names:
            if name != shard_outputs.ROW and pa.types.is_integer(table.schema.field(name).type):
                frame[name] = frame[name].astype("Int64")
    return frame if index.is_monotonic_increasing else frame.sort_index()
