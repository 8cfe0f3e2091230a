"""A job's results out of the store's Arrow: written to Parquet or CSV (no pandas), or
viewed as a DataFrame (:func:`results_frame`, :func:`job_results`: the one place besides
``Job.results`` where pandas appears; the store itself returns Arrow)."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ml_framework.store import outputs as shard_outputs

if TYPE_CHECKING:
    from ml_framework.store import ResultStore

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



def results_frame(outputs: pa.Table | Sequence[tuple[int, dict | str]] | None,
                  errors: Sequence[tuple[int, str | None, str]]) -> pd.DataFrame:
    """Recorded rows as a DataFrame (see :func:`job_results`).

    Args:
        outputs: the output table (``row`` first, see :mod:`ml_framework.store.outputs`),
            or ``(row_index, output)`` pairs (a dict each), or ``None``.
        errors: ``(row_index, field, message)`` triples.

    Returns:
        Indexed by ``row``, sorted; one column per output key, plus ``error`` and
        ``error_field`` (object dtype, ``None`` on rows that succeeded). With no rows
        and an output table without rows, that table's columns and types.
    """
    table = None if outputs is None else shard_outputs.as_table(outputs)
    n_ok, n_failed = (0 if table is None else table.num_rows), len(errors)
    if table is not None and not n_ok and not n_failed:  # a job without rows: its output columns, typed
        frame = table.drop_columns([shard_outputs.ROW]).to_pandas()
        frame.index = pd.Index([], dtype="int64", name="row")
        return frame.assign(error=pd.Series(dtype=object), error_field=pd.Series(dtype=object))
    rows = [] if table is None else table.column(shard_outputs.ROW).to_pylist()
    columns: dict[str, list] = {k: v + [None] * n_failed for k, v in shard_outputs.to_columns(table).items()}
    index = pd.Index(rows + [r for r, _, _ in errors], dtype="int64", name="row")
    # object dtype, None where absent (pandas would infer a string dtype with NaN)
    columns["error"] = pd.Series([None] * n_ok + [m for _, _, m in errors], index=index, dtype=object)
    columns["error_field"] = pd.Series([None] * n_ok + [f for _, f, _ in errors], index=index, dtype=object)
    frame = pd.DataFrame(columns, index=index)
    if n_failed and table is not None:
        # integer outputs (class labels) stay integers on the rows that failed, as nulls
        for name in table.column_names:
            if name != shard_outputs.ROW and pa.types.is_integer(table.schema.field(name).type):
                frame[name] = frame[name].astype("Int64")
    return frame if index.is_monotonic_increasing else frame.sort_index()


def job_results(store: ResultStore, job_id: str) -> pd.DataFrame:
    """Outputs and row errors of a job, in input row order.

    Returns:
        DataFrame indexed by ``row`` (0-based input row), one column per output key
        (e.g. ``prediction``, ``score``, ``probabilities``), plus ``error`` and
        ``error_field`` (``None`` on rows that succeeded). Rows not yet recorded are absent.

    Raises:
        JobNotFoundError: no such job.
    """
    return results_frame(*store.recorded_rows(job_id))


def table_frame(table: pa.Table) -> pd.DataFrame:
    """A results table (``ResultStore.results_table``'s columns: ``row``, the outputs,
    ``error``, ``error_field``; e.g. read back from the HTTP API's Arrow stream) as the
    DataFrame :func:`job_results` gives for the same rows: same columns, dtypes and order.

    Raises:
        ValueError: ``table`` lacks the ``row`` or ``error`` column.
    """
    for name in (shard_outputs.ROW, "error"):
        if name not in table.column_names:
            raise ValueError(f"a results table needs a {name!r} column; got {table.column_names}")
    failed = table.column("error").is_valid()
    bad = table.filter(failed)
    fields = bad.column("error_field").to_pylist() if "error_field" in bad.column_names else [None] * bad.num_rows
    errors = list(zip(bad.column(shard_outputs.ROW).to_pylist(), fields, bad.column("error").to_pylist(),
                      strict=True))
    ok = table.filter(pc.invert(failed)).drop_columns(
        [c for c in ("error", "error_field") if c in table.column_names])
    # no row succeeded: the store gives no output table (job_results' frame then has no output columns)
    return results_frame(None if errors and not ok.num_rows else ok, errors)
