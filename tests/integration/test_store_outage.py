"""PostgreSQL refuses every connection for a while during a job: workers retry with
backoff, then finish the job with each row once. Retries are not capped (regression: after
8 retries, about 3 minutes, the message was dropped and the job stayed RUNNING for ever)."""

from __future__ import annotations

import time

import pytest

from ml_framework.constants import SCORE_SHARD_TASK
from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from tests.conftest import REDIS_URL, check_redis, pg_admin, queues, start_workers, stop_workers

pytestmark = pytest.mark.integration
OUTAGE_S = 15


@pytest.mark.parametrize("workers_start", ["before", "during"])
def test_shards_survive_a_results_store_outage(workers_start, trained, data_dir, digits, own_pg_database,
                                               tmp_path):
    """Connections refused for 15 s while a job is queued, with workers started before or
    during the outage: the job still SUCCEEDS with every row once."""
    check_redis()
    values = {"models_dir": trained[0], "data_dir": data_dir, "var_dir": tmp_path, "shard_size": 300,
              **queues("mlf.test.outage."), "broker_url": REDIS_URL,
              "database_url": own_pg_database}
    client = Client(load_settings(**values))
    proc = start_workers(values, tmp_path / "workers.log") if workers_start == "before" else None
    db = own_pg_database.rsplit("/", 1)[1]
    admin = pg_admin()
    try:
        deadline = time.monotonic() + 120
        while proc is not None and len(client.live_workers()) < 2:
            assert time.monotonic() < deadline, (tmp_path / "workers.log").read_text()[-3000:]
            time.sleep(0.2)
        job_id = client.score_dataset(data_dir / "digits.csv", "digits-sklearn").id
        client.store.close()
        admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
        if proc is None:
            proc = start_workers(values, tmp_path / "workers.log")
        time.sleep(OUTAGE_S)
        admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        job = client.get_job(job_id)
        status = job.wait(timeout_s=240)
        assert status.state is JobState.SUCCEEDED, (tmp_path / "workers.log").read_text()[-3000:]
        assert (status.rows_ok, status.shards_done) == (len(digits.frame), 6)
        results = job.results()
        assert len(results) == len(digits.frame) and results.index.is_unique
        assert "OperationalError" in (tmp_path / "workers.log").read_text()  # the outage was felt
    finally:
        admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        admin.close()
        if proc is not None:
            stop_workers(proc)
        client.close()


def test_store_retries_are_not_capped():
    """The shard task retries store outages for as long as they last."""
    from worker.app import app

    task = app.tasks[SCORE_SHARD_TASK]
    assert task.max_retries is None and task.retry_backoff_max == 60
