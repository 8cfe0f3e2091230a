"""Hidden queues on Redis: a job sent to a queue the workers do not consume shows in
`mlf queues` with no consumer, and `mlf status <job>` warns (the embedded broker's case:
tests/unit/test_queues.py)."""

from __future__ import annotations

import uuid

import redis

from tests.conftest import REDIS_URL, check_redis
from tests.unit import test_queues
from tests.unit.test_queues import mlf, send_to_a_queue_nobody_reads

models = test_queues.models  # the fixture


def test_redis_flags_a_queue_without_consumer_in_mlf_queues_and_mlf_status(tmp_path, models):
    """No worker consumes the job's queue: `mlf queues` lists it with 0 consumers, flags it
    and warns; `mlf status <job>` warns that the job waits on a queue nobody reads."""
    check_redis()
    tag = uuid.uuid4().hex[:8]
    values = {"var_dir": tmp_path / "var", "models_dir": models, "broker_url": REDIS_URL,
              "bulk_queue": f"t.{tag}.bulk", "online_queue": f"t.{tag}.online"}
    job_id, hidden = send_to_a_queue_nobody_reads(values)
    try:
        run = mlf(values, "queues")
        assert run.returncode == 0, run.stderr
        row = next(line for line in run.stdout.splitlines() if hidden in line)
        assert [cell.strip() for cell in row.strip("│ ").split("│")] == [f"{hidden}  (no consumer)", "1", "0", "1"]
        assert f"queue {hidden} holds 1 message(s) and 1 PENDING job(s), and no live worker consumes it" in run.stderr
        assert "consumers:" not in run.stdout and " = " not in run.stdout, run.stdout  # no mark, no legend
        run = mlf(values, "status", job_id)
        assert run.returncode == 0, run.stderr
        assert f"job {job_id} is PENDING: queue {hidden} holds 1 message(s)" in run.stderr, run.stderr
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        for queue in (hidden, values["bulk_queue"], values["online_queue"]):
            r.delete(*[k for k in r.scan_iter(f"{queue}*")], f"_kombu.binding.{queue}",
                     f"_kombu.binding_permanent.{queue}")
