"""Bulk scoring end to end through a real broker, real worker processes and a real database.

Every test runs on three backends: embedded SQLite, Redis + PostgreSQL, and RabbitMQ +
PostgreSQL (operators who outgrow one Redis move to RabbitMQ; the same code must work
there).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from demo.digits import PIXELS, SCALE
from ml_framework.constants import SCORE_SHARD_TASK
from ml_framework.errors import DatasetNotFoundError, DatasetSchemaError, ModelNotFoundError
from ml_framework.protocol import DatasetRef, ScoreShard
from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from tests.conftest import shared_backend

pytestmark = pytest.mark.integration
TIMEOUT_S = 240


@pytest.fixture(scope="session", params=["embedded", "redis-postgres", "rabbitmq-postgres"])
def backend(request):
    """This module's backends: the session's two, and RabbitMQ."""
    return shared_backend(request)


def own_probabilities(framework: str, model, x: np.ndarray) -> np.ndarray:
    """The trained model's own in-process class probabilities for ``x`` (N, 64) in [0, 1]."""
    if framework == "sklearn":
        return model.predict_proba(x)
    if framework == "torch":
        import torch

        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(x.reshape(-1, 1, 8, 8))), dim=1).numpy()
    return model.predict(x.reshape(-1, 8, 8, 1), verbose=0)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("framework", ["sklearn", "torch", "tensorflow"])
