"""CSV datasets: UTF-8 (a byte-order mark is skipped), comma-separated, read as raw bytes.

Cells are read as raw bytes (``null`` for empty cells and pyarrow's null spellings:
``NA``, ``N/A``, ``NULL``, ``null``, ``NaN``, ``nan``, ...) and decoded and converted per
the model's input spec on the worker, so that one non-numeric or non-UTF-8 cell fails one
row, not the file. Rows are numbered from 0, header excluded, counting parsed records:
blank lines are not rows, and a quoted field may span lines. Producers and workers count
rows the same way (by parsing), so a row range names the same records on both sides. A
record of any length up to :data:`MAX_CSV_BLOCK_BYTES` is read. A record with too many or
too few fields is a row too, which fails alone, naming its line and both field counts
(see :func:`csv_batches`).
"""

from __future__ import annotations

import csv
import itertools
import re
import sys
import threading
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ml_framework.datasets.common import (
    MAX_CSV_BLOCK_BYTES,
    ROW_ERROR,
    DatasetInfo,
    check_unique,
    reading,
    too_long,
)
from ml_framework.datasets.source import Source
from ml_framework.errors import DatasetFormatError

CSV_BLOCK_BYTES = 4 << 20
"""pyarrow CSV block size: bounds memory per read step. A record longer than a block makes
pyarrow fail ("straddling object"); the block grows x4 per retry up to
:data:`MAX_CSV_BLOCK_BYTES`, so a 10 MB cell costs one re-read, not a refused file."""


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, decoded with surrogateescape
FAILED_RUN_ROWS = 1 << 16
"""Consecutive ragged records put back as one batch at most (a file whose every line has
a field too many is then read in batches of this size)."""
_HOOK_LOCK = threading.Lock()


def _parse_options(skipped: list[int] | None = None) -> pa_csv.ParseOptions:
    """pyarrow's parse options: quoted fields may hold newlines (without this pyarrow may
    cut its blocks inside one); a record with too many or too few fields is skipped, its
    field count appended to ``skipped`` (:func:`csv_batches` puts it back as a failed row)."""
    def skip(row: pa_csv.InvalidRow) -> str:
        if skipped is not None:
            skipped.append(row.actual_columns)
        return "skip"

    skip.mlf_skip_handler = True
    _quiet_undecodable_records()
    return pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip)


def _quiet_undecodable_records() -> None:
    """pyarrow decodes a skipped record's text as UTF-8 before it calls the handler; text
    that is not UTF-8 makes that fail inside pyarrow, which reports it to
    ``sys.unraisablehook`` (a traceback on stderr) and then fails the parse, which
    :func:`_parsed_batches` answers by parsing again as Latin-1. Those reports alone are
    dropped; every other one goes to the hook that was there (installed once, again if
    replaced)."""
    with _HOOK_LOCK:
        previous = sys.unraisablehook
        if getattr(previous, "mlf_quiet", False):
            return

        def hook(unraisable) -> None:
            if not (getattr(unraisable.object, "mlf_skip_handler", False)
                    and isinstance(unraisable.exc_value, UnicodeDecodeError)):
                previous(unraisable)

        hook.mlf_quiet = True
        sys.unraisablehook = hook


def ragged_records(path: Source) -> Iterator[tuple[int, str]]:
    """The records whose field count differs from the header's, in file order, as
    ``(row number, reason)``; the reason names the record's first line and both counts
    (``line 5: expected 2 fields, found 3``).

    Rows are numbered as everywhere in this module: parsed records, header and blank
    lines excluded. Uses Python's csv module, which follows quoted multi-line fields and
    counts lines (pyarrow's streaming reader skips such records without saying where,
    see :func:`csv_batches`).

    Raises:
        DatasetFormatError: a field over Python's csv size limit (raised to
            :data:`MAX_CSV_BLOCK_BYTES` here).
    """
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_BLOCK_BYTES))
    with path.text("utf-8", "replace") as f:
        reader = csv.reader(f)
        try:
            expected = len(next(reader))
            end_of_previous, row = reader.line_num, 0
            for record in reader:
                if record:
                    if len(record) != expected:
                        yield row, f"line {end_of_previous + 1}: expected {expected} fields, found {len(record)}"
                    row += 1
                end_of_previous = reader.line_num
        except StopIteration:
            return
        except csv.Error as exc:
            raise DatasetFormatError(f"{path}: line {reader.line_num}: {exc}") from exc


