"""Celery task bodies of the worker: validate the message, claim the shard, score it
(:mod:`worker.scoring`, fed by :mod:`worker.pipeline`), record the outcome.

Task bodies stay thin: what they share lives in the process's
:class:`~worker.process.WorkerContext`.
"""

from __future__ import annotations

import logging
import os
import time

from celery import Celery
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from ml_framework.constants import SCORE_ONLINE_TASK, SCORE_SHARD_TASK
from ml_framework.errors import ObjectStoreError, ShardFailed, StoreUnavailableError
from ml_framework.logging import task_context
from ml_framework.protocol import OnlineBatch, ScoreShard
from ml_framework.store import RowError, ShardClaim
from ml_framework.store.outputs import ROW, outputs_table
from worker import metrics, watchdog
from worker.online import score_online
from worker.outcomes import count_rows, every_row_failed, queue_wait, shard_error_text, shard_failed
from worker.pipeline import shard_source
from worker.process import WorkerContext, context
from worker.scoring import ShardOutcome, score_pieces
from worker.task_states import Recorded, finish

log = logging.getLogger(__name__)

STORE_RETRY_BACKOFF_MAX_S = 60
LEASE_MARGIN_S = 30
"""A shard's lease lasts ``task_time_limit_s`` plus this: the launcher kills a task at the
limit, so a live holder never outlasts its lease."""
BUSY_RECHECK_S = 20
"""A delivery of a shard that another live process runs is sent back to the queue, to look
again after this many seconds (the holder's heartbeat goes stale in as long)."""
# Connection-level failures (server down, SQLite locked): worth retrying. Data errors
# (a value the column refuses) are not: the shard is recorded as failed instead.
TRANSIENT_STORE_ERRORS = (OperationalError, InterfaceError, StoreUnavailableError)


def score_shard(task, /, **body: object) -> dict[str, object] | str:
    """Score one shard and record its outputs and row errors in one transaction.

    The task's Celery state tells what happened (see :mod:`worker.task_states`): SUCCESS
    for a recorded shard, FAILURE when every row failed, REVOKED when the job was
    cancelled or deleted.

    Returns:
        ``{'outcome': 'DONE' | 'PARTIAL', 'rows_ok': int, 'rows_failed': int}`` for a
        recorded shard; ``ALREADY_DONE`` (redelivery of a recorded shard), ``DONE`` (an
        online request) or ``REJECTED`` (malformed message) otherwise.

    Raises:
        ShardFailed: every row of the shard failed (the text is the reason), or the shard
            was given up (a poison shard, see ``max_shard_attempts``).
        celery.exceptions.Ignore: the job was cancelled or deleted (reported REVOKED).
        celery.exceptions.Retry: the shard is running in another live process (the
            broker redelivered it): the message goes back to the queue for
            :data:`BUSY_RECHECK_S` seconds.
    """
    try:
        msg = ScoreShard.model_validate(body)
    except ValidationError as exc:
        log.error("rejecting malformed %s message: %s", SCORE_SHARD_TASK, exc)
        return "REJECTED"
    ctx = context(task.app)
    hostname = task.request.hostname or ctx.hostname
    if msg.online:
        return _score_online(ctx, task.app, [msg], hostname)
    with task_context(job_id=msg.job_id, shard=msg.shard_index, model=f"{msg.model}/{msg.version}",
                      device=metrics.DEVICE):
        outcome = run_bulk_shard(ctx, msg, hostname)
    if outcome is ShardClaim.BUSY:
        raise task.retry(countdown=BUSY_RECHECK_S)
    return finish(task, msg.job_id, outcome)


def _score_online(ctx: WorkerContext, app: Celery, requests: list[ScoreShard], hostname: str) -> str:
    watchdog.begin(f"{hostname}:{os.getpid()}")
    try:
        return score_online(ctx, app, requests, hostname)
    finally:
        watchdog.end()


