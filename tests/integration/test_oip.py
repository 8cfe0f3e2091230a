"""The Open Inference Protocol (/v2) through an unmodified ``tritonclient[http]`` client,
against a real uvicorn API process, real worker processes, broker and results store (both
backends)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from demo.digits import PIXELS
from tests.conftest import api_server
from tests.integration.test_online import expected_labels

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the skip

pytestmark = pytest.mark.integration
KEY = "oip-user-key-0123456789abcdef"
INT_MODEL = "digits-int64"
BROKEN_MODEL = "digits-broken"


def auth() -> dict[str, str]:
    """The key's header, in a new dict each call: tritonclient's ``infer`` adds its
    binary-data header to the dict it is given."""
    return {"X-API-Key": KEY}


@pytest.fixture(scope="session")
def int64_model(trained, digits):
    """A logistic regression over the raw integer pixels (0-16), published beside the demo
    models as ``digits-int64`` with ``inputs.dtype: int64``; returns the fitted model."""
    from sklearn.linear_model import LogisticRegression

    from worker.export import export_sklearn

    train = digits.frame[digits.frame["split"] == "train"]
    clf = LogisticRegression(max_iter=3000, random_state=0).fit(train[PIXELS].to_numpy(np.int64), train["label"])
    export_sklearn(clf, trained[0], INT_MODEL, inputs={"columns": PIXELS, "dtype": "int64", "shape": [64]})
    return clf


@pytest.fixture(scope="session")
def broken_model(trained) -> str:
    """``digits-sklearn`` published again as ``digits-broken`` with its artifact's bytes
    garbled: manifest and file name pass the producer's checks, the workers cannot load it."""
    target = trained[0] / BROKEN_MODEL
    shutil.copytree(trained[0] / "digits-sklearn", target)
    for manifest in target.glob("*/manifest.yaml"):
        spec = yaml.safe_load(manifest.read_text())
        manifest.write_text(yaml.safe_dump({**spec, "name": BROKEN_MODEL}))
        (manifest.parent / spec["artifact"]).write_bytes(b"not a model " * 100)
    return BROKEN_MODEL


@pytest.fixture
def server(backend, int64_model, tmp_path: Path):
    """``uvicorn producer.api:app`` over the backend's broker, store and models, with one
    user key; yields its ``host:port``."""
    env = {**backend.env, "ML_FRAMEWORK_API_KEYS": f"tests={KEY}", "ML_FRAMEWORK_LOG_TO_FILE": "false"}
    with api_server(env, tmp_path / "api.log") as (url, _):
        yield url.removeprefix("http://")


def test_server_live_ready_and_metadata(server):
    """Health endpoints answer without a key; model metadata names versions, platform and
    tensors with v2 datatypes and -1 for the batch; no key is refused with the spec's body."""
    bare = httpclient.InferenceServerClient(server)
    client = httpclient.InferenceServerClient(server)
    assert bare.is_server_live() and bare.is_server_ready()
    assert client.is_model_ready("digits-torch", headers=auth())
    meta = client.get_model_metadata("digits-torch", headers=auth())
    assert meta["name"] == "digits-torch" and meta["platform"] == "pytorch_libtorch" and "1" in meta["versions"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "prediction", "datatype": "INT64", "shape": [-1]},
                               {"name": "score", "datatype": "FP64", "shape": [-1]},
                               {"name": "probabilities", "datatype": "FP64", "shape": [-1, 10]}]
    int_meta = client.get_model_metadata(INT_MODEL, model_version="1", headers=auth())
    assert int_meta["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1, 64]}]
    assert client.get_server_metadata(headers=auth())["extensions"] == ["binary_tensor_data"]
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("digits-torch")
    assert exc.value.status() == "401" and "missing or wrong API key" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("no-such-model", headers=auth())
    assert exc.value.status() == "404" and exc.value.message() == "model 'no-such-model' not found"


@pytest.mark.parametrize("binary", [False, True])
def test_fp32_inference_matches_the_model(server, trained, digits, binary):
    """FP32 rows [N, 1, 8, 8] (JSON or binary tensor data) give the torch model's own
    labels, probabilities [N, 10] that sum to 1, and the request id echoed."""
    frame = digits.frame.iloc[:6]
    x = frame[PIXELS].to_numpy(np.float32).reshape(6, 1, 8, 8)  # raw pixels: the manifest scales them
    given = httpclient.InferInput("input", [6, 1, 8, 8], "FP32")
    given.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("prediction", "probabilities")]
    client = httpclient.InferenceServerClient(server)
    result = client.infer("digits-torch", [given], outputs=wanted, request_id="req-7", headers=auth())
    assert result.get_response()["id"] == "req-7" and result.get_response()["model_version"] == "1"
    assert result.as_numpy("prediction").tolist() == expected_labels(trained, "torch", frame)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (6, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert result.as_numpy("score") is None  # not asked for


def test_int64_inference_matches_the_model(server, int64_model, digits):
    """INT64 rows [N, 64] of raw pixels give the scikit-learn model's own predictions (all
    outputs when none are named)."""
    x = digits.frame[PIXELS].iloc[100:120].to_numpy(np.int64)
    given = httpclient.InferInput("input", list(x.shape), "INT64")
    given.set_data_from_numpy(x)  # tritonclient's default: binary tensor data
    result = httpclient.InferenceServerClient(server).infer(INT_MODEL, [given], headers=auth())
    assert result.as_numpy("prediction").tolist() == int64_model.predict(x).tolist()
    np.testing.assert_allclose(result.as_numpy("probabilities"), int64_model.predict_proba(x), atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("score"), int64_model.predict_proba(x).max(axis=1), atol=1e-6)


def test_a_wrong_shape_datatype_or_name_is_400_naming_it(server):
    """A tensor of the wrong shape, datatype or name is refused (400, the spec's error body)
    before anything is sent to the workers."""
    client = httpclient.InferenceServerClient(server)
    cases = [("input", [2, 63], "INT64", np.zeros((2, 63), np.int64), "shape [2, 63]; the model takes [-1, 64]"),
             ("input", [2, 64], "FP32", np.zeros((2, 64), np.float32), "datatype 'FP32'; the model takes INT64"),
             ("pixels", [2, 64], "INT64", np.zeros((2, 64), np.int64), "unknown input 'pixels'")]
    for name, shape, datatype, data, message in cases:
        given = httpclient.InferInput(name, shape, datatype)
        given.set_data_from_numpy(data, binary_data=False)
        with pytest.raises(InferenceServerException) as exc:
            client.infer(INT_MODEL, [given], request_id=uuid.uuid4().hex, headers=auth())
        assert exc.value.status() == "400" and message in exc.value.message(), exc.value.message()


def test_a_model_the_workers_cannot_load_is_503_naming_the_model(server, broken_model):
    """Inference on a model whose artifact fails to load on the workers: 503, as Triton
    answers a model that is not ready (the request was fine: not 400), naming the model."""
    client = httpclient.InferenceServerClient(server)
    spec = client.get_model_metadata(broken_model, headers=auth())["inputs"][0]
    dtypes = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}
    shape = [2, *spec["shape"][1:]]
    given = httpclient.InferInput(spec["name"], shape, spec["datatype"])
    given.set_data_from_numpy(np.zeros(shape, dtypes[spec["datatype"]]), binary_data=False)
    with pytest.raises(InferenceServerException) as exc:
        client.infer(broken_model, [given], headers=auth())
    assert exc.value.status() == "503", exc.value.message()
    assert f"model {broken_model!r} version 1 could not serve the request" in exc.value.message()
