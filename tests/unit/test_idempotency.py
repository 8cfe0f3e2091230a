"""Retried submissions: an idempotency key (HTTP ``Idempotency-Key``, ``idempotency_key=``,
``mlf score --idempotency-key``) makes a repeat return the job it first submitted, within
``idempotency_window``, per owner, race-safe on SQLite and PostgreSQL. No worker runs: jobs
stay PENDING, which is all these checks need."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from ml_framework.errors import IdempotencyKeyError, IdempotencyKeyReusedError
from ml_framework.settings import load_settings
from ml_framework.store import NewJob, ResultStore
from ml_framework.store.idempotency import Idempotency, request_hash
from ml_framework.store.models import JobRow
from producer.api import create_app
from producer.client import Client

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}


@pytest.fixture()
def store(db_url):
    """A fresh store: a SQLite file here, a PostgreSQL database of this test's own in
    tests/integration/test_idempotency_postgresql.py, which runs these tests again."""
    s = ResultStore(db_url)
    yield s
    s.close()


def new_job(owner: str | None = None) -> NewJob:
    return NewJob(uuid.uuid4().hex, "m", 1, "d.csv", 4, [(0, 2), (2, 4)], 2, owner=owner)


def jobs_with_key(store: ResultStore, key: str) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(JobRow.id).where(JobRow.idempotency_key == key)).scalars())


def n_jobs(store: ResultStore) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(JobRow)).scalar_one()


def test_concurrent_submissions_with_one_key_record_one_job(store):
    """Eight threads recording a job under one key at the same moment: one records it, every
    one gets its id, and the store holds one job (the unique index decides the race)."""
    key = Idempotency("retry-1", request_hash({"dataset": "d.csv"}))
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool]] = []

    def submit() -> None:
        job = new_job()
        barrier.wait()
        results.append(store.create_job_once(job, key))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and sum(created for _, created in results) == 1
    assert len({job_id for job_id, _ in results}) == 1
    assert jobs_with_key(store, "retry-1") == [results[0][0]] and n_jobs(store) == 1


def test_a_submission_racing_an_uncommitted_one_returns_its_job(store):
    """The race made certain: a job with the key is inserted and not yet committed when a
    second submission with the key looks for it (and finds nothing); the unique index makes
    the second wait for the first to commit and then answer with its job, recording none."""
    from ml_framework.store.jobs import insert_jobs as _insert_jobs
    from ml_framework.store.models import utc_now

    key = Idempotency("racing", request_hash({"dataset": "d.csv"}))
    first = new_job()
    first.idempotency_key, first.request_hash = key.key, key.request_hash
    results: list[tuple[str, bool]] = []
    with store.engine.connect() as conn:
        tx = conn.begin()
        _insert_jobs(conn, [first], utc_now())
        second = threading.Thread(target=lambda: results.append(store.create_job_once(new_job(), key)))
        second.start()
        second.join(1.0)
        assert second.is_alive() or results == [(first.job_id, False)]  # SQLite: it waits at BEGIN
        tx.commit()
    second.join(60)
    assert results == [(first.job_id, False)] and n_jobs(store) == 1


def test_the_database_refuses_a_second_job_with_a_key_even_without_an_owner(store):
    """Revision 0011's unique index: two jobs of the CLI (owner NULL) with one key cannot
    both be recorded; jobs without a key never collide; other owners have their own keys."""
    first, second = new_job(), new_job()
    first.idempotency_key = second.idempotency_key = "k"
    store.create_jobs([first])
    with pytest.raises(IntegrityError):
        store.create_jobs([second])
    store.create_jobs([new_job(), new_job()])
    other = new_job(owner="alice")
    other.idempotency_key = "k"
    store.create_jobs([other])
    assert n_jobs(store) == 4


def test_a_key_is_per_owner_names_one_request_and_expires_with_its_window(store):
    """Another owner's key is another key; the same key with another request is refused naming
    the job; past the window a repeat records a new job and the old one loses the key."""
    key = Idempotency("k", request_hash({"rows": "a"}), owner="alice", window=timedelta(hours=24))
    first, created = store.create_job_once(new_job(), key)
    assert created and store.create_job_once(new_job(), key) == (first, False)
    bob, created = store.create_job_once(new_job(), Idempotency("k", key.request_hash, owner="bob"))
    assert created and bob != first
    other_request = Idempotency("k", request_hash({"rows": "b"}), owner="alice")
    with pytest.raises(IdempotencyKeyReusedError, match=f"used for job {first} with a different request") as exc:
        store.create_job_once(new_job(), other_request)
    assert exc.value.job_id == first and n_jobs(store) == 2
    with store.engine.begin() as conn:  # the first job was submitted 25 hours ago
        conn.execute(update(JobRow).where(JobRow.id == first).values(
            created_at=JobRow.created_at - timedelta(hours=25)))
    assert store.idempotent_job(key) is None
    again, created = store.create_job_once(new_job(), other_request)
    assert created and again != first and jobs_with_key(store, "k") != [first]
    assert sorted(jobs_with_key(store, "k")) == sorted([again, bob])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A model (manifest only: no worker loads it) and a data directory with two CSVs."""
    root = tmp_path_factory.mktemp("idempotency")
    version = root / "models" / "m" / "1"
    version.mkdir(parents=True)
    (version / "manifest.yaml").write_text(yaml.safe_dump({
        "name": "m", "version": 1, "framework": "sklearn", "artifact": "model.skops",
        "inputs": {"columns": ["a", "b"]}, "outputs": {"kind": "regression"}}))
    (root / "data").mkdir()
    (root / "data" / "day1.csv").write_text("a,b\n1,2\n3,4\n")
    (root / "data" / "day2.csv").write_text("a,b\n5,6\n")
    return root


