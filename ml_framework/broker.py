"""The embedded, server-less broker: kombu's SQLAlchemy transport on a SQLite file.

kombu's ``sqla`` transport hands every transport option to ``create_engine``, so options
that belong to the transport itself (``polling_interval``, ``visibility_timeout``) make it
fail. :class:`SQLiteTransport` keeps those options for the transport and passes on only
what ``create_engine`` accepts. It is registered as the ``mlfsqla`` alias:
``mlfsqla+sqlite:////abs/path/broker.sqlite``.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla

ALIAS = "mlfsqla"
_TRANSPORT_ONLY = ("polling_interval", "visibility_timeout")


class SQLiteChannel(kombu_sqla.Channel):
    """kombu SQLAlchemy channel whose engine gets no transport-only options."""

    def _engine_from_config(self):
        client = self.connection.client
        saved = client.transport_options
        client.transport_options = {k: v for k, v in saved.items() if k not in _TRANSPORT_ONLY}
        try:
            return super()._engine_from_config()
        finally:
            client.transport_options = saved


class SQLiteTransport(kombu_sqla.Transport):
    """kombu SQLAlchemy transport using :class:`SQLiteChannel`."""

    Channel = SQLiteChannel


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:SQLiteTransport")
