"""Reading CSV and Parquet datasets by row range, shared by producers and workers.

CSV cells are read as raw bytes (``null`` for empty cells and pyarrow's null spellings:
``NA``, ``N/A``, ``NULL``, ``null``, ``NaN``, ``nan``, ...) and decoded and converted per
the model's input spec on the worker, so that one non-numeric or non-UTF-8 cell fails one
row, not the file. Parquet columns keep their stored types. Rows are numbered from 0,
header excluded, counting parsed records: blank lines are not rows, and a quoted field
may span lines. Producers and workers count rows the same way (by parsing), so a row
range names the same records on both sides.

CSV files are UTF-8 (a UTF-8 byte-order mark is skipped) and comma-separated; a record of
any length up to :data:`MAX_CSV_BLOCK_BYTES` is read. A Parquet dataset is one file or a
directory of Parquet parts (``*.parquet`` / ``*.pq`` at any depth, names starting with
``.`` or ``_`` skipped), read as one table in path order. Every failure to read a file is
a :class:`~ml_framework.errors.DatasetError` whose message starts with the file's path.
"""

from __future__ import annotations

import base64
import csv
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ml_framework.errors import DatasetFormatError, DatasetNotFoundError, DatasetSchemaError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
PARQUET_SUFFIXES = tuple(s for s, f in FORMATS.items() if f == "parquet")
CSV_BLOCK_BYTES = 4 << 20  # pyarrow CSV block size: bounds memory per read step
# A record longer than a block makes pyarrow fail ("straddling object"); the block grows
# x4 per retry up to this, so a 10 MB cell costs one re-read, not a refused file.
MAX_CSV_BLOCK_BYTES = 1 << 30
# Separators people export by mistake, named in the hint of a missing-columns error.
_OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}
_READ_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError)


@dataclass(frozen=True)
class DatasetInfo:
    """Schema and size of a dataset file, read without loading its rows.

    Attributes:
        path: absolute path of the file (or of the directory of Parquet parts).
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
                f"{self._delimiter_hint()}"
            )

    def _delimiter_hint(self) -> str:
        if self.format != "csv":
            return ""
        for sep, name in _OTHER_DELIMITERS.items():
            if any(sep in c for c in self.columns):
                return f"; the header looks {name}-separated ({sep!r}): CSV datasets must be comma-separated"
        return ""


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


# Quoted fields may hold newlines; without this pyarrow may cut its blocks inside one.
CSV_PARSE = pa_csv.ParseOptions(newlines_in_values=True)


def _too_long(exc: Exception) -> bool:
    return "straddl" in str(exc)  # pyarrow: "straddling object straddles two block boundaries"


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
                return _check_unique(path, _header_alone(path))
            if not _too_long(exc) or block >= MAX_CSV_BLOCK_BYTES:
                raise
            block *= 4
    try:
        names = list(reader.schema.names)
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: the header (line 1) is not valid UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start}); save the file as UTF-8") from exc
    finally:
        reader.close()
    return _check_unique(path, names)


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


def _csv_batches(path: Path, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
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
            if not _too_long(exc) or block >= MAX_CSV_BLOCK_BYTES:
                raise
            block *= 4


def _csv_schema(columns: Sequence[str]) -> pa.Schema:
    return pa.schema([(c, pa.binary()) for c in columns])


def _format_error(path: Path, exc: Exception, doing: str) -> DatasetFormatError:
    detail = None
    if isinstance(exc, UnicodeDecodeError):
        detail = f"{path}: cannot {doing}: text that is not UTF-8 ({exc.reason} at byte {exc.start})"
    elif _too_long(exc):
        detail = (f"{path}: cannot {doing}: a record is longer than {MAX_CSV_BLOCK_BYTES >> 20} MiB "
                  "(a quote that is never closed?)")
    elif "columns, got" in str(exc) and path.suffix.lower() == ".csv":
        detail = _find_ragged_record(path)
    return DatasetFormatError(detail or f"{path}: cannot {doing}: {exc}")


@contextmanager
def _reading(path: Path, doing: str) -> Iterator[None]:
    """Turn pyarrow's and the OS's errors while reading ``path`` into a :class:`DatasetFormatError` naming it."""
    try:
        yield
    except _READ_ERRORS as exc:
        raise _format_error(path, exc, doing) from exc


def _parquet_files(path: Path) -> list[Path]:
    """``[path]`` for a file; a directory's Parquet parts in path order.

    Raises:
        DatasetFormatError: a directory with no parts, or a part (a symlink) whose target
            lies outside the directory: workers must not be led out of the data directory.
    """
    if not path.is_dir():
        return [path]
    root = path.resolve()
    parts = sorted(
        (p for p in path.rglob("*")
         if p.suffix.lower() in PARQUET_SUFFIXES and not any(s.startswith((".", "_")) for s in p.relative_to(path).parts)
         and p.is_file()),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not parts:
        raise DatasetFormatError(f"{path}: is a directory holding no Parquet parts ({', '.join(PARQUET_SUFFIXES)}); "
                                 "a dataset is a CSV or Parquet file, or a directory of Parquet parts")
    for part in parts:
        if not part.resolve().is_relative_to(root):
            raise DatasetFormatError(f"{part}: Parquet part leads out of the dataset directory {path}")
    return parts


_FOOTERS: OrderedDict[Path, tuple[tuple[int, ...], pq.FileMetaData]] = OrderedDict()
FOOTER_CACHE_SIZE = 64
"""Parquet footers a process keeps (least recently used dropped first). A worker reads
the same file's footer for every shard; with 3,072 columns (32x32x3 image pixels) it
takes 70 ms to parse, most of a 500-row shard's read."""


