"""Reading datasets by row range, shared by producers and workers.

Formats, by suffix (see each module):

- ``.csv``: :mod:`ml_framework.datasets.csv` (cells read as raw bytes);
- ``.parquet`` / ``.pq``, or a directory of Parquet parts: :mod:`ml_framework.datasets.parquet`;
- ``.arrow`` / ``.feather`` / ``.ipc`` (Arrow IPC): :mod:`ml_framework.datasets.arrow`;
- ``.npy`` (one numeric array, a row per entry of its first axis): :mod:`ml_framework.datasets.npy`;
- a directory of image files: :mod:`ml_framework.datasets.images`.

Each reads a local path or an object in S3 alike (a :class:`Source`, see
:mod:`ml_framework.datasets.source`): give :func:`inspect` and :func:`iter_pieces` a local
path, or ``object_source("s3://bucket/key", settings)``; a prefix of objects is read as a
directory.

Rows are numbered from 0 in file order (header excluded). A record a reader cannot read
as a row (a CSV line with too many or too few fields) is still a row, marked in the
:data:`ROW_ERROR` column, so that it fails alone and no row number shifts. Dictionary
columns (a pandas ``category``) keep their encoding here; whoever reads values decodes
them (:func:`decode_dictionaries`, :func:`value_type`). A dataset may have no rows.
Every failure to read a file is a :class:`~ml_framework.errors.DatasetError` whose
message starts with the file's path (or URI).
Workers read a shard as consecutive *pieces* (:func:`iter_pieces`), so that converting one
piece overlaps reading the next, and a wide shard never sits in memory twice.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import pyarrow as pa

from ml_framework.datasets.arrow import ARROW_SUFFIXES, arrow_pieces, inspect_arrow
from ml_framework.datasets.common import (
    ROW_ERROR,
    DatasetInfo,
    decode_dictionaries,
    names_summary,
    reading,
    value_type,
)
from ml_framework.datasets.csv import (
    CSV_BLOCK_BYTES,
    csv_pieces,
    csv_schema,
    csv_shards,
    inspect_csv,
)
from ml_framework.datasets.images import IMAGE_COLUMN, IMAGE_SUFFIXES, inspect_images
from ml_framework.datasets.npy import NPY_COLUMN, inspect_npy, npy_pieces
from ml_framework.datasets.parquet import (
    PARQUET_SUFFIXES,
    concat_parts,
    inspect_parquet,
    parquet_files,
    parquet_pieces,
)
from ml_framework.datasets.source import Source, as_source, object_source, require
from ml_framework.errors import DatasetFormatError, DatasetNotFoundError

__all__ = [
    "CSV_BLOCK_BYTES",
    "FORMATS",
    "IMAGE_COLUMN",
    "IMAGE_SUFFIXES",
    "NPY_COLUMN",
    "ROW_ERROR",
    "DatasetInfo",
    "Source",
    "decode_dictionaries",
    "decode_table",
    "detect_format",
    "encode_table",
    "inspect",
    "iter_pieces",
    "iter_shards",
    "names_summary",
    "object_source",
    "parquet_files",
    "read_rows",
    "shard_ranges",
    "value_type",
]

FORMATS = {".csv": "csv", **dict.fromkeys(PARQUET_SUFFIXES, "parquet"), **dict.fromkeys(ARROW_SUFFIXES, "arrow"),
           ".npy": "npy"}
"""Dataset file suffixes and their formats (a directory is Parquet parts or images)."""


def detect_format(path: Path | Source) -> str:
    """The format of a dataset file from its suffix (see :data:`FORMATS`).

    Raises:
        DatasetFormatError: any other suffix.
    """
    suffix = PurePosixPath(str(path)).suffix
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        raise DatasetFormatError(
            f"{path}: unsupported dataset type {suffix!r} (supported: {', '.join(sorted(FORMATS))}, "
            "a directory of Parquet parts, or a directory of images)"
        )
    return fmt


def inspect(path: Path | Source) -> DatasetInfo:
    """Read a dataset's columns and row count without loading its rows (one streaming
    pass for CSV; footers or headers for the others; a listing for a directory).

    Args:
        path: a dataset file (see :data:`FORMATS`), a directory of Parquet parts, or a
            directory of images (one holding no Parquet part); local, or an object or
            prefix (:func:`object_source`).

    Raises:
        DatasetNotFoundError: ``path`` does not exist.
        ObjectStoreError: the object store refused the request (credentials, bucket) or
            cannot be reached; the message names the URI, never a credential.
        DatasetFormatError: unsupported suffix, an empty file, a header or text that is
            not UTF-8, duplicate column names, parts whose columns differ, or the file
            cannot be parsed. The message names the file (and the line, when known).
    """
    source = as_source(path)
    if source.local is None:
        directory = not require(source).is_file
        if directory and any(file.suffix in PARQUET_SUFFIXES for _, file in source.listing()):
            return inspect_parquet(source)
    else:
        if not source.local.exists():
            raise DatasetNotFoundError(f"dataset not found: {source}")
        directory = source.local.is_dir()
        if directory and any(p.suffix.lower() in PARQUET_SUFFIXES for p in source.local.rglob("*")):
            return inspect_parquet(source)
    if directory:
        return inspect_images(source)
    return {"csv": inspect_csv, "parquet": inspect_parquet, "arrow": inspect_arrow,
            "npy": inspect_npy}[detect_format(source)](source)


def iter_pieces(path: Path | Source, fmt: str, row_start: int, row_end: int, columns: Sequence[str],
                piece_rows: int) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` of ``columns`` as consecutive tables of at most
    ``piece_rows`` rows each (CSV: of about a parse block).

    CSV columns come back as binary (raw cell bytes); the others keep their stored types
    (an ``.npy`` array as a ``fixed_shape_tensor`` column).

    Raises:
        DatasetFormatError: the file cannot be parsed (naming it).
    """
    path = as_source(path)
    with reading(path, f"read rows {row_start}-{row_end}"):
        if fmt == "parquet":
            yield from parquet_pieces(path, row_start, row_end, columns, piece_rows)
        elif fmt == "arrow":
            yield from arrow_pieces(path, row_start, row_end, columns, piece_rows)
        elif fmt == "npy":
            yield from npy_pieces(path, row_start, row_end, piece_rows)
        elif fmt == "csv":
            yield from csv_pieces(path, row_start, row_end, columns)
        else:
            raise DatasetFormatError(f"{path}: cannot read rows of a {fmt!r} dataset by range")


