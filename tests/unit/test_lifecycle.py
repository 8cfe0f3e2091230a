"""Data lifecycle of the results store on SQLite and PostgreSQL: deleting jobs, retention,
space, and the store's size and counts."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from ml_framework.store import JobState, ResultStore, RowError, ShardClaim, WorkerInfo
from ml_framework.store.lifecycle import exclusive_pass, reclaim_space
from ml_framework.store.models import DeletedJobRow, JobRow, RowErrorRow, ShardOutputRow, ShardRow
from producer.results import job_results

OWNED = ((ShardRow, ShardRow.job_id), (ShardOutputRow, ShardOutputRow.job_id), (RowErrorRow, RowErrorRow.job_id),
         (JobRow, JobRow.id))


@pytest.fixture()
def store(db_url):
    """A fresh store: a SQLite file here, a PostgreSQL database of this test's own in
    tests/integration/test_lifecycle_postgresql.py, which runs these tests again."""
    s = ResultStore(db_url)
    yield s
    s.close()


def finished_job(store: ResultStore, n_shards: int = 3, rows: int = 4, owner: str | None = None,
                 payload: int = 8) -> str:
    """A job of ``n_shards`` shards of ``rows`` rows, each recorded with one row error."""
    ranges = [(i * rows, (i + 1) * rows) for i in range(n_shards)]
    job = store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=n_shards * rows,
                           shard_ranges=ranges, batch_size=rows, owner=owner)
    for i, (a, b) in enumerate(ranges):
        assert store.claim_shard(job, i, "w") is ShardClaim.RUN
        store.complete_shard(job, i, [(r, {"p": r, "blob": os.urandom(payload).hex()}) for r in range(a, b - 1)],
                             [RowError(b - 1, f"row {b - 1}: bad", "x")])
    return job


def owned_rows(store: ResultStore, job_id: str) -> dict[str, int]:
    """Rows of each table that belong to ``job_id``."""
    with store.engine.connect() as conn:
        counts = {t.__tablename__: conn.execute(select(func.count()).where(col == job_id)).scalar_one()
                  for t, col in OWNED}
        conn.rollback()
    return counts


def test_delete_removes_every_row_of_the_job_and_nothing_else(store):
    """Deleting a job removes its shards, outputs, row errors and job row, leaves a tombstone,
    and leaves other jobs whole; deleting it again finds nothing (idempotent)."""
    a, b, c = (finished_job(store, owner="alice") for _ in range(3))
    before = {j: owned_rows(store, j) for j in (a, c)}
    results_a = job_results(store, a)
    report = store.delete_job(b)
    assert report is not None and report.jobs == [b]
    assert (report.shards, report.shard_outputs, report.row_errors) == (3, 3, 3)
    assert report.result_bytes > 0
    assert owned_rows(store, b) == {"shards": 0, "shard_outputs": 0, "row_errors": 0, "jobs": 0}
    assert {j: owned_rows(store, j) for j in (a, c)} == before
    assert job_results(store, a).equals(results_a)
    assert store.deleted_owner(b) == (True, "alice")
    assert store.deleted_owner(a) == (False, None)
    assert store.delete_job(b) is None


def test_delete_of_many_shards_goes_in_chunks(store, monkeypatch):
    """A job of more shards than one transaction deletes is deleted whole."""
    from ml_framework.store import lifecycle

    monkeypatch.setattr(lifecycle, "DELETE_SHARDS_PER_TXN", 2)
    job, other = finished_job(store, n_shards=5), finished_job(store, n_shards=1)
    report = store.delete_job(job)
    assert (report.shards, report.shard_outputs, report.row_errors) == (5, 5, 5)
    assert set(owned_rows(store, job).values()) == {0}
    assert owned_rows(store, other)["row_errors"] == 1


def test_delete_cancels_a_running_job_and_its_late_recording_writes_nothing(store):
    """A RUNNING job is cancelled, then deleted; the worker still running a shard records
    nothing afterwards (its shard row is gone), and claims of its shards find no job."""
    job = store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=4, shard_ranges=[(0, 2), (2, 4)],
                           batch_size=2)
    assert store.claim_shard(job, 0, "w", owner="w:1", lease_s=60) is ShardClaim.RUN
    assert store.delete_job(job) is not None
    assert not store.complete_shard(job, 0, [(0, {"p": 0}), (1, {"p": 1})], [], owner="w:1")
    assert store.claim_shard(job, 1, "w") is ShardClaim.UNKNOWN_JOB
    assert set(owned_rows(store, job).values()) == {0}


def test_prune_deletes_expired_finished_jobs_only(store):
    """A prune pass deletes finished jobs past retention, dead workers' heartbeats and old
    tombstones; open and recent jobs stay. ``dry_run`` reports the same and deletes nothing."""
    old = [finished_job(store) for _ in range(2)]
    cancelled = store.create_job(model="m", model_version=1, dataset="d", n_rows=1, shard_ranges=[(0, 1)],
                                 batch_size=1)
    store.cancel(cancelled)
    pending = store.create_job(model="m", model_version=1, dataset="d", n_rows=1, shard_ranges=[(0, 1)],
                               batch_size=1)
    store.heartbeat(WorkerInfo(hostname="dead@h", pid=1, started_at=datetime.now(UTC)))
    fresh = finished_job(store)
    later = datetime.now(UTC) + timedelta(hours=2)
    kw = {"results_retention_s": 3600.0, "worker_retention_s": 3600.0, "deleted_job_retention_s": 3600.0}
    assert store.prune(**kw).jobs == []  # nothing has ended an hour ago yet
    dry = store.prune(dry_run=True, now=later, **kw)
    assert sorted(dry.jobs) == sorted([*old, cancelled, fresh]) and dry.workers == ["dead@h"]
    assert dry.shard_outputs == 9 and dry.row_errors == 9 and dry.result_bytes > 0
    assert owned_rows(store, old[0])["jobs"] == 1 and store.workers(None)
    report = store.prune(now=later, **kw)
    assert store.job(pending).state is JobState.PENDING
    for j in (*old, cancelled, fresh):
        assert set(owned_rows(store, j).values()) == {0}
    assert store.workers(None) == []
    assert store.deleted_owner(old[0]) == (False, None)  # its tombstone, made at the real now, expired too
    assert report.tombstones == 4


def test_prune_leaves_running_jobs_alone_while_a_worker_records(store):
    """Pruning with a 1 s retention over 20 finished jobs deletes exactly those, while a
    thread records the shards of a running job concurrently; the running job ends whole.
    The prune's clock is set 1 s past the moment the 20 jobs had finished, instead of
    waiting that second out: they are expired, the running job (finished later) is not."""
    done = [finished_job(store, n_shards=2) for _ in range(20)]
    running = store.create_job(model="m", model_version=1, dataset="d", n_rows=200,
                               shard_ranges=[(i, i + 1) for i in range(200)], batch_size=1)
    errors: list[BaseException] = []

    def record() -> None:
        try:
            for i in range(200):
                assert store.claim_shard(running, i, "w", owner="w:1", lease_s=60) is ShardClaim.RUN
                assert store.complete_shard(running, i, [(i, {"p": i})], [], owner="w:1")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    now = datetime.now(UTC) + timedelta(seconds=1)  # the 20 jobs ended 1 s ago or more
    recorder = threading.Thread(target=record)
    recorder.start()
    deleted: list[str] = []
    while recorder.is_alive() or not deleted:
        deleted += store.prune(results_retention_s=1.0, limit=3, now=now).jobs
    recorder.join()
    deleted += store.prune(results_retention_s=1.0, now=now).jobs  # the rest, if the recorder was quicker
    assert not errors
    assert sorted(d for d in deleted if d != running) == sorted(done)
    st = store.job(running)
    assert (st.state, st.rows_ok) == (JobState.SUCCEEDED, 200)
    assert len(job_results(store, running)) == 200


def test_sqlite_file_stops_growing_with_retention(tmp_path):
    """With every finished job pruned as the next lands, the SQLite file (and WAL) stays
    within 10 % of its size after the first 10 jobs over 50 further jobs; without pruning
    it grows with every job."""
    path = tmp_path / "r.sqlite"
    store = ResultStore(f"sqlite:///{path}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # INCREMENTAL on a new file
            conn.rollback()

        def size() -> int:
            return sum(p.stat().st_size for p in (path, tmp_path / "r.sqlite-wal") if p.exists())

        def one_job() -> None:
            finished_job(store, n_shards=2, rows=200, payload=256)
            store.prune(results_retention_s=0.0)
            reclaim_space(store)

        for _ in range(10):
            one_job()
        settled = size()
        sizes = []
        for _ in range(50):
            one_job()
            sizes.append(size())
        assert max(sizes) <= settled * 1.1 + 64 * 1024, (settled, sizes)
        for _ in range(10):  # the control: without retention the file grows
            finished_job(store, n_shards=2, rows=200, payload=256)
        reclaim_space(store)
        assert size() > settled * 2
    finally:
        store.close()


def test_stats_counts_rows_and_the_oldest_finished_job(store):
    """``stats`` gives a positive size, rows per table and the oldest finished job's age."""
    empty = store.stats()
    assert empty.oldest_finished_age_s is None and empty.rows["jobs"] == 0
    finished_job(store, n_shards=2)
    st = store.stats()
    assert st.size_bytes > 0
    assert (st.rows["jobs"], st.rows["shards"], st.rows["shard_outputs"], st.rows["row_errors"]) == (1, 2, 2, 2)
    assert 0 <= st.oldest_finished_age_s < 60


