"""Two hosts that share nothing but Redis, PostgreSQL and the object store (issue 18).

Each "host" is a working directory of its own, as on two machines: its own
``configs/development.yaml``, its own model repository (the same model published into
each with ``mlf models add``, as an operator deploys it), its own ``var``, log and empty
data directories, and one ``mlf worker`` launcher started there with the object store's
credentials in its environment. The producer runs ``mlf score`` in a third directory,
whose model repository holds the model's manifest only (what planning a job reads).
A job's shards spread over both launchers; one launcher is killed with its process
(SIGKILL of its process group: the host is gone) while it runs a shard; the other host
redoes that shard and the job still ends with every row recorded exactly once.

The only things the directories have in common are the broker, the results database,
the object store, and the code installed on each host (this checkout, on ``PYTHONPATH``:
the test model's class lives in :mod:`tests.fault_models`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client
from tests.conftest import MLF, REDIS_URL, check_redis, queues, settings_env, stop_workers
from tests.faults.conftest import report, shard_rows_match, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODEL = "slow"
COPIES = 3
"""Copies of the digits (1,797 rows each) in the dataset."""
SHARD_SIZE = 300
BATCH_SIZE = 50
DELAY_S = 0.15
"""Seconds the model sleeps per batch: a shard of 6 batches takes 0.9 s and more, the job
of 18 shards several seconds on two processes, so the kill lands mid-job and mid-shard."""
TIME_LIMIT_S = 20
VISIBILITY_S = 22
"""The dead host's unacknowledged shards go back to the queue after this many seconds
(it must exceed the time limit); the same on every worker host."""


def s3_dataset(frame: pd.DataFrame, producer: Path, s3) -> tuple[str, dict[str, str]]:
    """The dataset as a CSV object in the object store: the producer reads its schema
    there and sends references, which each host's workers read with their own
    credentials. Returns ``(the object's URI, the producer's S3 environment)``."""
    local = producer / "digits.csv"
    frame.to_csv(local, index=False)
    return s3.upload(local, f"s3://mlf-data/two-hosts/{uuid.uuid4().hex[:8]}/digits.csv"), s3.env


def write_config(directory: Path, values: dict) -> None:
    """``directory/configs/development.yaml`` holding ``values``: what ``mlf`` reads when
    started in ``directory`` (relative paths are relative to it)."""
    (directory / "configs").mkdir(parents=True)
    (directory / "configs" / "development.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")


def release(digits, directory: Path) -> tuple[Path, Path]:
    """A model release as an operator receives it: ``(artifact, manifest)`` of a
    :class:`~tests.fault_models.Slow` logistic regression over the 64 digits pixels."""
    from demo.digits import PIXELS
    from tests import fault_models as fm
    from worker.export import export_sklearn

    model = fm.fit(fm.Slow, digits.frame[PIXELS].to_numpy(), digits.frame["label"].to_numpy(), delay_s=DELAY_S)
    export_sklearn(model, directory, MODEL, inputs={"columns": PIXELS})
    return directory / MODEL / "1" / "model.skops", directory / MODEL / "1" / "manifest.yaml"


def test_a_host_killed_mid_job_leaves_every_row_recorded_once(own_pg_database, s3_server, digits, tmp_path):
    """Shards of one job run on two hosts; the host killed mid-shard has that shard redone
    by the other, its finished shards kept: SUCCEEDED, every row once, no gap."""
    check_redis()
    shared = {"broker_url": REDIS_URL, "database_url": own_pg_database, **queues("mlf.fault.hosts.")}
    base_env = settings_env()
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base_env.get("PYTHONPATH")]))
    host_env = {**base_env, **s3_server.env}
    artifact, manifest = release(digits, tmp_path / "release")

    hosts = {name: tmp_path / name for name in ("hosta", "hostb")}
    adds = []
    for directory in hosts.values():
        write_config(directory, {**shared, "models_dir": "models", "data_dir": "data", "var_dir": "var",
                                 "log_dir": "logs", "worker_metrics_port": 0, "task_time_limit_s": TIME_LIMIT_S,
                                 "broker_visibility_timeout_s": VISIBILITY_S, "reconcile_interval_s": 5})
        (directory / "data").mkdir()
        adds.append(subprocess.Popen([*MLF, "models", "add", str(artifact), "--manifest", str(manifest)],
                                     cwd=directory, env=host_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True))
    for add in adds:
        out = add.communicate(timeout=120)[0]
        assert add.returncode == 0 and f"added {MODEL}/1" in out, out

    logs = {name: directory / "launcher.log" for name, directory in hosts.items()}
    nodes = {name: f"cpu0-{name}@{os.uname().nodename}" for name in hosts}

    def tails() -> str:
        return "\n".join(f"--- {name}\n" + log.read_text(errors="replace")[-2000:]
                         for name, log in logs.items() if log.exists())

    def launch(name: str) -> subprocess.Popen:
        with open(logs[name], "wb") as sink:
            return subprocess.Popen([*MLF, "worker", "--cpu-processes", "1", "--name", name, "--preload", MODEL,
                                     "--grace", "20"],
                                    cwd=hosts[name], env=host_env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    launchers = {name: launch(name) for name in hosts}
    client = Client(load_settings(**shared))
    try:
        producer = tmp_path / "producer"  # plans jobs from the manifests alone: it gets no artifact
        write_config(producer, {**shared, "models_dir": "models", "data_dir": "data", "var_dir": "var",
                                "shard_size": SHARD_SIZE})
        (producer / "data").mkdir()
        (producer / "models" / MODEL / "1").mkdir(parents=True)
        shutil.copy(hosts["hosta"] / "models" / MODEL / "1" / "manifest.yaml", producer / "models" / MODEL / "1")
        frame = pd.concat([digits.frame] * COPIES, ignore_index=True)
        n = len(frame)
        source, producer_env = s3_dataset(frame, producer, s3_server)

        def ready() -> bool:  # the model is loaded first: a cold start counts against the time limit
            beats = client.workers()
            return {w.hostname for w in beats} == set(nodes.values()) and all(w.models == [f"{MODEL}/1"]
                                                                             for w in beats)

        wait_until(ready, 120, lambda: f"both hosts' worker processes, {MODEL} loaded; logs:\n{tails()}", 0.2)
        score = subprocess.run([*MLF, "score", source, "--model", MODEL, "--batch-size", str(BATCH_SIZE)],
                               cwd=producer, env={**base_env, **producer_env}, capture_output=True, text=True,
                               timeout=120)
        assert score.returncode == 0, score.stderr
        job = client.get_job(score.stdout.strip())
        victim = nodes["hostb"]

        def victim_mid_job() -> list[dict] | None:
            """The shards, once host B has recorded one and has just started another."""
            shards = client.store.shards(job.id)
            running = any(s["state"] == "RUNNING" and s["worker"] == victim for s in shards)
            done = any(s["state"] == "DONE" and s["worker"] == victim for s in shards)
            return shards if running and done else None

        before = wait_until(victim_mid_job, 120, lambda: f"host B mid-job; logs:\n{tails()}")
        os.killpg(launchers["hostb"].pid, signal.SIGKILL)
        launchers["hostb"].wait()
        killed_at = time.monotonic()
        at_kill = client.store.shards(job.id)  # B's shards cannot change now
        hit = [s for s in at_kill if s["state"] == "RUNNING" and s["worker"] == victim]
        assert len(hit) == 1, at_kill  # killed mid-shard
        assert sum(s["state"] != "DONE" for s in before) > 1, before  # mid-job: more than B's shard was left

        status = job.wait(timeout_s=120)
        recover_s = time.monotonic() - killed_at
        found, dups = report("SIGKILL one of two hosts mid-job (redis)", client.store, job.id, n, recover_s,
                             status.state.value)
        shards = client.store.shards(job.id)
        assert status.state is JobState.SUCCEEDED, (shards, tails())
        assert (status.rows_ok, status.rows_failed, found, dups) == (n, 0, n, 0)
        assert not shard_rows_match(client.store, job.id)  # each shard's rows are its range: no gap
        assert list(job.results().index) == list(range(n))
        assert {s["worker"] for s in shards} == set(nodes.values())  # the job ran on both hosts
        by_index = {s["shard_index"]: s for s in shards}
        redone = by_index[hit[0]["shard_index"]]
        assert (redone["worker"], redone["attempts"]) == (nodes["hosta"], 2), redone
        kept = [s["shard_index"] for s in at_kill if s["state"] == "DONE" and s["worker"] == victim]
        assert all(by_index[i]["worker"] == victim and by_index[i]["attempts"] == 1 for i in kept), shards
    finally:
        stop_workers(launchers["hosta"])
        if launchers["hostb"].poll() is None:
            os.killpg(launchers["hostb"].pid, signal.SIGKILL)
        client.close()
    for name, directory in hosts.items():  # each host wrote only into its own directory
        assert (directory / "logs" / "ml_framework.log").is_file(), name
        assert list((directory / "data").iterdir()) == [], name
