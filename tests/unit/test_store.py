"""The results store on SQLite and PostgreSQL: states, idempotent shard writes, cancel."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from ml_framework.store import JobState, ResultStore, RowError, ShardClaim


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
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
    res = store.results(job)
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
    assert store.results(job)["p"].tolist() == [1, 1]
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
    assert len(store.results(job)) == 200 and store.job(job).rows_ok == 200


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


def test_concurrent_first_open_migrates_once(tmp_path, pg_database):
    """Several processes opening a fresh store at once all succeed (migration lock)."""
    for url in (f"sqlite:///{tmp_path / 'fresh.sqlite'}", pg_database.replace("/mlf_test_", "/mlf_test_m")):
        if url.startswith("postgresql"):
            import psycopg

            from tests.conftest import PG_ADMIN_URL

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{url.rsplit("/", 1)[1]}"')
        code = "import sys; from ml_framework.store import ResultStore; ResultStore(sys.argv[1]); print('ok')"
        procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
        if url.startswith("postgresql"):
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


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

    from ml_framework.store.schema import JobRow

    twins = ["abcd" + "0" * 28, "abcd" + "1" * 28]
    with store.engine.begin() as conn:
        conn.execute(insert(JobRow), [
            {"id": i, "model": "m", "model_version": 1, "dataset": "d", "state": "PENDING", "n_rows": 0,
             "n_shards": 0, "shards_done": 0, "rows_ok": 0, "rows_failed": 0, "batch_size": 1,
             "created_at": datetime.now(UTC)} for i in twins])
    with pytest.raises(JobNotFoundError, match="ambiguous"):
        store.resolve_job_id("abcd")
    assert store.resolve_job_id("abcd1") == twins[1]
