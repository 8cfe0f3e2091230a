"""The HTTP client (``Client.connect``) on a fake API (``httpx.MockTransport``): error
answers become the direct client's classes with the API's message, the key never shows,
``Job`` works through it, and a results table read back over HTTP makes the direct
client's DataFrame. The real API and workers: tests/integration/test_client_transports.py."""

from __future__ import annotations

import json

import httpx
import pandas as pd
import pyarrow as pa
import pytest

from ml_framework.errors import (
    ApiResponseError,
    ApiUnavailableError,
    BodyInvalidError,
    DatasetPathError,
    ForbiddenError,
    JobNotFoundError,
    JobOptionError,
    JobTimeoutError,
    StoreUnavailableError,
    UnauthorizedError,
)
from producer import job as job_module
from producer.client import Client
from producer.http_client import POLL_S, HttpClient
from producer.results import results_frame, table_frame

SECRET = "unit-secret-key-0123456789"
JOB = "ab" * 16
STATUS = {"job_id": JOB, "model": "m", "model_version": 1, "dataset": "d.csv", "owner": "alice",
          "state": "PENDING", "n_rows": 3, "rows_ok": 0, "rows_failed": 0, "n_shards": 1, "shards_done": 0,
          "batch_size": 2, "oom_splits": 0, "priority": 0, "model_load_s": None,
          "created_at": "2026-12-01T05:00:00Z", "started_at": None, "finished_at": None, "progress": 0.0}


def fake(handler) -> HttpClient:
    """An HttpClient whose requests ``handler(request) -> httpx.Response`` answers."""
    return HttpClient("http://api.test:8000/", SECRET, transport=httpx.MockTransport(handler))


def error(status: int, kind: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": message, "request_id": "rid-12345678"}},
                          headers={"X-Request-ID": "rid-12345678"})


@pytest.mark.parametrize(("status", "kind", "cls"), [
    (404, "JobNotFoundError", JobNotFoundError),
    (401, "UnauthorizedError", UnauthorizedError),
    (403, "ForbiddenError", ForbiddenError),
    (422, "DatasetPathError", DatasetPathError),
    (422, "ValidationError", BodyInvalidError),
    (503, "StoreUnavailableError", StoreUnavailableError),
    (504, "JobTimeoutError", JobTimeoutError),
    (500, "InternalError", ApiResponseError),
])
def test_error_answers_raise_the_direct_clients_classes(status, kind, cls):
    """Each error body's type is raised as that class of ml_framework.errors, with the
    API's message, its status and request id; job_id is kept where the class has one."""
    client = fake(lambda request: error(status, kind, f"what was wrong ({kind})"))
    with pytest.raises(cls) as raised:
        client.get_job(JOB)
    assert str(raised.value).endswith(f"what was wrong ({kind})")  # a 401 says first where the key came from
    assert (raised.value.status, raised.value.request_id) == (status, "rid-12345678")
    if cls is JobTimeoutError:
        assert raised.value.job_id == JOB


def test_an_answer_that_is_not_the_apis_names_the_status_and_url():
    """A 404 page that is not the API's JSON (a wrong base URL) is no JobNotFoundError but
    an ApiResponseError naming the status and the URL; a proxy's bare 401 is Unauthorized."""
    with pytest.raises(ApiResponseError, match=r"HTTP 404 Not Found from http://api.test:8000/v1/jobs/abab.*: nope"):
        fake(lambda request: httpx.Response(404, text="nope")).get_job(JOB)
    with pytest.raises(UnauthorizedError):
        fake(lambda request: httpx.Response(401, text="")).models()


def test_a_success_answer_that_is_not_the_apis_is_an_api_response_error():
    """A 200 that is not the API's JSON (a proxy's sign-in page at the URL, a server too
    old for GET /v1/jobs answering its own JSON) raised JSONDecodeError or KeyError from
    the client's insides: an ApiResponseError naming the status, URL and content type."""
    page = httpx.Response(200, text="<html>Sign in to the proxy</html>", headers={"Content-Type": "text/html"})

    def status_then_page(request: httpx.Request) -> httpx.Response:  # results() reads the status first
        return httpx.Response(200, json=STATUS) if request.url.path == f"/v1/jobs/{JOB}" else page

    for call, handler in [(lambda c: c.recent_jobs(5), lambda r: page), (lambda c: c.get_job(JOB), lambda r: page),
                          (lambda c: c.models(), lambda r: page), (lambda c: c.get_job(JOB).results(), status_then_page)]:
        with pytest.raises(ApiResponseError, match=r"HTTP 200 from http://api\.test:8000/v1/\S+ is not the "
                                                   r"ml-framework API's answer \(text/html, not .*Sign in"):
            call(fake(handler))
    with pytest.raises(ApiResponseError, match=r"\(application/json, not JSON with field jobs\)"):
        fake(lambda request: httpx.Response(200, json={"detail": "something else"})).recent_jobs(5)


