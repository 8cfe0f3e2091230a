"""Bad messages: workers refuse (and log) any content type but JSON and msgpack without
deserialising it, the message schema survives JSON and refuses anything else with a
ValidationError, a malformed task body is answered REJECTED, and a message over
``max_message_bytes`` is refused by the producer before anything is recorded or sent.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import time
import types
import uuid

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ml_framework.constants import SCORE_SHARD_TASK
from ml_framework.errors import MessageTooLargeError
from ml_framework.protocol import DatasetRef, InlineRows, OnlineBatch, ScoreShard
from ml_framework.settings import load_settings
from ml_framework.store import JobState
from producer.client import Client

# ------------------------------------------------------------------ schema properties
texts = st.text(max_size=12)
row_numbers = st.integers(min_value=0, max_value=2**53)
positive = st.integers(min_value=1, max_value=2**31 - 1)


@st.composite
def row_ranges(draw) -> dict[str, int]:
    a, b = sorted((draw(row_numbers), draw(row_numbers)))
    return {"row_start": a, "row_end": b}


sources = st.one_of(
    st.builds(lambda r, p, f: DatasetRef(path=p, format=f, **r), row_ranges(), texts, st.sampled_from(["csv", "parquet"])),
    st.builds(lambda r, d: InlineRows(data_b64=d, **r), row_ranges(), st.text(max_size=40)),
)
shards = st.builds(
    ScoreShard, job_id=texts, shard_index=row_numbers, model=texts, version=positive, batch_size=positive,
    columns=st.lists(texts, max_size=5), source=sources, online=st.booleans(),
    enqueued_at=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
FIELDS = [*ScoreShard.model_fields, "kind", "path", "format", "row_start", "row_end", "data_b64", "requests"]


def wire(body: dict) -> dict:
    """``body`` as a worker receives it: through JSON text."""
    return json.loads(json.dumps(body))


@st.composite
def mutated(draw) -> dict:
    """A valid ``mlf.score_shard`` body with some fields (top level or in ``source``)
    replaced by arbitrary JSON, removed, or joined by unknown ones."""
    body = wire(draw(shards).model_dump(mode="json"))
    for _ in range(draw(st.integers(1, 3))):
        target = body["source"] if draw(st.booleans()) and isinstance(body.get("source"), dict) else body
        key = draw(st.sampled_from(FIELDS) | st.text(max_size=6))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return body


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(shards)
def test_score_shard_round_trips_through_json(shard):
    """Every valid ScoreShard comes back equal from JSON text."""
    assert ScoreShard.model_validate(wire(shard.model_dump(mode="json"))) == shard


@FAST
@given(st.lists(shards, min_size=1, max_size=3))
def test_online_batch_round_trips_through_json(requests):
    """Every valid OnlineBatch comes back equal from JSON text."""
    batch = OnlineBatch(requests=requests)
    assert OnlineBatch.model_validate(wire(batch.model_dump(mode="json"))) == batch


@FAST
@given(st.one_of(mutated(), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values)))
def test_any_json_object_validates_or_raises_validation_error(body):
    """An arbitrary JSON object is a valid message or a pydantic ValidationError, never
    another exception; a valid one round-trips."""
    for schema in (ScoreShard, OnlineBatch):
        try:
            message = schema.model_validate(body)
        except ValidationError:
            continue
        assert schema.model_validate(wire(message.model_dump(mode="json"))) == message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_enqueued_at_is_refused(value):
    """NaN or infinity in enqueued_at is refused (it has no JSON form and broke the round trip)."""
    with pytest.raises(ValidationError, match="enqueued_at"):
        ScoreShard(job_id="j", shard_index=0, model="m", version=1, batch_size=1, columns=["a"],
                   source=DatasetRef(path="d.csv", format="csv", row_start=0, row_end=1), enqueued_at=value)


def test_a_row_range_that_ends_before_it_starts_is_refused():
    """row_end < row_start is a ValidationError naming both."""
    with pytest.raises(ValidationError, match="row_end 3 is before row_start 5"):
        InlineRows(row_start=5, row_end=3, data_b64="")


TASK = types.SimpleNamespace(request=types.SimpleNamespace(hostname="test@host"), app=None)


@FAST
@given(st.one_of(mutated(), st.dictionaries(st.text(max_size=8).filter(lambda k: k != "task"), json_values)))
def test_the_worker_answers_rejected_to_a_malformed_body(body):
    """score_shard and score_online_batch return REJECTED for a body the schema refuses,
    without raising and without touching the store or the model."""
    from worker.tasks import score_online_batch, score_shard

    try:
        ScoreShard.model_validate(body)
        valid = True
    except ValidationError:
        valid = False
    assume(not valid)
    assert score_shard(TASK, **body) == "REJECTED"
    assert score_online_batch(TASK, **body) == "REJECTED" or "requests" in body


def test_a_body_with_a_key_named_task_is_rejected():
    """A JSON body whose keys include "task" is answered REJECTED like any malformed body
    (regression: it raised TypeError, the body's "task" colliding with the bound task)."""
    from worker.tasks import score_shard

    assert score_shard(TASK, **{"task": 1}) == "REJECTED"


# ------------------------------------------------------------------ message size at the producer
COLUMNS = ["a", "b"]


@pytest.fixture()
def small_limit_client(models_dir, tmp_path):
    """An embedded-broker client whose messages may hold 64 KiB, with shards of 4 rows."""
    (tmp_path / "data").mkdir()
    client = Client(load_settings(models_dir=models_dir, var_dir=tmp_path / "var", data_dir=tmp_path / "data",
                                  shard_size=4, max_message_bytes=64 * 1024, **{"bulk_queue": "q.bulk",
                                                                               "online_queue": "q.online"}))
    yield client
    client.close()


def queued(client: Client, queue: str) -> int:
    """Messages waiting on ``queue`` of the client's broker."""
    with client.app.connection_for_write() as conn:
        return conn.SimpleQueue(queue).qsize()


def padded(n: int, width: int) -> list[str]:
    """``n`` numbers written with ``width`` leading zeros: valid cells, long messages."""
    return ["0" * width + str(i % 7) for i in range(n)]


def test_inline_rows_over_the_limit_are_refused_before_anything_is_recorded(small_limit_client):
    """score_rows whose shard would exceed max_message_bytes raises, naming the shard,
    both sizes and the remedies; no job is recorded and no message sent."""
    client = small_limit_client
    rows = pd.DataFrame({"a": padded(8, 20_000), "b": padded(8, 20_000)})
    with pytest.raises(MessageTooLargeError) as err:
        client.score_rows(rows, "lr")
    message = str(err.value)
    assert message.startswith("shard 0 (rows 0-4 of <8 inline rows>) is too large to send: its message would be")
    assert "over the max_message_bytes limit of 0.1 MiB (65536 bytes)" in message
    assert "smaller shard_size (now 4 rows)" in message
    assert "data directory" not in message  # rows given in memory: there is no file to move
    assert message.endswith("Nothing was recorded or sent.")
    assert sum(client.store.job_counts().values()) == 0 and queued(client, "q.bulk") == 0


def test_a_later_shard_over_the_limit_cancels_the_job_naming_it(small_limit_client, tmp_path):
    """A file outside the data directory whose second shard is too big: the first shard
    is sent, then the job is cancelled with an error naming the job and shard 1."""
    client = small_limit_client
    path = tmp_path / "outside.csv"
    pd.DataFrame({"a": ["1"] * 4 + padded(4, 20_000), "b": ["2"] * 8}).to_csv(path, index=False)
    with pytest.raises(MessageTooLargeError, match=r"^job [0-9a-f]{32} shard 1 \(rows 4-8 of .*outside.csv\) is too large") as err:
        client.score_dataset(path, "lr")
    assert str(err.value).endswith("The job was cancelled; no further shard is sent.")
    job_id = str(err.value).split()[1]
    assert client.get_job(job_id).status().state is JobState.CANCELLED and queued(client, "q.bulk") == 1


def test_a_file_under_the_data_directory_travels_by_reference_whatever_its_size(small_limit_client):
    """The same long rows under the data directory are sent as references: never refused."""
    client = small_limit_client
    path = client.settings.data_dir / "inside.csv"
    pd.DataFrame({"a": padded(8, 20_000), "b": padded(8, 20_000)}).to_csv(path, index=False)
    job = client.score_dataset(path, "lr")
    assert job.status().n_shards == 2 and queued(client, "q.bulk") == 2


def test_an_online_request_over_the_limit_is_refused_before_anything_is_recorded(small_limit_client):
    """An online request too big for one message is refused, naming the request and sizes."""
    client = small_limit_client
    rows = pd.DataFrame({"a": padded(3, 30_000), "b": padded(3, 30_000)})
    with pytest.raises(MessageTooLargeError, match=r"^online request [0-9a-f]{32} \(3 rows\) is too large to send") as err:
        client.submit("lr", rows)
    assert "send fewer rows per request" in str(err.value)
    assert sum(client.store.job_counts().values()) == 0 and queued(client, "q.online") == 0


# ------------------------------------------------------------------ content types at real workers
class Touch:
    """Unpickling this creates ``path`` (``pathlib.Path.touch``): proof of deserialisation."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.mark.integration
def test_pickle_and_yaml_messages_are_refused_unread_and_workers_keep_serving(backend, trained, data_dir, tmp_path):
    """A pickle and a YAML task message on the bulk queue are refused and logged by the
    workers ("Refusing to deserialize"), never deserialised (their payloads would create
    marker files), and the same workers then score a normal job."""
    from kombu import Producer

    marker = tmp_path / f"deserialised-{backend.name}"
    payloads = {
        "application/x-python-serialize": pickle.dumps(((), {"x": Touch(marker)}, {})),
        "application/x-yaml": f"!!python/object/apply:os.system ['touch {marker}-yaml']".encode(),
    }
    app = backend.client.app
    queue = app.amqp.queues[backend.values["bulk_queue"]]
    with app.connection_for_write() as conn:
        producer = Producer(conn)
        for content_type, body in payloads.items():
            producer.publish(body, content_type=content_type, content_encoding="binary", exchange=queue.exchange,
                             routing_key=queue.routing_key, declare=[queue],
                             headers={"lang": "py", "task": SCORE_SHARD_TASK, "id": uuid.uuid4().hex,
                                      "argsrepr": "()", "kwargsrepr": "{}"})
    job = backend.client.score_dataset(data_dir / "digits.csv", trained[1]["sklearn"][1].name)
    assert job.wait(timeout_s=120).state is JobState.SUCCEEDED
    deadline = time.monotonic() + 30
    while True:
        log = backend.worker_log.read_text(errors="replace")
        if all(f"Refusing to deserialize untrusted content of type {t}" in log for t in ("pickle", "yaml")):
            break
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.2)
    assert "ContentDisallowed" in log
    assert not marker.exists() and not pathlib.Path(f"{marker}-yaml").exists()
