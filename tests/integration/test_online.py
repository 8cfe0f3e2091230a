"""Online requests: answered ahead of a bulk backlog, from Python and over HTTP, on both
backends, with real worker processes."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from demo.digits import PIXELS, SCALE
from ml_framework.errors import JobTimeoutError
from ml_framework.settings import load_settings
from producer.api import create_app
from producer.client import Client
from tests.integration.test_scoring import own_probabilities

pytestmark = pytest.mark.integration


def unserved_settings(backend):
    """The backend's settings with online and bulk queues that no worker consumes."""
    from tests.conftest import queues

    return load_settings(**{**backend.values, **queues("mlf.test.nobody.")})


def expected_labels(trained, framework: str, frame: pd.DataFrame) -> list[int]:
    model, manifest = trained[1][framework]
    x = frame[PIXELS].to_numpy(np.float32) * SCALE
    return [manifest.outputs.labels[k] for k in own_probabilities(framework, model, x).argmax(axis=1)]


def test_online_request_overtakes_a_bulk_backlog(backend, trained, data_dir, digits):
    """With a bulk job of many shards queued, a 5-row request is answered within one
    shard's time (plus 2 s of slack), while bulk shards are still waiting."""
    big = data_dir / "digits_x4.csv"
    if not big.exists():
        pd.concat([digits.frame] * 4, ignore_index=True).to_csv(big, index=False)
    bulk = Client(load_settings(**{**backend.values, "shard_size": 400}))
    try:
        job = bulk.score_dataset(big, "digits-torch", batch_size=1)
        deadline = time.monotonic() + 120
        while sum(s["state"] == "RUNNING" for s in bulk.store.shards(job.id)) < 2:  # both workers busy
            assert time.monotonic() < deadline, backend.worker_log.read_text()[-2000:]
            time.sleep(0.05)
        rows = digits.frame.iloc[:5]
        started = time.monotonic()
        answer = backend.client.predict("digits-torch", rows[PIXELS], timeout_s=120)
        latency = time.monotonic() - started
        shards = bulk.store.shards(job.id)
        waiting = sum(s["state"] == "PENDING" for s in shards)
        durations = [(s["finished_at"] - s["started_at"]).total_seconds() for s in shards if s["state"] == "DONE"]
        print(f"online latency {latency:.2f} s; bulk shards {max(durations):.2f} s at most; {waiting} still queued")
        assert waiting > 0, "the backlog was gone before the answer: the test proves nothing"
        assert latency <= max(durations) + 2.0
        assert answer["prediction"].tolist() == expected_labels(trained, "torch", rows)
        assert answer.index.tolist() == [0, 1, 2, 3, 4] and answer["error"].isna().all()
    finally:
        bulk.get_job(job.id).cancel()
        bulk.close()


def test_predict_over_http(backend, trained, digits):
    """POST /v1/models/{name}/predict answers in order, isolates a bad row, names unknown
    models, and times out with 504."""
    rows = digits.frame[PIXELS].iloc[10:14].to_dict(orient="records")
    rows[2]["pixel_9"] = None
    with TestClient(create_app(load_settings(**backend.values, api_auth="none"))) as http:
        r = http.post("/v1/models/digits-sklearn/predict", json={"rows": rows})
        assert r.status_code == 200, r.text
        got = r.json()["rows"]
        want = expected_labels(trained, "sklearn", digits.frame.iloc[10:14])
        assert [g.get("prediction") for g in got] == [want[0], want[1], None, want[3]]
        assert got[2] == {"row": 2, "error": "row 2, field 'pixel_9': missing value", "error_field": "pixel_9"}
        assert http.post("/v1/models/nope/predict", json={"rows": rows}).status_code == 404
    # The timeout, where no worker serves the online queue: an answer that lands while the
    # request is being cancelled is returned instead of a 504, so a live worker would race it.
    unserved = unserved_settings(backend)
    with TestClient(create_app(unserved.model_copy(update={"api_auth": "none"}))) as http:
        slow = http.post("/v1/models/digits-sklearn/predict", json={"rows": rows, "timeout_s": 0.5})
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "JobTimeoutError"
    with Client(unserved) as lonely, pytest.raises(JobTimeoutError):
        lonely.predict("digits-sklearn", rows, timeout_s=0.5)


def test_concurrent_requests_are_batched_and_all_answered(backend, trained, digits):
    """200 concurrent single-row requests: every answer is right, and workers formed
    batches of more than one request."""
    from concurrent.futures import ThreadPoolExecutor

    frame = digits.frame.iloc[:200]
    want = expected_labels(trained, "sklearn", frame)

    def one(i: int):
        answer = backend.client.predict("digits-sklearn", frame[PIXELS].iloc[i:i + 1], timeout_s=120)
        return answer

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(one, range(200)))
    elapsed = time.monotonic() - started
    assert [a["prediction"].iloc[0] for a in answers] == want
    job_ids = [backend.client.store.resolve_job_id(a.attrs["job_id"]) for a in answers]
    batch_rows = [backend.client.store.shards(j)[0]["batch_rows"] for j in job_ids]
    print(f"200 requests in {elapsed:.1f} s; batch sizes: max {max(batch_rows)}, "
          f"mean {np.mean(batch_rows):.1f}")
    assert max(batch_rows) > 1


