"""Streamed answers of the jobs resource: a job's progress as Server-Sent Events
(``GET /v1/jobs/{id}/events``, :func:`job_events`) and its results as an Arrow IPC stream
or NDJSON (``GET /v1/jobs/{id}/results?format=arrow|ndjson``, :func:`arrow_stream`,
:func:`ndjson_stream`), written page by page from the store's
:meth:`~ml_framework.store.ResultStore.results_pages` without building the whole result.

The results generators are synchronous: Starlette's ``StreamingResponse`` runs each step
in its thread pool, so a page read from the database never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator

import pyarrow as pa

from ml_framework.errors import JobNotFoundError
from producer.api.schemas import JobOut, finite

log = logging.getLogger(__name__)

EVENTS_POLL_S = 0.5
"""Seconds between two reads of a job's status for its event stream."""
KEEPALIVE_S = 15.0
"""Seconds without an event after which the event stream sends a comment, so that proxies
keep the connection open."""
ARROW_MEDIA = "application/vnd.apache.arrow.stream"
NDJSON_MEDIA = "application/x-ndjson"
SSE_MEDIA = "text/event-stream"


def sse(event: str, data: str) -> str:
    """One Server-Sent Event: ``event: <event>``, then ``data: <data>`` (one line: ``data``
    is JSON, which holds no raw newline), then a blank line."""
    return f"event: {event}\ndata: {data}\n\n"


async def job_events(read: Callable[[], Awaitable[JobOut]], disconnected: Callable[[], Awaitable[bool]], *,
                     job_id: str = "-", poll_s: float = EVENTS_POLL_S, keepalive_s: float = KEEPALIVE_S,
                     clock: Callable[[], float] = time.monotonic) -> AsyncIterator[str]:
    """A job's progress as Server-Sent Events, until it ends or the client goes.

    Reads the job every ``poll_s`` seconds; sends ``event: progress`` (data: the job as
    ``GET /v1/jobs/{id}`` answers it) on the first read and whenever its state or counts
    change, a comment line (``: keep-alive``) after ``keepalive_s`` seconds without one,
    and, once the job is SUCCEEDED, PARTIAL, FAILED or CANCELLED, ``event: end`` with the
    same body; then the stream ends. A job deleted meanwhile ends it with
    ``event: error`` (``{"error": {"type": "JobNotFoundError", ...}}``).

    Args:
        read: the job's current answer (reads the store off the event loop).
        disconnected: whether the client has gone; checked before each read (Starlette
            also cancels the stream when it sees the client go).
        job_id: named in the log line when the client goes.
    """
    last, sent_at, ended = None, clock(), False
    try:
        while not await disconnected():
            try:
                job = await read()
            except JobNotFoundError:
                ended = True
                yield sse("error", json.dumps({"error": {"type": "JobNotFoundError",
                                                         "message": "the job was deleted"}}))
                return
            seen = (job.state, job.rows_ok, job.rows_failed, job.shards_done, job.started_at, job.finished_at)
            body = job.model_dump_json()
            if seen != last:
                yield sse("progress", body)
                last, sent_at = seen, clock()
            elif clock() - sent_at >= keepalive_s:
                yield ": keep-alive\n\n"
                sent_at = clock()
            if job.state not in ("PENDING", "RUNNING"):
                ended = True
                yield sse("end", body)
                return
            await asyncio.sleep(poll_s)
    finally:  # also when Starlette cancels the stream on the client's disconnect
        if not ended:
            log.info("job %s: event stream closed by the client", job_id)


class _Chunk(io.RawIOBase):
    """A write-only file whose written bytes :meth:`take` hands over and forgets."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        """The bytes written since the last call."""
        out, self._parts = b"".join(self._parts), []
        return out


def arrow_stream(pages: Iterable[pa.Table], job_id: str) -> Iterator[bytes]:
    """``pages`` (one schema, see ``ResultStore.results_pages``) as one Arrow IPC stream:
    the schema message with the first page, then one record batch message per page, then
    the end-of-stream marker. Each yielded chunk holds one page; read back with
    ``pyarrow.ipc.open_stream``. A job deleted between pages ends the stream early."""
    sink, writer = _Chunk(), None
    try:
        for page in pages:
            if writer is None:
                writer = pa.ipc.new_stream(sink, page.schema)
            writer.write_table(page)
            yield sink.take()
    except JobNotFoundError:
        log.info("job %s deleted while its results streamed", job_id)
    if writer is not None:
        writer.close()
        yield sink.take()


def _json_line(rec: dict) -> str:
    """One NDJSON line; :func:`~producer.api.schemas.finite` walks the row only when it
    holds a NaN or an infinity (stored outputs never do: the walk costs most of the time)."""
    try:
        return json.dumps(rec, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(finite(rec)) + "\n"


def ndjson_stream(pages: Iterable[pa.Table], job_id: str) -> Iterator[bytes]:
    """``pages`` as newline-delimited JSON: one object per row with every column of the
    table (``null`` where a row has no value), one chunk per page. NaN and infinities are
    written as ``null`` (the JSON rule of :mod:`producer.api.schemas`)."""
    try:
        for page in pages:
            yield "".join(_json_line(rec) for rec in page.to_pylist()).encode()
    except JobNotFoundError:
        log.info("job %s deleted while its results streamed", job_id)
