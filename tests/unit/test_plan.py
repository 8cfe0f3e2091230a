"""The one shard plan (producer/plan.py): job options shared by the client and the HTTP
bodies, and one builder of shard messages for files, rows in memory and online requests."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from ml_framework.datasets import inspect
from ml_framework.datasets.source import Source, fingerprint
from ml_framework.errors import DatasetPathError
from ml_framework.manifest import InputSpec, ModelManifest, OutputSpec
from ml_framework.paths import resolve_under
from ml_framework.protocol import DatasetRef, InlineRows
from ml_framework.store import JobState, JobStatus
from ml_framework.store.idempotency import request_hash
from producer.api.bodies import DatasetJobRequest, RowsJobRequest
from producer.api.schemas import JobOut
from producer.plan import JobOptions, ShardPlan, plan_dataset, plan_rows


def _manifest(default_batch_size: int | None = None) -> ModelManifest:
    return ModelManifest(name="m", version=3, framework="sklearn", artifact="m.skops",
                         inputs=InputSpec(columns=["a", "b"]), outputs=OutputSpec(kind="regression"),
                         default_batch_size=default_batch_size)


def test_job_options_of_checks_with_the_clients_messages():
    """A Python caller's bad priority or batch size is a ValueError naming the range; good
    options keep the columns as a list."""
    with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
        JobOptions.of("m", priority=10)
    with pytest.raises(ValueError, match="batch_size must be between 1 and 2147483647, got 0"):
        JobOptions.of("m", batch_size=0)
    options = JobOptions.of("m", 2, 16, ("b", "a"), 5)
    assert (options.model, options.version, options.batch_size, options.columns, options.priority) == (
        "m", 2, 16, ["b", "a"], 5)


def test_the_http_bodies_are_job_options_and_hash_as_the_client_does():
    """The request bodies extend JobOptions: the same fields and limits, and the options
    of a body hash (idempotency) exactly as the Python client's options do."""
    assert set(JobOptions.model_fields) <= set(DatasetJobRequest.model_fields)
    assert set(JobOptions.model_fields) <= set(RowsJobRequest.model_fields)
    body = DatasetJobRequest.model_validate({"model": "m", "dataset": "d.csv", "columns": ["a", "b"], "priority": 3})
    assert type(body.options()) is JobOptions
    assert request_hash(body.options().request()) == request_hash(JobOptions.of("m", columns=["a", "b"],
                                                                               priority=3).request())
    assert JobOptions.model_json_schema()["properties"]["priority"]["maximum"] == 9


def test_rows_in_memory_make_an_inline_plan_whose_messages_carry_the_resolved_options():
    """Rows given in memory: every shard inline, the plan flagged ``inline``, the batch size
    taken from the manifest, and one message per shard in order."""
    plan = plan_rows(_manifest(default_batch_size=8), JobOptions.of("m", priority=4),
                     pa.table({"b": [1.0, 2.0, 3.0], "a": [4.0, 5.0, 6.0]}), shard_size=2, default_batch_size=64)
    assert plan.inline and not plan.online
    assert (plan.dataset, plan.n_rows, plan.ranges, plan.columns, plan.batch_size) == (
        "<3 inline rows>", 3, [(0, 2), (2, 3)], ["a", "b"], 8)
    messages = list(plan.messages("j" * 32, enqueued_at=5.0))
    assert [(m.job_id, m.shard_index, m.model, m.version, m.batch_size, m.columns, m.online, m.enqueued_at)
            for m in messages] == [("j" * 32, i, "m", 3, 8, ["a", "b"], False, 5.0) for i in range(2)]
    assert all(isinstance(m.source, InlineRows) for m in messages)
    assert plan.inline_bytes() == sum(len(m.source.data_b64) for m in messages)
    job = plan.new_job("k" * 32, owner="alice")
    assert (job.dataset, job.n_rows, job.shard_ranges, job.batch_size, job.priority, job.owner) == (
        "<3 inline rows>", 3, [(0, 2), (2, 3)], 8, 4, "alice")


def test_an_online_plan_sends_online_messages():
    """The online flag reaches every message (the worker batches them with other requests)."""
    plan = plan_rows(_manifest(), JobOptions.of("m", batch_size=2), [[1, 2]], shard_size=10, default_batch_size=64,
                     online=True)
    assert [m.online for m in plan.messages("j" * 32)] == [True]
    assert plan.batch_size == 2


