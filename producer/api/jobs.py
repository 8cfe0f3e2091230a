"""The jobs resource: ``/v1/jobs`` (submit, list), ``/v1/jobs/{id}`` (status, cancel, delete),
``/v1/jobs/{id}/events`` (progress as Server-Sent Events) and ``/v1/jobs/{id}/results``
(JSON pages, CSV / Parquet downloads, Arrow IPC / NDJSON streams; the streamed answers are
written by :mod:`producer.api.streams`).

A route taking a ``{job_id}`` resolves it among the caller's own jobs
(:data:`~producer.api.auth.OwnedJobId`). ``POST /v1/jobs`` takes an ``Idempotency-Key``
(see :mod:`producer.api.requests`).
"""

from __future__ import annotations

import itertools
import logging
from contextlib import nullcontext
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ml_framework.constants import MAX_INT32
from producer.api.auth import DeletableJobId, OwnedJobId, User
from producer.api.bodies import (
    INLINE_PARSE_BYTES,
    DatasetJobRequest,
    JobFields,
    ParsedBody,
    openapi_body,
)
from producer.api.deps import ClientDep, json_body, model_named
from producer.api.requests import (
    IDEMPOTENCY_DOC,
    IDEMPOTENCY_KEY_PATTERN,
    dataset_of,
    output_uri_allowed,
    sf_string,
)
from producer.api.schemas import ApiError, JobList, JobOut, ResultsPage, finite
from producer.api.streams import (
    ARROW_MEDIA,
    NDJSON_MEDIA,
    SSE_MEDIA,
    arrow_stream,
    job_events,
    ndjson_stream,
)
from producer.cache import ResultsCache
from producer.results import encode_results

log = logging.getLogger(__name__)

MAX_PAGE_ROWS = 10_000
"""Most rows of one JSON results page."""
MAX_LISTED_JOBS = 1000
"""Most jobs ``GET /v1/jobs`` lists at once (``limit``)."""
LARGE_SUBMISSIONS = 1
"""Submissions of inline rows over :data:`~producer.api.bodies.INLINE_PARSE_BYTES` recorded
and sent at a time per API process. Encoding and sending one holds the GIL in runs of tens
of milliseconds (JSON of the shard messages); several threads doing so at once starve the
event loop, which hands the GIL to whichever thread the OS wakes. Measured with six 16 MiB
submissions on 2 shared cores (tests/integration/test_api_latency.py): the 90th percentile
of /health stays under 45 ms either way; the slowest probe was 280-650 ms without this
bound (2 runs), 70-450 ms with it (5 runs)."""

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut, openapi_extra=openapi_body("job"),
             responses={200: {"model": JobOut, "description": "Repeated with an Idempotency-Key: the key's job, "
                                                              "submitted before (header Idempotent-Replayed: true)."},
                        400: {"model": ApiError, "description": "An option out of range, or an output_uri this "
                                                                "server does not allow or cannot write to."}})
def submit_job(caller: User, parsed: Annotated[ParsedBody, Depends(json_body("job"))], c: ClientDep,
               request: Request, response: Response,
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", description=IDEMPOTENCY_DOC,
                                                             pattern=IDEMPOTENCY_KEY_PATTERN)]
               = None) -> JobOut:  # the caller first: no body is read for an unknown one
    """Submit a scoring job over a dataset file under the data directory, or inline rows
    (``DatasetJobRequest`` or ``RowsJobRequest``). With an ``Idempotency-Key``, a repeat
    answers 200 with the job the key submitted; the same key with a different body, 422.
    ``output_uri`` must lie under a prefix of the ``api_output_prefixes`` setting (400 otherwise)."""
    body = parsed.request
    assert isinstance(body, DatasetJobRequest | JobFields)
    key = None if idempotency_key is None else sf_string(idempotency_key)
    with model_named(body.model, body.version):
        if body.output_uri is not None:  # an unknown model is answered as such first
            c.repository.resolve(body.model, body.version)
            output_uri_allowed(body.output_uri, c.settings.api_output_prefixes)
        if isinstance(body, DatasetJobRequest):
            path = dataset_of(c.settings, body.dataset)
            job = c.submit_dataset(path, body.options(), owner=caller.name, idempotency_key=key)
        else:
            rows = parsed.table(lambda: c.repository.resolve(body.model, body.version))
            with request.app.state.large_submissions if rows.nbytes > INLINE_PARSE_BYTES else nullcontext():
                job = c.submit_rows(rows, body.options(), owner=caller.name, idempotency_key=key)
    if job.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    log.info("request %s: job %s %s by %s (model %s)", request.state.request_id, job.id,
             "found by its idempotency key" if job.replayed else "submitted", caller.name or "-", body.model)
    return JobOut.of(job.status(), c.settings.data_dir)


