"""The HTTP API during a results-database outage: every route that reads the store answers
503 with the fixed "retry later" message (no URL, database name or credential), on /v1,
the job pages (/ui) and the Open Inference Protocol (/v2); after the outage, 200 again.
Real PostgreSQL refusing connections (ALLOW_CONNECTIONS false), no worker needed."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ml_framework.settings import load_settings
from producer.api import create_app
from tests.conftest import pg_admin, queues

pytestmark = pytest.mark.integration
KEY = "outage-admin-key-0123456789abcdef"
UNREACHABLE = "the results database is unreachable; retry later"


def test_a_database_outage_is_503_on_every_route_naming_no_server(trained, data_dir, own_pg_database, tmp_path):
    """GET /v1/jobs/{id}, its results, /gpu-status, /ui/jobs, /ui/jobs/{id}, /v2 model ready and infer answer
    503 with a fixed message while PostgreSQL refuses connections (was: 500 from a raw
    OperationalError on some); the same requests succeed once it admits them again."""
    settings = load_settings(models_dir=trained[0], data_dir=data_dir, var_dir=tmp_path,
                             database_url=own_pg_database, **queues("mlf.test.api-outage."),
                             api_keys={"ops": KEY}, api_key_roles={"ops": "admin"})
    db = own_pg_database.rsplit("/", 1)[1]
    admin = pg_admin()
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}, raise_server_exceptions=False) as http:
        store = http.app.state.client.store
        job = store.create_job(model="digits-sklearn", model_version=1, dataset="digits.csv", n_rows=4,
                               shard_ranges=[(0, 4)], batch_size=4, owner="ops")
        meta = http.get("/v2/models/digits-sklearn").json()
        given = meta["inputs"][0]
        shape = [1, *given["shape"][1:]]
        n = 1
        for d in shape:
            n *= d
        infer = {"inputs": [{"name": given["name"], "shape": shape, "datatype": given["datatype"], "data": [0] * n}],
                 "parameters": {"timeout_s": 1}}
        v1 = [f"/v1/jobs/{job}", f"/v1/jobs/{job}/results", "/gpu-status", f"/ui/jobs/{job}", "/ui/jobs"]
        try:
            store.close()
            admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
            for path in v1:
                r = http.get(path)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"]["message"] == UNREACHABLE, (path, r.text)
            v2 = [http.get("/v2/models/digits-sklearn/ready"), http.post("/v2/models/digits-sklearn/infer", json=infer)]
            for r in v2:
                assert (r.status_code, r.json()) == (503, {"error": UNREACHABLE}), r.text
            for r in v2 + [http.get(p) for p in v1]:
                assert db not in r.text and "postgres" not in r.text.lower() and "5432" not in r.text, r.text
        finally:
            admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            admin.close()
        for path in v1:
            assert http.get(path).status_code == 200, path
