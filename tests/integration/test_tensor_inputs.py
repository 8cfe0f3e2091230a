"""Tensor inputs end to end: one column holding a whole image per row (Parquet
``fixed_size_list`` and ``fixed_shape_tensor``, Arrow IPC / Feather, ``.npy``) and arrays
given in memory, through real worker processes on the embedded default and on Redis +
PostgreSQL. The same trained CNN serves the 64-column layout (``digits-torch``) and the
tensor layout (``digits-tensor``), so the two must agree row for row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from demo.digits import LABELS, PIXELS, SCALE
from ml_framework.errors import DatasetSchemaError
from ml_framework.manifest import ModelRepository
from ml_framework.store import JobState

pytestmark = pytest.mark.integration
TIMEOUT_S = 240
MODEL = "digits-tensor"


@pytest.fixture(scope="module")
def tensor_model(trained):
    """The trained digits CNN published again with one ``image`` column of (1, 8, 8) tensors."""
    from worker.export import export_torch

    models_dir, models = trained
    cnn = models["torch"][0]
    if not ModelRepository(models_dir).versions(MODEL):  # shared by both backends
        export_torch(cnn, models_dir, MODEL, inputs={"kind": "tensor", "columns": ["image"], "shape": [1, 8, 8]},
                     outputs={"kind": "classification", "labels": LABELS, "activation": "softmax"},
                     preprocessing={"scale": SCALE})
    return cnn


def images(digits) -> np.ndarray:
    """The digits as (N, 1, 8, 8) float32 pixels (0-16, unscaled, as in the files)."""
    return np.ascontiguousarray(digits.frame[PIXELS].to_numpy(np.float32)).reshape(-1, 1, 8, 8)


def reference(backend, data_dir, digits) -> np.ndarray:
    """Class probabilities of the 64-column layout, through the same backend."""
    job = backend.client.score_dataset(data_dir / "digits.parquet", "digits-torch")
    assert job.wait(timeout_s=TIMEOUT_S).state is JobState.SUCCEEDED
    return np.stack(job.results()["probabilities"].to_numpy())


@pytest.fixture(scope="module")
def tensor_files(data_dir, digits):
    """The digits as tensor datasets under the data directory, one per layout."""
    x = images(digits)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    files = {
        "fixed_size_list.parquet": lambda p: pq.write_table(pa.table({"image": flat}), p, row_group_size=300),
        "fixed_shape_tensor.parquet": lambda p: pq.write_table(
            pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}), p, row_group_size=400),
        "images.feather": lambda p: feather.write_feather(pa.table({"image": flat}), p, chunksize=500),
        "images.npy": lambda p: np.save(p, x.reshape(-1, 8, 8)),  # (N, 8, 8) feeds (1, 8, 8)
    }
    for name, write in files.items():
        write(data_dir / name)
    return list(files)


@pytest.mark.parametrize("layout", ["fixed_size_list.parquet", "fixed_shape_tensor.parquet", "images.feather",
                                    "images.npy"])
def test_tensor_datasets_score_like_the_column_layout(backend, tensor_model, tensor_files, data_dir, digits, layout):
    """Every tensor layout gives the predictions of the 64-column layout, in row order."""
    job = backend.client.score_dataset(data_dir / layout, MODEL)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert status.state is JobState.SUCCEEDED, status
    results = job.results()
    assert list(results.index) == list(range(len(digits.frame)))
    np.testing.assert_allclose(np.stack(results["probabilities"].to_numpy()), reference(backend, data_dir, digits),
                               atol=1e-6)


def test_in_memory_arrays_are_reshaped_to_the_input(backend, tensor_model, digits):
    """score_rows takes (N, 1, 8, 8) and (N, 64) arrays for the tensor model, and an
    (N, 8, 8) array for the 64-column model (reshaped, not refused); predict takes rows
    of nested lists. All agree with the model's own predictions."""
    import torch

    x = images(digits)[:40]
    with torch.inference_mode():
        want = torch.softmax(tensor_model(torch.from_numpy(x * SCALE)), dim=1).numpy()
    for model, rows in ((MODEL, x), (MODEL, x.reshape(40, 64)), ("digits-torch", x.reshape(40, 8, 8))):
        job = backend.client.score_rows(rows, model)
        assert job.wait(timeout_s=TIMEOUT_S).state is JobState.SUCCEEDED
        np.testing.assert_allclose(np.stack(job.results()["probabilities"].to_numpy()), want, atol=1e-5)
    answer = backend.client.predict(MODEL, [{"image": x[i].tolist()} for i in range(3)], timeout_s=60)
    np.testing.assert_allclose(np.stack(answer["probabilities"].to_numpy()), want[:3], atol=1e-5)


