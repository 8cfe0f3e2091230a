"""The producer's online dispatcher on Redis with a real results store but no worker: the
test records answers itself, as a worker would, without announcing them, to pin down the
fallback poll of the store."""

from __future__ import annotations

import redis

import producer.online
from ml_framework.settings import load_settings
from ml_framework.store import ShardOutcomeRecord
from producer.client import Client
from tests.conftest import REDIS_URL, check_redis, queues
from tests.unit import test_online_dispatcher
from tests.unit.test_online_dispatcher import one_row

models_dir = test_online_dispatcher.models_dir  # the fixture


def test_an_unannounced_answer_is_found_by_the_first_poll(models_dir, tmp_path, monkeypatch):
    """With Redis, answers normally come through announcements; one that is never
    announced is found by the store poll that a send schedules 0.2 s later. (Before, the
    idle receiver noticed a new request only at its next wake-up, up to its longest pause
    later.) The longest pause is made 60 s here, so that an answer can only come in time
    from the poll its send schedules; one that does not is given up after 10 s, which
    cancels its job (``store.cancel``, counted): no clock is read."""
    check_redis()
    first_s, _ = producer.online.NOTIFIED_POLL_S
    monkeypatch.setattr(producer.online, "NOTIFIED_POLL_S", (first_s, 60.0))
    settings = load_settings(models_dir=models_dir, var_dir=tmp_path, broker_url=REDIS_URL, **queues("mlf.test.poll."))
    try:
        with Client(settings) as client:
            cancelled: list[str] = []
            cancel = client.store.cancel
            monkeypatch.setattr(client.store, "cancel", lambda job_id: cancelled.append(job_id) or cancel(job_id))
            for _ in range(3):
                job = client.submit("digits-sklearn", one_row())
                client.store.record_online([ShardOutcomeRecord(job.id, 0, [(0, {"prediction": 1})], [])], "t")
                answer = client.answer(job, timeout_s=10).results()
                assert cancelled == [], "no poll found the answer: the wait ran out and cancelled the job"
                assert answer["prediction"].tolist() == [1]
    finally:
        redis.Redis.from_url(REDIS_URL).delete(settings.online_queue)
