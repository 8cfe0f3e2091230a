"""Reading CSV and Parquet datasets by row range, shared by producers and workers.

CSV cells are read as raw bytes (``null`` for empty cells) and decoded and converted per
the model's input spec on the worker, so that one non-numeric or non-UTF-8 cell fails one
row, not the file. Parquet columns keep their stored types. Rows are numbered from 0,
header excluded, counting parsed records: blank lines are not rows, and a quoted field
may span lines. Producers and workers count rows the same way (by parsing), so a row
range names the same records on both sides.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ml_framework.errors import DatasetFormatError, DatasetNotFoundError, DatasetSchemaError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
CSV_BLOCK_BYTES = 4 << 20  # pyarrow CSV block size: bounds memory per read step


@dataclass(frozen=True)
class DatasetInfo:
    """Schema and size of a dataset file, read without loading its rows.

    Attributes:
        path: absolute path of the file.
        format: ``csv`` or ``parquet``.
        columns: column names in file order.
        n_rows: number of data rows (header excluded).
    """

    path: Path
    format: str
    columns: list[str]
    n_rows: int

    def require_columns(self, needed: Sequence[str]) -> None:
        """Raise :class:`DatasetSchemaError` naming every column of ``needed`` not in the file."""
        missing = [c for c in needed if c not in self.columns]
        if missing:
            raise DatasetSchemaError(
                f"{self.path}: missing column(s) {', '.join(map(repr, missing))} "
                f"(file has: {', '.join(self.columns[:20])}{' ...' if len(self.columns) > 20 else ''})"
            )


def detect_format(path: Path) -> str:
    """``csv`` or ``parquet`` from the file suffix.

    Raises:
        DatasetFormatError: any other suffix.
    """
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetFormatError(
            f"{path}: unsupported dataset type {path.suffix!r} (supported: {', '.join(sorted(FORMATS))})"
        )
    return fmt


def _check_unique(path: Path, names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DatasetFormatError(f"{path}: duplicate column name(s) {dup}")
    return names


def _find_ragged_record(path: Path) -> str | None:
    """Describe the first record whose field count differs from the header's, by line.

    Runs only to explain a parse error (pyarrow's streaming reader does not track line
    numbers). Uses Python's csv module, which follows quoted multi-line fields.
    """
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        try:
            expected = len(next(reader))
        except StopIteration:
            return None
        end_of_previous = reader.line_num
        for record in reader:
            if record and len(record) != expected:
                return (f"{path}: line {end_of_previous + 1}: expected {expected} fields, "
                        f"found {len(record)}: {','.join(record)[:80]!r}")
            end_of_previous = reader.line_num
    return None


# Quoted fields may hold newlines; without this pyarrow may cut its blocks inside one.
CSV_PARSE = pa_csv.ParseOptions(newlines_in_values=True)


def _csv_names(path: Path) -> list[str]:
    reader = pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                             parse_options=CSV_PARSE,
                             convert_options=pa_csv.ConvertOptions(check_utf8=False))
    names = list(reader.schema.names)
    reader.close()
    return _check_unique(path, names)


def _csv_reader(path: Path, columns: Sequence[str]) -> pa_csv.CSVStreamingReader:
    return pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        parse_options=CSV_PARSE,
        convert_options=pa_csv.ConvertOptions(
            include_columns=list(columns),
            column_types={c: pa.binary() for c in columns},
            strings_can_be_null=True,
        ),
    )


def _format_error(path: Path, exc: Exception, doing: str) -> DatasetFormatError:
    detail = None
    if "columns, got" in str(exc) and detect_format(path) == "csv":
        detail = _find_ragged_record(path)
    return DatasetFormatError(detail or f"{path}: cannot {doing}: {exc}")


def inspect(path: Path) -> DatasetInfo:
    """Read a dataset's columns and row count (one streaming pass for CSV, footer only for Parquet).

    Raises:
        DatasetNotFoundError: ``path`` does not exist.
        DatasetFormatError: unsupported suffix, or the file cannot be parsed.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise DatasetNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        raise DatasetFormatError(f"{path}: is a directory, expected a file")
    fmt = detect_format(path)
    try:
        if fmt == "parquet":
            meta = pq.ParquetFile(path).metadata
            names = _check_unique(path, list(meta.schema.to_arrow_schema().names))
            return DatasetInfo(path, fmt, names, meta.num_rows)
        names = _csv_names(path)
        reader = _csv_reader(path, names[:1])
        n_rows = sum(batch.num_rows for batch in reader)
        return DatasetInfo(path, fmt, names, n_rows)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise _format_error(path, exc, f"read as {fmt}") from exc


