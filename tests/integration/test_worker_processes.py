"""`mlf worker --cpu-processes 2` as an operator runs it: both processes take shards,
models are preloaded, telemetry reaches `mlf workers`, and a child killed with SIGKILL
mid-shard is restarted by the launcher while its shard is redone once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from tests.conftest import MLF, REDIS_URL, check_redis, queues, settings_env, stop_workers

pytestmark = pytest.mark.integration
VISIBILITY_TIMEOUT_S = 8


def wait_for(predicate, timeout_s: float, what: str, log) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}; worker log:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    return value


def test_two_cpu_processes_share_a_job_and_a_killed_one_is_restarted(request, trained, data_dir, digits, tmp_path):
    big = data_dir / "digits_x4.csv"
    if not big.exists():
        pd.concat([digits.frame] * 4, ignore_index=True).to_csv(big, index=False)
    check_redis()
    values = {
        "models_dir": trained[0], "data_dir": data_dir, "var_dir": tmp_path, "shard_size": 600,
        **queues("mlf.test.procs."), "broker_url": REDIS_URL,
        "database_url": request.getfixturevalue("own_pg_database"),
        "task_time_limit_s": VISIBILITY_TIMEOUT_S - 1, "broker_visibility_timeout_s": VISIBILITY_TIMEOUT_S,
    }
    env = settings_env(values)
    log = tmp_path / "workers.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([*MLF, "worker", "--cpu-processes", "2", "--preload", "digits-torch", "--grace", "20"],
                                env=env, stdout=sink, stderr=subprocess.STDOUT)
    client = Client(load_settings(**values))
    try:
        # Preloaded before the first shard: both heartbeats list the model with no job submitted.
        def preloaded():
            beats = client.workers()
            return beats if len(beats) == 2 and all(w.models == ["digits-torch/1"] for w in beats) else None

        workers = wait_for(preloaded, 120, "two workers with digits-torch preloaded", log)
        assert sorted(w.hostname.split("@")[0] for w in workers) == [f"cpu0-{proc.pid}", f"cpu1-{proc.pid}"]
        assert all(w.threads == max(1, (os.cpu_count() or 1) // 2) and w.rss_bytes > 0 for w in workers)
        assert all(w.device_uuid is None for w in workers)  # CPU processes: no GPU telemetry

        job = client.score_dataset(big, "digits-torch", batch_size=1)
        shards = lambda: client.store.shards(job.id)  # noqa: E731
        # Both processes take shards, then kill cpu1 while it runs one.
        wait_for(lambda: {s["worker"].split("-")[0] for s in shards() if s["worker"]} >= {"cpu0", "cpu1"},
                 120, "both processes to take shards", log)
        victim = wait_for(lambda: next((s for s in shards() if s["state"] == "RUNNING"
                                        and s["worker"].startswith("cpu1-")), None), 120, "cpu1 running a shard", log)
        old_pid = next(w.pid for w in client.workers() if w.hostname == victim["worker"])
        os.kill(old_pid, signal.SIGKILL)
        # The launcher restarts the child under the same name, with a new pid.
        wait_for(lambda: any(w.hostname == victim["worker"] and w.pid != old_pid for w in client.workers()),
                 120, "the launcher to restart cpu1", log)

        status = job.wait(timeout_s=300)
        n = 4 * len(digits.frame)
        results = job.results()
        duplicates = int(results.index.duplicated().sum())
        print(f"kill -9 result: rows expected {n}, rows found {len(results)}, duplicates {duplicates}, "
              f"killed shard attempts {client.store.shards(job.id)[victim['shard_index']]['attempts']}")
        assert status.state is JobState.SUCCEEDED, log.read_text()[-3000:]
        assert (status.rows_ok, status.rows_failed, len(results), duplicates) == (n, 0, n, 0)
        assert client.store.shards(job.id)[victim["shard_index"]]["attempts"] >= 2
        assert proc.poll() is None, "the launcher itself must survive a child's death"

        # Telemetry as an operator reads it.
        run = subprocess.run([*MLF, "workers", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        beats = {b["hostname"].split("-")[0]: b for b in map(json.loads, run.stdout.splitlines())}
        assert set(beats) == {"cpu0", "cpu1"}
        wait_for(lambda: sum(w.rows_done for w in client.workers()) > 0, 30, "rows_done in heartbeats", log)
        table = subprocess.run([*MLF, "workers"], env=env, capture_output=True, text=True, timeout=60)
        assert "digits-torch/1" in table.stdout and "CPU (" in table.stdout, table.stdout
    finally:
        stop_workers(proc)
        client.close()
    assert "restarting in" in log.read_text()
