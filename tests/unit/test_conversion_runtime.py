"""Row conversion and the shared runtime code: row errors, batch isolation, output records."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ml_framework.manifest import InputSpec, ModelManifest, OutputSpec, Preprocessing
from tests.conversion import to_inputs
from worker.outputs import BatchContractError, decode_outputs
from worker.runtimes.base import Runtime


def test_to_inputs_converts_scales_and_reshapes():
    """String cells become numbers, are scaled, and rows take the per-row shape."""
    table = pa.table({"a": ["1", "2"], "b": ["3", "4"], "c": ["5", "6"], "d": ["7", "8"]})
    spec = InputSpec(columns=["a", "b", "c", "d"], shape=[2, 2])
    x, rows, errors = to_inputs(table, spec.columns, spec, Preprocessing(scale=0.5, shift=1), 10)
    assert errors == [] and rows.tolist() == [10, 11]
    assert x.dtype == np.float32 and x.shape == (2, 2, 2)
    np.testing.assert_array_equal(x[1], [[2.0, 3.0], [4.0, 5.0]])


def test_to_inputs_isolates_bad_rows_naming_row_and_field():
    """Non-numeric, empty and infinite cells fail only their rows, each error naming row and field."""
    table = pa.table({"a": ["1", "oops", "3", "4"], "b": [1.0, 2.0, None, float("inf")]})
    spec = InputSpec(columns=["a", "b"])
    x, rows, errors = to_inputs(table, ["a", "b"], spec, Preprocessing(), 100)
    assert rows.tolist() == [100] and x.tolist() == [[1.0, 1.0]]
    assert [(e.row_index, e.field) for e in errors] == [(101, "a"), (102, "b"), (103, "b")]
    assert errors[0].message == "row 101, field 'a': 'oops' is not a number"
    assert "missing value" in errors[1].message and "not finite" in errors[2].message


def test_to_inputs_allow_missing_keeps_nan():
    """With allow_missing, empty cells pass through as NaN but text still fails."""
    table = pa.table({"a": ["1", None, "x"]})
    spec = InputSpec(columns=["a"], allow_missing=True)
    x, rows, errors = to_inputs(table, ["a"], spec, Preprocessing(), 0)
    assert rows.tolist() == [0, 1] and np.isnan(x[1, 0])
    assert [e.row_index for e in errors] == [2]


class ThresholdModel(Runtime):
    """A real runtime whose model fails on any row holding a negative value."""

    framework = "test"

    def load(self) -> None:
        self.calls = []

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        if (x < 0).any():
            raise ValueError("negative input")
        return np.stack([x[:, 0], 1 - x[:, 0]], axis=1)


def manifest(kind: str = "classification") -> ModelManifest:
    return ModelManifest(name="t", version=1, framework="torch", artifact="a",
                         inputs=InputSpec(columns=["a"]),
                         outputs=OutputSpec(kind=kind, labels=["yes", "no"] if kind == "classification" else None))


def test_failing_batch_is_split_until_the_bad_row_is_found():
    """One bad row in a batch of 8 fails alone; the other 7 rows get outputs."""
    rt = ThresholdModel(manifest(), ".")
    rt.load()
    x = np.full((8, 1), 0.25, dtype=np.float32)
    x[5] = -1
    run = rt.run(x, batch_size=8)
    assert run.ok.tolist() == [True] * 5 + [False] + [True] * 2
    assert list(run.errors) == [5] and "negative input" in run.errors[5]
    np.testing.assert_array_equal(run.outputs[run.ok], np.tile([0.25, 0.75], (7, 1)))
    assert run.oom_splits == 0  # a model error is not an out-of-memory split


def test_batch_contract_violation_fails_rows():
    """A model returning fewer outputs than inputs fails those rows, not silently."""
    class Short(ThresholdModel):
        def predict_batch(self, x):
            return np.zeros((max(len(x) - 1, 0), 2))

    rt = Short(manifest(), ".")
    run = rt.run(np.zeros((4, 1), np.float32), batch_size=4)
    assert not run.ok.any() and sorted(run.errors) == [0, 1, 2, 3]
    assert all("returned 0 outputs for 1 inputs" in e for e in run.errors.values())


def test_decoded_classification_has_label_score_and_probabilities():
    """Classification results carry label, score and probabilities; NaN rows fail alone;
    a wrong width is refused."""
    spec = OutputSpec(kind="classification", labels=["a", "b"], activation="softmax")
    table, failures = decode_outputs(np.array([4, 5]), np.array([[0.0, np.log(3.0)], [np.nan, 1.0]]), spec)
    rec = table.to_pylist()
    assert len(rec) == 1 and rec[0]["row"] == 4 and rec[0]["prediction"] == "b"
    assert rec[0]["score"] == pytest.approx(0.75) and rec[0]["probabilities"] == pytest.approx([0.25, 0.75])
    assert failures == [(5, "model returned a non-finite output (NaN)")]
    with pytest.raises(BatchContractError, match="3 values per row, manifest expects 2"):
        decode_outputs(np.array([0]), np.array([[1.0, 2.0, 3.0]]), spec)


def test_decoded_regression_and_embedding():
    """Regression gives a scalar prediction, embeddings a vector."""
    table, _ = decode_outputs(np.array([0]), np.array([2.5]), OutputSpec(kind="regression"))
    assert table.to_pylist() == [{"row": 0, "prediction": 2.5}]
    table, _ = decode_outputs(np.array([0]), np.array([[1, 2]], np.float32), OutputSpec(kind="embedding", size=2))
    assert table.to_pylist() == [{"row": 0, "embedding": [1.0, 2.0]}]


def test_invalid_utf8_cell_fails_only_its_row(tmp_path):
    """A cell that is not UTF-8 fails its row, naming row and field; other rows convert."""
    from ml_framework.datasets import inspect, read_rows

    path = tmp_path / "latin1.csv"
    path.write_bytes(b"a,b\n1,2\n3,\xe94\n5,6\n")
    assert inspect(path).n_rows == 3
    table = read_rows(path, "csv", 0, 3, ["a", "b"])
    x, rows, errors = to_inputs(table, ["a", "b"], InputSpec(columns=["a", "b"]), Preprocessing(), 0)
    assert rows.tolist() == [0, 2] and x.tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert [(e.row_index, e.field) for e in errors] == [(1, "b")]
    assert "not valid UTF-8" in errors[0].message


def test_non_numeric_column_type_fails_rows_naming_field():
    """A timestamp column cannot feed a model: each row fails naming the field and type."""
    import datetime as dt

    table = pa.table({"a": [1.0, 2.0], "t": pa.array([dt.datetime(2020, 1, 1)] * 2)})
    x, rows, errors = to_inputs(table, ["a", "t"], InputSpec(columns=["a", "t"]), Preprocessing(), 0)
    assert len(x) == 0 and rows.tolist() == []
    assert all(e.field == "t" and "timestamp" in e.message for e in errors) and len(errors) == 2


def test_invalid_utf8_in_a_parquet_string_column_fails_only_its_row(tmp_path):
    """Parquet writers need not validate UTF-8: a bad string cell fails its row alone."""
    import pyarrow.parquet as pq

    from ml_framework.datasets import read_rows

    cells = pa.array([b"1", b"\xe92", b"3"], type=pa.binary())
    table = pa.table({"a": cells.view(pa.string()), "b": pa.array([1.0, 2.0, 3.0])})
    pq.write_table(table, tmp_path / "bad.parquet")
    rows_table = read_rows(tmp_path / "bad.parquet", "parquet", 0, 3, ["a", "b"])
    x, rows, errors = to_inputs(rows_table, ["a", "b"], InputSpec(columns=["a", "b"]), Preprocessing(), 0)
    assert rows.tolist() == [0, 2] and x[:, 0].tolist() == [1.0, 3.0]
    assert [(e.row_index, e.field) for e in errors] == [(1, "a")] and "UTF-8" in errors[0].message


def test_numeric_columns_convert_directly_and_still_report_bad_cells():
    """Integer, boolean and float columns skip pandas when clean, and name the row and field when not."""
    table = pa.table({"i": pa.array([1, None, 3], pa.int64()), "b": [True, False, True],
                      "f": [0.5, 1.5, float("nan")]})
    spec = InputSpec(columns=["i", "b", "f"])
    x, rows, errors = to_inputs(table, ["i", "b", "f"], spec, Preprocessing(), 0)
    assert rows.tolist() == [0] and x.tolist() == [[1.0, 1.0, 0.5]]
    assert [(e.row_index, e.field, e.message) for e in errors] == [
        (1, "i", "row 1, field 'i': missing value"), (2, "f", "row 2, field 'f': missing value")]
    lenient = InputSpec(columns=["f"], allow_missing=True)
    x, rows, errors = to_inputs(pa.table({"f": [float("nan"), float("inf"), 2.0]}), ["f"], lenient, Preprocessing(), 0)
    assert rows.tolist() == [0, 2] and np.isnan(x[0, 0]) and x[1, 0] == 2.0
    assert [e.message for e in errors] == ["row 1, field 'f': inf is not finite"]


def reference(y: np.ndarray, spec: OutputSpec) -> dict | str:
    """One row's result as the manifest documents it, computed in plain Python (the
    decoder works on whole arrays), or the row error of a row holding NaN or infinity."""
    values = [float(v) for v in np.asarray(y, dtype=np.float64).reshape(-1)]
    if not all(np.isfinite(v) for v in values):
        kinds = [w for w, bad in (("NaN", any(np.isnan(values))), ("infinity", any(np.isinf(values)))) if bad]
        return f"model returned a non-finite output ({' and '.join(kinds)})"
    if spec.kind == "classification":
        if spec.activation == "softmax":
            top = max(values)
            exps = [np.exp(v - top) for v in values]
            values = [e / sum(exps) for e in exps]
        k = values.index(max(values))
        return {"prediction": spec.labels[k], "score": values[k], "probabilities": values}
    if spec.kind == "regression":
        return {"prediction": values[0] if len(values) == 1 else values}
    return {"embedding": values}


@pytest.mark.parametrize("spec", [
    OutputSpec(kind="classification", labels=["cat", "dog", "eel"], activation="softmax"),
    OutputSpec(kind="classification", labels=[3, 7, 9], activation="none"),
    OutputSpec(kind="regression"),
    OutputSpec(kind="regression", size=3),
    OutputSpec(kind="embedding", size=3),
], ids=["softmax-text-labels", "int-labels", "regression", "regression-3", "embedding"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decoder_gives_what_the_manifest_documents_row_by_row(spec, dtype):
    """The vectorized decoding of a batch (what the worker stores) equals the documented
    result computed row by row, values and keys; rows with NaN or infinity fail with
    the reason, and only they."""
    width = 1 if spec.kind == "regression" and spec.size is None else 3
    rng = np.random.default_rng(0)
    raw = (rng.normal(size=(50, width)) * 4).astype(dtype)
    raw[7, 0], raw[20, -1], raw[21] = np.nan, np.inf, [-np.inf] + [np.nan] * (width - 1)
    rows = np.arange(100, 150, dtype=np.int64)
    if spec.kind == "regression" and width == 1:
        raw = raw[:, 0]  # (N,) outputs, as scikit-learn regressors give
    table, failures = decode_outputs(rows, raw, spec)
    expected = {r: reference(y, spec) for r, y in zip(rows.tolist(), raw, strict=True)}
    assert failures == [(r, e) for r, e in expected.items() if isinstance(e, str)] and len(failures) == 3
    got = table.to_pylist()
    assert [rec["row"] for rec in got] == [r for r, e in expected.items() if isinstance(e, dict)]
    for rec in got:
        want = expected[rec.pop("row")]
        assert rec.keys() == want.keys()
        for k in rec:
            if isinstance(want[k], str | int) and not isinstance(want[k], bool):
                assert rec[k] == want[k] and type(rec[k]) is type(want[k])
            else:
                np.testing.assert_allclose(rec[k], want[k], rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_decoder_refuses_outputs_of_the_wrong_width():
    """Outputs narrower than the labels fail the whole batch, naming both widths."""
    with pytest.raises(BatchContractError, match="returned 2 values per row, manifest expects 3"):
        decode_outputs(np.arange(4), np.zeros((4, 2)), OutputSpec(kind="classification", labels=["a", "b", "c"]))


def test_labels_mixing_text_and_numbers_are_stored_as_text():
    """A results column holds one type: class labels such as ["other", 1, 2] (valid in a
    manifest) come back as text, where the vectorized conversion would otherwise fail
    every shard of the model."""
    table, _ = decode_outputs(np.arange(3), np.eye(3), OutputSpec(kind="classification", labels=["other", 1, 2]))
    assert table.column("prediction").to_pylist() == ["other", "1", "2"]
