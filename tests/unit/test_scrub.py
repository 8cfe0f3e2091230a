"""Error bodies hide server paths but echo the caller's names (producer/api/errors.py scrub;
worker/outcomes.py hide_roots). A column named ``a[/]`` came back as ``a[<path>`` (found by
the fresh-clone walkthrough); a model that failed to load named its file's server path in
the row errors of /v1 results (found by the break test)."""

from __future__ import annotations

from pathlib import Path

from producer.api.errors import scrub
from worker.outcomes import hide_roots


def test_names_with_a_slash_are_echoed_and_server_paths_hidden(tmp_path):
    data = tmp_path / "data"
    message = ("missing column(s) 'pixel_0' (the file has 'a[/]', 'x/y', 'b+/c'); "
               f"dataset {data}/d.csv; model at /srv/models/m/1/model.onnx; see /v1/jobs and (/etc/passwd)")
    out = scrub(message, [data])
    assert "'a[/]'" in out and "'x/y'" in out and "'b+/c'" in out
    assert "dataset d.csv;" in out and "model at <path>;" in out and "(<path>)" in out and "/v1/jobs" in out
    assert str(tmp_path) not in out and "/srv" not in out and "/etc" not in out


def test_a_shard_reason_names_the_model_file_under_the_models_directory(tmp_path):
    models = tmp_path / "models"
    reason = f"{models}/dig-onnx/2/ok.onnx: onnxruntime failed to load; Load model from {models.resolve()}/dig-onnx/2/ok.onnx"
    out = hide_roots(reason, [models, Path("data")])
    assert out == "dig-onnx/2/ok.onnx: onnxruntime failed to load; Load model from dig-onnx/2/ok.onnx"
