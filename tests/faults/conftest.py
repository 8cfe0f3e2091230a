"""Fixtures of the fault suite: misbehaving models, private servers to restart, worker
sets with their own settings, and the report table (fault, rows expected / found /
duplicated, time to recover) printed at the end of the run.

The suite runs real worker processes (``python -m worker``), a real broker (Redis; RabbitMQ
for the faults the issue names) and real PostgreSQL. Servers that a test restarts are the
test's own (a ``redis-server`` or a PostgreSQL cluster on a free port), never the shared
ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ml_framework.store.outputs import decode
from producer.results import job_results
from tests.conftest import (
    RABBITMQ_URL,
    REDIS_URL,
    check_rabbitmq,
    check_redis,
    free_port,
    queues,
    service_unavailable,
    start_workers,
    stop_workers,
)

WAIT_S = 240


@dataclass
class FaultRow:
    """One line of the fault table."""

    fault: str
    expected: int
    found: int
    duplicates: int
    recover_s: float | None
    outcome: str


_REPORT: list[FaultRow] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fault table after the run (also written to ``$MLF_FAULT_REPORT`` if set)."""
    if not _REPORT:
        return
    lines = ["| fault | rows expected | rows found | duplicates | time to recover (s) | outcome |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r.fault} | {r.expected} | {r.found} | {r.duplicates} | "
              f"{'-' if r.recover_s is None else f'{r.recover_s:.1f}'} | {r.outcome} |" for r in _REPORT]
    terminalreporter.write_sep("=", "fault suite")
    for line in lines:
        terminalreporter.write_line(line)
    if os.environ.get("MLF_FAULT_REPORT"):
        Path(os.environ["MLF_FAULT_REPORT"]).write_text("\n".join(lines) + "\n", encoding="utf-8")


def rows_recorded(store, job_id: str) -> tuple[int, int]:
    """``(rows recorded, duplicated rows)`` of a job: the rows of every stored shard output
    plus row errors, and how many row numbers appear more than once across both."""
    rows = job_results(store, job_id).index
    return len(rows), len(rows) - rows.nunique()


def shard_rows_match(store, job_id: str) -> list[str]:
    """Shards whose recorded rows differ from their range or their counters (a shard
    marked done without its rows); empty when every shard is whole."""
    bad = []
    with store.engine.connect() as conn:
        for s in store.shards(job_id):
            if s["state"] not in ("DONE", "FAILED"):
                continue
            blob = conn.execute(text("SELECT data FROM shard_outputs WHERE job_id = :j AND shard_index = :s"),
                                {"j": job_id, "s": s["shard_index"]}).scalar_one_or_none()
            ok_rows = [] if blob is None else decode(blob).column("row").to_pylist()
            failed_rows = conn.execute(
                text("SELECT row_index FROM row_errors WHERE job_id = :j AND shard_index = :s"),
                {"j": job_id, "s": s["shard_index"]}).scalars().all()
            ok, failed = len(ok_rows), len(failed_rows)
            if ((ok, failed) != (s["rows_ok"], s["rows_failed"])
                    or sorted(ok_rows + failed_rows) != list(range(s["row_start"], s["row_end"]))):
                bad.append(f"shard {s['shard_index']}: {ok} results + {failed} errors for rows "
                           f"{s['row_start']}-{s['row_end']} (counters {s['rows_ok']}/{s['rows_failed']})")
    return bad


def report(fault: str, store, job_id: str, expected: int, recover_s: float | None, outcome: str) -> tuple[int, int]:
    """Add a job's line to the fault table; returns ``(rows found, duplicates)``."""
    found, dups = rows_recorded(store, job_id)
    _REPORT.append(FaultRow(fault, expected, found, dups, recover_s, outcome))
    return found, dups


# ---------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def fault_models(trained, digits) -> dict[str, str]:
    """Publish the misbehaving models of :mod:`tests.fault_models` into the session's
    model repository; returns ``{kind: model name}``."""
    from demo.digits import PIXELS
    from ml_framework.manifest import ModelRepository
    from tests import fault_models as fm
    from worker.export import export_sklearn

    x = digits.frame[PIXELS].to_numpy()
    y = digits.frame["label"].to_numpy()
    names = {"kill": ("fault-kill", fm.KillsItsWorker, {}), "hang": ("fault-hang", fm.HangsInNativeCode, {}),
             "slow": ("fault-slow", fm.Slow, {"delay_s": 0.1})}
    repo = ModelRepository(trained[0])
    for name, cls, attrs in names.values():
        if not repo.versions(name):
            export_sklearn(fm.fit(cls, x, y, **attrs), trained[0], name, inputs={"columns": PIXELS})
    return {kind: name for kind, (name, _, _) in names.items()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A model repository holding ``lr``: a logistic regression over columns ``a`` and
    ``b`` (float64), and ``lr-tensor``, the same model over one column ``v`` holding both
    values as a tensor, for the bad-input tests that need a model but no worker."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from worker.export import export_sklearn

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    models = tmp_path_factory.mktemp("models")
    clf = LogisticRegression().fit(x, (x.sum(axis=1) > 0).astype(int))
    export_sklearn(clf, models, "lr", inputs={"columns": ["a", "b"]})
    export_sklearn(clf, models, "lr-tensor", inputs={"kind": "tensor", "columns": ["v"], "shape": [2]})
    return models


def marked_csv(data_dir: Path, digits, name: str, marked_rows: list[int], copies: int = 1) -> Path:
    """``copies`` x the digits as a CSV under ``data_dir`` whose ``marked_rows`` carry the
    fault marker in ``pixel_0``."""
    import pandas as pd

    from tests.fault_models import MARKER

    path = data_dir / name
    frame = pd.concat([digits.frame] * copies, ignore_index=True)
    frame.loc[marked_rows, "pixel_0"] = MARKER
    frame.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------- workers
@dataclass
class Workers:
    """A worker set with its own settings, and a client configured like it."""

    values: dict[str, Any]
    client: Any
    log: Path
    proc: subprocess.Popen | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self, processes: int = 2) -> None:
        self.proc = start_workers(self.values, self.log, processes)
        deadline = time.monotonic() + 120
        while len(self.client.store.live_workers()) < processes:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.2)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def diagnose(self, job_id: str) -> str:
        """What a failure message needs to explain a job that did not end: its shard
        ledger, the heartbeats, the embedded broker's messages (when it runs on one) and
        the worker log's tail."""
        import sqlite3

        lines = ["shards:", *map(str, self.client.store.shards(job_id)),
                 "workers:", *(str(w) for w in self.client.store.workers(None))]
        broker = self.client.settings.var_dir / "broker.sqlite"
        if self.client.settings.embedded_broker and broker.exists():
            with contextlib.closing(sqlite3.connect(broker, timeout=30)) as con:
                lines += ["broker messages (id, queue, visible, timestamp):",
                          *map(str, con.execute("SELECT m.id, q.name, m.visible, m.timestamp FROM kombu_message m "
                                                "JOIN kombu_queue q ON q.id = m.queue_id").fetchall())]
        return "\n".join([*lines, "log:", self.tail(12000)])

    def stop(self) -> None:
        if self.proc is not None:
            stop_workers(self.proc)
            self.proc = None


