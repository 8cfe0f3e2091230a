"""Arrow IPC datasets: Feather v2 / Arrow IPC files (``.arrow``, ``.feather``, ``.ipc``).

A row range reads only the record batches that overlap it (the file format keeps their
offsets in its footer), each into the process's own memory (a read-only memory map would
fault if a model wrote into its input). Files in the IPC *stream* format are read front
to back instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from ml_framework.datasets.common import DatasetInfo, check_unique, reading, slices

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")


def _open(path: Path) -> pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader:
    source = pa.OSFile(str(path), "rb")
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


def inspect_arrow(path: Path) -> DatasetInfo:
    """Columns, types and row count of an Arrow IPC file (footer and batch headers only)."""
    with reading(path, "read as an Arrow IPC file"):
        reader = _open(path)
        schema = reader.schema
        names = check_unique(path, list(schema.names))
        n_rows = sum(batch.num_rows for batch in _batches(reader))
    return DatasetInfo(path, "arrow", names, n_rows, schema=schema)


def arrow_pieces(path: Path, row_start: int, row_end: int, columns: Sequence[str],
                 piece_rows: int) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` of ``columns`` as consecutive tables of at most
    ``piece_rows`` rows."""
    with reading(path, f"read rows {row_start}-{row_end}"):
        reader = _open(path)
        seen = 0
        for batch in _batches(reader):
            n = batch.num_rows
            if seen + n > row_start:
                a, b = max(row_start - seen, 0), min(row_end - seen, n)
                table = pa.Table.from_batches([batch.slice(a, b - a)]).select(list(columns))
                yield from slices(table, piece_rows)
            seen += n
            if seen >= row_end:
                return
