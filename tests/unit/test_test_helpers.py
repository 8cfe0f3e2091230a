"""The suite's own helpers for servers started as processes (tests/conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_http


def test_free_ports_are_below_the_ephemeral_range_and_never_given_twice():
    """CI once lost the API of the Prometheus test (``up`` 0 for 90 s): a port from
    ``bind(0)`` is in the ephemeral range, from which every outgoing connection takes its
    local port too, so it can be taken before the server binds it. The ports given are
    below that range, free, and distinct."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low < 4096:
        pytest.skip(f"the ephemeral range starts at {low}: no room below it")
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports), [p for p in ports if not 1024 <= p < low]
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free when given


def test_a_port_in_use_is_not_given(monkeypatch):
    """A port something is bound to is skipped, even when it is drawn."""
    import random

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        busy = taken.getsockname()[1]
        draws = iter([busy, busy, busy])

        class Draw:
            def randrange(self, start: int, stop: int) -> int:
                return next(draws, start + 7)

        monkeypatch.setattr(random, "SystemRandom", Draw)
        port = free_port()
        assert port != busy
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_waiting_for_a_server_that_exited_fails_at_once_with_its_output(tmp_path):
    """A server that dies at start fails the wait when it exits, with the end of its log
    (not after the whole timeout with a bare connection error)."""
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('cannot start: no keys'); raise SystemExit(3)"],
                                stdout=out, stderr=subprocess.STDOUT)
        proc.wait(timeout=30)
    with pytest.raises(pytest.fail.Exception) as failed:
        wait_for_http(f"http://127.0.0.1:{free_port()}/health", timeout_s=60, proc=proc, log=log)
    assert "exited with status 3" in str(failed.value)
    assert "cannot start: no keys" in str(failed.value)
