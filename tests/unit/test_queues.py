"""Hidden queues: a job sent to a queue the workers do not consume shows in `mlf queues`
(with its messages, its PENDING jobs and, where the broker can tell, no consumer) and in
`mlf status <job>`, on the embedded SQLite transport (on Redis:
tests/integration/test_queues_redis.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml_framework.settings import load_settings
from producer.client import Client
from producer.queues import list_queues


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A repository with ``lr``, a logistic regression over columns ``a`` and ``b``."""
    from sklearn.linear_model import LogisticRegression

    from worker.export import export_sklearn

    x = np.random.default_rng(0).normal(size=(100, 2))
    path = tmp_path_factory.mktemp("models")
    export_sklearn(LogisticRegression().fit(x, (x.sum(axis=1) > 0).astype(int)), path, "lr",
                   inputs={"columns": ["a", "b"]})
    return path


def mlf(values: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def send_to_a_queue_nobody_reads(values: dict) -> tuple[str, str]:
    """Submit a 3-row job with the producer's bulk queue set to a name of its own (as when
    the producer's and the workers' settings differ); returns ``(job id, that queue)``."""
    import pandas as pd

    hidden = f"{values['bulk_queue']}.typo"
    with Client(load_settings(**{**values, "bulk_queue": hidden})) as producer:
        job = producer.score_rows(pd.DataFrame({"a": [0.1, 0.2, 0.3], "b": [1.0, 2.0, 3.0]}), "lr")
    return job.id, hidden


def test_the_embedded_broker_lists_a_queue_no_configured_worker_reads(tmp_path, models):
    values = {"var_dir": tmp_path / "var", "models_dir": models, "bulk_queue": "t.bulk",
              "online_queue": "t.online"}
    job_id, hidden = send_to_a_queue_nobody_reads(values)
    with Client(load_settings(**values)) as client:
        queues = {q.name: q for q in list_queues(client)}
    assert list(queues) == ["t.online", "t.bulk", hidden]
    assert (queues[hidden].waiting, queues[hidden].pending_jobs, queues[hidden].consumers) == (1, [job_id], None)
    assert (queues["t.bulk"].waiting, queues["t.bulk"].pending_jobs) == (0, [])
    run = mlf(values, "queues")
    assert run.returncode == 0, run.stderr
    row = next(line for line in run.stdout.splitlines() if hidden in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == [hidden, "1", "?", "1"], run.stdout
    # the legend explains the marks the table shows, and only those
    assert "? = the broker cannot tell" in run.stdout and "+ =" not in run.stdout, run.stdout
    status = mlf(values, "status", job_id)  # the embedded broker cannot tell consumers; no worker runs at all
    assert status.returncode == 0 and "warning: no worker heartbeat in the last 30 s" in status.stderr, status.stderr


def test_the_queues_legend_names_only_the_marks_used():
    """`mlf queues` explains `?` and `+` only when its table shows them."""
    from producer.cli import consumers_legend

    assert consumers_legend(set()) == ""
    assert consumers_legend({"?"}) == "; consumers: ? = the broker cannot tell"
    assert consumers_legend({"+", "?"}).count(" = ") == 2