def test_only_one_process_holds_the_prune_lock(store):
    """While one holder has the prune lock, another store on the same database is told to skip."""
    other = ResultStore(store.url, migrate=False)
    try:
        with exclusive_pass(store) as first, exclusive_pass(other) as second:
            assert (first, second) == (True, False)
        with exclusive_pass(other) as again:
            assert again
    finally:
        other.close()


def test_tombstones_table_exists_after_migration(store):
    """Revision 0010 creates ``deleted_jobs``."""
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DeletedJobRow)).scalar_one() == 0
        conn.rollback()


@pytest.mark.parametrize(("text", "seconds"), [("none", None), ("30d", 30 * 86_400), ("12h", 43_200), ("90", 90),
                                               ("1.5m", 90), ("2w", 14 * 86_400), (3600, 3600)])
def test_retention_settings_take_durations(text, seconds):
    """``results_retention`` takes ``none``, seconds, or a number with s/m/h/d/w."""
    from ml_framework.settings import load_settings

    keep = load_settings(results_retention=text).retention_s["results_retention_s"]
    assert keep == seconds


def test_a_retention_that_is_not_a_duration_is_refused():
    """A retention that is not a duration fails at start, naming the value."""
    from ml_framework.errors import SettingsError
    from ml_framework.settings import load_settings

    with pytest.raises(SettingsError, match="'30 days' is not a duration"):
        load_settings(results_retention="30 days")


