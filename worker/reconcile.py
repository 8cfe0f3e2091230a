"""Sends again the bulk shards whose messages the broker lost.

kombu's Redis transport takes a message off the queue (``BRPOP``) and then records it
as unacknowledged (``HSET unacked``) in a second command; a worker whose connection dies
between the two, as when Redis restarts, loses the message for good (kombu issues #305,
#1405). The results store knows every open shard, and the producer keeps each shard's
message there (``shards.message``: ``{"queue", "broker", "kwargs"}``), so the launcher can repair that: when the broker
holds nothing for the bulk queue (no message waiting, none unacknowledged) while shards
of open jobs are neither done nor held by a live worker, their messages were lost, and it
sends them again. A shard sent twice is still recorded once (claims and leases).
"""

from __future__ import annotations

import json
import logging

from celery import Celery

from ml_framework.celery_app import message_priority, queue_depths
from ml_framework.constants import SCORE_SHARD_TASK
from ml_framework.endpoints import broker_label
from ml_framework.settings import Settings
from ml_framework.store import ResultStore

log = logging.getLogger(__name__)

MIN_AGE_S = 30.0
"""Only jobs recorded this long ago are looked at: a producer may still be sending a new
job's shards."""


def resend_lost_shards(app: Celery, settings: Settings, store: ResultStore, min_age_s: float = MIN_AGE_S) -> int:
    """Send again the open shards whose messages are nowhere on the broker.

    Only on Redis (RabbitMQ and the embedded transport take and record a message
    atomically), and only when the bulk queue is empty and no message is unacknowledged.

    Returns:
        The number of shards sent again.

    Raises:
        kombu / redis / SQLAlchemy errors when the broker or the store cannot be reached.
    """
    if not settings.broker_is_redis:
        return 0
    depths = queue_depths(app, settings)
    if depths[settings.bulk_queue] or depths["unacked"]:
        return 0
    ours = broker_label(settings)
    lost: dict[str | None, list] = {}  # by the broker each message was sent to (None: not recorded)
    for job_id, shard_index, message, priority in store.orphaned_shards(min_age_s):
        envelope = json.loads(message)
        if envelope["queue"] == settings.bulk_queue:  # another pool's shards are its launcher's
            lost.setdefault(envelope.get("broker"), []).append((job_id, shard_index, envelope["kwargs"], priority))
    if not lost:
        return 0
    with app.producer_or_acquire() as producer:
        for shards in lost.values():
            for job_id, shard_index, kwargs, priority in shards:
                app.send_task(SCORE_SHARD_TASK, kwargs=kwargs, argsrepr="()",
                              kwargsrepr=f"job={job_id} shard={shard_index} (sent again)", queue=settings.bulk_queue,
                              priority=message_priority(settings, priority), producer=producer)
    for sent_to, shards in lost.items():
        log.warning("%s; sent them again on %s: %s", why_lost(len(shards), sent_to, ours), ours, _few(shards))
    return sum(len(shards) for shards in lost.values())


def why_lost(n: int, sent_to: str | None, ours: str) -> str:
    """What is known of ``n`` open shards whose messages the broker ``ours`` does not
    hold, from ``sent_to``, the broker their producer sent them to (``None``: not
    recorded, by producers of earlier releases)."""
    if sent_to is not None and sent_to != ours:
        return (f"{n} open shard(s) were sent to {sent_to}, not to this launcher's broker, and no worker there "
                "took them (their producer has other broker settings than the workers)")
    if sent_to is None:
        return (f"the broker holds no message for {n} open shard(s), and where they were sent was not recorded "
                "(lost by the broker, or sent to another one)")
    return (f"the broker holds no message for {n} open shard(s) sent to it: it lost them (kombu loses a message "
            "taken as a connection drops, e.g. in a Redis restart)")


def _few(shards: list) -> str:
    """``job/shard`` of the first 10 shards, ``...`` for more."""
    return ", ".join(f"{job}/{index}" for job, index, _, _ in shards[:10]) + (" ..." if len(shards) > 10 else "")
