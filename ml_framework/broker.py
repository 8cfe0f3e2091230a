"""The embedded, server-less broker: kombu's SQLAlchemy transport on a SQLite file.

:class:`SQLiteTransport` is kombu's ``sqla`` transport with these fixes, for several
processes sharing one SQLite file:

- kombu hands every transport option to ``create_engine``, so options that belong to the
  transport itself (``polling_interval``, ``visibility_timeout``) make it fail; they are
  kept for the transport only.
- Worker processes starting together race to create kombu's tables and queue rows
  ("table kombu_queue already exists", "UNIQUE constraint failed: kombu_queue.name");
  the loser now finds what the winner created instead of crashing.
- SQLite connections wait up to 30 s for a lock instead of kombu's 5 s default, and use
  write-ahead logging (see :func:`_sqlite_pragmas`).
- One channel is used from two threads: a Celery worker's main thread polls it while
  its threads pool acknowledges the finished task's message. kombu's channel has one
  SQLAlchemy session, which is not thread-safe (the worker died with "This session is in
  'prepared' state", or an acknowledgement was lost); every use of it here holds the
  channel's lock, and a failed transaction is rolled back so that the session is never
  left holding SQLite's write lock. A requeue holds the lock from start to end, and a
  message acked by the task's thread while the closing channel restores its unacked ones
  is not published again.
- A closed channel gives its database connection back to the pool (kombu kept it until
  the channel was garbage-collected; see :meth:`SQLiteChannel.close`).
- Acknowledgement semantics like Redis': kombu's transport marks a delivered message
  invisible and never looks at it again, so the shard of a worker killed mid-task was
  lost. Here an acked message is deleted, a rejected or restored one made visible again,
  and one left unacked (its consumer died) becomes visible again after
  ``visibility_timeout`` seconds, when any consumer next polls.

It is registered as the ``mlfsqla`` alias: ``mlfsqla+sqlite:////abs/path/broker.sqlite``.
"""

from __future__ import annotations

import functools
import threading
import time
from datetime import datetime, timedelta
from queue import Empty

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from kombu.utils.scheduling import FairCycle
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError, OperationalError

ALIAS = "mlfsqla"
_TRANSPORT_ONLY = ("polling_interval", "visibility_timeout")
SQLITE_LOCK_TIMEOUT_S = 30
_CREATE_RETRIES = 5


class InOrderCycle(FairCycle):
    """Polls the consumed queues in the order they were consumed, from the first one on
    every poll: with ``-Q mlf.online,mlf.bulk`` an online request is always taken before
    the next bulk shard (kombu's default :class:`FairCycle` goes round robin). This is what
    ``queue_order_strategy: priority`` does for kombu's Redis transport."""

    def get(self, callback, **kwargs):
        """Deliver from the first non-empty queue; ``Empty`` when all are empty."""
        self.pos = 0
        return super().get(callback, **kwargs)


