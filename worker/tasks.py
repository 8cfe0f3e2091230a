"""Celery task bodies of the worker: score one shard of a bulk job."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from functools import lru_cache

import pyarrow as pa
from celery import Celery
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from ml_framework.datasets import decode_table, read_rows
from ml_framework.errors import DatasetError, MLFrameworkError, StoreUnavailableError
from ml_framework.protocol import SCORE_SHARD_TASK, DatasetRef, ScoreShard
from ml_framework.settings import get_settings
from ml_framework.store import ResultStore, RowError, ShardClaim
from worker.conversion import to_inputs
from worker.registry import ModelRegistry
from worker.runtimes import Runtime
from worker.runtimes.base import to_record

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0
STORE_RETRY_BACKOFF_MAX_S = 60
# Connection-level failures (server down, SQLite locked): worth retrying. Data errors
# (a value the column refuses) are not: the shard is recorded as failed instead.
TRANSIENT_STORE_ERRORS = (OperationalError, InterfaceError, StoreUnavailableError)


@lru_cache(maxsize=1)
def get_store() -> ResultStore:
    """This process's results-store handle."""
    return ResultStore(get_settings().effective_database_url)


@lru_cache(maxsize=1)
def get_registry() -> ModelRegistry:
    """This process's model cache."""
    settings = get_settings()
    return ModelRegistry(settings.models_dir, settings.worker_threads)


class Heartbeat:
    """Writes this process's heartbeat to the results store every few seconds."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.started_at = datetime.now(UTC)
        self.shards_done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlf-heartbeat", daemon=True)

    def start(self) -> None:
        """Begin beating in a daemon thread."""
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                get_store().heartbeat(self.hostname, os.getpid(), self.started_at, self.shards_done)
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the worker
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(HEARTBEAT_INTERVAL_S)

    def stop(self) -> None:
        """Stop beating and remove the heartbeat row."""
        self._stop.set()
        try:
            get_store().remove_worker(self.hostname)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove heartbeat: %s", exc)


heartbeat: Heartbeat | None = None


def _load_table(msg: ScoreShard) -> pa.Table:
    src = msg.source
    if isinstance(src, DatasetRef):
        root = get_settings().data_dir.resolve()
        path = (root / src.path).resolve()
        if not path.is_relative_to(root):
            raise DatasetError(f"dataset path {src.path!r} leaves the data directory {root}")
        if not path.is_file():
            raise DatasetError(f"dataset {path} not found on worker (data_dir={root})")
        return read_rows(path, src.format, src.row_start, src.row_end, msg.columns)
    table = decode_table(src.data_b64)
    if table.num_rows != src.row_end - src.row_start:
        raise DatasetError(f"inline shard holds {table.num_rows} rows, expected {src.row_end - src.row_start}")
    return table


def score_table(
    runtime: Runtime, table: pa.Table, columns: list[str], row_start: int, batch_size: int
) -> tuple[list[tuple[int, dict]], list[RowError]]:
    """Score every row of ``table``; bad rows become row errors, the rest outputs.

    Returns:
        ``(outputs, errors)``: ``(row_index, record)`` pairs and :class:`RowError` s,
        together covering each row of ``table`` exactly once.
    """
    manifest = runtime.manifest
    x, rows, errors = to_inputs(table, columns, manifest.inputs, manifest.preprocessing, row_start)
    raw, failures = runtime.run(x, batch_size)
    outputs: list[tuple[int, dict]] = []
    for row, y, failure in zip(rows.tolist(), raw, failures, strict=True):
        if failure is None:
            try:
                outputs.append((row, to_record(y, manifest.outputs)))
                continue
            except Exception as exc:  # noqa: BLE001 - contract violation on this row
                failure = str(exc)
        errors.append(RowError(row, f"row {row}: {failure}"))
    errors.sort(key=lambda e: e.row_index)
    return outputs, errors


def _every_row_failed(msg: ScoreShard, reason: str) -> list[RowError]:
    """One row error with ``reason`` for each row of the shard."""
    return [RowError(r, f"row {r}: {reason}") for r in range(msg.source.row_start, msg.source.row_end)]


def score_shard(task, **body: object) -> str:
    """Score one shard and record its outputs and row errors in one transaction.

    Returns:
        What happened: ``DONE``, ``FAILED`` (whole shard failed, every row has the
        error), ``ALREADY_DONE`` (redelivery), ``CANCELLED``, ``UNKNOWN_JOB`` or ``REJECTED``
        (malformed message).
    """
    try:
        msg = ScoreShard.model_validate(body)
    except ValidationError as exc:
        log.error("rejecting malformed %s message: %s", SCORE_SHARD_TASK, exc)
        return "REJECTED"
    store = get_store()
    hostname = task.request.hostname or "worker"
    claim = store.claim_shard(msg.job_id, msg.shard_index, hostname)
    if claim is not ShardClaim.RUN:
        log.info("job %s shard %d: %s, skipped", msg.job_id, msg.shard_index, claim.value)
        return claim.value
    started = time.perf_counter()
    shard_error = None
    try:
        runtime = get_registry().get(msg.model, msg.version)
        table = _load_table(msg)
        outputs, errors = score_table(runtime, table, msg.columns, msg.source.row_start, msg.batch_size)
    except Exception as exc:
        if isinstance(exc, MLFrameworkError):
            shard_error = str(exc)
        else:
            log.exception("job %s shard %d failed", msg.job_id, msg.shard_index)
            shard_error = f"{type(exc).__name__}: {exc}"
        outputs, errors = [], _every_row_failed(msg, f"shard failed: {shard_error}")
    try:
        recorded = store.complete_shard(msg.job_id, msg.shard_index, outputs, errors, shard_error=shard_error)
    except TRANSIENT_STORE_ERRORS:
        raise  # the store is unreachable: retried with backoff (see register)
    except Exception as exc:
        log.exception("job %s shard %d: the results store refused the shard's rows", msg.job_id, msg.shard_index)
        shard_error = f"results store refused the shard's rows: {type(exc).__name__}: {exc}"[:2000]
        outputs, errors = [], _every_row_failed(msg, shard_error)
        recorded = store.complete_shard(msg.job_id, msg.shard_index, outputs, errors, shard_error=shard_error)
    if not recorded:
        log.info("job %s shard %d: already recorded by another delivery; nothing written",
                 msg.job_id, msg.shard_index)
        return ShardClaim.ALREADY_DONE.value
    if heartbeat is not None:
        heartbeat.shards_done += 1
    elapsed = time.perf_counter() - started
    log.info("job %s shard %d model %s/%d: %d rows ok, %d failed in %.2f s (%.0f rows/s)",
             msg.job_id, msg.shard_index, msg.model, msg.version, len(outputs), len(errors), elapsed,
             (len(outputs) + len(errors)) / max(elapsed, 1e-9))
    return "FAILED" if shard_error else "DONE"


def register(app: Celery) -> None:
    """Register the worker's tasks on ``app``.

    Store outages (connection errors) are retried with exponential backoff capped at 60 s,
    for as long as the outage lasts: giving up would drop the message and leave its shard
    PENDING for ever. The message stays unacknowledged until its retry is published.
    """
    app.task(
        name=SCORE_SHARD_TASK, bind=True, autoretry_for=TRANSIENT_STORE_ERRORS,
        retry_backoff=True, retry_backoff_max=STORE_RETRY_BACKOFF_MAX_S, max_retries=None,
    )(score_shard)