def test_the_key_is_sent_as_bearer_and_never_shown():
    """The key goes in Authorization: Bearer; the client's repr, an unreachable API's error
    and the request's repr hold no key."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    client = fake(handler)
    with pytest.raises(ApiUnavailableError) as raised:
        client.models()
    assert seen[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert "http://api.test:8000" in str(raised.value)
    for text in (repr(client), str(raised.value), repr(raised.value), repr(seen[0].headers), repr(client._http)):
        assert SECRET not in text, text


def test_a_401_to_a_client_without_a_key_says_how_to_give_one():
    """Without a key the client still sends (an API may run without auth), with no
    Authorization header; the API's 401 then says no key was sent and how to give one,
    the API's own message after it. With a key, the 401 is the API's message alone."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return error(401, "UnauthorizedError", "missing or wrong API key")

    keyless = HttpClient("http://user:pw@api.test:8000/", None, transport=httpx.MockTransport(handler),
                         no_key_hint="set THE_KEY_VARIABLE")
    with pytest.raises(UnauthorizedError) as raised:
        keyless.models()
    assert "Authorization" not in seen[0].headers and "X-API-Key" not in seen[0].headers
    assert str(raised.value) == ("the API at http://api.test:8000 requires an API key and none was sent: "
                                 "set THE_KEY_VARIABLE. It said: missing or wrong API key")
    with pytest.raises(UnauthorizedError, match="pass api_key to Client.connect"):
        HttpClient("http://api.test:8000", transport=httpx.MockTransport(handler)).models()
    with pytest.raises(UnauthorizedError) as raised:
        HttpClient("http://api.test:8000", "k-1", transport=httpx.MockTransport(handler), key_hint="from THE_VAR").models()
    # a refused key: said so, with where it came from (the README walk-through saw only the
    # API's text, which names headers); the key itself never
    assert str(raised.value) == ("the API at http://api.test:8000 refused the API key sent (from THE_VAR): check it, "
                                 "or ask the API's operator for one (`mlf api-key`). It said: missing or wrong API key")
    assert "k-1" not in str(raised.value)


def test_connect_refuses_a_url_that_is_no_http_url():
    """Client.connect takes http(s) URLs with a host; credentials in the URL are dropped from repr."""
    with pytest.raises(ApiUnavailableError, match="http://HOST"):
        Client.connect("redis://127.0.0.1:6379/0")
    assert repr(Client.connect("http://user:pw@api:8000/")) == "HttpClient('http://api:8000')"


def test_owner_is_refused_and_options_travel_whole():
    """Every JobOptions field goes in the body (so later fields travel unchanged); an owner
    cannot be set over HTTP (the key names it); an idempotency key goes as an RFC 8941 string."""
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append((json.loads(request.content), request.headers.get("Idempotency-Key")))
        return httpx.Response(202, json=STATUS)

    client = fake(handler)
    job = client.score_dataset("sub/d.csv", model="m", batch_size=8, columns=["a"], priority=3,
                               idempotency_key='k"1')
    assert job.id == JOB and not job.replayed
    from producer.plan import JobOptions

    unset = dict.fromkeys(JobOptions.model_fields)  # options not given travel as null
    assert bodies == [({**unset, "model": "m", "version": None, "batch_size": 8, "columns": ["a"], "priority": 3,
                        "dataset": "sub/d.csv"}, '"k\\"1"')]
    with pytest.raises(JobOptionError, match="owner"):
        client.score_dataset("d.csv", model="m", owner="bob")


def test_wait_polls_the_api_with_backoff_and_times_out(monkeypatch):
    """Job.wait over HTTP polls GET /v1/jobs/{id} from POLL_S[0], backing off to POLL_S[1],
    returns the final status; a PENDING job warns once with what the API's /ready says,
    and its timeout raises JobTimeoutError referring to that warning."""
    states = iter(["PENDING"] * 12 + ["RUNNING", "SUCCEEDED"])
    client = fake(lambda request: httpx.Response(200, json={**STATUS, "state": next(states)}))
    pauses: list[float] = []
    monkeypatch.setattr(job_module.time, "sleep", pauses.append)
    assert client.get_job(JOB).wait().state.value == "SUCCEEDED"
    assert pauses[0] == POLL_S[0] and max(pauses) == POLL_S[1] and pauses == sorted(pauses)

    pending = fake(lambda request: httpx.Response(200, json=STATUS) if request.url.path != "/ready"
                   else httpx.Response(503, json={"ready": False, "checks": {"workers": "no worker heartbeat"}}))
    monkeypatch.setattr(job_module, "NO_WORKER_WARNING_S", 0.0)
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(job_module.time, "monotonic", lambda: float(next(clock)))
    said: list[str] = []
    with pytest.raises(JobTimeoutError, match="still PENDING after 20 s .*as the warning above says"):
        pending.get_job(JOB).wait(timeout_s=20, on_warning=said.append)
    assert said == [f"job {JOB} is still PENDING: the API at http://api.test:8000 is not ready (workers: no worker "
                    "heartbeat)"]


