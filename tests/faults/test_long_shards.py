"""Faults 3, 6 and 7: shards that run long, never return, or are cancelled while running.

3. A shard still running when the broker hands its message out again (the visibility
   timeout passed, as after a clock jump or a stalled sweep): it runs once, not again on
   another worker; the second delivery finds the shard's lease held by a live process.
6. A model call that never returns (a sleep in C that holds the GIL): the launcher's hard
   time limit kills the process and starts a new one; the shard is failed, or retried,
   per ``on_time_limit``.
7. A job cancelled while shards run: no new shard starts, finished shards keep their
   results, the job stays CANCELLED.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from ml_framework.store import JobState
from tests.faults.conftest import marked_csv, report, running_shard, shard_rows_match, wait_until

pytestmark = pytest.mark.integration


def test_a_shard_redelivered_while_it_runs_is_not_run_twice(make_workers, private_redis, fault_models, data_dir,
                                                            digits):
    """While the only shard runs (about 18 s), its message's entry in kombu's unacked index
    is aged past the visibility timeout: the idle process's restore sweep puts the message
    back and takes it, finds the shard leased to a live process, and sends it back; when
    it comes again the shard is done. One start, every row once."""
    workers = make_workers(broker_url=private_redis.url, shard_size=10_000, task_time_limit_s=40,
                           broker_visibility_timeout_s=45)
    workers.start()
    job = workers.client.score_dataset(data_dir / "digits.csv", fault_models["slow"], batch_size=10)
    wait_until(lambda: running_shard(workers.client, job.id), what="the shard to start")
    r = private_redis.client()
    entries = wait_until(lambda: r.zrange("unacked_index", 0, -1), what="the unacked entry")
    r.zadd("unacked_index", dict.fromkeys(entries, 0), xx=True)  # "delivered in 1970"
    wait_until(lambda: workers.client.store.shards(job.id)[0]["deliveries"] >= 2, 60, "the redelivery")
    status = job.wait(timeout_s=180)
    n = len(digits.frame)
    found, dups = report("3. redelivered while running (redis)", workers.client.store, job.id, n, None,
                         status.state.value)
    shard = workers.client.store.shards(job.id)[0]
    assert status.state is JobState.SUCCEEDED, workers.tail()
    assert (found, dups) == (n, 0)
    assert shard["attempts"] == 1 and shard["deliveries"] >= 2, shard
    assert "redelivered while another live worker process runs it" in workers.log_text()
    # the message that was sent back comes again, finds the shard done and is dropped
    wait_until(lambda: "ALREADY_DONE, skipped" in workers.log_text(), 60, "the re-sent message to be dropped")


@pytest.mark.parametrize("policy", ["fail", "retry"])
def test_a_model_call_that_never_returns_is_ended_by_the_hard_time_limit(policy, make_workers, fault_models,
                                                                         data_dir, digits):
    """Row 400 makes the model sleep for an hour in C, holding the GIL. The launcher kills
    the process at the 10 s limit and starts another. ``fail``: the shard is FAILED at
    once with "hard time limit exceeded". ``retry``: it is redelivered and, killed again,
    given up after ``max_shard_attempts`` (2) starts. The other shards succeed either way."""
    path = marked_csv(data_dir, digits, "digits_hang.csv", [400])
    workers = make_workers(shard_size=300, task_time_limit_s=10, broker_visibility_timeout_s=12,
                           on_time_limit=policy, max_shard_attempts=2)
    workers.start()
    pids = {w.pid for w in workers.client.store.workers(None)}
    started = time.monotonic()
    job = workers.client.score_dataset(path, fault_models["hang"], batch_size=100)
    status = job.wait(timeout_s=240)
    n = len(digits.frame)
    found, dups = report(f"6. model call never returns, on_time_limit={policy} (redis)", workers.client.store,
                         job.id, n, time.monotonic() - started, status.state.value)
    assert status.state is JobState.PARTIAL, workers.tail()
    assert (status.rows_ok, status.rows_failed, found, dups) == (n - 300, 300, n, 0)
    shard = workers.client.store.shards(job.id)[1]
    reason = "hard time limit exceeded" if policy == "fail" else "worker lost"
    assert shard["state"] == "FAILED" and reason in shard["error"], shard
    assert shard["attempts"] == (1 if policy == "fail" else 2)
    assert job.results().loc[300:599, "error"].str.contains(reason).all()
    assert workers.log_text().count("ran past the hard time limit of 10 s") == shard["attempts"]
    assert not shard_rows_match(workers.client.store, job.id)
    # every killed process was replaced: two live processes again, one of them at least new.
    # (A count of live rows alone is not enough: a killed process's last beat can still be
    # inside the window when the job ends soon after the kill; with ``retry`` both processes
    # may have been killed, one replacement still starting.)
    wait_until(lambda: len(workers.client.store.live_workers(6)) == 2
               and {w.pid for w in workers.client.store.workers(6)} - pids, 60, "a replacement process")


def test_cancelling_a_running_job_starts_no_new_shard_and_keeps_finished_ones(make_workers, fault_models,
                                                                             data_dir, digits):
    """Cancel a 18-shard job once 4 shards are done: no shard starts after the cancel,
    every finished shard keeps its rows, the rest are CANCELLED, the job stays CANCELLED."""
    workers = make_workers(shard_size=100)
    workers.start()
    job = workers.client.score_dataset(data_dir / "digits.csv", fault_models["slow"], batch_size=20)
    wait_until(lambda: job.status().shards_done >= 4, what="4 shards done")
    assert job.cancel().state is JobState.CANCELLED
    # Claims committed after the cancel see it; one that read the job just before started
    # (its started_at is stamped at the start of the claim) before this instant.
    cancelled_at = datetime.now(UTC)
    wait_until(lambda: not running_shard(workers.client, job.id), 60, "running shards to finish")
    time.sleep(2)  # let any message still queued reach a worker
    shards = workers.client.store.shards(job.id)
    status = job.status()
    done = [s for s in shards if s["state"] == "DONE"]
    kept = sum(s["rows_ok"] for s in done)
    found, dups = report("7. cancel while shards run (redis)", workers.client.store, job.id, kept, None,
                         status.state.value)
    assert status.state is JobState.CANCELLED
    assert len(done) >= 4 and {s["state"] for s in shards} <= {"DONE", "CANCELLED"}
    assert any(s["state"] == "CANCELLED" for s in shards)
    late = [s for s in shards if s["started_at"] is not None
            and s["started_at"].replace(tzinfo=s["started_at"].tzinfo or UTC) > cancelled_at]
    assert not late, late
    assert (found, dups) == (kept, 0) and not shard_rows_match(workers.client.store, job.id)
    results = job.results()
    assert results["error"].isna().sum() == kept  # the finished shards' rows can still be read
