"""Writing a job's results to Parquet or CSV, from the store's Arrow table (no pandas)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

SUFFIXES = (".parquet", ".pq", ".csv")


def check_output_path(path: Path) -> None:
    """Refuse, before any work, a destination results cannot be written to.

    Creates missing parent directories and a throw-away file beside ``path`` to prove
    the directory is writable.

    Raises:
        ValueError: another suffix than ``.parquet`` / ``.pq`` / ``.csv``, a directory,
            or a place that cannot be written.
    """
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: results can be written as .parquet or .csv")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise ValueError(f"{path}: cannot write there: {exc.strerror or exc}") from None


def _json_lists(column: pa.ChunkedArray) -> pa.Array:
    """A list column as text: each row's list as JSON (``[0.25, 0.75]``), null stays null."""
    if pa.types.is_fixed_size_list(column.type) and not column.null_count:
        values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        rows = values.reshape(len(column), column.type.list_size).tolist() if len(column) else []
        return pa.array([json.dumps(row) for row in rows], pa.string())
    return pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())


def encode_results(table: pa.Table, fmt: str) -> bytes:
    """A results table (see ``ResultStore.results_table``) as ``csv`` or ``parquet`` bytes.

    CSV holds list values (probabilities, embeddings) as JSON text; Parquet keeps them as
    lists. ``row`` is the first column of both.

    Raises:
        ValueError: another format.
    """
    buf = io.BytesIO()
    if fmt == "csv":
        for i, field in enumerate(table.schema):
            if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type) \
                    or pa.types.is_large_list(field.type):
                table = table.set_column(i, field.name, _json_lists(table.column(i)))
        pa_csv.write_csv(table, buf)
    elif fmt == "parquet":
        pq.write_table(table, buf)
    else:
        raise ValueError(f"unknown results format {fmt!r}: csv or parquet")
    return buf.getvalue()


def write_results(table: pa.Table, path: Path) -> Path:
    """Write a results table to Parquet or CSV, chosen by suffix (see :func:`encode_results`).

    Raises:
        ValueError: see :func:`check_output_path`.
    """
    check_output_path(path)
    fmt = "csv" if path.suffix.lower() == ".csv" else "parquet"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_bytes(encode_results(table, fmt))
    return path