def values(root: Path) -> dict:
    return {"models_dir": root / "models", "data_dir": root / "data", "var_dir": root / "var",
            "bulk_queue": "mlf.idem.bulk", "online_queue": "mlf.idem.online"}


@pytest.fixture(scope="module")
def http(root):
    with TestClient(create_app(load_settings(**values(root), api_keys=KEYS))) as client:
        yield client


def post(http, who: str, key: str | None, **body):
    headers = {"X-API-Key": KEYS[who], **({"Idempotency-Key": key} if key is not None else {})}
    return http.post("/v1/jobs", json={"model": "m", **body}, headers=headers)


def test_a_retried_post_returns_the_original_job(http):
    """POST twice with one key: 202 then 200 with the same job (Idempotent-Replayed: true),
    whether the key is bare or a quoted structured-field string, for datasets and rows;
    without a key each POST is a new job."""
    key = uuid.uuid4().hex
    first = post(http, "alice", key, dataset="day1.csv")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers, first.text
    for again in (post(http, "alice", key, dataset="day1.csv"), post(http, "alice", f'"{key}"', dataset="day1.csv"),
                  post(http, "alice", key, dataset="./day1.csv", priority=0)):
        assert again.status_code == 200, again.text
        assert again.json()["job_id"] == first.json()["job_id"] and again.headers["Idempotent-Replayed"] == "true"
    rows = [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    r1, r2 = (post(http, "alice", "rows-" + key, rows=rows) for _ in range(2))
    assert (r1.status_code, r2.status_code) == (202, 200) and r1.json()["job_id"] == r2.json()["job_id"]
    plain = [post(http, "alice", None, dataset="day1.csv").json()["job_id"] for _ in range(2)]
    assert len(set(plain)) == 2 and first.json()["job_id"] not in plain


def test_the_same_key_with_another_body_is_refused_and_keys_are_per_api_key(http):
    """A different dataset, option or rows under a used key: 422 naming the job, nothing new
    recorded. Another API key's same key is its own: a new job."""
    key = uuid.uuid4().hex
    first = post(http, "alice", key, dataset="day1.csv").json()["job_id"]
    for body in ({"dataset": "day2.csv"}, {"dataset": "day1.csv", "priority": 5}, {"rows": [{"a": 1, "b": 2}]}):
        r = post(http, "alice", key, **body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] == "IdempotencyKeyReusedError"
        assert f"was used for job {first} with a different request" in r.json()["error"]["message"]
    other = post(http, "bob", key, dataset="day1.csv")
    assert other.status_code == 202 and other.json()["job_id"] != first
    assert http.get(f"/v1/jobs/{first}", headers={"X-API-Key": KEYS["bob"]}).status_code == 404


def test_a_malformed_key_is_refused(http):
    """An empty, over-long or unterminated key: 422 naming the header, no job."""
    for bad in ("x" * 256, '"unterminated', '""'):
        r = post(http, "alice", bad, dataset="day1.csv")
        assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]["message"], r.text


