"""``tensor`` inputs: one column holding a whole tensor per row.

Accepted column types: Arrow ``fixed_size_list`` (what NumPy arrays of rows become in
Parquet and Arrow files), the ``arrow.fixed_shape_tensor`` extension type (``.npy``
datasets and in-memory arrays arrive as such), and variable ``list`` / ``large_list``
columns whose rows have the right length, nested lists included (a tensor as nested
lists, as JSON gives it, is taken in row-major order). The values are taken from the column's buffer
without copying where the layout allows (one chunk, no nulls, the manifest's dtype) and
reshaped to ``inputs.shape``. Row errors: a null tensor, a tensor of the wrong length, a
missing or non-finite value; the row's other tensors are not affected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ml_framework.store import RowError
from ml_framework.tensors import describe_mismatch, flat_rows, storage
from worker.inputs.base import Converted, InputConverter, non_finite_reason


class TensorConverter(InputConverter):
    """One tensor column -> ``(n, *inputs.shape)`` (see the module docstring)."""

    def _convert(self, table: pa.Table, columns: Sequence[str], row_start: int) -> Converted:
        """See :meth:`InputConverter.convert`."""
        name = columns[0]
        column = table.column(name)
        n = table.num_rows
        size = self.spec.values_per_row
        problem = describe_mismatch(column.type, self.spec.row_shape)
        rows = np.arange(row_start, row_start + n, dtype=np.int64)
        bad: dict[int, RowError] = {}
        if problem is not None:
            for i in range(n):
                bad[i] = RowError(row_start + i, f"row {row_start + i}, field {name!r}: {problem}", name)
            return Converted(self.example(0), rows[:0], [bad[i] for i in range(n)], n)
        parts, offset = [], 0
        for chunk in column.chunks:
            parts.append(self._chunk(flat_rows(storage(chunk)), name, row_start + offset, offset, size, bad))
            offset += len(chunk)
        flat = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else np.zeros(0, self.spec.dtype))
        x = flat.reshape((n, *self.spec.row_shape))
        return self.finish(x, rows, bad, row_start, n)

    def _chunk(self, arr: pa.Array, name: str, first_row: int, first_index: int, size: int,
               bad: dict[int, RowError]) -> np.ndarray:
        """The values of one chunk as a flat array of ``len(arr) * size`` values (rows that
        fail hold zeros), recording the rows that fail in ``bad``."""
        n = len(arr)

        def fail(j: int, reason: str) -> None:
            bad.setdefault(first_index + j, RowError(first_row + j, f"row {first_row + j}, field {name!r}: {reason}", name))

        null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(n, dtype=bool)
        for j in np.flatnonzero(null):
            fail(int(j), "missing tensor (null)")
        if pa.types.is_fixed_size_list(arr.type):
            flat, missing = self._numbers(arr.values.slice(arr.offset * size, n * size))
        else:
            lengths = pc.list_value_length(arr).fill_null(size).to_numpy(zero_copy_only=False)
            for j in np.flatnonzero(lengths != size):
                fail(int(j), f"a tensor of {int(lengths[j])} values, the model takes {size} "
                             f"(shape {list(self.spec.row_shape)})")
            good = (lengths == size) & ~null
            offsets = np.asarray(arr.offsets)
            if good.all() and offsets[-1] - offsets[0] == n * size:
                flat, missing = self._numbers(arr.values.slice(int(offsets[0]), n * size))
            else:  # gather the good rows; the others stay zeros
                values, missing_values = self._numbers(arr.values)
                index = (offsets[:-1][good][:, None] + np.arange(size)).reshape(-1)
                flat = np.zeros(n * size, dtype=values.dtype)
                flat.reshape(n, size)[good] = values[index].reshape(-1, size)
                missing = None
                if missing_values is not None:
                    missing = np.zeros(n * size, dtype=bool)
                    missing.reshape(n, size)[good] = missing_values[index].reshape(-1, size)
        if missing is not None and not self.spec.allow_missing:
            for j in np.flatnonzero(missing.reshape(n, size).any(axis=1)):
                fail(int(j), f"missing value inside the tensor (index {int(np.flatnonzero(missing.reshape(n, size)[j])[0])})")
        self._non_finite(flat, n, size, fail)
        return flat

    def _numbers(self, values: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """Arrow values as a flat NumPy array of the input dtype (a view where the buffer
        already is one), and the mask of null values (``None`` when there are none).
        Null values read as NaN (float inputs) or 0."""
        if pa.types.is_boolean(values.type):
            values = pc.cast(values, pa.int8())
        dtype = np.dtype(self.spec.dtype)
        missing = values.is_null().to_numpy(zero_copy_only=False) if values.null_count else None
        if missing is not None:
            values = values.fill_null(0)
        flat = values.to_numpy(zero_copy_only=False)
        flat = flat if flat.dtype == dtype else flat.astype(dtype)
        if missing is not None and dtype.kind == "f":
            flat = flat.copy() if not flat.flags.writeable else flat
            flat[missing] = np.nan
        return flat, missing

    def _non_finite(self, flat: np.ndarray, n: int, size: int, fail) -> None:
        """Fail the rows holding an infinity, or a NaN the manifest does not allow (NaN from
        a null value was reported as missing already)."""
        if flat.dtype.kind != "f" or not n:
            return
        rowwise = flat.reshape(n, size)
        for j in np.flatnonzero(~np.isfinite(np.add.reduce(rowwise, axis=1))):
            row = rowwise[j]
            odd = np.isinf(row) if self.spec.allow_missing else ~np.isfinite(row)
            if odd.any():
                fail(int(j), f"not finite ({non_finite_reason(row)})")
