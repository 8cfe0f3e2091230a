"""The shard ledger: claims, leases and idempotent completion of shards.

Every write that moves a shard is one transaction. Completing a shard is idempotent: the
shard row is flipped from PENDING/RUNNING to DONE/FAILED by a conditional UPDATE first, and
only the transaction that flipped it inserts rows, so a redelivered shard never
duplicates results (primary keys ``(job_id, shard_index)`` of ``shard_outputs`` and
``(job_id, row_index)`` of ``row_errors`` back this up). The job's counters and final
state move in the same transaction.

A claim may take a lease for the claiming process (``hostname:pid``): while it lasts and
the holder's heartbeat is fresh (:data:`HOLDER_STALE_S`), other deliveries of the shard are
told it is busy, and only the holder may record it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyarrow as pa
from sqlalchemy import Boolean, DateTime, Engine, bindparam, or_, select, text, update

from ml_framework.store import fleet
from ml_framework.store import outputs as shard_outputs
from ml_framework.store.callbacks import DUE_WHEN_FINISHED
from ml_framework.store.engine import chunks, read
from ml_framework.store.models import (
    OPEN_JOB,
    OPEN_SHARD,
    JobRow,
    JobState,
    ShardClaim,
    ShardRow,
    ShardState,
    as_utc,
    sql_in,
    utc_now,
)
from ml_framework.store.outputs import RowError

HOLDER_STALE_S = 20.0
"""A shard's holder whose heartbeat (every 5 s) is older than this is presumed dead, and
its lease void: four missed beats."""


@dataclass
class ShardOutcomeRecord:
    """What :func:`record_online` writes for one shard (see :func:`complete` for the fields)."""

    job_id: str
    shard_index: int
    outputs: pa.Table | Sequence[tuple[int, dict]]
    errors: list[RowError]
    shard_error: str | None = None
    oom_splits: int = 0
    batch_rows: int | None = None
    model_load_s: float | None = None
    outputs_in_file: bool = False
    """The outputs went to the job's output prefix as a part file
    (:mod:`~ml_framework.store.output_files`): only their count is recorded here."""


# Prebuilt statements of the hot paths (see ml_framework.store.jobs for why text); state
# literals come from the enums.
_TS = DateTime(timezone=True)
_OPEN_SHARD_SQL = sql_in(OPEN_SHARD)
_OPEN_JOB_SQL = sql_in(OPEN_JOB)
_SET_MESSAGE = text("UPDATE shards SET message = :message WHERE job_id = :job_id AND shard_index = :shard_index "
                    f"AND state IN {_OPEN_SHARD_SQL}")
_FLIP_ONLINE_SHARDS = text(
    "UPDATE shards SET state = :state, finished_at = :now, worker = :worker, rows_ok = :ok, rows_failed = :failed, "
    "error = :error, oom_splits = :oom, batch_rows = :batch_rows, started_at = COALESCE(started_at, :now), "
    "attempts = attempts + 1, deliveries = deliveries + 1 "
    f"WHERE shard_index = :shard_index AND job_id IN :job_ids AND state IN {_OPEN_SHARD_SQL} "
    "RETURNING job_id"
).bindparams(bindparam("now", type_=_TS), bindparam("job_ids", expanding=True))
_BUMP_JOBS = text(  # SET expressions read the row as it was before the update (SQL standard)
    "UPDATE jobs SET shards_done = shards_done + :shards, rows_ok = rows_ok + :ok, "
    "rows_failed = rows_failed + :failed, oom_splits = oom_splits + :oom, "
    f"state = CASE WHEN state NOT IN {_OPEN_JOB_SQL} OR shards_done + :shards < n_shards THEN state "
    f"WHEN rows_ok + :ok = 0 THEN '{JobState.FAILED.value}' WHEN rows_failed + :failed > 0 "
    f"THEN '{JobState.PARTIAL.value}' ELSE '{JobState.SUCCEEDED.value}' END, "
    f"finished_at = CASE WHEN state IN {_OPEN_JOB_SQL} AND shards_done + :shards >= n_shards THEN :now "
    "ELSE finished_at END, "
    f"callback_state = CASE WHEN state IN {_OPEN_JOB_SQL} AND shards_done + :shards >= n_shards "
    f"THEN {DUE_WHEN_FINISHED} ELSE callback_state END, "
    "started_at = CASE WHEN :started THEN COALESCE(started_at, :now) ELSE started_at END "
    "WHERE id IN :job_ids"
).bindparams(bindparam("now", type_=_TS), bindparam("started", type_=Boolean), bindparam("job_ids", expanding=True))


def set_messages(engine: Engine, job_id: str, messages: Sequence[tuple[int, str]]) -> None:
    """Keep the message (JSON text, ``{"queue", "kwargs", "broker"}``: the broker it was sent
    to, passwords masked) of each ``(shard_index, message)`` sent, so that a shard whose
    message the broker lost can be sent again
    (:func:`orphaned`); cleared when the shard is recorded."""
    if messages:
        with engine.begin() as conn:
            conn.execute(_SET_MESSAGE, [{"job_id": job_id, "shard_index": i, "message": m} for i, m in messages])


def orphaned(engine: Engine, min_age_s: float, limit: int = 1000) -> list[tuple[str, int, str, int]]:
    """Open bulk shards that no worker holds: PENDING, or RUNNING with an ended lease
    or a dead holder, of open jobs created more than ``min_age_s`` seconds ago, with a
    kept message. Call it only when the broker holds no message for the bulk queue
    (none waiting, none unacknowledged): then their messages were lost.

    Returns:
        Up to ``limit`` ``(job_id, shard_index, message, job priority)``.
    """
    now = utc_now()
    with read(engine) as conn:
        rows = conn.execute(
            select(ShardRow.job_id, ShardRow.shard_index, ShardRow.state, ShardRow.lease_owner,
                   ShardRow.lease_expires_at, JobRow.priority)
            .join(JobRow, JobRow.id == ShardRow.job_id)
            .where(JobRow.state.in_(OPEN_JOB), ShardRow.state.in_(OPEN_SHARD), ShardRow.message.is_not(None),
                   JobRow.created_at < now - timedelta(seconds=min_age_s))
            .order_by(JobRow.created_at, ShardRow.shard_index).limit(limit)
        ).all()
        db_time = fleet.db_now(conn)  # leases and heartbeats are stamped by the database's clock
        lost = [r for r in rows if r.state == ShardState.PENDING.value or r.lease_owner is None
                or r.lease_expires_at is None or as_utc(r.lease_expires_at) <= db_time
                or not fleet.process_alive(conn, r.lease_owner, HOLDER_STALE_S, db_time)]
        out = []
        for r in lost:
            message = conn.execute(select(ShardRow.message).where(
                ShardRow.job_id == r.job_id, ShardRow.shard_index == r.shard_index)).scalar_one()
            out.append((r.job_id, r.shard_index, message, r.priority))
    return out


def shards(engine: Engine, job_id: str) -> list[dict]:
    """Every shard of a job as a dict of its columns, by shard index."""
    with read(engine) as conn:
        rows = conn.execute(
            select(ShardRow.__table__).where(ShardRow.job_id == job_id).order_by(ShardRow.shard_index)
        ).mappings().all()
    return [dict(r) for r in rows]


def claim(engine: Engine, job_id: str, shard_index: int, worker: str, max_attempts: int | None = None, *,
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
            only the holder may record the shard (:func:`complete`).
        lease_s: the lease's length, seconds: the longest a shard may run (the hard
            time limit) plus a margin.
    """
    now = utc_now()
    with engine.begin() as conn:
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
        db_time = fleet.db_now(conn)  # leases and heartbeats are stamped by the database's clock
        held = (shard is not None and shard.state == ShardState.RUNNING.value and shard.lease_owner
                and shard.lease_owner != owner and shard.lease_expires_at is not None
                and as_utc(shard.lease_expires_at) > db_time
                and fleet.process_alive(conn, shard.lease_owner, HOLDER_STALE_S, db_time))
        if job_state == JobState.CANCELLED.value:
            if not held:  # a shard its live holder still runs keeps its rows when recorded
                conn.execute(
                    update(ShardRow)
                    .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                           ShardRow.state.in_(OPEN_SHARD))
                    .values(state=ShardState.CANCELLED.value, message=None)
                )
            return ShardClaim.CANCELLED
        if shard is None or shard.state not in OPEN_SHARD:
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
                   ShardRow.state.in_(OPEN_SHARD))
            .values(state=ShardState.RUNNING.value, attempts=ShardRow.attempts + 1,
                    worker=worker, started_at=now, lease_owner=owner,
                    lease_expires_at=None if lease_s is None else db_time + timedelta(seconds=lease_s))
        ).rowcount
        if not claimed:
            return ShardClaim.ALREADY_DONE
        conn.execute(
            update(JobRow).where(JobRow.id == job_id, JobRow.state == JobState.PENDING.value)
            .values(state=JobState.RUNNING.value, started_at=now)
        )
    return ShardClaim.RUN


