"""The embedded SQLite broker under concurrent first use by several processes."""

from __future__ import annotations

import contextlib
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


def test_queues_are_drained_in_the_order_consumed(tmp_path):
    """With 5 bulk messages waiting, online messages sent later are all delivered first, on
    every poll (kombu's default cycle alternates between the queues: online0, bulk0, online1)."""
    from kombu import Connection, Consumer, Queue

    import ml_framework.broker  # noqa: F401 - registers the transport

    url = f"mlfsqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    online, bulk = Queue("t.online"), Queue("t.bulk")
    got: list[str] = []
    with Connection(url, transport_options={"polling_interval": 0.01}) as conn:
        producer = conn.Producer()
        for i in range(5):
            producer.publish({"n": f"bulk{i}"}, routing_key="t.bulk", declare=[bulk])
        for i in range(2):
            producer.publish({"n": f"online{i}"}, routing_key="t.online", declare=[online])

        def on_message(body, message):
            got.append(body["n"])
            message.ack()
            if body["n"] == "bulk0":  # an online request arriving while bulk work runs
                producer.publish({"n": "online2"}, routing_key="t.online", declare=[online])

        with Consumer(conn, [online, bulk], callbacks=[on_message], prefetch_count=1):
            while len(got) < 8:
                conn.drain_events(timeout=5)
    assert got == ["online0", "online1", "bulk0", "online2", "bulk1", "bulk2", "bulk3", "bulk4"]


def test_an_idle_drain_ends_soon_after_the_worker_is_asked_to_stop(tmp_path, monkeypatch):
    """Celery's blocking loop drains 2 s at a time and only then looks for a shutdown
    request: a drain asked for 5 s ends within a slice of the request (Celery's warm
    shutdown flag, set from a timer as its SIGTERM handler sets it), not after 5 s; with
    no request, a drain lasts its whole timeout."""
    import threading

    from celery.worker import state
    from kombu import Connection, Consumer, Queue

    from ml_framework.broker import DRAIN_SLICE_S

    url = f"mlfsqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    with Connection(url, transport_options={"polling_interval": 0.01}) as conn, \
            Consumer(conn, [Queue("t.idle")], callbacks=[lambda body, message: None]):
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.3)
        assert time.monotonic() - started >= 0.3  # no request: the whole timeout

        monkeypatch.setattr(state, "should_stop", None)
        asked = threading.Event()

        def ask_to_stop() -> None:
            state.should_stop = 0  # EX_OK, as Celery's warm-shutdown handler sets it
            asked.set()

        threading.Timer(0.2, ask_to_stop).start()
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=5.0)
        took = time.monotonic() - started
        assert asked.is_set()
        assert took < 0.2 + DRAIN_SLICE_S + 1.0, took  # not the 5 s asked for


def test_acks_from_a_pool_thread_while_the_consumer_polls_lose_nothing(tmp_path):
    """Celery's threads pool acknowledges a message from the task's thread while the
    worker's main thread polls the same channel (regression: both used the channel's one
    SQLAlchemy session at once; the worker died with "This session is in 'prepared'
    state" or "database is locked", or an ack was lost). 300 messages, each acked from a
    pool thread: every one delivered once, every ack applied, no error."""
    import queue as queue_mod
    import sqlite3
    import threading

    from kombu import Connection, Consumer, Queue

    import ml_framework.broker  # noqa: F401 - registers the transport

    path = tmp_path / "broker.sqlite"
    n = 300
    bulk = Queue("t.acks")
    got: list[int] = []
    errors: list[BaseException] = []
    to_ack: queue_mod.Queue = queue_mod.Queue()

    def pool_thread() -> None:  # acks as Celery's threads pool does, off the consumer's thread
        while (message := to_ack.get()) is not None:
            try:
                message.ack()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

    acker = threading.Thread(target=pool_thread)
    acker.start()
    try:
        with Connection(f"mlfsqla+sqlite:///{path}", transport_options={"polling_interval": 0.001}) as conn:
            producer = conn.Producer()
            for i in range(n):
                producer.publish({"n": i}, routing_key="t.acks", declare=[bulk])

            def on_message(body, message):
                got.append(body["n"])
                to_ack.put(message)

            deadline = time.monotonic() + 60
            with Consumer(conn, [bulk], callbacks=[on_message], prefetch_count=4):
                while len(got) < n and time.monotonic() < deadline:
                    try:
                        conn.drain_events(timeout=0.05)
                    except TimeoutError:
                        pass
                    except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                        errors.append(exc)
                        break
            to_ack.put(None)
            acker.join(timeout=30)
    finally:
        to_ack.put(None)
    assert errors == [], errors[:3]
    assert sorted(got) == list(range(n))
    with contextlib.closing(sqlite3.connect(path)) as con:
        assert con.execute("SELECT count(*) FROM kombu_message").fetchone()[0] == 0  # every ack applied
