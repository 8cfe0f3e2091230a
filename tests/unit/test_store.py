"""The results store on SQLite and PostgreSQL: states, idempotent shard writes, cancel."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime

import pytest

from ml_framework.store import (
    JobState,
    NewJob,
    ResultStore,
    RowError,
    ShardClaim,
    ShardOutcomeRecord,
)
from producer.results import job_results, results_frame


@pytest.fixture()
def store(db_kind, request, tmp_path):
    """A store on SQLite here, on PostgreSQL (the session's database) in
    tests/integration/test_store_postgresql.py, which runs these tests again."""
    if db_kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    else:
        url = request.getfixturevalue("pg_database")
    s = ResultStore(url)
    yield s
    s.close()


def new_job(store: ResultStore, ranges=((0, 2), (2, 4))) -> str:
    return store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=ranges[-1][1],
                            shard_ranges=list(ranges), batch_size=2)


def test_job_lifecycle_to_partial(store):
    """PENDING -> RUNNING on first claim -> PARTIAL when the last shard lands with a row error."""
    job = new_job(store)
    assert store.job(job).state is JobState.PENDING
    assert store.claim_shard(job, 0, "w") is ShardClaim.RUN
    assert store.job(job).state is JobState.RUNNING
    assert store.complete_shard(job, 0, [(0, {"p": 1}), (1, {"p": 2})], [])
    assert store.claim_shard(job, 1, "w") is ShardClaim.RUN
    assert store.complete_shard(job, 1, [(2, {"p": 3})], [RowError(3, "row 3: bad", "x")])
    st = store.job(job)
    assert (st.state, st.rows_ok, st.rows_failed, st.shards_done) == (JobState.PARTIAL, 3, 1, 2)
    res = job_results(store, job)
    assert res.index.tolist() == [0, 1, 2, 3]
    assert res.loc[3, "error"] == "row 3: bad" and res.loc[3, "error_field"] == "x"
    assert res.loc[0, "error"] is None


def test_all_rows_failed_is_failed_and_all_ok_is_succeeded(store):
    """A job with no successful row is FAILED; one with no failed row SUCCEEDED."""
    bad = new_job(store, ((0, 2),))
    store.claim_shard(bad, 0, "w")
    store.complete_shard(bad, 0, [], [RowError(0, "e"), RowError(1, "e")], shard_error="model missing")
    assert store.job(bad).state is JobState.FAILED
    assert store.shards(bad)[0]["state"] == "FAILED" and store.shards(bad)[0]["error"] == "model missing"
    good = new_job(store, ((0, 1),))
    store.claim_shard(good, 0, "w")
    store.complete_shard(good, 0, [(0, {"p": 0})], [])
    assert store.job(good).state is JobState.SUCCEEDED


def test_second_completion_of_a_shard_writes_nothing(store):
    """A redelivered shard is recognised: no duplicate rows, counters unchanged."""
    job = new_job(store)
    store.claim_shard(job, 0, "w")
    assert store.complete_shard(job, 0, [(0, {"p": 1}), (1, {"p": 1})], [])
    assert store.claim_shard(job, 0, "w2") is ShardClaim.ALREADY_DONE
    assert not store.complete_shard(job, 0, [(0, {"p": 9}), (1, {"p": 9})], [])
    st = store.job(job)
    assert (st.rows_ok, st.shards_done) == (2, 1)
    assert job_results(store, job)["p"].tolist() == [1, 1]
    assert store.shards(job)[0]["deliveries"] == 2


def test_concurrent_completions_record_the_shard_once(store):
    """Two workers finishing the same shard at the same moment: exactly one write wins."""
    job = new_job(store, ((0, 200),))
    store.claim_shard(job, 0, "a")
    barrier = threading.Barrier(4)
    wins = []

    def finish(tag: int) -> None:
        barrier.wait()
        wins.append(store.complete_shard(job, 0, [(r, {"t": tag}) for r in range(200)], []))

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
    assert len(job_results(store, job)) == 200 and store.job(job).rows_ok == 200


def test_cancel_stops_pending_shards_and_keeps_results(store):
    """Cancel marks pending shards CANCELLED; a running shard may still land; state stays CANCELLED."""
    job = new_job(store, ((0, 1), (1, 2), (2, 3)))
    store.claim_shard(job, 0, "w")
    store.complete_shard(job, 0, [(0, {"p": 0})], [])
    store.claim_shard(job, 1, "w")
    assert store.cancel(job).state is JobState.CANCELLED
    assert store.claim_shard(job, 2, "w") is ShardClaim.CANCELLED
    assert store.complete_shard(job, 1, [(1, {"p": 1})], [])
    st = store.job(job)
    assert st.state is JobState.CANCELLED and st.rows_ok == 2
    assert [s["state"] for s in store.shards(job)] == ["DONE", "DONE", "CANCELLED"]


def test_cancel_leaves_finished_jobs_alone(store):
    """Cancelling a SUCCEEDED job changes nothing."""
    job = new_job(store, ((0, 1),))
    store.claim_shard(job, 0, "w")
    store.complete_shard(job, 0, [(0, {"p": 0})], [])
    assert store.cancel(job).state is JobState.SUCCEEDED


def test_unknown_job(store):
    """Reading an unknown job raises JobNotFoundError; a shard of it is UNKNOWN_JOB."""
    from ml_framework.errors import JobNotFoundError

    with pytest.raises(JobNotFoundError, match="no job 'x'"):
        store.job("x")
    assert store.claim_shard("x", 0, "w") is ShardClaim.UNKNOWN_JOB


def test_job_id_prefix_resolves_when_unique(store):
    """A unique id prefix finds the job; unknown, too short or ambiguous prefixes are refused."""
    from ml_framework.errors import JobNotFoundError

    ids = [new_job(store) for _ in range(3)]
    for job_id in ids:
        assert store.resolve_job_id(job_id) == job_id
        assert store.resolve_job_id(job_id[:12].upper()) == job_id
    with pytest.raises(JobNotFoundError, match="at least 4"):
        store.resolve_job_id("ab")
    with pytest.raises(JobNotFoundError, match="no job"):
        store.resolve_job_id("zzzz")
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from ml_framework.store.models import JobRow

    twins = ["abcd" + "0" * 28, "abcd" + "1" * 28]
    with store.engine.begin() as conn:
        conn.execute(insert(JobRow), [
            {"id": i, "model": "m", "model_version": 1, "dataset": "d", "state": "PENDING", "n_rows": 0,
             "n_shards": 0, "shards_done": 0, "rows_ok": 0, "rows_failed": 0, "batch_size": 1,
             "created_at": datetime.now(UTC)} for i in twins])
    with pytest.raises(JobNotFoundError, match="ambiguous"):
        store.resolve_job_id("abcd")
    assert store.resolve_job_id("abcd1") == twins[1]


def test_out_of_memory_splits_add_up_per_shard_and_job(store):
    """Each shard's OOM split count is kept, and the job's status sums them."""
    job = new_job(store)
    for shard, (rows, splits) in enumerate((([0, 1], 2), ([2, 3], 1))):
        store.claim_shard(job, shard, "w")
        store.complete_shard(job, shard, [(r, {"p": r}) for r in rows], [], oom_splits=splits)
    assert [s["oom_splits"] for s in store.shards(job)] == [2, 1]
    assert store.job(job).oom_splits == 3


def test_worker_heartbeat_telemetry_round_trips(store):
    """What a worker reports (device, models, rates, memory) is what `workers()` reads back;
    a second beat updates the same row; stale beats are left out."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from ml_framework.store import WorkerInfo
    from ml_framework.store.models import WorkerRow

    started = datetime.now(UTC).replace(microsecond=0)
    info = WorkerInfo(hostname="gpu0@h", pid=42, started_at=started, shards_done=3, rows_done=3000,
                      rows_per_s=812.5, oom_splits=1, models=["digits-torch/1"], threads=4,
                      rss_bytes=2**30, device_uuid="GPU-0000-aaaa", device_name="NVIDIA H200",
                      device_memory_used_bytes=5 * 2**30, device_memory_total_bytes=141 * 2**30,
                      device_utilization_pct=87.0, device_temperature_c=51.0, device_power_w=412.5)
    store.heartbeat(info)
    info.rows_done = 4000
    store.heartbeat(info)
    store.heartbeat(WorkerInfo(hostname="cpu0@h", pid=7, started_at=started))
    mine = {"gpu0@h", "cpu0@h"}  # the PostgreSQL database is shared with the session's workers
    got = {w.hostname: w for w in store.workers() if w.hostname in mine}
    assert set(got) == mine
    gpu = got["gpu0@h"]
    assert gpu.last_seen_at is not None and gpu.started_at == started
    assert gpu.age_s is not None and 0 <= gpu.age_s < 30 and abs(gpu.clock_skew_s) < 5  # same host as the store
    gpu.last_seen_at = gpu.age_s = gpu.clock_skew_s = None
    assert gpu == WorkerInfo(**{**info.__dict__, "last_seen_at": None})
    assert got["cpu0@h"].device_uuid is None and got["cpu0@h"].models == []
    with store.engine.begin() as conn:
        conn.execute(update(WorkerRow).where(WorkerRow.hostname == "cpu0@h")
                     .values(last_seen_at=datetime.now(UTC) - timedelta(minutes=5)))
    assert [w.hostname for w in store.workers(max_age_s=30) if w.hostname in mine] == ["gpu0@h"]
    assert {w.hostname for w in store.workers(max_age_s=None)} >= mine


def test_store_created_by_the_first_release_upgrades_in_place(db_url):
    """A database at revision 0001 (the first release) with a finished job upgrades on open:
    its job reads back unchanged, with 0 OOM splits, and new columns work."""
    from alembic import command

    from ml_framework.store import WorkerInfo
    from ml_framework.store.engine import _alembic_config, make_engine

    url = db_url
    engine = make_engine(url)
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, model, model_version, dataset, state, n_rows, n_shards, shards_done, "
            "rows_ok, rows_failed, batch_size, created_at) VALUES ('j1', 'm', 1, 'd.csv', 'SUCCEEDED', 5, 1, 1, "
            "5, 0, 8, CURRENT_TIMESTAMP)")
        conn.exec_driver_sql("INSERT INTO workers (hostname, pid, started_at, last_seen_at, shards_done) "
                             "VALUES ('old@h', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 2)")
    engine.dispose()
    store = ResultStore(url)
    try:
        status = store.job("j1")
        assert (status.state, status.rows_ok, status.oom_splits) == (JobState.SUCCEEDED, 5, 0)
        assert store.workers(max_age_s=None)[0].models == []
        store.heartbeat(WorkerInfo(hostname="old@h", pid=2, started_at=status.created_at, models=["m/1"]))
        assert store.workers()[0].models == ["m/1"]
    finally:
        store.close()


