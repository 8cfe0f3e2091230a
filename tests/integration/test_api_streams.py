"""Streamed answers of the HTTP API against a real uvicorn API process, real worker
processes, broker and results store (both backends): a job's progress as Server-Sent
Events, its results as an Arrow IPC stream and as NDJSON."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import api_server

pytestmark = pytest.mark.integration
OWNER = {"X-API-Key": "streams-owner-key-0123456789"}
OTHER = {"X-API-Key": "streams-other-key-0123456789"}
RANK = {"PENDING": 0, "RUNNING": 1, "SUCCEEDED": 2, "PARTIAL": 2}
TIMEOUT_S = 240


@pytest.fixture
def api(backend, tmp_path: Path):
    """``uvicorn producer.api:app`` over the backend, with two user keys; yields an
    ``httpx.Client`` on its base URL (its log file as ``client.log_path``)."""
    keys = f"owner={OWNER['X-API-Key']},other={OTHER['X-API-Key']}"
    env = {**backend.env, "ML_FRAMEWORK_API_KEYS": keys, "ML_FRAMEWORK_LOG_TO_FILE": "false"}
    with api_server(env, tmp_path / "api.log") as (url, _), httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        client.log_path = tmp_path / "api.log"
        yield client


def read_events(api: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """``(event, data)`` of the job's event stream, read until the server closes it."""
    events, event = [], None
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=OWNER) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
    return events


def test_events_follow_a_job_to_its_end(api):
    """The event stream of a new job reports its states in order and its rows recorded
    never going back, then ``end`` with the final job, and closes; another key's job is 404."""
    r = api.post("/v1/jobs", json={"model": "digits-torch", "dataset": "digits.csv", "batch_size": 32},
                 headers=OWNER)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert api.get(f"/v1/jobs/{job_id}/events", headers=OTHER).status_code == 404
    events = read_events(api, job_id)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "end" and set(kinds[:-1]) == {"progress"}, kinds
    progress = [d for e, d in events if e == "progress"]
    ranks = [RANK[d["state"]] for d in progress]
    assert ranks == sorted(ranks) and progress[-1]["state"] == "SUCCEEDED", ranks
    done = [d["rows_ok"] + d["rows_failed"] for d in progress]
    assert done == sorted(done) and done[-1] == progress[-1]["n_rows"]
    assert events[-1][1] == progress[-1] == api.get(f"/v1/jobs/{job_id}", headers=OWNER).json()
    again = read_events(api, job_id)  # an ended job: its state, then end at once
    assert [e for e, _ in again] == ["progress", "end"] and again[-1][1]["state"] == "SUCCEEDED"


def test_arrow_and_ndjson_streams_equal_the_parquet_download(api, digits):
    """A job with a failed row: the Arrow IPC stream reads back as the Parquet download's
    table, NDJSON gives the same rows, one JSON object per line; another key's job is 404."""
    rows = digits.frame.drop(columns=["label", "split"]).iloc[:60].to_dict(orient="records")
    rows[7]["pixel_3"] = "seven"
    r = api.post("/v1/jobs", json={"model": "digits-sklearn", "rows": rows}, headers=OWNER)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    events = read_events(api, job_id)
    assert events[-1][0] == "end" and events[-1][1]["state"] == "PARTIAL"
    url = f"/v1/jobs/{job_id}/results"
    parquet = pq.read_table(io.BytesIO(api.get(url, params={"format": "parquet"}, headers=OWNER).content))
    arrow = api.get(url, params={"format": "arrow"}, headers=OWNER)
    assert arrow.headers["content-type"] == "application/vnd.apache.arrow.stream"
    streamed = pa.ipc.open_stream(arrow.content).read_all()
    assert streamed.equals(parquet) and streamed.num_rows == 60
    ndjson = api.get(url, params={"format": "ndjson"}, headers=OWNER)
    assert ndjson.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in ndjson.text.splitlines()]
    assert lines == parquet.to_pylist()
    assert lines[7]["error_field"] == "pixel_3" and lines[7]["prediction"] is None
    for fmt in ("arrow", "ndjson"):
        assert api.get(url, params={"format": fmt}, headers=OTHER).status_code == 404


def test_event_stream_stops_when_the_client_goes(api):
    """A client that closes the event stream of a long job: the API stops reading the job
    for it within a second or so (it says so in its log)."""
    r = api.post("/v1/jobs", json={"model": "digits-torch", "dataset": "digits.csv", "batch_size": 1},
                 headers=OWNER)
    job_id = r.json()["job_id"]
    try:
        with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=OWNER) as events:
            assert next(events.iter_lines()) == "event: progress"
        deadline = time.monotonic() + 20
        while f"job {job_id}: event stream closed by the client" not in api.log_path.read_text():
            assert time.monotonic() < deadline, api.log_path.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        api.post(f"/v1/jobs/{job_id}/cancel", headers=OWNER)
