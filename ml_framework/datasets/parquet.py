"""Parquet datasets: one file, or a directory of parts read as one table in path order.

Parts are ``*.parquet`` / ``*.pq`` at any depth; names starting with ``.`` or ``_`` are
skipped. Columns keep their stored types; a row range reads only the row groups that
overlap it. The worker reads a shard row group by row group, decoding the next row group
on a thread while the current one is converted (see :func:`parquet_pieces`), and keeps the
reader of a row group open between shards (see :func:`_read_segment`). A Parquet object,
or a prefix of parts, is read the same way with ranged GETs: its footer, then the column
chunks of the row groups a shard needs.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ml_framework.datasets.common import DatasetInfo, check_unique, reading, slices
from ml_framework.datasets.images import skipped
from ml_framework.datasets.source import Source
from ml_framework.errors import DatasetFormatError

PARQUET_SUFFIXES = (".parquet", ".pq")
FOOTER_CACHE_SIZE = 64
"""Parquet footers a process keeps (least recently used dropped first). A worker reads
the same file's footer for every shard; with 3,072 columns (32x32x3 image pixels) it
takes 70 ms to parse, most of a 500-row shard's read."""
READAHEAD_ROW_GROUPS = 2
"""Row groups decoded ahead of the one being handed out. A single tensor column decodes on
one thread per row group (pyarrow parallelises over columns, not within one), so reading
ahead is what spreads such a file over the cores."""

STREAM_CACHE_SIZE = 4
"""Open row-group readers a process keeps between shards (see :func:`_read_segment`)."""
MIN_BATCH_ROWS = 1024
"""Rows per batch of a row-group reader at least (narrow rows make small pieces)."""

_FOOTERS: OrderedDict[Source, tuple[tuple, pq.FileMetaData]] = OrderedDict()
_STREAMS: OrderedDict[tuple, _Stream] = OrderedDict()
_STREAMS_LOCK = threading.Lock()
_FOOTERS_LOCK = threading.Lock()  # the HTTP API inspects datasets from a thread pool
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's row-group decoding threads (made on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                       thread_name_prefix="mlf-parquet")
        return _POOL


def parquet_files(path: Source) -> list[Source]:
    """``[path]`` for a file; a directory's Parquet parts in path order.

    Raises:
        DatasetFormatError: a directory with no parts, or a part (a symlink) whose target
            lies outside the directory: workers must not be led out of the data directory.
    """
    if path.local is None:
        info = path.info()
        if info.is_file:
            return [Source(path.fs, path.path, path.shown, (info.size, info.mtime_ns))]
        parts = [part for rel, part in path.listing() if part.suffix in PARQUET_SUFFIXES and not skipped(rel)]
    elif not path.local.is_dir():
        return [path]
    else:
        parts = _local_parts(path.local)
    if not parts:
        raise DatasetFormatError(f"{path}: is a directory holding no Parquet parts ({', '.join(PARQUET_SUFFIXES)}); "
                                 "a dataset is a CSV, Parquet, Arrow or .npy file, a directory of Parquet parts, "
                                 "or a directory of images")
    return parts


def _local_parts(path: Path) -> list[Source]:
    """The Parquet parts of local directory ``path``, in path order.

    Raises:
        DatasetFormatError: a part (a symlink) leads out of the directory.
    """
    root = path.resolve()
    parts = sorted(
        (p for p in path.rglob("*")
         if p.suffix.lower() in PARQUET_SUFFIXES and not skipped(p.relative_to(path).as_posix()) and p.is_file()),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    for part in parts:
        if not part.resolve().is_relative_to(root):
            raise DatasetFormatError(f"{part}: Parquet part leads out of the dataset directory {path}")
    return [Source.of_path(p) for p in parts]


def footer(path: Source) -> pq.FileMetaData:
    """The footer of one Parquet file, cached while the file is the same (see
    :meth:`Source.version`: same inode, size, mtime and ctime of a local file; size and
    mtime of an object)."""
    key = path.version()
    with _FOOTERS_LOCK:
        hit = _FOOTERS.get(path)
        if hit is not None and hit[0] == key:
            _FOOTERS.move_to_end(path)
            return hit[1]
    meta = pq.read_metadata(path.local) if path.local is not None else _object_footer(path)
    with _FOOTERS_LOCK:
        _FOOTERS[path] = (key, meta)
        while len(_FOOTERS) > FOOTER_CACHE_SIZE:
            _FOOTERS.popitem(last=False)
    return meta


def _object_footer(path: Source) -> pq.FileMetaData:
    with path.open_file() as f:
        return pq.read_metadata(f)


def footers(paths: Sequence[Source]) -> list[tuple[Source, pq.FileMetaData]]:
    """Each part's footer, read without keeping the file open (a directory may hold thousands)."""
    out = []
    for p in paths:
        with reading(p, "read as parquet"):
            out.append((p, footer(p)))
    return out


def inspect_parquet(path: Source) -> DatasetInfo:
    """Columns, types and row count of a Parquet file or directory, from the footers."""
    names: list[str] | None = None
    schema = None
    n_rows = 0
    for part, meta in footers(parquet_files(path)):
        with reading(part, "read as parquet"):
            part_schema = meta.schema.to_arrow_schema()
            part_names = check_unique(part, list(part_schema.names))
            n_rows += meta.num_rows
        if names is None:
            names, first, schema = part_names, part, part_schema
        elif set(part_names) != set(names):
            raise DatasetFormatError(
                f"{part}: columns differ from those of {first.name}: "
                f"missing {sorted(set(names) - set(part_names))[:10]}, extra {sorted(set(part_names) - set(names))[:10]}")
    return DatasetInfo(path.shown, "parquet", names or [], n_rows, schema=schema, source=path)


def _groups(meta: pq.FileMetaData, a: int, b: int) -> Iterator[tuple[int, int, int, int]]:
    """``(row group, its first row in the file, first, end)`` of the row groups overlapping
    rows ``[a, b)`` of one file, with the part of each that lies in the range (relative to
    the group)."""
    offset = 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        if offset < b and offset + n > a:
            yield i, offset, max(a - offset, 0), min(b - offset, n)
        offset += n
        if offset >= b:
            return


@dataclass
class _Stream:
    """An open reader of one row group, positioned at row ``position`` of the group."""

    file: pq.ParquetFile
    batches: Iterator[pa.RecordBatch]
    position: int = 0
    leftover: pa.RecordBatch | None = None  # rows from ``position`` already taken from ``batches``


def _open_stream(part: Source, meta: pq.FileMetaData, group: int, columns: Sequence[str], batch_rows: int) -> _Stream:
    pf = pq.ParquetFile(part.local if part.local is not None else part.open_file(), metadata=meta)
    return _Stream(pf, pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=list(columns)))


