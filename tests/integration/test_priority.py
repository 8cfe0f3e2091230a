"""Bulk-job priorities on a real Redis broker: the shards of a more urgent job queued
later are taken before those of a less urgent job queued first."""

from __future__ import annotations

import pytest
from kombu import Queue

from ml_framework.errors import JobOptionError
from ml_framework.settings import load_settings
from producer.client import Client
from tests.conftest import REDIS_URL, SHARD_SIZE, check_redis, queues

pytestmark = pytest.mark.integration


def taken_in_order(client: Client) -> list[tuple[str, int]]:
    """Drain the bulk queue the way a worker consumes it (kombu's Redis transport, highest
    priority level first); ``(job_id, shard_index)`` per message, in the order taken."""
    order = []
    with client.app.connection_for_read() as conn:
        queue = Queue(client.settings.bulk_queue, routing_key=client.settings.bulk_queue).bind(conn.default_channel)
        while (message := queue.get(no_ack=True, accept=["json"])) is not None:
            _args, kwargs, _embed = message.decode()
            order.append((kwargs["job_id"], kwargs["shard_index"]))
    return order


def test_urgent_bulk_job_overtakes_a_queued_one(trained, data_dir, tmp_path):
    check_redis()
    settings = load_settings(models_dir=trained[0], data_dir=data_dir, var_dir=tmp_path, broker_url=REDIS_URL,
                             shard_size=SHARD_SIZE, **queues("mlf.test.priority."))
    with Client(settings) as client:  # no worker consumes these queues: the test drains them itself
        routine = client.score_dataset(data_dir / "digits.csv", model="digits-sklearn")
        urgent = client.score_dataset(data_dir / "digits.parquet", model="digits-sklearn", priority=9)
        middle = client.score_rows(_rows(data_dir), model="digits-sklearn",
                                   priority=5)
        with pytest.raises(JobOptionError, match="priority must be an integer from 0 to 9"):
            client.score_dataset(data_dir / "digits.csv", model="digits-sklearn", priority=10)
        order = taken_in_order(client)
    jobs = [job_id for job_id, _ in order]
    n = {job.id: job.status().n_shards for job in (routine, urgent, middle)}
    assert jobs == [urgent.id] * n[urgent.id] + [middle.id] * n[middle.id] + [routine.id] * n[routine.id]
    assert [i for j, i in order if j == routine.id] == list(range(n[routine.id]))  # FIFO within a level
    assert (routine.status().priority, urgent.status().priority, middle.status().priority) == (0, 9, 5)


def _rows(data_dir):
    import pandas as pd

    return pd.read_csv(data_dir / "digits.csv").iloc[:SHARD_SIZE * 2]
