"""The hard time limit of a task, enforced from outside the worker process.

Celery's threads pool, which ``mlf worker`` runs at concurrency 1 (one process per device,
no fork), does not enforce ``task_time_limit``: its hard limits live in the prefork pool. A thread inside the
worker could not enforce it either, since a model call stuck in native code may hold the
GIL. So each worker process writes a small *task file* when it starts a task and removes
it when the task ends, and the launcher (:class:`worker.launcher.Supervisor`), which
imports no ML framework and never runs a model, reads the files and SIGKILLs a process
whose task has run past the limit; it then starts a new one.

The task file is JSON: ``{"pid", "owner", "job_id", "shard_index", "started"}``; ``started``
is ``time.monotonic()`` (one clock for every process of a Linux host, not moved by
wall-clock steps), seconds; ``job_id`` / ``shard_index`` are ``null`` for a batch of online
requests. It is written to a temporary name and renamed, so the launcher never reads half
a file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

TASK_FILE_ENV = "MLF_TASK_FILE"
"""Environment variable that gives a worker process the path of its task file."""


def begin(owner: str, job_id: str | None = None, shard_index: int | None = None) -> None:
    """Record that this process starts a task now (no-op outside ``mlf worker``)."""
    path = os.environ.get(TASK_FILE_ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "owner": owner, "job_id": job_id, "shard_index": shard_index,
                   "started": time.monotonic()}, f)
    os.replace(tmp, path)


def end() -> None:
    """Record that this process's task has ended."""
    path = os.environ.get(TASK_FILE_ENV)
    if path:
        Path(path).unlink(missing_ok=True)


@dataclass(frozen=True)
class RunningTask:
    """What a worker process's task file says.

    Attributes:
        pid: the worker process.
        owner: ``hostname:pid``, the shard lease's owner.
        job_id / shard_index: the bulk shard, or ``None`` for online requests.
        started: ``time.monotonic()`` when the task started, seconds.
    """

    pid: int
    owner: str
    job_id: str | None
    shard_index: int | None
    started: float


def read(path: Path) -> RunningTask | None:
    """The task a process is running, or ``None`` (no file, or a file being replaced)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunningTask(int(data["pid"]), str(data["owner"]), data.get("job_id"), data.get("shard_index"),
                           float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
