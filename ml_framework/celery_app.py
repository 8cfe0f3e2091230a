"""The one Celery app both sides use: broker, serializers, acknowledgement and queues.

Producers send tasks by name (:mod:`ml_framework.constants`, bodies in :mod:`ml_framework.protocol`); the worker package registers
the task bodies on this same app (``worker.app``).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from ml_framework import broker  # noqa: F401 - registers the embedded transport
from ml_framework.constants import MAX_PRIORITY, MIN_PRIORITY, SCORE_SHARD_TASK
from ml_framework.errors import JobOptionError
from ml_framework.settings import Settings, get_settings

APP_NAME = "ml_framework"


BROKER_TIMEOUT_S = 3.0
"""Bound of a broker query made for monitoring or reconciliation, seconds."""


def check_priority(priority: int) -> int:
    """``priority`` if it is a bulk-job priority (an integer from :data:`~ml_framework.constants.MIN_PRIORITY`
    to :data:`~ml_framework.constants.MAX_PRIORITY`).

    Raises:
        JobOptionError: anything else (a ``ValueError`` too); the message names the range.
    """
    if not (isinstance(priority, int) and MIN_PRIORITY <= priority <= MAX_PRIORITY):
        raise JobOptionError(f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY} "
                             f"({MAX_PRIORITY} most urgent), got {priority!r}")
    return priority


def message_priority(settings: Settings, priority: int) -> int:
    """The broker message priority of a bulk job's shards for job ``priority`` (0-9,
    higher more urgent).

    RabbitMQ (with ``x-max-priority``, set through ``task_queue_max_priority``) takes
    higher numbers first; kombu's Redis transport takes *lower* numbers first and groups
    them into the levels of its ``priority_steps`` (default 0, 3, 6, 9: four levels), so
    the number is reversed there (Celery docs, "Redis Message Priorities"). Every shard is
    sent with an explicit priority: on Redis a message without one would land in the most
    urgent level. The embedded SQLite transport has no priorities; it takes shards in
    the order they were sent.
    """
    check_priority(priority)
    return MAX_PRIORITY - priority if settings.broker_is_redis else priority


def create_app(settings: Settings | None = None) -> Celery:
    """Build the Celery app from settings.

    Choices: JSON on the wire (msgpack also accepted; never pickle); late acknowledgement
    with reject-on-worker-lost so a killed worker's shard is redelivered; prefetch of one
    message per process because a shard runs for seconds to minutes; no Celery result
    backend (results live in the results store); queues polled in the order the worker
    lists them (online before bulk), on Redis and on the embedded transport.

    Args:
        settings: defaults to :func:`~ml_framework.settings.get_settings`.

    Returns:
        A configured :class:`celery.Celery`.
    """
    settings = settings or get_settings()
    if settings.embedded_broker:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    app = Celery(APP_NAME, broker=settings.effective_broker_url, set_as_current=False)
    transport_options: dict[str, object] = {
        "visibility_timeout": settings.broker_visibility_timeout_s,
    }
    if settings.embedded_broker:
        transport_options["polling_interval"] = settings.broker_polling_interval_s
    else:
        # kombu's Redis transport sweeps for expired unacked messages only every
        # interval x throttle = 10 x 10 s by default; sweep every <= 10 s so that a killed
        # worker's shard is redelivered soon after the visibility timeout.
        transport_options["unacked_restore_interval"] = max(1, min(10, settings.broker_visibility_timeout_s // 4))
        transport_options["unacked_restore_throttle"] = 1
        # BRPOP the consumed queues in -Q order (online first) instead of round robin.
        transport_options["queue_order_strategy"] = "priority"
    app.conf.update(
        task_serializer="json",
        accept_content=["json", "msgpack"],
        result_accept_content=["json", "msgpack"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # Celery < 5.6; then the two below
        task_acks_on_failure=True,  # a shard that failed was recorded: never deliver it again
        task_acks_on_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=settings.bulk_queue,
        task_queues=declared_queues(settings),
        task_routes={SCORE_SHARD_TASK: {"queue": settings.bulk_queue}},
        task_queue_max_priority=MAX_PRIORITY,  # RabbitMQ: declare queues with x-max-priority
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Task events for Flower (the embedded SQLite transport has no fanout to carry them):
        # sent (queued), started, succeeded / failed / revoked.
        worker_send_task_events=not settings.embedded_broker,
        task_send_sent_event=not settings.embedded_broker,
        task_track_started=True,
        enable_utc=True,
    )
    if settings.broker_queue_type == "quorum":
        # Quorum queues take no x-max-priority (RabbitMQ 3.x) and no global QoS; Celery
        # then turns global QoS off, and delays countdown retries in the broker (native
        # delayed delivery), which needs topic exchanges: with direct ones a retrying
        # worker would hold its process until the countdown ends.
        app.conf.update(task_default_queue_type="quorum", task_create_missing_queue_type="quorum",
                        task_default_exchange_type="topic", task_create_missing_queue_exchange_type="topic",
                        worker_detect_quorum_queues=True, task_queue_max_priority=None)
    return app


def declared_queues(settings: Settings) -> tuple[Queue, Queue]:
    """Our two queues, online and bulk, as Celery declares them (``task_queues``), so that
    every part of the app knows them from the start: Flower's broker page lists
    ``task_queues`` before any worker answered an inspect. Each is bound to a direct (or,
    for quorum queues, topic) exchange of its own name with its name as routing key, as
    Celery's automatic queue creation does; ``task_queue_max_priority`` and the quorum
    queue type apply to both."""
    quorum = settings.broker_queue_type == "quorum"
    arguments = {"x-queue-type": "quorum"} if quorum else None
    return tuple(Queue(name, Exchange(name, "topic" if quorum else "direct"), name, queue_arguments=arguments)
                 for name in (settings.online_queue, settings.bulk_queue))


def queue_depths(app: Celery, settings: Settings) -> dict[str, int]:
    """Messages waiting on the online and bulk queues, by queue name, read from the broker
    (every priority level of a Redis queue counted; a queue never declared counts 0).
    Bounded by :data:`BROKER_TIMEOUT_S`: a broker that accepts connections but never
    answers must not hang the caller (kombu's defaults have no read timeout).

    With Redis, the key ``"unacked"`` also gives the number of messages delivered and not
    yet acknowledged (kombu's ack emulation; every queue of the database together).

    Raises:
        kombu / redis connection errors when the broker cannot be reached.
    """
    from kombu.exceptions import ChannelError

    options = dict(app.conf.broker_transport_options or {})
    if settings.broker_is_redis:
        options.update(socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S)
    depths = {}
    with app.connection_for_read(connect_timeout=BROKER_TIMEOUT_S, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5)
        for queue in (settings.online_queue, settings.bulk_queue):
            with conn.channel() as channel:  # RabbitMQ closes a channel on a failed passive declare
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError:  # not declared yet: nothing ever sent there
                    depths[queue] = 0
        if settings.broker_is_redis:
            with conn.channel() as channel:
                depths["unacked"] = channel.client.hlen(channel.unacked_key)
    return depths
