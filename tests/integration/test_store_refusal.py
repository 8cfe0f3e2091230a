"""When the results database refuses a shard's rows (a data error, not an outage), the
shard is recorded as failed with the reason instead of leaving the job RUNNING forever."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from ml_framework.errors import ShardFailed
from ml_framework.protocol import DatasetRef, ScoreShard
from ml_framework.settings import load_settings
from ml_framework.store import JobState, ResultStore
from producer.results import job_results
from worker import tasks
from worker.export import export_sklearn
from worker.process import WorkerContext

pytestmark = pytest.mark.integration


def test_rows_the_database_refuses_fail_the_shard_with_the_reason(tmp_path, pg_database):
    """PostgreSQL refuses a NUL byte in a row error's field: the shard ends FAILED, the job FAILED."""
    x, y = load_iris(return_X_y=True)
    columns = ["sepal\x00length", "b", "c", "d"]  # PostgreSQL text cannot hold NUL
    export_sklearn(LogisticRegression(max_iter=500).fit(x, y), tmp_path / "models", "iris",
                   inputs={"columns": columns})
    (tmp_path / "data").mkdir()
    frame = pd.DataFrame(x, columns=columns).astype(object)
    frame.iloc[2, 0] = "oops"  # a row error naming the NUL-bearing field
    frame.astype(str).to_parquet(tmp_path / "data" / "iris.parquet")
    settings = load_settings(database_url=pg_database, models_dir=tmp_path / "models", data_dir=tmp_path / "data",
                             var_dir=tmp_path / "var")
    store = ResultStore(pg_database)
    job_id = store.create_job(model="iris", model_version=1, dataset="iris.parquet", n_rows=len(x),
                              shard_ranges=[(0, len(x))], batch_size=64)
    body = ScoreShard(job_id=job_id, shard_index=0, model="iris", version=1, batch_size=64, columns=columns,
                      source=DatasetRef(path="iris.parquet", format="parquet", row_start=0, row_end=len(x)))
    app = SimpleNamespace(mlf_context=WorkerContext(settings, "test@host"))  # what the worker's ready hook makes
    task = SimpleNamespace(request=SimpleNamespace(hostname="test@host"), app=app)
    with pytest.raises(ShardFailed, match="results store refused"):  # Celery state FAILURE, with the reason
        tasks.score_shard(task, **body.model_dump(mode="json"))
    status = store.job(job_id)
    assert status.state is JobState.FAILED and status.rows_failed == len(x)
    shard = store.shards(job_id)[0]
    assert shard["state"] == "FAILED" and "results store refused" in shard["error"]
    assert "NUL" in job_results(store, job_id).loc[0, "error"]
    store.close()
