"""NumPy ``.npy`` datasets: one array of shape ``(N, *row_shape)``, one row per entry of its
first axis.

The file is memory-mapped (``allow_pickle=False``: arrays of Python objects are refused)
and a row range is handed out as an Arrow ``fixed_shape_tensor`` column named
:data:`NPY_COLUMN` that shares the mapped pages: nothing is copied until the worker
stages a batch for the device. An ``.npy`` object is not mapped: its header is read, then
only the bytes of the rows asked for (one ranged GET per piece).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ml_framework.datasets.common import DatasetInfo, reading, slices
from ml_framework.datasets.source import Source
from ml_framework.errors import DatasetFormatError
from ml_framework.tensors import row_shape, tensor_table

NPY_COLUMN = "array"
"""The one column of an ``.npy`` dataset."""


HEADER_READ_BYTES = 64 << 10
"""Bytes read from the start of an ``.npy`` object to parse its header (NumPy pads headers
to 64 bytes; one longer than this is read again in full)."""


@dataclass(frozen=True)
class _Header:
    """An ``.npy`` object's array, described: what :func:`np.load` gives, without the data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # bytes before the first row

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _header(path: Source) -> _Header:
    """The header of an ``.npy`` object (format versions 1 to 3).

    Raises:
        DatasetFormatError: not an ``.npy`` file, or an array in Fortran order (its rows are
            not contiguous: save it with ``np.save`` of a C-ordered array).
    """
    fmt = np.lib.format
    with reading(path, "read as a .npy array"), path.open_file() as f:
        head = io.BytesIO(f.read(HEADER_READ_BYTES))
        try:
            version = fmt.read_magic(head)
            reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if reader is None:  # 3.0: a UTF-8 header, laid out as 2.0
                reader = fmt.read_array_header_2_0
                head.seek(8)
            shape, fortran, dtype = reader(head, max_header_size=HEADER_READ_BYTES)
        except (ValueError, EOFError) as exc:
            raise DatasetFormatError(f"{path}: cannot read as a .npy array: {exc}") from exc
    if fortran and len(shape) > 1:
        raise DatasetFormatError(f"{path}: a .npy object in Fortran order cannot be read by row range; "
                                 "save it C-ordered (np.save(np.ascontiguousarray(a)))")
    return _Header(tuple(shape), np.dtype(dtype), head.tell())


def _check(path: Source, array: np.ndarray | _Header) -> None:
    """Refuse an array that is not numbers in rows. Raises :class:`DatasetFormatError`."""
    if array.dtype.kind not in "biuf" or array.dtype.fields is not None:
        raise DatasetFormatError(f"{path}: a .npy dataset holds numbers (bool, integers or floats), "
                                 f"this one holds {array.dtype}")
    if array.ndim == 0:
        raise DatasetFormatError(f"{path}: a .npy dataset is an array of rows, shape (N, ...); this one is a scalar")


def _load(path: Source) -> np.ndarray | _Header:
    """The mapped array of a local file; the header of an object. Raises
    :class:`DatasetFormatError` naming the file."""
    if path.local is None:
        header = _header(path)
        _check(path, header)
        return header
    try:
        # copy-on-write: a model that writes into its input changes private pages, never
        # the file, and never faults on a read-only mapping
        array = np.load(path.local, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: cannot read as a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise DatasetFormatError(f"{path}: a .npy dataset holds numbers (bool, integers or floats), "
                                 f"this one holds {type(array).__name__}")
    _check(path, array)
    return array


def npy_type(array: np.ndarray | _Header) -> pa.DataType:
    """The Arrow type of one row of ``array``: a fixed-shape tensor of its dtype."""
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(array.dtype.newbyteorder("=")), row_shape(array))


def inspect_npy(path: Source) -> DatasetInfo:
    """Shape and dtype of an ``.npy`` file, from its header."""
    array = _load(path)
    schema = pa.schema([(NPY_COLUMN, npy_type(array))])
    return DatasetInfo(path.shown, "npy", [NPY_COLUMN], int(array.shape[0]), schema=schema, source=path)


def npy_pieces(path: Source, row_start: int, row_end: int, piece_rows: int) -> Iterator[pa.Table]:
    """Rows ``[row_start, row_end)`` as consecutive one-column tables of at most
    ``piece_rows`` rows.

    Raises:
        DatasetFormatError: the file is not a numeric array, or holds fewer rows.
    """
    array = _load(path)
    if array.shape[0] < row_end:
        raise DatasetFormatError(f"{path}: expected rows {row_start}-{row_end} but the file has only {array.shape[0]}")
    if isinstance(array, np.ndarray):
        for a in range(row_start, row_end, piece_rows):
            yield from slices(tensor_table(array[a:min(a + piece_rows, row_end)], NPY_COLUMN), piece_rows)
        return
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    with reading(path, f"read rows {row_start}-{row_end}"), path.open_file() as f:
        for a in range(row_start, row_end, piece_rows):
            b = min(a + piece_rows, row_end)
            data = f.read_at((b - a) * row_bytes, array.offset + a * row_bytes)
            if len(data) != (b - a) * row_bytes:
                raise DatasetFormatError(f"{path}: expected rows {a}-{b} but the object ends before them")
            rows = np.frombuffer(data, dtype=array.dtype).reshape((b - a, *array.shape[1:])).copy()
            yield tensor_table(rows, NPY_COLUMN)
