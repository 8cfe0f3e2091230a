"""The embedded SQLite broker under concurrent use: several processes on one file, and
one channel used from a worker's main thread and its pool thread at once."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest

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


def ack_each(messages, errors: list[BaseException]) -> None:
    """Acknowledge ``messages`` as Celery's threads pool does (off the consumer's thread),
    keeping each error in ``errors`` for the test to report."""
    for message in messages:
        try:
            message.ack()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(exc)


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

    acker = threading.Thread(target=ack_each, args=(iter(to_ack.get, None), errors))
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


def test_acks_racing_the_restore_of_a_closing_channel_republish_nothing(tmp_path):
    """A connection that closes (lost, or the worker stopping) restores its unacknowledged
    messages while the task threads still acknowledge theirs (regression: a message acked
    after close() took it for restoring had no row left to show again, so a copy of it was
    published: an acknowledged task ran again). 300 messages held, acked from another
    thread while the connection closes: none comes back as a copy, and every message is
    either deleted (acked) or visible again (restored), none left invisible."""
    import sqlite3
    import threading

    from kombu import Connection, Queue

    import ml_framework.broker  # noqa: F401 - registers the transport

    path = tmp_path / "broker.sqlite"
    n = 300
    queue = Queue("t.close")
    conn = Connection(f"mlfsqla+sqlite:///{path}", transport_options={"polling_interval": 0.01})
    try:
        producer = conn.Producer()
        for i in range(n):
            producer.publish({"n": i}, routing_key="t.close", declare=[queue])
        channel = conn.default_channel
        held = [channel.basic_get("t.close") for _ in range(n)]
        errors: list[BaseException] = []

        def pool_thread() -> None:  # acks once close() has started restoring
            deadline = time.monotonic() + 10
            while len(channel.qos._delivered) == n and time.monotonic() < deadline:
                time.sleep(0.0005)
            ack_each(held, errors)

        acker = threading.Thread(target=pool_thread)
        acker.start()
    finally:
        conn.close()
    acker.join(timeout=20)
    assert errors == [], errors[:3]
    with contextlib.closing(sqlite3.connect(path)) as con:
        rows = con.execute("SELECT id, visible FROM kombu_message").fetchall()
    copies = [row_id for row_id, _visible in rows if row_id > n]
    assert copies == [], f"{len(copies)} acknowledged messages published again"
    assert all(visible for _row_id, visible in rows), rows


def test_a_requeued_message_delivered_again_before_its_reject_returns_keeps_its_row(tmp_path):
    """A task thread rejects its message with requeue while the main thread polls: once the
    row is visible again the poll may deliver it anew (same delivery tag) before the reject
    returns (regression: the reject then deleted the row of that new, unacknowledged
    delivery, so a worker killed while running it lost the message). The task thread is
    held for up to 1 s just after the row became visible: the new delivery's row is still
    in the broker while it runs, and visible again once the connection closes."""
    import sqlite3
    import threading

    from kombu import Connection, Consumer, Queue

    from ml_framework.broker import SQLiteChannel

    path = tmp_path / "broker.sqlite"
    queue = Queue("t.requeue")
    deliveries: list = []
    rejecters: list[threading.Thread] = []
    delivered_again = threading.Event()
    with Connection(f"mlfsqla+sqlite:///{path}", transport_options={"polling_interval": 0.01}) as conn:
        conn.Producer().publish({"n": 1}, routing_key="t.requeue", declare=[queue])
        channel = conn.default_channel

        def set_row(self, delivery_tag, *, delete):
            done = SQLiteChannel._set_row(self, delivery_tag, delete=delete)
            if not delete and threading.current_thread() is not threading.main_thread():
                delivered_again.wait(1.0)  # the task thread descheduled right after the requeue
            return done

        channel._set_row = set_row.__get__(channel)

        def on_message(body, message):
            deliveries.append(message)
            if len(deliveries) == 1:
                rejecters.append(threading.Thread(target=message.reject, kwargs={"requeue": True}))
                rejecters[0].start()
            else:
                delivered_again.set()

        with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=2):
            deadline = time.monotonic() + 10
            while len(deliveries) < 2 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.1)
            rejecters[0].join(timeout=5)
            with contextlib.closing(sqlite3.connect(path)) as con:
                running = con.execute("SELECT visible FROM kombu_message").fetchall()
        assert len(deliveries) == 2
        assert running == [(0,)]  # delivered, unacknowledged: kept, invisible
    with contextlib.closing(sqlite3.connect(path)) as con:
        assert con.execute("SELECT id, visible FROM kombu_message").fetchall() == [(1, 1)]  # restored, no copy


def test_a_requeue_that_failed_on_a_locked_database_is_restored_when_the_connection_closes(tmp_path, monkeypatch):
    """Another connection holds SQLite's write lock past the lock timeout: a poll and a
    requeue fail with "database is locked" (Celery then drops the connection). Once the
    lock is gone the channel works again, and closing it shows the message whose requeue
    failed again at once (regression: its row was forgotten, so it stayed invisible until
    the visibility timeout, or a copy of it was published)."""
    import sqlite3

    from kombu import Connection, Queue
    from sqlalchemy.exc import OperationalError

    import ml_framework.broker as broker

    monkeypatch.setattr(broker, "SQLITE_LOCK_TIMEOUT_S", 0.2)
    path = tmp_path / "broker.sqlite"
    queue = Queue("t.locked")
    with Connection(f"mlfsqla+sqlite:///{path}", transport_options={"polling_interval": 0.01}) as conn:
        producer = conn.Producer()
        for i in range(2):
            producer.publish({"n": i}, routing_key="t.locked", declare=[queue])
        channel = conn.default_channel
        first = channel.basic_get("t.locked")
        with contextlib.closing(sqlite3.connect(path, timeout=0)) as locker:
            locker.execute("BEGIN IMMEDIATE")
            with pytest.raises(OperationalError, match="database is locked"):
                channel.basic_get("t.locked")
            with pytest.raises(OperationalError, match="database is locked"):
                first.requeue()
            locker.rollback()
        second = channel.basic_get("t.locked")  # usable again: no failed transaction left open
        assert second.payload == {"n": 1}
        second.ack()
    with contextlib.closing(sqlite3.connect(path)) as con:
        assert con.execute("SELECT id, visible FROM kombu_message").fetchall() == [(1, 1)]


CONSUMER = """
import json, os, signal, sys
from kombu import Connection, Consumer, Queue
import ml_framework.broker as broker
url, queue, stop_file, victim = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "victim"
if victim:  # stops itself inside its first poll's BEGIN IMMEDIATE, a row taken, nothing committed
    broker.loads = lambda payload: os.kill(os.getpid(), signal.SIGSTOP)
