"""Operators' commands: `mlf workers --self` (the worker containers' health check) reads
this host's own heartbeats; `mlf api-key` makes a key whose hash the settings accept."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from ml_framework.settings import load_settings
from ml_framework.store import ResultStore, WorkerInfo
from ml_framework.store.models import WorkerRow

HOST = os.uname().nodename


def mlf(tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``mlf ARGS`` in a new process, its settings only a ``var_dir`` under ``tmp_path`` (plus ``env``)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ML_FRAMEWORK_", "MLF_API"))}, **(env or {})}
    env["ML_FRAMEWORK_VAR_DIR"] = str(tmp_path / "var")
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)


def beat(store: ResultStore, name: str, age_s: float) -> None:
    store.heartbeat(WorkerInfo(hostname=name, pid=1, started_at=datetime.now(UTC)))
    with store.engine.begin() as conn:
        conn.execute(update(WorkerRow).where(WorkerRow.hostname == name)
                     .values(last_seen_at=datetime.now(UTC) - timedelta(seconds=age_s)))


def test_workers_self_is_healthy_only_while_every_own_process_beats(tmp_path):
    """No heartbeat of this host: 1. Fresh ones: 0, listing them. One of this host's
    processes silent for a minute: 1, naming it. Other hosts' heartbeats, and this host's
    from an earlier run (over five minutes old), do not count."""
    store = ResultStore(load_settings(var_dir=tmp_path / "var").effective_database_url)
    try:
        beat(store, "cpu0@another-host", 0)
        run = mlf(tmp_path, "workers", "--self")
        assert run.returncode == 1 and f"no worker heartbeat from {HOST}" in run.stderr
        beat(store, f"cpu0@{HOST}", 2)
        beat(store, f"cpu1@{HOST}", 4)
        beat(store, f"gpu0@{HOST}", 3600)  # a process of an earlier run of this container
        run = mlf(tmp_path, "workers", "--self")
        assert run.returncode == 0, run.stderr
        assert f"cpu0@{HOST}: heartbeat" in run.stdout and f"cpu1@{HOST}" in run.stdout and "gpu0" not in run.stdout
        beat(store, f"cpu1@{HOST}", 60)
        run = mlf(tmp_path, "workers", "--self")
        assert run.returncode == 1 and f"cpu1@{HOST}" in run.stderr and f"cpu0@{HOST}" not in run.stderr
    finally:
        store.close()


def test_api_key_prints_a_key_and_the_hash_the_settings_take(tmp_path):
    """The key printed hashes to the entry printed; that entry and the role configure it."""
    run = mlf(tmp_path, "api-key", "prometheus", "--role", "metrics")
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines())
    key = lines["key"].strip()
    entry = lines["api_keys"].split()[0]
    assert entry == "prometheus=sha256:" + hashlib.sha256(key.encode()).hexdigest() and len(key) >= 32
    roles = lines["api_key_roles"].split()[0]
    settings = load_settings(api_keys=entry, api_key_roles=roles, deployment="production")
    assert settings.api_key_roles == {"prometheus": "metrics"}
    assert mlf(tmp_path, "api-key", "bad name").returncode == 2
