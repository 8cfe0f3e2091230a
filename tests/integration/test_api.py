"""The HTTP API against real worker processes, a real broker and a real database (both
backends), through the ASGI app with httpx (Starlette's TestClient)."""

from __future__ import annotations

import io
import time

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from demo.digits import PIXELS
from ml_framework.settings import load_settings
from producer.api import create_app

pytestmark = pytest.mark.integration
TIMEOUT_S = 240
KEY = "integration-admin-key-0123456789"
AUTH = {"api_keys": {"tests": KEY}, "api_key_roles": {"tests": "admin"}}


def api(values: dict) -> TestClient:
    """The app over ``values`` with one admin key, sent with every request."""
    return TestClient(create_app(load_settings(**values, **AUTH)), headers={"X-API-Key": KEY})


@pytest.fixture
def http(backend):
    with api(backend.values) as client:
        yield client


def wait_done(http, job_id: str, headers=None) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while (body := http.get(f"/v1/jobs/{job_id}", headers=headers).json())["state"] in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    return body


def test_submit_poll_and_page_through_results(http, backend, digits):
    """POST a dataset job, poll it to SUCCEEDED, and read every row back in pages that
    match the Python client's results; CSV and Parquet downloads hold the same rows."""
    r = http.post("/v1/jobs", json={"model": "digits-sklearn", "dataset": "digits.csv", "batch_size": 128})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    done = wait_done(http, job_id)
    n = len(digits.frame)
    assert (done["state"], done["rows_ok"], done["progress"]) == ("SUCCEEDED", n, 1.0)
    rows, offset = [], 0
    while offset is not None:
        page = http.get(f"/v1/jobs/{job_id}/results", params={"offset": offset, "limit": 700}).json()
        rows += page["rows"]
        offset = page["next_offset"]
    expected = backend.client.get_job(job_id).results()
    assert [r["row"] for r in rows] == list(range(n))
    assert [r["prediction"] for r in rows] == expected["prediction"].tolist()
    assert [r["probabilities"] for r in rows] == expected["probabilities"].tolist()
    csv = http.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    assert pd.read_csv(io.StringIO(csv.text), index_col="row")["prediction"].tolist() == expected["prediction"].tolist()
    parquet = pd.read_parquet(io.BytesIO(http.get(f"/v1/jobs/{job_id}/results", params={"format": "parquet"}).content))
    assert len(parquet) == n and parquet["prediction"].tolist() == expected["prediction"].tolist()


def test_inline_rows_with_a_bad_cell_end_partial_naming_row_and_field(http, digits):
    """Inline rows: one text cell fails its row (named), the others are scored."""
    rows = digits.frame[PIXELS].iloc[:20].to_dict(orient="records")
    rows[7]["pixel_3"] = "seven"
    r = http.post("/v1/jobs", json={"model": "digits-torch", "rows": rows})
    assert r.status_code == 202, r.text
    done = wait_done(http, r.json()["job_id"])
    assert (done["state"], done["rows_ok"], done["rows_failed"]) == ("PARTIAL", 19, 1)
    page = http.get(f"/v1/jobs/{done['job_id']}/results").json()["rows"]
    assert page[7] == {"row": 7, "error": "row 7, field 'pixel_3': 'seven' is not a number", "error_field": "pixel_3"}
    assert all("prediction" in row for i, row in enumerate(page) if i != 7)


def test_cancel_errors_and_operations_endpoints(http, backend):
    """POST .../cancel cancels and DELETE deletes; unknown ids, bad bodies and paths outside the data directory are
    JSON errors; /ready, /gpu-status and /metrics describe the live CPU fleet."""
    job = http.post("/v1/jobs", json={"model": "digits-torch", "dataset": "digits.csv", "batch_size": 1}).json()
    assert http.post(f"/v1/jobs/{job['job_id']}/cancel").json()["state"] == "CANCELLED"
    assert http.delete(f"/v1/jobs/{job['job_id']}").status_code == 204
    assert http.get(f"/v1/jobs/{job['job_id']}").status_code == 404
    missing = http.get("/v1/jobs/" + "0" * 32)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "JobNotFoundError"
    bad = http.post("/v1/jobs", json={"model": "digits-torch", "dataset": "digits.csv", "batch_size": 0})
    assert bad.status_code == 422 and "batch_size" in bad.json()["error"]["message"]
    outside = http.post("/v1/jobs", json={"model": "digits-torch", "dataset": "../etc/passwd"})
    assert outside.status_code == 422 and "leaves the data directory" in outside.json()["error"]["message"]
    unknown = http.post("/v1/jobs", json={"model": "nope", "dataset": "digits.csv"})
    assert unknown.status_code == 404 and "'nope' not found" in unknown.json()["error"]["message"]
    ready = http.get("/ready")
    assert ready.status_code == 200, ready.json()
    assert ready.json()["checks"]["workers"].startswith("ok: ")
    gpu = http.get("/gpu-status").json()
    assert gpu["gpus"] == [] and gpu["reason"].endswith("none on a GPU")
    metrics = http.get("/metrics").text
    assert 'mlf_jobs{state="CANCELLED"}' in metrics
    live = next(line for line in metrics.splitlines() if line.startswith("mlf_workers_live "))
    assert float(live.split()[1]) >= 2
    assert http.get("/health").json() == {"status": "ok"}
    schema = http.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results", "/v1/models", "/ready"} <= set(schema["paths"])


