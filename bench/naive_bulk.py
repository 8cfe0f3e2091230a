"""The plain-Celery baseline of ``bench/bulk.py``: one task per row, the answer in Celery's
Redis result backend, as users write it by hand. Not part of ml-framework.

Worker: ``celery -A bench.naive_bulk worker --pool prefork --concurrency 2`` with
``MLF_BENCH_REDIS`` (broker and result backend), ``MLF_BENCH_DIR`` (the benchmark
directory) and ``MLF_BENCH_WORKLOAD`` in the environment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from bench.naive_celery import plain_app

app = plain_app("naive_bulk", "redis://127.0.0.1:6379/9", "naive.bulk")


@lru_cache(maxsize=1)
def model():
    """The workload's model, loaded once per worker process (text: the sentence-transformers
    model itself, as a user would call it)."""
    from bench.workloads import Model, load_sentence_transformer, one_thread

    one_thread()
    if os.environ["MLF_BENCH_WORKLOAD"] == "text":
        import torch

        torch.set_num_threads(1)
        return load_sentence_transformer()
    return Model(Path(os.environ["MLF_BENCH_DIR"]), os.environ["MLF_BENCH_WORKLOAD"])


@app.task(name="naive.bulk.predict")
def predict(row: list[float] | str) -> list[float]:
    """One row: a sentence (text) or the row's values in file order -> its output vector."""
    import numpy as np

    m = model()
    if isinstance(row, str):
        return m.encode([row])[0].tolist()
    return m.predict(np.asarray([row]))[0].tolist()
