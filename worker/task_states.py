"""What Celery state a shard's task ends in, so that Flower (which sees only the workers'
task events) tells what happened to the shard:

- ``SUCCESS``: the shard was recorded, with some or no failed rows; the result names the
  outcome and the counts, e.g. ``{'outcome': 'PARTIAL', 'rows_ok': 498, 'rows_failed': 2}``.
- ``FAILURE``: every row of the shard failed (:class:`ShardFailed`, whose text is the reason).
- ``REVOKED``: the shard was skipped because its job was cancelled or deleted
  (:func:`revoke`).

None of them makes the broker deliver the message again: the task acknowledges late
(``task_acks_late``), and a failure is acknowledged too (``task_acks_on_failure``); a
revoked shard's message is acknowledged as Celery does for a revoked task. The shard is
recorded (or skipped) before the state is reported, so recording stays exactly-once.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery.exceptions import Ignore

from ml_framework.errors import ShardFailed
from ml_framework.store import ShardClaim


@dataclass(frozen=True)
class Recorded:
    """A shard this delivery scored and recorded.

    Attributes:
        rows_ok / rows_failed: rows with outputs / with a row error.
        error: why the shard failed as a whole (every row carries it), else ``None``.
        first_error: the first row error's text, if any.
    """

    rows_ok: int
    rows_failed: int
    error: str | None = None
    first_error: str | None = None


def finish(task, job_id: str, outcome: Recorded | ShardClaim | str) -> dict[str, object] | str:
    """The return value of a bulk shard's task, or the exception that ends it, for what
    happened to the shard.

    Returns:
        For a recorded shard with rows ok: ``{'outcome': 'DONE' | 'PARTIAL', 'rows_ok',
        'rows_failed'}``; for a redelivery of a recorded shard: ``'ALREADY_DONE'``.

    Raises:
        ShardFailed: every row of the shard failed, or it was given up (``GAVE_UP``).
        celery.exceptions.Ignore: after reporting REVOKED (the job was cancelled or deleted).
    """
    if isinstance(outcome, Recorded):
        if outcome.error is not None:
            raise ShardFailed(outcome.error)
        if outcome.rows_failed and not outcome.rows_ok:
            raise ShardFailed(f"every row failed ({outcome.rows_failed}); the first: {outcome.first_error}")
        return {"outcome": "PARTIAL" if outcome.rows_failed else "DONE", "rows_ok": outcome.rows_ok,
                "rows_failed": outcome.rows_failed}
    if outcome == ShardClaim.CANCELLED:
        raise revoke(task, f"job {job_id} was cancelled")
    if outcome == ShardClaim.UNKNOWN_JOB:
        raise revoke(task, f"job {job_id} does not exist (deleted)")
    if outcome == ShardClaim.GAVE_UP:
        raise ShardFailed("worker lost: the shard was started the most times allowed (max_shard_attempts) "
                          "and its worker process died each time")
    return str(getattr(outcome, "value", outcome))


def revoke(task, reason: str) -> Ignore:
    """Report the running task as REVOKED with ``reason`` (a ``task-revoked`` event, as
    Celery sends for a task revoked before it starts) and return the :class:`Ignore` to
    raise, which acknowledges the message and sends no other event.

    Args:
        task: the bound Celery task (its request names the task id and worker).
        reason: why the shard was skipped, e.g. ``job cancelled``.
    """
    request = task.request
    if getattr(request, "id", None) is not None and task.app.conf.worker_send_task_events:
        task.send_event("task-revoked", terminated=False, signum=None, expired=False, reason=reason)
    return Ignore(reason)
