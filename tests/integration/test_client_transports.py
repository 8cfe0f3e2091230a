"""One client test suite over both transports: the direct client (broker and results store)
and the HTTP client (``Client.connect``) of a real uvicorn API process, against the same
real worker processes, Redis broker and PostgreSQL store; plus ``mlf --api`` as a real
subprocess. The HTTP side also runs where the broker and database settings point at a
closed port: it needs neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from demo.digits import PIXELS, SCALE
from ml_framework.errors import (
    DatasetNotFoundError,
    DatasetSchemaError,
    JobNotFoundError,
    ModelNotFoundError,
    UnauthorizedError,
)
from producer import Client
from producer.http_client import HttpClient
from tests.conftest import api_server, shared_backend

pytestmark = pytest.mark.integration
KEY = "transports-owner-key-0123456789"
TIMEOUT_S = 240
CLOSED = {"ML_FRAMEWORK_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nothing",
          "ML_FRAMEWORK_BROKER_URL": "redis://127.0.0.1:1/0"}
"""Broker and database settings nothing answers: the HTTP side must not need them."""


@pytest.fixture(scope="module", params=["redis-postgres"])
def stack(request):
    """The session's Redis + PostgreSQL workers (:func:`tests.conftest.shared_backend`)."""
    return shared_backend(request)


