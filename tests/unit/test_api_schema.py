"""Property-based testing of the HTTP API against its own OpenAPI schema (schemathesis):
whatever a client sends, the API answers as documented and never with a 500."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    allow_header_conformance,
    not_a_server_error,
    positive_data_acceptance,
)

from ml_framework.settings import load_settings
from producer.api import create_app

APP = None
KEY = "schema-test-key-0123456789"


@pytest.fixture(scope="module", autouse=True)
def running_app(tmp_path_factory):
    """The app with its lifespan run (results store and broker client open), on the
    embedded broker in a fresh directory, with no models and no workers: every endpoint
    answers at once (predict on an unknown model is 404; nothing waits for a worker). One
    admin key, sent with every generated request."""
    global APP
    root = tmp_path_factory.mktemp("api")
    app = create_app(load_settings(models_dir=root / "models", data_dir=root / "data", var_dir=root / "var",
                                   api_keys={"tester": KEY}, api_key_roles={"tester": "admin"}))
    with TestClient(app):
        APP = app
        yield app


async def to_running_app(scope, receive, send) -> None:
    """ASGI app that hands every request to ``APP``, the app :func:`running_app` started;
    start-up and shutdown are the fixture's, so lifespan events are answered here."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": f"{message['type']}.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await APP(scope, receive, send)


# The routes only, read without starting an app (from_asgi runs the app's start-up, which
# reads the real settings): collection reads no settings. Requests go to the running APP.
schema = schemathesis.openapi.from_dict(create_app().openapi())
schema.app = to_running_app
schema.config.update(base_url="http://localhost")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_honours_its_schema(case):
    """Generated requests for every operation get a documented status and body.

    Not checked: the ``Allow`` header of a 405 on ``/v1/jobs/{job_id}``, where Starlette
    lists the methods of the first matching route only (GET, not DELETE); 5xx on
    ``/ready``, whose documented answer without workers is 503; and 4xx on the ``/v2``
    readiness endpoints, whose answer without workers is 400, as the Open Inference
    Protocol says "not ready"; and 4xx on a job carrying a ``callback_url``, which this
    server (no ``callback_allowed_hosts``) refuses with 400 whatever its form."""
    excluded = [allow_header_conformance] + ([not_a_server_error] if case.operation.path == "/ready" else [])
    if case.operation.path.startswith("/v2/") and case.operation.path.endswith("ready"):
        excluded.append(positive_data_acceptance)
    if isinstance(case.body, dict) and case.body.get("callback_url") is not None:
        excluded.append(positive_data_acceptance)
    case.call_and_validate(headers={"X-API-Key": KEY}, excluded_checks=excluded)
