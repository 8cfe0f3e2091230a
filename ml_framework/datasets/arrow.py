"""Arrow IPC datasets: Feather v2 / Arrow IPC files (``.arrow``, ``.feather``, ``.ipc``).

A row range reads only the record batches that overlap it (the file format keeps their
offsets in its footer), each into the process's own memory (a read-only memory map would
fault if a model wrote into its input). Files in the IPC *stream* format are read front
to back instead. An object is read with ranged GETs; its batches' row counts are learnt
as they are read and kept per process (:data:`COUNTS_CACHE_SIZE` files), so that a later
shard skips the batches before its rows without fetching them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import pyarrow as pa

from ml_framework.datasets.common import DatasetInfo, check_unique, reading, slices
from ml_framework.datasets.source import Source

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
COUNTS_CACHE_SIZE = 64
"""Objects whose record batches' row counts a process keeps (least recently used dropped first)."""

_COUNTS: OrderedDict[tuple, list[int]] = OrderedDict()
_COUNTS_LOCK = threading.Lock()


def _open(path: Source) -> pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader:
    source = path.open_file()
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:  # not the file format: maybe a stream
        source.seek(0)
        return pa.ipc.open_stream(source)


def _batches(reader) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def inspect_arrow(path: Source) -> DatasetInfo:
    """Columns, types and row count of an Arrow IPC file (footer and batch headers only)."""
    with reading(path, "read as an Arrow IPC file"):
        reader = _open(path)
        schema = reader.schema
        names = check_unique(path, list(schema.names))
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            n_rows = reader.count_rows()
        else:
            n_rows = sum(batch.num_rows for batch in _batches(reader))
    return DatasetInfo(path.shown, "arrow", names, n_rows, schema=schema, source=path)


def _known_counts(path: Source) -> tuple[tuple | None, list[int]]:
    """The cache key of an object's batch row counts, and those known (none for a local file:
    reading its batches costs no request)."""
    if path.local is not None:
        return None, []
    key = (path.path, path.version())
    with _COUNTS_LOCK:
        counts = _COUNTS.get(key)
        if counts is not None:
            _COUNTS.move_to_end(key)
    return key, list(counts or ())


def _remember(key: tuple | None, counts: list[int]) -> None:
    if key is None:
        return
    with _COUNTS_LOCK:
        if len(counts) > len(_COUNTS.get(key, ())):
            _COUNTS[key] = counts
        while len(_COUNTS) > COUNTS_CACHE_SIZE:
            _COUNTS.popitem(last=False)


def arrow_pieces(path: Source, row_start: int, row_end: int, columns: Sequence[str],
                 piece_rows: int) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` of ``columns`` as consecutive tables of at most
    ``piece_rows`` rows."""
    with reading(path, f"read rows {row_start}-{row_end}"):
        key, counts = _known_counts(path)
        reader = _open(path)
        if not isinstance(reader, pa.ipc.RecordBatchFileReader):
            key, counts = None, []
        seen = first = 0
        for n in counts:  # batches whose rows all lie before the range: not fetched
            if seen + n > row_start:
                break
            seen, first = seen + n, first + 1
        batches = _batches(reader)
        if first:
            batches = (reader.get_batch(i) for i in range(first, reader.num_record_batches))
        index = first
        try:
            for batch in batches:
                n = batch.num_rows
                if index == len(counts):
                    counts.append(n)
                index += 1
                if seen + n > row_start:
                    a, b = max(row_start - seen, 0), min(row_end - seen, n)
                    table = pa.Table.from_batches([batch.slice(a, b - a)]).select(list(columns))
                    yield from slices(table, piece_rows)
                seen += n
                if seen >= row_end:
                    return
        finally:
            _remember(key, counts)
