"""Faults 1 and 2: worker processes killed with SIGKILL.

1. mid-shard and mid-write: the shard is redone by another process; no row is lost or
   duplicated (regression: the embedded SQLite broker never redelivered it and the job
   hung in RUNNING);
2. a poison shard that kills its worker every time: after ``max_shard_attempts`` (3)
   starts its rows are failed with "worker lost", the job ends PARTIAL, nothing requeues
   for ever.

On Redis, the embedded broker and RabbitMQ (classic queues; fault 1 also on quorum
queues): the same code must work on all of them.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

from ml_framework.errors import JobTimeoutError
from ml_framework.store import JobState
from tests.faults.conftest import (
    broker_url,
    marked_csv,
    report,
    running_shard,
    shard_rows_match,
    wait_until,
    worker_pid,
)

pytestmark = pytest.mark.integration


def broker(kind: str) -> dict:
    """Settings of broker ``kind``: ``redis``, ``rabbitmq`` (classic queues),
    ``rabbitmq-quorum`` (quorum queues) or ``embedded``."""
    if kind == "embedded":
        return {"broker_url": None, "database_url": None}
    if kind == "rabbitmq-quorum":
        return {"broker_url": broker_url("rabbitmq"), "broker_queue_type": "quorum"}
    return {"broker_url": broker_url(kind)}


@pytest.mark.parametrize("kind", ["redis", "rabbitmq", "rabbitmq-quorum", "embedded"])
def test_a_worker_killed_mid_shard_has_its_shard_redone_once(kind, make_workers, fault_models, data_dir, digits):
    """SIGKILL the process running a shard half-way: the job still SUCCEEDS, each row once."""
    path = marked_csv(data_dir, digits, "digits_x2.csv", [], copies=2)
    workers = make_workers(shard_size=900, task_time_limit_s=15, broker_visibility_timeout_s=17, **broker(kind))
    workers.start()
    job = workers.client.score_dataset(path, fault_models["slow"], batch_size=100)  # ~1 s per shard
    shard = wait_until(lambda: running_shard(workers.client, job.id), what="a running shard")
    time.sleep(0.4)
    os.kill(worker_pid(workers.client, shard["worker"]), signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        status = job.wait(timeout_s=240)
    except JobTimeoutError as exc:
        raise AssertionError(f"{exc}\n{workers.diagnose(job.id)}") from exc
    recover_s = time.monotonic() - killed_at
    n = 2 * len(digits.frame)
    found, dups = report(f"1. SIGKILL mid-shard ({kind})", workers.client.store, job.id, n, recover_s,
                         status.state.value)
    assert status.state is JobState.SUCCEEDED, (workers.client.store.shards(job.id), workers.tail())
    assert (status.rows_ok, status.rows_failed, found, dups) == (n, 0, n, 0)
    assert job.results().index.is_unique
    redone = next(s for s in workers.client.store.shards(job.id) if s["shard_index"] == shard["shard_index"])
    assert redone["attempts"] == 2, redone
    assert not shard_rows_match(workers.client.store, job.id)


def test_a_worker_killed_mid_write_loses_and_duplicates_nothing(make_workers, fault_models, data_dir, digits,
                                                                own_pg_database):
    """SIGKILL the process while its shard's rows are being written (its INSERT waits on a
    lock this test holds on the shard outputs table): the half-written transaction is rolled
    back, the shard is redone, and every row is recorded exactly once."""
    workers = make_workers(broker_url=broker_url("redis"), shard_size=600, task_time_limit_s=15,
                           broker_visibility_timeout_s=17)
    workers.start(processes=1)
    db = own_pg_database.rsplit("/", 1)[1]
    locker = psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}")
    locker.execute("LOCK TABLE shard_outputs IN SHARE MODE")  # INSERTs wait; the transaction stays open
    try:
        job = workers.client.score_dataset(data_dir / "digits.csv", fault_models["slow"], batch_size=300)

        def writer_waiting() -> int | None:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}", autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                   "wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO shard_outputs%%'",
                                   (db,)).fetchone()
            return row[0] or None

        wait_until(writer_waiting, what="the worker's INSERT to wait on the lock", interval_s=0.2)
        shard = running_shard(workers.client, job.id)
        os.kill(worker_pid(workers.client, shard["worker"]), signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(1)
    finally:
        locker.rollback()
        locker.close()
    status = job.wait(timeout_s=240)
    recover_s = time.monotonic() - killed_at
    n = len(digits.frame)
    found, dups = report("1. SIGKILL mid-write (redis)", workers.client.store, job.id, n, recover_s,
                         status.state.value)
    assert status.state is JobState.SUCCEEDED, workers.tail()
    assert (status.rows_ok, found, dups) == (n, n, 0)
    assert not shard_rows_match(workers.client.store, job.id)
    assert any(s["attempts"] == 2 for s in workers.client.store.shards(job.id))


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_a_poison_shard_is_failed_after_three_starts(kind, make_workers, fault_models, data_dir, digits):
    """A shard whose row 400 SIGKILLs every worker that scores it: after 3 starts its 300
    rows fail with "worker lost", the other 1,497 rows succeed, the job is PARTIAL, and the
    workers keep serving."""
    path = marked_csv(data_dir, digits, "digits_poison.csv", [400])
    workers = make_workers(shard_size=300, task_time_limit_s=15, broker_visibility_timeout_s=17, **broker(kind))
    workers.start()
    started = time.monotonic()
    job = workers.client.score_dataset(path, fault_models["kill"], batch_size=100)
    status = job.wait(timeout_s=300)
    n = len(digits.frame)
    found, dups = report(f"2. poison shard, SIGKILL x3 ({kind})", workers.client.store, job.id, n,
                         time.monotonic() - started, status.state.value)
    shards = workers.client.store.shards(job.id)
    assert status.state is JobState.PARTIAL, (shards, workers.tail())
    assert (status.rows_ok, status.rows_failed, found, dups) == (n - 300, 300, n, 0), (shards, workers.tail())
    poison = workers.client.store.shards(job.id)[1]
    assert (poison["state"], poison["attempts"]) == ("FAILED", 3), poison
    assert "worker lost" in poison["error"]
    errors = job.results().loc[300:599, "error"]
    assert errors.str.contains("worker lost").all()
    # the workers are still serving
    wait_until(lambda: len(workers.client.store.live_workers(10)) == 2, what="both workers back")
    after = workers.client.score_dataset(data_dir / "digits.csv", fault_models["kill"], batch_size=100)
    assert after.wait(timeout_s=120).state is JobState.SUCCEEDED

