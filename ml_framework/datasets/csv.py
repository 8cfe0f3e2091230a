"""CSV datasets: UTF-8 (a byte-order mark is skipped), comma-separated, read as raw bytes.

Cells are read as raw bytes (``null`` for empty cells and pyarrow's null spellings:
``NA``, ``N/A``, ``NULL``, ``null``, ``NaN``, ``nan``, ...) and decoded and converted per
the model's input spec on the worker, so that one non-numeric or non-UTF-8 cell fails one
row, not the file. Rows are numbered from 0, header excluded, counting parsed records:
blank lines are not rows, and a quoted field may span lines. Producers and workers count
rows the same way (by parsing), so a row range names the same records on both sides. A
record of any length up to :data:`MAX_CSV_BLOCK_BYTES` is read.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv

from ml_framework.datasets.common import (
    MAX_CSV_BLOCK_BYTES,
    DatasetInfo,
    check_unique,
    reading,
    too_long,
)
from ml_framework.errors import DatasetFormatError

CSV_BLOCK_BYTES = 4 << 20
"""pyarrow CSV block size: bounds memory per read step. A record longer than a block makes
pyarrow fail ("straddling object"); the block grows x4 per retry up to
:data:`MAX_CSV_BLOCK_BYTES`, so a 10 MB cell costs one re-read, not a refused file."""
# Quoted fields may hold newlines; without this pyarrow may cut its blocks inside one.
CSV_PARSE = pa_csv.ParseOptions(newlines_in_values=True)


def find_ragged_record(path: Path) -> str | None:
    """Describe the first record whose field count differs from the header's, by line.

    Runs only to explain a parse error (pyarrow's streaming reader does not track line
    numbers). Uses Python's csv module, which follows quoted multi-line fields.
    """
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        try:
            expected = len(next(reader))
        except (StopIteration, csv.Error):
            return None
        end_of_previous = reader.line_num
        try:
            for record in reader:
                if record and len(record) != expected:
                    return (f"{path}: line {end_of_previous + 1}: expected {expected} fields, "
                            f"found {len(record)}: {','.join(record)[:80]!r}")
                end_of_previous = reader.line_num
        except csv.Error:  # a field over csv's size limit: keep pyarrow's own message
            return None
    return None


def _check_encoding(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetFormatError(f"{path}: the file is UTF-16 or UTF-32 encoded (it starts with that "
                                 "byte-order mark); save it as UTF-8: CSV datasets are read as UTF-8")


def _csv_names(path: Path) -> list[str]:
    """Header names (also of a header alone without a line end, where pyarrow finds none).

    Raises:
        DatasetFormatError: an empty file, a header that is not UTF-8, or duplicate names.
    """
    block = CSV_BLOCK_BYTES
    while True:
        try:
            reader = pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=block),
                                     parse_options=CSV_PARSE,
                                     convert_options=pa_csv.ConvertOptions(check_utf8=False))
            break
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return check_unique(path, _header_alone(path))
            if not too_long(exc) or block >= MAX_CSV_BLOCK_BYTES:
                raise
            block *= 4
    try:
        names = list(reader.schema.names)
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: the header (line 1) is not valid UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start}); save the file as UTF-8") from exc
    finally:
        reader.close()
    return check_unique(path, names)


def _header_alone(path: Path) -> list[str]:
    """The header of a file in which pyarrow found no complete line; refuses an empty file."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        records = [r for r in itertools.islice(csv.reader(f), 2) if r]
    if not records:
        raise DatasetFormatError(f"{path}: empty file (no header, no rows)")
    return records[0]


def _csv_reader(path: Path, columns: Sequence[str], block: int = CSV_BLOCK_BYTES) -> pa_csv.CSVStreamingReader:
    return pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(block_size=block),
        parse_options=CSV_PARSE,
        convert_options=pa_csv.ConvertOptions(
            include_columns=list(columns),
            column_types={c: pa.binary() for c in columns},
            strings_can_be_null=True,
        ),
    )


def csv_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The file's records in order, ``columns`` as binary, in batches of about a block.

    A record longer than the block size makes pyarrow fail; the block then grows (up to
    :data:`MAX_CSV_BLOCK_BYTES`) and the file is parsed again from the start, skipping
    the records already yielded.
    """
    block, done = CSV_BLOCK_BYTES, 0
    while True:
        seen = 0
        try:
            try:
                reader = _csv_reader(path, columns, block)
            except pa.ArrowInvalid as exc:
                if "Empty CSV file" in str(exc):  # a header without a line end: no records
                    return
                raise
            try:
                for batch in reader:
                    if seen + batch.num_rows > done:
                        yield batch.slice(done - seen)
                        done = seen + batch.num_rows
                    seen += batch.num_rows
            finally:
                reader.close()
            return
        except pa.ArrowInvalid as exc:
            if not too_long(exc) or block >= MAX_CSV_BLOCK_BYTES:
                raise
            block *= 4


def csv_schema(columns: Sequence[str]) -> pa.Schema:
    """The schema of CSV rows as read: every column raw bytes."""
    return pa.schema([(c, pa.binary()) for c in columns])


def inspect_csv(path: Path) -> DatasetInfo:
    """Columns and row count of a CSV file, in one streaming pass."""
    with reading(path, "read as csv"):
        _check_encoding(path)
        names = _csv_names(path)
        n_rows = sum(batch.num_rows for batch in csv_batches(path, names[:1]))
    return DatasetInfo(path, "csv", names, n_rows)


def csv_pieces(path: Path, row_start: int, row_end: int, columns: Sequence[str]) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` as consecutive tables of about a block each; the
    records before ``row_start`` are parsed and dropped, so that row numbers agree with
    :func:`inspect_csv` whatever blank lines or multi-line fields the file holds."""
    schema, seen = csv_schema(columns), 0
    for batch in csv_batches(path, columns):
        if seen + batch.num_rows > row_start:
            a = max(0, row_start - seen)
            b = min(batch.num_rows, row_end - seen)
            yield pa.Table.from_batches([batch.slice(a, b - a)], schema=schema)
        seen += batch.num_rows
        if seen >= row_end:
            return


def csv_shards(path: Path, ranges: Sequence[tuple[int, int]], columns: Sequence[str]) -> Iterator[pa.Table]:
    """One table per range (ascending, contiguous) in a single pass over the file."""
    batches = csv_batches(path, columns)
    schema = csv_schema(columns)
    pending: list[pa.RecordBatch] = []
    buffered = 0
    for a, b in ranges:
        while buffered < b - a:
            batch = next(batches, None)
            if batch is None:
                break
            pending.append(batch)
            buffered += batch.num_rows
        table = pa.Table.from_batches(pending, schema=schema)
        yield table.slice(0, b - a)
        rest = table.slice(b - a)
        pending, buffered = rest.to_batches(), rest.num_rows
