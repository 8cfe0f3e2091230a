"""``columns`` inputs: numeric dataset columns, one value each, reshaped to ``inputs.shape``.

Columns stored as numbers (Parquet, Arrow) are copied straight into the input array and
checked for finiteness once per row (:func:`~worker.inputs.base.finite_rows`); text
columns (CSV cells, mixed-type columns) are parsed per cell so that one bad cell fails
one row, naming the row and the field.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ml_framework.store import RowError
from worker.inputs.base import Converted, InputConverter, show

# Text that stands for a missing value, not a typo: the CSV reader's null spellings (so a
# Parquet or inline string column reads as a CSV file does) and whatever float() takes for NaN.
_NULL_TEXT = frozenset(pa_csv.ConvertOptions().null_values)
_NAN_TEXT = frozenset({"nan", "+nan", "-nan"})


def _plain_numbers(arr: pa.ChunkedArray) -> np.ndarray | None:
    """A column of integers, floats or booleans without nulls as a NumPy array (a view of
    the Arrow buffer where it is one chunk), else ``None``."""
    kind = arr.type
    if arr.null_count or not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        return None
    if pa.types.is_boolean(kind):
        arr = pc.cast(arr, pa.int8())
    return arr.to_numpy()


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
              or pa.types.is_null(kind) or pa.types.is_decimal(kind)):
        return pd.Series([None] * len(arr), dtype=object), invalid, f"column type {kind} is not numeric"
    return arr.to_pandas(), invalid, None


def _null_text(raw: pd.Series, col: np.ndarray) -> np.ndarray:
    """Mask of the text cells of ``raw`` that spell a missing value (``NaN``, ``NA``, ``null``, ...)."""
    mask = np.zeros(len(col), dtype=bool)
    for i in np.flatnonzero(np.isnan(col) & raw.notna().to_numpy()):  # only cells that are not numbers
        value = raw.iloc[i]
        mask[i] = isinstance(value, str) and (value in _NULL_TEXT or value.strip().lower() in _NAN_TEXT)
    return mask


BLOCK_COLUMNS = 256
"""Columns copied into the row-major input together (see :func:`_rows_of`)."""
WIDE_COLUMNS = 256
WIDE_PIECE_ROWS = 4096
"""Rows per piece at least when a model reads :data:`WIDE_COLUMNS` columns or more: the
cost per column per piece (a few microseconds) is then spread over enough rows."""


def _rows_of(columns: list[np.ndarray], n: int, dtype: np.dtype) -> np.ndarray:
    """``(n, len(columns))`` row-major array of the columns.

    Column ``j`` goes to every ``j``-th value of a row: written one column at a time, each
    value lands on another cache line (3,072 image columns: 400 ms for 5,120 rows here).
    Instead, blocks of :data:`BLOCK_COLUMNS` columns are stacked contiguously and
    transposed into place as one block (124 ms for the same rows).
    """
    values = np.empty((n, len(columns)), dtype=dtype)
    block = np.empty((min(BLOCK_COLUMNS, len(columns)), n), dtype=dtype)
    for j in range(0, len(columns), BLOCK_COLUMNS):
        group = columns[j:j + BLOCK_COLUMNS]
        for i, col in enumerate(group):
            block[i] = col
        values[:, j:j + len(group)] = block[:len(group)].T
    return values


class ColumnsConverter(InputConverter):
    """Numeric columns -> ``(n, *inputs.shape)`` (see the module docstring).

    Empty cells and text spelling a missing value (``NaN``, ``NA``, ``null``: the CSV
    reader's null spellings) are missing values: rejected unless ``inputs.allow_missing``
    (then NaN); infinities and other text are always rejected.
    """

    def _convert(self, table: pa.Table, columns: Sequence[str], row_start: int) -> Converted:
        """See :meth:`InputConverter.convert`; errors name the first bad field of a row."""
        n, spec = table.num_rows, self.spec
        staging = np.dtype(np.float64 if spec.dtype in ("float64", "int64") else np.float32)
        if spec.dtype.startswith("float") and not self.preprocessing.affine:
            staging = np.dtype(spec.dtype)
        bad: dict[int, RowError] = {}
        selected = table.select(list(columns)).columns  # by position: a lookup by name per column is O(columns)
        # non-finite floats of plain number columns are found per row, below
        parts = []
        for arr, name in zip(selected, columns, strict=True):
            plain = _plain_numbers(arr)
            parts.append(plain if plain is not None else self._parse(arr, name, row_start, bad))
        values = _rows_of(parts, n, staging)
        rows = np.arange(row_start, row_start + n, dtype=np.int64)
        self._name_non_finite(values, columns, rows, bad)
        x = values.reshape((n, *spec.row_shape))
        return self.finish(x, rows, bad, row_start, n)

    def piece_rows(self, batch_size: int) -> int:
        """As the base class, but at least :data:`WIDE_PIECE_ROWS` rows for wide inputs."""
        rows = super().piece_rows(batch_size)
        if len(self.spec.columns) >= WIDE_COLUMNS:
            rows = max(rows, -(-WIDE_PIECE_ROWS // batch_size) * batch_size)
        return rows

    def _name_non_finite(self, values: np.ndarray, columns: Sequence[str], rows: np.ndarray,
                         bad: dict[int, RowError]) -> None:
        """Reject the rows holding a NaN or infinity that came from a numeric column (NaN
        kept where ``allow_missing``), naming the first such field."""
        sums = np.add.reduce(values, axis=1) if values.size else np.zeros(len(values))
        for i in np.flatnonzero(~np.isfinite(sums)):
            if int(i) in bad:
                continue
            row = values[i]
            odd = np.isinf(row) if self.spec.allow_missing else ~np.isfinite(row)
            if not odd.any():
                continue  # NaN allowed, or finite values whose sum overflowed
            j = int(np.flatnonzero(odd)[0])
            what = "missing value" if np.isnan(row[j]) else f"{show(float(row[j]))} is not finite"
            bad[int(i)] = RowError(int(rows[i]), f"row {int(rows[i])}, field {columns[j]!r}: {what}", columns[j])

    def _parse(self, arr: pa.ChunkedArray, name: str, row_start: int, bad: dict[int, RowError]) -> np.ndarray:
        """A column that is text, has nulls or holds another type, parsed cell by cell:
        float64 values (NaN where a cell is missing or bad) and ``bad`` extended with the
        rows whose cell is not a number (the first bad field of a row wins)."""
        n, spec = len(arr), self.spec
        raw, invalid, type_error = _column(arr)
        if type_error:
            for i in range(n):
                bad.setdefault(i, RowError(row_start + i, f"row {row_start + i}, field {name!r}: {type_error}", name))
            return np.zeros(n)
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
        present = raw.notna().to_numpy()
        if spec.allow_missing:
            problem = (~finite & present & ~np.isnan(col)) | (present & np.isnan(col) & ~null_text)
        else:
            problem = ~finite
        for i in np.flatnonzero(problem):
            if i in bad:
                continue
            original = raw.iloc[i]
            if original is None or (isinstance(original, float) and np.isnan(original)) or original is pd.NA:
                msg = f"row {row_start + i}, field {name!r}: missing value"
            elif null_text[i]:
                msg = f"row {row_start + i}, field {name!r}: missing value ({show(original)})"
            elif np.isnan(col[i]):
                msg = f"row {row_start + i}, field {name!r}: {show(original)} is not a number"
            else:
                msg = f"row {row_start + i}, field {name!r}: {show(original)} is not finite"
            bad[int(i)] = RowError(row_start + int(i), msg, name)
        return np.where(problem, 0.0, col) if not spec.allow_missing else np.where(np.isinf(col), 0.0, col)
