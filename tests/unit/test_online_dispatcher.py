"""The producer's online dispatcher with a real results store but no worker, on the
embedded broker: what close() does to requests in flight. (The fallback poll on Redis:
tests/integration/test_online_poll.py.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from demo.digits import PIXELS, export_sklearn_model, fit_sklearn, load_data
from ml_framework.settings import load_settings
from producer.client import Client
from producer.online import OnlineDispatcher
from tests.conftest import queues


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models")
    export_sklearn_model(fit_sklearn(load_data()), path)
    return path


def one_row() -> np.ndarray:
    return np.zeros((1, len(PIXELS)))


def test_close_fails_requests_queued_behind_it_instead_of_hanging(models_dir, tmp_path, monkeypatch):
    """A submit that races close(): its request is either sent or failed with a clear
    error, never left waiting. Events line the two up: the request is handed to the
    dispatcher just as close() begins, so both contend for the hand-over at once."""
    settings = load_settings(models_dir=models_dir, var_dir=tmp_path, **queues("mlf.test.close."))
    client = Client(settings)
    handing_over, closing = threading.Event(), threading.Event()
    send, close = OnlineDispatcher.send, OnlineDispatcher.close

    def send_as_close_begins(self, request):
        handing_over.set()
        assert closing.wait(30)
        return send(self, request)

    def close_and_say_so(self):
        closing.set()
        close(self)

    monkeypatch.setattr(OnlineDispatcher, "send", send_as_close_begins)
    monkeypatch.setattr(OnlineDispatcher, "close", close_and_say_so)
    outcome: list[object] = []

    def submit():
        try:
            outcome.append(client.submit("digits-sklearn", one_row()))
        except Exception as exc:  # noqa: BLE001 - the expected outcome, checked below
            outcome.append(exc)

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    assert handing_over.wait(30)
    client.close()
    submitter.join(30)
    assert not submitter.is_alive(), "submit() hung after close()"
    assert len(outcome) == 1
    if isinstance(outcome[0], Exception):
        assert "closed" in str(outcome[0])
