"""Out-of-memory splitting, the per-process model cache (LRU, warm-up, preload) and the
torch / TensorFlow fast paths, on real models."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ml_framework.errors import ModelLoadError
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


def test_out_of_memory_batch_is_split_and_the_size_that_fits_is_remembered():
    """A batch of 8 over a 3-row memory limit splits 8 -> 4+4 -> 2+2+2+2: 3 OOM splits, each
    with the cache emptied, and once more at the end of the episode; every row is scored.
    The next run starts at the 2 rows that fitted instead of splitting again from 8
    (regression: every batch after an episode started at full size and split again)."""
    rt = TightMemoryModel(_manifest(), ".")
    rt.load()
    x = np.linspace(0, 1, 8, dtype=np.float32).reshape(8, 1)
    run = rt.run(x, batch_size=8)
    assert run.ok.all() and not run.errors
    np.testing.assert_allclose(run.outputs[:, 0], x[:, 0])
    assert (run.oom_splits, run.batches, rt.releases) == (3, 4, 4)
    assert rt.calls == [8, 4, 2, 2, 4, 2, 2] and rt.batch_limit == 2
    rt.calls.clear()
    run = rt.run(x, batch_size=8)
    assert rt.calls == [2, 2, 2, 2] and run.oom_splits == 0 and run.ok.all()


def test_the_remembered_batch_size_grows_back_gradually():
    """After an out-of-memory episode the batch size grows by a quarter every 8 batches
    that fit, back to the size asked for once memory allows it."""
    from worker.runtimes.batching import GROW_AFTER_BATCHES

    rt = TightMemoryModel(_manifest(), ".")
    rt.limit = 40
    rt.load()
    rt.run(np.zeros((64, 1), np.float32), batch_size=64)  # 64 -> 32+32: the limit becomes 32
    assert rt.batch_limit == 32
    rt.calls.clear()
    rt.run(np.zeros((32 * GROW_AFTER_BATCHES + 40, 1), np.float32), batch_size=64)
    grown = rt.calls.index(40)  # the episode's own two halves of 32 were the first to fit;
    # the batch after the 8th was already queued (one batch is submitted ahead) at 32
    assert 2 + grown == GROW_AFTER_BATCHES + 1 and rt.calls[:grown] == [32] * grown
    rt.limit = 1000  # memory freed elsewhere: the size keeps growing back up to 64
    rt.calls.clear()
    rt.run(np.zeros((64 * 40, 1), np.float32), batch_size=64)
    assert 64 in rt.calls and rt.calls[:-1] == sorted(rt.calls[:-1]) and rt.batch_limit is None


def test_out_of_memory_on_a_single_row_fails_that_row_with_the_reason():
    """When even one row does not fit, that row fails saying so; nothing else is lost."""
    rt = TightMemoryModel(_manifest(), ".")
    rt.limit = 0
    rt.load()
    run = rt.run(np.zeros((2, 1), np.float32), batch_size=2)
    assert not run.ok.any() and sorted(run.errors) == [0, 1]
    assert all(e.startswith("out of memory even for a single row: MemoryError") for e in run.errors.values())


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
    assert v2_again.run(x[:5], 5).ok.all()


def test_preload_loads_good_models_and_reports_bad_ones(iris_models, caplog):
    """Preloading skips (and logs) a missing model instead of failing the worker."""
    models_dir, _ = iris_models
    reg = ModelRegistry(models_dir, max_models=4)
    with caplog.at_level(logging.ERROR):
        failures = reg.preload(["iris:2", "iris", "nope"])
    assert reg.loaded() == ["iris/2", "iris/3"]
    assert len(failures) == 1 and failures[0].startswith("nope: model 'nope' not found")
    assert "preloading model nope failed" in caplog.text


def test_a_warm_up_failure_is_reported_and_the_model_still_serves(tmp_path, caplog):
    """A model that is right on real data but not on zeros (log(x)) is loaded anyway: the
    warm-up problem is logged, real rows score, and only rows it fails on get errors
    (regression: the warm-up made such a model unloadable)."""
    import torch

    from worker.export import export_torch

    class Log(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x).sum(dim=1, keepdim=True)

    export_torch(Log(), tmp_path, "logm", inputs={"columns": ["a", "b"]}, outputs={"kind": "regression"},
                 sample=np.ones((2, 2), np.float32))
    with caplog.at_level(logging.WARNING):
        rt = ModelRegistry(tmp_path, threads=1).get("logm")
    assert "the warm-up output does not fit the output spec: model returned a non-finite output" in caplog.text
    import pyarrow as pa

    from worker.scoring import score_table
    outcome = score_table(rt, pa.table({"a": [2.0, 0.0], "b": [1.0, 1.0]}), ["a", "b"], 0, 8)
    recs = outcome.outputs.to_pylist()
    assert [r["row"] for r in recs] == [0] and recs[0]["prediction"] == pytest.approx(np.log(2))
    assert [e.row_index for e in outcome.errors] == [1] and "non-finite" in outcome.errors[0].message


def test_a_failed_load_does_not_evict_a_healthy_model(iris_models, tmp_path):
    """With room for one model, failing to load another leaves the cached one in place
    (regression: it was unloaded first, then reloaded after every failure)."""
    import shutil

    models_dir, _ = iris_models
    repo = tmp_path / "models"
    shutil.copytree(models_dir / "iris" / "1", repo / "iris" / "1")
    shutil.copytree(models_dir / "iris" / "1", repo / "broken" / "1")
    manifest = repo / "broken" / "1" / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("name: iris", "name: broken"))
    (repo / "broken" / "1" / "model.skops").write_bytes(b"not a skops file")
    reg = ModelRegistry(repo, max_models=1)
    good = reg.get("iris")
    for _ in range(2):
        with pytest.raises(ModelLoadError):
            reg.get("broken")
    assert reg.loaded() == ["iris/1"] and reg.get("iris") is good and good.model is not None


def test_loaded_models_can_be_read_while_a_load_runs(iris_models, monkeypatch):
    """The heartbeat's view of loaded models never waits for a load in progress
    (regression: heartbeats stopped for the whole load and warm-up). The load is held
    until ``loaded()`` has answered, so a ``loaded()`` that waited for it would never
    answer: events, no clock."""
    import threading

    import worker.registry as registry

    models_dir, _ = iris_models
    reg = ModelRegistry(models_dir, max_models=4)
    reg.get("iris", 1)
    original = registry.load_runtime
    loading_started, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        loading_started.set()
        assert release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(registry, "load_runtime", held)
    loading = threading.Thread(target=reg.get, args=("iris", 2))
    loading.start()
    assert loading_started.wait(30)
    seen: list[list[str]] = []
    reader = threading.Thread(target=lambda: seen.append(reg.loaded()), daemon=True)
    reader.start()
    reader.join(30)
    answered_during_the_load = not reader.is_alive()
    release.set()
    loading.join()
    assert answered_during_the_load and seen == [["iris/1"]]
    assert reg.loaded() == ["iris/1", "iris/2"]


def test_preloading_more_models_than_the_cache_keeps_is_refused(iris_models, tmp_path):
    from ml_framework.errors import SettingsError
    from ml_framework.settings import load_settings

    models_dir, _ = iris_models
    with pytest.raises(ValueError, match="3 models to preload but at most 2 stay loaded"):
        ModelRegistry(models_dir, max_models=2).preload(["iris:1", "iris:2", "iris:3"])
    with pytest.raises(SettingsError, match=r"worker_preload_models names 2 models but worker_max_cached_models \(1\)"):
        load_settings(None, worker_preload_models=["a", "b"],
                      worker_max_cached_models=1)


def test_a_failed_batch_is_freed_before_its_halves_run():
    """When a batch fails, its activations are released before the halves are tried
    (regression: the retry ran inside the except block, whose traceback kept them alive:
    PyTorch's documented out-of-memory recovery pitfall)."""
    import weakref

    class Activations(TightMemoryModel):
        def load(self) -> None:
            super().load()
            self.failed: list[weakref.ref] = []
            self.alive_at_start: list[int] = []

        def predict_batch(self, x: np.ndarray) -> np.ndarray:
            self.alive_at_start.append(sum(r() is not None for r in self.failed))
            activation = np.ones((len(x), 1000))  # grows with the batch, as a forward pass's
            if len(x) > self.limit:
                self.failed.append(weakref.ref(activation))
                raise MemoryError(f"cannot allocate activations for {len(x)} rows")
            return np.stack([x[:, 0], 1 - x[:, 0]], axis=1)

    rt = Activations(_manifest(), ".")
    rt.load()
    run = rt.run(np.zeros((8, 1), np.float32), 8)
    assert run.ok.all() and run.oom_splits == 3
    assert rt.alive_at_start == [0] * 7  # 8 -> 4+4 -> 2+2+2+2: no failed batch alive at any start


def test_torchscript_out_of_memory_is_recognised_and_split(tmp_path):
    """The torch runtime sees the OOM through TorchScript's wrapped error and splits."""
    from worker.export import export_torch

    export_torch(oom_above(4, 4, 3), tmp_path, "oom", method="script", inputs={"columns": ["a", "b", "c", "d"]},
                 outputs={"kind": "classification", "labels": ["x", "y", "z"], "activation": "softmax"})
    rt = ModelRegistry(tmp_path, threads=1).get("oom")  # warm-up (32 rows) splits, and succeeds
    assert rt.batch_limit == 4  # the OOM was recognised through TorchScript's wrapper: 32 -> ... -> 4
    run = rt.run(np.ones((16, 4), np.float32), 16)
    assert run.ok.all() and run.oom_splits == 0 and run.batches == 4  # starts at the size that fits


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
    base, fast = (reg.get("cnn", v).run(x, 32).outputs for v in (1, 2))
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
    eager, xla = (reg.get("k", v).run(x, 16).outputs for v in (1, 2))
    assert reg.get("k", 2)._fn is not None
    np.testing.assert_allclose(xla, eager, rtol=1e-4, atol=1e-5)