_FOOTERS_LOCK = threading.Lock()  # the HTTP API inspects datasets from a thread pool


def _footer(path: Path) -> pq.FileMetaData:
    """The footer of one Parquet file, from :data:`_FOOTERS` while the file is the same:
    same inode, size, mtime and ctime (a copy that keeps the mtime, ``cp -p`` or
    ``rsync -a``, still changes the ctime, which no user call can set)."""
    st = path.stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _FOOTERS_LOCK:
        hit = _FOOTERS.get(path)
        if hit is not None and hit[0] == key:
            _FOOTERS.move_to_end(path)
            return hit[1]
    meta = pq.read_metadata(path)
    with _FOOTERS_LOCK:
        _FOOTERS[path] = (key, meta)
        while len(_FOOTERS) > FOOTER_CACHE_SIZE:
            _FOOTERS.popitem(last=False)
    return meta


def _footers(paths: Sequence[Path]) -> list[tuple[Path, pq.FileMetaData]]:
    """Each part's footer, read without keeping the file open (a directory may hold thousands)."""
    footers = []
    for p in paths:
        with _reading(p, "read as parquet"):
            footers.append((p, _footer(p)))
    return footers


def _inspect_parquet(path: Path) -> DatasetInfo:
    names: list[str] | None = None
    n_rows = 0
    for part, meta in _footers(_parquet_files(path)):
        with _reading(part, "read as parquet"):
            part_names = _check_unique(part, list(meta.schema.to_arrow_schema().names))
            n_rows += meta.num_rows
        if names is None:
            names, first = part_names, part
        elif set(part_names) != set(names):
            raise DatasetFormatError(
                f"{part}: columns differ from those of {first.name}: "
                f"missing {sorted(set(names) - set(part_names))[:10]}, extra {sorted(set(part_names) - set(names))[:10]}")
    return DatasetInfo(path, "parquet", names or [], n_rows)


