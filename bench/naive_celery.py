"""The baseline of ``bench/online.py``: plain Celery, one task per request, the answer in
Celery's Redis result backend, as users write it by hand. Not part of ml-framework.

Worker: ``celery -A bench.naive_celery worker --pool prefork --concurrency 2``, with
``MLF_BENCH_REDIS`` (broker and result backend) and ``MLF_BENCH_MODEL`` (a ``.skops`` file)
in the environment.
"""

from __future__ import annotations

import os
from functools import lru_cache

from celery import Celery


def plain_app(name: str, default_redis: str, queue: str) -> Celery:
    """A Celery app as users set one up by hand: Redis broker and result backend
    (``MLF_BENCH_REDIS``, else ``default_redis``), JSON, one message prefetched, results
    kept 10 minutes."""
    redis = os.environ.get("MLF_BENCH_REDIS", default_redis)
    app = Celery(name, broker=redis, backend=redis)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_prefetch_multiplier=1, task_default_queue=queue, result_expires=600)
    return app


app = plain_app("naive", "redis://127.0.0.1:6379/6", "naive.predict")


@lru_cache(maxsize=1)
def model():
    """The scikit-learn model, loaded once per worker process."""
    import skops.io as sio

    path = os.environ["MLF_BENCH_MODEL"]
    return sio.load(path, trusted=sio.get_untrusted_types(file=path))


@app.task(name="naive.predict")
def predict(row: list[float]) -> dict:
    """Class probabilities of one row of 64 pixel values (already scaled to [0, 1])."""
    probs = model().predict_proba([row])[0]
    return {"prediction": int(probs.argmax()), "probabilities": probs.tolist()}
