"""ONNX models: skl2onnx and torch.onnx exports predict as their native runtimes do, the
graph's input / output names and dtypes are checked when a model is added, the CUDA
execution provider is asked for on the process's GPU, and ONNX Runtime is imported only by
processes that serve an ONNX model."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import LogisticRegression, Ridge

from demo import digits as d
from ml_framework.errors import ManifestError
from ml_framework.manifest import ModelManifest, ModelRepository, artifact_format
from worker.export import add_artifact, export_sklearn, export_torch
from worker.export_onnx import export_onnx_sklearn, export_onnx_torch
from worker.registry import ModelRegistry, check_signature
from worker.runtimes import onnx as onnx_runtime

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
TOLERANCE = 1e-5  # the bound between an ONNX export and its native runtime


@pytest.fixture(scope="module")
def digits():
    """The demo's digits data: the test split's pixels (N, 64) float32 in [0, 1]."""
    data = d.load_data()
    return data, data.xy("test")[0]


@pytest.fixture(scope="module")
def cnn(digits):
    """The demo CNN, trained one epoch: (N, 1, 8, 8) float32 -> (N, 10) logits."""
    return d.fit_torch(digits[0], epochs=1)


def test_sklearn_classifier_via_skl2onnx_predicts_as_its_skops_runtime(tmp_path, digits):
    """A logistic regression on digits: the ONNX graph's probabilities equal the skops runtime's within 1e-5."""
    data, x = digits
    clf = d.fit_sklearn(data)
    native = export_sklearn(clf, tmp_path, "digits-skops", **d._common("skops", [64]))
    onnx = export_onnx_sklearn(clf, tmp_path, "digits-onnx", **d._common("onnx", [64]))
    assert (onnx.framework, onnx.artifact, onnx.onnx.input, onnx.onnx.output) == (
        "onnx", "model.onnx", "input", "probabilities")
    assert onnx.outputs == native.outputs
    registry = ModelRegistry(tmp_path, threads=1)
    want = registry.get("digits-skops").predict_batch(x)
    got = registry.get("digits-onnx").predict_batch(x)
    assert got.shape == want.shape == (len(x), 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


def test_rank_two_graph_takes_shaped_rows_flattened(tmp_path, digits):
    """A skl2onnx graph takes (N, 64); rows declared [1, 8, 8] are flattened for it and score as predict_proba."""
    data, x = digits
    clf = d.fit_sklearn(data)
    export_onnx_sklearn(clf, tmp_path, "digits-onnx", **d._common("onnx", [1, 8, 8]))
    runtime = ModelRegistry(tmp_path, threads=1).get("digits-onnx")
    check_signature(runtime)
    assert runtime.flattens_input and runtime.signature.row_shape == (64,)
    np.testing.assert_allclose(runtime.predict_batch(x.reshape(-1, 1, 8, 8)), clf.predict_proba(x), rtol=0, atol=TOLERANCE)


def test_sklearn_regressor_via_skl2onnx_predicts_as_its_skops_runtime(tmp_path):
    """A ridge regression on the diabetes data (float64 inputs): its only output, within 1e-5 of skops."""
    x, y = load_diabetes(return_X_y=True)
    columns = [f"f{i}" for i in range(x.shape[1])]
    model = Ridge(alpha=0.5).fit(x, y)
    inputs = {"columns": columns, "dtype": "float64"}
    export_sklearn(model, tmp_path, "ridge-skops", inputs=inputs)
    manifest = export_onnx_sklearn(model, tmp_path, "ridge-onnx", inputs=inputs)
    assert manifest.outputs.kind == "regression" and manifest.onnx.output == "variable"
    registry = ModelRegistry(tmp_path, threads=1)
    want = registry.get("ridge-skops").predict_batch(x)
    got = registry.get("ridge-onnx").predict_batch(x)
    np.testing.assert_allclose(got.reshape(-1), want.reshape(-1), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_torch_module_via_torch_onnx_predicts_as_its_torch_runtime(tmp_path, digits, cnn, dynamo):
    """The digits CNN exported by torch.onnx (dynamic batch): logits within 1e-5 of the torch.export runtime."""
    _, x = digits
    outputs = {"kind": "classification", "labels": d.LABELS, "activation": "softmax"}
    export_torch(cnn, tmp_path, "cnn-torch", outputs=outputs, **d._common("torch", [1, 8, 8]))
    manifest = export_onnx_torch(cnn, tmp_path, "cnn-onnx", outputs=outputs, dynamo=dynamo,
                                 **d._common("onnx", [1, 8, 8]))
    registry = ModelRegistry(tmp_path, threads=1)
    runtime = registry.get("cnn-onnx")
    assert runtime.signature.row_shape == (1, 8, 8) and runtime.signature.output_width == 10
    rows = x.reshape(-1, *manifest.row_shape)
    want = registry.get("cnn-torch").predict_batch(rows)
    for n in (1, 7, len(rows)):  # the batch axis is dynamic
        np.testing.assert_allclose(runtime.predict_batch(rows[:n]), want[:n], rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def iris_graph(tmp_path_factory):
    """An iris logistic regression converted by skl2onnx without ZipMap: input ``X``
    (N, 4) float32, outputs ``label`` and ``probabilities``; and one with ZipMap."""
    from skl2onnx import to_onnx

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x, y)
    folder = tmp_path_factory.mktemp("iris-onnx")
    plain, zipmap = folder / "iris.onnx", folder / "iris-zipmap.onnx"
    sample = x[:1].astype(np.float32)
    plain.write_bytes(to_onnx(model, sample, options={id(model): {"zipmap": False}}).SerializeToString())
    zipmap.write_bytes(to_onnx(model, sample).SerializeToString())
    return plain, zipmap


def iris_manifest(**extra) -> dict:
    return {"name": "iris", "framework": "onnx", "inputs": {"columns": IRIS_COLUMNS},
            "outputs": {"kind": "classification", "labels": [0, 1, 2]}, **extra}


def test_add_onnx_file_with_named_output(tmp_path, iris_graph):
    """add_artifact publishes a .onnx file whose manifest names the graph's output; the recorded signature fits."""
    manifest = add_artifact(iris_graph[0], tmp_path, iris_manifest(onnx={"output": "probabilities"}))
    assert manifest.artifact == "iris.onnx" and manifest.onnx.output == "probabilities"
    runtime = ModelRegistry(tmp_path).get("iris")
    check_signature(runtime)
    assert runtime.signature.row_shape == (4,) and runtime.signature.dtype == "float32"
    x, _ = load_iris(return_X_y=True)
    assert np.allclose(runtime.predict_batch(x[:3].astype(np.float32)).sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, r"onnx\.output: the graph {file} has 2 outputs \('label' tensor\(int64\).*'probabilities'.*name the one"),
    ({"onnx": {"output": "probs"}}, r"onnx\.output: the graph {file} has no output 'probs'; its outputs: 'label'"),
    ({"onnx": {"input": "x", "output": "probabilities"}}, r"onnx\.input: the graph {file} has no input 'x'; its inputs: 'X'"),
    ({"onnx": {"output": "probabilities"}, "inputs": {"columns": IRIS_COLUMNS, "dtype": "float64"}},
     r"inputs\.dtype: the manifest feeds float64 but the graph {file}'s input 'X' takes float32; set inputs\.dtype: float32"),
])
def test_add_refuses_names_and_dtypes_the_graph_lacks(tmp_path, iris_graph, extra, expected):
    """A manifest whose input/output names or input dtype do not fit the graph is refused, naming the user's file; nothing is added."""
    import re

    with pytest.raises(ManifestError, match=expected.format(file=re.escape(str(iris_graph[0])))):
        add_artifact(iris_graph[0], tmp_path / "models", iris_manifest(**extra), manifest_path="iris.yaml")
    assert ModelRepository(tmp_path / "models").versions("iris") == []


