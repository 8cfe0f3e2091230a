"""Bad models: a manifest that does not fit its artifact is refused with an error naming the
manifest file and field (at submit time where the producer can tell, else when the worker
loads the model, failing the shard as a whole); a model that breaks its batch contract
(wrong number of outputs, NaN) fails those rows, naming the model, the counts and the row,
and never has its outputs stored.

Most tests run at the registry / runtime level with real models (scikit-learn on the
digits, small torch modules exported with :mod:`worker.export`); one runs a job through
the real worker processes of both backends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from ml_framework.errors import ManifestError
from ml_framework.manifest import MANIFEST_FILE, ModelRepository, check_artifact
from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from tests import fault_models as fm
from worker.export import export_sklearn, export_torch
from worker.registry import ModelRegistry
from worker.scoring import score_table

PIXELS = [f"pixel_{i}" for i in range(64)]
LABELS = list(range(10))
SOFTMAX = {"kind": "classification", "labels": LABELS, "activation": "softmax"}


def _torch_modules():
    import torch

    class CNN(torch.nn.Module):
        """(N, 1, 8, 8) -> (N, 10)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
            self.head = torch.nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.flatten(self.conv(x), 1))

    torch.manual_seed(0)
    return CNN(), torch.nn.Linear(10, 5)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A model repository of good models, each copied and broken by the tests:
    ``lr`` (scikit-learn, 64 pixels), ``cnn`` (torch.export, rows (1, 8, 8)),
    ``five`` (TorchScript, 10 inputs -> 5 logits) and one model of each class of
    :mod:`tests.fault_models`."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("models")
    x, y = load_digits(return_X_y=True)
    x, y = x[:600], y[:600]  # every class, fitted in a fraction of the time
    export_sklearn(fm.fit(fm.LogisticRegression, x, y), root, "lr", inputs={"columns": PIXELS})
    for name, cls in (("drops", fm.DropsLastRow), ("nan", fm.NaNOnMarkedRows), ("narrow", fm.FiveOfTenClasses)):
        model = fm.fit(cls, x, y)
        # published with a working twin's output, then swapped in: export validates, and these must not pass
        export_sklearn(fm.fit(fm.LogisticRegression, x, y), root, name, inputs={"columns": PIXELS})
        import skops.io as sio

        sio.dump(model, root / name / "1" / "model.skops")
        edit(root, name, trusted_types=sio.get_untrusted_types(file=root / name / "1" / "model.skops"))
    cnn, linear = _torch_modules()
    export_torch(cnn, root, "cnn", inputs={"columns": PIXELS, "shape": [1, 8, 8]}, outputs=SOFTMAX)
    export_torch(linear, root, "five", method="torchscript", inputs={"columns": PIXELS[:10]},
                 outputs={**SOFTMAX, "labels": LABELS[:5]})
    return root


def edit(root: Path, model: str, **changes) -> Path:
    """Change top-level fields of ``model``/1's manifest (``None`` removes one); returns its path."""
    path = root / model / "1" / MANIFEST_FILE
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def variant(root: Path, source: str, name: str, **changes) -> Path:
    """A copy of ``source``/1 published as ``name``/1 with manifest ``changes``; returns the manifest path."""
    shutil.rmtree(root / name, ignore_errors=True)
    shutil.copytree(root / source / "1", root / name / "1")
    return edit(root, name, name=name, **changes)


def digits_rows(n: int = 12, marked: tuple[int, ...] = ()) -> pa.Table:
    from sklearn.datasets import load_digits

    x = load_digits().data[:n].copy()
    x[list(marked), 0] = fm.MARKER
    return pa.table({c: x[:, i] for i, c in enumerate(PIXELS)})


@pytest.mark.parametrize(("source", "framework", "found"), [
    ("lr", "torch", "scikit-learn skops file"),
    ("lr", "tensorflow", "scikit-learn skops file"),
    ("cnn", "sklearn", "PyTorch archive"),
])
def test_a_framework_that_is_not_the_artifacts_is_refused_naming_the_field(repo, source, framework, found):
    """A manifest saying torch over a skops file (and the like) is refused before any
    framework tries the file, naming the manifest file, the field and what the file is."""
    changes = {"framework": framework, "trusted_types": None, "runtime": None}
    path = variant(repo, source, "wrong-framework", **changes)
    with pytest.raises(ManifestError) as err:
        ModelRegistry(repo, threads=1).get("wrong-framework")
    assert str(err.value).startswith(f"{path}: framework: says {framework!r}") and found in str(err.value)


