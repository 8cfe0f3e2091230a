"""``Job.wait`` (and so ``mlf score --wait``) notices a finished job within 100 ms."""

from __future__ import annotations

from dataclasses import replace

from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer import job as job_module
from producer.client import Client
from producer.job import Job


def test_wait_polls_often_enough_to_return_within_100_ms(tmp_path, monkeypatch):
    """The pauses between polls start at 10 ms and never exceed 50 ms, however long the
    job runs, so the call returns within 100 ms of the job finishing (regression: the
    pause grew to 2 s, and a short job's caller waited up to 2 s after it ended)."""
    with Client(load_settings(var_dir=tmp_path / "var", models_dir=tmp_path / "models")) as client:
        job_id = client.store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=1,
                                         shard_ranges=[(0, 1)], batch_size=1)
        pending = client.store.job(job_id)
        pauses: list[float] = []
        polls = iter(range(200))

        def status(self: Job):
            return pending if next(polls) < 199 else replace(pending, state=JobState.SUCCEEDED)

        monkeypatch.setattr(Job, "status", status)
        monkeypatch.setattr(job_module.time, "sleep", pauses.append)
        monkeypatch.setattr(Client, "live_workers", lambda self, max_age_s=30.0: ["w"])
        assert Job(client, job_id).wait().state is JobState.SUCCEEDED
    assert len(pauses) == 199 and pauses[0] <= 0.01 and max(pauses) <= 0.05


def _pending_job(tmp_path):
    client = Client(load_settings(var_dir=tmp_path / "var", models_dir=tmp_path / "models"))
    job_id = client.store.create_job(model="m", model_version=1, dataset="d.csv", n_rows=3,
                                     shard_ranges=[(0, 3)], batch_size=1)
    return client, Job(client, job_id)


def test_wait_gives_each_warning_once_and_its_timeout_refers_to_it(tmp_path, monkeypatch):
    """No live worker: the warning goes to ``on_warning`` once (not also to the log), and
    the timeout's error says the job waits for the reason warned, not "are workers
    running?"; a reason found only at the timeout is in the error itself."""
    import pytest

    from ml_framework.errors import JobTimeoutError

    monkeypatch.setattr(job_module, "NO_WORKER_WARNING_S", 0.0)
    client, job = _pending_job(tmp_path)
    with client:
        said: list[str] = []
        with pytest.raises(JobTimeoutError) as raised:
            job.wait(timeout_s=0.3, on_warning=said.append)
        assert len(said) == 1 and said[0].startswith(f"job {job.id} is still PENDING: no worker heartbeat"), said
        assert "as the warning above says" in str(raised.value) and "are workers running" not in str(raised.value)

        said.clear()
        with pytest.raises(JobTimeoutError) as raised:  # the caller warned already (mlf score)
            job.wait(timeout_s=0.3, warned="no worker heartbeat ...", on_warning=said.append)
        assert said == [] and "as the warning above says" in str(raised.value)

        monkeypatch.setattr(job_module, "NO_WORKER_WARNING_S", 60.0)  # the timeout comes first
        with pytest.raises(JobTimeoutError) as raised:
            job.wait(timeout_s=0.2, on_warning=said.append)
        assert said == [] and "(0/3 rows): no worker heartbeat in the last 30 s" in str(raised.value)