def run_bulk_shard(ctx: WorkerContext, msg: ScoreShard, hostname: str) -> Recorded | ShardClaim:
    """Claim a bulk shard, score it and record it (see :func:`score_shard`): what was
    recorded, or why nothing was."""
    settings = ctx.settings
    owner = f"{hostname}:{os.getpid()}"
    claim = ctx.store.claim_shard(msg.job_id, msg.shard_index, hostname, settings.max_shard_attempts,
                                  owner=owner, lease_s=settings.task_time_limit_s + LEASE_MARGIN_S)
    if claim is ShardClaim.GAVE_UP:
        log.error("job %s shard %d: started %d times and its worker died each time; failed as 'worker lost'",
                  msg.job_id, msg.shard_index, settings.max_shard_attempts)
        shard_failed(msg.model, msg.version, "WorkerLost")
        return claim
    if claim is ShardClaim.BUSY:
        log.warning("job %s shard %d: redelivered while another live worker process runs it; "
                    "checking again in %d s", msg.job_id, msg.shard_index, BUSY_RECHECK_S)
        return claim
    if claim is not ShardClaim.RUN:
        log.info("job %s shard %d: %s, skipped", msg.job_id, msg.shard_index, claim.value)
        return claim
    watchdog.begin(owner, msg.job_id, msg.shard_index)
    try:
        return _run_claimed_shard(ctx, msg, owner)
    except BaseException:
        # Not recorded (the store failed under it; the task is retried): give the lease
        # up, or every other process would find the shard busy until the lease ends.
        ctx.abandoned.add((msg.job_id, msg.shard_index, owner))
        ctx.release_abandoned_leases()
        raise
    finally:
        watchdog.end()


def score_message(ctx: WorkerContext, msg: ScoreShard) -> ShardOutcome:
    """Load the model, read and convert the shard's rows ahead of the device, and score
    them (the next shard's first piece is read once this one's are).

    Raises:
        MLFrameworkError: the model or the rows cannot be read (the shard fails as a whole).
    """
    runtime, load_s = ctx.registry.fetch(msg.model, msg.version)
    source = shard_source(ctx.settings.data_dir, msg, ctx.settings)
    converter = runtime.converter
    pieces = ctx.prefetcher.pieces(
        source, lambda table, row_start: converter.convert(table, msg.columns, row_start),
        converter.piece_rows(msg.batch_size), guess=ctx.guess_next(msg, source))
    outcome = score_pieces(runtime, pieces, msg.batch_size)
    outcome.model_load_s = load_s
    missing = missing_rows(msg, outcome)
    if missing:  # the file ended early: these rows fail, none is left without an outcome
        outcome.errors = sorted(outcome.errors + [RowError(r, f"row {r}: the dataset ended before this row (it "
                                                              "holds fewer rows than when the job was submitted)")
                                                  for r in missing], key=lambda e: e.row_index)
    return outcome


def missing_rows(msg: ScoreShard, outcome: ShardOutcome) -> list[int]:
    """Rows of ``msg``'s range that have neither an output nor an error in ``outcome``
    (a dataset shorter than its job's plan); ascending."""
    expected = msg.source.row_end - msg.source.row_start
    if len(outcome.outputs) + len(outcome.errors) >= expected:
        return []
    done = set(outcome.outputs.column(ROW).to_pylist()) | {e.row_index for e in outcome.errors}
    return [r for r in range(msg.source.row_start, msg.source.row_end) if r not in done]


