"""What the launcher's reconciler (worker/reconcile.py) says about the open shards it
sends again: the broker their producer sent them to is known, so a job sent to another
broker than the workers' is not blamed on a broker restart."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ml_framework.celery_app import create_app
from ml_framework.settings import load_settings
from producer.client import Client
from tests.conftest import REDIS_URL, check_redis, queues
from worker.reconcile import resend_lost_shards


@pytest.fixture
def model_dir(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from worker.export import export_sklearn

    x = np.random.default_rng(0).normal(size=(40, 2))
    export_sklearn(LogisticRegression().fit(x, (x.sum(axis=1) > 0).astype(int)), tmp_path / "models", "lr",
                   inputs={"columns": ["a", "b"]})
    return tmp_path / "models"


def drop_queue(app, queue: str) -> None:
    """Delete ``queue``'s messages on Redis (every priority level's list)."""
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        keys = [k for k in client.scan_iter(f"{queue}*") if client.type(k) == b"list"]
        if keys:
            client.delete(*keys)


def test_a_job_sent_to_another_broker_is_named_as_such(tmp_path, model_dir, caplog):
    """A job sent to the embedded broker while the launcher's workers listen on Redis
    (one results store): the reconciler sends its shard on Redis and says where it had
    gone, not that the broker lost it in a restart. A shard lost by Redis itself is said
    to be lost by it."""
    check_redis()
    common = {"var_dir": tmp_path / "var", "models_dir": model_dir, **queues("mlf.reconcile.")}
    embedded = load_settings(**common)
    redis = load_settings(**common, broker_url=REDIS_URL)
    rows = np.zeros((3, 2))
    with Client(embedded) as producer:
        elsewhere = producer.score_rows(rows, "lr")
    app = create_app(redis)
    with Client(redis) as producer, caplog.at_level(logging.WARNING, logger="worker.reconcile"):
        assert resend_lost_shards(app, redis, producer.store, min_age_s=0) == 1
        text = caplog.text
        assert f"1 open shard(s) were sent to embedded SQLite ({(tmp_path / 'var').resolve()}" in text, text
        assert "restart" not in text and f"{elsewhere.id}/0" in text
        caplog.clear()
        here = producer.score_rows(rows, "lr")
        drop_queue(app, redis.bulk_queue)  # Redis loses the new job's message and the one sent again
        assert resend_lost_shards(app, redis, producer.store, min_age_s=0) == 2
        assert "the broker holds no message for 1 open shard(s) sent to it: it lost them" in caplog.text
        assert f"{here.id}/0" in caplog.text
        drop_queue(app, redis.bulk_queue)