def test_an_unknown_framework_is_refused_at_submit_and_at_load(repo, tmp_path):
    """An unknown framework (mxnet) is refused by the producer at submit and by the worker
    at load, both naming the manifest file and the field."""
    path = variant(repo, "lr", "mxnet-model", framework="mxnet")
    client = Client(load_settings(models_dir=repo, var_dir=tmp_path, data_dir=tmp_path))
    try:
        with pytest.raises(ManifestError, match=rf"^{path}: invalid manifest: framework: Input should be"):
            client.score_rows(np.zeros((2, 64)), "mxnet-model")
        assert sum(client.store.job_counts().values()) == 0
    finally:
        client.close()
    with pytest.raises(ManifestError, match=rf"^{path}: invalid manifest: framework"):
        ModelRegistry(repo, threads=1).get("mxnet-model")


@pytest.mark.parametrize("artifact", [None, "other.skops"])
def test_a_missing_artifact_is_refused_naming_the_field(repo, artifact):
    """A version directory without its artifact is refused, naming the manifest file and
    ``artifact``, by the worker's registry and by the repository check a producer can run."""
    path = variant(repo, "lr", "no-artifact", **({"artifact": artifact} if artifact else {}))
    if artifact is None:
        (path.parent / "model.skops").unlink()
    name = artifact or "model.skops"
    with pytest.raises(ManifestError, match=rf"^{path}: artifact: '{name}' not found in {path.parent}"):
        ModelRegistry(repo, threads=1).get("no-artifact")
    repository = ModelRepository(repo)
    manifest = repository.resolve("no-artifact")
    with pytest.raises(ManifestError, match="artifact: .* not found"):
        check_artifact(manifest, repository.version_dir(manifest.name, manifest.version))


@pytest.mark.parametrize(("source", "inputs", "field", "ours", "theirs"), [
    ("lr", {"columns": PIXELS[:10]}, "inputs.columns", "(10,)", "(64,)"),
    ("cnn", {"columns": PIXELS}, "inputs.columns", "(64,)", "(1, 8, 8)"),
    ("cnn", {"columns": PIXELS, "shape": [8, 8, 1]}, "inputs.shape", "(8, 8, 1)", "(1, 8, 8)"),
])
def test_an_input_spec_that_does_not_fit_the_model_is_refused_at_load(repo, source, inputs, field, ours, theirs):
    """Columns or a row shape the model does not take fail the load, naming the manifest
    file, the field and both shapes, instead of loading and failing every row alone."""
    path = variant(repo, source, "bad-inputs", inputs=inputs)
    with pytest.raises(ManifestError) as err:
        ModelRegistry(repo, threads=1).get("bad-inputs")
    message = str(err.value)
    assert message.startswith(f"{path}: {field}: the manifest gives the model rows of shape {ours}"), message
    assert f"takes rows of shape {theirs}" in message


def test_an_input_dtype_that_does_not_fit_an_exported_program_is_refused(repo):
    """int64 rows for a float32 torch.export program fail the load, naming inputs.dtype."""
    path = variant(repo, "cnn", "bad-dtype", inputs={"columns": PIXELS, "shape": [1, 8, 8], "dtype": "int64"})
    with pytest.raises(ManifestError, match=rf"^{path}: inputs.dtype: the manifest feeds int64 .* takes float32"):
        ModelRegistry(repo, threads=1).get("bad-dtype")


def test_a_keras_row_shape_that_does_not_fit_is_refused(tmp_path):
    """A Keras CNN taking (8, 8, 1) rows under a manifest of (1, 8, 8) rows fails the load."""
    import keras

    from worker.export import export_keras

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    export_keras(model, tmp_path, "k", inputs={"columns": PIXELS, "shape": [8, 8, 1]}, outputs=SOFTMAX)
    path = edit(tmp_path, "k", inputs={"columns": PIXELS, "shape": [1, 8, 8]})
    with pytest.raises(ManifestError, match=rf"^{path}: inputs.shape: .* takes rows of shape \(8, 8, 1\)"):
        ModelRegistry(tmp_path, threads=1).get("k")


@pytest.mark.parametrize(("source", "changes"), [
    ("five", {"outputs": SOFTMAX}),                      # TorchScript: caught by the warm-up batch
    ("narrow", {}),                                       # classes_ says 10, predict_proba gives 5
])
def test_an_output_narrower_than_its_labels_is_refused_at_load(repo, source, changes):
    """A model returning 5 values per row under 10 labels fails the load, naming the
    manifest file, outputs.labels and both counts (it used to load, then fail every row)."""
    path = variant(repo, source, "narrow-out", **changes)
    with pytest.raises(ManifestError) as err:
        ModelRegistry(repo, threads=1).get("narrow-out")
    assert str(err.value).startswith(f"{path}: model narrow-out/1 returned 5 values per row"), str(err.value)
    assert "outputs.labels expects 10" in str(err.value)


