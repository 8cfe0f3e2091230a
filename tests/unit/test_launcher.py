"""The worker launcher's plan: process count, thread split and per-child environment."""

from __future__ import annotations

from ml_framework.settings import load_settings
from worker.launcher import plan_children


def test_one_process_per_core_threads_split():
    """Default: one process per core, processes x threads = cores, distinct node names."""
    children = plan_children(load_settings(), cores=8)
    assert len(children) == 8
    assert {c.env["OMP_NUM_THREADS"] for c in children} == {"1"}
    assert len({c.name for c in children}) == 8 and children[0].name.startswith("cpu0-")


def test_two_launchers_on_one_host_name_their_processes_apart():
    """Node names carry the launcher's id (its pid by default), after the device: two
    `mlf worker` on one host no longer both start cpu0@host and overwrite each other's
    heartbeats. An explicit --name replaces the pid; a name that cannot go into a node
    name is refused."""
    import os

    import pytest

    host = os.uname().nodename
    first = [c.name for c in plan_children(load_settings(), processes=2)]
    assert first == [f"cpu0-{os.getpid()}@{host}", f"cpu1-{os.getpid()}@{host}"]
    second = [c.name for c in plan_children(load_settings(), processes=2, launcher_id="blue")]
    assert second == [f"cpu0-blue@{host}", f"cpu1-blue@{host}"]
    children = plan_children(load_settings(), processes=1, launcher_id="blue")
    assert children[0].argv[children[0].argv.index("-n") + 1] == f"cpu0-blue@{host}"
    for bad in ("a@b", "a-b", "", "x" * 41):
        with pytest.raises(ValueError, match="launcher name"):
            plan_children(load_settings(), processes=1, launcher_id=bad)


def test_a_taken_metrics_port_falls_back_to_a_free_one(tmp_path, caplog):
    """A second launcher on one host finds the metrics port taken: it serves its metrics
    on a free port and says which, instead of running without metrics."""
    import socket

    import httpx

    from worker.launcher import Supervisor

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = Supervisor([], grace_s=1)
        with caplog.at_level("WARNING", logger="worker.launcher"):
            sup._serve_metrics("127.0.0.1", port)
        try:
            assert sup.metrics_port not in (None, port)
            assert httpx.get(f"http://127.0.0.1:{sup.metrics_port}/metrics", timeout=10).status_code == 200
            assert f"port 127.0.0.1:{port} is taken" in caplog.text
            assert f"http://127.0.0.1:{sup.metrics_port}/metrics" in caplog.text
        finally:
            sup.shutdown()


def test_explicit_processes_get_the_remaining_threads():
    """Two processes on 8 cores get 4 framework threads each, and no GPU."""
    children = plan_children(load_settings(), processes=2, cores=8)
    for c in children:
        assert c.env["ML_FRAMEWORK_WORKER_THREADS"] == "4" == c.env["TF_NUM_INTRAOP_THREADS"]
        assert c.env["CUDA_VISIBLE_DEVICES"] == ""
        assert c.argv[c.argv.index("--pool") + 1] == "threads"  # the consumer thread beats while a shard runs
        assert c.argv[c.argv.index("--concurrency") + 1] == "1"


def test_embedded_broker_disables_broadcast_features():
    """The SQLite transport has no fanout, so mingle/gossip/heartbeat are off; Redis keeps them."""
    embedded = plan_children(load_settings(), processes=1)[0].argv
    assert "--without-mingle" in embedded
    redis = plan_children(load_settings(broker_url="redis://127.0.0.1:6379/0"), processes=1)[0].argv
    assert "--without-mingle" not in redis
    assert redis[redis.index("-Q") + 1] == "mlf.online,mlf.bulk"  # online requests first


POLL_S = 0.02
"""How often the tests look at their child processes' progress, seconds."""