def release_leases(engine: Engine, owner: str) -> int:
    """End every lease ``owner`` (``hostname:pid``) holds, so that the next delivery of
    its shards runs them at once: called by the launcher when a worker process dies.

    Returns:
        The number of running shards released.
    """
    with engine.begin() as conn:
        return conn.execute(
            update(ShardRow)
            .where(ShardRow.lease_owner == owner, ShardRow.state == ShardState.RUNNING.value)
            .values(lease_expires_at=fleet.db_now(conn))
        ).rowcount


def release_lease(engine: Engine, job_id: str, shard_index: int, owner: str) -> bool:
    """End ``owner``'s lease on one shard it could not record (the results store failed
    under it; the task is retried), and uncount that start: the worker did not die.

    Returns:
        True if ``owner`` held the running shard.
    """
    with engine.begin() as conn:
        return bool(conn.execute(
            update(ShardRow)
            .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                   ShardRow.lease_owner == owner, ShardRow.state == ShardState.RUNNING.value)
            .values(lease_expires_at=fleet.db_now(conn), attempts=ShardRow.attempts - 1)
        ).rowcount)


def fail_running(engine: Engine, job_id: str, shard_index: int, owner: str, reason: str) -> bool:
    """Record a shard that ``owner`` was running as FAILED, every row with ``reason``:
    the launcher's answer to a shard that ran past the hard time limit.

    Returns:
        True if recorded; False if the shard was no longer open or held by ``owner``.
    """
    with engine.begin() as conn:
        shard = conn.execute(
            select(ShardRow.row_start, ShardRow.row_end)
            .where(ShardRow.job_id == job_id, ShardRow.shard_index == shard_index,
                   ShardRow.state == ShardState.RUNNING.value, ShardRow.lease_owner == owner)
        ).one_or_none()
        if shard is None:
            return False
        return _record_failed(conn, job_id, shard_index, range(shard.row_start, shard.row_end), reason, utc_now(),
                              owner=owner)


