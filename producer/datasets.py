"""Turn a dataset file into shard messages: by reference when workers can read the file,
inline (Arrow IPC) otherwise. Reads only the schema and row count up front."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ml_framework.datasets import DatasetInfo, encode_table, inspect, iter_shards
from ml_framework.errors import DatasetError, DatasetSchemaError
from ml_framework.manifest import ModelManifest
from ml_framework.paths import locate_dataset
from ml_framework.protocol import DatasetRef, InlineRows

__all__ = ["inspect", "plan_sources", "resolve_columns"]


def resolve_columns(info: DatasetInfo, manifest: ModelManifest, columns: Sequence[str] | None) -> list[str]:
    """Dataset columns that feed the model's inputs, in the manifest's order.

    Args:
        columns: dataset column names mapped one-to-one onto ``manifest.inputs.columns``;
            default: the manifest's own column names.

    Raises:
        DatasetSchemaError: wrong number of columns, or columns missing from the file.
        DatasetError: the dataset has no data rows.
    """
    wanted = list(columns) if columns is not None else list(manifest.inputs.columns)
    if len(wanted) != len(manifest.inputs.columns):
        raise DatasetSchemaError(
            f"model {manifest.name} takes {len(manifest.inputs.columns)} input columns, "
            f"{len(wanted)} given"
        )
    info.require_columns(wanted)
    if info.n_rows == 0:
        raise DatasetError(f"{info.path}: no data rows (a header or schema only): nothing to score")
    return wanted


def plan_sources(
    info: DatasetInfo, ranges: Sequence[tuple[int, int]], columns: Sequence[str], data_dir: Path
) -> Iterator[DatasetRef | InlineRows]:
    """One shard source per row range: a reference if the file (or directory of Parquet
    parts) lies under ``data_dir`` (workers mount it), else the rows inlined, reading the
    dataset once.

    The path goes through :func:`ml_framework.paths.locate_dataset`: one that enters the
    data directory and leads out of it is refused, never inlined.

    Raises:
        DatasetPathError: the path leaves the data directory through a link or '..'.
        DatasetFormatError: while inlining, the file cannot be read (naming it).
    """
    relative = locate_dataset(data_dir, info.path).relative
    if relative is not None:
        for a, b in ranges:
            yield DatasetRef(path=relative.as_posix(), format=info.format, row_start=a, row_end=b)
        return
    for (a, b), table in zip(ranges, iter_shards(info, ranges, columns), strict=True):
        yield InlineRows(row_start=a, row_end=b, data_b64=encode_table(table))
