"""Rows given in memory (``score_rows``, ``predict``, the HTTP API) as an Arrow table of the
model's input columns, by the model's input kind.

- ``columns``: a DataFrame or Arrow table (named columns), a list of dicts (one per row),
  or an array / list of lists whose columns are the manifest's input columns in order; an
  array of shape ``(N, *inputs.shape)`` is flattened to those columns.
- ``tensor``: an array of shape ``(N, *inputs.shape)`` (or ``(N, prod(shape))``), a list of
  per-row arrays or nested lists, or dicts / a table whose tensor column holds them. Rows
  of the wrong length become row errors on the worker, not a refused request.
- ``image`` / ``text``: a list of paths / strings, or dicts / a table with that column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ml_framework.datasets import encode_table
from ml_framework.errors import DatasetSchemaError
from ml_framework.manifest import InputSpec
from ml_framework.protocol import InlineRows
from ml_framework.tensors import same_shape, tensor_table

RowsLike = pd.DataFrame | pa.Table | np.ndarray | Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]] | Sequence[str]


def rows_to_table(rows: RowsLike, spec: InputSpec) -> pa.Table:
    """In-memory rows as an Arrow table (see the module docstring for the forms).

    Columns whose values Arrow cannot give one type (say numbers and text mixed) are sent
    as text: the worker parses each cell and fails only the rows that are not numbers.

    No rows (an empty list, array, DataFrame or table) give a table without rows: its
    job has nothing to score.

    Raises:
        DatasetSchemaError: an array or list of lists whose width is not the number of
            input columns, an array whose rows do not hold the input's shape, or rows of
            another type.
    """
    if _nothing(rows):
        return _no_rows(spec)
    if isinstance(rows, pa.Table):
        table = rows
    elif isinstance(rows, pd.DataFrame):
        if rows.columns.duplicated().any():
            raise DatasetSchemaError(f"duplicate column names: {sorted(set(rows.columns[rows.columns.duplicated()]))}")
        try:
            table = pa.Table.from_pandas(rows, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a column
            table = _columns_to_table({str(c): rows[c].tolist() for c in rows.columns}, spec)
    elif isinstance(rows, Sequence) and not isinstance(rows, str) and rows and isinstance(rows[0], Mapping):
        if not all(isinstance(r, Mapping) for r in rows):
            raise DatasetSchemaError("rows must all be mappings of column -> value, or all be sequences")
        names = list(dict.fromkeys(k for r in rows for k in r))
        table = _columns_to_table({n: [r.get(n) for r in rows] for n in names}, spec)
    elif spec.kind != "columns":
        if isinstance(rows, str) or not isinstance(rows, np.ndarray | Sequence):
            raise DatasetSchemaError(f"cannot score rows of type {type(rows).__name__}")
        table = pa.table({spec.column: _one_column(rows, spec)})
    elif _plain_numeric(rows, spec):
        # numeric: one Arrow buffer, column-major, sliced per column (no Python objects)
        array = rows.reshape(len(rows), -1) if rows.ndim > 1 else rows.reshape(-1, 1)
        flat, n = pa.array(np.ascontiguousarray(array.T).ravel()), len(array)
        table = pa.Table.from_arrays([flat.slice(i * n, n) for i in range(array.shape[1])], names=list(spec.columns))
    elif isinstance(rows, np.ndarray) or (isinstance(rows, Sequence) and rows and not isinstance(rows[0], Mapping)):
        table = _sequences_to_table(rows, spec.columns)
    else:
        raise DatasetSchemaError(f"cannot score rows of type {type(rows).__name__}")
    return table


def inline_sources(table: pa.Table, ranges: Sequence[tuple[int, int]]) -> list[InlineRows]:
    """The rows of ``table`` as one inline shard source (Arrow IPC, base64) per
    ``[row_start, row_end)`` range of ``ranges``; ``table`` holds the columns to send."""
    return [InlineRows(row_start=a, row_end=b, data_b64=encode_table(table.slice(a, b - a))) for a, b in ranges]


def _nothing(rows: object) -> bool:
    """No rows: an empty sequence or array, or a table or DataFrame without rows or columns
    (one with columns keeps their types)."""
    if isinstance(rows, pa.Table | pd.DataFrame):
        return len(rows) == 0 and len(rows.columns) == 0
    return isinstance(rows, np.ndarray | Sequence) and not isinstance(rows, str) and len(rows) == 0


def _no_rows(spec: InputSpec) -> pa.Table:
    """A table of the input columns without rows, typed as rows of ``spec`` would be."""
    if spec.kind == "columns":
        return pa.table({c: pa.array([], pa.float64()) for c in spec.columns})
    return pa.table({spec.column: pa.array([], pa.list_(pa.float64()) if spec.kind == "tensor" else pa.string())})


def rows_nbytes(rows: RowsLike) -> int:
    """Size of ``rows`` when it is an Arrow table or a NumPy array, bytes; 0 for Python
    objects (whose conversion a caller has already paid for in building them)."""
    return rows.nbytes if isinstance(rows, pa.Table | np.ndarray) else 0


def _plain_numeric(rows: object, spec: InputSpec) -> bool:
    """A native-endian numeric array whose rows hold the input columns' values: shape
    ``(n, len(columns))``, ``(n, *inputs.shape)`` (give or take dimensions of size 1), or
    ``(n,)`` for one column (the fast path of :func:`rows_to_table`)."""
    if not (isinstance(rows, np.ndarray) and rows.dtype.kind in "biuf" and rows.dtype.isnative):
        return False
    width = len(spec.columns)
    if rows.ndim == 1:
        return width == 1
    return math.prod(rows.shape[1:]) == width and (rows.ndim == 2 or same_shape(rows.shape[1:], spec.row_shape))


def _sequences_to_table(rows: Sequence[Sequence[Any]] | np.ndarray, columns: Sequence[str]) -> pa.Table:
    if not isinstance(rows, np.ndarray):
        for i, row in enumerate(rows):
            if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != len(columns):
                raise DatasetSchemaError(f"row {i}: expected a list of {len(columns)} values "
                                         f"(the input columns), got {row!r:.80}")
    array = np.asarray(rows, dtype=object)
    array = array.reshape(len(array), -1) if array.ndim == 1 and len(columns) > 1 else array
    array = array.reshape(-1, 1) if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] != len(columns):
        raise DatasetSchemaError(
            f"rows of shape {array.shape}: expected (rows, {len(columns)}) for the input "
            f"columns {list(columns)[:5]}{'...' if len(columns) > 5 else ''}")
    return _columns_to_table(dict(zip(columns, array.T.tolist(), strict=True)), None)


def _one_column(values: Sequence[Any] | np.ndarray, spec: InputSpec) -> pa.Array | pa.ChunkedArray:
    """The values of a one-column input (tensors, image paths or texts) as an Arrow column."""
    if spec.kind != "tensor":
        try:
            return pa.array(list(values) if isinstance(values, np.ndarray) else values, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array([None if v is None else str(v) for v in values], pa.string())
    size = spec.values_per_row
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        if math.prod(values.shape[1:]) != size:
            raise DatasetSchemaError(f"rows of shape {values.shape}: the model takes rows of shape "
                                     f"{list(spec.row_shape)} ({size} values)")
        return tensor_table(values.reshape(len(values), *spec.row_shape), spec.column).column(0)
    return _flattened(values)


def _flattened(values: Sequence[Any]) -> pa.Array:
    """Per-row tensors (arrays or nested lists) as one list of float64 values per row, so
    that a row of the wrong length fails alone on the worker (ragged or non-numeric
    nesting: an empty list, which fails as a tensor of 0 values)."""
    flat = []
    for value in values:
        if value is None:
            flat.append(None)
            continue
        try:
            row = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            flat.append([])
            continue
        flat.append(row.reshape(-1))
    return pa.array(flat, pa.list_(pa.float64()))


def _columns_to_table(columns: Mapping[str, list[Any]], spec: InputSpec | None) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if spec is not None and spec.kind != "columns" and name == spec.column:
            arrays[name] = _one_column(values, spec)
            continue
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: let the worker judge each cell
            if all(v is None or isinstance(v, list | tuple) for v in values):
                arrays[name] = _flattened(values)  # tensors nested to different depths
            else:
                arrays[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(arrays)
