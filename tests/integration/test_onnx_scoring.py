"""ONNX models scored as bulk jobs through real worker processes, Redis and PostgreSQL: a
scikit-learn classifier converted by skl2onnx and a PyTorch CNN exported by torch.onnx give
their native models' probabilities within 1e-5, in input row order."""

from __future__ import annotations

import numpy as np
import pytest

from demo import digits as d
from ml_framework.manifest import ModelRepository
from ml_framework.store import JobState
from worker.export_onnx import export_onnx_sklearn, export_onnx_torch

pytestmark = pytest.mark.integration
TIMEOUT_S = 240
SKLEARN_ONNX, TORCH_ONNX = "digits-onnx-sklearn", "digits-onnx-torch"


@pytest.fixture(scope="module")
def onnx_models(trained):
    """The session's sklearn and torch digits models, published as ONNX graphs into the
    repository the workers read."""
    models_dir, models = trained
    repo = ModelRepository(models_dir)
    if not repo.versions(SKLEARN_ONNX):
        export_onnx_sklearn(models["sklearn"][0], models_dir, SKLEARN_ONNX, **d._common("skl2onnx", [64]))
    if not repo.versions(TORCH_ONNX):
        export_onnx_torch(models["torch"][0], models_dir, TORCH_ONNX,
                          outputs={"kind": "classification", "labels": d.LABELS, "activation": "softmax"},
                          **d._common("torch.onnx", [1, 8, 8]))
    return {"sklearn": SKLEARN_ONNX, "torch": TORCH_ONNX}


def native_probabilities(framework: str, model, x: np.ndarray) -> np.ndarray:
    """The native model's own class probabilities for ``x`` (N, 64) in [0, 1]."""
    if framework == "sklearn":
        return model.predict_proba(x)
    import torch

    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(x.reshape(-1, 1, 8, 8))), dim=1).numpy()


@pytest.mark.parametrize("backend", ["redis-postgres"], indirect=True)
@pytest.mark.parametrize("framework", ["sklearn", "torch"])
def test_bulk_job_with_an_onnx_model(backend, trained, onnx_models, data_dir, digits, framework):
    """A bulk job over digits.parquet with the ONNX export scores every row as the native model does (1e-5)."""
    job = backend.client.score_dataset(data_dir / "digits.parquet", onnx_models[framework])
    status = job.wait(timeout_s=TIMEOUT_S)
    n = len(digits.frame)
    assert status.state is JobState.SUCCEEDED, status
    assert (status.rows_ok, status.rows_failed) == (n, 0)
    results = job.results()
    assert list(results.index) == list(range(n)) and results["error"].isna().all()
    x = digits.frame[d.PIXELS].to_numpy(np.float32) * d.SCALE
    expected = native_probabilities(framework, trained[1][framework][0], x)
    got = np.stack(results["probabilities"].to_numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert (results["prediction"].astype(int).to_numpy() == expected.argmax(axis=1)).all()