def online_jobs(store: ResultStore, n: int, rows: int = 1) -> list[str]:
    """``n`` one-shard jobs of ``rows`` rows, recorded together as online requests are."""
    jobs = [NewJob(uuid.uuid4().hex, "m", 1, "<inline>", rows, [(0, rows)], 64) for _ in range(n)]
    store.create_jobs(jobs)
    return [j.job_id for j in jobs]


def test_online_batch_is_recorded_once_with_per_job_states(store):
    """One record_online call: a request that succeeded, one with a bad row, one whose
    shard failed, one cancelled before the batch landed, and the same shard twice."""
    ok, partial, failed, cancelled = online_jobs(store, 4, rows=2)
    store.cancel(cancelled)
    records = [
        ShardOutcomeRecord(ok, 0, [(0, {"p": 1}), (1, {"p": 2})], [], batch_rows=8),
        ShardOutcomeRecord(partial, 0, [(0, {"p": 3})], [RowError(1, "row 1: bad", "x")], batch_rows=8),
        ShardOutcomeRecord(failed, 0, [], [RowError(0, "boom"), RowError(1, "boom")], shard_error="boom", batch_rows=8),
        ShardOutcomeRecord(cancelled, 0, [(0, {"p": 4}), (1, {"p": 5})], [], batch_rows=8),
        ShardOutcomeRecord(ok, 0, [(0, {"p": 1}), (1, {"p": 2})], [], batch_rows=8),  # a duplicate delivery
    ]
    assert store.record_online(records, "w1") == [True, True, True, False, False]
    states = {j: store.job(j) for j in (ok, partial, failed, cancelled)}
    assert [(s.state, s.rows_ok, s.rows_failed, s.shards_done) for s in states.values()] == [
        (JobState.SUCCEEDED, 2, 0, 1), (JobState.PARTIAL, 1, 1, 1), (JobState.FAILED, 0, 2, 1),
        (JobState.CANCELLED, 0, 0, 0)]
    assert all(states[j].started_at is not None and states[j].finished_at is not None for j in (ok, partial, failed))
    shard = store.shards(failed)[0]
    assert (shard["state"], shard["worker"], shard["error"], shard["batch_rows"], shard["attempts"]) == (
        "FAILED", "w1", "boom", 8, 1)
    assert job_results(store, ok)["p"].tolist() == [1, 2]
    assert len(job_results(store, cancelled)) == 0
    # a redelivery of the whole batch writes nothing
    assert store.record_online(records[:3], "w2") == [False, False, False]
    assert store.job(ok).rows_ok == 2 and store.shards(ok)[0]["worker"] == "w1"


