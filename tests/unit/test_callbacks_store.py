"""Completion callbacks in the results store (claims, outcomes) and their delivery by the
API's sender over an httpx MockTransport; submit-time checks through the Python client
and the HTTP app. The store tests run on SQLite here and again on PostgreSQL in
tests/integration/test_callbacks.py."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ml_framework.callbacks import delivery_id, verify_signature
from ml_framework.errors import CallbackError
from ml_framework.settings import get_settings, load_settings
from ml_framework.store import JobState, NewJob, ResultStore
from producer.api import create_app
from producer.api.callbacks import CallbackSender
from producer.cli import app
from producer.client import Client
from tests.unit.conftest import model_root

HOOK = "http://hooks.example.com/mlf?token=t0k3n"
SECRETS = {"default": "default-secret-0123456789", "alice": "alice-secret-0123456789"}
KEY = "alice-api-key-0123456789abcdef"


@pytest.fixture()
def store(db_url):
    """A results store of this directory's kind (SQLite here, PostgreSQL in tests/integration)."""
    rs = ResultStore(db_url)
    yield rs
    rs.close()


def new_job(rs: ResultStore, shards: int = 1, url: str | None = HOOK, owner: str | None = None) -> str:
    """Record a job of ``shards`` one-row shards with ``url`` as its callback; its id."""
    job = NewJob(uuid.uuid4().hex, "m", 1, "<rows>", shards, [(i, i + 1) for i in range(shards)], 8, owner=owner,
                 callback_url=url)
    rs.create_jobs([job])
    return job.job_id


def finish(rs: ResultStore, job_id: str, shards: int = 1) -> None:
    """Record every shard of ``job_id``, each with one output row."""
    for i in range(shards):
        assert rs.complete_shard(job_id, i, [(i, {"prediction": 1.0})], [])


def test_a_callback_becomes_due_when_its_job_ends_and_is_claimed_once(store):
    """No callback is due while the job runs; the last shard makes it pending in the same
    transaction; one claim takes it (attempt 1), a second finds nothing (leased)."""
    job_id = new_job(store, shards=2)
    plain = new_job(store, url=None)
    finish(store, plain)
    assert store.job(job_id).callback_state is None
    store.complete_shard(job_id, 0, [(0, {"prediction": 1.0})], [])
    assert store.claim_callbacks(60, 10) == []
    store.complete_shard(job_id, 1, [(1, {"prediction": 1.0})], [])
    status = store.job(job_id)
    assert (status.state, status.callback_state, status.callback_attempts) == (JobState.SUCCEEDED, "pending", 0)
    assert store.job(plain).callback_state is None
    [due] = store.claim_callbacks(60, 10)
    assert (due.job_id, due.url, due.attempt, due.state, due.rows_ok, due.n_rows) == (
        job_id, HOOK, 1, "SUCCEEDED", 2, 2)
    assert due.finished_at == status.finished_at
    assert store.claim_callbacks(60, 10) == []
    assert store.callback_delivered(job_id, 1)
    assert (store.job(job_id).callback_state, store.job(job_id).callback_attempts) == ("delivered", 1)
    assert store.claim_callbacks(0, 10) == []


def test_cancelled_and_empty_jobs_are_due_too(store):
    """A cancelled job and a job without rows (SUCCEEDED at once) get their callback."""
    cancelled = new_job(store)
    store.cancel(cancelled)
    empty = NewJob(uuid.uuid4().hex, "m", 1, "<0 inline rows>", 0, [], 8, callback_url=HOOK)
    store.create_jobs([empty])
    due = {d.job_id: d.state for d in store.claim_callbacks(60, 10)}
    assert due == {cancelled: "CANCELLED", empty.job_id: "SUCCEEDED"}


def test_a_failed_attempt_is_retried_then_failed_and_only_its_claimer_records(store):
    """A failed attempt is due again after its delay; a claim whose lease passed is taken
    over (next attempt), and the old claimer's outcome is ignored; without a further
    attempt the callback ends failed."""
    job_id = new_job(store)
    finish(store, job_id)
    [first] = store.claim_callbacks(60, 10)
    assert store.callback_failed(job_id, 1, 3600) == "pending"
    assert store.claim_callbacks(60, 10) == []  # not yet due
    assert store.callback_failed(job_id, 1, 0) == "pending"  # the claimer may still reschedule
    [second] = store.claim_callbacks(0, 10)  # a lease of 0: over at once, as if its process died
    [third] = store.claim_callbacks(60, 10)
    assert (first.attempt, second.attempt, third.attempt) == (1, 2, 3)
    assert not store.callback_delivered(job_id, 2)  # attempt 2 is no longer its claimer's
    assert store.callback_failed(job_id, 2, None) is None
    assert store.callback_failed(job_id, 3, None) == "failed"
    assert (store.job(job_id).callback_state, store.job(job_id).callback_attempts) == ("failed", 3)


