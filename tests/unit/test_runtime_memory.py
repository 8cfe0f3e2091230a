"""Out-of-memory splitting, the per-process model cache (LRU, warm-up, preload) and the
torch / TensorFlow fast paths, on real models."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ml_framework.errors import ManifestError
from ml_framework.manifest import InputSpec, ModelManifest, OutputSpec
from tests.oom_model import oom_above
from worker.registry import ModelRegistry
from worker.runtimes.base import Runtime


class TightMemoryModel(Runtime):
    """A runtime whose forward pass raises ``MemoryError`` above ``limit`` rows, as a
    device does when a batch's activations do not fit."""

    framework = "test"
    limit = 3

    def load(self) -> None:
        self.calls: list[int] = []
        self.releases = 0

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise MemoryError(f"cannot allocate activations for {len(x)} rows")
        return np.stack([x[:, 0], 1 - x[:, 0]], axis=1)

    def release_memory(self) -> None:
        self.releases += 1


def _manifest() -> ModelManifest:
    return ModelManifest(name="t", version=1, framework="torch", artifact="a", inputs=InputSpec(columns=["a"]),
                         outputs=OutputSpec(kind="classification", labels=["yes", "no"]))


def test_out_of_memory_batch_is_split_counted_and_the_next_batch_starts_full():
    """A batch of 8 over a 3-row memory limit splits 8 -> 4+4 -> 2+2+2+2: 3 OOM splits, each
    with the cache emptied, every row scored; the next run tries the full batch again."""
    rt = TightMemoryModel(_manifest(), ".")
    rt.load()
    x = np.linspace(0, 1, 8, dtype=np.float32).reshape(8, 1)
    run = rt.run(x, batch_size=8)
    assert all(e is None for e in run.errors)
    np.testing.assert_allclose([o[0] for o in run.outputs], x[:, 0])
    assert (run.oom_splits, run.batches, rt.releases) == (3, 4, 3)
    assert rt.calls == [8, 4, 2, 2, 4, 2, 2]
    rt.calls.clear()
    rt.run(x[:2], batch_size=8)
    assert rt.calls == [2]  # no lasting penalty: the size is not remembered as too big


def test_out_of_memory_on_a_single_row_fails_that_row_with_the_reason():
    """When even one row does not fit, that row fails saying so; nothing else is lost."""
    rt = TightMemoryModel(_manifest(), ".")
    rt.limit = 0
    rt.load()
    run = rt.run(np.zeros((2, 1), np.float32), batch_size=2)
    assert run.outputs == [None, None]
    assert all(e.startswith("out of memory even for a single row: MemoryError") for e in run.errors)


@pytest.fixture(scope="module")
def iris_models(tmp_path_factory):
    """Three versions of a real iris classifier in a fresh repository."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from worker.export import export_sklearn

    x, y = load_iris(return_X_y=True)
    models_dir = tmp_path_factory.mktemp("models")
    clf = LogisticRegression(max_iter=500).fit(x, y)
    spec = {"columns": ["a", "b", "c", "d"]}
    for _ in range(3):
        export_sklearn(clf, models_dir, "iris", inputs=spec,
                       outputs={"kind": "classification", "labels": [0, 1, 2]})
    return models_dir, x.astype(np.float32)


def test_registry_keeps_at_most_max_models_least_recently_used_out(iris_models):
    """With room for 2, loading a 3rd version unloads the least recently used one."""
    models_dir, x = iris_models
    reg = ModelRegistry(models_dir, threads=1, max_models=2)
    v1 = reg.get("iris", 1)
    reg.get("iris", 2)
    assert reg.get("iris", 1) is v1  # cached, and now the most recently used
    reg.get("iris", 3)
    assert reg.loaded() == ["iris/1", "iris/3"]
    assert v1.model is not None
    v2_again = reg.get("iris", 2)  # reloads; iris/1 is now the oldest and goes
    assert reg.loaded() == ["iris/3", "iris/2"] and v1.model is None
    assert v2_again.run(x[:5], 5).errors == [None] * 5


def test_preload_loads_good_models_and_reports_bad_ones(iris_models, caplog):
    """Preloading skips (and logs) a missing model instead of failing the worker."""
    models_dir, _ = iris_models
    reg = ModelRegistry(models_dir, max_models=4)
    with caplog.at_level(logging.ERROR):
        failures = reg.preload(["iris:2", "iris", "nope"])
    assert reg.loaded() == ["iris/2", "iris/3"]
    assert len(failures) == 1 and failures[0].startswith("nope: model 'nope' not found")
    assert "preloading model nope failed" in caplog.text


def test_warm_up_catches_an_input_spec_the_model_cannot_take(iris_models):
    """A manifest edited to the wrong input width fails at load (warm-up), not mid-job."""
    import yaml

    models_dir, _ = iris_models
    path = models_dir / "iris" / "3" / "manifest.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    data["inputs"]["columns"] = ["a", "b", "c"]
    try:
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ManifestError, match=r"warm-up batch shaped \(32, 3\) float32"):
            ModelRegistry(models_dir).get("iris", 3)
    finally:
        path.write_text(original)


def test_torchscript_out_of_memory_is_recognised_and_split(tmp_path):
    """The torch runtime sees the OOM through TorchScript's wrapped error and splits."""
    from worker.export import export_torch

    export_torch(oom_above(4, 4, 3), tmp_path, "oom", method="script", inputs={"columns": ["a", "b", "c", "d"]},
                 outputs={"kind": "classification", "labels": ["x", "y", "z"], "activation": "softmax"})
    rt = ModelRegistry(tmp_path, threads=1).get("oom")  # warm-up (32 rows) splits too, and succeeds
    run = rt.run(np.ones((16, 4), np.float32), 16)
    assert run.errors == [None] * 16 and run.oom_splits == 3  # 16 -> 8+8 -> 4x4


