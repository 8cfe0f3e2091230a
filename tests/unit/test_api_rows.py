"""In-memory rows for Client.score_rows and the API's JSON rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ml_framework.errors import DatasetSchemaError
from ml_framework.manifest import InputSpec
from producer.api import _finite
from producer.rows import rows_to_table as _rows_to_table


def rows_to_table(rows, columns):
    return _rows_to_table(rows, InputSpec(columns=columns))


def test_rows_as_dicts_frames_and_arrays():
    """Every accepted form becomes the same named columns; mixed-type columns travel as text."""
    t = rows_to_table([{"a": 1, "b": 2.5}, {"a": "x", "b": None}], ["a", "b"])
    assert t.column("a").to_pylist() == ["1", "x"] and t.column("b").to_pylist() == [2.5, None]
    arr = rows_to_table(np.arange(6.0).reshape(2, 3), ["a", "b", "c"])
    assert arr.column_names == ["a", "b", "c"] and arr.column("c").to_pylist() == [2.0, 5.0]
    frame = rows_to_table(pd.DataFrame({"a": [1.0, np.nan]}), ["a"])
    assert frame.column("a").to_pylist() == [1.0, None]  # a missing value, reported as such by the worker
    assert rows_to_table(np.array([1.0, 2.0]), ["a"]).num_rows == 2


def test_bad_row_shapes_name_the_row():
    with pytest.raises(DatasetSchemaError, match=r"row 1: expected a list of 2 values"):
        rows_to_table([[1, 2], [3]], ["a", "b"])
    with pytest.raises(DatasetSchemaError, match=r"expected \(rows, 3\)"):
        rows_to_table(np.zeros((2, 2)), ["a", "b", "c"])
    with pytest.raises(DatasetSchemaError, match="duplicate column names"):
        rows_to_table(pd.DataFrame([[1, 2]], columns=["a", "a"]), ["a"])


def test_no_rows_make_a_table_of_the_input_columns_without_rows():
    """No rows, in any form, make a table without rows (a job with nothing to score),
    not an error (regression: 'no rows to score'); a DataFrame keeps its own columns."""
    for rows in ([], (), np.zeros((0, 2)), np.zeros(0), pa.table({}), pd.DataFrame()):
        table = rows_to_table(rows, ["a", "b"])
        assert (table.num_rows, table.column_names) == (0, ["a", "b"]), rows
    assert rows_to_table(pd.DataFrame({"a": [], "c": []}), ["a", "b"]).column_names == ["a", "c"]
    tensor = _rows_to_table([], InputSpec(kind="tensor", columns=["v"], shape=[2]))
    assert (tensor.num_rows, tensor.column_names) == (0, ["v"])


def test_json_rule_turns_nan_and_infinity_into_null():
    assert _finite({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "x"}) == {
        "a": [1.0, None], "b": {"c": None}, "d": "x"}


def test_numeric_arrays_of_any_byte_order_and_dtype_become_the_same_table():
    """The NumPy fast path gives what the general path gives; a big-endian array (from a
    file written on another machine) is converted instead of failing in Arrow."""
    native = np.arange(6, dtype="<f8").reshape(2, 3)
    want = {"a": [0.0, 3.0], "b": [1.0, 4.0], "c": [2.0, 5.0]}
    assert rows_to_table(native, ["a", "b", "c"]).to_pydict() == want
    assert rows_to_table(native.astype(">f8"), ["a", "b", "c"]).to_pydict() == want
    assert rows_to_table(np.asfortranarray(native), ["a", "b", "c"]).to_pydict() == want
    assert rows_to_table(native.astype(np.int16), ["a", "b", "c"]).to_pydict() == {
        k: [int(v) for v in vals] for k, vals in want.items()}
    assert rows_to_table(np.array([[True, False, True]]), ["a", "b", "c"]).to_pydict() == {
        "a": [True], "b": [False], "c": [True]}


def test_a_flat_array_is_one_column_not_one_row():
    """As a flat list is: a 1-D array of three values for three input columns is refused,
    whatever its dtype."""
    with pytest.raises(DatasetSchemaError, match=r"expected \(rows, 3\)"):
        rows_to_table(np.array([1.0, 2.0, 3.0]), ["a", "b", "c"])
    with pytest.raises(DatasetSchemaError, match=r"expected \(rows, 3\)"):
        rows_to_table(np.array([1.0, 2.0, 3.0], dtype=">f8"), ["a", "b", "c"])