def test_the_python_client_takes_idempotency_key(root):
    """score_dataset / score_rows with idempotency_key=: the repeat is the same job
    (replayed), another request under the key raises, a malformed key raises first."""
    with Client(load_settings(**values(root))) as c:
        key = uuid.uuid4().hex
        job = c.score_dataset(root / "data" / "day1.csv", "m", idempotency_key=key)
        again = c.score_dataset(root / "data" / "day1.csv", "m", idempotency_key=key)
        assert (again.id, job.replayed, again.replayed) == (job.id, False, True)
        with pytest.raises(IdempotencyKeyReusedError, match=job.id):
            c.score_dataset(root / "data" / "day2.csv", "m", idempotency_key=key)
        rows = c.score_rows([{"a": 1, "b": 2}], "m", idempotency_key="r" + key)
        assert c.score_rows([{"b": 2, "a": 1}], "m", idempotency_key="r" + key).id == rows.id
        with pytest.raises(IdempotencyKeyReusedError):
            c.score_rows([{"a": 1, "b": 3}], "m", idempotency_key="r" + key)
        with pytest.raises(IdempotencyKeyError, match="printable ASCII"):
            c.score_rows([{"a": 1, "b": 2}], "m", idempotency_key="tab\there")


def test_mlf_score_idempotency_key_prints_the_same_job(root):
    """`mlf score --idempotency-key K` run twice prints one job id; the second run says
    that the key's job was submitted before (and when) and nothing was sent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values(root).items()})
    runs = [subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "score",
                            str(root / "data" / "day2.csv"), "--model", "m", "--idempotency-key", "nightly-2026-12-01"],
                           env=env, capture_output=True, text=True, timeout=120, check=True) for _ in range(2)]
    ids = [run.stdout.strip() for run in runs]
    assert len(ids[0]) == 32 and ids[0] == ids[1]
    assert "already submitted" not in runs[0].stderr
    assert re.search(rf"job {ids[0]} already submitted with this idempotency key at \d{{4}}-\d\d-\d\d "
                     r"\d\d:\d\d:\d\d UTC \(now PENDING\); not sent again", runs[1].stderr), runs[1].stderr


def test_a_submission_that_could_not_be_sent_keeps_no_key(root, tmp_path):
    """The broker refuses the first try: nothing is recorded (the broker is reached before
    the job is), so a retry with the key, once the broker is back, submits a new job; a job
    whose sending failed midway gives its key back (``release_idempotency_key``)."""
    settings = {**values(root), "var_dir": tmp_path / "var"}
    with Client(load_settings(**settings, broker_url="redis://127.0.0.1:1/0")) as down:
        with pytest.raises(Exception, match="127.0.0.1:1"):
            down.score_rows([{"a": 1, "b": 2}], "m", idempotency_key="after-outage")
        with down.store.engine.connect() as conn:
            assert conn.execute(select(JobRow.id)).all() == []
    with Client(load_settings(**settings)) as up:
        job = up.score_rows([{"a": 1, "b": 2}], "m", idempotency_key="after-outage")
        assert not job.replayed and job.status().state.value == "PENDING"
        assert up.score_rows([{"a": 1, "b": 2}], "m", idempotency_key="after-outage").id == job.id
        up.store.cancel(job.id)
        up.store.release_idempotency_key(job.id)  # what _submit does when a send fails midway
        again = up.score_rows([{"a": 1, "b": 2}], "m", idempotency_key="after-outage")
        assert not again.replayed and again.id != job.id