def read_rows(path: Path, fmt: str, row_start: int, row_end: int, columns: Sequence[str]) -> pa.Table:
    """Rows ``[row_start, row_end)`` of ``columns`` as an Arrow table.

    CSV columns come back as binary (raw cell bytes); Parquet reads only the row groups
    that overlap. CSV records before ``row_start`` are parsed and dropped, so that row
    numbers agree with :func:`inspect` whatever blank lines or multi-line fields the file holds.

    Raises:
        DatasetFormatError: the file cannot be parsed, or holds fewer rows than asked.
    """
    want = row_end - row_start
    try:
        if fmt == "parquet":
            table = _parquet_rows(pq.ParquetFile(path), row_start, row_end, columns)
        else:
            batches, seen = [], 0
            reader = _csv_reader(path, columns)
            for batch in reader:
                if seen + batch.num_rows > row_start:
                    batches.append(batch.slice(max(0, row_start - seen)))
                seen += batch.num_rows
                if seen >= row_end:
                    break
            reader.close()
            table = pa.Table.from_batches(batches, schema=reader.schema).slice(0, want)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise _format_error(path, exc, f"read rows {row_start}-{row_end}") from exc
    if table.num_rows != want:
        raise DatasetFormatError(
            f"{path}: expected rows {row_start}-{row_end} but the file has only {row_start + table.num_rows}"
        )
    return table


def _parquet_rows(pf: pq.ParquetFile, row_start: int, row_end: int, columns: Sequence[str]) -> pa.Table:
    groups, offset, first = [], 0, None
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset < row_end and offset + n > row_start:
            groups.append(i)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(list(columns))
    table = pf.read_row_groups(groups, columns=list(columns))
    return table.slice(row_start - first, row_end - row_start)


def iter_shards(info: DatasetInfo, ranges: Sequence[tuple[int, int]], columns: Sequence[str]) -> Iterator[pa.Table]:
    """Yield one table per range in a single pass over the file (ranges ascending, contiguous).

    Used by producers that must inline shards; memory holds about one shard at a time.
    """
    try:
        if info.format == "parquet":
            pf = pq.ParquetFile(info.path)
            for a, b in ranges:
                yield _parquet_rows(pf, a, b, columns)
            return
        reader = _csv_reader(info.path, columns)
        pending: list[pa.RecordBatch] = []
        buffered = 0
        for a, b in ranges:
            while buffered < b - a:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                pending.append(batch)
                buffered += batch.num_rows
            table = pa.Table.from_batches(pending, schema=reader.schema)
            yield table.slice(0, b - a)
            rest = table.slice(b - a)
            pending, buffered = rest.to_batches(), rest.num_rows
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise _format_error(info.path, exc, "read") from exc


def encode_table(table: pa.Table) -> str:
    """Arrow IPC stream of ``table``, base64-encoded for a JSON message."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def decode_table(data_b64: str) -> pa.Table:
    """Inverse of :func:`encode_table`."""
    return pa.ipc.open_stream(base64.b64decode(data_b64)).read_all()


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """Split ``n_rows`` into ``[start, end)`` ranges of at most ``shard_size`` rows."""
    return [(a, min(a + shard_size, n_rows)) for a in range(0, n_rows, shard_size)]
