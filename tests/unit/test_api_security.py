"""The HTTP API is secure by default: it refuses to start without keys, jobs belong to the
key that submitted them, prefixes resolve among the caller's own jobs only, and error
bodies name no server path, URL or other tenant. The app runs in process on the embedded
broker with no worker: jobs stay PENDING, which is all these checks need."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ml_framework.errors import SettingsError
from ml_framework.settings import load_settings
from producer.api import create_app
from producer.api.errors import scrub
from tests.unit.conftest import model_root

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef",
        "ops": "ops-key-0123456789abcdef", "prom": "prom-key-0123456789abcdef"}
ROLES = {"ops": "admin", "prom": "metrics"}


def hdr(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A models directory with two models (manifests only: nothing is loaded without workers),
    a data directory with a CSV, a symlink leading out of it to a secret file, and var/."""
    root = tmp_path_factory.mktemp("api-security")
    for name in ("m-public", "m-other-tenant"):
        model_root(root, name)
    (root / "data" / "ok.csv").write_text("a,b\n1,2\n3,4\n")
    (root / "private.csv").write_text("a,b\nROOT-PASSWORD-LINE,x,y\n")
    (root / "data" / "planted.csv").symlink_to(root / "private.csv")
    return root


def settings(root: Path, **extra):
    values = {"models_dir": root / "models", "data_dir": root / "data", "var_dir": root / "var",
              "bulk_queue": "mlf.sec.bulk", "online_queue": "mlf.sec.online", **extra}
    return load_settings(**values)


@pytest.fixture(scope="module")
def http(root):
    with TestClient(create_app(settings(root, api_keys=KEYS, api_key_roles=ROLES))) as client:
        yield client


def submit(http, who: str, **body) -> dict:
    r = http.post("/v1/jobs", json={"model": "m-public", "rows": [{"a": 1, "b": 2}], **body}, headers=hdr(who))
    assert r.status_code == 202, r.text
    return r.json()


def test_the_api_refuses_to_start_without_keys_unless_told_api_auth_none(root, caplog):
    """No keys: start-up fails naming what to set. api_auth: none starts, warns in the log
    and on /health. Both at once is a mistake and refused."""
    with pytest.raises(SettingsError, match="the HTTP API needs API keys.*api_auth: none"), \
            TestClient(create_app(settings(root))):
        pass
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings(root, api_auth="none"))) as open_api:
        health = open_api.get("/health").json()
        assert health["status"] == "ok" and "authentication is off" in health["warnings"][0]
        assert open_api.get("/v1/models").status_code == 200
    assert any("authentication is off" in r.getMessage() for r in caplog.records)
    with pytest.raises(SettingsError, match="api_auth: none but api_keys is set"), \
            TestClient(create_app(settings(root, api_auth="none", api_keys=KEYS))):
        pass


