"""Keeps kombu's Redis binding tables of Celery's events and control from growing.

On Redis, kombu records each queue bound to an exchange as a member of the set
``_kombu.binding.<exchange>``. Every worker process adds two: its gossip queue to
``_kombu.binding.celeryev`` (Celery names it ``celeryev.<random uuid>``) and its control
queue ``<node name>.celery.pidbox`` to ``_kombu.binding.celery.pidbox``. A warm shutdown
removes them; a process that is killed (SIGKILL, the OOM killer, a hard time limit, a
host that dies) leaves them for good while other workers keep the tables alive, so the
gossip set gained one member per killed start.

Two fixes:

- :class:`NodeNamedGossipQueue`, a consumer step, names the gossip queue after the
  process's node name (``celeryev.cpu0-4242@host``): a process the launcher restarts
  under its name binds the same member again instead of a new one.
- :func:`prune_dead_bindings` removes the members of nodes that the results store knows
  to be dead (a heartbeat row older than ``stale_s``); ``mlf worker`` runs it at start
  and with every reconciliation pass. Members of nodes the store does not know (another
  deployment sharing the Redis database, Flower's receivers) are left alone.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from celery import Celery, bootsteps
from sqlalchemy import inspect

from ml_framework.celery_app import BROKER_TIMEOUT_S
from ml_framework.constants import WORKER_GONE_S
from ml_framework.store import ResultStore
from ml_framework.store.models import WorkerRow

log = logging.getLogger(__name__)

EVENTS_TABLE = "_kombu.binding.celeryev"
CONTROL_TABLE = "_kombu.binding.celery.pidbox"
SEP = "\x06\x16"  # kombu's field separator in a binding member


class NodeNamedGossipQueue(bootsteps.StartStopStep):
    """Consumer step: Celery's gossip queue is named ``celeryev.<node name>`` instead of
    ``celeryev.<uuid>`` (it runs after Celery's Gossip step is made, before it starts)."""

    requires = ("celery.worker.consumer.gossip:Gossip",)

    def __init__(self, c, **kwargs) -> None:
        super().__init__(c, **kwargs)
        gossip = getattr(c, "gossip", None)
        if gossip is not None:
            gossip.Receiver = functools.partial(c.app.events.Receiver, node_id=c.hostname)


def node_of(member: bytes | str) -> str | None:
    """The Celery node name a binding member belongs to (``routing key, pattern, queue``
    joined by kombu's separator), or ``None`` for a queue not named after a node."""
    text = member.decode() if isinstance(member, bytes) else member
    queue = text.split(SEP)[-1]
    if queue.startswith("celeryev.") and "@" in queue:
        return queue.removeprefix("celeryev.")
    if queue.endswith(".celery.pidbox") and "@" in queue:
        return queue.removesuffix(".celery.pidbox")
    return None


def pruner(app: Celery, stale_s: float = WORKER_GONE_S) -> Callable[[ResultStore], int]:
    """:func:`prune_dead_bindings` on ``app``'s Redis broker, as a function of the store
    (what :class:`worker.launcher.Supervisor` calls at start and with each reconciliation
    pass). Broker calls are bounded by :data:`~ml_framework.celery_app.BROKER_TIMEOUT_S`."""

    def prune(store: ResultStore) -> int:
        options = {**(app.conf.broker_transport_options or {}), "socket_timeout": BROKER_TIMEOUT_S,
                   "socket_connect_timeout": BROKER_TIMEOUT_S}
        with app.connection_for_write(connect_timeout=BROKER_TIMEOUT_S, transport_options=options) as conn:
            conn.ensure_connection(max_retries=1)
            with conn.channel() as channel:
                return prune_dead_bindings(channel.client, store, stale_s)

    return prune


def prune_dead_bindings(redis_client, store: ResultStore, stale_s: float = WORKER_GONE_S) -> int:
    """Remove the event and control binding members of dead worker processes.

    Args:
        redis_client: a ``redis.Redis`` on the broker's database.
        store: the results store whose heartbeats tell the living from the dead.
        stale_s: a node whose heartbeat row is older than this, seconds, is dead.

    Returns:
        The number of members removed.

    Raises:
        redis / SQLAlchemy errors when the broker or the store cannot be reached.
    """
    if not inspect(store.engine).has_table(WorkerRow.__tablename__):
        return 0  # a new store, not migrated yet: no heartbeat, nobody known dead
    seen = {w.hostname: w.age_s for w in store.workers(None)}  # by the database server's clock
    dead = {name for name, age in seen.items() if age > stale_s}
    removed = 0
    for table in (EVENTS_TABLE, CONTROL_TABLE):
        members = [m for m in redis_client.smembers(table) if node_of(m) in dead]
        if members:
            removed += redis_client.srem(table, *members)
            redis_client.srem(table.replace("_kombu.binding.", "_kombu.binding_permanent.", 1), *members)
    if removed:
        log.info("removed %d broker binding(s) of dead worker processes", removed)
    return removed


__all__ = ["NodeNamedGossipQueue", "node_of", "prune_dead_bindings", "pruner"]
