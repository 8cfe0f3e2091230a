"""Datasets in object storage end to end: every input kind scored from ``s3://`` on the real
S3 server (SeaweedFS) by real worker processes that read their rows from it, with the
results of the same file scored locally; bad rows, missing objects and wrong credentials."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from ml_framework.datasets import inspect, object_source
from ml_framework.datasets.source import fingerprint
from ml_framework.errors import DatasetNotFoundError, ObjectStoreError
from ml_framework.protocol import DatasetRef
from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from producer.plan import JobOptions, plan_dataset
from tests.integration.test_image_inputs import MODEL as IMAGE_MODEL
from tests.integration.test_image_inputs import expected, image_dir, image_model  # noqa: F401 - fixtures
from tests.integration.test_tensor_inputs import MODEL as TENSOR_MODEL
from tests.integration.test_tensor_inputs import images, tensor_model  # noqa: F401 - fixtures
from tests.s3server import SECRET_KEY

pytestmark = pytest.mark.integration
TIMEOUT_S = 240
BUCKET = "s3://mlf-data"


@pytest.fixture(scope="module")
def uploaded(s3_server, data_dir, digits, tmp_path_factory):
    """The digits in every format, local under ``data_dir/s3`` and the same files uploaded
    to ``s3://mlf-data/digits/``: ``{name: (local path, uri)}``."""
    local = data_dir / "s3"
    (local / "parts" / "more").mkdir(parents=True, exist_ok=True)
    frame = digits.frame
    frame.to_csv(local / "digits.csv", index=False)
    frame.to_parquet(local / "digits.parquet", row_group_size=300)
    frame.iloc[:700].to_parquet(local / "parts" / "part-0.parquet", row_group_size=256)
    frame.iloc[700:].to_parquet(local / "parts" / "more" / "part-1.parquet", row_group_size=400)
    feather.write_feather(pa.Table.from_pandas(frame, preserve_index=False), local / "digits.feather", chunksize=333)
    np.save(local / "digits.npy", images(digits).reshape(-1, 8, 8))
    s3_server.upload(local, f"{BUCKET}/digits")
    return {name: (local / name, f"{BUCKET}/digits/{name}")
            for name in ("digits.csv", "digits.parquet", "parts", "digits.feather", "digits.npy")}


def scored(backend, dataset, model: str) -> pd.DataFrame:
    """The results of ``model`` over ``dataset`` (a path or a URI), which must succeed."""
    job = backend.client.score_dataset(dataset, model)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert status.state is JobState.SUCCEEDED, status
    return job.results()


@pytest.mark.parametrize("name", ["digits.csv", "digits.parquet", "parts", "digits.feather"])
def test_a_table_in_object_storage_scores_like_the_local_file(s3_backend, trained, uploaded, name):
    """CSV, Parquet, a prefix of Parquet parts and Feather: the same results from s3:// as
    from the same file on disk."""
    model = trained[1]["sklearn"][1].name
    local, uri = uploaded[name]
    from_s3 = scored(s3_backend, uri, model)
    assert len(from_s3) == 1797
    pd.testing.assert_frame_equal(from_s3, scored(s3_backend, local, model))


def test_an_npy_object_scores_like_the_local_file(s3_backend, tensor_model, uploaded):  # noqa: F811
    """An .npy object: each worker reads the byte range of its rows; results equal the local file's."""
    local, uri = uploaded["digits.npy"]
    pd.testing.assert_frame_equal(scored(s3_backend, uri, TENSOR_MODEL), scored(s3_backend, local, TENSOR_MODEL))


