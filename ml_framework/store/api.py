"""The results-store API: the only code that writes jobs, shards, results and row errors.

Every write that moves a shard is one transaction. Completing a shard is idempotent: the
shard row is flipped from PENDING/RUNNING to DONE/FAILED by a conditional UPDATE first, and
only the transaction that flipped it inserts rows, so a redelivered shard never
duplicates results (primary keys ``(job_id, row_index)`` back this up).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import Engine, case, delete, func, insert, select, update
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from ml_framework.errors import JobNotFoundError, StoreError, StoreUnavailableError
from ml_framework.store.engine import READ_ONLY, make_engine, upgrade
from ml_framework.store.schema import (
    JobRow,
    JobState,
    ResultRow,
    RowErrorRow,
    ShardRow,
    ShardState,
    WorkerRow,
)

_OPEN_SHARD = (ShardState.PENDING.value, ShardState.RUNNING.value)
_OPEN_JOB = (JobState.PENDING.value, JobState.RUNNING.value)


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(ts: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every timestamp we store is UTC.
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


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


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job's progress.

    Attributes:
        rows_ok / rows_failed: rows recorded so far with an output / with a row error.
        shards_done: shards whose rows are all recorded (DONE or FAILED).
        oom_splits: batches that ran out of memory and were retried in halves.
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


class ShardClaim(str, enum.Enum):
    """What a worker should do with a shard message it received."""

    RUN = "RUN"
    ALREADY_DONE = "ALREADY_DONE"
    CANCELLED = "CANCELLED"
    UNKNOWN_JOB = "UNKNOWN_JOB"


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
    ) -> str:
        """Record a PENDING job and its PENDING shards; return the new job id (32 hex chars)."""
        job_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(insert(JobRow), [{
                "id": job_id, "model": model, "model_version": model_version, "dataset": dataset,
                "state": JobState.PENDING.value, "n_rows": n_rows, "n_shards": len(shard_ranges),
                "shards_done": 0, "rows_ok": 0, "rows_failed": 0, "batch_size": batch_size,
                "created_at": _now(),
            }])
            if shard_ranges:
                conn.execute(insert(ShardRow), [
                    {"job_id": job_id, "shard_index": i, "row_start": a, "row_end": b,
                     "state": ShardState.PENDING.value, "attempts": 0, "deliveries": 0, "rows_ok": 0, "rows_failed": 0}
                    for i, (a, b) in enumerate(shard_ranges)
                ])
        return job_id

    def job(self, job_id: str) -> JobStatus:
        """Current status of ``job_id``.

        Raises:
            JobNotFoundError: no such job.
        """
        with self._read() as conn:
            row = conn.execute(select(JobRow.__table__).where(JobRow.id == job_id)).one_or_none()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r} in results store {self.engine.url!r}")
        return JobStatus(
            job_id=row.id, model=row.model, model_version=row.model_version, dataset=row.dataset,
            state=JobState(row.state), n_rows=row.n_rows, n_shards=row.n_shards,
            shards_done=row.shards_done, rows_ok=row.rows_ok, rows_failed=row.rows_failed,
            batch_size=row.batch_size, created_at=_aware(row.created_at),
            started_at=_aware(row.started_at), finished_at=_aware(row.finished_at),
            oom_splits=row.oom_splits,
        )

    def resolve_job_id(self, id_or_prefix: str) -> str:
        """The full id of the one job whose id is, or starts with, ``id_or_prefix`` (>= 4 chars).

        Raises:
            JobNotFoundError: no job matches, the prefix is too short, or several match.
        """
        prefix = id_or_prefix.strip().lower()
        if len(prefix) < 4 or not all(c in "0123456789abcdef" for c in prefix):
            raise JobNotFoundError(f"no job {id_or_prefix!r}: give the job id (32 hex characters) or at least 4 of its first")
        with self._read() as conn:
            ids = conn.execute(select(JobRow.id).where(JobRow.id.startswith(prefix)).limit(5)).scalars().all()
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
        with self.engine.begin() as conn:
            done = conn.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state.in_(_OPEN_JOB))
                .values(state=JobState.CANCELLED.value, finished_at=_now())
            ).rowcount
            if done:
                conn.execute(
                    update(ShardRow)
                    .where(ShardRow.job_id == job_id, ShardRow.state == ShardState.PENDING.value)
                    .values(state=ShardState.CANCELLED.value)
                )
        return self.job(job_id)

    def results(self, job_id: str) -> pd.DataFrame:
        """Outputs and row errors of a job, in input row order.

        Returns:
            DataFrame indexed by ``row`` (0-based input row), one column per output key
            (e.g. ``prediction``, ``score``, ``probabilities``), plus ``error`` and
            ``error_field`` (``None`` on rows that succeeded). Rows not yet recorded are absent.

        Raises:
            JobNotFoundError: no such job.
        """
        outs, errs = self._recorded_rows(job_id)
        ok = pd.DataFrame.from_records(
            [json.loads(o) for _, o in outs], index=pd.Index([r for r, _ in outs], name="row")
        )
        failed = pd.DataFrame(
            {"error": [m for _, _, m in errs], "error_field": [f for _, f, _ in errs]},
            index=pd.Index([r for r, _, _ in errs], name="row"),
        )
        frame = pd.concat([ok, failed], axis=0, sort=False) if len(failed) else ok
        for col in ("error", "error_field"):
            if col not in frame.columns:
                frame[col] = None
            frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
        return frame.sort_index()

    def _recorded_rows(self, job_id: str, lo: int = 0, hi: int | None = None) -> tuple[list, list]:
        """``(row_index, output_json)`` and ``(row_index, field, message)`` rows of a job
        among input rows ``[lo, hi)`` (all when ``hi`` is ``None``). Raises ``JobNotFoundError``."""
        self.job(job_id)
        outs = select(ResultRow.row_index, ResultRow.output).where(ResultRow.job_id == job_id,
                                                                   ResultRow.row_index >= lo)
        errs = select(RowErrorRow.row_index, RowErrorRow.field, RowErrorRow.message).where(
            RowErrorRow.job_id == job_id, RowErrorRow.row_index >= lo)
        if hi is not None:
            outs, errs = outs.where(ResultRow.row_index < hi), errs.where(RowErrorRow.row_index < hi)
        with self._read() as conn:
            return conn.execute(outs).all(), conn.execute(errs).all()

    def results_page(self, job_id: str, offset: int, limit: int) -> list[dict]:
        """The recorded rows of a job among input rows ``[offset, offset + limit)``.

        Returns:
            One dict per recorded row, in row order: ``row``, the output keys (e.g.
            ``prediction``, ``score``, ``probabilities``) for rows that succeeded, or
            ``error`` and ``error_field`` for rows that failed. Rows not yet recorded are
            absent. Reads by primary key: a page costs the same at any offset.

        Raises:
            JobNotFoundError: no such job.
        """
        outs, errs = self._recorded_rows(job_id, offset, offset + limit)
        rows = [{"row": r, **json.loads(o)} for r, o in outs]
        rows += [{"row": r, "error": m, "error_field": f} for r, f, m in errs]
        return sorted(rows, key=lambda d: d["row"])

    def job_counts(self) -> dict[str, int]:
        """Number of jobs in each :class:`JobState` (every state present, zeros included)."""
        with self._read() as conn:
            rows = conn.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        counts = {state.value: 0 for state in JobState}
        counts.update({state: n for state, n in rows})
        return counts

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
    def claim_shard(self, job_id: str, shard_index: int, worker: str) -> ShardClaim:
        """Mark a shard RUNNING (counting the attempt) unless it is finished or cancelled.

        Every call counts one delivery of the shard's message, whatever the outcome.
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
            if job_state == JobState.CANCELLED.value:
                conn.execute(
                    update(ShardRow)
                    .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                           ShardRow.state.in_(_OPEN_SHARD))
                    .values(state=ShardState.CANCELLED.value)
                )
                return ShardClaim.CANCELLED
            claimed = conn.execute(
                update(ShardRow)
                .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                       ShardRow.state.in_(_OPEN_SHARD))
                .values(state=ShardState.RUNNING.value, attempts=ShardRow.attempts + 1,
                        worker=worker, started_at=now)
            ).rowcount
            if not claimed:
                return ShardClaim.ALREADY_DONE
            conn.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == JobState.PENDING.value)
                .values(state=JobState.RUNNING.value, started_at=now)
            )
        return ShardClaim.RUN

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
    ) -> bool:
        """Record a shard's outputs and row errors in one transaction.

        Args:
            outputs: ``(row_index, output)`` pairs; each output a JSON-serialisable dict.
            errors: one :class:`RowError` per row without output.
            shard_error: set when the shard as a whole failed (then ``outputs`` is empty
                and every row has an error); the shard ends FAILED instead of DONE.
            oom_splits: batches of this shard split after an out-of-memory error; added
                to the job's count.
            batch_rows: rows of the gathered forward pass that scored this shard (online
                requests batched together); ``None`` for bulk shards.

        Returns:
            True if this call recorded the shard; False if it was already recorded (a
            redelivery) and nothing was written.
        """
        with self.engine.begin() as conn:
            return _record(conn, ShardOutcomeRecord(job_id, shard_index, list(outputs), list(errors), shard_error,
                                                    oom_splits, batch_rows), _now())

    def record_online(self, records: Sequence[ShardOutcomeRecord], worker: str) -> list[bool]:
        """Record several online requests' shards in one transaction, without a separate
        claim: each shard goes from PENDING (or RUNNING) straight to DONE / FAILED, and is
        stamped with ``worker`` and a start time. A dynamic batch of N requests costs one
        transaction instead of 2N.

        Returns:
            Per record, True if this call recorded it (False: already recorded, or the
            job was cancelled).
        """
        now = _now()
        with self.engine.begin() as conn:
            return [_record(conn, r, now, worker) for r in records]

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