def test_finished_returns_ended_jobs_with_their_rows_only(store):
    """finished(): terminal jobs with their rows, in one query; running and unknown ones absent."""
    done, running = online_jobs(store, 2, rows=2)
    store.record_online([ShardOutcomeRecord(done, 0, [(1, {"p": 7})], [RowError(0, "row 0: bad", "x")])], "w")
    found = store.finished([done, running, "0" * 32])
    assert list(found) == [done]
    state, outputs, errors = found[done]
    assert state is JobState.PARTIAL
    assert outputs.to_pylist() == [{"row": 1, "p": 7}] and errors == [(0, "x", "row 0: bad")]
    frame = results_frame(outputs, errors)
    assert frame.index.tolist() == [0, 1]
    assert frame["error"].tolist() == ["row 0: bad", None] and frame["error_field"].tolist() == ["x", None]
    assert frame.loc[1, "p"] == 7


def test_a_big_online_batch_spans_several_in_lists(store):
    """More requests than one IN (...) list holds are all recorded (chunked statements)."""
    jobs = online_jobs(store, 1200)
    assert all(store.record_online([ShardOutcomeRecord(j, 0, [(0, {"p": i})], []) for i, j in enumerate(jobs)], "w"))
    found = store.finished(jobs)
    assert len(found) == 1200 and {s for s, _, _ in found.values()} == {JobState.SUCCEEDED}
    assert [found[j][1].column("p")[0].as_py() for j in jobs] == list(range(1200))