def test_a_failing_request_fails_alone_and_the_next_ones_succeed(backend, trained, digits):
    """In one gathered batch, requests whose rows make the model raise get that error;
    the others, and requests after them, get their outputs."""
    from concurrent.futures import ThreadPoolExecutor

    from ml_framework.manifest import ModelRepository
    from tests.oom_model import fails_on_negative
    from worker.export import export_torch

    models_dir = trained[0]
    if not ModelRepository(models_dir).versions("digits-strict"):
        export_torch(fails_on_negative(64, 10), models_dir, "digits-strict", method="script",
                     inputs={"columns": PIXELS}, runtime={"warmup": False},
                     dynamic_batching={"max_batch_size": 64, "max_queue_delay_ms": 50},
                     outputs={"kind": "classification", "labels": list(range(10)), "activation": "softmax"})
    rows = digits.frame[PIXELS].iloc[:16].copy()
    rows.iloc[::4, 0] = -1.0  # requests 0, 4, 8, 12 make the model raise
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: backend.client.predict("digits-strict", rows.iloc[i:i + 1], timeout_s=120),
                                range(16)))
    for i, a in enumerate(answers):
        if i % 4 == 0:
            assert "negative input" in a["error"].iloc[0], a
        else:
            assert a["error"].iloc[0] is None and a["prediction"].iloc[0] in range(10)
    after = backend.client.predict("digits-strict", digits.frame[PIXELS].iloc[20:23], timeout_s=120)
    assert after["error"].isna().all() and len(after) == 3


def test_predict_many_and_apredict_answer_every_request_in_order(backend, trained, digits):
    """predict_many sends 60 requests as one group; 60 asyncio tasks await apredict on
    one event loop. Every answer is the model's own, in the order asked."""
    import asyncio

    frame = digits.frame.iloc[300:360]
    want = expected_labels(trained, "sklearn", frame)
    requests = [frame[PIXELS].iloc[i:i + 1] for i in range(60)]
    many = backend.client.predict_many("digits-sklearn", requests, timeout_s=120)
    assert [a["prediction"].iloc[0] for a in many] == want
    assert len({a.attrs["job_id"] for a in many}) == 60

    async def all_of_them():
        return await asyncio.gather(*(backend.client.apredict("digits-sklearn", r.to_numpy(), timeout_s=120)
                                      for r in requests))

    answers = asyncio.run(all_of_them())
    assert [a["prediction"].iloc[0] for a in answers] == want
    batch_rows = [backend.client.store.shards(a.attrs["job_id"])[0]["batch_rows"] for a in answers]
    assert max(batch_rows) > 1, "60 requests sent together were never batched"


def test_a_request_nobody_serves_times_out_and_is_cancelled(backend, trained, digits):
    """With no worker on the client's online queue, predict raises JobTimeoutError after
    timeout_s and the request's job ends CANCELLED, so no worker runs it later."""
    settings = unserved_settings(backend)
    with Client(settings) as lonely:
        started = time.monotonic()
        with pytest.raises(JobTimeoutError, match="no answer within 1.5 s") as raised:
            lonely.predict("digits-sklearn", digits.frame[PIXELS].iloc[:1], timeout_s=1.5)
        assert 1.5 <= time.monotonic() - started < 10
        assert lonely.store.job(raised.value.job_id).state.value == "CANCELLED"


def test_announcements_resume_after_redis_drops_the_subscriber(backend, trained, digits):
    """Redis kills the client's pub/sub connection (as on a Redis restart); the client
    subscribes again by itself, and answers keep coming. (Before, the subscriber thread
    died silently and every later answer waited for the slow fallback poll.) Only the
    client's own connection is killed, found by its name: a bystander's subscription on
    the shared Redis (a user's worker) survives."""
    if backend.name != "redis-postgres":
        pytest.skip("announcements exist only with a Redis broker")
    import redis

    from ml_framework.protocol import done_channel

    client = backend.client
    client.predict("digits-sklearn", digits.frame[PIXELS].iloc[:1], timeout_s=120)  # subscribed by now
    r = redis.Redis.from_url(client.settings.broker_url)
    bystander = redis.Redis.from_url(client.settings.broker_url).pubsub()
    bystander_channel = f"mlf.test.bystander.{time.monotonic_ns()}"
    bystander.subscribe(bystander_channel)
    bystander.get_message(timeout=1.0)
    channel = done_channel(client.settings.online_queue)
    assert dict(r.pubsub_numsub(channel))[channel.encode()] == 1
    ours = [c["id"] for c in r.client_list(_type="pubsub") if c["name"] == client.online.subscriber_name]
    assert len(ours) == 1, r.client_list(_type="pubsub")
    assert r.client_kill_filter(_id=ours[0]) == 1
    deadline = time.monotonic() + 30
    while dict(r.pubsub_numsub(channel))[channel.encode()] != 1:
        assert time.monotonic() < deadline, "the client never subscribed again"
        time.sleep(0.05)
    answer = client.predict("digits-sklearn", digits.frame[PIXELS].iloc[5:6], timeout_s=120)
    assert answer["prediction"].iloc[0] == expected_labels(trained, "sklearn", digits.frame.iloc[5:6])[0]
    assert dict(r.pubsub_numsub(bystander_channel))[bystander_channel.encode()] == 1, "the bystander was killed"
    bystander.close()


