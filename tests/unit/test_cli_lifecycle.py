"""`mlf jobs delete`, `mlf prune [--dry-run]` and `mlf status` without a job, as a user
runs them, over the default SQLite store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from ml_framework.settings import load_settings
from ml_framework.store import ResultStore, WorkerInfo
from ml_framework.store.models import JobRow, WorkerRow
from tests.unit.test_cli_admin import mlf
from tests.unit.test_lifecycle import finished_job, owned_rows


def open_store(tmp_path) -> ResultStore:
    return ResultStore(load_settings(var_dir=tmp_path / "var").effective_database_url)


def age(store: ResultStore, job_id: str, days: float) -> None:
    """Make ``job_id`` look as if it ended ``days`` ago."""
    with store.engine.begin() as conn:
        conn.execute(update(JobRow).where(JobRow.id == job_id)
                     .values(finished_at=datetime.now(UTC) - timedelta(days=days)))


def test_jobs_delete_deletes_and_says_so_again_idempotently(tmp_path):
    """`mlf jobs delete A B` deletes both (by id or prefix) and leaves a third whole; again,
    it says they were deleted already (exit 0); an unknown id is an error (exit 1)."""
    store = open_store(tmp_path)
    try:
        a, b, keep = (finished_job(store) for _ in range(3))
        run = mlf(tmp_path, "jobs", "delete", a, b[:10])
        assert run.returncode == 0, run.stderr
        assert f"deleted job {a}: 3 shard(s), 3 row error(s)" in run.stdout and f"deleted job {b}" in run.stdout
        assert set(owned_rows(store, a).values()) == set(owned_rows(store, b).values()) == {0}
        assert owned_rows(store, keep)["shard_outputs"] == 3
        run = mlf(tmp_path, "jobs", "delete", a)
        assert run.returncode == 0 and f"job {a} was deleted already" in run.stdout
        run = mlf(tmp_path, "jobs", "delete", "0" * 32)
        assert run.returncode == 1 and "no job '00000000000000000000000000000000'" in run.stderr
    finally:
        store.close()


def test_prune_dry_run_says_what_and_how_many_bytes_then_prune_deletes(tmp_path):
    """`mlf prune --dry-run --older-than 7d` lists the expired jobs and their bytes and
    deletes nothing; `mlf prune --older-than 7d` deletes them (and a dead worker's
    heartbeat), keeps the recent job; `mlf status` shows the store."""
    store = open_store(tmp_path)
    try:
        old, recent = finished_job(store, payload=1000), finished_job(store)
        age(store, old, 10)
        store.heartbeat(WorkerInfo(hostname="cpu0@gone", pid=1, started_at=datetime.now(UTC)))
        with store.engine.begin() as conn:
            conn.execute(update(WorkerRow).values(last_seen_at=datetime.now(UTC) - timedelta(days=8)))
        run = mlf(tmp_path, "prune", "--dry-run", "--older-than", "7d")
        assert run.returncode == 0, run.stderr
        assert "would delete 1 finished job(s) that ended over 7.0 d ago: 3 shard(s), 3 result blob(s), " \
               "3 row error(s), " in run.stdout
        assert " kB of results" in run.stdout
        assert f"  {old}" in run.stdout and recent not in run.stdout
        assert "would delete 1 heartbeat(s) of dead worker processes: cpu0@gone" in run.stdout
        assert owned_rows(store, old)["jobs"] == 1
        run = mlf(tmp_path, "prune")
        assert "results_retention is none: finished jobs are kept" in run.stdout
        assert owned_rows(store, old)["jobs"] == 1
        run = mlf(tmp_path, "prune", "--older-than", "7d")
        assert run.returncode == 0, run.stderr
        assert "deleted 1 finished job(s)" in run.stdout and "store size" in run.stdout
        assert owned_rows(store, old)["jobs"] == 0 and owned_rows(store, recent)["jobs"] == 1
        assert store.workers(None) == []
        run = mlf(tmp_path, "status")
        assert run.returncode == 0, run.stderr
        assert "results store" in run.stdout and "jobs 1" in run.stdout and "PARTIAL 1" in run.stdout
        data = json.loads(mlf(tmp_path, "status", "--json").stdout)
        assert data["rows"]["shard_outputs"] == 3 and data["size_bytes"] > 0 and data["results_retention_s"] is None
        bad = mlf(tmp_path, "prune", "--older-than", "soon")
        assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr
    finally:
        store.close()


def test_jobs_list_shows_open_jobs_first_then_the_latest_ended(tmp_path):
    """`mlf jobs list` (found missing by the README walk-through: job ids were only in the
    demo's output): the PENDING job first, then the ended ones newest first, whole ids,
    a dataset path with brackets printed as typed; `--json` one object per line; `-n`
    bounds the list; an empty store says how to make a job; `--api` asks the API."""
    run = mlf(tmp_path, "jobs", "list")
    assert run.returncode == 0, run.stderr
    assert "no job in the results store" in run.stdout
    store = open_store(tmp_path)
    try:
        first, second = finished_job(store), finished_job(store)
        age(store, first, 1)
        pending = store.create_job(model="m", model_version=1, dataset="in/[red] rows.csv", n_rows=5,
                                   shard_ranges=[(0, 5)], batch_size=5)
        # a name with a terminal escape, a newline and a right-to-left override (review: printed raw)
        escaping = store.create_job(model="m\x1b[2J", model_version=1, dataset="in/\x1b[31mred\u202e.csv\nx",
                                    n_rows=5, shard_ranges=[(0, 5)], batch_size=5)
    finally:
        store.close()
    run = mlf(tmp_path, "jobs", "list")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if job in line) for job in (pending, second, first)]
    assert order == sorted(order), run.stdout
    assert "in/[red] rows.csv" in run.stdout and "PENDING" in lines[order[0]] and "PARTIAL" in lines[order[1]]
    shown = next(line for line in lines if escaping in line)
    assert "in/\\x1b[31mred\\u202e.csv\\nx" in shown and "m\\x1b[2J/1" in shown, shown
    assert "\x1b" not in run.stdout and "\u202e" not in run.stdout
    status = mlf(tmp_path, "status", escaping)
    assert "in/\\x1b[31mred\\u202e.csv\\nx" in status.stdout and "\x1b" not in status.stdout, status.stdout
    assert " 9 " in lines[order[1]] and " 3 " in lines[order[1]] and " 12 " in lines[order[1]]  # ok, failed, of
    run = mlf(tmp_path, "jobs", "list", "--json", "-n", "3")
    assert run.returncode == 0, run.stderr
    listed = [json.loads(line) for line in run.stdout.splitlines()]
    assert [j["job_id"] for j in listed] == [escaping, pending, second]
    assert (listed[2]["state"], listed[2]["rows_ok"], listed[2]["rows_failed"]) == ("PARTIAL", 9, 3)
    for field in ("created_at", "finished_at"):  # ISO 8601, as the HTTP API gives times (was str(): no "T")
        assert datetime.fromisoformat(listed[2][field]).tzinfo is not None and "T" in listed[2][field]
        assert listed[2][field].endswith("Z")  # UTC as the API writes it
    run = mlf(tmp_path, "--api", "http://127.0.0.1:9", "jobs", "list")  # over HTTP: GET /v1/jobs
    assert run.returncode == 1 and "the API at http://127.0.0.1:9 cannot be reached" in run.stderr, run.stderr