def results_table(outputs: pa.Table | None, errors: list[tuple[int, str | None, str]]) -> pa.Table:
    """What ResultStore.results_table gives for ``outputs`` and ``errors`` (its merge, in short)."""
    failed = pa.table({"row": pa.array([r for r, _, _ in errors], pa.int64()),
                       "error": pa.array([m for _, _, m in errors], pa.string()),
                       "error_field": pa.array([f for _, f, _ in errors], pa.string())})
    if outputs is None:
        return failed.sort_by("row")
    nulls = pa.nulls(outputs.num_rows, pa.string())
    scored = outputs.append_column("error", nulls).append_column("error_field", nulls)
    return pa.concat_tables([scored, failed], promote_options="permissive").sort_by("row")


OUTPUTS = pa.table({"row": pa.array([0, 2, 3], pa.int64()), "prediction": pa.array([1, 7, 3], pa.int64()),
                    "score": [0.9, 0.8, 0.7],
                    "probabilities": pa.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]], pa.list_(pa.float64(), 2))})


@pytest.mark.parametrize(("outputs", "errors"), [
    (OUTPUTS, [(1, "x", "row 1, field 'x': 'a' is not a number")]),
    (OUTPUTS, []),
    (None, [(0, None, "bad"), (1, "x", "worse")]),
    (OUTPUTS.slice(0, 0), []),
])
def test_a_results_table_makes_the_direct_clients_frame(outputs, errors):
    """table_frame (how the HTTP client reads the API's Arrow stream) gives the frame
    job_results gives for the same rows: columns, dtypes (Int64 beside failed rows), order."""
    expected = results_frame(outputs, errors)
    pd.testing.assert_frame_equal(table_frame(results_table(outputs, errors)), expected)


def test_predict_reads_the_answer_as_the_direct_client_does():
    """predict posts the rows by the model's input columns and returns one row per input,
    the failed one with its error, and the job id in attrs."""
    manifest = {"name": "m", "version": 1, "framework": "sklearn", "artifact": "model.skops",
                "inputs": {"columns": ["a", "b"]}, "outputs": {"kind": "classification", "labels": [0, 1]}}
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=[manifest])
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"job_id": JOB, "model": "m", "rows": [
            {"row": 0, "prediction": 1, "score": 0.75, "probabilities": [0.25, 0.75]},
            {"row": 1, "error": "row 1, field 'b': 'x' is not a number", "error_field": "b"}]})

    frame = fake(handler).predict("m", [[1.0, 2.0], [3.0, "x"]], timeout_s=5)
    assert [list(r) for r in sent[0]["rows"]] == [["a", "b"]] * 2 and sent[0]["timeout_s"] == 5
    assert frame.attrs["job_id"] == JOB and frame["prediction"].tolist() == [1, pd.NA]
    assert frame.loc[1, "error_field"] == "b" and str(frame["prediction"].dtype) == "Int64"


def test_mlf_refuses_api_for_commands_that_need_the_broker_and_database(tmp_path):
    """Under MLF_API_URL, commands needing direct access exit 2 saying so (nothing is
    opened); an unreachable API is one error line naming its URL, never the key."""
    from tests.unit.test_cli_admin import mlf

    env = {"MLF_API_URL": "http://127.0.0.1:1", "MLF_API_KEY": SECRET}
    for args, what in ((["prune"], "`mlf prune` needs direct access"),
                       (["status"], "`mlf status` without a job id"),
                       (["models", "add", "x.onnx"], "`mlf models add` needs direct access")):
        run = mlf(tmp_path, *args, env=env)
        assert run.returncode == 2 and what in run.stderr, (args, run.stderr)
    run = mlf(tmp_path, "status", JOB, env=env)
    assert run.returncode == 1 and "the API at http://127.0.0.1:1 cannot be reached" in run.stderr, run.stderr
    assert not (tmp_path / "var").exists()  # no embedded store or broker was made
    assert SECRET not in run.stdout + run.stderr


def test_both_clients_have_the_same_interface_and_job_protocol():
    """HttpClient has Client's producer methods with the same parameters, and both provide
    every member of the JobClient protocol that Job reads through."""
    import inspect

    from producer.job import JobClient

    shared = ("score_dataset", "submit_dataset", "score_rows", "submit_rows", "submit", "answer", "predict",
              "predict_many", "models", "get_job", "delete_jobs", "was_deleted", "worker_warning", "close")
    for name in shared:
        direct, http = (list(inspect.signature(getattr(c, name)).parameters) for c in (Client, HttpClient))
        assert http == direct, name
    members = [n for n in vars(JobClient) if callable(vars(JobClient)[n]) and not n.startswith("__")] + ["poll_s"]
    assert "_results_table" in members and "worker_warning" in members
    for member in members:
        assert hasattr(Client, member) and hasattr(HttpClient, member), member