def test_cancel_while_a_worker_records_the_same_job_does_not_deadlock(store, monkeypatch):
    """A caller's timeout cancels the job while a worker's recording of it is mid-way
    (shard flipped, job not yet updated). Both lock the shard before the job, so one
    waits for the other; before, cancel took the job first and PostgreSQL aborted one of
    them with a deadlock. Events order the two: the worker is inside its recording (the
    shard's lock held) before cancel starts, and stays there until cancel has begun."""
    import time

    import ml_framework.store.shards as ledger

    (job,) = online_jobs(store, 1)
    insert_rows = ledger._insert_rows
    inside, cancelling = threading.Event(), threading.Event()

    def slow_insert(conn, records):  # hold the shard's lock until cancel has begun, as a big batch does
        inside.set()
        assert cancelling.wait(30)
        time.sleep(0.05)  # a moment more, for cancel to reach the lock
        insert_rows(conn, records)

    monkeypatch.setattr(ledger, "_insert_rows", slow_insert)
    outcome: dict[str, object] = {}

    def record():
        try:
            outcome["record"] = store.record_online([ShardOutcomeRecord(job, 0, [(0, {"p": 1})], [])], "w")
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["record"] = exc

    worker = threading.Thread(target=record)
    worker.start()
    assert inside.wait(30)
    cancelling.set()
    try:
        outcome["cancel"] = store.cancel(job).state
    except Exception as exc:  # noqa: BLE001 - reported below
        outcome["cancel"] = exc
    worker.join()
    assert outcome == {"record": [True], "cancel": JobState.SUCCEEDED}, outcome  # the recording won; cancel saw it


def test_a_shard_twice_in_one_batch_is_recorded_from_one_record(store):
    """Duplicated deliveries that differ (say in oom_splits) in one batch: the shard row,
    the job's counters and the rows all come from the same record."""
    first, second = online_jobs(store, 2)
    records = [
        ShardOutcomeRecord(second, 0, [(0, {"p": 9})], [], oom_splits=1),
        ShardOutcomeRecord(first, 0, [(0, {"p": 1})], [], oom_splits=0),
        ShardOutcomeRecord(first, 0, [(0, {"p": 2})], [], oom_splits=1),  # same values as the first group
    ]
    recorded = store.record_online(records, "w")
    assert recorded.count(True) == 2 and recorded[0]
    shard, status = store.shards(first)[0], store.job(first)
    winner = records[1] if recorded[1] else records[2]
    assert shard["oom_splits"] == status.oom_splits == winner.oom_splits
    assert job_results(store, first)["p"].tolist() == [winner.outputs[0][1]["p"]]


def test_a_shard_started_max_attempts_times_is_given_up(store):
    """Three claims whose workers never recorded the shard: the fourth gives up, failing
    every row of the shard with "worker lost"; the other shard is unaffected."""
    job = new_job(store)
    for _ in range(3):
        assert store.claim_shard(job, 0, "w", max_attempts=3) is ShardClaim.RUN
    assert store.claim_shard(job, 0, "w", max_attempts=3) is ShardClaim.GAVE_UP
    assert store.claim_shard(job, 0, "w", max_attempts=3) is ShardClaim.ALREADY_DONE
    assert store.claim_shard(job, 1, "w", max_attempts=3) is ShardClaim.RUN
    assert store.complete_shard(job, 1, [(2, {"p": 1}), (3, {"p": 2})], [])
    status, shard = store.job(job), store.shards(job)[0]
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, 2, 2)
    assert (shard["state"], shard["attempts"], shard["deliveries"]) == ("FAILED", 3, 5)
    errors = job_results(store, job).loc[[0, 1], "error"].tolist()
    assert all(e.startswith(f"row {i}: worker lost: the shard was started 3 times") for i, e in enumerate(errors))


def test_without_a_bound_a_shard_is_claimed_again(store):
    job = new_job(store)
    for _ in range(5):
        assert store.claim_shard(job, 0, "w") is ShardClaim.RUN


def test_a_live_lease_turns_a_second_delivery_away_and_guards_the_write(store):
    """Fault 3 at the store: while the holder (w1, pid 11) beats, another process's claim
    gets BUSY; once the holder is gone (another pid beats under its name, or its lease is
    released), the claim passes, and the old holder can no longer record the shard."""
    from ml_framework.store import WorkerInfo

    job = new_job(store, ranges=((0, 2),))
    store.heartbeat(WorkerInfo(hostname="w1", pid=11, started_at=datetime.now(UTC)))
    assert store.claim_shard(job, 0, "w1", owner="w1:11", lease_s=60) is ShardClaim.RUN
    assert store.claim_shard(job, 0, "w2", owner="w2:22", lease_s=60) is ShardClaim.BUSY
    store.heartbeat(WorkerInfo(hostname="w1", pid=12, started_at=datetime.now(UTC)))  # w1 restarted
    assert store.claim_shard(job, 0, "w2", owner="w2:22", lease_s=60) is ShardClaim.RUN
    assert not store.complete_shard(job, 0, [(0, {"y": 1}), (1, {"y": 2})], [], owner="w1:11")
    assert store.shards(job)[0]["state"] == "RUNNING" and job_results(store, job).empty
    assert store.complete_shard(job, 0, [(0, {"y": 3}), (1, {"y": 4})], [], owner="w2:22")
    shard = store.shards(job)[0]
    assert (shard["state"], shard["attempts"], shard["deliveries"], shard["lease_expires_at"]) == ("DONE", 2, 3, None)
    assert store.job(job).state is JobState.SUCCEEDED