def _read_segment(part: Source, meta: pq.FileMetaData, group: int, offset: int, first: int, end: int,
                  columns: Sequence[str], several_parts: bool, batch_rows: int) -> pa.Table:
    """Rows ``[first, end)`` of row group ``group`` (which starts at row ``offset`` of the part).

    A row group is decoded as a stream, and the stream is kept (:data:`STREAM_CACHE_SIZE`
    per process) where the segment ends: the next shard of the same row group continues it
    instead of decoding the group again from its start. A file whose row groups are much
    larger than a shard (pandas and pyarrow write row groups of up to 1 Mi rows) is then
    decoded about once per process, not once per shard.
    """
    doing = f"read rows {offset + first}-{offset + end}{' of this part' if several_parts else ''}"
    key = (part, id(meta), group, tuple(columns))  # the footer cache keeps one object per file version
    with _STREAMS_LOCK:
        stream = _STREAMS.pop(key, None)
    pieces: list[pa.RecordBatch] = []
    with reading(part, doing):
        if stream is None or stream.position > first:
            stream = _open_stream(part, meta, group, columns, batch_rows)
        while stream.position < end:
            batch, stream.leftover = stream.leftover or next(stream.batches, None), None
            if batch is None:
                break
            start = stream.position
            stop = start + batch.num_rows
            if stop > first:
                pieces.append(batch.slice(max(first - start, 0), min(end, stop) - max(first, start)))
            if stop > end:  # the rest of the batch belongs to the next segment
                stream.leftover, stream.position = batch.slice(end - start), end
            else:
                stream.position = stop
        if not pieces:
            return stream.file.schema_arrow.empty_table().select(list(columns))
    if stream.position < meta.row_group(group).num_rows:
        with _STREAMS_LOCK:
            _STREAMS[key] = stream
            while len(_STREAMS) > STREAM_CACHE_SIZE:
                _STREAMS.popitem(last=False)
    return pa.Table.from_batches(pieces)


def parquet_pieces(path: Source, row_start: int, row_end: int, columns: Sequence[str],
                   piece_rows: int) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` as consecutive tables of at most ``piece_rows`` rows.

    Row groups are decoded on the process's reading threads, :data:`READAHEAD_ROW_GROUPS`
    ahead of the one handed out.

    Raises:
        DatasetFormatError: a part cannot be read (naming it and the row group).
    """
    parts = footers(parquet_files(path))
    several = len(parts) > 1
    plan: list[tuple[Source, pq.FileMetaData, int, int, int, int]] = []
    offset = 0
    for part, meta in parts:
        for group, group_offset, first, end in _groups(meta, row_start - offset, row_end - offset):
            plan.append((part, meta, group, group_offset, first, end))
        offset += meta.num_rows
        if offset >= row_end:
            break
    pending: list[Future] = []
    try:
        for step in range(len(plan)):
            while len(pending) <= READAHEAD_ROW_GROUPS and step + len(pending) < len(plan):
                pending.append(_pool().submit(_read_segment, *plan[step + len(pending)], columns, several,
                                              max(piece_rows, MIN_BATCH_ROWS)))
            yield from slices(pending.pop(0).result(), piece_rows)
    finally:
        for future in pending:
            future.cancel()


def parquet_rows(path: Source, row_start: int, row_end: int, columns: Sequence[str]) -> pa.Table:
    """Rows ``[row_start, row_end)`` as one table (a column whose type differs between
    parts comes back as text)."""
    pieces = list(parquet_pieces(path, row_start, row_end, columns, max(row_end - row_start, 1)))
    if not pieces:
        meta = footers(parquet_files(path))[0][1]
        return meta.schema.to_arrow_schema().empty_table().select(list(columns))
    return concat_parts(pieces, columns)


def concat_parts(pieces: list[pa.Table], columns: Sequence[str]) -> pa.Table:
    """Tables of several parts as one; a column that is numbers in one part and text in
    another becomes text."""
    if len(pieces) == 1:
        return pieces[0]
    try:
        return pa.concat_tables(pieces, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column is numbers in one part, text in another
        as_text = [c for c in columns if len({p.schema.field(c).type for p in pieces}) > 1]
        return pa.concat_tables([p.cast(pa.schema([pa.field(f.name, pa.string()) if f.name in as_text else f
                                                   for f in p.schema])) for p in pieces])