def test_predictions_equal_in_process_predictions(backend, trained, data_dir, digits, framework, fmt):
    """Scoring through the queue gives the model's own predictions, in input row order."""
    native, manifest = trained[1][framework]
    job = backend.client.score_dataset(data_dir / f"digits.{fmt}", manifest.name)
    status = job.wait(timeout_s=TIMEOUT_S)
    n = len(digits.frame)
    assert status.state is JobState.SUCCEEDED, status
    assert (status.rows_ok, status.rows_failed, status.n_shards, status.shards_done) == (n, 0, 4, 4)
    results = job.results()
    assert list(results.index) == list(range(n))
    assert results["error"].isna().all()
    expected = own_probabilities(framework, native, digits.frame[PIXELS].to_numpy(np.float32) * SCALE)
    got = np.stack(results["probabilities"].to_numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert (results["prediction"].astype(int).to_numpy() == expected.argmax(axis=1)).all()


def test_dataset_outside_data_dir_is_inlined(backend, trained, digits, tmp_path):
    """A file the workers cannot see travels inline in the shard messages and scores the same."""
    clf, manifest = trained[1]["sklearn"]
    path = tmp_path / "elsewhere.parquet"
    digits.frame.iloc[:700].to_parquet(path)
    job = backend.client.score_dataset(path, manifest.name)
    assert job.wait(timeout_s=TIMEOUT_S).state is JobState.SUCCEEDED
    got = job.results()["prediction"].astype(int).to_numpy()
    assert (got == clf.predict(digits.frame[PIXELS].iloc[:700].to_numpy(np.float32) * SCALE)).all()


def send_each_shard_twice(backend, job_id: str, manifest, ranges: list[tuple[int, int]]) -> None:
    """Send every shard of job ``job_id`` (``digits.csv`` rows ``ranges``, model ``manifest``)
    to the backend's workers twice, as a broker that redelivers each message would."""
    for index, (a, b) in enumerate(ranges):
        body = ScoreShard(job_id=job_id, shard_index=index, model=manifest.name, version=manifest.version,
                          batch_size=128, columns=PIXELS,
                          source=DatasetRef(path="digits.csv", format="csv", row_start=a, row_end=b))
        for _ in range(2):
            backend.client.app.send_task(SCORE_SHARD_TASK, kwargs=body.model_dump(mode="json"),
                                         queue=backend.values["bulk_queue"])


def test_redelivered_shard_records_each_row_once(backend, trained):
    """Each shard message delivered twice: every row is recorded once, counters count once."""
    manifest = trained[1]["sklearn"][1]
    client = backend.client
    ranges = [(0, 500), (500, 1000)]
    job_id = client.store.create_job(model=manifest.name, model_version=manifest.version,
                                     dataset="digits.csv", n_rows=1000, shard_ranges=ranges, batch_size=128)
    send_each_shard_twice(backend, job_id, manifest, ranges)
    job = client.get_job(job_id)
    status = job.wait(timeout_s=TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while any(s["deliveries"] < 2 for s in client.store.shards(job_id)):
        assert time.monotonic() < deadline, client.store.shards(job_id)
        time.sleep(0.2)
    status = job.status()
    assert status.state is JobState.SUCCEEDED
    assert (status.rows_ok, status.rows_failed, status.shards_done) == (1000, 0, 2)
    results = job.results()
    assert len(results) == 1000 and results.index.is_unique
    assert [s["deliveries"] for s in client.store.shards(job_id)] == [2, 2]


def test_bad_rows_fail_alone(backend, trained, data_dir, digits):
    """A non-numeric cell and an empty cell fail their rows, naming row and field; the rest succeed."""
    clf, manifest = trained[1]["sklearn"]
    frame = digits.frame.copy()
    frame[PIXELS] = frame[PIXELS].astype(object)
    frame.loc[7, "pixel_3"] = "abc"
    frame.loc[12, "pixel_10"] = None
    path = data_dir / f"bad-{backend.name}.csv"
    frame.to_csv(path, index=False)
    job = backend.client.score_dataset(path, manifest.name)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert status.state is JobState.PARTIAL
    assert (status.rows_ok, status.rows_failed) == (len(frame) - 2, 2)
    results = job.results()
    assert results.loc[7, "error_field"] == "pixel_3"
    assert "row 7" in results.loc[7, "error"] and "'abc' is not a number" in results.loc[7, "error"]
    assert results.loc[12, "error_field"] == "pixel_10" and "missing value" in results.loc[12, "error"]
    ok = results["error"].isna()
    assert ok.sum() == len(frame) - 2
    expected = clf.predict(digits.frame[PIXELS].to_numpy(np.float32) * SCALE)
    assert (results.loc[ok, "prediction"].astype(int).to_numpy() == expected[ok.to_numpy()]).all()


def test_ragged_lines_category_columns_and_empty_datasets_through_workers(backend, trained, data_dir, digits,
                                                                         tmp_path):
    """Through the broker, real workers and the store: CSV lines with a field too many or
    too few fail as their own rows (by reference and inlined, in the first and a later
    shard) naming line and counts, while every other row gets the model's prediction;
    pixels written as a pandas ``category`` of numbers as text score like plain ones; a
    CSV header alone is a job of 0 rows, SUCCEEDED at once with the output columns."""
    clf, manifest = trained[1]["sklearn"]
    expected = clf.predict(digits.frame[PIXELS].to_numpy(np.float32) * SCALE)
    lines = digits.frame.to_csv(index=False).splitlines()
    width = len(lines[0].split(","))
    lines[3] += ",0"  # data row 2, file line 4
    lines[7] = lines[7].rsplit(",", 1)[0]  # data row 6, file line 8
    lines[1001] += ",1,2"  # data row 1000, in the third shard
    text = "\n".join(lines) + "\n"
    bad = {2: f"row 2: line 4: expected {width} fields, found {width + 1}",
           6: f"row 6: line 8: expected {width} fields, found {width - 1}",
           1000: f"row 1000: line 1002: expected {width} fields, found {width + 2}"}
    (data_dir / f"ragged-{backend.name}.csv").write_text(text)
    (tmp_path / "ragged-outside.csv").write_text(text)
    for path in (data_dir / f"ragged-{backend.name}.csv", tmp_path / "ragged-outside.csv"):
        job = backend.client.score_dataset(path, manifest.name)
        status = job.wait(timeout_s=TIMEOUT_S)
        assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, len(digits.frame) - 3, 3)
        results = job.results()
        assert list(results.index) == list(range(len(digits.frame)))
        assert results["error"].dropna().to_dict() == bad
        ok = results["error"].isna().to_numpy()
        assert (results.loc[ok, "prediction"].astype(int).to_numpy() == expected[ok]).all()
    category = digits.frame[PIXELS].astype(int).astype(str).astype("category")
    category.to_parquet(data_dir / f"category-{backend.name}.parquet")
    job = backend.client.score_dataset(data_dir / f"category-{backend.name}.parquet", manifest.name)
    assert job.wait(timeout_s=TIMEOUT_S).state is JobState.SUCCEEDED
    assert (job.results()["prediction"].astype(int).to_numpy() == expected).all()
    (data_dir / f"empty-{backend.name}.csv").write_text(",".join(PIXELS) + "\n")
    job = backend.client.score_dataset(data_dir / f"empty-{backend.name}.csv", manifest.name)
    status = job.wait(timeout_s=5)
    assert (status.state, status.n_rows, status.n_shards) == (JobState.SUCCEEDED, 0, 0)
    assert list(job.results().columns) == ["prediction", "score", "probabilities", "error", "error_field"]


def test_submit_errors_name_the_problem(backend, trained, data_dir, digits, tmp_path):
    """Unknown model, missing column and missing file are refused at submit with clear errors."""
    client = backend.client
    with pytest.raises(ModelNotFoundError, match="'no-such-model'.*digits-sklearn"):
        client.score_dataset(data_dir / "digits.csv", "no-such-model")
    narrow = tmp_path / "narrow.csv"
    digits.frame.drop(columns=["pixel_5"]).to_csv(narrow, index=False)
    with pytest.raises(DatasetSchemaError, match="pixel_5"):
        client.score_dataset(narrow, "digits-sklearn")
    with pytest.raises(DatasetNotFoundError, match="nope.csv"):
        client.score_dataset(tmp_path / "nope.csv", "digits-sklearn")


def test_cancel_stops_new_shards(backend, trained, data_dir):
    """After cancel no shard starts; shards already recorded keep their rows."""
    manifest = trained[1]["torch"][1]
    small = Client(load_settings(**{**backend.values, "shard_size": 20}))
    try:
        job = small.score_dataset(data_dir / "digits.csv", manifest.name, batch_size=4)
        status = job.cancel()
        assert status.state is JobState.CANCELLED
        time.sleep(3)  # let workers drain what they already took
        shards = small.store.shards(job.id)
        assert not any(s["state"] == "RUNNING" for s in shards)
        done = [s for s in shards if s["state"] == "DONE"]
        assert len(done) < len(shards)
        assert len(job.results()) == sum(s["rows_ok"] for s in done)
        assert job.status().state is JobState.CANCELLED
    finally:
        small.close()


def mlf(backend, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run the ``mlf`` CLI against the backend."""
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=backend.env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)


def test_cli_score_status_results(backend, trained, data_dir, tmp_path, digits):
    """`mlf score --wait -o`, `mlf status` and `mlf results` work and exit 0 on success."""
    out = tmp_path / "out.csv"
    run = mlf(backend, "score", str(data_dir / "digits.csv"), "--model", "digits-torch", "-o", str(out))
    assert run.returncode == 0, run.stderr
    frame = pd.read_csv(out, index_col="row")
    assert len(frame) == len(digits.frame) and frame["error"].isna().all()
    run = mlf(backend, "score", str(data_dir / "digits.parquet"), "--model", "digits-keras")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    assert len(job_id) == 32
    backend.client.get_job(job_id).wait(timeout_s=TIMEOUT_S)
    status = mlf(backend, "status", job_id, "--json")
    assert status.returncode == 0 and '"state": "SUCCEEDED"' in status.stdout
    parquet = tmp_path / "r.parquet"
    assert mlf(backend, "results", job_id, "-o", str(parquet)).returncode == 0
    assert len(pd.read_parquet(parquet)) == len(digits.frame)


def test_cli_errors_and_exit_codes(backend, trained, data_dir, digits, tmp_path):
    """The CLI names the problem on stderr and exits non-zero: 1 for errors, 3 for PARTIAL."""
    run = mlf(backend, "score", str(tmp_path / "missing.csv"), "--model", "digits-sklearn")
    assert run.returncode == 1 and "missing.csv" in run.stderr
    run = mlf(backend, "score", str(data_dir / "digits.csv"), "--model", "nope")
    assert run.returncode == 1 and "'nope' not found" in run.stderr
    run = mlf(backend, "status", "0" * 32)
    assert run.returncode == 1 and "no job" in run.stderr
    bad = tmp_path / "bad.csv"
    frame = digits.frame.iloc[:100].astype({"pixel_0": object})
    frame.loc[3, "pixel_0"] = "x"
    frame.to_csv(bad, index=False)
    run = mlf(backend, "score", str(bad), "--model", "digits-sklearn", "--wait")
    assert run.returncode == 3, run.stderr
    assert "PARTIAL" in run.stdout and "99 ok, 1 failed" in run.stdout


OOM_LIMIT = 16


def test_out_of_memory_batches_are_split_and_the_job_succeeds(backend, trained, data_dir, digits):
    """A model that runs out of memory above 16 rows, given batches of 64: the first batch
    of each worker process is split down to 16 rows, every row is scored, and the job
    reports how often it split. Later batches start at the size that fitted (growing back
    now and then, which may split again), so there are far fewer splits than if every
    batch of 64 were split (regression: each batch started at full size again)."""
    from ml_framework.manifest import ModelRepository
    from tests.oom_model import expected_splits, oom_above
    from worker.export import export_torch

    models_dir = trained[0]
    if not ModelRepository(models_dir).versions("digits-oom"):  # shared by both backends
        export_torch(oom_above(OOM_LIMIT, 64, 10), models_dir, "digits-oom", method="script",
                     inputs={"columns": PIXELS}, runtime={"warmup": False},
                     outputs={"kind": "classification", "labels": list(range(10)), "activation": "softmax"})
    job = backend.client.score_dataset(data_dir / "digits.csv", "digits-oom", batch_size=64)
    status = job.wait(timeout_s=TIMEOUT_S)
    n = len(digits.frame)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.SUCCEEDED, n, 0)
    shard_rows = [b - a for a, b in ((s["row_start"], s["row_end"]) for s in backend.client.store.shards(job.id))]
    every_batch = sum(expected_splits(min(64, rows - start), OOM_LIMIT)
                      for rows in shard_rows for start in range(0, rows, 64))
    assert 0 < status.oom_splits <= every_batch // 3, (status.oom_splits, every_batch)
    run = mlf(backend, "status", job.id)
    assert f"{status.oom_splits} batch(es) ran out of memory and were retried in halves" in run.stdout


def test_a_shard_whose_worker_died_max_attempts_times_is_failed_not_rerun(backend, trained):
    """A shard already started max_shard_attempts (3) times whose workers all died
    (RUNNING, attempts 3, as a poison shard leaves it) is redelivered: the worker fails it
    with "worker lost" on every row instead of running it a fourth time, and the job ends
    PARTIAL with the other shard's rows."""
    from sqlalchemy import text

    manifest = trained[1]["sklearn"][1]
    client = backend.client
    ranges = [(0, 500), (500, 1000)]
    job_id = client.store.create_job(model=manifest.name, model_version=manifest.version,
                                     dataset="digits.csv", n_rows=1000, shard_ranges=ranges, batch_size=128)
    with client.store.engine.begin() as conn:  # three starts that never finished
        conn.execute(text("UPDATE shards SET state = 'RUNNING', attempts = 3, deliveries = 3 "
                          "WHERE job_id = :j AND shard_index = 0"), {"j": job_id})
    for index, (a, b) in enumerate(ranges):
        body = ScoreShard(job_id=job_id, shard_index=index, model=manifest.name, version=manifest.version,
                          batch_size=128, columns=PIXELS,
                          source=DatasetRef(path="digits.csv", format="csv", row_start=a, row_end=b))
        client.app.send_task(SCORE_SHARD_TASK, kwargs=body.model_dump(mode="json"), queue=backend.values["bulk_queue"])
    status = client.get_job(job_id).wait(timeout_s=TIMEOUT_S)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, 500, 500)
    shard0, shard1 = client.store.shards(job_id)
    assert (shard0["state"], shard0["attempts"], shard0["deliveries"]) == ("FAILED", 3, 4)
    assert "worker lost" in shard0["error"] and shard1["state"] == "DONE"
    results = client.get_job(job_id).results()
    assert results.loc[0:499, "error"].str.contains("worker lost").all() and results.loc[500:, "error"].isna().all()


def test_a_dataset_changed_after_submit_fails_its_shards_and_a_short_one_loses_no_row(backend, trained, data_dir,
                                                                                     digits):
    """A shard whose dataset is no longer the one planned (another fingerprint) fails as a
    whole, naming the dataset; a shard of a message without a fingerprint (earlier
    releases) over a file that ended early fails the rows past its end: every row of the
    job ends with an outcome (rows_ok + rows_failed == n_rows)."""
    from ml_framework.datasets import Source
    from ml_framework.datasets.source import fingerprint

    manifest = trained[1]["sklearn"][1]
    client = backend.client
    path = data_dir / f"changing-{backend.name}-{uuid.uuid4().hex[:6]}.csv"
    digits.frame.iloc[:300].to_csv(path, index=False)
    planned = fingerprint(Source.of_path(path))
    digits.frame.iloc[:200].to_csv(path, index=False)  # rewritten (shorter) after the plan
    assert fingerprint(Source.of_path(path)) != planned
    for stamp, state, (ok, failed) in [(planned, JobState.FAILED, (0, 300)), (None, JobState.PARTIAL, (200, 100))]:
        job_id = client.store.create_job(model=manifest.name, model_version=manifest.version, dataset=path.name,
                                         n_rows=300, shard_ranges=[(0, 300)], batch_size=128)
        body = ScoreShard(job_id=job_id, shard_index=0, model=manifest.name, version=manifest.version,
                          batch_size=128, columns=PIXELS, source=DatasetRef(path=path.name, format="csv", row_start=0,
                                                                            row_end=300, fingerprint=stamp))
        client.app.send_task(SCORE_SHARD_TASK, kwargs=body.model_dump(mode="json"), queue=backend.values["bulk_queue"])
        status = client.get_job(job_id).wait(timeout_s=TIMEOUT_S)
        assert (status.state, status.rows_ok, status.rows_failed) == (state, ok, failed), status
        errors = client.store.row_errors(job_id, limit=1000)
        reason = "changed since the job was submitted" if stamp else "the dataset ended before this row"
        assert len(errors) == failed and all(reason in e.message for e in errors), errors[:2]
        if stamp:
            assert path.name in errors[0].message and str(data_dir) not in errors[0].message
        else:
            assert [e.row_index for e in errors] == list(range(200, 300))