def test_object_datasets_travel_by_reference(s3_backend, trained, uploaded):
    """The shard messages of an s3:// dataset name its URI and row range; no row is inlined."""
    client = s3_backend.client
    manifest = trained[1]["sklearn"][1]
    for name in ("digits.csv", "parts", "digits.npy"):
        uri = uploaded[name][1]
        info = inspect(object_source(uri, client.settings))
        assert info.path == uri
        columns = None if name != "digits.npy" else ["array"]
        if name == "digits.npy":
            manifest = client.repository.resolve(TENSOR_MODEL, None)
        plan = plan_dataset(manifest, JobOptions.of(manifest.name, columns=columns), info,
                            data_dir=client.settings.data_dir, shard_size=500, default_batch_size=64)
        messages = list(plan.messages("job"))
        stamp = fingerprint(info.source)  # the object (or prefix) as planned: workers check it
        assert [m.source for m in messages] == [
            DatasetRef(path=uri, format=info.format, row_start=a, row_end=min(a + 500, 1797), fingerprint=stamp)
            for a in range(0, 1797, 500)]


def test_an_image_prefix_scores_like_the_local_directory(s3_backend, image_model, image_dir, s3_server):  # noqa: F811
    """s3://.../images/ is read like a local directory of images: one row per image, in path order."""
    directory, names = image_dir
    uri = s3_server.upload(directory, f"{BUCKET}/images/")
    from_s3 = scored(s3_backend, uri, IMAGE_MODEL)
    np.testing.assert_allclose(np.stack(from_s3["embedding"].to_numpy()),
                               expected(image_model, [directory / n for n in names]), atol=1e-4)
    pd.testing.assert_frame_equal(from_s3, scored(s3_backend, directory, IMAGE_MODEL))


def test_a_column_of_image_uris_scores_and_a_missing_one_fails_alone(s3_backend, image_model, image_dir,  # noqa: F811
                                                                   s3_server, tmp_path):
    """A Parquet column of s3:// image URIs: each image is read from the store; a missing
    object fails its own row, naming the URI."""
    directory, names = image_dir
    s3_server.upload(directory, f"{BUCKET}/uri-images/")
    uris = [f"{BUCKET}/uri-images/{n}" for n in names[:4]]
    uris[2] = f"{BUCKET}/uri-images/missing.png"
    pq.write_table(pa.table({"path": uris}), tmp_path / "uris.parquet")
    job = s3_backend.client.score_dataset(s3_server.upload(tmp_path / "uris.parquet", f"{BUCKET}/uris.parquet"),
                                          IMAGE_MODEL)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, 3, 1)
    results = job.results()
    assert results["error"].dropna().to_dict() == {
        2: f"row 2, field 'path': image '{BUCKET}/uri-images/missing.png': not found in object storage"}
    good = [0, 1, 3]
    np.testing.assert_allclose(np.stack(results["embedding"][good].to_numpy()),
                               expected(image_model, [directory / names[i] for i in good]), atol=1e-4)


def test_a_bad_row_of_an_s3_csv_fails_alone(s3_backend, trained, digits, s3_server, tmp_path):
    """One non-numeric cell in an s3:// CSV fails its row, naming it; the other rows score."""
    frame = digits.frame.iloc[:40].copy()
    frame["pixel_5"] = frame["pixel_5"].astype(object)
    frame.loc[17, "pixel_5"] = "oops"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    uri = s3_server.upload(tmp_path / "bad.csv", f"{BUCKET}/bad.csv")
    job = s3_backend.client.score_dataset(uri, trained[1]["sklearn"][1].name)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, 39, 1)
    [(row, error)] = job.results()["error"].dropna().items()
    assert row == 17 and "row 17" in error and "pixel_5" in error and "oops" in error


def test_mlf_score_reads_an_s3_dataset(s3_backend, trained, uploaded, tmp_path):
    """`mlf score s3://... -o out.parquet` writes the results of the object."""
    uri = uploaded["digits.parquet"][1]
    out = tmp_path / "scores.parquet"
    done = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "score", uri,
                           "-m", trained[1]["sklearn"][1].name, "-o", str(out), "--timeout", str(TIMEOUT_S)],
                          env=s3_backend.env, capture_output=True, text=True, timeout=TIMEOUT_S + 60)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).num_rows == 1797


def test_a_missing_object_is_refused_at_submit_naming_it(s3_backend, trained):
    """No such object, no such prefix, no such bucket: DatasetNotFoundError naming the URI."""
    model = trained[1]["sklearn"][1].name
    for uri in (f"{BUCKET}/nothing.csv", f"{BUCKET}/no-prefix/", "s3://no-such-bucket/x.parquet"):
        with pytest.raises((DatasetNotFoundError, ObjectStoreError)) as err:
            s3_backend.client.score_dataset(uri, model)
        assert uri.rstrip("/") in str(err.value)