def read_rows(path: Path | Source, fmt: str, row_start: int, row_end: int, columns: Sequence[str]) -> pa.Table:
    """Rows ``[row_start, row_end)`` of ``columns`` as one Arrow table (see :func:`iter_pieces`).

    Raises:
        DatasetFormatError: the file cannot be parsed, or holds fewer rows than asked.
    """
    want = row_end - row_start
    path = as_source(path)
    pieces = list(iter_pieces(path, fmt, row_start, row_end, columns, max(want, 1)))
    table = concat_parts(pieces, columns) if pieces else _empty(path, fmt, columns)
    if table.num_rows != want:
        raise DatasetFormatError(
            f"{path}: expected rows {row_start}-{row_end} but the file has only {row_start + table.num_rows}"
        )
    return table


def _empty(path: Source, fmt: str, columns: Sequence[str]) -> pa.Table:
    """No rows of ``columns``, with the types they have in the file."""
    if fmt == "csv":
        return csv_schema(columns).empty_table()
    return inspect(path).schema.empty_table().select(list(columns))


def iter_shards(info: DatasetInfo, ranges: Sequence[tuple[int, int]], columns: Sequence[str]) -> Iterator[pa.Table]:
    """Yield one table per range (ascending, contiguous), reading the file once.

    Used by producers that must inline shards; memory holds about one shard at a time.

    Raises:
        DatasetFormatError: the file cannot be read (naming it).
    """
    source = info.source or as_source(info.path)
    if info.format == "csv":
        with reading(source, "read"):
            yield from csv_shards(source, ranges, columns)
        return
    if info.format == "images":
        files = pa.array(info.files or (), pa.string())
        for a, b in ranges:
            yield pa.table({IMAGE_COLUMN: files.slice(a, b - a)})
        return
    for a, b in ranges:
        yield read_rows(source, info.format, a, b, columns)


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

