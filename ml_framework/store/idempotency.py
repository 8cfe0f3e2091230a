"""Idempotency keys of job submissions, after the IETF draft
draft-ietf-httpapi-idempotency-key-header: a client that retries a submission (say, after a
timeout) with the same key gets the job it submitted first instead of a second job.

A key is stored on the job it created (``jobs.idempotency_key``) with a SHA-256 of the
request it came with (``jobs.request_hash``). It is unique per owner (the API key's name;
the CLI and the Python client share one scope) through a unique index, so of two
submissions racing with one key exactly one records a job: the other's insert fails and it
answers with the winner's job. A key names its job for ``idempotency_window`` after the
job was created; used again after that, the old job keeps its results but loses the key,
and a new job is submitted. Deleting the job deletes its key with it. A job whose messages
could not be sent (and which was cancelled) gives its key back, so that a retry submits
anew.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select, update

from ml_framework.errors import IdempotencyKeyError, IdempotencyKeyReusedError
from ml_framework.store.models import JobRow

MAX_KEY_CHARS = 255
"""Longest key taken (``jobs.idempotency_key`` is ``VARCHAR(255)``); a UUID is 36."""

__all__ = ["MAX_KEY_CHARS", "Idempotency", "check_key", "request_hash"]


def check_key(key: str) -> str:
    """``key`` if it is 1 to :data:`MAX_KEY_CHARS` characters of printable ASCII.

    Raises:
        IdempotencyKeyError: naming what is wrong with it (not echoing it).
    """
    if not 0 < len(key) <= MAX_KEY_CHARS:
        raise IdempotencyKeyError(f"an idempotency key must be 1 to {MAX_KEY_CHARS} characters "
                                  f"(a UUID is a good one); got {len(key)}")
    if not all(" " <= ch <= "~" for ch in key):
        raise IdempotencyKeyError("an idempotency key must be printable ASCII (a UUID is a good one)")
    return key


def request_hash(request: dict[str, Any]) -> str:
    """SHA-256 (64 hex characters) of ``request``'s canonical JSON (keys sorted): two
    requests with equal fields hash alike whatever their order."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Idempotency:
    """A submission's idempotency key.

    Attributes:
        key: the client's key (see :func:`check_key`).
        request_hash: :func:`request_hash` of what was submitted.
        owner: the API key's name; ``None`` for the CLI and the Python client.
        window: how long the key names its job after the job was created; ``None``: as
            long as the job is kept.
    """

    key: str
    request_hash: str
    owner: str | None = None
    window: timedelta | None = timedelta(hours=24)

    def _scope(self):
        return (func.coalesce(JobRow.owner, "") == (self.owner or ""), JobRow.idempotency_key == self.key)

    def find(self, conn: Connection, now: datetime) -> str | None:
        """The id of the job this key names (created within the window), or ``None``.

        Raises:
            IdempotencyKeyReusedError: the key names a job submitted with another request.
        """
        query = select(JobRow.id, JobRow.request_hash).where(*self._scope())
        if self.window is not None:
            query = query.where(JobRow.created_at >= now - self.window)
        row = conn.execute(query).first()
        if row is None:
            return None
        if row.request_hash != self.request_hash:
            raise IdempotencyKeyReusedError(
                f"idempotency key {self.key!r} was used for job {row.id} with a different request (another "
                "dataset, model, rows or option); use a new key for a new job, or repeat the original request "
                "to get that job", row.id)
        return row.id

    def release_expired(self, conn: Connection, now: datetime) -> None:
        """Take the key off a job it named before the window (so that it may name a new one)."""
        if self.window is not None:
            conn.execute(update(JobRow).where(*self._scope(), JobRow.created_at < now - self.window)
                         .values(idempotency_key=None))


def release(conn: Connection, job_id: str) -> None:
    """Take the idempotency key off ``job_id`` (its messages were never sent)."""
    conn.execute(update(JobRow).where(JobRow.id == job_id).values(idempotency_key=None))
