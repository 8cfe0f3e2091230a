"""Online requests on the worker: dynamic batching and answer notification.

An online request is a one-shard job on the online queue. When a worker takes one, it
gathers the other online requests waiting on that queue (taken straight from the broker,
so Celery's prefetch of one message does not cap the batch) until the first request's
model says stop: ``dynamic_batching.max_batch_size`` rows, or
``dynamic_batching.max_queue_delay_ms`` after the first (Triton's dynamic batcher works
the same way). Requests are grouped by model version; each group's rows go through one
forward pass (split in halves only if it fails, to isolate bad rows); outputs are split
back per request and each request's results are written to the results store like any
shard's. The gathered messages are acknowledged once their results are stored: a worker
that dies holding them leaves them to be redelivered.

Finished requests are announced on the Redis channel ``mlf.done.<online_queue>`` (a JSON
list of job ids), which :class:`producer.client.Client` listens to, so a waiting caller
wakes at once instead of polling. Without Redis (embedded broker) callers poll.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from celery import Celery
from kombu import Queue
from kombu.message import Message
from pydantic import ValidationError

from ml_framework.constants import SCORE_ONLINE_TASK, SCORE_SHARD_TASK
from ml_framework.errors import MLFrameworkError
from ml_framework.logging import task_context
from ml_framework.protocol import (
    OnlineBatch,
    ScoreShard,
    done_channel,
)
from ml_framework.settings import get_settings
from ml_framework.store import ShardOutcomeRecord
from worker import metrics
from worker.outcomes import count_rows, every_row_failed, hide_roots, queue_wait, shard_failed
from worker.pipeline import read_all, shard_source
from worker.process import WorkerContext
from worker.runtimes.batching import BatchRun
from worker.scoring import assemble

log = logging.getLogger(__name__)

GATHER_POLL_S = 0.0005


@lru_cache(maxsize=1)
def _redis():
    import redis

    return redis.Redis.from_url(get_settings().broker_url)


def announce(job_ids: list[str]) -> None:
    """Publish finished online job ids (Redis brokers only; a lost announcement only
    makes the caller notice on its next poll)."""
    settings = get_settings()
    if not job_ids or not settings.broker_is_redis:
        return
    try:
        _redis().publish(done_channel(settings.online_queue), json.dumps(job_ids))
    except Exception as exc:  # noqa: BLE001 - callers fall back to polling
        log.warning("could not announce finished online requests: %s", exc)


@contextmanager
def gathered(app: Celery, rows: int, max_rows: int,
             max_delay_s: float) -> Iterator[list[tuple[list[ScoreShard], Message]]]:
    """Take waiting online requests from the broker until ``max_rows`` rows (counting the
    first request's ``rows``) or ``max_delay_s`` seconds.

    Yields:
        ``(requests, message)`` pairs (a ``mlf.score_online`` message carries several). Messages are acknowledged when the block exits
        normally; on an exception they are requeued, so another attempt comes soon.
        Malformed messages are acknowledged (dropped) with an error log.
    """
    settings = get_settings()
    taken: list[tuple[list[ScoreShard], Message]] = []
    with app.pool.acquire(block=True) as conn:  # pooled: no new broker connection per request
        queue = Queue(settings.online_queue, routing_key=settings.online_queue).bind(conn.default_channel)
        deadline = time.monotonic() + max_delay_s
        while rows < max_rows:
            message = queue.get(no_ack=False, accept=["json", "msgpack"])
            if message is None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(GATHER_POLL_S)
                continue
            requests = _parse(message)
            if not requests:
                message.ack()
                continue
            taken.append((requests, message))
            rows += sum(r.n_rows for r in requests)
        try:
            yield taken
        except BaseException:
            for _, message in taken:
                message.requeue()
            raise
        for _, message in taken:
            message.ack()


def _parse(message: Message) -> list[ScoreShard]:
    task = (message.headers or {}).get("task")
    try:
        _args, kwargs, _embed = message.decode()
        if task == SCORE_ONLINE_TASK:
            return OnlineBatch.model_validate(kwargs).requests
        if task == SCORE_SHARD_TASK:
            return [ScoreShard.model_validate(kwargs)]
        raise ValueError(f"task {task!r} on the online queue")
    except (ValueError, TypeError, ValidationError) as exc:
        log.error("dropping malformed online request %s: %s", message.delivery_tag, exc)
        return []


def score_online(ctx: WorkerContext, app: Celery, first: list[ScoreShard], hostname: str) -> str:
    """Score the requests of ``first`` (one message) together with the online requests
    waiting behind them.

    Returns:
        ``DONE``: every request's rows are recorded (or it was cancelled).
    """
    try:
        batching = ctx.registry.repository.resolve(first[0].model, first[0].version).dynamic_batching
        max_rows, delay_s = batching.max_batch_size, batching.max_queue_delay_ms / 1000
    except MLFrameworkError:
        max_rows, delay_s = 1, 0.0  # unknown model: fail this request alone, below
    with gathered(app, sum(r.n_rows for r in first), max_rows, delay_s) as others:
        groups: dict[tuple[str, int], list[ScoreShard]] = defaultdict(list)
        for request in [*first, *(r for requests, _ in others for r in requests)]:
            groups[(request.model, request.version)].append(request)
        done: list[str] = []
        for (model, version), requests in groups.items():
            with task_context(model=f"{model}/{version}", device=metrics.DEVICE):
                done += _score_group(ctx, requests, hostname)
        announce(done)
    return "DONE"


def _score_group(ctx: WorkerContext, requests: list[ScoreShard], hostname: str) -> list[str]:
    """One forward pass (in batches of the model's ``max_batch_size``) over the requests of one model
    version, then every request's rows recorded in one transaction. Returns the job ids
    recorded (a cancelled request is not)."""
    records: list[ShardOutcomeRecord] = []
    failures: dict[int, str] = {}  # id(record) -> the error's class, counted once recorded

    model, version = requests[0].model, requests[0].version
    for request in requests:
        queue_wait(request)

    def fail(request: ScoreShard, reason: str, exc: BaseException) -> None:
        records.append(ShardOutcomeRecord(request.job_id, request.shard_index, [],
                                          every_row_failed(request, reason), shard_error=reason))
        failures[id(records[-1])] = type(exc).__name__

    try:
        runtime = ctx.registry.get(model, version)
    except MLFrameworkError as exc:
        for request in requests:
            fail(request, f"shard failed: {hide_roots(str(exc), (ctx.settings.models_dir, ctx.settings.data_dir))}", exc)
        return _record(ctx, records, hostname, model, version, failures)
    parts = []
    for request in requests:
        try:
            table = read_all(shard_source(ctx.settings.data_dir, request, ctx.settings))
            piece = runtime.converter.convert(table, request.columns, request.source.row_start)
        except MLFrameworkError as exc:
            fail(request, f"shard failed: {hide_roots(str(exc), (ctx.settings.models_dir, ctx.settings.data_dir))}", exc)
            continue
        parts.append((request, piece))
    if parts:
        x_all = runtime.converter.concat([piece.x for _, piece in parts])
        # the forward passes' size: this model's limit, whichever model the gathering started with
        pass_rows = min(len(x_all), runtime.manifest.dynamic_batching.max_batch_size)
        # no row converted (every one is a row error): nothing to run
        run = runtime.run(x_all, pass_rows) if len(x_all) else BatchRun(0)
        offset = 0
        for i, (request, piece) in enumerate(parts):
            k = len(piece.x)
            table, errors = assemble(runtime, piece, run.part(offset, offset + k))
            offset += k
            oom = run.oom_splits if i == 0 else 0
            records.append(ShardOutcomeRecord(request.job_id, request.shard_index, table if table is not None else [],
                                              sorted(errors, key=lambda e: e.row_index), oom_splits=oom,
                                              batch_rows=pass_rows or None))
        log.info("online batch of %d request(s), %d rows, model %s/%d", len(parts), len(x_all),
                 runtime.manifest.name, runtime.manifest.version)
    return _record(ctx, records, hostname, model, version, failures)


def _record(ctx: WorkerContext, records: list[ShardOutcomeRecord], hostname: str, model: str, version: int,
            failures: dict[int, str]) -> list[str]:
    """Write ``records`` in one transaction, count them in the heartbeat and the metrics
    (``failures``: the error class of each record that failed as a whole), and return the
    job ids recorded (a cancelled request is not)."""
    recorded = ctx.store.record_online(records, hostname)
    done = [r for r, ok in zip(records, recorded, strict=True) if ok]
    for record in done:
        count_rows(ctx, model, version, len(record.outputs), len(record.errors), record.oom_splits)
        if id(record) in failures:
            shard_failed(model, version, failures[id(record)])
    return [r.job_id for r in done]
