"""`mlf score --wait` with no worker running says so and honours --timeout."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from worker.export import export_sklearn


def test_score_wait_without_workers_warns_and_times_out(tmp_path):
    """No heartbeat: a warning names `mlf worker`; --timeout ends the wait with exit code 6."""
    x, y = load_iris(return_X_y=True)
    columns = ["a", "b", "c", "d"]
    export_sklearn(LogisticRegression(max_iter=500).fit(x, y), tmp_path / "models", "iris",
                   inputs={"columns": columns})
    pd.DataFrame(x, columns=columns).to_csv(tmp_path / "iris.csv", index=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update(ML_FRAMEWORK_MODELS_DIR=str(tmp_path / "models"), ML_FRAMEWORK_VAR_DIR=str(tmp_path / "var"))
    run = subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", "score", str(tmp_path / "iris.csv"),
         "--model", "iris", "--wait", "--timeout", "2"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 6, run.stderr
    assert "no worker heartbeat" in run.stderr and "mlf worker" in run.stderr
    assert "still PENDING after 2" in run.stderr
    # said once, as a warning, and the timeout refers to it instead of asking again
    assert (run.stdout + run.stderr).count("no worker heartbeat") == 1, run.stdout + run.stderr
    assert "as the warning above says" in run.stderr and "are workers running" not in run.stderr


def test_bad_output_path_is_refused_before_submitting(tmp_path):
    """`-o out.txt` and `-o <directory>` fail at once with a clear message, submitting nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env["ML_FRAMEWORK_VAR_DIR"] = str(tmp_path / "var")
    (tmp_path / "dir.csv").mkdir()
    for target, needle in (("out.txt", ".parquet or .csv"), ("dir.csv", "is a directory")):
        run = subprocess.run(
            [sys.executable, "-c", "from producer.cli import main; main()", "score", "whatever.csv",
             "--model", "m", "-o", str(tmp_path / target)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )
        assert run.returncode == 1 and needle in run.stderr
        assert not (tmp_path / "var").exists()  # nothing was submitted


def test_unwritable_output_and_huge_batch_size_are_refused(tmp_path):
    """An -o inside a file, or a batch size beyond the store's range, fails before submitting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env["ML_FRAMEWORK_VAR_DIR"] = str(tmp_path / "var")
    (tmp_path / "file.csv").write_text("a\n1\n")
    mlf = [sys.executable, "-c", "from producer.cli import main; main()", "score", "whatever.csv", "--model", "m"]
    run = subprocess.run([*mlf, "-o", str(tmp_path / "file.csv" / "out.csv")],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and "cannot write there" in run.stderr
    run = subprocess.run([*mlf, "--batch-size", "3000000000"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "batch-size" in run.stderr
    assert not (tmp_path / "var").exists()


def test_negative_durations_are_refused_before_anything_runs(tmp_path):
    """`mlf score --timeout -1` (which waited "-1.0 s") and `mlf worker --grace -1` are
    usage errors (exit 2) naming the option; nothing is submitted or started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env["ML_FRAMEWORK_VAR_DIR"] = str(tmp_path / "var")
    mlf = [sys.executable, "-c", "from producer.cli import main; main()"]
    for args, option in ((["score", "whatever.csv", "--model", "m", "--wait", "--timeout", "-1"], "--timeout"),
                         (["worker", "--grace", "-1"], "--grace")):
        run = subprocess.run([*mlf, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 2 and option in run.stderr, run.stderr
    assert not (tmp_path / "var").exists()
