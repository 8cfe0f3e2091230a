"""Turn a dataset into shard messages: by reference when workers can read the file (it
lies under the data directory, or in object storage), inline (Arrow IPC) otherwise. Reads
only the schema and row count up front."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ml_framework.datasets import (
    IMAGE_COLUMN,
    DatasetInfo,
    encode_table,
    inspect,
    iter_shards,
    names_summary,
    value_type,
)
from ml_framework.datasets.common import reading
from ml_framework.datasets.source import Source, fingerprint
from ml_framework.errors import DatasetFormatError, DatasetNotFoundError, DatasetSchemaError
from ml_framework.manifest import ModelManifest
from ml_framework.objectstore import is_object_uri
from ml_framework.paths import locate_dataset
from ml_framework.protocol import DatasetRef, InlineRows
from ml_framework.tensors import describe_mismatch

__all__ = ["check_column_types", "inspect", "plan_sources", "resolve_columns"]

_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary,
               pa.types.is_null)


def resolve_columns(info: DatasetInfo, manifest: ModelManifest, columns: Sequence[str] | None) -> list[str]:
    """Dataset columns that feed the model's inputs, in the manifest's order.

    A model with one input column (``tensor``, ``image`` or ``text``) takes a dataset of
    one column whatever its name (an ``.npy`` array, a directory of images).

    Args:
        columns: dataset column names mapped one-to-one onto ``manifest.inputs.columns``;
            default: the manifest's own column names.

    A dataset without rows is accepted: its job has nothing to score and ends SUCCEEDED
    at once.

    Raises:
        DatasetSchemaError: wrong number of columns (the message says what ``columns``
            maps), columns missing from the file, or a column whose type can never feed
            the model (a list of the wrong length, text for a tensor).
    """
    spec = manifest.inputs
    wanted = list(columns) if columns is not None else list(spec.columns)
    if columns is None and len(spec.columns) == 1 and len(info.columns) == 1 and spec.column not in info.columns:
        wanted = list(info.columns)
    if len(wanted) != len(spec.columns):
        n = len(spec.columns)
        raise DatasetSchemaError(
            f"{len(wanted)} column(s) given ({names_summary(wanted)}), model {manifest.name} needs {n}: columns "
            f"(--columns) selects which dataset columns feed the model's {n} input(s), in order "
            f"({names_summary(list(spec.columns))}); give {n} names, or none to read the columns of those names"
        )
    info.require_columns(wanted)
    check_column_types(info, manifest, wanted)
    return wanted


def check_column_types(info: DatasetInfo, manifest: ModelManifest, columns: Sequence[str]) -> None:
    """Refuse a column whose stored type can never feed the model's input kind (types the
    file does not store, CSV cells, are judged per row by the worker).

    Raises:
        DatasetSchemaError: naming the file, the column, its type and what the model takes.
    """
    if info.schema is None:
        return
    kind = manifest.inputs.kind
    for name in columns:
        column_type = value_type(info.schema.field(name).type)  # a pandas category: its values count
        if info.n_rows == 0 and pa.types.is_null(column_type):
            continue  # an empty column given in memory: no value to judge
        problem = None
        if kind == "tensor":
            problem = describe_mismatch(column_type, manifest.inputs.row_shape)
        elif kind in ("image", "text") and not any(test(column_type) for test in _TEXT_TYPES):
            problem = f"holds {column_type}, not {'image paths' if kind == 'image' else 'text'}"
        if problem:
            raise DatasetSchemaError(f"{info.path}: column {name!r} {problem} (model {manifest.name}, "
                                     f"inputs.kind {kind})")


def plan_sources(
    info: DatasetInfo, ranges: Sequence[tuple[int, int]], columns: Sequence[str], data_dir: Path
) -> Iterator[DatasetRef | InlineRows]:
    """One shard source per row range: a reference if the file (or directory of Parquet
    parts) lies under ``data_dir`` (workers mount it) or in object storage (its ``s3://``
    URI: workers read their rows from the store), else the rows inlined, reading the
    dataset once. A directory of images is always inlined as its paths (relative to
    ``data_dir``: the workers read the images there; under an object prefix, the images'
    full URIs), so its rows stay the files listed now.

    The path goes through :func:`ml_framework.paths.locate_dataset`: one that enters the
    data directory and leads out of it is refused, never inlined.

    Raises:
        DatasetPathError: the path leaves the data directory through a link or '..'.
        DatasetFormatError: while inlining, the file cannot be read (naming it); a
            directory of images outside the data directory.
    """
    if isinstance(info.path, str) and is_object_uri(info.path):
        yield from _object_sources(info, ranges, columns)
        return
    relative = locate_dataset(data_dir, info.path).relative
    if info.format == "images":
        if relative is None:
            raise DatasetFormatError(f"{info.path}: a directory of images must lie under the data directory "
                                     f"({data_dir}): workers read the image files there")
        prefix = "" if str(relative) == "." else relative.as_posix() + "/"
        for (a, b), table in zip(ranges, iter_shards(info, ranges, columns), strict=True):
            paths = pc.binary_join_element_wise(prefix, table.column(IMAGE_COLUMN), "")
            yield InlineRows(row_start=a, row_end=b, data_b64=encode_table(pa.table({columns[0]: paths})))
        return
    if relative is not None:
        stamp = _fingerprint(info)
        for a, b in ranges:
            yield DatasetRef(path=relative.as_posix(), format=info.format, row_start=a, row_end=b, fingerprint=stamp)
        return
    for (a, b), table in zip(ranges, iter_shards(info, ranges, columns), strict=True):
        yield InlineRows(row_start=a, row_end=b, data_b64=encode_table(table))


def _object_sources(info: DatasetInfo, ranges: Sequence[tuple[int, int]],
                    columns: Sequence[str]) -> Iterator[DatasetRef | InlineRows]:
    """Shard sources of a dataset in object storage: references by URI; an image prefix's
    shards inline the URIs of their images."""
    if info.format == "images":
        prefix = info.path.rstrip("/") + "/"
        for (a, b), table in zip(ranges, iter_shards(info, ranges, columns), strict=True):
            uris = pc.binary_join_element_wise(prefix, table.column(IMAGE_COLUMN), "")
            yield InlineRows(row_start=a, row_end=b, data_b64=encode_table(pa.table({columns[0]: uris})))
        return
    stamp = _fingerprint(info)
    for a, b in ranges:
        yield DatasetRef(path=info.path, format=info.format, row_start=a, row_end=b, fingerprint=stamp)


def _fingerprint(info: DatasetInfo) -> str:
    """The dataset's :func:`~ml_framework.datasets.source.fingerprint` now, which every
    by-reference shard carries (its workers refuse rows of a dataset changed since)."""
    source = info.source or Source.of_path(info.path)
    try:
        with reading(source, "examine"):
            return fingerprint(source)
    except DatasetFormatError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):  # gone since it was inspected
            raise DatasetNotFoundError(f"dataset not found: {source}") from None
        raise