def test_concurrent_claimers_take_each_callback_once(store):
    """Four threads claiming at once (as API replicas do) take each due callback once."""
    jobs = [new_job(store) for _ in range(24)]
    for job_id in jobs:
        finish(store, job_id)
    taken: list[str] = []
    lock, start = threading.Lock(), threading.Barrier(4)

    def claimer() -> None:
        start.wait()
        while due := store.claim_callbacks(60, 3):
            with lock:
                taken.extend(d.job_id for d in due)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(jobs)


class Receiver:
    """An httpx MockTransport that answers with ``statuses`` in turn and records requests."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)


def sender(rs: ResultStore, receiver: Receiver, tmp_path: Path, **settings) -> CallbackSender:
    """A sender over ``rs`` posting to ``receiver``, with a fixed clock and no backoff delay."""
    cfg = load_settings(var_dir=tmp_path / "var", callback_allowed_hosts=["hooks.example.com"],
                        callback_secrets=SECRETS, api_public_url="https://mlf.example.com", **settings)
    return CallbackSender(cfg, rs, transport=httpx.MockTransport(receiver), clock=lambda: 1_700_000_000,
                          rng=lambda: 0.0, backoff_base_s=0.0)


def test_the_sender_retries_until_2xx_with_one_delivery_id(store, tmp_path):
    """Answers 500, 503, 200: three signed POSTs (owner alice's secret), attempts 1 to 3,
    one delivery id; then delivered, and nothing more is sent."""
    job_id = new_job(store, owner="alice")
    finish(store, job_id)
    receiver = Receiver(500, 503, 200)
    s = sender(store, receiver, tmp_path)
    try:
        assert [s.run_once() for _ in range(4)] == [1, 1, 1, 0]
    finally:
        s.stop()
    assert [str(r.url) for r in receiver.requests] == [HOOK] * 3
    events = [json.loads(r.content) for r in receiver.requests]
    assert [e["attempt"] for e in events] == [1, 2, 3]
    assert {e["delivery_id"] for e in events} == {delivery_id(job_id)}
    assert {r.headers["X-MLF-Delivery"] for r in receiver.requests} == {delivery_id(job_id)}
    assert events[0]["results_url"] == f"https://mlf.example.com/v1/jobs/{job_id}/results"
    for r in receiver.requests:
        assert r.headers["content-type"] == "application/json"
        assert verify_signature(SECRETS["alice"], r.content, r.headers["X-MLF-Timestamp"],
                                r.headers["X-MLF-Signature"], now=1_700_000_000)
        assert not verify_signature(SECRETS["default"], r.content, r.headers["X-MLF-Timestamp"],
                                    r.headers["X-MLF-Signature"], now=1_700_000_000)
    assert (store.job(job_id).callback_state, store.job(job_id).callback_attempts) == ("delivered", 3)


def test_the_sender_gives_up_after_max_attempts_and_logs_no_secret(store, tmp_path, caplog):
    """A receiver that always fails gets callback_max_attempts attempts, then the callback
    is failed; the log names the URL without its query, never the secret or token."""
    job_id = new_job(store)
    finish(store, job_id)
    receiver = Receiver(*[500] * 10)
    s = sender(store, receiver, tmp_path, callback_max_attempts=3)
    caplog.set_level("INFO", logger="producer.api.callbacks")
    try:
        assert [s.run_once() for _ in range(4)] == [1, 1, 1, 0]
    finally:
        s.stop()
    assert len(receiver.requests) == 3
    assert (store.job(job_id).callback_state, store.job(job_id).callback_attempts) == ("failed", 3)
    assert "http://hooks.example.com/mlf" in caplog.text and "attempt 3 of 3" in caplog.text
    assert "t0k3n" not in caplog.text and "secret-0123" not in caplog.text


def test_the_sender_fails_a_callback_whose_host_is_no_longer_allowed(store, tmp_path):
    """A callback whose host the settings no longer allow is failed without a request."""
    job_id = new_job(store, url="http://old.example.com/hook")
    finish(store, job_id)
    receiver = Receiver()
    s = sender(store, receiver, tmp_path)
    try:
        assert s.run_once() == 1
    finally:
        s.stop()
    assert receiver.requests == [] and store.job(job_id).callback_state == "failed"


def test_the_client_refuses_a_callback_without_a_secret_or_allowed_host(tmp_path):
    """score_rows with a callback_url: refused before anything is recorded when no host is
    allowed or no secret would sign it; recorded with the URL otherwise."""
    root = model_root(tmp_path)
    base = {"models_dir": root / "models", "data_dir": root / "data", "var_dir": root / "var",
            "bulk_queue": "mlf.cb.bulk", "online_queue": "mlf.cb.online"}
    rows = pd.DataFrame({"a": [1.0], "b": [2.0]})
    with Client(load_settings(**base, callback_secrets=SECRETS)) as client, \
            pytest.raises(CallbackError, match="callback_allowed_hosts"):
        client.score_rows(rows, "m", callback_url=HOOK)
    with Client(load_settings(**base, callback_allowed_hosts=["hooks.example.com"])) as client:
        with pytest.raises(CallbackError, match=r"jobs submitted without an API key.*default=<secret>"):
            client.score_rows(rows, "m", callback_url=HOOK)
        with pytest.raises(CallbackError, match="API key 'bob'.*callback_secrets"):
            client.score_rows(rows, "m", callback_url=HOOK, owner="bob")
        assert sum(client.store.job_counts().values()) == 0
    with Client(load_settings(**base, callback_allowed_hosts=["hooks.example.com"],
                              callback_secrets=SECRETS)) as client:
        job = client.score_rows(rows, "m", callback_url=HOOK)
        assert client.store.job(job.id).callback_state is None


def test_the_api_answers_400_for_a_refused_callback_url(tmp_path):
    """POST /v1/jobs with a callback_url the server refuses: 400 CallbackError naming the
    setting (no URL echoed); an allowed one is accepted, and the job shows its callback state."""
    root = model_root(tmp_path)
    cfg = load_settings(models_dir=root / "models", data_dir=root / "data", var_dir=root / "var",
                        bulk_queue="mlf.cb.bulk", online_queue="mlf.cb.online", api_keys={"alice": KEY},
                        callback_allowed_hosts=["hooks.example.com"], callback_secrets={"alice": SECRETS["alice"]})
    body = {"model": "m", "rows": [{"a": 1.0, "b": 2.0}]}
    with TestClient(create_app(cfg), headers={"X-API-Key": KEY}) as http:
        for url, says in [("http://evil.example.net/x?token=t0k3n", "callback_allowed_hosts"),
                          ("http://u:pw@hooks.example.com/", "credentials"), ("file:///etc/passwd", "http or https")]:
            r = http.post("/v1/jobs", json={**body, "callback_url": url})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "CallbackError" and says in error["message"], error
            assert "t0k3n" not in r.text and "pw@" not in r.text
        r = http.post("/v1/jobs", json={**body, "callback_url": HOOK})
        assert r.status_code == 202, r.text
        assert (r.json()["callback_state"], r.json()["callback_attempts"]) == (None, 0)


def test_mlf_score_takes_a_callback_url_and_mlf_status_shows_its_delivery(clean_env, monkeypatch, tmp_path):
    """`mlf score --callback-url` records the URL with the job (refused, exit 1, naming the
    setting, when no host is allowed); `mlf status` prints the callback's state."""
    root = model_root(tmp_path)
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_csv(root / "data" / "d.csv", index=False)
    for key, value in {"MODELS_DIR": root / "models", "DATA_DIR": root / "data", "VAR_DIR": root / "var",
                       "BULK_QUEUE": "mlf.cb.bulk", "ONLINE_QUEUE": "mlf.cb.online",
                       "CALLBACK_SECRETS": "default=cli-secret-0123456789"}.items():
        monkeypatch.setenv(f"ML_FRAMEWORK_{key}", str(value))
    get_settings.cache_clear()
    refused = CliRunner().invoke(app, ["score", "data/d.csv", "-m", "m", "--callback-url", HOOK])
    assert refused.exit_code == 1 and "callback_allowed_hosts" in refused.stderr, refused.output
    monkeypatch.setenv("ML_FRAMEWORK_CALLBACK_ALLOWED_HOSTS", "hooks.example.com")
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(app, ["score", "data/d.csv", "-m", "m", "--callback-url", HOOK])
        assert done.exit_code == 0, done.output
        job_id = done.stdout.strip().splitlines()[-1]
        rs = ResultStore(get_settings().effective_database_url)
        rs.cancel(job_id)
        [claimed] = rs.claim_callbacks(60, 10)
        assert (claimed.job_id, claimed.url, claimed.owner) == (job_id, HOOK, None)
        rs.callback_delivered(job_id, 1)
        rs.close()
        status = CliRunner().invoke(app, ["status", job_id])
        assert "callback delivered (1 attempt(s))" in status.stdout, status.output
    finally:
        get_settings.cache_clear()


def test_a_receiver_that_hangs_holds_up_no_other_jobs_callback(store, tmp_path):
    """The sender's loop keeps attempts in flight on their own threads: while one receiver
    hangs, another job's callback is delivered."""
    slow_job, fast_job = new_job(store, url="http://hooks.example.com/slow"), new_job(store)
    finish(store, slow_job)
    release, fast_done = threading.Event(), threading.Event()

    def receiver(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            release.wait(5)
        else:
            fast_done.set()
        return httpx.Response(200)

    cfg = load_settings(var_dir=tmp_path / "var", callback_allowed_hosts=["hooks.example.com"], callback_secrets=SECRETS)
    s = CallbackSender(cfg, store, transport=httpx.MockTransport(receiver), backoff_base_s=0.0)
    tick = threading.Event()  # never set: its wait is a short pause

    def until(predicate) -> bool:
        for _ in range(500):
            if predicate():
                return True
            tick.wait(0.01)
        return False

    s.start()
    try:
        assert until(lambda: store.job(slow_job).callback_attempts == 1)  # the slow receiver holds its attempt
        finish(store, fast_job)  # due while the slow attempt is still under way
        assert fast_done.wait(5), "the second callback waited for the receiver that hangs"
        assert until(lambda: store.job(fast_job).callback_state == "delivered")
        assert store.job(slow_job).callback_state == "pending" and not release.is_set()
    finally:
        release.set()
        s.stop()
