"""Batching, the batch contract and out-of-memory handling, shared by every runtime.

A batch that raises is split in halves and retried down to single rows, so only the rows
that really fail get an error (as Ray Serve and pytriton isolate a failing request). When
the error is out-of-memory, the framework's cache is emptied first, the split is counted,
and the batch size that then fits is remembered for this model on this device: the next
batches start there and grow back gradually (x1.25 after every
:data:`GROW_AFTER_BATCHES` batches that fit), since an out-of-memory error may be
transient (another process's allocations, fragmentation). At the end of such an episode
the cache is emptied again, so the memory the halves used goes back to the device and to
the other processes on it.

A batch whose outputs have the wrong count or width for the output spec fails as a whole,
unsplit: the model is at fault, not a row (as Ray Serve's and pytriton's batching fail a
batch that breaks the batch contract).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ml_framework.errors import BatchContractError
from worker import metrics

if TYPE_CHECKING:
    from worker.runtimes.base import Runtime

log = logging.getLogger(__name__)

GROW_AFTER_BATCHES = 8
"""Batches that must fit at the remembered size before it grows by :data:`GROW_FACTOR`."""
GROW_FACTOR = 1.25
T = TypeVar("T")


@dataclass
class BatchRun:
    """What a runtime produced for ``N`` input rows.

    Attributes:
        n: rows.
        outputs: ``(N, ...)`` raw outputs (``None`` until a batch succeeded); the rows of
            failed batches hold zeros.
        ok: ``(N,)`` bool, the rows whose batch succeeded.
        errors: row index -> why that row failed.
        batches: forward passes that succeeded.
        oom_splits: batches split in halves because the device (or host) ran out of memory.
        contract_error: set when a batch broke the output spec in a way no split can fix
            (values per row): the message, naming the model and the counts.
    """

    n: int
    outputs: np.ndarray | None = None
    ok: np.ndarray = field(default=None)  # type: ignore[assignment]
    errors: dict[int, str] = field(default_factory=dict)
    batches: int = 0
    oom_splits: int = 0
    contract_error: str | None = None

    def __post_init__(self) -> None:
        if self.ok is None:
            self.ok = np.zeros(self.n, dtype=bool)

    def put(self, a: int, b: int, y: np.ndarray) -> str | None:
        """Store the outputs of rows ``[a, b)``; returns why they cannot be stored (a
        trailing shape other than the earlier batches'), or ``None``."""
        if self.outputs is None:
            self.outputs = np.zeros((self.n, *y.shape[1:]), dtype=y.dtype if y.dtype.kind in "fiub" else np.float64)
        elif self.outputs.shape[1:] != y.shape[1:]:
            return f"returned outputs of shape {y.shape[1:]} per row, an earlier batch {self.outputs.shape[1:]}"
        self.outputs[a:b] = y
        self.ok[a:b] = True
        return None

    def part(self, a: int, b: int) -> BatchRun:
        """Rows ``[a, b)`` as a run of their own (the requests of a gathered batch)."""
        return BatchRun(b - a, None if self.outputs is None else self.outputs[a:b], self.ok[a:b],
                        {i - a: e for i, e in self.errors.items() if a <= i < b}, self.batches, 0, self.contract_error)

    def fail(self, a: int, b: int, reason: str) -> None:
        """Record rows ``[a, b)`` as failed with ``reason``."""
        for i in range(a, b):
            self.errors[i] = reason


def first_line(exc: BaseException) -> str:
    """The most telling line of an exception's message (TorchScript wraps the original
    error in a traceback whose last line is the error itself)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[-1] if len(lines) > 1 and "Traceback" in str(exc) else lines[0]


@dataclass
class _Input:
    x: Any
    run: BatchRun
    entry: Any
    done: bool = False


@dataclass
class _Span:
    item: _Input
    a: int
    b: int
    handle: Any = None
    started: float = 0.0

    def finished(self) -> None:
        """Mark the input done when this is its last batch."""
        if self.b == len(self.item.x):
            self.item.done = True


class Batcher:
    """Runs a runtime's inputs in batches (see the module docstring).

    Args:
        runtime: the runtime whose ``submit`` / ``collect`` / ``predict_batch`` it calls.

    Attributes:
        limit: rows per pass that fit after an out-of-memory error, or ``None``.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limit: int | None = None
        self._fits = 0  # batches in a row that ran at the limit
        self._asked = 0  # the batch size of the current stream

    def stream(self, inputs: Iterable[T], batch_size: int,
               x_of: Callable[[T], Any] | None = None) -> Iterator[tuple[T, BatchRun]]:
        """Run each input of ``inputs`` in batches of at most ``batch_size`` rows, one
        batch queued behind the one being collected (see :meth:`Runtime.submit`).

        Args:
            x_of: the model input of an item of ``inputs`` (default: the item itself).

        Yields:
            ``(item, run)`` per item, in order, when its last batch is collected.
        """
        inflight: _Span | None = None
        waiting: deque[_Input] = deque()
        self._asked = batch_size
        for entry in inputs:
            x = entry if x_of is None else x_of(entry)
            item = _Input(x, BatchRun(len(x)), entry)
            waiting.append(item)
            a, n = 0, len(x)
            item.done = n == 0
            while a < n:
                b = min(a + self._rows(batch_size), n)
                span = self._submit(item, a, b)
                if inflight is not None:
                    self._complete(inflight)
                inflight = span if span.handle is not None else None
                while waiting and waiting[0].done:
                    done = waiting.popleft()
                    yield done.entry, done.run
                a = b
            while waiting and waiting[0].done:  # an empty input behind finished ones
                done = waiting.popleft()
                yield done.entry, done.run
        if inflight is not None:
            self._complete(inflight)
        for done in waiting:
            yield done.entry, done.run

    def _rows(self, batch_size: int) -> int:
        return batch_size if self.limit is None else min(batch_size, self.limit)

    def _submit(self, item: _Input, a: int, b: int) -> _Span:
        span = _Span(item, a, b, started=time.perf_counter())
        failure = None
        try:
            span.handle = self.runtime.submit(item.x[a:b])
        except Exception as exc:  # noqa: BLE001 - any model failure is isolated per row
            failure = self._failure(exc)
        # Retry only after leaving the except block: until then the exception's traceback
        # keeps the failed forward pass's frames, and so its activations, alive.
        if failure is not None:
            self._recover(item.x, item.run, a, b, failure, top=True)
            span.finished()
        return span

    def _complete(self, span: _Span) -> None:
        item, handle = span.item, span.handle
        span.handle = None
        failure = y = None
        try:
            y = self._checked(self.runtime.collect(handle), span.b - span.a)
        except Exception as exc:  # noqa: BLE001
            failure = self._failure(exc)
        del handle
        if failure is not None:  # outside the except block, as in _submit
            self._recover(item.x, item.run, span.a, span.b, failure, top=True)
        else:
            self._accept(item.run, span.a, span.b, y, span.started)
        span.finished()

    def _checked(self, y: Any, rows: int) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != rows:
            raise BatchContractError(
                f"model {self.runtime.label} returned {y.shape[0] if y.ndim else 'a scalar'} outputs for {rows} inputs")
        return y

    def _failure(self, exc: BaseException) -> tuple[str, bool]:
        return f"{type(exc).__name__}: {first_line(exc)}", self.runtime.is_out_of_memory(exc)

    def _accept(self, run: BatchRun, a: int, b: int, y: np.ndarray, started: float) -> None:
        problem = self._width_problem(y)
        if problem is None:
            mismatch = run.put(a, b, y)
            problem = f"model {self.runtime.label} {mismatch}" if mismatch else None
        if problem is not None:
            # The model, not the rows, breaks the spec: halving cannot help.
            if run.contract_error is None:
                log.error("%s; every row of the batch fails", problem)
            run.contract_error = problem
            run.fail(a, b, problem)
            return
        manifest = self.runtime.manifest
        labels = metrics.model_labels(manifest.name, manifest.version)
        metrics.BATCHES.labels(**labels).inc()
        metrics.BATCH_SIZE.labels(**labels).observe(b - a)
        metrics.BATCH_LATENCY.labels(**labels).observe(time.perf_counter() - started)
        run.batches += 1
        if self.limit is not None and b - a >= self.limit:
            self._fits += 1
            if self._fits >= GROW_AFTER_BATCHES:
                self._fits = 0
                self.limit = math.ceil(self.limit * GROW_FACTOR)
                log.info("model %s: %d batches fit; growing the batch size back to %d rows",
                         self.runtime.label, GROW_AFTER_BATCHES, min(self.limit, self._asked))
                if self.limit >= self._asked:
                    self.limit = None  # back to the size asked for

    def _width_problem(self, y: np.ndarray) -> str | None:
        """Why ``(n, ...)`` outputs ``y`` do not have the values per row the output spec
        declares, or ``None`` when they do (or the spec declares no width)."""
        spec = self.runtime.manifest.outputs
        width, got = spec.width, int(np.prod(y.shape[1:], dtype=np.int64))
        if width is None or got == width:
            return None
        field_ = "outputs.labels" if spec.kind == "classification" else "outputs.size"
        return (f"model {self.runtime.label} returned {got} values per row for a batch of {len(y)} rows, "
                f"its manifest's {field_} expects {width}")

    def _recover(self, x: Any, run: BatchRun, a: int, b: int, failure: tuple[str, bool], top: bool) -> None:
        """Rows ``[a, b)`` failed with ``failure``: split them in halves and run each
        synchronously, down to single rows; remember the size that fits after an
        out-of-memory error, and give the cache back at the end of the episode."""
        message, oom = failure
        splits_before = run.oom_splits
        if oom:
            self.runtime.release_memory()
        if b - a == 1:
            reason = "out of memory even for a single row" if oom else "model failed on this row"
            run.errors[a] = f"{reason}: {message}"
            return
        if oom:
            run.oom_splits += 1
            self._fits = 0
            self.limit = max(1, min(self.limit or b - a, (b - a) // 2))
            manifest = self.runtime.manifest
            metrics.OOM_SPLITS.labels(**metrics.model_labels(manifest.name, manifest.version)).inc()
            log.warning("batch of %d rows ran out of memory (%s); cache emptied, retrying in halves; "
                        "next batches start at %d rows", b - a, message, self.limit)
        elif top:  # one line per failing batch, not per split
            log.warning("batch of %d rows failed (%s); retrying in halves to isolate the bad rows", b - a, message)
        mid = (a + b) // 2
        for lo, hi in ((a, mid), (mid, b)):
            self._run_now(x, run, lo, hi)
        if top and run.oom_splits > splits_before:
            self.runtime.release_memory()  # the episode is over: give the halves' cache back

    def _run_now(self, x: Any, run: BatchRun, a: int, b: int) -> None:
        started = time.perf_counter()
        failure = y = None
        try:
            y = self._checked(self.runtime.predict_batch(x[a:b]), b - a)
        except Exception as exc:  # noqa: BLE001
            failure = self._failure(exc)
        if failure is not None:  # outside the except block, as in _submit
            self._recover(x, run, a, b, failure, top=False)
            return
        self._accept(run, a, b, y, started)
