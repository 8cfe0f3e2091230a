"""Publishing models: validation against the artifact, skops trusted types, `mlf models add`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from ml_framework.errors import ManifestError
from ml_framework.manifest import ModelRepository
from worker.export import add_artifact, export_sklearn
from worker.registry import ModelRegistry

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def iris():
    return load_iris(return_X_y=True)


def test_export_records_trusted_types_and_serves(tmp_path, iris):
    """skops types outside the default trust are recorded; the worker registry loads and predicts."""
    x, y = iris
    model = HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(x, y)
    manifest = export_sklearn(model, tmp_path, "iris-hgb", inputs={"columns": IRIS_COLUMNS})
    assert manifest.version == 1 and manifest.outputs.labels == [0, 1, 2]
    assert any("TreePredictor" in t for t in manifest.trusted_types)
    runtime = ModelRegistry(tmp_path).get("iris-hgb")
    np.testing.assert_allclose(runtime.predict_batch(x[:5].astype(np.float32)),
                               model.predict_proba(x[:5].astype(np.float32)), rtol=1e-6)


def test_untrusted_type_is_refused_at_load(tmp_path, iris):
    """A skops file holding a type the manifest does not list is refused, naming the type."""
    x, y = iris
    export_sklearn(HistGradientBoostingClassifier(max_iter=5).fit(x, y), tmp_path, "iris-hgb",
                   inputs={"columns": IRIS_COLUMNS})
    path = tmp_path / "iris-hgb" / "1" / "manifest.yaml"
    data = yaml.safe_load(path.read_text())
    data["trusted_types"] = []
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError, match="TreePredictor"):
        ModelRegistry(tmp_path).get("iris-hgb")


def test_export_refuses_input_spec_that_does_not_fit(tmp_path, iris):
    """Three input columns for a four-feature model: refused, and no version is left behind."""
    x, y = iris
    with pytest.raises(ManifestError, match="fails in the model"):
        export_sklearn(LogisticRegression(max_iter=500).fit(x, y), tmp_path, "iris",
                       inputs={"columns": IRIS_COLUMNS[:3]})
    assert ModelRepository(tmp_path).versions("iris") == []


def test_add_artifact_checks_labels_and_versions(tmp_path, iris):
    """add_artifact validates labels against the classifier and numbers versions upward."""
    import skops.io as sio

    x, y = iris
    artifact = tmp_path / "clf.skops"
    sio.dump(LogisticRegression(max_iter=500).fit(x, y), artifact)
    models = tmp_path / "models"
    base = {"name": "iris", "framework": "sklearn", "inputs": {"columns": IRIS_COLUMNS}}
    with pytest.raises(ManifestError, match="differ from manifest labels"):
        add_artifact(artifact, models, {**base, "outputs": {"kind": "classification", "labels": ["a", "b", "c"]}})
    with pytest.raises(ManifestError, match="activation: none"):
        add_artifact(artifact, models, {**base, "outputs": {"kind": "classification", "labels": [0, 1, 2],
                                                            "activation": "softmax"}})
    good = {**base, "outputs": {"kind": "classification", "labels": [0, 1, 2]}}
    assert add_artifact(artifact, models, good).version == 1
    assert add_artifact(artifact, models, good).version == 2
    with pytest.raises(ManifestError, match="already exists"):
        add_artifact(artifact, models, {**good, "version": 2})


def test_cli_models_add_and_list(tmp_path, iris):
    """`mlf models add` publishes an artifact; `mlf models` lists it; a bad manifest exits 1."""
    import os

    import skops.io as sio

    x, y = iris
    artifact = tmp_path / "clf.skops"
    sio.dump(LogisticRegression(max_iter=500).fit(x, y), artifact)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"name": "iris", "framework": "sklearn",
                                        "inputs": {"columns": IRIS_COLUMNS},
                                        "outputs": {"kind": "classification", "labels": [0, 1, 2]}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env["ML_FRAMEWORK_MODELS_DIR"] = str(tmp_path / "models")
    mlf = [sys.executable, "-c", "from producer.cli import main; main()"]
    run = subprocess.run([*mlf, "models", "add", str(artifact), "--manifest", str(manifest)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "added iris/1" in run.stdout
    listing = subprocess.run([*mlf, "models"], env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "iris" in listing.stdout and "sklearn" in listing.stdout
    manifest.write_text(yaml.safe_dump({"name": "iris", "framework": "sklearn",
                                        "inputs": {"columns": IRIS_COLUMNS[:2]},
                                        "outputs": {"kind": "classification", "labels": [0, 1, 2]}}))
    run = subprocess.run([*mlf, "models", "add", str(artifact), "--manifest", str(manifest)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "fails in the model" in run.stderr
