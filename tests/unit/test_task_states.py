"""A shard task's end for each outcome (worker.task_states): the Celery state Flower shows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery.exceptions import Ignore

from ml_framework.errors import ShardFailed
from ml_framework.store import ShardClaim
from worker.task_states import Recorded, finish


class Task:
    """A bound task's surface that :func:`finish` uses, recording the events it sends."""

    def __init__(self) -> None:
        self.request = SimpleNamespace(id="t-1", hostname="cpu0@h")
        self.app = SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=True))
        self.events: list[tuple[str, dict]] = []

    def send_event(self, type_: str, **fields: object) -> None:
        self.events.append((type_, fields))


def test_recorded_shards_succeed_with_their_counts():
    assert finish(Task(), "j", Recorded(500, 0)) == {"outcome": "DONE", "rows_ok": 500, "rows_failed": 0}
    assert finish(Task(), "j", Recorded(498, 2, first_error="row 7: bad")) == {
        "outcome": "PARTIAL", "rows_ok": 498, "rows_failed": 2}
    assert finish(Task(), "j", ShardClaim.ALREADY_DONE) == "ALREADY_DONE"


def test_a_shard_whose_every_row_failed_fails_with_the_reason():
    with pytest.raises(ShardFailed, match="dataset 'x.csv' not found"):
        finish(Task(), "j", Recorded(0, 500, error="dataset 'x.csv' not found on worker"))
    with pytest.raises(ShardFailed, match=r"every row failed \(3\); the first: row 0: oops"):
        finish(Task(), "j", Recorded(0, 3, first_error="row 0: oops"))
    with pytest.raises(ShardFailed, match="worker lost"):
        finish(Task(), "j", ShardClaim.GAVE_UP)


@pytest.mark.parametrize(("claim", "why"), [(ShardClaim.CANCELLED, "cancelled"), (ShardClaim.UNKNOWN_JOB, "deleted")])
def test_a_skipped_shard_is_reported_revoked(claim, why):
    task = Task()
    with pytest.raises(Ignore):
        finish(task, "j", claim)
    assert [(t, f["reason"]) for t, f in task.events] == [("task-revoked", f"job j {'was cancelled' if why == 'cancelled' else 'does not exist (deleted)'}")]