def test_released_leases_and_the_time_limit_failure(store):
    """The launcher's two calls: releasing a dead process's leases lets the next delivery
    run the shard at once; failing a shard it killed at the time limit records every row
    with the reason, only while that process still holds it."""
    from ml_framework.store import WorkerInfo

    job = new_job(store)
    store.heartbeat(WorkerInfo(hostname="w1", pid=11, started_at=datetime.now(UTC)))
    for shard in (0, 1):
        assert store.claim_shard(job, shard, "w1", owner="w1:11", lease_s=60) is ShardClaim.RUN
    assert store.release_leases("w1:11") == 2
    assert store.claim_shard(job, 0, "w2", owner="w2:22", lease_s=60) is ShardClaim.RUN
    assert not store.fail_running_shard(job, 0, "w1:11", "hard time limit exceeded")  # w2 holds it now
    assert store.fail_running_shard(job, 1, "w1:11", "hard time limit exceeded")
    assert store.shards(job)[1]["state"] == "FAILED"
    assert store.complete_shard(job, 0, [(0, {"y": 1}), (1, {"y": 2})], [], owner="w2:22")
    status = store.job(job)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, 2, 2)
    assert results_frame_errors(store, job) == ["row 2: hard time limit exceeded", "row 3: hard time limit exceeded"]


def results_frame_errors(store: ResultStore, job: str) -> list[str]:
    return job_results(store, job)["error"].dropna().tolist()


def test_a_lease_given_up_after_a_store_failure_frees_the_shard_at_once(store):
    """A process whose write failed (the store went down) gives its lease up: another
    process claims the shard at once instead of finding it busy until the lease ends, and
    the failed start is not counted as a worker death (regression: BUSY for up to
    task_time_limit_s + 30 s)."""
    from ml_framework.store import WorkerInfo

    job = new_job(store, ranges=((0, 2),))
    store.heartbeat(WorkerInfo(hostname="w1", pid=11, started_at=datetime.now(UTC)))
    assert store.claim_shard(job, 0, "w1", 3, owner="w1:11", lease_s=3600) is ShardClaim.RUN
    assert store.claim_shard(job, 0, "w2", 3, owner="w2:22", lease_s=3600) is ShardClaim.BUSY
    assert store.release_lease(job, 0, "w1:11")
    assert store.claim_shard(job, 0, "w2", 3, owner="w2:22", lease_s=3600) is ShardClaim.RUN
    assert store.shards(job)[0]["attempts"] == 1


def test_cancel_keeps_the_rows_of_a_shard_its_live_holder_is_running(store):
    """A job cancelled while a shard runs: a second delivery of that shard (a busy retry,
    a redelivery) answers CANCELLED without closing the shard, so the holder's rows are
    kept when it records them (regression: the shard was flipped to CANCELLED and its
    rows thrown away)."""
    from ml_framework.store import WorkerInfo

    job = new_job(store)
    store.heartbeat(WorkerInfo(hostname="w1", pid=11, started_at=datetime.now(UTC)))
    assert store.claim_shard(job, 0, "w1", owner="w1:11", lease_s=60) is ShardClaim.RUN
    store.cancel(job)
    assert store.claim_shard(job, 0, "w2", owner="w2:22", lease_s=60) is ShardClaim.CANCELLED
    assert store.claim_shard(job, 1, "w2", owner="w2:22", lease_s=60) is ShardClaim.CANCELLED
    assert store.complete_shard(job, 0, [(0, {"y": 1}), (1, {"y": 2})], [], owner="w1:11")
    assert [s["state"] for s in store.shards(job)] == ["DONE", "CANCELLED"]
    assert store.job(job).state is JobState.CANCELLED and len(job_results(store, job)) == 2


def test_kept_messages_are_dropped_with_their_shards(store):
    """A shard's kept message is cleared when it is recorded or cancelled, and a message
    written after the shard closed is not kept (it would only take room)."""
    job = new_job(store, ranges=((0, 2), (2, 4), (4, 6)))
    store.set_shard_messages(job, [(0, '{"queue": "q", "kwargs": {}}')])
    assert store.claim_shard(job, 0, "w", owner="w:1", lease_s=60) is ShardClaim.RUN
    assert store.complete_shard(job, 0, [(0, {"y": 1}), (1, {"y": 2})], [], owner="w:1")
    store.set_shard_messages(job, [(0, "late"), (1, "kept"), (2, "kept")])
    with store.engine.connect() as conn:
        from sqlalchemy import text

        assert conn.execute(text("SELECT message FROM shards WHERE job_id = :j ORDER BY shard_index"),
                            {"j": job}).scalars().all() == [None, "kept", "kept"]
    store.cancel(job)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM shards WHERE job_id = :j AND message IS NOT NULL"),
                            {"j": job}).scalar_one() == 0