@dataclass
class ShardOutcomeRecord:
    """What :meth:`ResultStore.record_online` writes for one shard (see
    :meth:`ResultStore.complete_shard` for the fields)."""

    job_id: str
    shard_index: int
    outputs: list[tuple[int, dict]]
    errors: list[RowError]
    shard_error: str | None = None
    oom_splits: int = 0
    batch_rows: int | None = None


def _record(conn, r: ShardOutcomeRecord, now: datetime, worker: str | None = None) -> bool:
    """Flip the shard to DONE / FAILED if still open, then insert its rows and update its
    job, on ``conn`` (inside the caller's transaction). False if the shard was not open."""
    state = ShardState.FAILED if r.shard_error else ShardState.DONE
    values = {"state": state.value, "finished_at": now, "rows_ok": len(r.outputs), "rows_failed": len(r.errors),
              "error": r.shard_error, "oom_splits": r.oom_splits, "batch_rows": r.batch_rows}
    if worker is not None:  # recorded without a claim: stamp what the claim would have
        values.update(worker=worker, started_at=func.coalesce(ShardRow.started_at, now),
                      attempts=ShardRow.attempts + 1, deliveries=ShardRow.deliveries + 1)
    flipped = conn.execute(
        update(ShardRow)
        .where(ShardRow.job_id == r.job_id, ShardRow.shard_index == r.shard_index, ShardRow.state.in_(_OPEN_SHARD))
        .values(**values)
    ).rowcount
    if not flipped:
        return False
    if r.outputs:
        conn.execute(insert(ResultRow), [
            {"job_id": r.job_id, "row_index": i, "shard_index": r.shard_index,
             "output": json.dumps(o, separators=(",", ":"))}
            for i, o in r.outputs
        ])
    if r.errors:
        conn.execute(insert(RowErrorRow), [
            {"job_id": r.job_id, "row_index": e.row_index, "shard_index": r.shard_index,
             "field": e.field, "message": e.message}
            for e in r.errors
        ])
    job_values = {"shards_done": JobRow.shards_done + 1, "rows_ok": JobRow.rows_ok + len(r.outputs),
                  "rows_failed": JobRow.rows_failed + len(r.errors), "oom_splits": JobRow.oom_splits + r.oom_splits}
    if worker is not None:
        job_values["started_at"] = func.coalesce(JobRow.started_at, now)
    conn.execute(update(JobRow).where(JobRow.id == r.job_id).values(**job_values))
    conn.execute(
        update(JobRow)
        .where(JobRow.id == r.job_id, JobRow.state.in_(_OPEN_JOB), JobRow.shards_done >= JobRow.n_shards)
        .values(
            state=case(
                (JobRow.rows_ok == 0, JobState.FAILED.value),
                (JobRow.rows_failed > 0, JobState.PARTIAL.value),
                else_=JobState.SUCCEEDED.value,
            ),
            finished_at=now,
        )
    )
    return True