def test_an_output_width_error_fails_the_whole_batch_naming_model_and_counts(repo):
    """Without a warm-up, a model returning 5 values per row under 10 labels fails each
    batch at once (no halving: no split can fix it), every row's error naming the model
    and the counts."""
    variant(repo, "five", "narrow-nowarm", outputs=SOFTMAX, runtime={"warmup": False})
    runtime = ModelRegistry(repo, threads=1).get("narrow-nowarm")
    calls = []
    predict = runtime.predict_batch
    runtime.predict_batch = lambda x: calls.append(len(x)) or predict(x)
    table = pa.table({c: np.ones(12) for c in PIXELS[:10]})
    outcome = score_table(runtime, table, PIXELS[:10], 100, 8)
    assert outcome.outputs.num_rows == 0 and calls == [8, 4]
    assert [e.row_index for e in outcome.errors] == list(range(100, 112))
    assert outcome.errors[0].message == (
        "row 100: model narrow-nowarm/1 returned 5 values per row for a batch of 8 rows, "
        "its manifest's outputs.labels expects 10")


def test_a_model_returning_fewer_rows_than_inputs_fails_them_naming_model_and_counts(repo):
    """N - 1 outputs for N inputs: no output is stored, and each row's error names the
    model and the counts."""
    runtime = ModelRegistry(repo, threads=1).get("drops")
    outcome = score_table(runtime, digits_rows(4), PIXELS, 0, 4)
    assert outcome.outputs.num_rows == 0
    assert [e.message for e in outcome.errors] == [
        f"row {r}: model failed on this row: BatchContractError: model drops/1 returned 0 outputs for 1 inputs"
        for r in range(4)]


def test_nan_outputs_become_row_errors_naming_the_row(repo):
    """Rows the model answers with NaN fail alone ("returned ... (NaN)"), the others are
    scored, and no NaN reaches a stored result."""
    runtime = ModelRegistry(repo, threads=1).get("nan")
    outcome = score_table(runtime, digits_rows(12, marked=(3, 7)), PIXELS, 0, 8)
    assert [(e.row_index, e.message) for e in outcome.errors] == [
        (3, "row 3: model returned a non-finite output (NaN)"),
        (7, "row 7: model returned a non-finite output (NaN)")]
    assert outcome.outputs.column("row").to_pylist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    assert all(np.isfinite(p).all() for p in outcome.outputs.column("probabilities").to_pylist())


@pytest.mark.integration
def test_a_job_for_a_model_that_does_not_fit_its_manifest_fails_and_workers_serve_the_next(
        backend, trained, data_dir, digits):
    """Real workers: a model trained on 10 pixels under a 64-column manifest fails every
    shard as a whole, every row with the manifest file and field, the job ends FAILED,
    and the same workers then score a good model's job."""
    from sklearn.linear_model import LogisticRegression

    models_dir = trained[0]
    if not ModelRepository(models_dir).versions("fault-ten-pixels"):  # shared by both backends
        x = digits.frame[PIXELS[:10]].to_numpy() / 16
        export_sklearn(LogisticRegression(max_iter=300).fit(x, digits.frame["label"]), models_dir,
                       "fault-ten-pixels", inputs={"columns": PIXELS[:10]})
        edit(models_dir, "fault-ten-pixels", inputs={"columns": PIXELS})
    client = backend.client
    bad = client.score_dataset(data_dir / "digits.csv", "fault-ten-pixels")
    status = bad.wait(timeout_s=120)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.FAILED, 0, len(digits.frame))
    # named under the models directory, whose server path the submitter is not shown
    reason = f"fault-ten-pixels/1/{MANIFEST_FILE}: inputs.columns: the manifest gives"
    assert all(s["error"].startswith(reason) and str(models_dir) not in s["error"] and s["state"] == "FAILED"
               for s in client.store.shards(bad.id))
    errors = bad.results()["error"]
    assert errors.str.contains(reason, regex=False).all() and errors.index.tolist()[:2] == [0, 1]
    good = client.score_dataset(data_dir / "digits.csv", "digits-sklearn")
    assert good.wait(timeout_s=120).state is JobState.SUCCEEDED