def test_results_pages_cut_across_shard_outputs(store):
    """Outputs are stored one blob per shard: a page spanning three shards returns exactly
    its rows, in order, with the row errors among them; the whole frame matches."""
    job = uuid.uuid4().hex
    store.create_jobs([NewJob(job, "m", 1, "d.csv", 12, [(0, 4), (4, 8), (8, 12)], 4)])
    for s, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12)]):
        assert store.claim_shard(job, s, "w") is ShardClaim.RUN
        outputs = [(i, {"prediction": f"c{i}", "probabilities": [i / 10, 1 - i / 10]}) for i in range(lo, hi) if i != 5]
        errors = [RowError(5, "row 5: bad", "x")] if lo <= 5 < hi else []
        assert store.complete_shard(job, s, outputs, errors)
    page = store.results_page(job, 3, 6)
    assert [r["row"] for r in page] == [3, 4, 5, 6, 7, 8]
    assert page[0] == {"row": 3, "prediction": "c3", "probabilities": [0.3, 0.7]}
    assert page[2] == {"row": 5, "error": "row 5: bad", "error_field": "x"}
    assert store.results_page(job, 12, 5) == []
    frame = job_results(store, job)
    assert frame.index.tolist() == list(range(12))
    assert frame.loc[11, "probabilities"] == [1.1, 1 - 1.1] and frame.loc[5, "error"] == "row 5: bad"
    assert frame["prediction"].tolist()[:3] == ["c0", "c1", "c2"]


def test_results_stored_row_by_row_before_revision_0006_are_converted(db_url):
    """A database at revision 0005 holds one JSON row per result: the upgrade turns each
    shard's into one blob, and the job's results read back with the same values; a
    downgrade writes the JSON rows back."""
    from alembic import command
    from sqlalchemy import text

    from ml_framework.store.engine import _alembic_config, make_engine

    url = db_url
    engine = make_engine(url)
    cfg = _alembic_config()
    old = {0: {"prediction": "a", "score": 0.5, "probabilities": [0.5, 0.5]},
           1: {"prediction": "b", "score": 0.75, "probabilities": [0.25, 0.75]},
           3: {"prediction": "a", "score": 1.0, "probabilities": [1.0, 0.0]}}
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, model, model_version, dataset, state, n_rows, n_shards, shards_done, "
            "rows_ok, rows_failed, batch_size, oom_splits, priority, created_at) VALUES ('j1', 'm', 1, 'd.csv', "
            "'PARTIAL', 4, 2, 2, 3, 1, 8, 0, 0, CURRENT_TIMESTAMP)")
        for i, rec in old.items():
            conn.execute(text("INSERT INTO results (job_id, row_index, shard_index, output) VALUES ('j1', :i, :s, :o)"),
                         {"i": i, "s": i // 2, "o": json.dumps(rec)})
        conn.exec_driver_sql("INSERT INTO row_errors (job_id, row_index, shard_index, field, message) "
                             "VALUES ('j1', 2, 1, NULL, 'row 2: bad')")
        # labels mixing text and numbers, valid in manifests: one column cannot hold both
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, model, model_version, dataset, state, n_rows, n_shards, shards_done, "
            "rows_ok, rows_failed, batch_size, oom_splits, priority, created_at) VALUES ('j2', 'm', 1, 'd.csv', "
            "'SUCCEEDED', 2, 1, 1, 2, 0, 8, 0, 0, CURRENT_TIMESTAMP)")
        conn.exec_driver_sql("INSERT INTO results (job_id, row_index, shard_index, output) VALUES "
                             "('j2', 0, 0, '{\"prediction\": \"other\"}'), ('j2', 1, 0, '{\"prediction\": 1}')")
    engine.dispose()
    store = ResultStore(url)
    try:
        frame = job_results(store, "j1")
        assert frame.index.tolist() == [0, 1, 2, 3]
        assert {i: {k: frame.loc[i, k] for k in rec} for i, rec in old.items()} == old
        assert frame.loc[2, "error"] == "row 2: bad"
        assert job_results(store, "j2")["prediction"].tolist() == ["other", "1"]
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT shard_index, n_rows FROM shard_outputs WHERE job_id = 'j1' "
                                     "ORDER BY shard_index")).all() == [
                (0, 2), (1, 1)]
    finally:
        store.close()
    engine = make_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
        back = {i: json.loads(o) for i, o in conn.execute(text("SELECT row_index, output FROM results "
                                                                "WHERE job_id = 'j1'"))}
    engine.dispose()
    assert back == old


