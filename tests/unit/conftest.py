"""Fixtures shared by the unit tests, and the two guards that keep them unit tests.

The unit tests run without services and without waiting. Two autouse guards enforce it:

- a unit test that opens a TCP connection to a Redis, PostgreSQL or RabbitMQ port (6379,
  5432, 5672, on any host) fails: the connection is refused at once
  (``ConnectionRefusedError``), and the test fails at teardown even where the code under
  test caught that error. Tests that need a service belong in ``tests/integration``;
- a unit test whose own code calls ``time.sleep`` for longer than
  :data:`MAX_TEST_SLEEP_S` fails at teardown: wait on an event, a counter or a fake
  clock instead. Sleeps inside the code under test (poll loops) are left alone.

Only this process is guarded; a test's child processes are not.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

MAX_TEST_SLEEP_S = 0.05
"""The longest ``time.sleep`` (seconds) a unit test's own code may call."""

TESTS_DIR = Path(__file__).resolve().parent.parent


SERVICE_PORTS = frozenset({6379, 5432, 5672})
"""The TCP ports of Redis, PostgreSQL and RabbitMQ, which no unit test may connect to. (The
``MLF_TEST_*_URL`` ports are not added: unit tests use closed ports such as 1 as brokers that
are down, and pointing those variables at a closed port checks the unit tests need no server.)"""


@pytest.fixture(autouse=True)
def no_service_connections(monkeypatch):
    """Refuse, and fail the test for, any connection to a service port (module docstring).
    Yields the list of the attempts so far (``host:port``), checked at teardown."""
    ports = SERVICE_PORTS
    attempts: list[str] = []

    def refused(where: str) -> ConnectionRefusedError:
        attempts.append(where)
        return ConnectionRefusedError(f"unit tests must not connect to a service ({where}); "
                                      "move the test to tests/integration")

    def guarded(real):
        def connect(sock, address, *args, **kwargs):
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple)
                    and len(address) >= 2 and address[1] in ports):
                raise refused(f"{address[0]}:{address[1]}")
            return real(sock, address, *args, **kwargs)

        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
    try:  # libpq opens its own sockets, out of Python's reach: guard psycopg's entry point
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # pragma: no cover - psycopg is a dependency
        psycopg = None
    if psycopg is not None:
        real_connect = psycopg.Connection.connect.__func__

        def pg_connect(cls, conninfo: str = "", **kwargs):
            params = {**conninfo_to_dict(conninfo), **{k: kwargs[k] for k in ("host", "port") if k in kwargs}}
            port = int(str(params.get("port") or 5432).split(",")[0])
            if port in ports:
                raise refused(f"PostgreSQL at {params.get('host', 'localhost')}:{port}")
            return real_connect(cls, conninfo, **kwargs)

        monkeypatch.setattr(psycopg.Connection, "connect", classmethod(pg_connect))
        monkeypatch.setattr(psycopg, "connect", psycopg.Connection.connect)  # an alias bound on import
    yield attempts
    if attempts:
        pytest.fail(f"a unit test connected to a service: {', '.join(attempts)}; "
                    "move it to tests/integration", pytrace=False)


@pytest.fixture(autouse=True)
def no_long_sleeps(monkeypatch):
    """Fail a test whose own code sleeps longer than :data:`MAX_TEST_SLEEP_S` (module
    docstring). The sleep itself still happens, so the code under test is unchanged.
    Yields the list of the long sleeps so far, checked at teardown."""
    real_sleep = time.sleep
    long_sleeps: list[str] = []

    def sleep(seconds: float) -> None:
        if seconds > MAX_TEST_SLEEP_S:
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename).resolve()
            if path.is_relative_to(TESTS_DIR):
                long_sleeps.append(f"time.sleep({seconds}) at {path.name}:{caller.f_lineno}")
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    yield long_sleeps
    if long_sleeps:
        pytest.fail(f"unit tests do not sleep (longest allowed {MAX_TEST_SLEEP_S} s): "
                    f"{'; '.join(long_sleeps)}; wait on an event or a counter instead", pytrace=False)


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    """No ML_FRAMEWORK_* variables, and a working directory without configs/."""
    for name in list(os.environ):
        if name.startswith("ML_FRAMEWORK_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def model_root(root: Path, name: str = "m") -> Path:
    """``root`` with ``models/<name>/1/manifest.yaml`` of an sklearn regression on columns
    ``a`` and ``b`` (a manifest only: nothing can be loaded, which tests without workers
    never need), and a ``data/`` directory; returns ``root``."""
    version = root / "models" / name / "1"
    version.mkdir(parents=True)
    (version / "manifest.yaml").write_text(yaml.safe_dump({
        "name": name, "version": 1, "framework": "sklearn", "artifact": "model.skops",
        "inputs": {"columns": ["a", "b"]}, "outputs": {"kind": "regression"}}))
    (root / "data").mkdir(exist_ok=True)
    return root


@pytest.fixture(params=["sqlite"])
def db_kind(request) -> str:
    """The results store of the unit tests: SQLite (``tests/integration`` runs the same
    tests on PostgreSQL; see :func:`tests.conftest.database_tests`)."""
    return request.param


SERVICE_FIXTURES = frozenset({"pg_database", "own_pg_database", "backend", "redis_backend", "s3_server"})
"""Fixtures that start or reach a server. A unit test that takes one would fail on the
guard above, and a session-scoped one failing there stays failed for the whole run: every
integration test after it that needs it errors (seen in CI: one unit test's PostgreSQL case
took down every Redis + PostgreSQL test)."""


def pytest_collection_modifyitems(config, items) -> None:
    """Refuse, at collection, a unit test that takes a service fixture, directly or through
    a parameter named ``postgresql`` (those belong in ``tests/integration``)."""
    unit_dir = Path(__file__).parent
    wrong = [item.nodeid for item in items if unit_dir in Path(str(item.fspath)).parents
             and (SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
                  or "postgresql" in getattr(getattr(item, "callspec", None), "params", {}).values())]
    if wrong:
        raise pytest.UsageError("unit tests take a service fixture (move them to tests/integration, or run them "
                                f"there again with tests.conftest.database_tests): {', '.join(wrong[:10])}")
