"""What `mlf worker` and `mlf models add` print: no Celery banner, root warning or
TensorFlow start-up notice per process unless --loglevel debug; `models add` errors that
name the user's files and leave nothing behind, and a short summary on success."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from ml_framework.logging import native_stderr_filtered
from ml_framework.manifest import ModelManifest
from ml_framework.settings import get_settings, load_settings
from producer import cli as cli_module
from producer.cli import app
from worker.export import export_sklearn
from worker.launcher import plan_children

CHECK_PRIVILEGES = "from celery.platforms import check_privileges; check_privileges({'application/json'})"


def test_worker_processes_are_quiet_unless_debug():
    """At INFO each child runs `celery --quiet` (no banner) and hides Celery's root warning;
    at DEBUG it shows both. The warning filter really hides the warning (checked as root)."""
    info = plan_children(load_settings(logging_level="INFO"), processes=1)[0]
    debug = plan_children(load_settings(logging_level="DEBUG"), processes=1)[0]
    assert info.argv.index("--quiet") < info.argv.index("worker")
    assert "--quiet" not in debug.argv
    assert "superuser privileges" in info.env["PYTHONWARNINGS"]
    assert "superuser privileges" not in debug.env.get("PYTHONWARNINGS", "")
    if os.geteuid() != 0:
        pytest.skip("Celery warns about privileges only when run as root")
    shown = subprocess.run([sys.executable, "-c", CHECK_PRIVILEGES], env=debug.env, capture_output=True, text=True,
                           timeout=60, check=True)
    hidden = subprocess.run([sys.executable, "-c", CHECK_PRIVILEGES], env=info.env, capture_output=True, text=True,
                            timeout=60, check=True)
    assert "superuser privileges" in shown.stderr
    assert "superuser privileges" not in hidden.stderr


def test_native_stderr_noise_is_logged_not_printed(capfd, caplog):
    """Lines written to file descriptor 2 (as native code writes) inside the block reach
    stderr, except the noise, which is logged at DEBUG."""
    caplog.set_level("DEBUG", logger="ml_framework.logging")
    with native_stderr_filtered(["oneDNN custom operations"]):
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\nE0000 a real problem\n")
    err = capfd.readouterr().err
    assert "a real problem" in err and "oneDNN" not in err
    assert "oneDNN custom operations are on" in caplog.text


def test_tensorflow_import_prints_no_onednn_notice():
    """Importing TensorFlow as the worker's runtime does prints no oneDNN notice; a plain
    import (the control) does."""
    plain = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                           timeout=300, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    ours = subprocess.run([sys.executable, "-c", "from worker.runtimes.tensorflow import import_tensorflow; "
                           "import_tensorflow()"], capture_output=True, text=True, timeout=300, check=True)
    if "oneDNN" not in plain.stderr:
        pytest.skip("this TensorFlow build prints no oneDNN notice")
    assert "oneDNN" not in ours.stderr, ours.stderr


@pytest.fixture
def models_add(monkeypatch, tmp_path):
    """``mlf models add ARGS`` in this process with models under ``tmp_path/models``, a
    skops artifact ``tmp_path/flowers.skops`` and its manifest fields."""
    for name in list(os.environ):
        if name.startswith("ML_FRAMEWORK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ML_FRAMEWORK_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("ML_FRAMEWORK_VAR_DIR", str(tmp_path / "var"))
    x, y = load_iris(return_X_y=True)
    made = export_sklearn(LogisticRegression(max_iter=500).fit(x, y), tmp_path / "export", "iris",
                          inputs={"columns": ["a", "b", "c", "d"]})
    (tmp_path / "export" / "iris" / "1" / made.artifact).rename(tmp_path / "flowers.skops")
    fields = {k: v for k, v in made.model_dump(mode="json").items() if k not in ("version", "artifact")}
    cli_module.load_plugins()

    def run(manifest: dict, *args: str):
        path = tmp_path / "flowers.yaml"
        path.write_text(yaml.safe_dump(manifest))
        get_settings.cache_clear()
        return CliRunner().invoke(app, ["models", "add", str(tmp_path / "flowers.skops"), "--manifest", str(path),
                                        *args])

    yield run, {**fields, "name": "flowers"}
    get_settings.cache_clear()


def test_models_add_mismatch_names_the_users_files_and_leaves_nothing(models_add, tmp_path):
    """A manifest saying torch / model.pt2 for a skops file: the error names the user's
    file and manifest (no staging path, no model.pt2) and no directory is left."""
    run, fields = models_add
    result = run({**fields, "framework": "torch", "artifact": "model.pt2"})
    assert result.exit_code == 1, result.output
    message = result.stderr
    assert f"{tmp_path / 'flowers.skops'}: this is a scikit-learn skops file, but framework says 'torch'" in message
    assert str(tmp_path / "flowers.yaml") in message
    assert ".staging" not in message and "model.pt2" not in message
    assert not (tmp_path / "models").exists()


def test_models_add_refuses_an_artifact_name_of_another_file_type(models_add, tmp_path):
    """A skops file with framework sklearn but `artifact: model.pt2` (stored under a torch
    file name) is refused, naming the user's file and the manifest field; nothing is left."""
    run, fields = models_add
    result = run({**fields, "artifact": "model.pt2"})
    assert result.exit_code == 1, result.output
    message = result.stderr
    assert f"{tmp_path / 'flowers.skops'}: {tmp_path / 'flowers.yaml'} says artifact: 'model.pt2' is the name of " \
           "a torch.export program, but the file is a scikit-learn skops file" in message, message
    assert "set artifact: model.skops" in message and ".staging" not in message
    assert not (tmp_path / "models").exists()
    renamed = tmp_path / "flowers.keras"  # the same kind through the file's own name
    (tmp_path / "flowers.skops").rename(renamed)
    (tmp_path / "flowers.yaml").write_text(yaml.safe_dump(fields))
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["models", "add", str(renamed), "--manifest", str(tmp_path / "flowers.yaml")])
    assert result.exit_code == 1 and f"{renamed}: its name 'flowers.keras' is the name of a Keras v3 file" in \
        result.stderr, result.output
    assert not (tmp_path / "models").exists()