def test_api_keys_and_request_size_limit(backend):
    """Requests need a key (header or bearer); /health stays open. Bodies over
    api_max_request_bytes get 413 before they are parsed."""
    with TestClient(create_app(load_settings(**backend.values, **AUTH, api_max_request_bytes=2048))) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert http.get("/health").status_code == 200
        big = {"model": "digits-torch", "rows": [{"pixel_0": 1.0}] * 500}
        r = http.post("/v1/jobs", json=big, headers={"X-API-Key": KEY})
        assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"


def test_results_of_a_finished_job_are_served_from_the_redis_cache(backend, digits):
    """With cache_backend: redis, the rendered results of a finished job are kept in Redis
    with an expiry and served from there: they still come back after their rows are gone
    from the results database (which only the cache can explain)."""
    if backend.name != "redis-postgres":
        pytest.skip("the results cache lives in Redis")
    import redis
    from sqlalchemy import text

    values = {**backend.values, "cache_backend": "redis", "cache_ttl_s": 120}
    with api(values) as http:
        rows = digits.frame[PIXELS].iloc[:30].to_dict("records")
        job_id = http.post("/v1/jobs", json={"model": "digits-sklearn", "rows": rows}).json()["job_id"]
        assert wait_done(http, job_id)["state"] == "SUCCEEDED"
        page = http.get(f"/v1/jobs/{job_id}/results", params={"limit": 10}).json()
        csv = http.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"}).content
        r = redis.Redis.from_url(backend.values["broker_url"])
        keys = sorted(k.decode() for k in r.keys(f"mlf:results:{job_id}:*"))
        assert keys == [f"mlf:results:{job_id}:csv", f"mlf:results:{job_id}:json:0:10"]
        assert all(0 < r.ttl(k) <= 120 for k in keys)
        with backend.client.store.engine.begin() as conn:
            conn.execute(text("DELETE FROM shard_outputs WHERE job_id = :j"), {"j": job_id})
        assert http.get(f"/v1/jobs/{job_id}/results", params={"limit": 10}).json() == page
        assert http.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"}).content == csv
        uncached = http.get(f"/v1/jobs/{job_id}/results", params={"limit": 5}).json()
        assert uncached["rows"] == []  # a page not cached yet reads the (now empty) store
        r.delete(*keys)


def test_retried_submissions_with_one_key_score_the_rows_once(backend, digits):
    """Three API processes' worth of apps POST one job with one Idempotency-Key at the same
    moment (a client retrying after a timeout): one job is recorded (the database's unique
    index decides, on SQLite and on real PostgreSQL), all three answers name it (one 202,
    two 200), and the workers score each row once."""
    import threading
    import uuid

    from sqlalchemy import select

    from ml_framework.store.models import JobRow

    key = str(uuid.uuid4())
    clients = [api(backend.values).__enter__() for _ in range(3)]
    barrier, answers = threading.Barrier(3), []

    def submit(http) -> None:
        barrier.wait()
        answers.append(http.post("/v1/jobs", json={"model": "digits-sklearn", "dataset": "digits.csv"},
                                 headers={"Idempotency-Key": key}))

    try:
        threads = [threading.Thread(target=submit, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
        assert sorted(r.status_code for r in answers) == [200, 200, 202], [r.text for r in answers]
        job_ids = {r.json()["job_id"] for r in answers}
        assert len(job_ids) == 1
        done = wait_done(clients[0], job_ids.pop())
        assert (done["state"], done["rows_ok"], done["rows_failed"]) == ("SUCCEEDED", len(digits.frame), 0)
        with backend.client.store.engine.connect() as conn:
            assert len(conn.execute(select(JobRow.id).where(JobRow.idempotency_key == key)).all()) == 1
    finally:
        for c in clients:
            c.__exit__(None, None, None)