def _locked(method):
    """Run a channel method holding the channel's lock, rolling its session back when the
    method fails (see :class:`SQLiteChannel`)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            except Empty:
                raise
            except BaseException:
                if self._session is not None:
                    self._session.rollback()
                raise

    return run


class SQLiteChannel(kombu_sqla.Channel):
    """kombu SQLAlchemy channel: safe concurrent first use, real acks, visibility timeout,
    queues polled in priority order (:class:`InOrderCycle`), safe use from several threads
    (every use of the channel's session holds ``_lock``)."""

    def __init__(self, *args, **kwargs) -> None:
        self._lock = threading.RLock()
        super().__init__(*args, **kwargs)
        self._rows: dict[str, int] = {}  # delivery tag -> kombu_message.id, while unacked

    def _reset_cycle(self) -> None:
        self._cycle = InOrderCycle(self._get_and_deliver, self._active_queues, Empty)

    @property
    def _visibility_timeout_s(self) -> float | None:
        return self.connection.client.transport_options.get("visibility_timeout")

    @_locked
    def _get(self, queue):
        obj = self._get_or_create(queue)
        message = self.message_cls
        self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            now = datetime.now()  # kombu stores naive local times
            timeout = self._visibility_timeout_s
            if timeout:
                self.session.query(message).filter(
                    message.queue_id == obj.id, message.visible == False,  # noqa: E712
                    message.sent_at < now - timedelta(seconds=timeout),
                ).update({message.visible: True}, synchronize_session=False)
            row = (self.session.query(message)
                   .filter(message.queue_id == obj.id, message.visible == True)  # noqa: E712
                   .order_by(message.sent_at, message.id).limit(1).first())
            if row is None:
                raise Empty()
            row.visible = False
            row.sent_at = now  # from now on: when it was delivered
            payload = loads(bytes_to_str(row.payload))
            self._rows[payload["properties"]["delivery_tag"]] = row.id
            return payload
        finally:
            self.session.commit()

    @_locked
    def _set_row(self, delivery_tag: str, *, delete: bool) -> bool:
        row_id = self._rows.pop(delivery_tag, None)
        if row_id is None:
            return False
        try:
            query = self.session.query(self.message_cls).filter(self.message_cls.id == row_id)
            if delete:
                query.delete(synchronize_session=False)
            else:
                query.update({self.message_cls.visible: True}, synchronize_session=False)
            self.session.commit()
        except BaseException:
            # Not settled (e.g. "database is locked"): keep the row known, so that
            # restoring the message when the connection closes still shows it again.
            self._rows[delivery_tag] = row_id
            raise
        return True

    @_locked
    def basic_ack(self, delivery_tag, multiple=False):
        super().basic_ack(delivery_tag, multiple)
        self._set_row(delivery_tag, delete=True)

    @_locked
    def basic_reject(self, delivery_tag, requeue=False):
        # Under the lock from start to end: once a requeued row is visible, a poll may
        # deliver it again (same delivery tag); the rest of this reject must not settle
        # that new delivery (it deleted its row: lost if that worker then died).
        super().basic_reject(delivery_tag, requeue)  # requeue goes through _restore
        if not requeue:
            self._set_row(delivery_tag, delete=True)

    def _restore(self, message):
        # Make the original row visible again instead of publishing a copy of it (kombu's
        # way). A tag that no channel of this connection holds was settled meanwhile: an
        # ack from the task's thread can land after Channel.close() took the message for
        # restoring (kombu's QoS.restore_unacked allows for it); a copy would run an
        # acknowledged task again.
        tag = message.delivery_tag
        transport = self.connection
        for channel in [self, *(transport.channels if transport is not None else ())]:
            if isinstance(channel, SQLiteChannel) and channel._set_row(tag, delete=False):
                return

    def close(self):
        """kombu's close (which restores the unacknowledged messages), then the session
        gives its database connection back to the engine's pool. kombu kept it checked out
        until the garbage collector freed the channel: a process opening connections over
        and over (``list_queues`` on every metrics scrape) ran out of the pool's 15
        connections and waited 30 s for one (``sqlalchemy.exc.TimeoutError``). The session
        stays usable: a late ack from a task thread checks a connection out again."""
        super().close()
        with self._lock:
            if self._session is not None:
                self._session.close()

    def _engine_from_config(self):
        client = self.connection.client
        saved = client.transport_options
        options = {k: v for k, v in saved.items() if k not in _TRANSPORT_ONLY}
        options.setdefault("connect_args", {"timeout": SQLITE_LOCK_TIMEOUT_S})
        client.transport_options = options
        try:
            engine = super()._engine_from_config()
        finally:
            client.transport_options = saved
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _open(self):
        for attempt in range(_CREATE_RETRIES):
            try:
                return super()._open()
            except OperationalError:  # another process created the tables meanwhile
                if attempt == _CREATE_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    @_locked
    def _put(self, queue, payload, **kwargs):
        return super()._put(queue, payload, **kwargs)

    @_locked
    def _purge(self, queue):
        return super()._purge(queue)

    @_locked
    def _size(self, queue):
        return super()._size(queue)

    @_locked
    def _get_or_create(self, queue):
        try:
            return super()._get_or_create(queue)
        except IntegrityError:  # another process inserted the queue row first
            self.session.rollback()
            return super()._get_or_create(queue)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    """Write-ahead logging with ``synchronous=NORMAL``: a send or an ack costs one sync of
    the log at checkpoints instead of several per transaction (2 ms each here), and
    readers do not block the writer. A process crash loses nothing; a power cut may lose
    the last transactions (SQLite's WAL documentation), acceptable for the embedded broker
    of one host (the production broker is Redis or RabbitMQ)."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class SQLiteTransport(kombu_sqla.Transport):
    """kombu SQLAlchemy transport using :class:`SQLiteChannel`.

    A worker on this transport runs Celery's blocking loop (no event loop: ``synloop``),
    which drains for 2 s at a time and only then looks for a shutdown request, so an
    idle worker took up to 2 s to start its warm shutdown on SIGTERM. Here a drain with a
    timeout polls in slices of :data:`DRAIN_SLICE_S` and ends early (``TimeoutError``,
    as at its end) once a shutdown of this worker process was requested.
    """

    Channel = SQLiteChannel

    def drain_events(self, connection, timeout=None):
        """kombu's drain, in slices of :data:`DRAIN_SLICE_S` seconds while ``timeout``
        (seconds; ``None``: until a message) lasts, ending early when this process is a
        Celery worker asked to stop.

        Raises:
            TimeoutError (``socket.timeout``): no message within ``timeout``, or a shutdown was requested.
        """
        if timeout is None:
            return super().drain_events(connection, timeout=None)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return super().drain_events(connection, timeout=max(min(remaining, DRAIN_SLICE_S), 0.001))
            except TimeoutError:
                if time.monotonic() >= deadline or _worker_stopping():
                    raise


DRAIN_SLICE_S = 0.1
"""Longest an idle worker on the embedded broker takes to notice a shutdown request, seconds."""


def _worker_stopping() -> bool:
    """Whether this process is a Celery worker asked to stop (warm or cold)."""
    from celery.worker import state

    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:SQLiteTransport")