def test_wrong_credentials_and_a_dead_endpoint_give_clear_errors_without_secrets(s3_backend, s3_server, trained,
                                                                                  uploaded):
    """A secret the server refuses, and an endpoint nobody answers: ObjectStoreError naming
    the URI, with neither secret in the message."""
    from tests.conftest import free_port

    uri = uploaded["digits.parquet"][1]
    model = trained[1]["sklearn"][1].name
    wrong = "wrong-secret-" + "x" * 20
    for settings in ({**s3_server.settings, "s3_secret_access_key": wrong},
                     {**s3_server.settings, "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}):
        values = {**s3_backend.values, **settings}
        with Client(load_settings(**values)) as client, pytest.raises(ObjectStoreError) as err:
            client.score_dataset(uri, model)
        message = str(err.value)
        assert message.startswith(uri) and wrong not in message and SECRET_KEY not in message


def test_an_object_gone_after_submit_fails_its_shards_naming_it(s3_backend, trained, digits, s3_server, tmp_path,
                                                                monkeypatch):
    """The object is deleted between submit and the workers' reads: every shard fails, its
    reason naming the URI; the workers go on."""
    digits.frame.iloc[:30].to_parquet(tmp_path / "gone.parquet")
    uri = s3_server.upload(tmp_path / "gone.parquet", f"{BUCKET}/gone.parquet")
    app = s3_backend.client.app
    real_send = app.send_task

    def delete_then_send(*args, **kwargs):  # planned and recorded; gone before its message leaves
        s3_server.filesystem().delete_file(uri[len("s3://"):])
        monkeypatch.setattr(app, "send_task", real_send)
        return real_send(*args, **kwargs)

    monkeypatch.setattr(app, "send_task", delete_then_send)
    job = s3_backend.client.score_dataset(uri, trained[1]["sklearn"][1].name)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert (status.state, status.rows_failed) == (JobState.FAILED, 30)
    assert list(job.results()["error"]) == [f"row {i}: shard failed: dataset not found: {uri}" for i in range(30)]
    monkeypatch.undo()
    assert len(scored(s3_backend, uploaded_csv(s3_server, digits, tmp_path), trained[1]["sklearn"][1].name)) == 5


def uploaded_csv(s3_server, digits, tmp_path) -> str:
    """Five rows of the digits as a CSV object; its URI."""
    digits.frame.iloc[:5].to_csv(tmp_path / "five.csv", index=False)
    return s3_server.upload(tmp_path / "five.csv", f"{BUCKET}/five.csv")


def test_the_api_scores_an_s3_dataset_under_an_allowed_prefix_only(s3_backend, trained, uploaded):
    """POST /v1/jobs with an s3:// dataset: scored when api_object_prefixes allows it (the
    job names the URI), refused with 400 outside it; a missing object under it is 404."""
    from tests.integration.test_api import api, wait_done

    model = trained[1]["sklearn"][1].name
    uri = uploaded["digits.parquet"][1]
    with api({**s3_backend.values, "api_object_prefixes": f"{BUCKET}/digits"}) as http:
        r = http.post("/v1/jobs", json={"model": model, "dataset": uri})
        assert r.status_code == 202 and r.json()["dataset"] == uri, r.text
        done = wait_done(http, r.json()["job_id"])
        assert (done["state"], done["rows_ok"]) == ("SUCCEEDED", 1797)
        r = http.post("/v1/jobs", json={"model": model, "dataset": f"{BUCKET}/bad.csv"})
        assert r.status_code == 400 and "api_object_prefixes" in r.json()["error"]["message"], r.text
        r = http.post("/v1/jobs", json={"model": model, "dataset": f"{BUCKET}/digits/none.csv"})
        assert r.status_code == 404 and r.json()["error"]["message"] == f"dataset not found: {BUCKET}/digits/none.csv"
