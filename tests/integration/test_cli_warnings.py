"""What `mlf score --wait` says about a job no worker takes while live workers run: each
warning once, as a `warning:` line, and a timeout that refers to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from tests.conftest import REDIS_URL, check_redis, queues
from tests.integration.test_worker_startup_output import start_and_wait_ready
from worker.export import export_sklearn

pytestmark = pytest.mark.integration


def test_score_wait_on_a_queue_nobody_consumes_warns_once(tmp_path):
    """A worker on Redis consumes queue Q; `mlf score --wait` sends to Q.typo: the
    unconsumed-queue warning is printed once (a `warning:` line on stderr, no log line on
    stdout), and the timeout's error says no worker took the job, as warned."""
    check_redis()
    x, y = load_iris(return_X_y=True)
    columns = ["a", "b", "c", "d"]
    export_sklearn(LogisticRegression(max_iter=500).fit(x, y), tmp_path / "models", "iris",
                   inputs={"columns": columns})
    pd.DataFrame(x[:10], columns=columns).to_csv(tmp_path / "iris.csv", index=False)
    names = queues("mlf.cli-warn.")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update(ML_FRAMEWORK_VAR_DIR=str(tmp_path / "var"), ML_FRAMEWORK_MODELS_DIR=str(tmp_path / "models"),
               ML_FRAMEWORK_WORKER_METRICS_PORT="0", ML_FRAMEWORK_BROKER_URL=REDIS_URL,
               **{f"ML_FRAMEWORK_{k.upper()}": v for k, v in names.items()})
    proc, _, _ = start_and_wait_ready(env, tmp_path, 1)
    try:
        run = subprocess.run(
            [sys.executable, "-c", "from producer.cli import main; main()", "score", str(tmp_path / "iris.csv"),
             "--model", "iris", "--wait", "--timeout", "9"],
            env={**env, "ML_FRAMEWORK_BULK_QUEUE": names["bulk_queue"] + ".typo"}, capture_output=True, text=True,
            timeout=120, check=False)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 6, output
    assert output.count("no live worker consumes it") == 1, output
    assert f"warning: job {run.stderr.split('job ')[1].split()[0]} is still PENDING: queue " in run.stderr, output
    assert " - WARNING - " not in output, output
    assert "no worker took it, as the warning above says" in run.stderr and "are workers running" not in output
