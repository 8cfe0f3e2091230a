"""Completion callbacks end to end: two real uvicorn API processes over one Redis broker and
one PostgreSQL store, real worker processes, and a real receiver (stdlib ``http.server`` in
a thread). A job submitted over HTTP with a ``callback_url`` gets exactly one signed
delivery once it ends, retries keep the delivery id, the two API processes deliver each
job once, and a host not allowed is refused with 400. The store tests of
``tests/unit/test_callbacks_store.py`` run again here on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from demo.digits import PIXELS
from ml_framework.callbacks import verify_signature
from tests.conftest import api_server, database_tests, shared_backend
from tests.unit import test_callbacks_store
from tests.unit.test_callbacks_store import store  # noqa: F401 - the fixture, over this directory's db_kind

globals().update(database_tests(test_callbacks_store))

pytestmark = pytest.mark.integration
KEY = {"X-API-Key": "callbacks-key-0123456789abcdef"}
SECRET = "callbacks-secret-0123456789abcdef"
TIMEOUT_S = 180
QUIET_S = 2.5
"""How long the receiver is watched after a delivery for a second one: over two polls
(1 s) of each API process."""


class Receiver:
    """A webhook receiver on a free port: records every POST, answers the statuses planned
    for its path in turn, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.plan: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append((self.path, dict(self.headers), body))
                    planned = receiver.plan.get(self.path)
                    status = planned.pop(0) if planned else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def to(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        """``(headers, body)`` of the requests received at ``path``."""
        with self.lock:
            return [(h, b) for p, h, b in self.requests if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=["redis-postgres"])
def redis_pg(request):
    """The session's Redis + PostgreSQL workers (both API processes need one shared store)."""
    return shared_backend(request)


@pytest.fixture(scope="module")
def setup(redis_pg, tmp_path_factory):
    """A receiver, and two ``uvicorn producer.api:app`` processes over the backend that allow
    callbacks to 127.0.0.1; yields ``(receiver, [client of each API])``."""
    receiver = Receiver()
    logs = tmp_path_factory.mktemp("callback-apis")
    env = {**redis_pg.env, "ML_FRAMEWORK_API_KEYS": f"cb={KEY['X-API-Key']}", "ML_FRAMEWORK_LOG_TO_FILE": "false",
           "ML_FRAMEWORK_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "ML_FRAMEWORK_CALLBACK_SECRETS": f"cb={SECRET}"}
    with contextlib.ExitStack() as stack:
        clients = []
        for i in range(2):
            url, _ = stack.enter_context(api_server(env, logs / f"api{i}.log"))
            clients.append(stack.enter_context(httpx.Client(base_url=url, headers=KEY, timeout=60)))
        try:
            yield receiver, clients
        finally:
            receiver.close()
            for i in range(2):
                path = logs / f"api{i}.log"
                if path.exists():
                    print(f"--- api{i}.log (tail)\n{path.read_text(errors='replace')[-3000:]}")


def submit(api: httpx.Client, url: str, rows: int = 5) -> str:
    """POST a job of ``rows`` inline digit rows with ``url`` as its callback; its id."""
    zeros = {p: 0.0 for p in PIXELS}
    r = api.post("/v1/jobs", json={"model": "digits-sklearn", "rows": [zeros] * rows, "callback_url": url})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def wait_callback(api: httpx.Client, job_id: str, state: str = "delivered") -> dict:
    """Poll the job until its callback reaches ``state``; the job."""
    deadline = time.monotonic() + TIMEOUT_S
    while (job := api.get(f"/v1/jobs/{job_id}").json())["callback_state"] != state:
        assert time.monotonic() < deadline and job["callback_state"] != "failed", job
        time.sleep(0.2)
    return job


def test_a_job_gets_one_delivery_signed_with_its_keys_secret(setup):
    """A job submitted over HTTP with a callback_url ends; the receiver gets exactly one
    POST, whose signature verifies with the key's secret and whose event describes the job."""
    receiver, (api, _) = setup
    path = f"/hook/{uuid.uuid4().hex}"
    job_id = submit(api, receiver.base + path + "?token=abc")
    job = wait_callback(api, job_id)
    time.sleep(QUIET_S)
    [(headers, body)] = receiver.to(path + "?token=abc")
    assert verify_signature(SECRET, body, headers["X-MLF-Timestamp"], headers["X-MLF-Signature"])
    assert not verify_signature("another-secret", body, headers["X-MLF-Timestamp"], headers["X-MLF-Signature"])
    event = json.loads(body)
    assert headers["Content-Type"] == "application/json" and headers["X-MLF-Delivery"] == event["delivery_id"]
    assert {k: event[k] for k in ("type", "job_id", "state", "rows_ok", "rows_failed", "n_rows", "attempt")} == {
        "type": "job.finished", "job_id": job_id, "state": "SUCCEEDED", "rows_ok": 5, "rows_failed": 0,
        "n_rows": 5, "attempt": 1}
    assert event["results_url"] == f"/v1/jobs/{job_id}/results" and event["finished_at"].endswith("Z")
    assert (job["state"], job["callback_attempts"]) == ("SUCCEEDED", 1)


def test_a_failing_receiver_gets_retries_with_one_delivery_id(setup):
    """The receiver answers 500 twice, then 200: three attempts, numbered 1 to 3, with one
    delivery id; the callback ends delivered after 3 attempts."""
    receiver, (api, _) = setup
    path = f"/flaky/{uuid.uuid4().hex}"
    receiver.plan[path] = [500, 500]
    job_id = submit(api, receiver.base + path)
    job = wait_callback(api, job_id)
    time.sleep(QUIET_S)
    deliveries = receiver.to(path)
    assert [json.loads(b)["attempt"] for _, b in deliveries] == [1, 2, 3]
    assert len({h["X-MLF-Delivery"] for h, _ in deliveries} | {json.loads(b)["delivery_id"] for _, b in deliveries}) == 1
    assert all(verify_signature(SECRET, b, h["X-MLF-Timestamp"], h["X-MLF-Signature"]) for h, b in deliveries)
    assert job["callback_attempts"] == 3


def test_two_api_processes_deliver_each_job_once(setup):
    """Jobs submitted through both API processes, which both deliver from the one store:
    each job's event arrives exactly once."""
    receiver, apis = setup
    paths = {}
    for i in range(6):
        path = f"/once/{uuid.uuid4().hex}"
        paths[submit(apis[i % 2], receiver.base + path)] = path
    for job_id in paths:
        wait_callback(apis[0], job_id)
    time.sleep(QUIET_S)
    assert {job_id: len(receiver.to(path)) for job_id, path in paths.items()} == {job_id: 1 for job_id in paths}


def test_a_callback_to_a_host_not_allowed_is_refused_with_400(setup):
    """callback_url to a host outside callback_allowed_hosts: 400 CallbackError naming the
    setting; nothing is recorded or delivered."""
    receiver, (api, _) = setup
    before = len(receiver.requests)
    r = api.post("/v1/jobs", json={"model": "digits-sklearn", "rows": [{p: 0.0 for p in PIXELS}],
                                   "callback_url": "http://192.0.2.10/hook"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "CallbackError"
    assert "callback_allowed_hosts" in r.json()["error"]["message"]
    assert len(receiver.requests) == before
