"""Writing a job's results to Parquet or CSV."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
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


def encode_results(frame: pd.DataFrame, fmt: str) -> bytes:
    """A results frame as ``csv`` (list values as JSON text, index as ``row``) or ``parquet`` bytes."""
    buf = io.BytesIO()
    if fmt == "csv":
        flat = frame.copy()
        for col in flat.columns:
            if flat[col].map(lambda v: isinstance(v, list)).any():
                flat[col] = flat[col].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
        flat.to_csv(buf, index_label="row")
    elif fmt == "parquet":
        # error columns are text even when no row failed (all None would make them Arrow
        # type null, and the schema would differ from job to job)
        schema = pa.Schema.from_pandas(frame)
        for name in ("error", "error_field"):
            if name in schema.names:
                schema = schema.set(schema.get_field_index(name), pa.field(name, pa.string()))
        pq.write_table(pa.Table.from_pandas(frame, schema=schema), buf)
    else:
        raise ValueError(f"unknown results format {fmt!r}: csv or parquet")
    return buf.getvalue()


def write_results(frame: pd.DataFrame, path: Path) -> Path:
    """Write a results frame to Parquet or CSV, chosen by suffix (see :func:`encode_results`).

    Raises:
        ValueError: see :func:`check_output_path`.
    """
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_results(frame, "csv" if path.suffix.lower() == ".csv" else "parquet"))
    return path