def complete(engine: Engine, record: ShardOutcomeRecord, *, owner: str | None = None) -> bool:
    """Record a shard's outputs and row errors in one transaction.

    Args:
        record: the shard and what became of its rows:
            ``outputs``: the output table (``row`` first, then one column per output key;
            see :mod:`ml_framework.store.outputs`), or ``(row_index, output)`` pairs, each
            output a JSON-serialisable dict. Stored as one compressed blob.
            ``errors``: one :class:`RowError` per row without output.
            ``shard_error``: set when the shard as a whole failed (then ``outputs`` is
            empty and every row has an error); the shard ends FAILED instead of DONE.
            ``oom_splits``: batches of this shard split after an out-of-memory error;
            added to the job's count.
            ``batch_rows``: rows of the gathered forward pass that scored this shard
            (online requests batched together); ``None`` for bulk shards.
            ``model_load_s``: seconds the worker spent loading the model for this shard
            (a cold start); the job keeps the longest.
        owner: the ``hostname:pid`` that claimed the shard: the rows are written only
            while the shard's lease is still this owner's (another process that took
            the shard over after the lease ended records it instead).

    Returns:
        True if this call recorded the shard; False if it was already recorded (a
        redelivery) or its lease passed to another process, and nothing was written.
    """
    with engine.begin() as conn:
        return _record(conn, record, utc_now(), owner=owner)


