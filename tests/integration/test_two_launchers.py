"""Two `mlf worker` launchers on one host, with the same settings: their processes have
names of their own, `mlf workers` shows all of them on every call, the second serves its
metrics on a free port and says so, and the broker's event and control binding sets do
not keep a member per killed or restarted process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest
import redis

from ml_framework.errors import JobTimeoutError
from ml_framework.settings import load_settings
from producer.client import Client
from tests.conftest import (
    MLF,
    REDIS_URL,
    check_redis,
    free_port,
    queues,
    settings_env,
    stop_workers,
)
from worker.bindings import CONTROL_TABLE, EVENTS_TABLE, node_of, prune_dead_bindings

pytestmark = pytest.mark.integration
STALE_S = 12.0
"""Heartbeat age that marks a process dead here (the launcher's default is 300 s)."""


def wait_for(predicate, what: str, logs, timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}; logs:\n" + "\n".join(
            log.read_text(errors="replace")[-2000:] for log in logs)
        time.sleep(0.2)
    return value


def test_two_launchers_on_one_host_keep_their_names_metrics_and_bindings_apart(own_pg_database, trained, digits,
                                                                                 tmp_path, caplog):
    check_redis()
    values = {"models_dir": trained[0], "var_dir": tmp_path / "var", "broker_url": REDIS_URL,
              "database_url": own_pg_database, "worker_metrics_port": free_port(), **queues("mlf.test.two.")}
    env = settings_env(values)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    client = Client(load_settings(**values))
    r = redis.Redis.from_url(REDIS_URL)

    def members(pid: int) -> list[str]:
        """Event and control binding members of launcher ``pid``'s processes."""
        return sorted(m.decode() for table in (EVENTS_TABLE, CONTROL_TABLE) for m in r.smembers(table)
                      if (node_of(m) or "").split("@")[0].endswith(f"-{pid}"))

    def launch(log) -> subprocess.Popen:
        with open(log, "wb") as sink:
            return subprocess.Popen([*MLF, "worker", "--cpu-processes", "1", "--grace", "20"], env=env,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    a = launch(logs[0])
    b = None
    try:
        wait_for(lambda: len(client.store.live_workers()) == 1, "launcher A's process", logs)
        b = launch(logs[1])
        wait_for(lambda: len(client.store.live_workers()) == 2, "both launchers' processes", logs)
        host = os.uname().nodename
        names = {f"cpu0-{a.pid}@{host}", f"cpu0-{b.pid}@{host}"}
        for _ in range(3):  # heartbeats no longer overwrite each other: every call shows both
            run = subprocess.run([*MLF, "workers", "--json"], env=env, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            assert {json.loads(line)["hostname"] for line in run.stdout.splitlines()} == names
            time.sleep(1)
        # A job sent to a queue no worker consumes: flagged by mlf queues, warned by wait.
        from demo.digits import PIXELS
        from producer.queues import list_queues

        with Client(load_settings(**{**values, "bulk_queue": values["bulk_queue"] + ".typo"})) as producer:
            job = producer.score_rows(digits.frame[PIXELS].iloc[:3], "digits-sklearn")
            with caplog.at_level("WARNING", logger="producer.client"), pytest.raises(JobTimeoutError):
                job.wait(timeout_s=8)
        assert f"job {job.id} is still PENDING: queue {values['bulk_queue']}.typo holds 1 message(s)" in caplog.text
        found = {q.name: (q.waiting, q.consumers, q.exact, q.pending_jobs) for q in list_queues(client)}
        assert found[values["bulk_queue"] + ".typo"] == (1, 0, True, [job.id])
        assert found[values["bulk_queue"]][1:3] == (2, True)  # both launchers' processes consume it
        b_log = logs[1].read_text()
        assert f"this launcher's are cpu0-{b.pid}@{host}" in b_log, b_log
        port = values["worker_metrics_port"]
        fallback = re.search(rf"port 127\.0\.0\.1:{port} is taken .* on http://127\.0\.0\.1:(\d+)/metrics", b_log)
        assert fallback, b_log
        for p in (port, int(fallback.group(1))):
            assert httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).status_code == 200

        # Gossip and control bindings: one member each per process, kept by a restart.
        wait_for(lambda: len(members(b.pid)) == 2, "launcher B's bindings", logs)
        before = members(b.pid)
        old = next(w.pid for w in client.workers() if w.hostname == f"cpu0-{b.pid}@{host}")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: any(w.pid != old for w in client.workers() if w.hostname.endswith(f"-{b.pid}@{host}")),
                 "launcher B to restart its process", logs)
        wait_for(lambda: len(r.smembers(EVENTS_TABLE)) and members(b.pid) == before, "B's rebound members", logs)
        assert members(b.pid) == before

        # Launcher B and its process killed at once (a crash): their members stay, until
        # the heartbeat says they are dead and the prune removes them; A's stay.
        os.killpg(b.pid, signal.SIGKILL)
        b.wait()
        assert members(b.pid) == before
        assert prune_dead_bindings(r, client.store, stale_s=STALE_S) == 0  # B's last beat is recent
        wait_for(lambda: f"cpu0-{b.pid}@{host}" not in client.store.live_workers(STALE_S), "B's heartbeat to age",
                 logs, 60)
        assert prune_dead_bindings(r, client.store, stale_s=STALE_S) == 2  # A beats every 5 s: it stays
        assert members(b.pid) == [] and len(members(a.pid)) == 2
    finally:
        stop_workers(a)
        if b is not None and b.poll() is None:
            os.killpg(b.pid, signal.SIGKILL)
        client.close()
        typo = values["bulk_queue"] + ".typo"
        r.delete(*r.scan_iter(f"{typo}*"), f"_kombu.binding.{typo}", f"_kombu.binding_permanent.{typo}")
    assert members(a.pid) == []  # a warm shutdown removes its own
