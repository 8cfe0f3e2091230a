"""In-memory rows for Client.score_rows and the API's JSON rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ml_framework.errors import DatasetSchemaError
from ml_framework.manifest import InputSpec
from producer.api.schemas import finite
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
    assert finite({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "x"}) == {
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


def test_http_job_of_no_rows_succeeds_with_its_output_columns(tmp_path):
    """POST /v1/jobs with ``"rows": []``: 202, a job SUCCEEDED at once (no worker runs
    here), progress 1.0, and its CSV and Parquet downloads hold the model's output
    columns without rows (regression: 422, at least 1 row); a predict request of no rows
    is answered with none. Rows without a single field are refused naming the columns
    the model needs."""
    import io

    import pyarrow.parquet as pq
    import yaml
    from fastapi.testclient import TestClient

    from ml_framework.settings import load_settings
    from producer.api import create_app

    version = tmp_path / "models" / "reg" / "1"
    version.mkdir(parents=True)
    (version / "manifest.yaml").write_text(yaml.safe_dump({
        "name": "reg", "version": 1, "framework": "sklearn", "artifact": "model.skops",
        "inputs": {"columns": ["a", "b"]}, "outputs": {"kind": "regression"}}))
    (tmp_path / "data").mkdir()
    key = {"X-API-Key": "k-0123456789abcdef0123"}
    settings = load_settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", var_dir=tmp_path / "var",
                             bulk_queue="mlf.rows.bulk", online_queue="mlf.rows.online",
                             api_keys={"me": key["X-API-Key"]})
    with TestClient(create_app(settings)) as http:
        r = http.post("/v1/jobs", json={"model": "reg", "rows": []}, headers=key)
        assert r.status_code == 202, r.text
        job = http.get(f"/v1/jobs/{r.json()['job_id']}", headers=key).json()
        assert (job["state"], job["n_rows"], job["n_shards"], job["progress"]) == ("SUCCEEDED", 0, 0, 1.0)
        url = f"/v1/jobs/{job['job_id']}/results"
        assert http.get(url, headers=key).json()["rows"] == []
        table = pq.read_table(io.BytesIO(http.get(url, params={"format": "parquet"}, headers=key).content))
        assert table.num_rows == 0 and table.schema.names == ["row", "prediction", "error", "error_field"]
        assert str(table.schema.field("prediction").type) == "double"
        csv = http.get(url, params={"format": "csv"}, headers=key).text
        assert csv.splitlines() == ['"row","prediction","error","error_field"']
        r = http.post("/v1/models/reg/predict", json={"rows": []}, headers=key)
        assert r.status_code == 200 and r.json()["rows"] == [], r.text
        r = http.post("/v1/jobs", json={"model": "reg", "rows": [{}, {}]}, headers=key)
        assert r.status_code in (400, 422) and "missing column(s) 'a', 'b'" in r.text, r.text