def test_a_file_under_the_data_directory_is_planned_by_reference(tmp_path: Path):
    """A file under the data directory: not inline, shards by reference, the settings'
    batch size when neither the options nor the manifest give one."""
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    plan = plan_dataset(_manifest(), JobOptions.of("m"), inspect(tmp_path / "d.csv"), data_dir=tmp_path,
                        shard_size=2, default_batch_size=64)
    assert not plan.inline and plan.batch_size == 64
    sources = [m.source for m in plan.messages("j" * 32)]
    stamp = fingerprint(Source.of_path(tmp_path / "d.csv"))  # the file as planned: workers check it
    assert sources == [DatasetRef(path="d.csv", format="csv", row_start=0, row_end=2, fingerprint=stamp),
                       DatasetRef(path="d.csv", format="csv", row_start=2, row_end=3, fingerprint=stamp)]


def test_a_file_read_once_is_checked_by_its_first_shard_and_sent_in_one_pass(tmp_path: Path):
    """A file outside the data directory is inlined as it is read: ``head`` holds the first
    shard (checked before the job is recorded), and ``messages`` yields it again, then the
    rest, without reading the file twice."""
    data_dir, outside = tmp_path / "data", tmp_path / "elsewhere.csv"
    data_dir.mkdir()
    outside.write_text("a,b\n1,2\n3,4\n5,6\n")
    plan = plan_dataset(_manifest(), JobOptions.of("m"), inspect(outside), data_dir=data_dir, shard_size=2,
                        default_batch_size=64)
    assert not plan.inline and plan.n_checked == 1
    head = plan.head()
    assert len(head) == 1 and head[0].shard_index == 0
    messages = list(plan.messages("j" * 32))
    assert [m.source.row_start for m in messages] == [0, 2]
    assert messages[0].source == head[0].source
    assert all(base64.b64decode(m.source.data_b64) for m in messages)


def test_a_plan_of_no_rows_has_no_messages():
    """No rows: no shard, no message; the job is recorded with nothing to send."""
    plan = ShardPlan(_manifest(), JobOptions.of("m"), 1, ["a", "b"], "<0 inline rows>", 0, [], [], inline=True)
    assert plan.n_checked == 0 and list(plan.messages("j" * 32)) == [] and plan.head() == []


def test_job_out_is_validated_from_the_status_with_the_dataset_relative(tmp_path: Path):
    """JobOut takes every field from the store's JobStatus, shows the dataset relative to
    the data directory, an output prefix only when it is in object storage (a local one is a
    server path), and computes the progress."""
    now = datetime(2026, 1, 2, tzinfo=UTC)
    status = JobStatus(job_id="j" * 32, model="m", model_version=3, dataset=str(tmp_path / "sub" / "d.csv"),
                       state=JobState.RUNNING, n_rows=10, n_shards=2, shards_done=1, rows_ok=3, rows_failed=1,
                       batch_size=8, created_at=now, started_at=now, finished_at=None, oom_splits=2, priority=7,
                       model_load_s=1.5, owner="alice", output_uri=str(tmp_path / "out"))
    out = JobOut.of(status, tmp_path)
    assert out.model_dump() == {
        "job_id": "j" * 32, "model": "m", "model_version": 3, "dataset": "sub/d.csv", "owner": "alice",
        "state": "RUNNING", "n_rows": 10, "rows_ok": 3, "rows_failed": 1, "n_shards": 2, "shards_done": 1,
        "batch_size": 8, "oom_splits": 2, "priority": 7, "model_load_s": 1.5, "created_at": now,
        "started_at": now, "finished_at": None, "callback_state": None, "callback_attempts": 0, "progress": 0.4,
        "output_uri": "<local directory>"}
    assert JobOut.of(JobStatus(**{**status.__dict__, "output_uri": "s3://b-1/x"}), tmp_path).output_uri == "s3://b-1/x"
    empty = JobOut.of(JobStatus(**{**status.__dict__, "n_rows": 0, "rows_ok": 0, "rows_failed": 0}), tmp_path)
    assert empty.progress == 1.0


def test_resolve_under_names_the_path_as_the_caller_asks(tmp_path: Path):
    """A refusal names the path by ``name`` when given (the HTTP API cuts long ones short)."""
    with pytest.raises(DatasetPathError, match=r"^dataset 'short\.\.\.' leaves the data directory \(it lies outside it\)$"):
        resolve_under(tmp_path / "data", tmp_path / "elsewhere.csv", name="short...")