def test_add_refuses_a_zipmap_output_with_the_fix(tmp_path, iris_graph):
    """skl2onnx's default ZipMap output (a sequence of maps) is refused with the conversion option that avoids it."""
    with pytest.raises(ManifestError, match=r"output_probability' is seq\(map\(int64,tensor\(float\)\)\).*zipmap': False"):
        add_artifact(iris_graph[1], tmp_path, iris_manifest(onnx={"output": "output_probability"}))


def tiny_graph(path, shape: list, elem_type: int) -> None:
    """Write an ONNX graph ``y = Identity(x)`` whose input ``x`` has ``shape`` and element type ``elem_type``."""
    from onnx import helper

    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime 1.20+ reads
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(("shape", "elem", "expected"), [  # elem: onnx.TensorProto 1 FLOAT, 10 FLOAT16
    ([2, 4], 1, r"input 'x' has shape \[2, 4\]: its first axis must be a dynamic batch axis"),
    (["batch", 4], 10, r"inputs\.dtype: the manifest feeds float32 but the graph .*'s input 'x' takes float16; "
                       r"the manifest feeds float32 \| float64 \| int32 \| int64: export the graph"),
], ids=["fixed-batch", "float16"])
def test_add_refuses_graphs_the_batches_cannot_feed(tmp_path, shape, elem, expected):
    """A graph with a fixed batch size, or an input dtype no manifest can declare, is refused with how to export it."""
    path = tmp_path / "tiny.onnx"
    tiny_graph(path, shape, elem)
    manifest = {"name": "tiny", "framework": "onnx", "inputs": {"columns": ["a", "b", "c", "d"]},
                "outputs": {"kind": "embedding", "size": 4}}
    with pytest.raises(ManifestError, match=expected):
        add_artifact(path, tmp_path / "models", manifest)
    tiny_graph(path, ["batch", 4], 1)  # the same graph with a dynamic batch axis and float32 input is served
    assert add_artifact(path, tmp_path / "models", manifest).onnx is None