def _run_claimed_shard(ctx: WorkerContext, msg: ScoreShard, owner: str) -> Recorded | ShardClaim:
    queue_wait(msg)
    started = time.perf_counter()
    shard_error = None
    failure: BaseException | str | None = None
    try:
        outcome = score_message(ctx, msg)
    except Exception as exc:  # noqa: BLE001 - the shard fails as a whole, the worker goes on
        failure = exc
        shard_error = shard_error_text(exc, msg, (ctx.settings.models_dir, ctx.settings.data_dir))
        outcome = ShardOutcome(outputs_table([]), every_row_failed(msg, f"shard failed: {shard_error}"))
    store = ctx.store
    outputs, errors = outcome.outputs, outcome.errors
    try:
        recorded = store.complete_shard(msg.job_id, msg.shard_index, outputs, errors, shard_error=shard_error,
                                        oom_splits=outcome.oom_splits, owner=owner,
                                        model_load_s=outcome.model_load_s)
    except TRANSIENT_STORE_ERRORS:
        raise  # the store is unreachable: retried with backoff (see register)
    except Exception as exc:
        # the job's output prefix refused the part file (ObjectStoreError, naming it), or the database the rows
        what = "could not write the shard's results" if isinstance(exc, ObjectStoreError) \
            else "results store refused the shard's rows"
        log.exception("job %s shard %d: %s", msg.job_id, msg.shard_index, what)
        shard_error = f"{what}: {type(exc).__name__}: {exc}"[:2000]
        failure = "StoreRefused"
        outputs, errors = outputs_table([]), every_row_failed(msg, shard_error)
        recorded = store.complete_shard(msg.job_id, msg.shard_index, outputs, errors, shard_error=shard_error,
                                        owner=owner)
    if not recorded:
        claim, why = not_recorded_because(store, msg.job_id)
        log.info("job %s shard %d: %s; nothing written", msg.job_id, msg.shard_index, why)
        return claim
    count_rows(ctx, msg.model, msg.version, len(outputs), len(errors), outcome.oom_splits)
    if failure is not None:
        shard_failed(msg.model, msg.version, failure)
    elapsed = time.perf_counter() - started
    log.info("job %s shard %d model %s/%d: %d rows ok, %d failed%s in %.2f s (%.0f rows/s)",
             msg.job_id, msg.shard_index, msg.model, msg.version, len(outputs), len(errors),
             f", {outcome.oom_splits} out-of-memory split(s)" if outcome.oom_splits else "", elapsed,
             (len(outputs) + len(errors)) / max(elapsed, 1e-9))
    return Recorded(len(outputs), len(errors), shard_error, errors[0].message if errors else None)


def score_online_batch(task, /, **body: object) -> str:
    """Score the online requests of one ``mlf.score_online`` message, with the others
    waiting on the online queue, as one dynamic batch (see :mod:`worker.online`).

    Returns:
        ``DONE``, or ``REJECTED`` (malformed message).
    """
    try:
        batch = OnlineBatch.model_validate(body)
    except ValidationError as exc:
        log.error("rejecting malformed %s message: %s", SCORE_ONLINE_TASK, exc)
        return "REJECTED"
    ctx = context(task.app)
    return _score_online(ctx, task.app, batch.requests, task.request.hostname or ctx.hostname)


def register(app: Celery) -> None:
    """Register the worker's tasks on ``app``.

    Store outages (connection errors) are retried with exponential backoff capped at 60 s,
    for as long as the outage lasts: giving up would drop the message and leave its shard
    PENDING for ever. The message stays unacknowledged until its retry is published.
    """
    for name, body in ((SCORE_SHARD_TASK, score_shard), (SCORE_ONLINE_TASK, score_online_batch)):
        app.task(
            name=name, bind=True, autoretry_for=TRANSIENT_STORE_ERRORS, throws=(ShardFailed,),
            retry_backoff=True, retry_backoff_max=STORE_RETRY_BACKOFF_MAX_S, max_retries=None,
        )(body)


def not_recorded_because(store, job_id: str) -> tuple[ShardClaim, str]:
    """Why ``complete_shard`` wrote nothing for a shard of ``job_id``, as the claim it
    amounts to and a sentence for the log: the job was deleted (``UNKNOWN_JOB``) or
    cancelled (``CANCELLED``) while the shard ran, or (otherwise, ``ALREADY_DONE``) another
    delivery recorded the shard or took over its lease."""
    from ml_framework.errors import JobNotFoundError
    from ml_framework.store import JobState

    try:
        state = store.job(job_id).state
    except JobNotFoundError:
        return ShardClaim.UNKNOWN_JOB, "the job was deleted while the shard ran"
    except Exception:  # noqa: BLE001 - only a log line depends on it
        state = None
    if state is JobState.CANCELLED:
        return ShardClaim.CANCELLED, "the job was cancelled while the shard ran"
    return ShardClaim.ALREADY_DONE, "already recorded by another delivery, or its lease passed to another process"
