"""In-memory rows for Client.score_rows and the API's JSON rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml_framework.errors import DatasetError, DatasetSchemaError
from producer.api import _finite
from producer.client import rows_to_table


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
    with pytest.raises(DatasetError, match="no rows"):
        rows_to_table(pd.DataFrame({"a": []}), ["a"])


def test_json_rule_turns_nan_and_infinity_into_null():
    assert _finite({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "x"}) == {
        "a": [1.0, None], "b": {"c": None}, "d": "x"}
