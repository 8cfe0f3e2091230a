"""Prefetching: read and convert the next piece of a shard while the device runs this one.

A worker process has one :class:`Prefetcher`, with one background thread. For each shard
it reads the rows piece by piece (:func:`ml_framework.datasets.iter_pieces`: Parquet row
groups decoded ahead on the reading threads), converts each piece to model input
(:mod:`worker.inputs`), and hands the pieces over through a bounded queue, so that while
the main thread runs the model on piece k, piece k+1 is being read and converted (as Ray
Data's streaming executor overlaps reading, preprocessing and the GPU stage). pyarrow,
NumPy, Pillow and the tokenizers release the GIL while they work, so the two threads run
at once.

When the thread has handed over the last piece of a shard, it reads and converts the first
piece of the shard most likely to come next (the caller's guess: the next row range of the
same file), so the device does not wait for it at the shard boundary either. A later shard
that is not the guess simply reads its own first piece; the guess costs one piece of I/O.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ml_framework.datasets import Source, decode_table, iter_pieces, object_source, read_rows
from ml_framework.datasets.source import fingerprint, require
from ml_framework.errors import DatasetError
from ml_framework.objectstore import is_object_uri
from ml_framework.paths import resolve_under
from ml_framework.protocol import DatasetRef, ScoreShard
from ml_framework.settings import Settings, get_settings
from worker.inputs import Converted
from worker.inputs.base import take_rows

log = logging.getLogger(__name__)

DEPTH = 2
"""Converted pieces waiting for the device (memory: about ``DEPTH + 1`` pieces of
:data:`worker.inputs.base.PIECE_BYTES`)."""
_END = object()

Convert = Callable[[pa.Table, int], Converted]
"""``(piece table, dataset row of its first row) -> Converted``."""


@dataclass(frozen=True)
class ShardSource:
    """Where a shard's rows are.

    Attributes:
        row_start / row_end: the rows, ``[row_start, row_end)``.
        columns: the columns that feed the model.
        path / format: a dataset file under the data directory, or an object (a
            :class:`~ml_framework.datasets.Source`), read by reference; or
        table: the rows themselves (inline in the message); exactly one of the two.
        key: what identifies the conversion (model name and version): a prefetched piece
            is used only by a shard of the same key.
    """

    row_start: int
    row_end: int
    columns: tuple[str, ...]
    path: Path | Source | None = None
    format: str | None = None
    table: pa.Table | None = None
    key: str = ""

    def same_rows_as(self, other: ShardSource) -> bool:
        """True when ``other`` reads the same file, columns and conversion from the same row."""
        return (self.table is None and other.table is None and (self.path, self.format, self.columns, self.key,
                self.row_start) == (other.path, other.format, other.columns, other.key, other.row_start))


def shard_source(data_dir: Path, msg: ScoreShard, settings: Settings | None = None) -> ShardSource:
    """Where ``msg``'s rows are: a file under ``data_dir`` or an object (by reference), or
    the message itself (inline rows, decoded here).

    Args:
        settings: the worker's settings, whose ``s3_*`` reach object storage (default:
            the process's).

    Raises:
        DatasetPathError: the path leaves the data directory (checked before reading,
            :func:`ml_framework.paths.resolve_under`).
        DatasetError: the file or object is missing, or an inline shard holds the wrong
            number of rows.
        ObjectStoreError: the object store refuses the worker or cannot be reached.
    """
    src, key = msg.source, f"{msg.model}/{msg.version}"
    if isinstance(src, DatasetRef) and is_object_uri(src.path):
        source = object_source(src.path, settings or get_settings())
        info = require(source)  # gone since submit: say so, naming the URI
        if info.type == pafs.FileType.File:  # its version is known now: readers' caches ask no HEAD again
            source = replace(source, stamp=(info.size, info.mtime_ns))
        check_unchanged(source, src)
        return ShardSource(src.row_start, src.row_end, tuple(msg.columns), source, src.format, key=key)
    if isinstance(src, DatasetRef):
        path = resolve_under(data_dir, src.path)
        if not (path.is_file() or path.is_dir()):
            raise DatasetError(f"dataset {src.path!r} not found in the worker's data directory")
        check_unchanged(Source.of_path(path), src)
        return ShardSource(src.row_start, src.row_end, tuple(msg.columns), path, src.format, key=key)
    table = decode_table(src.data_b64)
    if table.num_rows != msg.n_rows:
        raise DatasetError(f"inline shard holds {table.num_rows} rows, expected {msg.n_rows}")
    return ShardSource(src.row_start, src.row_end, tuple(msg.columns), table=table, key=key)


def check_unchanged(source: Source, ref: DatasetRef) -> None:
    """Refuse a shard whose dataset changed since its job was planned (replaced, rewritten,
    truncated: another size or modification time): its row range would name other rows, or
    none, and they would be recorded as the job's.

    Raises:
        DatasetError: naming the dataset as the job names it.
    """
    if ref.fingerprint is not None and fingerprint(source) != ref.fingerprint:
        raise DatasetError(f"dataset {ref.path!r} changed since the job was submitted (its size or modification "
                           "time differ): its rows are no longer the job's; submit the job again")


def read_all(source: ShardSource) -> pa.Table:
    """Every row of ``source`` as one table (online requests, tests)."""
    if source.table is not None:
        return source.table
    return read_rows(source.path, source.format, source.row_start, source.row_end, source.columns)


def _pieces(source: ShardSource, row_start: int, piece_rows: int) -> Iterator[pa.Table]:
    if source.table is not None:
        for a in range(row_start - source.row_start, source.row_end - source.row_start, piece_rows):
            yield source.table.slice(a, piece_rows)
        return
    yield from iter_pieces(source.path, source.format, row_start, source.row_end, source.columns, piece_rows)


def head(piece: Converted, n_rows: int, row_start: int) -> Converted:
    """The first ``n_rows`` rows of a converted piece that starts at ``row_start``."""
    if n_rows >= piece.n_rows:
        return piece
    end = row_start + n_rows
    keep = piece.rows < end
    x = piece.x[: int(keep.sum())] if keep[: int(keep.sum())].all() else take_rows(piece.x, np.flatnonzero(keep))
    return Converted(x, piece.rows[keep], [e for e in piece.errors if e.row_index < end], n_rows)


@dataclass
class _Request:
    source: ShardSource
    start: int
    convert: Convert
    piece_rows: int
    out: queue.Queue
    cancelled: threading.Event
    guess: ShardSource | None


class Prefetcher:
    """One background thread that reads and converts shards' pieces ahead of the device.

    Args:
        depth: converted pieces that may wait for the device.
    """

    def __init__(self, depth: int = DEPTH) -> None:
        self.depth = depth
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._stash: tuple[ShardSource, Converted] | None = None
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlf-prefetch", daemon=True)
        self._thread.start()
        self.hits = self.misses = 0

    def pieces(self, source: ShardSource, convert: Convert, piece_rows: int,
               guess: ShardSource | None = None) -> Iterator[Converted]:
        """The converted pieces of ``source``, in row order, read ahead on the thread.

        Args:
            convert: turns one piece table into model input (runs on the thread).
            piece_rows: rows per piece.
            guess: the shard likely to come next, whose first piece is read once this
                shard's are (see the module docstring).

        Raises:
            Whatever reading or converting raised (``DatasetError`` ...), when the piece
            it concerns is reached.
        """
        request = _Request(source, source.row_start, convert, piece_rows, queue.Queue(self.depth),
                           threading.Event(), guess)
        self._requests.put(request)
        finished = False
        try:
            while True:
                item = request.out.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not finished:  # the consumer left early: stop reading, and read no guess
                request.cancelled.set()
                while not request.out.empty():  # unblock the thread if it waits to hand over
                    request.out.get_nowait()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the thread has served every request and read its guess (False after
        ``timeout_s`` seconds): what a shutdown, or a test, waits for."""
        deadline = time.monotonic() + timeout_s
        while not (self._idle.is_set() and self._requests.empty()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _loop(self) -> None:
        while True:
            self._idle.set()
            request = self._requests.get()
            self._idle.clear()
            self._serve(request)
            if request.guess is not None and not request.cancelled.is_set() and self._requests.empty():
                self._read_guess(request)

    def _stashed(self, request: _Request) -> Converted | None:
        """The prefetched first piece of ``request``'s shard, if the guess was right."""
        with self._lock:
            stash, self._stash = self._stash, None
        if stash is None:
            return None
        guess, piece = stash
        if not guess.same_rows_as(request.source):
            self.misses += 1
            return None
        self.hits += 1
        return head(piece, request.source.row_end - request.source.row_start, request.source.row_start)

    def _serve(self, request: _Request) -> None:
        first = self._stashed(request)
        if first is not None:
            if not self._hand_over(request, first):
                return
            request.start += first.n_rows
        try:
            tables = _pieces(request.source, request.start, request.piece_rows) \
                if request.start < request.source.row_end else iter(())
            for table in tables:
                piece = request.convert(table, request.start)
                request.start += table.num_rows
                if not self._hand_over(request, piece):
                    return
            self._hand_over(request, _END)
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer, at the piece it concerns
            self._hand_over(request, exc)

    @staticmethod
    def _hand_over(request: _Request, item: object) -> bool:
        """Put ``item`` on the request's queue unless the consumer has gone; False then."""
        while not request.cancelled.is_set():
            try:
                request.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_guess(self, request: _Request) -> None:
        guess = request.guess
        # only the rows of one piece: a shard's first piece is the same whatever its end,
        # up to the end itself (a shorter shard takes the head of it)
        first = replace(guess, row_end=min(guess.row_end, guess.row_start + request.piece_rows))
        try:
            table = next(_pieces(first, first.row_start, request.piece_rows), None)
            if table is None or table.num_rows == 0:
                return
            piece = request.convert(table, guess.row_start)
        except Exception as exc:  # noqa: BLE001 - a wrong guess (past the end of the file) costs nothing
            log.debug("prefetching rows %d- of %s failed: %s", guess.row_start, guess.path, exc)
            return
        with self._lock:
            self._stash = (guess, piece)