def test_every_unanswered_request_of_predict_many_is_cancelled(backend, trained, digits):
    """predict_many with no worker on the queue: JobTimeoutError, and all three requests
    are cancelled and forgotten, not only the first (before, the others stayed PENDING and
    polled)."""
    settings = unserved_settings(backend)
    with Client(settings) as lonely:
        before = lonely.store.job_counts()
        with pytest.raises(JobTimeoutError):
            lonely.predict_many("digits-sklearn", [digits.frame[PIXELS].iloc[i:i + 1] for i in range(3)],
                                timeout_s=1.0)
        after = lonely.store.job_counts()
        assert after["CANCELLED"] - before["CANCELLED"] == 3 and after["PENDING"] == before["PENDING"]
        assert lonely.online.waiting == 0


def test_an_apredict_cancelled_by_its_caller_cancels_its_job(backend, trained, digits):
    """An asyncio task awaiting apredict is cancelled (a client disconnected): the job is
    cancelled too and no longer waited for."""
    import asyncio

    settings = unserved_settings(backend)
    with Client(settings) as lonely:
        before = lonely.store.job_counts()

        async def go():
            task = asyncio.create_task(lonely.apredict("digits-sklearn", digits.frame[PIXELS].iloc[:1], timeout_s=60))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(go())
        deadline = time.monotonic() + 30
        while lonely.store.job_counts()["CANCELLED"] == before["CANCELLED"]:
            assert time.monotonic() < deadline, "the abandoned request's job was not cancelled"
            time.sleep(0.1)
        assert lonely.store.job_counts()["PENDING"] == before["PENDING"]
        assert lonely.online.waiting == 0


def test_each_model_in_a_group_keeps_its_own_batch_limit(backend, trained, digits):
    """One message carrying requests for two models: each model's forward passes respect
    its own dynamic_batching.max_batch_size (before, the first request's model set it for
    all)."""
    import shutil

    import yaml

    models_dir = trained[0]
    target = models_dir / "digits-small-batches" / "1"
    if not target.exists():  # the sklearn model again, under another name, with a limit of 4 rows
        shutil.copytree(models_dir / "digits-sklearn" / "1", target)
        manifest = yaml.safe_load((target / "manifest.yaml").read_text())
        manifest.update(name="digits-small-batches", dynamic_batching={"max_batch_size": 4})
        (target / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    rows = [digits.frame[PIXELS].iloc[i:i + 1] for i in range(13)]
    client = backend.client
    online = client.online
    plans = [client._plan_online("digits-sklearn", rows[0], None)]
    plans += [client._plan_online("digits-small-batches", r, None) for r in rows[1:]]
    requests = [online.send(p) for p in plans]  # queued together: recorded and sent as one group
    answers = [online.result(r.job.job_id, r.answer, 120) for r in requests]
    assert all(a["error"].isna().all() for a in answers)
    small = [client.store.shards(r.job.job_id)[0]["batch_rows"] for r in requests[1:]]
    assert max(small) <= 4, small


def test_a_request_whose_rows_all_fail_conversion_gets_row_errors(backend, trained, digits):
    """No row of the request converts (a text cell): it is answered with a row error naming
    the field, instead of crashing the worker's batch (before, an empty forward pass of
    size 0 raised and the caller timed out)."""
    answer = backend.client.predict("digits-sklearn", [[1.0, "x"] + [0.0] * 62], timeout_s=60)
    assert answer.index.tolist() == [0]
    assert answer["error_field"].iloc[0] == "pixel_1" and "x" in answer["error"].iloc[0]
    after = backend.client.predict("digits-sklearn", digits.frame[PIXELS].iloc[:2], timeout_s=60)
    assert after["error"].isna().all()


def test_category_columns_and_requests_of_no_rows_are_answered(backend, trained, digits):
    """Online requests through real workers: pixels given as a pandas ``category`` of
    numbers as text get the same predictions as plain ones; a request of no rows (among
    others, and alone) is answered at once with the model's output columns, no worker
    involved (regression: an IndexError)."""
    frame = digits.frame[PIXELS].iloc[:20]
    category = frame.astype(int).astype(str).astype("category")
    want = expected_labels(trained, "sklearn", frame)
    answers = backend.client.predict_many("digits-sklearn", [category, [], frame], timeout_s=60)
    assert answers[0]["prediction"].tolist() == want and answers[2]["prediction"].tolist() == want
    assert len(answers[1]) == 0
    assert list(answers[1].columns) == ["prediction", "score", "probabilities", "error", "error_field"]
    alone = backend.client.predict("digits-sklearn", np.zeros((0, 64)), timeout_s=10)
    assert len(alone) == 0 and list(alone.columns) == list(answers[1].columns)