def _check_encoding(path: Source) -> None:
    with path.open_stream() as f:
        head = f.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetFormatError(f"{path}: the file is UTF-16 or UTF-32 encoded (it starts with that "
                                 "byte-order mark); save it as UTF-8: CSV datasets are read as UTF-8")


def _csv_names(path: Source) -> list[str]:
    """Header names: the first record, read with Python's csv module (pyarrow would parse a
    whole block, or the whole file when no later record has the header's width).

    Raises:
        DatasetFormatError: an empty file, a header that is not UTF-8 or cannot be parsed,
            or duplicate names.
    """
    # surrogateescape: bytes that are not UTF-8 after the header must not stop its reading
    with path.text("utf-8-sig", "surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next((r for r in reader if r), None)
        except csv.Error as exc:
            raise DatasetFormatError(f"{path}: line {reader.line_num}: cannot read the header: {exc}") from exc
    if header is None:
        raise DatasetFormatError(f"{path}: empty file (no header, no rows)")
    if any(_NOT_UTF8.search(name) for name in header):
        raise DatasetFormatError(f"{path}: the header (line {reader.line_num}) is not valid UTF-8 text; save the "
                                 "file as UTF-8")
    return check_unique(path, header)


def _csv_reader(path: Source, data: str | pa.NativeFile, columns: Sequence[str], block: int, skipped: list[int],
                latin1: bool = False) -> pa_csv.CSVStreamingReader:
    """pyarrow's streaming reader of ``columns`` as binary; with ``latin1``, of the file
    taken as Latin-1 text (every byte a character: see :func:`_parsed_batches`), its header
    line skipped and ``columns`` named from :func:`_csv_names`."""
    read = pa_csv.ReadOptions(block_size=block)
    if latin1:
        read = pa_csv.ReadOptions(block_size=block, encoding="latin-1", skip_rows=1,
                                  column_names=_csv_names(path))
    return pa_csv.open_csv(
        data,
        read_options=read,
        parse_options=_parse_options(skipped),
        convert_options=pa_csv.ConvertOptions(
            include_columns=list(columns),
            column_types={c: pa.binary() for c in columns},
            strings_can_be_null=True,
        ),
    )


def _undecodable_record(exc: pa.ArrowInvalid) -> bool:
    """pyarrow's error for a record of the wrong width that its skip handler never saw
    (its text is not UTF-8, see :func:`_quiet_undecodable_records`)."""
    return "columns, got" in str(exc)


def _raw_bytes(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch read as Latin-1 with each cell's original bytes (UTF-8 of Latin-1 characters
    back to one byte each); cells of ASCII text are the same either way and kept."""
    columns = []
    for column in batch.columns:
        text = column.cast(pa.string())
        if pc.all(pc.or_kleene(pc.string_is_ascii(text), pc.is_null(text))).as_py() is not False:
            columns.append(column)
            continue
        columns.append(pa.array([None if v is None else v.encode("latin-1") for v in text.to_pylist()], pa.binary()))
    return pa.record_batch(columns, schema=batch.schema)


def _parsed_batches(path: Source, columns: Sequence[str], skipped: list[int]) -> Iterator[pa.RecordBatch]:
    """The records pyarrow parses, in order, ``columns`` as binary, in batches of about a
    block; records with too many or too few fields are left out, and counted in
    ``skipped`` (which restarts with each parse of the file).

    The file is parsed again from the start, skipping the records already yielded, when
    a record is longer than the block size (the block then grows, up to
    :data:`MAX_CSV_BLOCK_BYTES`), or when a record of the wrong width is not UTF-8 text
    (pyarrow cannot hand it to the skip handler): then as Latin-1, in which every byte is
    a character, so that records and cells stay where they are, each cell given back its
    own bytes (:func:`_raw_bytes`).
    """
    block, done, latin1 = CSV_BLOCK_BYTES, 0, False
    while True:
        seen = 0
        skipped.clear()
        try:
            # an object is streamed front to back; a local file is opened by pyarrow itself
            data = str(path.local) if path.local is not None else path.open_stream()
            try:
                try:
                    reader = _csv_reader(path, data, columns, block, skipped, latin1)
                except pa.ArrowInvalid as exc:
                    if "Empty CSV file" in str(exc):  # a header without a line end: no records
                        return
                    raise
                try:
                    for batch in reader:
                        if seen + batch.num_rows > done:
                            yield _raw_bytes(batch.slice(done - seen)) if latin1 else batch.slice(done - seen)
                            done = seen + batch.num_rows
                        seen += batch.num_rows
                finally:
                    reader.close()
            finally:
                if not isinstance(data, str):
                    data.close()
            return
        except pa.ArrowInvalid as exc:
            if _undecodable_record(exc) and not latin1:
                latin1 = True
                continue
            if not too_long(exc) or block >= MAX_CSV_BLOCK_BYTES:
                raise
            block *= 4


def csv_batches(path: Source, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The file's records in order, ``columns`` as binary, in batches of about a block.

    A record whose field count differs from the header's stays a row: its cells are null
    and the :data:`~ml_framework.datasets.common.ROW_ERROR` column, which batches carry
    from the first such record on, holds why (``line 5: expected 2 fields, found 3``).
    pyarrow skips such records without saying where they were; once it has skipped one,
    :func:`ragged_records` finds them all by line with Python's csv module, and they are
    put back in their places.

    Raises:
        DatasetFormatError: the two parsers disagree about where the skipped records are
            (then no row is numbered wrongly: the file is refused).
    """
    skipped: list[int] = []
    ragged: Iterator[tuple[int, str]] | None = None
    pending: tuple[int, str] | None = None
    row = placed = 0
    for batch in _parsed_batches(path, columns, skipped):
        if ragged is None and not skipped:  # the common case: every record so far has the header's width
            yield batch
            row += batch.num_rows
            continue
        if ragged is None:
            ragged = ragged_records(path)
            pending = next(ragged, None)
        parts, start = [], 0
        while start < batch.num_rows or (pending is not None and pending[0] == row):
            if pending is not None and pending[0] < row:
                break  # caught by the count check below
            if pending is not None and pending[0] == row:
                reasons, pending = _run(pending, ragged)
                parts.append(_failed_rows(columns, reasons))
                row, placed = row + len(reasons), placed + len(reasons)
                continue
            take = batch.num_rows - start if pending is None else min(batch.num_rows - start, pending[0] - row)
            parts.append(_with_row_errors(batch.slice(start, take)))
            start, row = start + take, row + take
        if start < batch.num_rows:
            break
        yield pa.concat_batches(parts)
    if ragged is None and skipped:  # skipped records after the last parsed one
        ragged = ragged_records(path)
        pending = next(ragged, None)
    while pending is not None and pending[0] == row:
        reasons, pending = _run(pending, ragged)
        yield _failed_rows(columns, reasons)
        row, placed = row + len(reasons), placed + len(reasons)
    if placed != len(skipped) or pending is not None:
        raise DatasetFormatError(
            f"{path}: {len(skipped)} line(s) have too many or too few fields, and they cannot be told apart from "
            f"the rows around row {row} (a quote read differently?); correct those lines "
            f"({'; '.join(reason for _, reason in itertools.islice(ragged_records(path), 5))})")


def _with_row_errors(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with a :data:`ROW_ERROR` column of nulls (none of its rows failed)."""
    return batch.append_column(ROW_ERROR, pa.nulls(batch.num_rows, pa.string()))


def _run(first: tuple[int, str], ragged: Iterator[tuple[int, str]]) -> tuple[list[str], tuple[int, str] | None]:
    """The reasons of ``first`` and of the ragged records right after it (consecutive
    rows, at most :data:`FAILED_RUN_ROWS`), and the next ragged record after them
    (``None``: no more)."""
    reasons, row = [first[1]], first[0]
    for following in ragged:
        if following[0] != row + 1 or len(reasons) >= FAILED_RUN_ROWS:
            return reasons, following
        reasons.append(following[1])
        row += 1
    return reasons, None


def _failed_rows(columns: Sequence[str], reasons: Sequence[str]) -> pa.RecordBatch:
    """Rows of null ``columns`` that fail with ``reasons``, one row each (a file whose every
    line has a field too many is one batch per block, not one per line)."""
    n = len(reasons)
    return pa.record_batch([pa.nulls(n, pa.binary()) for _ in columns] + [pa.array(reasons, pa.string())],
                           schema=csv_schema(columns, row_errors=True))


def csv_schema(columns: Sequence[str], row_errors: bool = False) -> pa.Schema:
    """The schema of CSV rows as read: every column raw bytes (then, with ``row_errors``,
    the :data:`ROW_ERROR` column)."""
    return pa.schema([(c, pa.binary()) for c in columns] + ([(ROW_ERROR, pa.string())] if row_errors else []))


def _table(batches: Sequence[pa.RecordBatch], columns: Sequence[str]) -> pa.Table:
    """``batches`` as one table; a :data:`ROW_ERROR` column where any batch has one."""
    if any(ROW_ERROR in b.schema.names for b in batches):
        batches = [b if ROW_ERROR in b.schema.names else _with_row_errors(b) for b in batches]
        return pa.Table.from_batches(batches, schema=csv_schema(columns, row_errors=True))
    return pa.Table.from_batches(batches, schema=csv_schema(columns))


def inspect_csv(path: Source) -> DatasetInfo:
    """Columns and row count of a CSV file, in one streaming pass."""
    with reading(path, "read as csv"):
        _check_encoding(path)
        names = _csv_names(path)
        n_rows = sum(batch.num_rows for batch in csv_batches(path, names[:1]))
    return DatasetInfo(path.shown, "csv", names, n_rows, source=path)


def csv_pieces(path: Source, row_start: int, row_end: int, columns: Sequence[str]) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` as consecutive tables of about a block each; the
    records before ``row_start`` are parsed and dropped, so that row numbers agree with
    :func:`inspect_csv` whatever blank lines or multi-line fields the file holds."""
    seen = 0
    for batch in csv_batches(path, columns):
        if seen + batch.num_rows > row_start:
            a = max(0, row_start - seen)
            b = min(batch.num_rows, row_end - seen)
            yield _table([batch.slice(a, b - a)], columns)
        seen += batch.num_rows
        if seen >= row_end:
            return


def csv_shards(path: Source, ranges: Sequence[tuple[int, int]], columns: Sequence[str]) -> Iterator[pa.Table]:
    """One table per range (ascending, contiguous) in a single pass over the file."""
    batches = csv_batches(path, columns)
    pending: list[pa.RecordBatch] = []
    buffered = 0
    for a, b in ranges:
        while buffered < b - a:
            batch = next(batches, None)
            if batch is None:
                break
            pending.append(batch)
            buffered += batch.num_rows
        table = _table(pending, columns)
        yield table.slice(0, b - a)
        rest = table.slice(b - a)
        pending, buffered = rest.to_batches(), rest.num_rows
