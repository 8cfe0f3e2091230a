"""NumPy ``.npy`` datasets: one array of shape ``(N, *row_shape)``, one row per entry of its
first axis.

The file is memory-mapped (``allow_pickle=False``: arrays of Python objects are refused)
and a row range is handed out as an Arrow ``fixed_shape_tensor`` column named
:data:`NPY_COLUMN` that shares the mapped pages: nothing is copied until the worker
stages a batch for the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ml_framework.datasets.common import DatasetInfo, slices
from ml_framework.errors import DatasetFormatError

NPY_COLUMN = "array"
"""The one column of an ``.npy`` dataset."""


def _load(path: Path) -> np.ndarray:
    """The mapped array. Raises :class:`DatasetFormatError` naming the file."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: cannot read as a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or array.dtype.fields is not None:
        raise DatasetFormatError(f"{path}: a .npy dataset holds numbers (bool, integers or floats), "
                                 f"this one holds {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim == 0:
        raise DatasetFormatError(f"{path}: a .npy dataset is an array of rows, shape (N, ...); this one is a scalar")
    return array


def _row_shape(array: np.ndarray) -> tuple[int, ...]:
    return tuple(array.shape[1:]) or (1,)


def npy_type(array: np.ndarray) -> pa.DataType:
    """The Arrow type of one row of ``array``: a fixed-shape tensor of its dtype."""
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(array.dtype.newbyteorder("=")), _row_shape(array))


def inspect_npy(path: Path) -> DatasetInfo:
    """Shape and dtype of an ``.npy`` file, from its header."""
    array = _load(path)
    schema = pa.schema([(NPY_COLUMN, npy_type(array))])
    return DatasetInfo(path, "npy", [NPY_COLUMN], int(array.shape[0]), schema=schema)


def tensor_table(array: np.ndarray, name: str = NPY_COLUMN) -> pa.Table:
    """``(n, *row_shape)`` rows as a table of one ``fixed_shape_tensor`` column, sharing
    ``array``'s memory where it is C-contiguous and native-endian."""
    rows = np.ascontiguousarray(array.reshape(len(array), *_row_shape(array)))
    if not rows.dtype.isnative:
        rows = rows.astype(rows.dtype.newbyteorder("="))
    return pa.table({name: pa.FixedShapeTensorArray.from_numpy_ndarray(rows)})


def npy_pieces(path: Path, row_start: int, row_end: int, piece_rows: int) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` as consecutive one-column tables of at most
    ``piece_rows`` rows.

    Raises:
        DatasetFormatError: the file is not a numeric array, or holds fewer rows.
    """
    array = _load(path)
    if array.shape[0] < row_end:
        raise DatasetFormatError(f"{path}: expected rows {row_start}-{row_end} but the file has only {array.shape[0]}")
    for a in range(row_start, row_end, piece_rows):
        yield from slices(tensor_table(array[a:min(a + piece_rows, row_end)]), piece_rows)
