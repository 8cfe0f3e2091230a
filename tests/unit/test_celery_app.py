"""The Celery app's contract: JSON/msgpack only, late acks, prefetch 1, no result backend."""

from __future__ import annotations

from ml_framework.celery_app import create_app
from ml_framework.settings import load_settings


def test_wire_format_and_acknowledgement():
    """No pickle on the wire; late acks with reject-on-worker-lost; one message prefetched."""
    conf = create_app(load_settings(broker_url="redis://127.0.0.1:6379/0")).conf
    assert conf.task_serializer == "json"
    assert set(conf.accept_content) == {"json", "msgpack"}
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result and not conf.result_backend


def test_visibility_timeout_reaches_both_transports(tmp_path):
    """Redis and the embedded transport both get the visibility timeout from settings."""
    redis = create_app(load_settings(broker_url="redis://x:1/0", broker_visibility_timeout_s=9000)).conf
    assert redis.broker_transport_options["visibility_timeout"] == 9000
    assert redis.broker_transport_options["unacked_restore_interval"] == 10
    embedded = create_app(load_settings(var_dir=tmp_path, broker_visibility_timeout_s=9000))
    assert embedded.conf.broker_url.startswith("mlfsqla+sqlite:///")
    assert embedded.conf.broker_transport_options["visibility_timeout"] == 9000


def test_quorum_queues_drop_priorities_and_global_qos():
    """RabbitMQ quorum queues take no x-max-priority (RabbitMQ 3.x) and no global QoS: with
    broker_queue_type quorum the queues Celery declares are quorum queues without them."""
    settings = load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", broker_queue_type="quorum")
    app = create_app(settings)
    assert app.conf.worker_detect_quorum_queues and app.conf.task_queue_max_priority is None
    app.amqp.queues.select([settings.online_queue, settings.bulk_queue])  # as `-Q online,bulk` does
    for queue in (settings.bulk_queue, settings.online_queue):
        assert app.amqp.queues[queue].queue_arguments == {"x-queue-type": "quorum"}
        assert app.amqp.queues[queue].exchange.type == "topic"  # native delayed delivery needs it
    classic = create_app(load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    classic.amqp.queues.select([settings.online_queue, settings.bulk_queue])
    for queue in (settings.bulk_queue, settings.online_queue):
        assert classic.amqp.queues[queue].queue_arguments in (None, {"x-max-priority": 9})


def test_both_queues_are_declared_as_the_worker_would_create_them():
    """Flower's broker page lists task_default_queue and task_queues: both of our queues
    are there from the start, bound as Celery's automatic creation binds them, and a
    failed shard's message is acknowledged (never delivered again)."""
    settings = load_settings(broker_url="redis://127.0.0.1:6379/0", bulk_queue="b.q", online_queue="o.q")
    app = create_app(settings)
    declared = {q.name: q for q in app.conf.task_queues}
    assert set(declared) == {"b.q", "o.q"}
    assert {(q.exchange.name, q.exchange.type, q.routing_key) for q in declared.values()} == {
        ("b.q", "direct", "b.q"), ("o.q", "direct", "o.q")}
    assert app.amqp.queues["o.q"].queue_arguments == {"x-max-priority": 9}  # as a created-on-demand queue had
    assert app.conf.task_acks_on_failure and app.conf.task_send_sent_event and app.conf.worker_send_task_events
    quorum = create_app(load_settings(broker_url="amqp://x//", broker_queue_type="quorum", bulk_queue="b.q"))
    assert {q.queue_arguments["x-queue-type"] for q in quorum.conf.task_queues} == {"quorum"}
