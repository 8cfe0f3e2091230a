"""Turn a shard's Arrow table into the model's input tensor, one row error per bad row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ml_framework.manifest import InputSpec, Preprocessing
from ml_framework.store import RowError

_MAX_VALUE_CHARS = 40
# Text that stands for a missing value, not a typo: the CSV reader's null spellings (so a
# Parquet or inline string column reads as a CSV file does) and whatever float() takes for NaN.
_NULL_TEXT = frozenset(pa_csv.ConvertOptions().null_values)
_NAN_TEXT = frozenset({"nan", "+nan", "-nan"})


def _show(value: object) -> str:
    if isinstance(value, np.generic):  # NumPy 2 reprs scalars as np.float64(inf)
        value = value.item()
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "...'"


def _column(arr: pa.ChunkedArray) -> tuple[pd.Series, np.ndarray, str | None]:
    """A column as a pandas Series, a mask of cells that are not valid UTF-8, and a reason
    if the column's type can never be a number."""
    invalid = np.zeros(len(arr), dtype=bool)
    kind = arr.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        # Parquet writers need not validate UTF-8: re-check it like raw CSV bytes.
        arr = pc.cast(arr, pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
        kind = arr.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            arr = pc.cast(arr, pa.string())
        except pa.ArrowInvalid:  # some cell is not UTF-8: decode cell by cell
            values = []
            for i, cell in enumerate(arr.to_pylist()):
                if cell is None:
                    values.append(None)
                    continue
                try:
                    values.append(cell.decode("utf-8"))
                except UnicodeDecodeError:
                    invalid[i] = True
                    values.append(None)
            return pd.Series(values, dtype=object), invalid, None
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
              or pa.types.is_null(kind)
              or pa.types.is_decimal(kind)):
        return pd.Series([None] * len(arr), dtype=object), invalid, f"column type {kind} is not numeric"
    return arr.to_pandas(), invalid, None


def _null_text(raw: pd.Series, col: np.ndarray) -> np.ndarray:
    """Mask of the text cells of ``raw`` that spell a missing value (``NaN``, ``NA``, ``null``, ...)."""
    mask = np.zeros(len(col), dtype=bool)
    for i in np.flatnonzero(np.isnan(col) & raw.notna().to_numpy()):  # only cells that are not numbers
        value = raw.iloc[i]
        mask[i] = isinstance(value, str) and (value in _NULL_TEXT or value.strip().lower() in _NAN_TEXT)
    return mask


def _numeric_column(arr: pa.ChunkedArray) -> np.ndarray | None:
    """A numeric column as float64 (nulls as NaN), without pandas; ``None`` for other types."""
    kind = arr.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        return None
    if pa.types.is_boolean(kind):
        arr = pc.cast(arr, pa.int8())
    return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def to_inputs(
    table: pa.Table,
    columns: Sequence[str],
    spec: InputSpec,
    preprocessing: Preprocessing,
    row_start: int,
) -> tuple[np.ndarray, np.ndarray, list[RowError]]:
    """Convert rows to a model input, isolating the rows that cannot be converted.

    Args:
        table: the shard's rows; ``columns`` must be present (strings or numbers).
        columns: dataset columns in the order of ``spec.columns``.
        spec: the model's input spec (dtype, per-row shape, missing-value policy).
        preprocessing: ``x * scale + shift``, applied after conversion.
        row_start: dataset row number of the table's first row (for error messages).

    Returns:
        ``(x, rows, errors)``: ``x`` of shape ``(n_ok, *spec.row_shape)`` and dtype
        ``spec.dtype``; ``rows`` (n_ok,) int64 dataset row numbers of ``x``'s rows;
        ``errors``: one :class:`RowError` per rejected row, naming the first bad field.
        Empty cells and text spelling a missing value (``NaN``, ``NA``, ``null``: the
        CSV reader's null spellings) are missing values: rejected unless
        ``spec.allow_missing`` (then NaN); infinities and other text are always rejected.
    """
    n = table.num_rows
    values = np.empty((n, len(columns)), dtype=np.float64, order="F")  # filled column by column
    bad: dict[int, RowError] = {}
    selected = table.select(list(columns)).columns  # by position: a lookup by name per column is O(columns)
    for j, name in enumerate(columns):
        arr = selected[j]
        if pa.types.is_integer(arr.type) and arr.null_count == 0:
            values[:, j] = arr.to_numpy()  # integers without nulls: always finite (image pixels)
            continue
        fast = _numeric_column(arr)
        if fast is not None and (np.isfinite(fast).all() or (spec.allow_missing and not np.isinf(fast).any())):
            values[:, j] = fast  # the common case: a numeric column with nothing to report
            continue
        raw, invalid, type_error = _column(arr)
        if type_error:
            for i in range(n):
                bad.setdefault(i, RowError(row_start + i, f"row {row_start + i}, field {name!r}: {type_error}", name))
            continue
        for i in np.flatnonzero(invalid):
            bad.setdefault(int(i), RowError(row_start + int(i),
                                            f"row {row_start + int(i)}, field {name!r}: not valid UTF-8 text", name))
        if raw.dtype == object or pd.api.types.is_string_dtype(raw.dtype):
            numeric = pd.to_numeric(raw, errors="coerce")
        else:
            numeric = raw.astype("float64")
        numeric[invalid] = 0.0  # already failed above; keep it out of the checks below
        col = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(col)
        null_text = _null_text(raw, col)
        if spec.allow_missing:
            problem = ~finite & raw.notna().to_numpy() & ~np.isnan(col)  # infinities
            unparsable = raw.notna().to_numpy() & np.isnan(col) & ~null_text
            problem |= unparsable
        else:
            problem = ~finite
        for i in np.flatnonzero(problem):
            if i in bad:
                continue
            original = raw.iloc[i]
            if original is None or (isinstance(original, float) and np.isnan(original)) or original is pd.NA:
                msg = f"row {row_start + i}, field {name!r}: missing value"
            elif null_text[i]:
                msg = f"row {row_start + i}, field {name!r}: missing value ({_show(original)})"
            elif np.isnan(col[i]):
                msg = f"row {row_start + i}, field {name!r}: {_show(original)} is not a number"
            else:
                msg = f"row {row_start + i}, field {name!r}: {_show(original)} is not finite"
            bad[int(i)] = RowError(row_start + int(i), msg, name)
        values[:, j] = col
    keep = np.ones(n, dtype=bool)
    keep[list(bad)] = False
    x = values[keep] if bad else values
    if preprocessing.scale != 1.0 or preprocessing.shift != 0.0:
        x = x * preprocessing.scale + preprocessing.shift
    x = np.ascontiguousarray(x, dtype=spec.dtype).reshape((x.shape[0], *spec.row_shape))
    rows = np.flatnonzero(keep).astype(np.int64) + row_start
    return x, rows, [bad[i] for i in sorted(bad)]
