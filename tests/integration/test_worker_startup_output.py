"""`mlf worker` as a user starts it: one line per worker process once it is ready, and none
of Celery's banner or its warning about running as root."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.integration
PROCESSES = 2
READY_TIMEOUT_S = 180


def test_each_worker_process_says_one_line_when_ready(tmp_path):
    """Two processes: two `worker cpu<i>@host ready: device cpu ..., queues ..., models ...`
    lines, naming the broker and store once before them; no banner, no root warning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update(ML_FRAMEWORK_VAR_DIR=str(tmp_path / "var"), ML_FRAMEWORK_MODELS_DIR=str(tmp_path / "models"),
               ML_FRAMEWORK_WORKER_METRICS_PORT="0")
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--processes", str(PROCESSES)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while sum(" ready: " in line for line in seen) < PROCESSES:
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        time.sleep(2)  # anything a process prints right after it is ready
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    host = os.uname().nodename
    ready = sorted(line.split(" - INFO - ", 1)[1].strip() for line in seen if " ready: " in line)
    assert len(ready) == PROCESSES, output
    for i, line in enumerate(ready):
        pattern = rf"worker cpu{i}-\d+@{re.escape(host)} ready: device cpu \(\d+ threads?\), queues mlf.online, mlf.bulk, models none yet"
        assert re.fullmatch(pattern, line), output
    assert output.count("broker: embedded SQLite (") == 1 and "results store: sqlite:///" in output
    for noise in ("[queues]", "[tasks]", "-------------- ", "superuser privileges", ".> transport:"):
        assert noise not in output, output
