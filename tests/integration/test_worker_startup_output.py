"""`mlf worker` as a user starts it: one line per worker process once it is ready, and none
of Celery's banner or its warning about running as root."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
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



def test_an_unreachable_broker_stops_the_launcher_at_once(tmp_path):
    """`python -m worker` with a Redis broker on a closed port: one `error: cannot reach the
    broker at <masked URL>` line and exit 1 within seconds, no process started (Celery's
    own connection retries took many minutes), and no misleading store log line."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update(ML_FRAMEWORK_VAR_DIR=str(tmp_path / "var"), ML_FRAMEWORK_MODELS_DIR=str(tmp_path / "models"),
               ML_FRAMEWORK_WORKER_METRICS_PORT="0", ML_FRAMEWORK_BROKER_URL=f"redis://:s3cretpw@127.0.0.1:{port}/3")
    run = subprocess.run([sys.executable, "-m", "worker", "--processes", "1"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"error: cannot reach the broker at redis://:**********@127.0.0.1:{port}/3: "), output
    assert "No worker process was started." in errors[0]
    for absent in ("s3cretpw", "starting ", " ready: ", "results store:", "OperationalError", "note:"):
        assert absent not in output, output

IDLE_STOP_S = 2.0
"""Bound of an idle worker set's stop on SIGTERM, seconds: the target. Measured 0.2 to 0.6 s
on a loaded 2-core machine (2.5 to 5.8 s before the launcher and the embedded broker's
drain stopped waiting on timers)."""


def start_and_wait_ready(env: dict[str, str], cwd, processes: int):
    """``python -m worker --processes N`` and its output lines, once every process said it
    is ready (the event the test waits for, rather than a fixed sleep)."""
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--processes", str(processes)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    while sum(" ready: " in line for line in seen) < processes:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("".join(seen))
        with contextlib.suppress(queue.Empty):
            seen.append(lines.get(timeout=1))
    return proc, lines, seen


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_an_idle_worker_set_stops_at_once_and_quietly(tmp_path, broker):
    """SIGTERM to an idle `mlf worker` of two processes: it exits within IDLE_STOP_S, and
    says only the launcher's two lines (no `worker: Warm shutdown (MainProcess)` nor a
    blank line per process: Celery's notices are DEBUG records)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update(ML_FRAMEWORK_VAR_DIR=str(tmp_path / "var"), ML_FRAMEWORK_MODELS_DIR=str(tmp_path / "models"),
               ML_FRAMEWORK_WORKER_METRICS_PORT="0")
    if broker == "redis":
        from tests.conftest import REDIS_URL, check_redis, queues

        check_redis()
        env.update(ML_FRAMEWORK_BROKER_URL=REDIS_URL,
                   **{f"ML_FRAMEWORK_{k.upper()}": v for k, v in queues("mlf.idle-stop.").items()})
    proc, lines, seen = start_and_wait_ready(env, tmp_path, PROCESSES)
    time.sleep(1)  # idle: the processes are polling their broker
    while not lines.empty():
        seen.append(lines.get())
    before = len(seen)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        took = time.monotonic() - started
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)  # the reader thread takes the last lines
    while not lines.empty():
        seen.append(lines.get())
    after = seen[before:]
    print(f"{broker}: idle worker set of {PROCESSES} stopped in {took:.2f} s")
    assert proc.returncode == 0, "".join(seen)
    assert took < IDLE_STOP_S, "".join(after)
    assert [line.split(" - ", 3)[-1].strip() for line in after] == [
        f"received SIGTERM: warm shutdown of {PROCESSES} worker(s)", "all workers stopped"], "".join(after)
