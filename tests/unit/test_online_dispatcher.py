"""The producer's online dispatcher with a real results store and a real broker but no
worker: the test records answers itself, as a worker would, to pin down the timing of the
fallback poll and what close() does to requests in flight."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from demo.digits import PIXELS, export_sklearn_model, fit_sklearn, load_data
from ml_framework.settings import load_settings
from ml_framework.store import ShardOutcomeRecord
from producer.client import Client
from tests.conftest import REDIS_URL, check_redis, queues


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models")
    export_sklearn_model(fit_sklearn(load_data()), path)
    return path


def one_row() -> np.ndarray:
    return np.zeros((1, len(PIXELS)))


def test_an_unannounced_answer_is_found_by_the_first_poll(models_dir, tmp_path):
    """With Redis, answers normally come through announcements; one that is never
    announced is found by the store poll 0.2 s after the send. (Before, the idle receiver
    noticed a new request only at its next wake-up, up to 1 s later.)"""
    check_redis()
    settings = load_settings(models_dir=models_dir, var_dir=tmp_path, broker_url=REDIS_URL, **queues("mlf.test.poll."))
    with Client(settings) as client:
        client._online()
        time.sleep(1.5)  # the receiver is idle, in its longest wait
        for _ in range(3):
            request = client._send_online("digits-sklearn", one_row(), None)
            assert request.sent.wait(10) and request.send_error is None
            started = time.monotonic()
            client.store.record_online([ShardOutcomeRecord(request.job.job_id, 0, [(0, {"prediction": 1})], [])], "t")
            answer = request.answer.result(timeout=5)
            assert answer["prediction"].tolist() == [1]
            assert time.monotonic() - started < 0.6
            time.sleep(1.2)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(settings.online_queue)


def test_close_fails_requests_queued_behind_it_instead_of_hanging(models_dir, tmp_path):
    """A submit that races close(): its request is either sent or failed with a clear
    error, never left waiting. The race is widened by slowing the hand-over to the sender."""
    settings = load_settings(models_dir=models_dir, var_dir=tmp_path, **queues("mlf.test.close."))
    client = Client(settings)
    dispatcher = client._online()

    class SlowOutbox:
        def __init__(self, inner):
            self.inner = inner

        def put(self, item):
            if item is not None:
                time.sleep(0.3)
            self.inner.put(item)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    dispatcher._outbox = SlowOutbox(dispatcher._outbox)
    outcome: list[object] = []

    def submit():
        try:
            outcome.append(client.submit("digits-sklearn", one_row()))
        except Exception as exc:  # noqa: BLE001 - the expected outcome, checked below
            outcome.append(exc)

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    time.sleep(0.1)
    client.close()
    submitter.join(10)
    assert not submitter.is_alive(), "submit() hung after close()"
    assert len(outcome) == 1
    if isinstance(outcome[0], Exception):
        assert "closed" in str(outcome[0])
