"""Completion callbacks in the results store: which are due, who delivers each, and what
became of it (columns ``jobs.callback_*``, migration 0015).

A job recorded with a ``callback_url`` has ``callback_state`` ``NULL`` until it ends; the
statement that ends it (the last shard recorded, a cancellation, a job without rows) sets
it to ``pending`` in the same transaction (:data:`DUE_WHEN_FINISHED`), with
``callback_next_at`` ``NULL``: due at once, whatever the clock of the host that ended it.

API processes claim due callbacks with one conditional UPDATE (:func:`claim`): it moves
``callback_next_at`` a lease ahead, by the database server's clock
(:func:`~ml_framework.store.fleet.db_now`, as worker liveness does), and counts the attempt;
a row another process claimed first no longer matches its condition, so of several API
replicas exactly one posts each attempt. The claimer then records the outcome
(:func:`delivered`, :func:`failed_attempt`), conditional on the attempt still being its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, case, or_, select, update

from ml_framework.store import fleet
from ml_framework.store.models import CallbackState, JobRow, as_utc

_PENDING = CallbackState.PENDING.value
DUE_WHEN_FINISHED = f"CASE WHEN callback_url IS NOT NULL THEN '{_PENDING}' ELSE callback_state END"
"""The SQL value of ``callback_state`` for a job the statement ends: ``pending`` when it has
a callback (used by the statements that set ``finished_at``)."""


def _due(table, now: datetime):
    """Callbacks of ``table`` (the jobs table or an alias) due at ``now``."""
    return and_(table.c.callback_state == _PENDING,
                or_(table.c.callback_next_at.is_(None), table.c.callback_next_at <= now))


def due_when_finished():
    """:data:`DUE_WHEN_FINISHED` as an ORM expression, for ``update(JobRow).values(...)``."""
    return case((JobRow.callback_url.is_not(None), _PENDING), else_=JobRow.callback_state)


@dataclass(frozen=True)
class DueCallback:
    """A callback claimed for one attempt (see :func:`claim`).

    Attributes:
        attempt: this attempt's number, 1 for the first.
        owner: the API key name that submitted the job (``None``: no key).
        state: the job's final state.
        finished_at: when the job ended (UTC).
    """

    job_id: str
    url: str
    attempt: int
    owner: str | None
    state: str
    rows_ok: int
    rows_failed: int
    n_rows: int
    finished_at: datetime | None


def claim(engine: Engine, lease_s: float, limit: int) -> list[DueCallback]:
    """Claim up to ``limit`` due callbacks (oldest job end first) for one attempt each: one
    UPDATE that moves their ``callback_next_at`` ``lease_s`` seconds ahead (database
    clock) and counts the attempt. A callback claimed by another process, and not yet
    given back by it (its lease not passed), is not claimed.

    Returns:
        The claimed callbacks; only their claimer posts them.
    """
    jobs, candidates = JobRow.__table__, JobRow.__table__.alias("due")
    with engine.begin() as conn:
        now = fleet.db_now(conn)
        # the condition again on the row itself: a row another process claimed since the
        # subquery read it (PostgreSQL re-reads a row it waited for) no longer matches
        first = select(candidates.c.id).where(_due(candidates, now)).order_by(candidates.c.finished_at).limit(limit)
        rows = conn.execute(
            update(jobs).where(jobs.c.id.in_(first), _due(jobs, now))
            .values(callback_next_at=now + timedelta(seconds=lease_s), callback_attempts=jobs.c.callback_attempts + 1)
            .returning(jobs.c.id, jobs.c.callback_url, jobs.c.callback_attempts, jobs.c.owner, jobs.c.state,
                       jobs.c.rows_ok, jobs.c.rows_failed, jobs.c.n_rows, jobs.c.finished_at)
        ).all()
    return [DueCallback(r.id, r.callback_url, r.callback_attempts, r.owner, r.state, r.rows_ok, r.rows_failed,
                        r.n_rows, as_utc(r.finished_at)) for r in rows]


def _ours(job_id: str, attempt: int):
    return (JobRow.id == job_id, JobRow.callback_state == _PENDING, JobRow.callback_attempts == attempt)


def delivered(engine: Engine, job_id: str, attempt: int) -> bool:
    """Record that attempt ``attempt`` of job ``job_id``'s callback was answered 2xx.

    Returns:
        False when the attempt was no longer the claimer's (its lease passed and another
        process claimed the callback again), and nothing was written.
    """
    with engine.begin() as conn:
        return bool(conn.execute(update(JobRow).where(*_ours(job_id, attempt)).values(
            callback_state=CallbackState.DELIVERED.value, callback_next_at=None)).rowcount)


def failed_attempt(engine: Engine, job_id: str, attempt: int, retry_in_s: float | None) -> CallbackState | None:
    """Record that attempt ``attempt`` of job ``job_id``'s callback failed.

    Args:
        retry_in_s: seconds (database clock) before the next attempt is due; ``None``: no
            further attempt (retries exhausted, or the callback can no longer be sent).

    Returns:
        The callback's state now (``pending`` or ``failed``); ``None`` when the attempt was
        no longer the claimer's and nothing was written.
    """
    with engine.begin() as conn:
        if retry_in_s is None:
            values = {"callback_state": CallbackState.FAILED.value, "callback_next_at": None}
        else:
            values = {"callback_next_at": fleet.db_now(conn) + timedelta(seconds=retry_in_s)}
        done = conn.execute(update(JobRow).where(*_ours(job_id, attempt)).values(**values)).rowcount
    if not done:
        return None
    return CallbackState.FAILED if retry_in_s is None else CallbackState.PENDING