def test_onnx_file_under_another_framework_is_named_as_onnx(tmp_path, iris_graph):
    """An .onnx file is recognised from its bytes; under framework torch the error says to set framework: onnx."""
    assert artifact_format(iris_graph[0]) == "onnx"
    with pytest.raises(ManifestError, match="this is an ONNX model.*set framework: onnx"):
        add_artifact(iris_graph[0], tmp_path, {**iris_manifest(), "framework": "torch"})


def test_onnx_section_belongs_to_framework_onnx():
    """The manifest's onnx section is refused for another framework."""
    with pytest.raises(ValueError, match="applies to framework: onnx only"):
        ModelManifest.model_validate({**iris_manifest(onnx={"output": "p"}), "version": 1, "framework": "sklearn",
                                      "artifact": "m.skops"})


def test_cli_models_add_onnx(tmp_path, iris_graph):
    """`mlf models add iris.onnx` publishes it and prints the framework; a wrong output name exits 1 naming the file."""
    manifest = tmp_path / "iris.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env["ML_FRAMEWORK_MODELS_DIR"] = str(tmp_path / "models")
    mlf = [sys.executable, "-c", "from producer.cli import main; main()"]
    manifest.write_text(yaml.safe_dump(iris_manifest(onnx={"output": "probs"})))
    run = subprocess.run([*mlf, "models", "add", str(iris_graph[0]), "--manifest", str(manifest)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and f"the graph {iris_graph[0]} has no output 'probs'" in run.stderr, run.stderr
    manifest.write_text(yaml.safe_dump(iris_manifest(onnx={"output": "probabilities"})))
    run = subprocess.run([*mlf, "models", "add", str(iris_graph[0]), "--manifest", str(manifest)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "added iris/1" in run.stdout and "framework  onnx (iris.onnx)" in run.stdout


def test_session_uses_the_worker_thread_count(tmp_path, iris_graph):
    """The session's intra-op threads are the worker's; inter-op parallelism is off."""
    add_artifact(iris_graph[0], tmp_path, iris_manifest(onnx={"output": "probabilities"}))
    options = ModelRegistry(tmp_path, threads=3).get("iris").model.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)


def fake_ort(available: list[str]) -> SimpleNamespace:
    """An ``onnxruntime`` stand-in that reports ``available`` providers and records preloads."""
    fake = SimpleNamespace(preloaded=[], get_available_providers=lambda: available)
    fake.preload_dlls = lambda **kw: fake.preloaded.append(kw)
    return fake


def test_cuda_provider_on_the_pinned_gpu_with_its_memory_share(monkeypatch):
    """With a GPU visible and a CUDA build: CUDA on device 0 (the pinned one), capped at the process's share, then CPU."""
    gpu = SimpleNamespace(memory_total_bytes=80 * 2**30)
    monkeypatch.setattr(onnx_runtime, "discover", lambda: SimpleNamespace(gpus=[gpu]))
    monkeypatch.setenv("MLF_DEVICE_MEMORY_FRACTION", "0.25")
    ort = fake_ort(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_runtime.session_providers(ort) == [
        ("CUDAExecutionProvider", {"device_id": 0, "gpu_mem_limit": 20 * 2**30}), "CPUExecutionProvider"]
    assert ort.preloaded == [{"cuda": True, "cudnn": True, "msvc": False}]
    monkeypatch.delenv("MLF_DEVICE_MEMORY_FRACTION")
    assert onnx_runtime.session_providers(ort)[0] == ("CUDAExecutionProvider", {"device_id": 0})


@pytest.mark.parametrize(("gpus", "available"), [
    ([], ["CUDAExecutionProvider", "CPUExecutionProvider"]),  # onnxruntime-gpu on a host without a GPU
    ([SimpleNamespace(memory_total_bytes=1)], ["CPUExecutionProvider"]),  # a GPU, but the CPU build
])
def test_cpu_provider_without_a_gpu_or_a_cuda_build(monkeypatch, gpus, available):
    """No visible GPU, or ONNX Runtime without CUDA: the CPU provider alone, nothing preloaded."""
    monkeypatch.setattr(onnx_runtime, "discover", lambda: SimpleNamespace(gpus=gpus))
    ort = fake_ort(available)
    assert onnx_runtime.session_providers(ort) == ["CPUExecutionProvider"] and ort.preloaded == []


def test_out_of_memory_errors_are_recognised(tmp_path, iris_graph):
    """ONNX Runtime's allocation failures count as out-of-memory (so batches split); other errors do not."""
    add_artifact(iris_graph[0], tmp_path, iris_manifest(onnx={"output": "probabilities"}))
    runtime = ModelRegistry(tmp_path).get("iris")
    fail = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
                        "Gemm node. CUDA failure 2: out of memory")
    assert runtime.is_out_of_memory(fail) and runtime.is_out_of_memory(MemoryError())
    assert runtime.is_out_of_memory(RuntimeError("Failed to allocate memory for requested buffer of size 4096"))
    assert not runtime.is_out_of_memory(RuntimeError("Got invalid dimensions for input: X"))


def test_onnxruntime_is_imported_only_to_serve_an_onnx_model(tmp_path, iris_graph):
    """A process that serves a scikit-learn model never imports onnxruntime; one that serves an ONNX model does."""
    x, y = load_iris(return_X_y=True)
    export_sklearn(LogisticRegression(max_iter=500).fit(x, y), tmp_path, "iris-skops", inputs={"columns": IRIS_COLUMNS})
    add_artifact(iris_graph[0], tmp_path, iris_manifest(onnx={"output": "probabilities"}))
    program = ("import sys; from worker.registry import ModelRegistry; r = ModelRegistry(sys.argv[1]); "
               "r.get('iris-skops'); print('onnxruntime' in sys.modules); r.get('iris'); print('onnxruntime' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", program, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["False", "True"], run.stderr[-2000:]
