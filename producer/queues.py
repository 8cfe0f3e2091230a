"""Every queue of ours on the broker, what it holds and who consumes it (``mlf queues``,
``mlf status``, the API's ``/metrics``).

A job whose shards went to a queue that no worker consumes (say ``bulk_queue`` set one
way on the producer and another on the workers) stays PENDING. Reading only the two
configured queues hides it; this module finds such queues:

- the queue names: the configured online and bulk queues, the queues of PENDING jobs (the
  results store keeps each bulk shard's message and its queue), and on Redis every queue
  kombu has bound to an exchange (``_kombu.binding.*``), on the embedded SQLite transport
  every row of ``kombu_queue``; Celery's own event, control and reply queues are left out;
- messages waiting on each, read from the broker (every priority level counted);
- consumers: RabbitMQ counts them itself; on Redis the live workers are asked which
  queues they consume (Celery's ``active_queues``, answered within ``timeout_s``; the
  ``threads`` pool answers while a shard runs). A worker under load may still answer
  late, so when a worker with a fresh heartbeat did not answer the count is a lower bound
  and no queue is said to have none. The embedded transport has no broadcast: unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ml_framework.celery_app import BROKER_TIMEOUT_S

if TYPE_CHECKING:
    from producer.client import Client

INTERNAL = ("celeryev", "celery.pidbox", "reply.celery.pidbox")
"""Exchanges of Celery's events and remote control: their queues are not ours."""


@dataclass
class QueueInfo:
    """One broker queue.

    Attributes:
        name: the queue name.
        waiting: messages waiting (not delivered yet).
        consumers: worker processes consuming it; ``None`` when the broker cannot tell.
        exact: ``False`` when some live worker did not say what it consumes, so
            ``consumers`` may be low.
        configured: one of the producer's ``online_queue`` / ``bulk_queue``.
        pending_jobs: ids of PENDING jobs whose shards were sent here, oldest first.
    """

    name: str
    waiting: int
    consumers: int | None = None
    exact: bool = True
    configured: bool = False
    pending_jobs: list[str] = field(default_factory=list)

    @property
    def unserved(self) -> bool:
        """Messages or PENDING jobs wait here and, for certain, no worker consumes it."""
        return self.consumers == 0 and self.exact and bool(self.waiting or self.pending_jobs)


def _is_internal(queue: str) -> bool:
    return queue.startswith("celeryev.") or queue.endswith("pidbox")


def _broker_queue_names(channel, settings) -> set[str]:
    """Queue names the broker knows of (Redis: kombu's bindings; SQLite: kombu_queue)."""
    if settings.broker_is_redis:
        client = channel.client
        names = set()
        for key in client.scan_iter(match="_kombu.binding.*", count=1000):
            exchange = key.decode().removeprefix("_kombu.binding.")
            if exchange in INTERNAL:
                continue
            for member in client.smembers(key):
                names.add(member.decode().split("\x06\x16")[-1])
        return {n for n in names if n and not _is_internal(n)}
    if settings.embedded_broker:
        return {name for (name,) in channel.session.query(channel.queue_cls.name).all() if not _is_internal(name)}
    return set()  # RabbitMQ: listing needs the management API; the known names are asked by name


def _active_queues(client: Client, timeout_s: float) -> tuple[dict[str, int], bool]:
    """``({queue: consumers}, every live worker answered)`` from the workers themselves
    (Redis or RabbitMQ: the embedded transport has no broadcast)."""
    replies = client.app.control.inspect(timeout=timeout_s).active_queues() or {}
    counts: dict[str, int] = {}
    for queues in replies.values():
        for queue in queues or []:
            counts[queue["name"]] = counts.get(queue["name"], 0) + 1
    return counts, set(client.live_workers()) <= set(replies)


def list_queues(client: Client, job_ids: list[str] | None = None, timeout_s: float = 1.0, *,
                consumers: bool = True) -> list[QueueInfo]:
    """The configured queues, and every other queue of ours that holds messages or
    PENDING jobs, with their consumers where known (see the module docstring).

    Args:
        client: whose broker, store and settings.
        job_ids: only these PENDING jobs are looked up (default: all, oldest 1,000).
        timeout_s: how long workers get to say which queues they consume, seconds.
        consumers: ``False``: do not ask the workers (on Redis the counts stay ``None``).

    Returns:
        The configured queues first (online, bulk), then the others by name.

    Raises:
        kombu / redis / AMQP connection errors when the broker cannot be reached;
        ``StoreUnavailableError`` when the results store cannot.
    """
    from kombu.exceptions import ChannelError

    settings = client.settings
    configured = [settings.online_queue, settings.bulk_queue]
    pending = client.store.pending_jobs_by_queue(job_ids)
    options = dict(client.app.conf.broker_transport_options or {})
    if settings.broker_is_redis:
        options.update(socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S)
    found: dict[str, QueueInfo] = {}
    with client.app.connection_for_read(connect_timeout=BROKER_TIMEOUT_S, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5)
        with conn.channel() as channel:
            names = _broker_queue_names(channel, settings) if job_ids is None else set()
        for name in [*configured, *sorted((names | set(pending)) - set(configured))]:
            with conn.channel() as channel:  # RabbitMQ closes a channel on a failed passive declare
                try:
                    ok = channel.queue_declare(queue=name, passive=True)
                except ChannelError:  # never declared: nothing was sent there
                    waiting, count = 0, (0 if not settings.broker_is_redis and not settings.embedded_broker
                                         else None)
                else:
                    waiting = ok.message_count
                    count = None if settings.broker_is_redis or settings.embedded_broker else ok.consumer_count
            found[name] = QueueInfo(name, waiting, count, configured=name in configured,
                                    pending_jobs=pending.get(name, []))
    if settings.broker_is_redis and consumers:
        counts, complete = _active_queues(client, timeout_s)
        for info in found.values():
            info.consumers, info.exact = counts.get(info.name, 0), complete
    return [q for q in found.values() if q.configured or q.waiting or q.pending_jobs]


def unserved_warning(info: QueueInfo) -> str:
    """What to tell the user about a queue no worker consumes (see :attr:`QueueInfo.unserved`)."""
    return (f"queue {info.name} holds {info.waiting} message(s) and {len(info.pending_jobs)} PENDING job(s), "
            "and no live worker consumes it: start workers on it, or check that the producer's and the "
            "workers' online_queue / bulk_queue settings match (`mlf workers`, `mlf config`)")


def job_queue_warning(client: Client, job_id: str, *, prefix: bool = True) -> str | None:
    """:func:`unserved_warning` for the queue of PENDING job ``job_id`` when no live worker
    consumes it, after ``job <id> is PENDING: `` unless ``prefix`` is false; else ``None``
    (also when the broker cannot be asked: a status must not fail for that)."""
    import logging

    try:
        queues = list_queues(client, [job_id])
    except Exception as exc:  # noqa: BLE001 - the broker's state is extra information here
        logging.getLogger(__name__).debug("cannot read the queues of job %s: %s", job_id, exc)
        return None
    held = [q for q in queues if job_id in q.pending_jobs and q.unserved]
    if not held:
        return None
    return (f"job {job_id} is PENDING: " if prefix else "") + unserved_warning(held[0])


__all__ = ["QueueInfo", "job_queue_warning", "list_queues", "unserved_warning"]