def broker_url(kind: str) -> str:
    """The shared broker of ``kind`` (``redis`` or ``rabbitmq``), skipping (or failing
    under CI) when it is down."""
    if kind == "redis":
        check_redis()
        return REDIS_URL
    check_rabbitmq()
    return RABBITMQ_URL


@pytest.fixture()
def make_workers(trained, data_dir, tmp_path, own_pg_database) -> Iterator:
    """``make_workers(broker_url=..., **settings)`` -> :class:`Workers` (not started) on
    PostgreSQL; every set is stopped after the test."""
    from ml_framework.settings import load_settings
    from producer.client import Client

    made: list[Workers] = []

    def make(**overrides: Any) -> Workers:
        values: dict[str, Any] = {
            "models_dir": trained[0], "data_dir": data_dir, "var_dir": tmp_path / f"var{len(made)}",
            **queues("mlf.fault."), "database_url": own_pg_database, "broker_url": REDIS_URL,
            "worker_metrics_port": 0, "broker_polling_interval_s": 0.1,
            "task_time_limit_s": 20, "broker_visibility_timeout_s": 25, "reconcile_interval_s": 5,
        }
        values.update(overrides)
        values = {k: v for k, v in values.items() if v is not None}  # None: the setting's default
        workers = Workers(values, Client(load_settings(**values)), tmp_path / f"workers{len(made)}.log")
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.stop()
        workers.client.close()


def wait_until(condition, timeout_s: float = WAIT_S, what="condition", interval_s: float = 0.05):
    """Poll ``condition()`` until it returns a truthy value, which is returned. ``what``
    names the condition in the timeout's message: a string, or a callable giving one (to
    show what was seen at the time)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(interval_s)
    return value


def running_shard(client, job_id: str) -> dict | None:
    """A RUNNING shard of the job, if any."""
    return next((s for s in client.store.shards(job_id) if s["state"] == "RUNNING"), None)


def worker_pid(client, hostname: str) -> int:
    """The pid of worker process ``hostname`` (from its heartbeat)."""
    return next(w.pid for w in client.store.workers(None) if w.hostname == hostname)


# ---------------------------------------------------------------------------- servers
class PrivateRedis:
    """A ``redis-server`` of one test, on a free port, with an append-only file (as in
    ``docker-compose.prod.yml``) so that a restart keeps the queued messages."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(self.port),
                        "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                        "--logfile", str(self.dir / "redis.log"), "--pidfile", str(self.dir / "redis.pid")],
                       check=True)
        wait_until(self.ping, 30, "redis-server to start")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        import redis

        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=self.port).shutdown(nosave=False)
        wait_until(lambda: not self.ping(), 30, "redis-server to stop")

    def client(self):
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture()
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    """A started :class:`PrivateRedis`, shut down after the test."""
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server", FileNotFoundError("redis-server"))
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    server.start()
    yield server
    if server.ping():
        server.stop()


class PrivatePostgres:
    """A PostgreSQL cluster of one test (``initdb`` into a temporary directory, run as the
    ``postgres`` user when the test runs as root), on a free port, so it can be
    restarted without touching the shared server."""

    def __init__(self, directory: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins:
            service_unavailable("PostgreSQL server binaries", FileNotFoundError("/usr/lib/postgresql/*/bin"))
        self.bin = bins[-1]
        self.dir = directory
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120)

    def init(self) -> None:
        if os.geteuid() == 0:  # the postgres user must reach and own the directory
            self.dir.chmod(0o755)
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    def pg_ctl(self, action: str, *extra: str) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                  action, *extra)


@pytest.fixture()
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started :class:`PrivatePostgres`, stopped and removed after the test (outside
    pytest's temporary directories, which only root may enter)."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="mlf-pg-"))
    server = PrivatePostgres(directory)
    try:
        server.init()
        server.pg_ctl("start")
    except (subprocess.CalledProcessError, OSError) as exc:
        service_unavailable("a private PostgreSQL cluster", exc)
    yield server
    with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
        server.pg_ctl("stop", "-m", "immediate")
    shutil.rmtree(directory, ignore_errors=True)
