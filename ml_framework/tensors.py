"""Tensors in Arrow: how a column holds one tensor per row, and whether it fits a model.

A tensor column is an Arrow ``fixed_size_list`` (what a column of NumPy rows becomes in
Parquet and Arrow files), the ``arrow.fixed_shape_tensor`` extension type (which also
records the shape), or a variable ``list`` whose rows must then have the right length.
Producers use these checks to refuse a file whose column can never feed a model before
anything is sent; workers use them when converting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def row_shape(array: np.ndarray) -> tuple[int, ...]:
    """The per-row shape of an ``(N, ...)`` array (``(1,)`` for an ``(N,)`` array)."""
    return tuple(array.shape[1:]) or (1,)


def same_shape(a: Sequence[int], b: Sequence[int]) -> bool:
    """True when two per-row shapes differ at most by dimensions of size 1 (``(8, 8)``
    rows feed a ``(1, 8, 8)`` input; ``(32, 32, 3)`` rows do not feed ``(3, 32, 32)``)."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def tensor_table(array: np.ndarray, name: str) -> pa.Table:
    """``(n, *row_shape)`` rows as a table of one ``fixed_shape_tensor`` column, sharing
    ``array``'s memory where it is C-contiguous and native-endian."""
    rows = np.ascontiguousarray(array.reshape(len(array), *row_shape(array)))
    if not rows.dtype.isnative:
        rows = rows.astype(rows.dtype.newbyteorder("="))
    return pa.table({name: pa.FixedShapeTensorArray.from_numpy_ndarray(rows)})


NUMERIC = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)


def storage(chunk: pa.Array) -> pa.Array:
    """The plain Arrow array under an extension array (a fixed-shape tensor's list)."""
    return chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk


def element_type(kind: pa.DataType) -> pa.DataType | None:
    """The value type of a list-like column type (extension types unwrapped), or ``None``
    for a type that is not a list."""
    if isinstance(kind, pa.BaseExtensionType):
        kind = kind.storage_type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return kind.value_type
    return None


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def leaf_type(kind: pa.DataType) -> pa.DataType | None:
    """The type of the values at the bottom of a (nested) list-like column type, or
    ``None`` for a type that is not a list."""
    value = element_type(kind)
    while value is not None and _is_list(value):
        value = value.value_type
    return value


def flat_rows(arr: pa.Array) -> pa.Array:
    """A list column whose rows are nested lists (a tensor as nested lists, as JSON gives
    it: ``[[1, 2], [3, 4]]``) as a list column of each row's values, in row-major order
    (``[1, 2, 3, 4]``); a column of flat lists is returned as it is.

    Null rows stay null; a null inner list counts as no values (the row's length is then
    wrong, and it fails as such).
    """
    arr = storage(arr)
    while _is_list(arr.type) and _is_list(arr.type.value_type):
        if not pa.types.is_list(arr.type):
            arr = arr.cast(pa.list_(arr.type.value_type))
        inner = arr.values
        if not pa.types.is_list(inner.type):
            inner = inner.cast(pa.list_(inner.type.value_type))
        starts = pc.take(inner.offsets, arr.offsets)
        arr = pa.ListArray.from_arrays(starts, inner.values, mask=arr.is_null() if arr.null_count else None)
    return arr


def describe_mismatch(kind: pa.DataType, shape: Sequence[int]) -> str | None:
    """Why a column of type ``kind`` can never feed tensors of ``shape`` (a list of another
    length, a tensor of another shape, values that are not numbers), or ``None`` when it
    can (variable lists are judged row by row). Shapes that differ only by dimensions of
    size 1 fit (``(8, 8)`` images feed a ``(1, 8, 8)`` input); others are refused even with
    as many values (``(32, 32, 3)`` is not ``(3, 32, 32)``)."""
    size = math.prod(shape)
    value = leaf_type(kind)
    if value is None:
        return f"holds {kind}, not tensors (a fixed_size_list, fixed_shape_tensor or list column)"
    if not any(test(value) for test in NUMERIC):
        return f"holds tensors of {value}, not numbers"
    if _is_list(element_type(kind)):
        return None  # nested lists: each row's length is judged on its own
    if isinstance(kind, pa.FixedShapeTensorType):
        their = list(kind.shape)
        if kind.permutation is not None and list(kind.permutation) != sorted(kind.permutation):
            return f"holds tensors of shape {their} stored with permutation {list(kind.permutation)}; store them in row-major order"
        if not same_shape(their, shape):
            return f"holds tensors of shape {their}, the model takes {list(shape)}"
        return None
    storage_type = kind.storage_type if isinstance(kind, pa.BaseExtensionType) else kind
    if pa.types.is_fixed_size_list(storage_type) and storage_type.list_size != size:
        return f"holds lists of {storage_type.list_size} values, the model takes {size} (shape {list(shape)})"
    return None