def test_integer_predictions_stay_integers_when_a_row_failed(store, tmp_path):
    """Class labels that are integers come back as integers (nulls on the failed rows), in
    the frame and in Parquet and CSV files, where they used to turn into floats as soon as
    one row of the job failed; the error columns are text in Parquet even with no error."""
    import pandas as pd
    import pyarrow.parquet as pq

    from producer.results import write_results

    job, clean = uuid.uuid4().hex, uuid.uuid4().hex
    store.create_jobs([NewJob(job, "m", 1, "d.csv", 3, [(0, 3)], 4), NewJob(clean, "m", 1, "d.csv", 1, [(0, 1)], 4)])
    for j in (job, clean):
        assert store.claim_shard(j, 0, "w") is ShardClaim.RUN
    store.complete_shard(job, 0, [(0, {"prediction": 7}), (2, {"prediction": 9})], [RowError(1, "row 1: bad", "x")])
    store.complete_shard(clean, 0, [(0, {"prediction": 7})], [])
    frame = job_results(store, job)
    assert str(frame["prediction"].dtype) == "Int64" and frame["prediction"].tolist() == [7, pd.NA, 9]
    table = pq.read_table(write_results(store.results_table(job), tmp_path / "r.parquet"))
    assert table.column_names == ["row", "prediction", "error", "error_field"]
    assert str(table.schema.field("prediction").type) == "int64"
    assert table.column("prediction").to_pylist() == [7, None, 9]
    assert write_results(store.results_table(job), tmp_path / "r.csv").read_text().splitlines() == [
        '"row","prediction","error","error_field"', "0,7,,", '1,,"row 1: bad","x"', "2,9,,"]
    clean_table = pq.read_table(write_results(store.results_table(clean), tmp_path / "c.parquet"))
    assert str(clean_table.schema.field("error").type) == "string"


def test_shards_storing_a_key_as_numbers_and_as_text_read_back_together(store):
    """Labels mixing text and numbers, converted row by row, can give one shard an int64
    column and another a text one: the job's results still read, that key as text."""
    job = uuid.uuid4().hex
    store.create_jobs([NewJob(job, "m", 1, "d.csv", 2, [(0, 1), (1, 2)], 4)])
    for s, value in enumerate([1, "other"]):
        assert store.claim_shard(job, s, "w") is ShardClaim.RUN
        store.complete_shard(job, s, [(s, {"prediction": value})], [])
    assert job_results(store, job)["prediction"].tolist() == ["1", "other"]


def test_a_job_keeps_its_longest_cold_start(store):
    """Shards that loaded their model report how long it took; the job keeps the longest,
    and a job whose shards all found the model loaded reports none."""
    job, warm = uuid.uuid4().hex, uuid.uuid4().hex
    store.create_jobs([NewJob(job, "m", 1, "d.csv", 3, [(0, 1), (1, 2), (2, 3)], 4),
                       NewJob(warm, "m", 1, "d.csv", 1, [(0, 1)], 4)])
    for shard, load_s in enumerate([2.5, None, 7.25]):
        assert store.claim_shard(job, shard, "w") is ShardClaim.RUN
        store.complete_shard(job, shard, [(shard, {"prediction": 1})], [], model_load_s=load_s)
        assert store.job(job).model_load_s == (2.5 if shard < 2 else 7.25)
    assert store.claim_shard(warm, 0, "w") is ShardClaim.RUN
    store.complete_shard(warm, 0, [(0, {"prediction": 1})], [])
    assert store.job(warm).model_load_s is None
    assert [s["model_load_s"] for s in store.shards(job)] == [2.5, None, 7.25]