@pytest.mark.parametrize("text", ["9999999999d", "1000000w", float("inf"), 1e300])
def test_a_retention_too_long_to_compute_with_is_refused_not_overflowed(text):
    """A retention past 100 years (or infinite) fails at start naming the value; before,
    ``9999999999d`` raised a raw OverflowError and ``1000000w`` was taken and broke every
    prune pass with "date value out of range" (found by the break-it review)."""
    from ml_framework.errors import SettingsError
    from ml_framework.settings import load_settings, parse_duration

    with pytest.raises(SettingsError, match="out of range: a duration is 0 to 100 years"):
        load_settings(results_retention=text)
    assert parse_duration("36500d").days == 36500


def test_a_shard_not_recorded_is_logged_with_its_real_cause(store):
    """When ``complete_shard`` writes nothing, the worker's log says why: the job was
    deleted, or cancelled, while the shard ran; only otherwise another delivery. Before,
    a deleted job's shard was logged as "already recorded by another delivery" (found by
    the README walk-through)."""
    from worker.tasks import not_recorded_because

    ranges = [(0, 4), (4, 8)]
    running = store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=8, shard_ranges=ranges,
                               batch_size=4)
    assert store.claim_shard(running, 0, "w") is ShardClaim.RUN
    claim, why = not_recorded_because(store, running)
    assert claim is ShardClaim.ALREADY_DONE and why.startswith("already recorded by another delivery")
    store.cancel(running)
    assert not_recorded_because(store, running) == (ShardClaim.CANCELLED, "the job was cancelled while the shard ran")
    store.delete_job(running)
    assert not_recorded_because(store, running) == (ShardClaim.UNKNOWN_JOB, "the job was deleted while the shard ran")