def record_online(engine: Engine, records: Sequence[ShardOutcomeRecord], worker: str) -> list[bool]:
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
    now = utc_now()
    keys = [(r.job_id, r.shard_index) for r in records]
    by_values: dict[tuple, list[str]] = defaultdict(list)
    for r in records:  # a batch of single-row requests that all succeeded is one group
        by_values[_online_values(r)].append(r.job_id)
    with engine.begin() as conn:
        flipped: dict[tuple[str, int], tuple] = {}  # shard -> the values that flipped it
        for values, group in by_values.items():
            shard_index, state, ok, failed, error, oom, batch_rows = values
            for chunk in chunks(group):
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
        for (n_shards, ok, failed, oom), job_ids in by_counts.items():
            _bump_jobs(conn, job_ids, n_shards, ok, failed, oom, now, started=True)
    chosen = {id(r) for r in ours.values()}
    return [id(r) in chosen for r in records]


def _record(conn, r: ShardOutcomeRecord, now: datetime, owner: str | None = None) -> bool:
    """Flip a claimed shard to DONE / FAILED if still open (and, with ``owner``, still
    leased to it), then insert its rows and update its job, on ``conn`` (inside the
    caller's transaction). False if the shard was not open or not ``owner``'s."""
    state = ShardState.FAILED if r.shard_error else ShardState.DONE
    values = {"state": state.value, "finished_at": now, "rows_ok": len(r.outputs), "rows_failed": len(r.errors),
              "error": r.shard_error, "oom_splits": r.oom_splits, "batch_rows": r.batch_rows,
              "model_load_s": r.model_load_s, "lease_expires_at": None, "message": None}
    where = [ShardRow.job_id == r.job_id, ShardRow.shard_index == r.shard_index, ShardRow.state.in_(OPEN_SHARD)]
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


def _online_values(r: ShardOutcomeRecord) -> tuple:
    """What :func:`record_online` writes into the shard row of ``r``."""
    state = ShardState.FAILED if r.shard_error else ShardState.DONE
    return (r.shard_index, state.value, len(r.outputs), len(r.errors), r.shard_error, r.oom_splits, r.batch_rows)


def _insert_rows(conn, records: Sequence[ShardOutcomeRecord]) -> None:
    """Insert the outputs and row errors of ``records`` (see
    :func:`ml_framework.store.outputs.insert`)."""
    shard_outputs.insert(conn, [(r.job_id, r.shard_index, _stored(r), r.errors) for r in records])


def _stored(r: ShardOutcomeRecord) -> pa.Table:
    """The output table of ``r`` the database keeps: none (no rows) when it is in a file."""
    table = shard_outputs.as_table(r.outputs)
    return table.slice(0, 0) if r.outputs_in_file else table


def _bump_jobs(conn, job_ids: list[str], n_shards: int, ok: int, failed: int, oom_splits: int, now: datetime,
               *, started: bool = False) -> None:
    """Add the same counts to each job of ``job_ids`` and, for each still open whose shards
    are then all recorded, set its final state (FAILED when no row succeeded, PARTIAL when
    some failed, else SUCCEEDED), in one UPDATE: SET expressions read the row as it was
    before the update (SQL standard; PostgreSQL and SQLite both), so the new counts are
    written out in full. ``started`` also stamps ``started_at`` if unset."""
    for chunk in chunks(job_ids):
        conn.execute(_BUMP_JOBS, {"shards": n_shards, "ok": ok, "failed": failed, "oom": oom_splits, "now": now,
                                  "started": started, "job_ids": chunk})
