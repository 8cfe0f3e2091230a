"""The guards of tests/unit/conftest.py: a unit test cannot reach a service, and a long
sleep in a test's own code is caught."""

from __future__ import annotations

import socket
import time

import pytest


def test_a_connection_to_a_service_port_is_refused_and_recorded(no_service_connections):
    """Redis and RabbitMQ through Python sockets, PostgreSQL through psycopg (libpq) and
    SQLAlchemy: each is refused at once and recorded for the teardown check."""
    import psycopg
    from sqlalchemy import create_engine

    with pytest.raises(ConnectionRefusedError, match="tests/integration"):
        socket.create_connection(("127.0.0.1", 6379), timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("localhost", 5672), timeout=5)
    with pytest.raises(ConnectionRefusedError):
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=5)
    with pytest.raises(ConnectionRefusedError), create_engine("postgresql+psycopg://postgres@127.0.0.1/x").connect():
        pass
    assert [a.rsplit(":", 1)[1] for a in no_service_connections] == ["6379", "5672", "5432", "5432"]
    no_service_connections.clear()  # seen; this test itself passes


def test_a_long_sleep_in_a_test_is_recorded_and_a_short_one_is_not(no_long_sleeps):
    """A sleep longer than 0.05 s in a test's own code is recorded for the teardown check."""
    time.sleep(0.01)
    assert no_long_sleeps == []
    time.sleep(0.06)
    assert len(no_long_sleeps) == 1 and "test_unit_guards.py" in no_long_sleeps[0]
    no_long_sleeps.clear()  # seen; this test itself passes