def test_bad_tensors_fail_only_their_rows(backend, tensor_model, data_dir, digits):
    """A null tensor, a tensor of the wrong length, a missing value and a NaN inside a
    tensor each fail their own row, naming the row and field; the other rows score."""
    x = images(digits)[:20].reshape(20, 64).astype(np.float64)
    rows: list = [row.tolist() for row in x]
    rows[2] = None
    rows[5] = rows[5][:63]
    rows[7][10] = None
    rows[11][3] = float("nan")
    path = data_dir / "bad_tensors.parquet"
    pq.write_table(pa.table({"image": pa.array(rows, pa.list_(pa.float64()))}), path)
    job = backend.client.score_dataset(path, MODEL)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, 16, 4)
    errors = job.results()["error"].dropna()
    assert errors.index.tolist() == [2, 5, 7, 11]
    assert errors[2] == "row 2, field 'image': missing tensor (null)"
    assert errors[5] == "row 5, field 'image': a tensor of 63 values, the model takes 64 (shape [1, 8, 8])"
    assert errors[7] == "row 7, field 'image': missing value inside the tensor (index 10)"
    assert errors[11] == "row 11, field 'image': not finite (NaN at index 3)"


def test_a_tensor_column_that_cannot_fit_is_refused_at_submit(backend, tensor_model, data_dir):
    """Lists of another fixed length, or tensors laid out in another shape, are refused
    before anything is sent, naming the file, the column and both shapes."""
    wide = data_dir / "wide.parquet"
    pq.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(650)), 65)}), wide)
    transposed = data_dir / "transposed.npy"
    np.save(transposed, np.zeros((10, 4, 16), np.float32))
    before = sum(backend.client.store.job_counts().values())
    with pytest.raises(DatasetSchemaError, match="wide.parquet: column 'image' holds lists of 65 values, the model "
                                                 r"takes 64 \(shape \[1, 8, 8\]\)"):
        backend.client.score_dataset(wide, MODEL)
    with pytest.raises(DatasetSchemaError, match=r"transposed.npy: column 'array' holds tensors of shape \[4, 16\], "
                                                 r"the model takes \[1, 8, 8\]"):
        backend.client.score_dataset(transposed, MODEL)
    assert sum(backend.client.store.job_counts().values()) == before


def test_a_cold_start_is_reported_in_the_job_and_by_mlf_status(backend, trained, data_dir, digits, tensor_files):
    """The first job of a model no worker has loaded reports how long the load and
    warm-up took, in the job's status and in `mlf status`."""
    import subprocess
    import sys
    import uuid

    from worker.export import export_torch

    name = f"digits-cold-{uuid.uuid4().hex[:6]}"
    export_torch(trained[1]["torch"][0], trained[0], name,
                 inputs={"kind": "tensor", "columns": ["image"], "shape": [1, 8, 8]},
                 outputs={"kind": "classification", "labels": LABELS, "activation": "softmax"})
    job = backend.client.score_dataset(data_dir / "images.npy", name)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert status.state is JobState.SUCCEEDED and status.model_load_s is not None and status.model_load_s > 0
    run = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "status", job.id],
                         env=backend.env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert f"loaded cold in {status.model_load_s:.1f} s" in run.stdout, run.stdout + run.stderr


def test_tensors_as_nested_lists_over_http(backend, tensor_model, digits):
    """The HTTP API takes a tensor as nested lists (JSON has no arrays), for online
    predictions and bulk jobs, and answers as the model does in process; a row of the
    wrong shape fails alone."""
    import torch

    from tests.integration.test_api import api, wait_done

    x = images(digits)[:4]
    with torch.inference_mode():
        want = torch.softmax(tensor_model(torch.from_numpy(x * SCALE)), dim=1).numpy()
    rows = [{"image": x[i].tolist()} for i in range(4)]
    with api(backend.values) as http:
        r = http.post(f"/v1/models/{MODEL}/predict", json={"rows": rows, "timeout_s": 60})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([row["probabilities"] for row in r.json()["rows"]], want, atol=1e-5)
        r = http.post("/v1/jobs", json={"model": MODEL, "rows": [*rows, {"image": [[1.0, 2.0]]}]})
        assert r.status_code == 202, r.text
        assert wait_done(http, r.json()["job_id"])["rows_failed"] == 1
        page = http.get(f"/v1/jobs/{r.json()['job_id']}/results").json()["rows"]
    np.testing.assert_allclose([row["probabilities"] for row in page[:4]], want, atol=1e-5)
    assert page[4]["error"] == "row 4, field 'image': a tensor of 2 values, the model takes 64 (shape [1, 8, 8])"
