"""What a new user of the HTTP API meets: dataset paths are relative to the data directory
(and a path that misses says so, suggesting the one that exists, without naming a server
path), and a body sent without ``Content-Type: application/json`` is answered 415 "send
JSON" on every JSON route. The app runs in process on the embedded broker with no worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel

from ml_framework.settings import load_settings
from producer.api import create_app
from producer.api.errors import install_error_handlers

KEY = "requests-key-0123456789abcdef"
FORM = {"Content-Type": "application/x-www-form-urlencoded", "X-API-Key": KEY}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A model (manifest only) and a data directory with a CSV, a nested CSV and an image folder."""
    root = tmp_path_factory.mktemp("api-requests")
    version = root / "models" / "m" / "1"
    version.mkdir(parents=True)
    (version / "manifest.yaml").write_text(yaml.safe_dump({
        "name": "m", "version": 1, "framework": "sklearn", "artifact": "model.skops",
        "inputs": {"columns": ["a", "b"]}, "outputs": {"kind": "regression"}}))
    data = root / "data"
    (data / "daily").mkdir(parents=True)
    (data / "digits.csv").write_text("a,b\n1,2\n3,4\n")
    (data / "daily" / "today.csv").write_text("a,b\n5,6\n")
    (data / "images").mkdir()
    return root


@pytest.fixture(scope="module")
def http(root):
    settings = load_settings(models_dir=root / "models", data_dir=root / "data", var_dir=root / "var",
                             bulk_queue="mlf.req.bulk", online_queue="mlf.req.online", api_keys={"me": KEY})
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        yield client


def error(r) -> str:
    """The error message of ``r``: ``/v1``'s ``{"error": {"message"}}`` or ``/v2``'s ``{"error": "..."}``."""
    body = r.json()["error"]
    return body if isinstance(body, str) else body["message"]


def test_the_cli_habit_data_prefix_is_answered_with_the_path_that_exists(http, root):
    """``data/digits.csv`` (what the CLI takes) says that paths are relative to the data
    directory and suggests ``digits.csv``; the message names the path as given (no server
    path, and its ``data/`` kept); the suggested path works."""
    for given, meant in (("data/digits.csv", "digits.csv"), ("data/daily/today.csv", "daily/today.csv"),
                         ("./data/daily/today.csv", "daily/today.csv")):
        r = http.post("/v1/jobs", json={"model": "m", "dataset": given})
        assert r.status_code == 404, r.text
        assert error(r) == (f"dataset {given!r} not found: dataset paths are relative to the data directory; "
                            f"did you mean {meant!r}?")
        assert http.post("/v1/jobs", json={"model": "m", "dataset": meant}).status_code == 202
    r = http.post("/v1/jobs", json={"model": "m", "dataset": "nothing.csv"})
    assert (r.status_code, error(r)) == (404, "dataset 'nothing.csv' not found: dataset paths are relative to "
                                              "the data directory")


def test_a_path_on_the_callers_machine_or_outside_is_refused_naming_no_server_path(http, root):
    """An absolute path outside the data directory is refused as such, with the path under
    it that exists; the answer holds no absolute path (the caller's or the server's)."""
    r = http.post("/v1/jobs", json={"model": "m", "dataset": "/home/someone/project/data/digits.csv"})
    assert r.status_code == 422, r.text
    assert error(r) == ("dataset '<path>' leaves the data directory (it lies outside it): dataset paths are "
                        "relative to the data directory; did you mean 'digits.csv'?")
    r = http.post("/v1/jobs", json={"model": "m", "dataset": str(root / "digits.csv")})
    assert str(root) not in r.text and "did you mean 'digits.csv'?" in error(r)


def test_an_image_folder_given_with_the_data_prefix_gets_the_same_hint(http):
    """A directory of images is a dataset path like any other: ``data/images`` suggests ``images``."""
    r = http.post("/v1/jobs", json={"model": "m", "dataset": "data/images"})
    assert r.status_code == 404 and error(r).endswith("did you mean 'images'?"), r.text


def test_suggest_under_never_leaves_the_data_directory(root, tmp_path):
    """Only tails that exist inside the data directory are suggested: '..' or a link out is not."""
    from ml_framework.paths import suggest_under

    data = root / "data"
    assert suggest_under(data, "../data/digits.csv") == "digits.csv"
    assert suggest_under(data, "missing/elsewhere.csv") is None
    (tmp_path / "outside.csv").write_text("a\n1\n")
    (data / "out").symlink_to(tmp_path)
    try:
        assert suggest_under(data, "data/out/outside.csv") is None
    finally:
        (data / "out").unlink()


def test_a_relative_data_directory_keeps_the_callers_data_prefix(root, monkeypatch):
    """With ``data_dir: data`` (relative, the default) the message still names what the caller
    sent: the scrubbing of server paths removes absolute forms only."""
    monkeypatch.chdir(root)
    settings = load_settings(models_dir=root / "models", data_dir=Path("data"), var_dir=root / "var",
                             bulk_queue="mlf.req.bulk", online_queue="mlf.req.online", api_keys={"me": KEY})
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        r = client.post("/v1/jobs", json={"model": "m", "dataset": "data/digits.csv"})
    assert r.status_code == 404
    assert error(r).startswith("dataset 'data/digits.csv' not found") and str(root) not in r.text


class Body(BaseModel):
    """A body FastAPI parses itself."""

    name: str


def json_routes(app: FastAPI) -> list[str]:
    """Paths of the app's routes whose OpenAPI request body is JSON."""
    paths = []
    for path, ops in app.openapi()["paths"].items():
        for method, op in ops.items():
            if "application/json" in op.get("requestBody", {}).get("content", {}):
                paths.append((method, path))
    return paths


def test_every_json_route_answers_a_form_body_with_send_json(http):
    """curl's default Content-Type on every route taking JSON: 415 with "send the body as
    JSON"; the same body as JSON is accepted; an oversized body is still 413."""
    routes = json_routes(http.app)
    assert ("post", "/v1/jobs") in routes and ("post", "/v1/models/{name}/predict") in routes
    body = '{"model": "m", "dataset": "digits.csv"}'
    for method, path in routes:
        r = http.request(method, path.replace("{name}", "m"), content=body, headers=FORM)
        assert r.status_code == 415, (path, r.text)
        assert error(r).startswith("send the body as JSON with Content-Type: application/json (got "
                                   "'application/x-www-form-urlencoded'"), r.text
    assert http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"}).status_code == 202
    huge = b"x" * (16 * 2**20 + 1)
    r = http.post("/v1/jobs", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_route_fastapi_parses_itself_answers_send_json_too():
    """A route with a pydantic body (one FastAPI parses, such as a future router's) gets the
    same 415 instead of pydantic's "Input should be a valid dictionary"."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    def echo(body: Body) -> dict:
        return body.model_dump()

    assert any(isinstance(r, APIRoute) and r.path == "/echo" for r in app.routes)
    with TestClient(app) as client:
        r = client.post("/echo", content='{"name": "x"}', headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "send the body as JSON" in error(r), r.text
        assert client.post("/echo", json={"name": "x"}).json() == {"name": "x"}
        r = client.post("/echo", json={"other": "x"})
        assert r.status_code == 422 and "send the body as JSON" not in error(r), r.text


def test_a_name_too_long_for_the_file_system_is_not_found(http):
    """A 4,000-character dataset name (ENAMETOOLONG) is answered 404, not 500."""
    r = http.post("/v1/jobs", json={"model": "m", "dataset": "0" * 4000})
    assert r.status_code == 404 and "relative to the data directory" in error(r), r.text