def test_a_job_without_rows_is_succeeded_at_once_with_its_output_columns(store, tmp_path):
    """A job with no shards (a dataset without rows) is recorded SUCCEEDED, with nothing to
    wait for; its results, in every form the store gives them (DataFrame, Arrow table, a
    page, an online answer, written Parquet and CSV), are empty but carry the model's
    output columns and types (regression: such jobs were refused at submit)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ml_framework.manifest import OutputSpec
    from ml_framework.store.outputs import output_schema
    from producer.results import encode_results, write_results

    schema = output_schema(OutputSpec(kind="classification", labels=[0, 1, 2]))
    bulk = store.create_job(model="m", model_version=1, dataset="empty.csv", n_rows=0, shard_ranges=[],
                            batch_size=2, output_schema=schema)
    online = NewJob(uuid.uuid4().hex, "m", 1, "<0 inline rows>", 0, [], 2, output_schema=schema)
    store.create_jobs([online])
    for job_id in (bulk, online.job_id):
        status = store.job(job_id)
        assert (status.state, status.n_rows, status.n_shards, status.rows_done) == (JobState.SUCCEEDED, 0, 0, 0)
        assert status.finished_at is not None and status.elapsed_s == 0.0
        assert store.shards(job_id) == [] and store.results_page(job_id, 0, 100) == []
        table = store.results_table(job_id)
        assert table.num_rows == 0
        assert table.schema.names == ["row", "prediction", "score", "probabilities", "error", "error_field"]
        assert table.schema.field("prediction").type == pa.int64()
        assert table.schema.field("probabilities").type == pa.list_(pa.float64(), 3)
        frame = job_results(store, job_id)
        assert len(frame) == 0 and list(frame.columns) == ["prediction", "score", "probabilities", "error",
                                                           "error_field"]
        assert str(frame["prediction"].dtype) == "int64" and str(frame["score"].dtype) == "float64"
        assert pq.read_table(write_results(table, tmp_path / f"{job_id}.parquet")).schema.equals(table.schema)
        assert encode_results(table, "csv").decode().splitlines() == [
            '"row","prediction","score","probabilities","error","error_field"']
    state, outputs, errors = store.finished([online.job_id])[online.job_id]
    assert state is JobState.SUCCEEDED and errors == []
    assert list(results_frame(outputs, errors).columns) == ["prediction", "score", "probabilities", "error",
                                                            "error_field"]
    assert store.cancel(bulk).state is JobState.SUCCEEDED


def test_state_literals_are_spelt_only_by_the_enums():
    """The SQL the store runs names job and shard states through the enums of models.py
    (``OPEN_JOB``, ``sql_in``...): no other module of the store spells a state as a quoted
    SQL literal, so the state machine is written once."""
    from pathlib import Path

    import ml_framework.store
    from ml_framework.store import ShardState

    states = {s.value for s in JobState} | {s.value for s in ShardState}
    found = []
    for path in sorted(Path(ml_framework.store.__file__).parent.glob("*.py")):
        if path.name != "models.py":
            text = path.read_text()
            found += [f"{path.name}: '{s}'" for s in sorted(states) if f"'{s}'" in text]
    assert found == []


class _ShiftedDatetime(datetime):
    """``datetime`` whose ``now()`` runs ``SHIFT_S`` seconds off the real clock."""

    SHIFT_S = 0.0

    @classmethod
    def now(cls, tz=None):
        from datetime import timedelta

        return datetime.now(tz) + timedelta(seconds=cls.SHIFT_S)


def _host_clock_off(monkeypatch, shift_s: float) -> None:
    """Make this process's clock, as the store code reads it (``time.time`` and
    ``datetime.now``), run ``shift_s`` seconds off; the database server's is untouched."""
    import time

    from ml_framework.store import models

    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + shift_s)
    monkeypatch.setattr(_ShiftedDatetime, "SHIFT_S", shift_s)
    monkeypatch.setattr(models, "datetime", _ShiftedDatetime)


def test_liveness_is_judged_by_the_database_clock_not_the_worker_hosts(store, monkeypatch):
    """Issue 18: a worker whose host clock runs 120 s behind beats and is live (its skew
    recorded); a beat 40 s old by the database's clock is dead even to a reader whose own
    clock runs 120 s behind (regression: both were judged by the local clock)."""
    from datetime import timedelta

    from sqlalchemy import update

    from ml_framework.store import WorkerInfo
    from ml_framework.store.models import WorkerRow

    name, stale = f"behind-{uuid.uuid4().hex[:8]}@h", f"stale-{uuid.uuid4().hex[:8]}@h"
    with monkeypatch.context() as m:  # the worker host's clock is 120 s behind
        _host_clock_off(m, -120.0)
        store.heartbeat(WorkerInfo(hostname=name, pid=1, started_at=datetime.now(UTC)))
    assert name in store.live_workers(30.0)
    (info,) = [w for w in store.workers(30.0) if w.hostname == name]
    assert info.clock_skew_s == pytest.approx(-120.0, abs=5.0) and info.notable_skew_s == info.clock_skew_s
    assert 0.0 <= info.age_s < 30.0

    store.heartbeat(WorkerInfo(hostname=stale, pid=2, started_at=datetime.now(UTC)))
    with store.engine.begin() as conn:  # its last beat was 40 s ago (this host's clock is the database's)
        conn.execute(update(WorkerRow).where(WorkerRow.hostname == stale)
                     .values(last_seen_at=datetime.now(UTC) - timedelta(seconds=40)))
    with monkeypatch.context() as m:  # read from a host whose clock is 120 s behind
        _host_clock_off(m, -120.0)
        assert stale not in store.live_workers(30.0)
        assert stale not in {w.hostname for w in store.workers(30.0)}
        assert name in store.live_workers(30.0)


def test_a_lease_holder_whose_clock_runs_behind_keeps_its_shard(store, monkeypatch):
    """A holder whose host clock runs 120 s behind beats and takes a 60 s lease: another
    process's claim is turned away (regression: its beat looked 120 s old and its lease
    already over, so the shard ran twice); once its lease is released the claim passes."""
    from ml_framework.store import WorkerInfo

    job = new_job(store, ranges=((0, 2),))
    holder = f"slow-{uuid.uuid4().hex[:8]}@h"
    with monkeypatch.context() as m:
        _host_clock_off(m, -120.0)
        store.heartbeat(WorkerInfo(hostname=holder, pid=11, started_at=datetime.now(UTC)))
        assert store.claim_shard(job, 0, holder, owner=f"{holder}:11", lease_s=60) is ShardClaim.RUN
    assert store.claim_shard(job, 0, "w2", owner="w2:22", lease_s=60) is ShardClaim.BUSY
    assert store.release_leases(f"{holder}:11") == 1
    assert store.claim_shard(job, 0, "w2", owner="w2:22", lease_s=60) is ShardClaim.RUN
