"""What /v2 answers where the Open Inference Protocol leaves room: Triton's platform names,
503 for a model the workers could not load (not the client's 400), and 400 for an input
sent both as JSON data and as binary data. The app runs in process on the embedded broker
with no worker; a shard's outcome is recorded through the store's own API (what a worker
calls)."""

from __future__ import annotations

import json
import struct
import threading
import time

import pytest
import yaml
from fastapi.testclient import TestClient

from ml_framework.settings import load_settings
from ml_framework.store import JobState, RowError
from producer.api import create_app
from producer.api.oip import BINARY_HEADER, PLATFORMS
from tests.unit.conftest import model_root

KEY = "oip-unit-key-0123456789abcdef"
AUTH = {"X-API-Key": KEY}
INFER = {"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}],
         "parameters": {"timeout_s": 20}}


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    root = model_root(tmp_path_factory.mktemp("oip"))
    for name, framework, artifact in (("m-torch", "torch", "model.pt"), ("m-onnx", "onnx", "model.onnx"),
                                      ("m-tf", "tensorflow", "model.keras")):
        version = root / "models" / name / "1"
        version.mkdir(parents=True)
        (version / "manifest.yaml").write_text(yaml.safe_dump({
            "name": name, "version": 1, "framework": framework, "artifact": artifact,
            "inputs": {"columns": ["a", "b"]}, "outputs": {"kind": "regression"}}))
    settings = load_settings(models_dir=root / "models", data_dir=root / "data", var_dir=root / "var",
                             bulk_queue="mlf.oip.bulk", online_queue="mlf.oip.online", api_keys={"u": KEY})
    with TestClient(create_app(settings), headers=AUTH) as client:
        yield client


def test_metadata_platform_is_tritons_name(http):
    """Model metadata's platform is Triton's name of each framework (onnxruntime_onnx, not onnx)."""
    assert PLATFORMS == {"torch": "pytorch_libtorch", "tensorflow": "tensorflow_savedmodel",
                         "onnx": "onnxruntime_onnx", "sklearn": "sklearn"}
    for model, platform in (("m", "sklearn"), ("m-torch", "pytorch_libtorch"), ("m-onnx", "onnxruntime_onnx"),
                            ("m-tf", "tensorflow_savedmodel")):
        r = http.get(f"/v2/models/{model}")
        assert r.status_code == 200 and r.json()["platform"] == platform, r.text


def test_an_input_with_both_json_data_and_binary_data_is_refused_naming_it(http):
    """'data' and parameters.binary_data_size on one input: 400 naming the input (was: the
    JSON data silently ignored)."""
    given = {**INFER["inputs"][0], "parameters": {"binary_data_size": 16}}
    header = json.dumps({"inputs": [given]}).encode()
    r = http.post("/v2/models/m/infer", content=header + struct.pack("<4f", 1, 2, 3, 4),
                  headers={BINARY_HEADER: str(len(header)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 400, r.text
    assert r.json() == {"error": "input 'input': both 'data' and the 'binary_data_size' parameter; send the tensor "
                                 "one way"}


def _fail_next_request_as_a_whole(http, reason: str, done: threading.Event) -> None:
    """Act as a worker whose model does not load: the next pending online job's shard
    fails as a whole, every row carrying ``reason``."""
    store = http.app.state.client.store
    while not done.is_set():
        pending = [j for j in store.recent_jobs(10) if j.state is JobState.PENDING]
        if pending:
            job = pending[0]
            assert store.claim_shard(job.job_id, 0, "cpu0@test").value == "RUN"
            store.complete_shard(job.job_id, 0, [], [RowError(r, f"row {r}: shard failed: {reason}")
                                                     for r in range(job.n_rows)], shard_error=reason)
            return
        time.sleep(0.01)


def test_a_model_that_fails_to_load_is_503_not_400(http):
    """Every row failed because the model could not be loaded (the shard's own error): 503
    with the reason, as Triton answers a model that is not ready; a bad request stays 400."""
    reason = "m/1/model.skops: sklearn failed to load: invalid load key"
    done = threading.Event()
    worker = threading.Thread(target=_fail_next_request_as_a_whole, args=(http, reason, done), daemon=True)
    worker.start()
    try:
        r = http.post("/v2/models/m/infer", json=INFER)
    finally:
        done.set()
        worker.join(timeout=10)
    assert r.status_code == 503, r.text
    assert r.json() == {"error": f"model 'm' version 1 could not serve the request: {reason}"}
