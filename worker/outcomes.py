"""How a scored shard is accounted for: the metrics and heartbeat counters of recorded
rows, shards that failed as a whole, and the row errors such a shard records. Shared by
the bulk task (:mod:`worker.tasks`) and the online path (:mod:`worker.online`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from ml_framework.errors import MLFrameworkError
from ml_framework.protocol import ScoreShard
from ml_framework.store import RowError
from worker import metrics
from worker.process import WorkerContext

log = logging.getLogger(__name__)


def count_rows(ctx: WorkerContext, model: str, version: int, ok: int, failed: int, oom_splits: int = 0) -> None:
    """Add a recorded shard's rows to this process's heartbeat counters and metrics."""
    labels = metrics.model_labels(model, version)
    metrics.ROWS_SCORED.labels(**labels).inc(ok)
    metrics.ROW_ERRORS.labels(**labels).inc(failed)
    ctx.count_rows(ok, failed, oom_splits)


def shard_failed(model: str, version: int, exc: BaseException | str) -> None:
    """Count a shard that failed as a whole, by the error's class (``reason`` label)."""
    reason = exc if isinstance(exc, str) else type(exc).__name__
    metrics.SHARD_FAILURES.labels(model=model, version=str(version), reason=reason).inc()


def queue_wait(msg: ScoreShard) -> None:
    """Observe how long ``msg`` waited between the producer's send and now."""
    if msg.enqueued_at is not None:
        metrics.QUEUE_WAIT.labels(queue="online" if msg.online else "bulk").observe(
            max(0.0, time.time() - msg.enqueued_at))


def every_row_failed(msg: ScoreShard, reason: str) -> list[RowError]:
    """One row error with ``reason`` for each row of the shard."""
    return [RowError(r, f"row {r}: {reason}") for r in range(msg.source.row_start, msg.source.row_end)]


def shard_error_text(exc: Exception, msg: ScoreShard, roots: Sequence[Path] = ()) -> str:
    """What a shard that failed as a whole records: our errors as they are, others with
    their class (and the traceback in the log), with the worker's ``roots`` (the models
    and data directories) cut from the paths in it (:func:`hide_roots`): the reason is
    shown to the job's submitter, who must not learn the server's paths."""
    if isinstance(exc, MLFrameworkError):
        return hide_roots(str(exc), roots)
    log.error("job %s shard %d failed", msg.job_id, msg.shard_index, exc_info=exc)
    return hide_roots(f"{type(exc).__name__}: {exc}", roots)


def hide_roots(text: str, roots: Sequence[Path]) -> str:
    """``text`` with each of ``roots`` removed from the front of the paths under it, both
    as given and resolved, e.g. ``/srv/models/digits/2/model.onnx`` to
    ``digits/2/model.onnx``: what the user named, not where the server keeps it."""
    for root in roots:
        for form in {str(Path(root).absolute()), str(Path(root).resolve())}:
            text = text.replace(form.rstrip("/") + "/", "")
    return text
