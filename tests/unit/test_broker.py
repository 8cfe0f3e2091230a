"""The embedded SQLite broker under concurrent first use by several processes."""

from __future__ import annotations

import subprocess
import sys
import time

DECLARE = """
import sys, time
from kombu import Connection, Queue
import ml_framework.broker
url, queue, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < start:
    pass
with Connection(url) as conn:
    Queue(queue, channel=conn.channel()).declare()
print("ok")
"""


def race(url: str, queue: str, processes: int = 6) -> list[subprocess.CompletedProcess]:
    start = time.time() + 3  # every process past its imports, then all at once
    procs = [subprocess.Popen([sys.executable, "-c", DECLARE, url, queue, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    return [(p, *p.communicate(timeout=60)) for p in procs]


def test_processes_racing_on_a_fresh_broker_file_all_start(tmp_path):
    """Six processes creating the broker tables and a queue at the same instant all succeed."""
    url = f"mlfsqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    for queue in ("q-fresh-file", "q-existing-file"):
        results = race(url, queue)
        failures = [err[-400:] for p, _out, err in results if p.returncode != 0]
        assert failures == [], failures