SUPERVISE = """
import os, sys
from worker.launcher import ChildSpec, Supervisor
log = sys.argv[1]
crash = ChildSpec("crash@t", [sys.executable, "-c", f"open({log!r}, 'a').write('start\\\\n')"], dict(os.environ))
stay = ChildSpec("stay@t", [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ))
sys.exit(Supervisor([crash, stay], grace_s=5).run())
"""


def test_supervisor_restarts_dead_children_and_stops_on_sigterm(tmp_path):
    """A child that exits is started again (with backoff); SIGTERM stops every child."""
    import signal
    import subprocess
    import sys
    import time

    log = tmp_path / "starts.log"
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISE, str(log)])
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().count("start") >= 2):
        assert time.monotonic() < deadline and sup.poll() is None
        time.sleep(POLL_S)
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


ORPHAN = """
import os, sys
from worker.launcher import ChildSpec, Supervisor
pid_file = sys.argv[1]
code = f"import os, time; open({pid_file!r}, 'w').write(str(os.getpid())); time.sleep(600)"
sys.exit(Supervisor([ChildSpec("stay@t", [sys.executable, "-c", code], dict(os.environ))]).run())
"""


def test_children_die_with_a_killed_supervisor(tmp_path):
    """SIGKILL of `mlf worker` itself takes its children down (no unsupervised orphans)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    sup = subprocess.Popen([sys.executable, "-c", ORPHAN, str(pid_file)])
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    child = int(pid_file.read_text())
    sup.send_signal(signal.SIGKILL)
    sup.wait(timeout=10)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("child outlived its killed supervisor")
        time.sleep(POLL_S)


HUNG = """
import os, sys, time
from worker.launcher import ChildSpec, Supervisor
log = sys.argv[1]
# each start logs a line, marks a task begun now, and hangs in C holding the GIL
code = (f"import ctypes, os; open({log!r}, 'a').write('start\\\\n'); from worker import watchdog; "
        "watchdog.begin(f'hung@t:{os.getpid()}'); ctypes.PyDLL(None).sleep(600)")
hang = lambda store: time.sleep(600)  # a results store / broker that never answers
sup = Supervisor([ChildSpec("hung@t", [sys.executable, "-c", code], dict(os.environ))], grace_s=2,
                 time_limit_s=1, store_url="postgresql+psycopg://nobody@192.0.2.1/none",
                 reconcile=hang, reconcile_interval_s=0.1)
sys.exit(sup.run())
"""


def test_the_time_limit_kills_a_task_stuck_in_c_even_while_the_store_hangs(tmp_path):
    """A task sleeping in C with the GIL held is killed at the 1 s limit and its process
    started again, over and over, while the reconciler and the store calls (an address
    that never answers) hang: they run off the supervisor's loop (regression: the loop
    called them inline and stopped enforcing the limit)."""
    import signal
    import subprocess
    import sys
    import time

    log = tmp_path / "starts.log"
    sup = subprocess.Popen([sys.executable, "-c", HUNG, str(log)])
    try:
        deadline = time.monotonic() + 40
        while not (log.exists() and log.read_text().count("start") >= 3):
            assert time.monotonic() < deadline and sup.poll() is None, log.read_text() if log.exists() else "no start"
            time.sleep(POLL_S)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0  # the hung store call does not hold the exit either
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def test_terminate_stops_several_processes_at_once_killing_those_that_ignore_sigterm(caplog):
    """terminate SIGTERMs every process given, waits one grace period for them all, then
    SIGKILLs the one that ignores SIGTERM, naming it (the supervisor's shutdown uses it)."""
    import logging
    import signal
    import subprocess
    import sys

    from worker.launcher import terminate

    stubborn = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    polite = "import sys, time; print('ready', flush=True); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for code in (stubborn, polite)]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"  # the handler is in place before the signal
        with caplog.at_level(logging.WARNING, logger="worker.launcher"):
            codes = terminate(*procs, grace_s=1.0, names=["stubborn@t", "polite@t"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
    assert codes == [-signal.SIGKILL, -signal.SIGTERM]
    assert [r.getMessage() for r in caplog.records] == ["worker stubborn@t did not stop within 1 s; killing it"]
