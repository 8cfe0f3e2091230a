"""`mlf demo` from an empty directory on the embedded default (no servers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_scores_digits_with_three_frameworks(tmp_path):
    """The demo starts its own workers, scores digits with 3 models, and prints accuracies well above chance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    run = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "demo", "--epochs", "5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = re.findall(r"(digits-\w+)\s*│\s*(\w+)\s*│\s*(\w+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*(\d+)"
                      r"\s*│\s*([\d,]+|-)\s*│\s*(warm|\d+\.\d s)\s*│\s*([0-9a-f]{32})", run.stdout)
    assert sorted(r[0] for r in rows) == ["digits-keras", "digits-sklearn", "digits-torch"], run.stdout
    for _name, _fw, state, acc_test, _acc_all, n, _rate, load, _job in rows:
        assert state == "SUCCEEDED" and int(n) == 1797
        assert float(acc_test) > 0.8  # chance is 0.1
        # its own workers, started empty, load each model for its job: the rate includes that
        # load, and the table says how long it took (a warm model's rate is not comparable)
        assert load != "warm", run.stdout
    assert (tmp_path / "var" / "results.sqlite").exists()
    assert sorted(p.name for p in (tmp_path / "var" / "demo").iterdir()) == [
        "digits-keras.csv", "digits-sklearn.csv", "digits-torch.csv"]
    assert "stopping the demo's workers" in run.stderr
    # Quiet by default: each worker process says one line when ready; no Celery banner, no
    # warning about running as root, no TensorFlow start-up notice.
    said = run.stdout + run.stderr
    for noise in ("oneDNN", "[queues]", "-------------- ", "superuser privileges"):
        assert noise not in said, said[-3000:]
    ready = re.findall(r"worker (\S+) ready: device ", said)
    assert ready and len(ready) == len(set(ready)), said[-3000:]
    assert said.count("broker: embedded SQLite (") == 1, said[-3000:]  # where its jobs go, said once