@pytest.fixture(scope="module")
def api_url(stack, tmp_path_factory) -> str:
    """``uvicorn producer.api:app`` over the backend with one user key; its base URL."""
    env = {**stack.env, "ML_FRAMEWORK_API_KEYS": f"owner={KEY}", "ML_FRAMEWORK_LOG_TO_FILE": "false"}
    with api_server(env, tmp_path_factory.mktemp("api") / "api.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def http_client(api_url):
    with Client.connect(api_url, api_key=KEY, timeout_s=TIMEOUT_S) as client:
        yield client


@pytest.fixture(params=["direct", "http"])
def client(request, stack):
    """The client under test: the direct one, or the HTTP one."""
    return stack.client if request.param == "direct" else request.getfixturevalue("http_client")


def dataset(client, stack, name: str) -> str:
    """``name`` under the data directory as each client names it: a path the direct client
    opens, a path relative to the API's data directory."""
    return name if isinstance(client, HttpClient) else str(Path(stack.values["data_dir"]) / name)


def test_score_dataset_wait_and_results(client, stack, digits, trained):
    """A dataset job runs to SUCCEEDED; its results come back in row order with the
    model's predictions; save_results writes the same rows."""
    job = client.score_dataset(dataset(client, stack, "digits.parquet"), model="digits-sklearn", batch_size=256)
    status = job.wait(timeout_s=TIMEOUT_S)
    n = len(digits.frame)
    assert (status.state.value, status.rows_ok, status.n_rows) == ("SUCCEEDED", n, n)
    assert job.status() == status
    frame = job.results()
    assert frame.index.tolist() == list(range(n))
    model = trained[1]["sklearn"][0]
    assert frame["prediction"].tolist() == model.predict(digits.frame[PIXELS].to_numpy(np.float32) * SCALE).tolist()
    assert frame["error"].isna().all()


def test_score_rows_with_a_bad_cell_ends_partial(client, digits, tmp_path):
    """Rows in memory: a text cell fails its row (named), the others are scored; integer
    labels stay integers (Int64) beside the failed row."""
    rows = digits.frame[PIXELS].iloc[:20].to_dict(orient="records")
    rows[7]["pixel_3"] = "seven"
    job = client.score_rows(rows, model="digits-sklearn")
    status = job.wait(timeout_s=TIMEOUT_S)
    assert (status.state.value, status.rows_ok, status.rows_failed) == ("PARTIAL", 19, 1)
    frame = job.results()
    assert frame.loc[7, "error"] == "row 7, field 'pixel_3': 'seven' is not a number"
    assert frame.loc[7, "error_field"] == "pixel_3" and str(frame["prediction"].dtype) == "Int64"
    saved = pq.read_table(job.save_results(tmp_path / "r.parquet"))
    assert saved.column("row").to_pylist() == list(range(20))


def test_results_are_the_same_through_both_transports(http_client, stack, digits, tmp_path):
    """A job's DataFrame and saved file are equal, column for column and dtype for dtype,
    whether read directly or over HTTP (a PARTIAL job: outputs, lists and row errors)."""
    rows = digits.frame[PIXELS].iloc[:600].to_numpy().tolist()  # positional rows: named from /v1/models
    rows[3][0] = "x"
    job = http_client.score_rows(rows, model="digits-torch", batch_size=64)
    assert job.wait(timeout_s=TIMEOUT_S).state.value == "PARTIAL"
    over_http, direct = job.results(), stack.client.get_job(job.id).results()
    pd.testing.assert_frame_equal(over_http, direct)
    assert list(over_http.columns) == ["prediction", "score", "probabilities", "error", "error_field"]
    a = pq.read_table(job.save_results(tmp_path / "http.parquet"))
    b = pq.read_table(stack.client.get_job(job.id).save_results(tmp_path / "direct.parquet"))
    assert a.equals(b)


def test_cancel_and_delete(client, stack):
    """Cancel stops a job (CANCELLED); delete removes it (get_job then raises
    JobNotFoundError) and a second delete reports nothing left."""
    job = client.score_dataset(dataset(client, stack, "digits.csv"), model="digits-torch", batch_size=1)
    assert job.cancel().state.value == "CANCELLED"
    assert client.get_job(job.id[:12]).id == job.id
    report = job.delete()
    assert report is not None and report.jobs == [job.id]
    with pytest.raises(JobNotFoundError):
        client.get_job(job.id)
    assert job.delete() is None


def test_recent_jobs_lists_open_jobs_first(client, stack):
    """Both clients list jobs the same way, open ones first: the job just scored with its
    state and counts; ``limit`` bounds the list; the HTTP one through ``GET /v1/jobs``."""
    ended = client.score_dataset(dataset(client, stack, "digits.csv"), model="digits-sklearn")
    assert ended.wait(timeout_s=TIMEOUT_S).rows_ok == 1797
    jobs = client.recent_jobs(1000)
    listed = {st.job_id: st for st in jobs}
    assert listed[ended.id].state.value == "SUCCEEDED" and listed[ended.id].rows_ok == 1797
    open_ = [i for i, st in enumerate(jobs) if st.state.value in ("PENDING", "RUNNING")]
    assert open_ == list(range(len(open_))), "open jobs come first"
    assert len(client.recent_jobs(1)) == 1


def test_predict_and_models(client, digits, trained):
    """predict answers a few rows in order with the model's predictions and names its job;
    models lists the repository."""
    assert {"digits-sklearn", "digits-torch"} <= {m.name for m in client.models()}
    rows = digits.frame[PIXELS].iloc[:5]
    frame = client.predict("digits-sklearn", rows, timeout_s=60)
    assert frame.index.tolist() == list(range(5)) and len(frame.attrs["job_id"]) == 32
    assert frame["prediction"].tolist() == trained[1]["sklearn"][0].predict(rows.to_numpy(np.float32) * SCALE).tolist()


def test_errors_are_the_same_classes(client, stack):
    """An unknown job, a missing dataset, a dataset lacking the model's columns and an
    unknown model raise the same classes through both transports."""
    with pytest.raises(JobNotFoundError):
        client.get_job("0" * 32)
    with pytest.raises(DatasetNotFoundError):
        client.score_dataset(dataset(client, stack, "missing.csv"), model="digits-sklearn")
    name = f"bad-{uuid.uuid4().hex[:8]}.csv"
    (Path(stack.values["data_dir"]) / name).write_text("a,b\n1,2\n")
    with pytest.raises(DatasetSchemaError, match="pixel_0"):
        client.score_dataset(dataset(client, stack, name), model="digits-sklearn")
    with pytest.raises(ModelNotFoundError):
        client.score_dataset(dataset(client, stack, "digits.csv"), model="no-such-model")


def test_a_wrong_api_key_is_unauthorized_and_never_shown(api_url):
    """A wrong key raises UnauthorizedError; neither the error nor the client's repr holds it."""
    secret = "wrong-key-" + uuid.uuid4().hex
    with Client.connect(api_url, api_key=secret) as client, pytest.raises(UnauthorizedError) as raised:
        client.models()
    assert secret not in str(raised.value) and secret not in repr(client) and secret not in repr(raised.value)


NO_STORE = """
import gc, sys
from producer import Client
c = Client.connect(sys.argv[1], api_key=sys.argv[2])
job = c.score_rows([[0.0] * 64] * 5, model="digits-sklearn")
status = job.wait(timeout_s=120)
frame = job.results()
from celery import _state
from sqlalchemy.engine import Engine
apps = list(_state._get_active_apps())
# type(), not isinstance(): isinstance on celery's current_app proxy would make a default app
engines = [o for o in gc.get_objects() if issubclass(type(o), Engine)]
print(status.state.value, len(frame), len(engines), len(apps))
"""


def test_the_http_transport_needs_no_broker_or_database(api_url, stack):
    """With the broker and database settings pointing at a closed port, a job round trip
    over HTTP works, and no SQLAlchemy engine or Celery app was made."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}, **CLOSED}
    run = subprocess.run([sys.executable, "-c", NO_STORE, api_url, KEY], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["SUCCEEDED", "5", "0", "0"]


def mlf(*args: str, url: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    """``mlf --api URL ...`` with the key in MLF_API_KEY (none: no key at all) and no
    reachable broker or database."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ML_FRAMEWORK_", "MLF_"))}, **CLOSED,
           **({} if key is None else {"MLF_API_KEY": key})}
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "--api", url, *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_over_the_api(api_url, digits, tmp_path):
    """``mlf --api`` scores, shows, writes, lists and deletes over HTTP without the broker
    or the database, never printing the key; commands that need them refuse --api."""
    out = tmp_path / "out.csv"
    score = mlf("score", "digits.csv", "-m", "digits-sklearn", "-o", str(out), url=api_url)
    assert score.returncode == 0, score.stderr
    assert f"API {api_url}" in score.stderr and "SUCCEEDED" in score.stdout
    assert len(pd.read_csv(out)) == len(digits.frame)
    job_id = score.stderr.split("job ", 1)[1].split()[0]
    status = mlf("status", job_id, url=api_url)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    results = mlf("results", job_id, "-o", str(tmp_path / "r.parquet"), url=api_url)
    assert results.returncode == 0 and len(pd.read_parquet(tmp_path / "r.parquet")) == len(digits.frame)
    models = mlf("models", url=api_url)
    assert models.returncode == 0 and "digits-sklearn" in models.stdout
    listed = mlf("jobs", "list", "--json", url=api_url)
    assert listed.returncode == 0 and job_id in [json.loads(line)["job_id"] for line in listed.stdout.splitlines()]
    delete = mlf("jobs", "delete", job_id, url=api_url)
    assert delete.returncode == 0 and f"deleted job {job_id}" in delete.stdout, delete.stderr
    refused = mlf("queues", url=api_url)
    assert refused.returncode == 2 and "needs direct access to the broker and the database" in refused.stderr
    wrong = mlf("status", job_id, url=api_url, key="not-the-key-0123")
    assert wrong.returncode == 1 and "refused the API key sent (from --api-key or MLF_API_KEY)" in wrong.stderr
    for run in (score, status, results, models, listed, delete, refused, wrong):
        assert KEY not in run.stdout + run.stderr and "not-the-key-0123" not in run.stdout + run.stderr


def test_cli_without_a_key_says_how_to_give_one(api_url):
    """``mlf --api`` with neither --api-key nor MLF_API_KEY still asks the API (it may run
    without auth); this API's 401 exits 1, as a wrong key does, naming both ways to give one."""
    for args in (["models"], ["status", "ab" * 16]):
        run = mlf(*args, url=api_url, key=None)
        assert run.returncode == 1, run.stderr
        assert run.stderr.startswith(f"error: the API at {api_url} requires an API key and none was sent: "
                                     "set the MLF_API_KEY variable, or pass --api-key KEY"), run.stderr
        assert KEY not in run.stdout + run.stderr and "Traceback" not in run.stderr
