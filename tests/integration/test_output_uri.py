"""Results in object storage (``output_uri``) through real workers, a real broker and database
(the embedded backend and Redis + PostgreSQL) and a real S3 server (SeaweedFS): read back equal
to a database job's by every reader, a redelivered shard written once, ``mlf results``,
deletion, and submissions refused for a bad location.

The store tests of tests/unit/test_output_files.py run again here on PostgreSQL
(:func:`tests.conftest.database_tests`)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from demo.digits import PIXELS
from ml_framework.errors import ObjectStoreError
from ml_framework.settings import load_settings
from ml_framework.store import JobState, NewJob
from ml_framework.store.output_files import part_name
from producer.api import create_app
from tests import s3server
from tests.conftest import database_tests
from tests.integration.test_scoring import send_each_shard_twice
from tests.unit import test_output_files
from tests.unit.test_output_files import store  # noqa: F401 - the fixture, over this directory's db_kind

globals().update(database_tests(test_output_files))

pytestmark = pytest.mark.integration
TIMEOUT_S = 240
BUCKET = "mlf-data"
KEY = "integration-admin-key-0123456789"


def parts(s3_server, uri: str, job_id: str) -> list[str]:
    """The names of the objects under ``<uri>/<job_id>/`` on the test server."""
    path = f"{uri[len('s3://'):]}/{job_id}"
    infos = s3_server.filesystem().get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def prefix(backend) -> str:
    """A fresh output prefix for one test on one backend."""
    return f"s3://{BUCKET}/out/{backend.name}-{uuid.uuid4().hex[:8]}"


def bad_rows_dataset(backend, data_dir, digits):
    """digits.csv with a non-numeric cell in row 7: a dataset whose results hold a row error."""
    frame = digits.frame.copy()
    frame[PIXELS] = frame[PIXELS].astype(object)
    frame.loc[7, "pixel_3"] = "abc"
    path = data_dir / f"outuri-{backend.name}.csv"
    frame.to_csv(path, index=False)
    return path


def test_results_in_s3_equal_database_results(backend, s3_server, trained, data_dir, digits):
    """The same dataset scored into the database and into an S3 prefix: one part per shard, and
    the Python client's results, the store's Arrow table and every HTTP results format equal."""
    path = bad_rows_dataset(backend, data_dir, digits)
    client = backend.client
    uri = prefix(backend)
    in_db = client.score_dataset(path, "digits-sklearn", batch_size=128)
    in_s3 = client.score_dataset(path, "digits-sklearn", batch_size=128, output_uri=uri + "/")
    for job in (in_db, in_s3):
        assert job.wait(timeout_s=TIMEOUT_S).state is JobState.PARTIAL
    status = in_s3.status()
    assert status.output_uri == uri
    assert parts(s3_server, uri, in_s3.id) == [part_name(i) for i in range(status.n_shards)]
    expected = client.store.results_table(in_db.id)
    assert client.store.results_table(in_s3.id).equals(expected)
    assert expected.column("error").to_pylist()[7].startswith("row 7")
    assert in_s3.results().equals(in_db.results())

    values = {**backend.values, "api_keys": {"tests": KEY}, "api_key_roles": {"tests": "admin"}}
    with TestClient(create_app(load_settings(**values)), headers={"X-API-Key": KEY}) as http:
        def get(job_id: str, **params) -> bytes:
            r = http.get(f"/v1/jobs/{job_id}/results", params=params)
            assert r.status_code == 200, r.text
            return r.content

        for fmt in ("csv", "ndjson"):
            assert get(in_s3.id, format=fmt) == get(in_db.id, format=fmt)
        assert pq.read_table(io.BytesIO(get(in_s3.id, format="parquet"))).equals(expected)
        assert pa.ipc.open_stream(get(in_s3.id, format="arrow")).read_all().equals(
            pa.ipc.open_stream(get(in_db.id, format="arrow")).read_all())
        assert json.loads(get(in_s3.id, offset=490, limit=20))["rows"] == json.loads(
            get(in_db.id, offset=490, limit=20))["rows"]
        assert http.get(f"/v1/jobs/{in_s3.id}").json()["output_uri"] == uri


def test_api_takes_output_uri_only_under_allowed_prefixes(backend, s3_server, trained):
    """Over HTTP an output_uri under api_output_prefixes is taken; any other location, a local
    path included, is refused with 400 naming the field; none is taken when none is allowed."""
    allowed = f"s3://{BUCKET}/api-{backend.name}"
    rows = [{p: 0.0 for p in PIXELS}] * 3
    values = {**backend.values, "api_keys": {"tests": KEY}, "api_key_roles": {"tests": "admin"}}
    with TestClient(create_app(load_settings(**values, api_output_prefixes=allowed)),
                    headers={"X-API-Key": KEY}) as http:
        r = http.post("/v1/jobs", json={"model": "digits-sklearn", "rows": rows, "output_uri": f"{allowed}/team"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["output_uri"] == f"{allowed}/team"
        for uri in (f"s3://{BUCKET}/elsewhere", "/tmp/results", f"{allowed}-x/y"):
            r = http.post("/v1/jobs", json={"model": "digits-sklearn", "rows": rows, "output_uri": uri})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"].startswith("output_uri: "), r.text
        deadline = time.monotonic() + TIMEOUT_S
        while http.get(f"/v1/jobs/{job_id}").json()["state"] in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert len(http.get(f"/v1/jobs/{job_id}/results").json()["rows"]) == 3
        assert parts(s3_server, f"{allowed}/team", job_id) == [part_name(0)]
    with TestClient(create_app(load_settings(**values)), headers={"X-API-Key": KEY}) as http:
        r = http.post("/v1/jobs", json={"model": "digits-sklearn", "rows": rows, "output_uri": f"{allowed}/team"})
        assert r.status_code == 400 and "does not accept output_uri" in r.json()["error"]["message"], r.text


def test_redelivered_shard_writes_its_part_once(backend, s3_server, trained):
    """Each shard message delivered twice to the workers, and a shard recorded again through the
    store: one part per shard, every row once, counted once."""
    manifest = trained[1]["sklearn"][1]
    client = backend.client
    uri = prefix(backend)
    ranges = [(0, 500), (500, 1000)]
    job_id = uuid.uuid4().hex
    client.store.create_jobs([NewJob(job_id, manifest.name, manifest.version, "digits.csv", 1000, ranges, 128,
                                     output_uri=uri)])
    send_each_shard_twice(backend, job_id, manifest, ranges)
    job = client.get_job(job_id)
    job.wait(timeout_s=TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while any(s["deliveries"] < 2 for s in client.store.shards(job_id)):
        assert time.monotonic() < deadline, client.store.shards(job_id)
        time.sleep(0.2)
    status = job.status()
    assert (status.state, status.rows_ok, status.shards_done) == (JobState.SUCCEEDED, 1000, 2)
    table = client.store.results_table(job_id)
    assert table.column("row").to_pylist() == list(range(1000))
    assert parts(s3_server, uri, job_id) == [part_name(0), part_name(1)]
    assert not client.store.complete_shard(job_id, 1, table.slice(500, 500).drop_columns(["error", "error_field"]), [])
    assert client.store.results_table(job_id).equals(table)
    assert job.status().rows_ok == 1000


def mlf(backend, *args: str) -> subprocess.CompletedProcess:
    """Run the ``mlf`` CLI against the backend (its environment holds the S3 settings)."""
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=backend.env, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_cli_score_results_and_delete(backend, s3_server, trained, data_dir, tmp_path):
    """`mlf score --output-uri --wait`, `mlf results -o x.parquet` (equal to the store's table) and
    `mlf jobs delete`, which removes the job's objects."""
    uri = prefix(backend)
    run = mlf(backend, "score", str(data_dir / "digits.csv"), "--model", "digits-sklearn", "--output-uri", uri,
              "--wait")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.split()[1]
    assert f"results  {uri}/{job_id}/" in run.stdout
    out = tmp_path / "x.parquet"
    run = mlf(backend, "results", job_id, "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert pq.read_table(out).equals(backend.client.store.results_table(job_id))
    assert len(parts(s3_server, uri, job_id)) == backend.client.store.job(job_id).n_shards
    run = mlf(backend, "jobs", "delete", job_id)
    assert run.returncode == 0, run.stderr
    assert "results file(s)" in run.stdout
    assert parts(s3_server, uri, job_id) == []


def test_bad_output_uri_is_refused_at_submit(backend, s3_server, trained, data_dir):
    """An unknown bucket or a malformed URI is refused before anything is recorded, naming the
    location and no credential, from Python and from the CLI."""
    client = backend.client
    before = sum(client.store.job_counts().values())
    for uri, why in ((f"s3://no-such-bucket-{backend.name}/x", "no bucket"),
                     ("s3://Bad_Bucket/x", "is not a bucket name"), ("gs://b/x", "only s3://")):
        with pytest.raises(ObjectStoreError, match=why) as caught:
            client.score_dataset(data_dir / "digits.csv", "digits-sklearn", output_uri=uri)
        assert uri.split("/")[2] in str(caught.value)
        assert s3server.SECRET_KEY not in str(caught.value) and s3server.ACCESS_KEY not in str(caught.value)
    assert sum(client.store.job_counts().values()) == before
    run = mlf(backend, "score", str(data_dir / "digits.csv"), "--model", "digits-sklearn",
              "--output-uri", f"s3://no-such-bucket-{backend.name}/x")
    assert run.returncode == 1
    assert f"no-such-bucket-{backend.name}" in run.stderr and s3server.SECRET_KEY not in run.stderr + run.stdout


def test_results_frame_of_s3_job(backend, s3_server, trained):
    """Rows given in memory scored into S3 read back as a DataFrame in row order."""
    rows = pd.DataFrame([{p: float(i % 16) for p in PIXELS} for i in range(7)])
    job = backend.client.score_rows(rows, "digits-sklearn", output_uri=prefix(backend))
    assert job.wait(timeout_s=TIMEOUT_S).state is JobState.SUCCEEDED
    assert job.results().index.tolist() == list(range(7))


def test_a_part_gone_is_a_503_naming_it_before_any_stream_starts(backend, s3_server, trained, data_dir, digits):
    """A recorded shard's part removed from the store: every results format answers 503
    (the server's fault, not the caller's) naming the part, the streamed ones before their
    first byte (not a body cut off), and the clients raise ObjectStoreUnavailableError."""
    from ml_framework.errors import ObjectStoreUnavailableError

    path = bad_rows_dataset(backend, data_dir, digits)
    uri = prefix(backend)
    job = backend.client.score_dataset(path, "digits-sklearn", batch_size=128, output_uri=uri)
    job.wait(timeout_s=TIMEOUT_S)
    gone = f"{uri[len('s3://'):]}/{job.id}/{part_name(1)}"
    s3_server.filesystem().delete_file(gone)
    with pytest.raises(ObjectStoreUnavailableError, match=part_name(1)):
        job.results()
    values = {**backend.values, "api_keys": {"tests": KEY}, "api_key_roles": {"tests": "admin"}}
    with TestClient(create_app(load_settings(**values)), headers={"X-API-Key": KEY}) as http:
        for params in ({"format": "arrow"}, {"format": "ndjson"}, {"format": "csv"}, {"offset": 600, "limit": 10}):
            r = http.get(f"/v1/jobs/{job.id}/results", params=params)
            assert r.status_code == 503, (params, r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["type"] == "ObjectStoreUnavailableError" and part_name(1) in error["message"], error