@pytest.fixture(scope="module")
def torch_cnn():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))


@pytest.mark.parametrize("options", [
    {"precision": "bf16"}, {"precision": "fp16"}, {"inference_mode": False}, {"pin_memory": False},
])
def test_torch_fast_paths_agree_with_fp32(tmp_path, torch_cnn, options):
    """Autocast in bf16 / fp16 and no_grad give the fp32 answers within the precision's
    tolerance (bf16 keeps 8 mantissa bits: ~0.4% relative)."""
    from worker.export import export_torch

    spec = {"columns": [f"p{i}" for i in range(64)], "shape": [1, 8, 8]}
    outputs = {"kind": "embedding", "size": 10}
    export_torch(torch_cnn, tmp_path, "cnn", inputs=spec, outputs=outputs)
    export_torch(torch_cnn, tmp_path, "cnn", inputs=spec, outputs=outputs, runtime=options)
    reg = ModelRegistry(tmp_path, threads=1)
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    base, fast = (np.stack(reg.get("cnn", v).run(x, 32).outputs) for v in (1, 2))
    assert fast.dtype == np.float32
    tol = {"bf16": 5e-2, "fp16": 5e-3}.get(options.get("precision"), 1e-6)
    np.testing.assert_allclose(fast, base, rtol=tol, atol=tol)
    if "precision" in options:
        assert not np.array_equal(fast, base)  # the reduced precision really ran


def test_manifest_refuses_fast_path_options_of_another_framework():
    """precision on a scikit-learn model is a mistake worth an error, not a silent no-op."""
    with pytest.raises(ValueError, match="runtime.precision applies to framework: torch only"):
        ModelManifest(name="m", version=1, framework="sklearn", artifact="m.skops", inputs=InputSpec(columns=["a"]),
                      outputs=OutputSpec(kind="regression"), runtime={"precision": "bf16"})
    with pytest.raises(ValueError, match="runtime.jit_compile applies to framework: tensorflow only"):
        ModelManifest(name="m", version=1, framework="torch", artifact="m.pt2", inputs=InputSpec(columns=["a"]),
                      outputs=OutputSpec(kind="regression"), runtime={"jit_compile": True})


def test_keras_jit_compile_agrees_with_eager(tmp_path, trained, digits):
    """XLA-compiled Keras (runtime.jit_compile) gives the same probabilities as predict_on_batch."""
    from worker.export import export_keras

    keras_model, manifest = trained[1]["tensorflow"]
    common = {"inputs": manifest.inputs, "outputs": manifest.outputs}
    export_keras(keras_model, tmp_path, "k", **common)
    export_keras(keras_model, tmp_path, "k", runtime={"jit_compile": True}, **common)
    reg = ModelRegistry(tmp_path, threads=1)
    x = (digits.xy("test")[0][:40]).astype(np.float32).reshape(40, 8, 8, 1)
    eager, xla = (np.stack(reg.get("k", v).run(x, 16).outputs) for v in (1, 2))
    assert reg.get("k", 2)._fn is not None
    np.testing.assert_allclose(xla, eager, rtol=1e-4, atol=1e-5)
