"""A worker killed with SIGKILL mid-shard: the broker redelivers the shard after the
visibility timeout and every row is recorded exactly once (regression: the embedded
SQLite broker never redelivered it and the job hung in RUNNING)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import select

from ml_framework.settings import load_settings
from ml_framework.store import JobState
from ml_framework.store.schema import WorkerRow
from producer.client import Client
from tests.conftest import REDIS_URL, check_redis, queues, start_workers, stop_workers

pytestmark = pytest.mark.integration
VISIBILITY_TIMEOUT_S = 8


@pytest.mark.parametrize("kind", ["embedded", "redis-postgres"])
def test_killed_worker_shard_is_redone_once(kind, request, trained, data_dir, digits, tmp_path):
    """SIGKILL the worker running the only shard: the job still SUCCEEDS with each row once."""
    big = data_dir / "digits_x4.csv"
    if not big.exists():
        import pandas as pd

        pd.concat([digits.frame] * 4, ignore_index=True).to_csv(big, index=False)
    values = {
        "models_dir": trained[0], "data_dir": data_dir, "var_dir": tmp_path,
        "shard_size": 100_000, **queues("mlf.test.kill."),
        "broker_polling_interval_s": 0.1, "task_time_limit_s": VISIBILITY_TIMEOUT_S - 1,
        "broker_visibility_timeout_s": VISIBILITY_TIMEOUT_S,
    }
    if kind == "redis-postgres":
        check_redis()
        values["broker_url"] = REDIS_URL
        values["database_url"] = request.getfixturevalue("own_pg_database")
    client = Client(load_settings(**values))
    proc = start_workers(values, tmp_path / "workers.log")
    try:
        job = client.score_dataset(big, "digits-torch", batch_size=1)
        deadline = time.monotonic() + 120
        while (shard := client.store.shards(job.id)[0])["state"] != "RUNNING":
            assert time.monotonic() < deadline, (tmp_path / "workers.log").read_text()[-2000:]
            time.sleep(0.05)
        with client.store.engine.connect() as conn:
            pid = conn.execute(select(WorkerRow.pid).where(WorkerRow.hostname == shard["worker"])).scalar_one()
        os.kill(pid, signal.SIGKILL)
        status = job.wait(timeout_s=240)
        assert status.state is JobState.SUCCEEDED, (tmp_path / "workers.log").read_text()[-3000:]
        n = 4 * len(digits.frame)
        assert (status.rows_ok, status.rows_failed) == (n, 0)
        results = job.results()
        assert len(results) == n and results.index.is_unique
        assert client.store.shards(job.id)[0]["attempts"] >= 2
    finally:
        stop_workers(proc)
        client.close()