def test_every_endpoint_but_health_and_ready_needs_a_known_key(http):
    """401 without a key or with a wrong one (header or bearer); the key's role decides the
    rest: a metrics key reads only /metrics, a user key everything but /metrics."""
    for method, path in [("get", "/v1/models"), ("get", "/v1/jobs"), ("get", "/v1/jobs/" + "0" * 32), ("get", "/gpu-status"),
                         ("get", "/metrics"), ("post", "/v1/jobs"), ("delete", "/v1/jobs/" + "0" * 32)]:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = getattr(http, method)(path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["type"] == "UnauthorizedError" and "WWW-Authenticate" in r.headers
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 200
    assert http.get("/health").status_code == 200 and http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code in (200, 503)
    assert http.get("/metrics", headers=hdr("prom")).status_code == 200
    assert http.get("/metrics", headers=hdr("ops")).status_code == 200
    assert http.get("/metrics", headers=hdr("alice")).status_code == 403
    assert http.get("/v1/models", headers=hdr("prom")).status_code == 403


def test_v2_endpoints_need_a_key_as_v1_does_but_health(http, root):
    """/v2 model endpoints answer 401 with the Open Inference Protocol's {"error": "..."} body
    without a key or with a wrong one, 403 for a metrics key, and serve a user key; the
    /v2 health endpoints are open, as /health and /ready; errors name no server path."""
    infer = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    for method, path in [("get", "/v2"), ("get", "/v2/models/m-public"), ("get", "/v2/models/m-public/ready"),
                         ("get", "/v2/models/m-public/versions/1"), ("post", "/v2/models/m-public/infer")]:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = http.request(method.upper(), path, headers=headers, json=infer if method == "post" else None)
            assert r.status_code == 401 and "WWW-Authenticate" in r.headers, (method, path, r.text)
            assert r.json() == {"error": "missing or wrong API key (X-API-Key: <key> or Authorization: Bearer <key>)"}
        assert http.request(method.upper(), path, headers=hdr("prom")).status_code == 403
    meta = http.get("/v2/models/m-public", headers={"Authorization": f"Bearer {KEYS['alice']}"})
    assert meta.status_code == 200 and meta.json()["inputs"] == [{"name": "input", "datatype": "FP32",
                                                                  "shape": [-1, 2]}]
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").status_code == 400  # no worker: the protocol's "not ready"
    missing = http.get("/v2/models/nope/versions/3", headers=hdr("alice"))
    assert missing.status_code == 404 and missing.json() == {"error": "model 'nope' version '3' not found"}
    for odd in ("³", "٣", "0", "x"):  # digits that int() refuses or reads another way (schemathesis found '³': 500)
        answer = http.get(f"/v2/models/m-public/versions/{odd}", headers=hdr("alice"))
        assert answer.status_code == 404 and "versions are positive integers" in answer.json()["error"], answer.text
    bad = http.post("/v2/models/m-public/infer", json={**infer, "inputs": [{**infer["inputs"][0], "shape": [1, 3]}]},
                    headers=hdr("alice"))
    assert bad.status_code == 400 and "shape [1, 3]; the model takes [-1, 2]" in bad.json()["error"]
    assert str(root) not in missing.text + bad.text


def test_the_openapi_schema_declares_the_security_schemes(http):
    """The schema declares the key header and the bearer scheme (the docs page's Authorize
    button), on every operation but /health, /ready and their /v2 twins."""
    schema = http.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": schemes["ApiKey"]["description"]}
    assert schemes["Bearer"]["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            secured = {name for requirement in operation.get("security", []) for name in requirement}
            open_paths = ("/health", "/ready", "/v2/health/live", "/v2/health/ready")
            assert secured == (set() if path in open_paths else {"ApiKey", "Bearer"}), (method, path)
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {r["$ref"] for r in body["anyOf"]} == {"#/components/schemas/DatasetJobRequest",
                                                  "#/components/schemas/RowsJobRequest"}
    assert {"DatasetJobRequest", "RowsJobRequest", "PredictRequest"} <= set(schema["components"]["schemas"])


def test_a_job_belongs_to_the_key_that_submitted_it(http):
    """Bob gets 404 for Alice's job on every job route, the same 404 as for a job that does
    not exist; an admin key sees and can cancel it; the job records its owner's name."""
    job = submit(http, "alice")
    assert job["owner"] == "alice" and job["state"] == "PENDING"
    jid = job["job_id"]
    missing = http.get("/v1/jobs/" + "f" * 32, headers=hdr("bob")).json()["error"]
    for method, path in [("get", f"/v1/jobs/{jid}"), ("get", f"/v1/jobs/{jid}/results"), ("delete", f"/v1/jobs/{jid}"),
                         ("post", f"/v1/jobs/{jid}/cancel")]:
        r = getattr(http, method)(path, headers=hdr("bob"))
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["message"].replace(jid, "X") == missing["message"].replace("f" * 32, "X")
    assert http.get(f"/v1/jobs/{jid}", headers=hdr("alice")).json()["state"] == "PENDING"
    assert http.get(f"/v1/jobs/{jid}/results", headers=hdr("alice")).json()["rows"] == []
    assert http.get(f"/v1/jobs/{jid}", headers=hdr("ops")).json()["owner"] == "alice"
    assert http.post(f"/v1/jobs/{jid}/cancel", headers=hdr("ops")).json()["state"] == "CANCELLED"
    metrics = http.get("/metrics", headers=hdr("prom")).text
    assert 'mlf_jobs_by_owner{owner="alice",state="CANCELLED"}' in metrics
    assert KEYS["alice"] not in metrics


def test_a_key_lists_its_own_jobs_and_an_admin_every_job(http):
    """`GET /v1/jobs` (the README walk-through got 405 looking for a job list): a key lists
    only the jobs it submitted, open ones first, newest first; an admin key lists every
    job; ``limit`` bounds the list (1 to 1,000); a metrics key may not list."""
    first, second = submit(http, "alice")["job_id"], submit(http, "alice")["job_id"]
    bobs = submit(http, "bob")["job_id"]
    http.post(f"/v1/jobs/{first}/cancel", headers=hdr("alice"))
    listed = http.get("/v1/jobs", headers=hdr("alice"))
    assert listed.status_code == 200, listed.text
    ids = [j["job_id"] for j in listed.json()["jobs"]]
    assert bobs not in ids and {j["owner"] for j in listed.json()["jobs"]} == {"alice"}
    assert ids.index(second) < ids.index(first)  # PENDING before CANCELLED
    assert listed.json()["jobs"][ids.index(second)]["dataset"] == "<1 inline rows>"
    assert [j["job_id"] for j in http.get("/v1/jobs", params={"limit": 1}, headers=hdr("alice")).json()["jobs"]] == [
        second]
    everyone = [j["job_id"] for j in http.get("/v1/jobs", params={"limit": 1000}, headers=hdr("ops")).json()["jobs"]]
    assert {first, second, bobs} <= set(everyone)
    assert [j["job_id"] for j in http.get("/v1/jobs", headers=hdr("bob")).json()["jobs"]].count(bobs) == 1
    for bad in (0, 1001, "x"):
        assert http.get("/v1/jobs", params={"limit": bad}, headers=hdr("alice")).status_code == 422
    assert http.get("/v1/jobs", headers=hdr("prom")).status_code == 403


def test_datasets_outside_the_data_directory_show_no_server_path(http, root):
    """A job the CLI submitted from elsewhere on the server records an absolute path; the
    API listed `/srv/customer data/acme.csv` as `<path> data/acme.csv` and
    `/healthcare/patients/ssn.csv` whole (free-text scrubbing stops at a space and spares
    names that start like an endpoint). The whole value is one path: its file name only."""
    from producer.api.errors import shown_dataset

    data = root / "data"
    cases = {str(data / "sub" / "x.csv"): "sub/x.csv", "/srv/customer data/acme.csv": "<server path>/acme.csv",
             "/healthcare/patients/ssn.csv": "<server path>/ssn.csv", "/metrics-secret/x.csv": "<server path>/x.csv",
             "/v1/../etc/shadow": "<server path>/shadow", f"{data}/../private.csv": "<server path>/private.csv",
             "s3://bucket/in/key.csv": "s3://bucket/in/key.csv", "<3 inline rows>": "<3 inline rows>"}
    assert {d: shown_dataset(d, data) for d in cases} == cases
    store = http.app.state.client.store
    ids = {store.create_job(model="m-public", model_version=1, dataset=d, n_rows=1, shard_ranges=[(0, 1)],
                            batch_size=1): shown for d, shown in cases.items()}
    listed = {j["job_id"]: j["dataset"] for j in
              http.get("/v1/jobs", params={"limit": 1000}, headers=hdr("ops")).json()["jobs"]}
    assert {job_id: listed[job_id] for job_id in ids} == ids
    for job_id, shown in ids.items():  # the job page shows it so too
        page = html.unescape(http.get(f"/ui/jobs/{job_id}", headers=hdr("ops")).text)
        assert shown in page and "customer data" not in page and "healthcare" not in page


def test_delete_deletes_idempotently_for_the_owner_only(http):
    """DELETE deletes the caller's job (204) and then answers 204 again for the same key;
    POST .../cancel cancels; another key gets the 404 of a missing job, before and after."""
    jid = submit(http, "alice")["job_id"]
    assert http.post(f"/v1/jobs/{jid}/cancel", headers=hdr("alice")).json()["state"] == "CANCELLED"
    assert http.get(f"/v1/jobs/{jid}", headers=hdr("alice")).json()["state"] == "CANCELLED"  # cancel keeps it
    missing = http.delete("/v1/jobs/" + "f" * 32, headers=hdr("bob")).json()["error"]["message"]
    assert http.delete(f"/v1/jobs/{jid}", headers=hdr("bob")).status_code == 404
    first = http.delete(f"/v1/jobs/{jid}", headers=hdr("alice"))
    assert (first.status_code, first.content) == (204, b"")
    assert http.get(f"/v1/jobs/{jid}", headers=hdr("alice")).status_code == 404
    assert http.delete(f"/v1/jobs/{jid}", headers=hdr("alice")).status_code == 204
    again = http.delete(f"/v1/jobs/{jid}", headers=hdr("bob"))
    assert again.status_code == 404
    assert again.json()["error"]["message"].replace(jid, "X") == missing.replace("f" * 32, "X")
    running = submit(http, "alice")["job_id"]  # PENDING: cancelled, then deleted
    assert http.delete(f"/v1/jobs/{running}", headers=hdr("alice")).status_code == 204
    assert http.get(f"/v1/jobs/{running}", headers=hdr("ops")).status_code == 404
    assert http.delete(f"/v1/jobs/{running}", headers=hdr("ops")).status_code == 204  # an admin: any key's


def test_prefixes_need_8_characters_and_resolve_among_the_callers_own_jobs(http):
    """A 4-character prefix is refused even for one's own job (it could list ids); 8
    characters resolve one's own job, and nobody else's."""
    jid = submit(http, "alice")["job_id"]
    for prefix in (jid[:4], jid[:7]):
        r = http.get(f"/v1/jobs/{prefix}", headers=hdr("alice"))
        assert r.status_code == 404 and "at least 8" in r.json()["error"]["message"]
        assert jid not in r.text
    assert http.get(f"/v1/jobs/{jid[:8]}", headers=hdr("alice")).json()["job_id"] == jid
    r = http.get(f"/v1/jobs/{jid[:8]}", headers=hdr("bob"))
    assert r.status_code == 404 and jid not in r.text
    assert http.get(f"/v1/jobs/{jid[:8]}", headers=hdr("ops")).json()["job_id"] == jid


def test_error_bodies_name_no_server_path_url_or_other_tenant(http, root, caplog):
    """A missing job, a missing model, a missing dataset: the body names what the caller
    sent, not the results store's URL, the models or data directory, nor other models; the
    X-Request-ID header and the body's request_id agree, and the log has the detail under it."""
    server_strings = [str(root), "sqlite", "results.sqlite", "m-other-tenant", "models there"]
    with caplog.at_level(logging.INFO, logger="producer.api"):
        answers = [
            http.get("/v1/jobs/" + "a" * 32, headers=hdr("alice")),
            http.post("/v1/jobs", json={"model": "nope", "rows": [{"a": 1}]}, headers=hdr("alice")),
            http.post("/v1/models/nope/predict", json={"rows": [{"a": 1}]}, headers=hdr("alice")),
            http.post("/v1/jobs", json={"model": "m-public", "dataset": "missing.csv"}, headers=hdr("alice")),
            http.post("/v1/jobs", json={"model": "m-public", "version": 7, "dataset": "ok.csv"}, headers=hdr("alice")),
        ]
    for r in answers:
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert not [s for s in server_strings if s in r.text], r.text
        assert error["request_id"] == r.headers["X-Request-ID"]
        logged = [rec.getMessage() for rec in caplog.records if error["request_id"] in rec.getMessage()]
        assert logged, error
    assert "model 'nope' not found" in answers[1].json()["error"]["message"]
    assert "missing.csv" in answers[3].json()["error"]["message"]
    assert any("models there" in rec.getMessage() for rec in caplog.records)  # the detail, for the operator


def test_a_client_request_id_is_kept_when_sane(http):
    assert http.get("/health", headers={"X-Request-ID": "trace-1234abcd"}).headers["X-Request-ID"] == "trace-1234abcd"
    assert http.get("/health", headers={"X-Request-ID": "bad id\n"}).headers["X-Request-ID"] != "bad id"


def test_the_api_refuses_a_symlink_leaving_the_data_directory_unread(http):
    """data/planted.csv -> ../private.csv: 422, naming the path as sent, nothing of the target."""
    r = http.post("/v1/jobs", json={"model": "m-public", "dataset": "planted.csv"}, headers=hdr("alice"))
    assert r.status_code == 422 and r.json()["error"]["type"] == "DatasetPathError", r.text
    assert "planted.csv" in r.text and "ROOT-PASSWORD" not in r.text and "private" not in r.text
    for dataset in ("../private.csv", "/etc/passwd"):
        r = http.post("/v1/jobs", json={"model": "m-public", "dataset": dataset}, headers=hdr("alice"))
        assert r.status_code == 422 and "leaves the data directory" in r.text


def test_the_api_refuses_s3_datasets_outside_the_allowed_prefixes(http, root):
    """An s3:// dataset: 400 by default, and outside api_object_prefixes; never listing them."""
    r = http.post("/v1/jobs", json={"model": "m-public", "dataset": "s3://mlf-data/x.csv"}, headers=hdr("alice"))
    assert r.status_code == 400 and r.json()["error"]["type"] == "ObjectStoreError", r.text
    assert "'s3://mlf-data/x.csv'" in r.text and "api_object_prefixes; none is set" in r.text
    allowing = settings(root, api_keys=KEYS, api_object_prefixes="s3://secret-bucket/team-a")
    with TestClient(create_app(allowing)) as other:
        for dataset in ("s3://mlf-data/team-a/x.csv", "s3://secret-bucket/team-ab/x.csv", "s3://Bad/x"):
            r = other.post("/v1/jobs", json={"model": "m-public", "dataset": dataset}, headers=hdr("alice"))
            assert r.status_code == 400 and r.json()["error"]["type"] == "ObjectStoreError", r.text
            assert "secret-bucket/team-a'" not in r.text.replace(dataset, "")


def test_error_bodies_and_jobs_echo_s3_uris_but_hide_server_urls():
    """An s3:// dataset the caller named stays in error bodies; a server URL becomes <url>."""
    message = "s3://mlf-data/x.csv: cannot read: connecting to http://minio:9000 failed"
    assert scrub(message, []) == "s3://mlf-data/x.csv: cannot read: connecting to <url> failed"


def test_ready_names_no_server_url_when_the_broker_is_down(root):
    """/ready and its /v2 twin (one set of checks), which need no key, say what is down,
    not where it is."""
    bad = settings(root, api_keys=KEYS, broker_url="redis://:hunter2@127.0.0.1:1/0")
    with TestClient(create_app(bad)) as http:
        r = http.get("/ready")
        v2 = http.get("/v2/health/ready")
    assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unreachable (request id ")
    assert v2.status_code == 400
    assert v2.json() == {"ready": False, "reason": "the broker or the results database is unreachable"}
    for answer in (r, v2):
        assert "127.0.0.1" not in answer.text and "hunter2" not in answer.text and "redis" not in answer.text


def test_bodies_over_the_limit_are_refused_declared_or_streamed(root):
    """413 from the declared length before reading, and while streaming a chunked body."""
    with TestClient(create_app(settings(root, api_keys=KEYS, api_max_request_bytes=2048))) as http:
        big = {"model": "m-public", "rows": [{"a": 1.0, "b": 2.0}] * 200}
        r = http.post("/v1/jobs", json=big, headers=hdr("alice"))
        assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"

        def chunks():
            yield b'{"model": "m-public", "rows": ['
            for _ in range(200):
                yield b'{"a": 1.0, "b": 2.0},'
            yield b'{"a": 1.0, "b": 2.0}]}'

        r = http.post("/v1/jobs", content=chunks(), headers={**hdr("alice"), "Content-Type": "application/json"})
        assert r.status_code == 413, r.text


def test_uvicorn_exits_at_start_without_keys(root):
    """The production command itself: `uvicorn producer.api:app` with no key exits (status
    3, Uvicorn's start-up failure) saying what to set, before it listens, in one line
    (the README walk-through saw 41 lines of Starlette's traceback before it)."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({"ML_FRAMEWORK_VAR_DIR": str(root / "var-uvicorn"), "ML_FRAMEWORK_MODELS_DIR": str(root / "models")})
    run = subprocess.run([sys.executable, "-m", "uvicorn", "producer.api:app", "--port", str(port)], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "the HTTP API needs API keys" in run.stderr and "Uvicorn running" not in run.stderr
    assert "Traceback" not in run.stderr and "ERROR:    cannot start: SettingsError: the HTTP API needs API keys" \
        in run.stderr, run.stderr


def test_rows_that_make_no_table_are_answered_after_the_model_check(http):
    """An integer beyond 64 bits is valid JSON but no Arrow column: an unknown model is still
    answered 404 first, and a known one 422 saying why, never a 500."""
    huge = [{"a": 10**30, "b": 1}]
    r = http.post("/v1/jobs", json={"model": "nope", "rows": huge}, headers=hdr("alice"))
    assert r.status_code == 404, r.text
    for path, body in [("/v1/jobs", {"model": "m-public", "rows": huge}), ("/v1/models/m-public/predict", {"rows": huge})]:
        r = http.post(path, json=body, headers=hdr("alice"))
        assert r.status_code == 422 and "rows cannot be read" in r.json()["error"]["message"], r.text