def inspect(path: Path) -> DatasetInfo:
    """Read a dataset's columns and row count (one streaming pass for CSV, footers only for Parquet).

    Args:
        path: a ``.csv``, ``.parquet`` or ``.pq`` file, or a directory of Parquet parts.

    Raises:
        DatasetNotFoundError: ``path`` does not exist.
        DatasetFormatError: unsupported suffix, an empty file, a header or text that is
            not UTF-8, duplicate column names, parts whose columns differ, or the file
            cannot be parsed. The message names the file (and the line, when known).
    """
    path = Path(path).absolute()
    if not path.exists():
        raise DatasetNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        return _inspect_parquet(path)
    fmt = detect_format(path)
    if fmt == "parquet":
        return _inspect_parquet(path)
    with _reading(path, "read as csv"):
        _check_encoding(path)
        names = _csv_names(path)
        n_rows = sum(batch.num_rows for batch in _csv_batches(path, names[:1]))
    return DatasetInfo(path, fmt, names, n_rows)


def read_rows(path: Path, fmt: str, row_start: int, row_end: int, columns: Sequence[str]) -> pa.Table:
    """Rows ``[row_start, row_end)`` of ``columns`` as an Arrow table.

    CSV columns come back as binary (raw cell bytes); Parquet reads only the row groups
    that overlap (a column whose type differs between parts comes back as text). CSV
    records before ``row_start`` are parsed and dropped, so that row numbers agree with
    :func:`inspect` whatever blank lines or multi-line fields the file holds.

    Raises:
        DatasetFormatError: the file cannot be parsed, or holds fewer rows than asked.
    """
    want = row_end - row_start
    with _reading(path, f"read rows {row_start}-{row_end}"):
        if fmt == "parquet":
            table = _parquet_rows(_footers(_parquet_files(path)), row_start, row_end, columns)
        else:
            batches, seen = [], 0
            for batch in _csv_batches(path, columns):
                if seen + batch.num_rows > row_start:
                    batches.append(batch.slice(max(0, row_start - seen)))
                seen += batch.num_rows
                if seen >= row_end:
                    break
            table = pa.Table.from_batches(batches, schema=_csv_schema(columns)).slice(0, want)
    if table.num_rows != want:
        raise DatasetFormatError(
            f"{path}: expected rows {row_start}-{row_end} but the file has only {row_start + table.num_rows}"
        )
    return table


def _parquet_rows(footers: Sequence[tuple[Path, pq.FileMetaData]], row_start: int, row_end: int,
                  columns: Sequence[str]) -> pa.Table:
    pieces, offset = [], 0
    for part, meta in footers:
        n = meta.num_rows
        if offset < row_end and offset + n > row_start:
            a, b = max(row_start - offset, 0), min(row_end - offset, n)
            doing = f"read rows {a}-{b}{' of this part' if len(footers) > 1 else ''}"
            with _reading(part, doing), pq.ParquetFile(part, metadata=meta) as pf:
                pieces.append(_file_rows(pf, a, b, columns))
        offset += n
        if offset >= row_end:
            break
    if not pieces:
        return footers[0][1].schema.to_arrow_schema().empty_table().select(list(columns))
    if len(pieces) == 1:
        return pieces[0]
    try:
        return pa.concat_tables(pieces, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column is numbers in one part, text in another
        as_text = [c for c in columns if len({p.schema.field(c).type for p in pieces}) > 1]
        return pa.concat_tables([p.cast(pa.schema([pa.field(f.name, pa.string()) if f.name in as_text else f
                                                   for f in p.schema])) for p in pieces])


def _file_rows(pf: pq.ParquetFile, row_start: int, row_end: int, columns: Sequence[str]) -> pa.Table:
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

    Raises:
        DatasetFormatError: the file cannot be parsed (naming it).
    """
    with _reading(info.path, "read"):
        if info.format == "parquet":
            footers = _footers(_parquet_files(info.path))
            for a, b in ranges:
                yield _parquet_rows(footers, a, b, columns)
            return
        batches = _csv_batches(info.path, columns)
        pending: list[pa.RecordBatch] = []
        buffered = 0
        for a, b in ranges:
            while buffered < b - a:
                batch = next(batches, None)
                if batch is None:
                    break
                pending.append(batch)
                buffered += batch.num_rows
            table = pa.Table.from_batches(pending, schema=_csv_schema(columns))
            yield table.slice(0, b - a)
            rest = table.slice(b - a)
            pending, buffered = rest.to_batches(), rest.num_rows


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