@router.get("", response_model=JobList)
def list_jobs(caller: User, c: ClientDep,
              limit: Annotated[int, Query(ge=1, le=MAX_LISTED_JOBS, description="Most jobs listed.")] = 20) -> JobList:
    """The caller's jobs (an admin's: every job): those still open (PENDING, RUNNING),
    newest first, then the most recently ended; ``limit`` in all."""
    listed = c.recent_jobs(limit, owned_by=None if caller.sees_all_jobs else caller.name)
    return JobList(jobs=[JobOut.of(st, c.settings.data_dir) for st in listed])


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ApiError}})
def get_job(job_id: OwnedJobId, c: ClientDep) -> JobOut:
    """A job's state and progress; a unique prefix of the id (8 characters or more) works too."""
    return JobOut.of(c.get_job(job_id).status(), c.settings.data_dir)


@router.post("/{job_id}/cancel", response_model=JobOut, responses={404: {"model": ApiError}})
def cancel_job(job_id: OwnedJobId, c: ClientDep) -> JobOut:
    """Cancel a job: no further shard starts; recorded results stay. A finished job is left as it is."""
    return JobOut.of(c.get_job(job_id).cancel(), c.settings.data_dir)


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={204: {"description": "Deleted, or deleted already by this key."},
                          404: {"model": ApiError}})
def delete_job(job_id: DeletableJobId, c: ClientDep, request: Request) -> Response:
    """Delete a job and everything stored of it: shards, results, row errors, cached
    renderings (a PENDING or RUNNING job is cancelled first). Idempotent: 204 again for
    the key that owned the job (by full id). Result files a client wrote are its own."""
    if job_id is not None and c.store.delete_job(job_id) is not None:
        request.app.state.cache.forget([job_id])
        log.info("request %s: job %s deleted", request.state.request_id, job_id)
    return Response(status_code=204)


EVENTS_DOC = ("Server-Sent Events: `event: progress` (data: the job, as GET /v1/jobs/{job_id} answers) at once and "
              "whenever its state or counts change, read every 0.5 s; a `: keep-alive` comment after 15 s without "
              "one; `event: end` (the same data) once the job has ended, then the stream closes.")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {SSE_MEDIA: {"schema": {"type": "string"}}}, "description": EVENTS_DOC},
                       404: {"model": ApiError}})
def job_events_stream(job_id: OwnedJobId, c: ClientDep, request: Request) -> StreamingResponse:
    """A job's progress as Server-Sent Events, until it ends or the client disconnects."""
    data_dir = c.settings.data_dir

    async def read() -> JobOut:
        return JobOut.of(await run_in_threadpool(c.store.job, job_id), data_dir)

    return StreamingResponse(job_events(read, request.is_disconnected, job_id=job_id), media_type=SSE_MEDIA,
                             headers=STREAM_HEADERS)


@router.get("/{job_id}/results", response_model=ResultsPage,
            responses={404: {"model": ApiError},
                       200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {},
                                         ARROW_MEDIA: {}, NDJSON_MEDIA: {}}}})
def job_results(
    job_id: OwnedJobId, c: ClientDep, request: Request,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_ROWS)] = 1000,
    format: Annotated[Literal["json", "csv", "parquet", "arrow", "ndjson"], Query(
        description="json: one page (offset, limit). csv, parquet: the whole result as a file. arrow (Arrow IPC "
                    "stream), ndjson (one JSON object per row): the whole result, streamed page by page.")] = "json",
) -> Any:
    """Results in input-row order: a JSON page, the whole result as CSV / Parquet, or the
    whole result streamed as Arrow IPC / NDJSON (the columns of the CSV and Parquet files;
    rows recorded when each page is read)."""
    job = c.get_job(job_id)
    if format in ("arrow", "ndjson"):
        pages = c.store.results_pages(job.id)
        # the first page reads every part's footer (a job with an output_uri): a part gone or
        # unreadable is answered as an error here, before the stream starts, not cut mid-body
        pages = itertools.chain([next(pages)], pages)
        body, media = (arrow_stream(pages, job.id), ARROW_MEDIA) if format == "arrow" \
            else (ndjson_stream(pages, job.id), NDJSON_MEDIA)
        ext = "arrows" if format == "arrow" else "ndjson"
        return StreamingResponse(body, media_type=media, headers={
            **STREAM_HEADERS, "Content-Disposition": f'attachment; filename="{job.id}.{ext}"'})
    status = job.status()
    cache: ResultsCache = request.app.state.cache
    if format != "json":
        media = "text/csv" if format == "csv" else "application/vnd.apache.parquet"
        body = cache.get_or_render(cache.key(job.id, format), status.state,
                                   lambda: encode_results(c.store.results_table(job.id), format))
        return Response(body, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{job.id}.{format}"'})
    rows = cache.get_or_compute_json(cache.key(job.id, "json", offset, limit), status.state,
                                     lambda: c.store.results_page(job.id, offset, limit))
    end = offset + limit
    return ResultsPage(job_id=job.id, state=status.state.value, n_rows=status.n_rows, offset=offset,
                       limit=limit, next_offset=end if end < status.n_rows else None, rows=finite(rows))
