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
from ml_framework.tensors import row_shape, tensor_table

NPY_COLUMN = "array"
"""The one column of an ``.npy`` dataset."""


def _load(path: Path) -> np.ndarray:
    """The mapped array. Raises :class:`DatasetFormatError` naming the file."""
    try:
        # copy-on-write: a model that writes into its input changes private pages, never
        # the file, and never faults on a read-only mapping
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: cannot read as a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or array.dtype.fields is not None:
        raise DatasetFormatError(f"{path}: a .npy dataset holds numbers (bool, integers or floats), "
                                 f"this one holds {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim == 0:
        raise DatasetFormatError(f"{path}: a .npy dataset is an array of rows, shape (N, ...); this one is a scalar")
    return array


def npy_type(array: np.ndarray) -> pa.DataType:
    """The Arrow type of one row of ``array``: a fixed-shape tensor of its dtype."""
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(array.dtype.newbyteorder("=")), row_shape(array))


def inspect_npy(path: Path) -> DatasetInfo:
    """Shape and dtype of an ``.npy`` file, from its header."""
    array = _load(path)
    schema = pa.schema([(NPY_COLUMN, npy_type(array))])
    return DatasetInfo(path, "npy", [NPY_COLUMN], int(array.shape[0]), schema=schema)


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
        yield from slices(tensor_table(array[a:min(a + piece_rows, row_end)], NPY_COLUMN), piece_rows)