def test_artifact_names_must_fit_the_files_kind(tmp_path):
    """Each kind of artifact is told apart by layout, and a name whose ending belongs to
    another kind, or a torch.export program not named .pt2, is a mismatch."""
    import torch

    from ml_framework.manifest import artifact_kind, artifact_name_mismatch

    linear = torch.nn.Linear(3, 2)
    torch.export.save(torch.export.export(linear, (torch.zeros(1, 3),)), tmp_path / "a.pt2")
    torch.jit.save(torch.jit.script(linear), tmp_path / "b.pt")
    assert artifact_kind(tmp_path / "a.pt2") == "torch.export"
    assert artifact_kind(tmp_path / "b.pt") == "torchscript"
    assert artifact_name_mismatch(tmp_path / "a.pt2", "model.pt2") is None
    assert artifact_name_mismatch(tmp_path / "b.pt", "model.pt") is None
    assert artifact_name_mismatch(tmp_path / "b.pt", "model.bin") is None  # jit.load takes any name
    assert artifact_name_mismatch(tmp_path / "b.pt", "model.pt2") == (
        "'model.pt2' is the name of a torch.export program, but the file is a TorchScript archive", "model.pt")
    assert artifact_name_mismatch(tmp_path / "a.pt2", "model.pt")[1] == "model.pt2"
    assert artifact_name_mismatch(tmp_path / "a.pt2", "model")[0] == (
        "'model' is a name without .pt2, but the file is a torch.export program")


def test_models_add_load_failure_names_the_users_file_and_leaves_nothing(models_add, tmp_path):
    """An artifact that fails to load is named as given, not by its staging copy."""
    run, fields = models_add
    (tmp_path / "flowers.skops").write_text("not a model")
    result = run(fields)
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'flowers.skops'}: " in result.stderr and ".staging" not in result.stderr
    assert not (tmp_path / "models").exists()


def test_models_add_prints_a_summary_and_the_manifest_with_json(models_add, tmp_path):
    """Success: a few lines (name/version, framework, inputs, outputs, path); --json
    prints the manifest as written."""
    run, fields = models_add
    result = run(fields)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    path = (tmp_path / "models" / "flowers" / "1").resolve()
    assert lines == ["added flowers/1", "  framework  sklearn (flowers.skops)", "  inputs     columns a, b, c, d; float32",
                     "  outputs    classification, 3 labels: 0, 1, 2", f"  path       {path}"]
    result = run(fields, "--json")
    assert result.exit_code == 0, result.output
    assert ModelManifest.model_validate(json.loads(result.stdout)) == ModelManifest.read(
        tmp_path / "models" / "flowers" / "2" / "manifest.yaml")
