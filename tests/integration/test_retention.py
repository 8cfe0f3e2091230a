"""Retention with a real worker: the launcher's pruning pass deletes finished jobs while the
same worker records the shards of a running job, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import time

import pandas as pd
import pytest

from ml_framework.errors import JobNotFoundError
from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from producer.results import job_results
from tests.conftest import REDIS_URL, check_redis, queues, stop_workers
from tests.integration.test_worker_processes import MLF, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["embedded", "redis-postgres"])
def test_launcher_prunes_finished_jobs_while_a_worker_records(request, kind, trained, data_dir, digits, tmp_path):
    """With ``results_retention: 1s`` and a pass every 0.5 s, 20 online requests that finish are
    deleted (tombstones left) while a long job's shards are still being recorded by the
    same worker; the long job ends SUCCEEDED with every row, and is pruned a second later."""
    big = data_dir / "digits_x4.csv"  # 72 shards of 100 rows: 10 s to 2 min
    if not big.exists():
        pd.concat([digits.frame] * 4, ignore_index=True).to_csv(big, index=False)
    values = {"models_dir": trained[0], "data_dir": data_dir, "var_dir": tmp_path, "shard_size": 100,
              **queues(f"mlf.test.retention.{kind}."), "results_retention": "1s", "prune_interval_s": 0.5,
              "worker_metrics_port": 0, "broker_polling_interval_s": 0.1}
    if kind == "redis-postgres":
        check_redis()
        values.update(broker_url=REDIS_URL, database_url=request.getfixturevalue("own_pg_database"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    log = tmp_path / "workers.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([*MLF, "worker", "--cpu-processes", "1", "--preload", "digits-torch", "--grace", "20"],
                                env=env, stdout=sink, stderr=subprocess.STDOUT)
    client = Client(load_settings(**values))
    try:
        wait_for(lambda: client.workers() or None, 120, "the worker to start", log)
        long = client.score_dataset(big, "digits-torch", batch_size=2)
        wait_for(lambda: client.store.job(long.id).state is JobState.RUNNING or None, 60, "the long job to run", log)
        rows = digits.frame[[c for c in digits.frame.columns if c != "label"]].iloc[:5]
        # online requests: the worker takes them between two of the long job's shards
        small = [client.submit("digits-torch", rows).id for _ in range(20)]

        def pruned(job_id: str) -> bool:
            return client.store.deleted_owner(job_id)[0]

        wait_for(lambda: all(pruned(j) for j in small) or None, 120, "the 20 small jobs to be pruned", log)
        try:
            open_meanwhile = client.store.job(long.id).state is JobState.RUNNING
        except JobNotFoundError:
            open_meanwhile = False
        for job_id in small:
            with pytest.raises(JobNotFoundError):
                client.store.job(job_id)
        # the long job: read the moment it ends (it is pruned a second later)
        status = results = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = client.store.job(long.id)
            if status.state.terminal:
                results = job_results(client.store, long.id)
                break
            time.sleep(0.02)
        n = 4 * len(digits.frame)
        assert status is not None and status.state is JobState.SUCCEEDED, log.read_text()[-3000:]
        assert (status.rows_ok, len(results), int(results.index.duplicated().sum())) == (n, n, 0)
        assert open_meanwhile, "the long job ended before the small ones were pruned: nothing ran concurrently"
        wait_for(lambda: pruned(long.id) or None, 60, "the long job to be pruned after it ended", log)
        assert "pruned" in log.read_text()
    finally:
        stop_workers(proc)
        client.close()