with Connection(url, transport_options={"polling_interval": 0.005}) as conn, Consumer(
        conn, [Queue(queue)], callbacks=[lambda body, message: (print(body["n"], flush=True), message.ack())],
        prefetch_count=1):
    print("ready", flush=True)
    while not os.path.exists(stop_file):
        try:
            conn.drain_events(timeout=0.05)
        except TimeoutError:
            pass
"""


def test_a_consumer_killed_while_holding_the_write_lock_loses_and_duplicates_nothing(tmp_path):
    """Three processes on one broker file; one is stopped (SIGSTOP) inside a poll's write
    transaction, after taking a message, then SIGKILLed: the others wait on the lock
    meanwhile, then take every message exactly once (the dead one's uncommitted take is
    rolled back: nothing waits for the visibility timeout)."""
    import os
    import signal
    import sqlite3

    from kombu import Connection, Queue

    import ml_framework.broker  # noqa: F401 - registers the transport

    path, stop_file, n = tmp_path / "broker.sqlite", tmp_path / "stop", 100
    url = f"mlfsqla+sqlite:///{path}"
    with Connection(url) as conn:
        producer = conn.Producer()
        for i in range(n):
            producer.publish({"n": i}, routing_key="t.kill", declare=[Queue("t.kill")])

    def consumer(role: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CONSUMER, url, "t.kill", str(stop_file), role],
                                stdout=subprocess.PIPE, text=True)

    def count(sql: str) -> int:
        with contextlib.closing(sqlite3.connect(path, timeout=0)) as con:
            return con.execute(sql).fetchone()[0]

    def wait_for(condition, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stopped(proc: subprocess.Popen) -> bool:
        with open(f"/proc/{proc.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "T"

    victim = consumer("victim")
    others: list[subprocess.Popen] = []
    try:
        assert victim.stdout.readline() == "ready\n"
        wait_for(lambda: stopped(victim), 10)
        others = [consumer("other") for _ in range(2)]
        assert [p.stdout.readline() for p in others] == ["ready\n"] * 2
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 0.5, 1)
        assert count("SELECT count(*) FROM kombu_message WHERE visible") == n  # all waited on the lock
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: count("SELECT count(*) FROM kombu_message") == 0, 20)
    finally:
        stop_file.touch()
        victim.kill()
        outputs = [p.communicate(timeout=20)[0] for p in others]
        victim.wait(timeout=10)
    got = sorted(int(line) for out in outputs for line in out.split())  # "ready" already read
    assert got == list(range(n))


def test_queue_depths_read_while_a_worker_polls_and_acks(tmp_path):
    """``queue_depths`` (the API's and ``mlf status``'s view of the broker) is called over
    and over from another thread while the consumer polls and a pool thread acks: no
    error, each depth only goes down, both end at 0, every message delivered once."""
    import queue as queue_mod
    import threading

    from kombu import Consumer

    from ml_framework.celery_app import create_app, declared_queues, queue_depths
    from ml_framework.settings import load_settings

    settings = load_settings(var_dir=tmp_path / "var", broker_polling_interval_s=0.001)
    app = create_app(settings)
    online, bulk = declared_queues(settings)
    n = 200
    got: list[int] = []
    depths: list[dict[str, int]] = []
    errors: list[BaseException] = []
    to_ack: queue_mod.Queue = queue_mod.Queue()
    done = threading.Event()

    def pool_thread() -> None:
        while (message := to_ack.get()) is not None:
            message.ack()

    def status_thread() -> None:
        while not done.is_set():
            try:
                depths.append(queue_depths(app, settings))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)
                return

    with app.connection_for_write() as conn:
        producer = conn.Producer()
        for i in range(n):
            target = online if i % 4 == 0 else bulk
            producer.publish({"n": i}, exchange=target.exchange, routing_key=target.routing_key, declare=[target])
        threads = [threading.Thread(target=pool_thread), threading.Thread(target=status_thread)]
        for thread in threads:
            thread.start()
        try:
            with Consumer(conn, [online, bulk], callbacks=[lambda body, message: (got.append(body["n"]),
                                                                                  to_ack.put(message))],
                          prefetch_count=1):
                deadline = time.monotonic() + 25
                while len(got) < n and time.monotonic() < deadline and not errors:
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.05)
        finally:
            to_ack.put(None)
            threads[0].join(timeout=10)
            done.set()
            threads[1].join(timeout=10)
    assert errors == [], errors[:3]
    assert sorted(got) == list(range(n))
    assert len(depths) > 5, depths  # read many times while the worker ran
    for name in (settings.online_queue, settings.bulk_queue):
        seen = [d[name] for d in depths]
        assert seen == sorted(seen, reverse=True), (name, seen)
    assert queue_depths(app, settings) == {settings.online_queue: 0, settings.bulk_queue: 0}


def test_closed_connections_give_their_database_connections_back(tmp_path):
    """A process that opens and closes broker connections over and over (the API's
    ``list_queues`` on every metrics scrape, ``queue_depths``) keeps none of their SQLite
    connections checked out (regression: a closed channel's session kept its connection
    until the garbage collector freed the channel; past the pool's 15 the next caller
    waited 30 s and failed with ``sqlalchemy.exc.TimeoutError``). Garbage collection is
    off here, as it may not run in time under load."""
    import gc

    from kombu import Connection

    import ml_framework.broker  # noqa: F401 - registers the transport

    url = f"mlfsqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    gc.disable()
    try:
        for _ in range(6):  # 12 connections leaked before the fix: under the limit, no 30 s wait
            with Connection(url) as conn:
                conn.ensure_connection(max_retries=1)
                with conn.channel() as channel:
                    assert channel.queue_declare(queue="t.depth", passive=True).message_count == 0
        with Connection(url) as conn:
            engine, _session_factory = conn.default_channel._open()
            assert engine.pool.checkedout() == 0
    finally:
        gc.enable()
