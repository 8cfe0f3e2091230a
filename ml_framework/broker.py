"""The embedded, server-less broker: kombu's SQLAlchemy transport on a SQLite file.

:class:`SQLiteTransport` is kombu's ``sqla`` transport with three fixes for several
processes sharing one fresh SQLite file:

- kombu hands every transport option to ``create_engine``, so options that belong to the
  transport itself (``polling_interval``, ``visibility_timeout``) make it fail; they are
  kept for the transport only.
- Worker processes starting together race to create kombu's tables and queue rows
  ("table kombu_queue already exists", "UNIQUE constraint failed: kombu_queue.name");
  the loser now finds what the winner created instead of crashing.
- SQLite connections wait up to 30 s for a lock instead of kombu's 5 s default.

It is registered as the ``mlfsqla`` alias: ``mlfsqla+sqlite:////abs/path/broker.sqlite``.
"""

from __future__ import annotations

import time

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy.exc import IntegrityError, OperationalError

ALIAS = "mlfsqla"
_TRANSPORT_ONLY = ("polling_interval", "visibility_timeout")
SQLITE_LOCK_TIMEOUT_S = 30
_CREATE_RETRIES = 5


class SQLiteChannel(kombu_sqla.Channel):
    """kombu SQLAlchemy channel, safe for concurrent first use of a SQLite file."""

    def _engine_from_config(self):
        client = self.connection.client
        saved = client.transport_options
        options = {k: v for k, v in saved.items() if k not in _TRANSPORT_ONLY}
        options.setdefault("connect_args", {"timeout": SQLITE_LOCK_TIMEOUT_S})
        client.transport_options = options
        try:
            return super()._engine_from_config()
        finally:
            client.transport_options = saved

    def _open(self):
        for attempt in range(_CREATE_RETRIES):
            try:
                return super()._open()
            except OperationalError:  # another process created the tables meanwhile
                if attempt == _CREATE_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _get_or_create(self, queue):
        try:
            return super()._get_or_create(queue)
        except IntegrityError:  # another process inserted the queue row first
            self.session.rollback()
            return super()._get_or_create(queue)


class SQLiteTransport(kombu_sqla.Transport):
    """kombu SQLAlchemy transport using :class:`SQLiteChannel`."""

    Channel = SQLiteChannel


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:SQLiteTransport")
