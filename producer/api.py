"""The HTTP API: ``uvicorn producer.api:app --host 0.0.0.0 --port 8000``.

Endpoints (JSON unless said otherwise; errors are ``{"error": {"type", "message", "request_id"}}``):

==========================================  ===============================================
``POST /v1/jobs``                           submit a job: a dataset under the data directory,
                                            or inline ``rows``; 202 with the job's status (200
                                            with the same job for a repeated ``Idempotency-Key``)
``GET /v1/jobs/{id}``                       state and progress (id or unique 8+ character prefix)
``GET /v1/jobs/{id}/results``               a page of rows (``offset``, ``limit``), or the
                                            whole result as ``?format=csv`` / ``parquet``
``POST /v1/jobs/{id}/cancel``               cancel: no further shard starts; results stay
``DELETE /v1/jobs/{id}``                    delete the job and its results (cancelled first
                                            if running); 204, also when already deleted
``GET /v1/models``                          the model repository
``POST /v1/models/{name}/predict``          online: score a few rows, answer synchronously
``GET /health``                             liveness: the process answers
``GET /ready``                              broker and database reachable, a worker alive
``GET /metrics``                            Prometheus text format
``GET /gpu-status``                         per-GPU telemetry from worker heartbeats
``GET /ui/jobs``, ``/ui/jobs/{id}``         HTML job pages for a browser (:mod:`producer.ui`)
==========================================  ===============================================

Authentication (:mod:`producer.api_auth`): every endpoint but ``/health``, ``/ready`` and
the schema needs ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; the API refuses to
start without ``api_keys`` unless ``api_auth: none``. A job belongs to the key that
submitted it: other keys get 404 for it (admins see every job). ``/metrics`` needs the
``metrics`` or ``admin`` role.

Errors (:mod:`producer.api_errors`) name no server path or URL; each response carries
``X-Request-ID``, and error bodies the same ``request_id``, under which the log has the
detail. Bodies larger than ``api_max_request_bytes`` are refused with 413; bodies are
parsed off the event loop (:mod:`producer.api_bodies`), so ``/health`` answers while
large requests are in flight. A JSON route's body sent with another ``Content-Type`` (curl's
default ``application/x-www-form-urlencoded``) is answered 415 "send the body as JSON".
Dataset paths are relative to the data directory; one that misses is answered with the path
under it that exists, when some tail of it does (``data/digits.csv``: "did you mean
'digits.csv'?").

Idempotency (:mod:`ml_framework.store.idempotency`): ``POST /v1/jobs`` takes an
``Idempotency-Key`` header (IETF draft-ietf-httpapi-idempotency-key-header): a repeat with
the key and the same body from the same API key within ``idempotency_window`` answers 200
with the job the key submitted (``Idempotent-Replayed: true``), the key with another body
422. The online ``predict`` route takes no key: it answers synchronously, a few rows.

Changed in 0.2: ``DELETE /v1/jobs/{id}`` deletes the job and its results; it used to cancel,
which is now ``POST /v1/jobs/{id}/cancel``. Deleting is idempotent: 204 the first time and
every time after for the key that owned the job (while its tombstone is kept,
``deleted_job_retention``; by full id), 404 for another key, as for any job not its own.

JSON rule: outputs are stored as finite numbers (a model returning NaN or infinity fails
that row with a row error), so results never hold NaN; any NaN or infinity that reaches a
response otherwise is written as ``null``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager, contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from ml_framework.constants import MAX_INT32, WORKER_LIVE_S
from ml_framework.errors import (
    BodyInvalidError,
    ModelNotFoundError,
    ParserUnavailableError,
    RequestTooLargeError,
    StoreUnavailableError,
)
from ml_framework.logging import configure_logging
from ml_framework.settings import Settings, get_settings
from ml_framework.store import JobStatus
from producer.api_auth import DeletableJobId, KeyTable, MetricsReader, OwnedJobId, User
from producer.api_bodies import (
    INLINE_PARSE_BYTES,
    BodyParser,
    DatasetJobRequest,
    JobFields,
    ParsedBody,
    PredictFields,
    add_body_schemas,
    openapi_body,
)
from producer.api_errors import (
    RequestIdMiddleware,
    install_error_handlers,
    is_json,
    problem,
    public,
    scrub,
    send_json,
)
from producer.api_requests import IDEMPOTENCY_DOC, IDEMPOTENCY_KEY_PATTERN, dataset_under, sf_string
from producer.cache import ResultsCache
from producer.client import Client
from producer.results import encode_results
from producer.ui import router as ui_router

MAX_PAGE_ROWS = 10_000
LARGE_SUBMISSIONS = 1
"""Submissions of inline rows over :data:`~producer.api_bodies.INLINE_PARSE_BYTES` recorded
and sent at a time per API process. Encoding and sending one holds the GIL in runs of tens
of milliseconds (JSON of the shard messages); several threads doing so at once starve the
event loop, which hands the GIL to whichever thread the OS wakes. Measured with six 16 MiB
submissions on 2 shared cores (tests/integration/test_api_latency.py): the 90th percentile
of /health stays under 45 ms either way; the slowest probe was 280-650 ms without this
bound (2 runs), 70-450 ms with it (5 runs)."""
log = logging.getLogger("producer.api")


class ApiError(BaseModel):
    """The body of every error response."""

    class Detail(BaseModel):
        type: str = Field(description="Error class, e.g. ModelNotFoundError, ValidationError.")
        message: str = Field(description="What was wrong, naming the field, row or file; never a server path.")
        request_id: str = Field(description="Also in the X-Request-ID header; the server log has the detail under it.")

    error: Detail


class PredictResponse(BaseModel):
    """The outputs of an online request, one per input row, in order."""

    job_id: str
    model: str
    rows: list[dict[str, Any]] = Field(description="As in a results page: 'row' and outputs, or 'error'.")


class JobOut(BaseModel):
    """A job's state and progress."""

    job_id: str
    model: str
    model_version: int
    dataset: str = Field(description="Path relative to the data directory, or '<N inline rows>'.")
    owner: str | None = Field(description="Name of the API key that submitted the job (null: CLI, Python client).")
    state: Literal["PENDING", "RUNNING", "SUCCEEDED", "PARTIAL", "FAILED", "CANCELLED"]
    n_rows: int
    rows_ok: int
    rows_failed: int
    progress: float = Field(description="Fraction of rows recorded, 0 to 1.")
    n_shards: int
    shards_done: int
    batch_size: int
    oom_splits: int
    priority: int = Field(description="0 to 9 (9 most urgent), as submitted.")
    model_load_s: float | None = Field(description="Longest cold start (model load and warm-up) a shard waited for, "
                                                   "seconds; null when every shard found its model loaded.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, st: JobStatus, settings: Settings) -> JobOut:
        """From the store's :class:`JobStatus`; the dataset's server path is shown relative
        to the data directory."""
        return cls(job_id=st.job_id, model=st.model, model_version=st.model_version,
                   dataset=scrub(st.dataset, [settings.data_dir]), owner=st.owner,
                   state=st.state.value, n_rows=st.n_rows, rows_ok=st.rows_ok, rows_failed=st.rows_failed,
                   progress=st.rows_done / st.n_rows if st.n_rows else 1.0, n_shards=st.n_shards,
                   shards_done=st.shards_done, batch_size=st.batch_size, oom_splits=st.oom_splits,
                   priority=st.priority, model_load_s=st.model_load_s, created_at=st.created_at,
                   started_at=st.started_at, finished_at=st.finished_at)


class ResultsPage(BaseModel):
    """Recorded rows among ``[offset, offset + limit)``; rows still running are absent."""

    job_id: str
    state: str
    n_rows: int
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null after the last row.")
    rows: list[dict[str, Any]] = Field(
        description="Per row: 'row' (0-based input row) and the outputs (prediction, score, "
                    "probabilities / embedding), or 'error' and 'error_field'.")


def _finite(value: Any) -> Any:
    """The JSON rule: NaN and infinities become ``None``; containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _client(request: Request) -> Client:
    return request.app.state.client


ClientDep = Annotated[Client, Depends(_client)]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise RequestTooLargeError(f"request body of {length} bytes exceeds api_max_request_bytes ({limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"request body exceeds api_max_request_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(kind: str):
    """A dependency giving the route's JSON body ``kind`` (see :data:`producer.api_bodies.BODIES`),
    read with the size limit and parsed off the event loop."""

    async def parsed(request: Request) -> ParsedBody:
        content_type = request.headers.get("content-type")
        if not is_json(content_type):
            raise send_json(content_type)
        raw = await _read_body(request, request.app.state.client.settings.api_max_request_bytes)
        if not raw:
            raise BodyInvalidError([(("body",), "Field required")])
        try:
            return await request.app.state.bodies.parse(kind, raw)
        except BrokenProcessPool as exc:
            raise ParserUnavailableError("the process parsing the request body died (memory?); retry") from exc

    return parsed


@contextmanager
def _model_named(name: str, version: int | None) -> Iterator[None]:
    """Answer a missing model with a message naming only what the caller asked for."""
    try:
        yield
    except ModelNotFoundError as exc:
        wanted = f"model {name[:128]!r}" + (f" version {version}" if version else "")
        raise public(ModelNotFoundError(f"{wanted} not found; GET /v1/models lists the models")) from exc


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API over one :class:`~producer.client.Client` (opened at start-up).

    Args:
        settings: default :func:`~ml_framework.settings.get_settings`, read at start-up.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = settings or get_settings()
        configure_logging(cfg.logging_level, cfg)
        app.state.keys = KeyTable(cfg)  # refuses to start without keys, unless api_auth: none
        if app.state.keys.warning:
            log.warning("%s", app.state.keys.warning)
        app.state.client = Client(cfg)
        app.state.cache = ResultsCache(cfg)
        app.state.bodies = BodyParser()
        app.state.large_submissions = threading.BoundedSemaphore(LARGE_SUBMISSIONS)
        try:
            yield
        finally:
            app.state.bodies.close()
            app.state.cache.close()
            app.state.client.close()

    api = FastAPI(
        title="ml-framework", version="0.1.0", lifespan=lifespan,
        description="Batch inference jobs on Celery workers: submit, poll, fetch results. Every endpoint but "
                    "/health and /ready needs an API key (Authorize).\n\n"
                    "**Changed:** `DELETE /v1/jobs/{job_id}` now deletes a job and its results (idempotent: 204 "
                    "again for the key that owned it); cancelling is `POST /v1/jobs/{job_id}/cancel`. Finished "
                    "jobs are deleted `results_retention` after they ended (if set).",
        responses={code: {"model": ApiError} for code in (400, 401, 403, 404, 409, 413, 415, 422, 500, 503)},
    )
    api.add_middleware(RequestIdMiddleware)
    install_error_handlers(api)
    default_openapi = api.openapi
    api.openapi = lambda: api.openapi_schema or add_body_schemas(default_openapi())  # type: ignore[method-assign]

    @api.post("/v1/jobs", status_code=202, response_model=JobOut, tags=["jobs"], openapi_extra=openapi_body("job"),
              responses={200: {"model": JobOut, "description": "Repeated with an Idempotency-Key: the key's job, "
                                                               "submitted before (header Idempotent-Replayed: true)."}})
    def submit_job(caller: User, parsed: Annotated[ParsedBody, Depends(json_body("job"))], c: ClientDep,
                   request: Request, response: Response,
                   idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", description=IDEMPOTENCY_DOC,
                                                                 pattern=IDEMPOTENCY_KEY_PATTERN)]
                   = None) -> JobOut:  # the caller first: no body is read for an unknown one
        """Submit a scoring job over a dataset file under the data directory, or inline rows
        (``DatasetJobRequest`` or ``RowsJobRequest``). With an ``Idempotency-Key``, a repeat
        answers 200 with the job the key submitted; the same key with a different body, 422."""
        body = parsed.request
        key = None if idempotency_key is None else sf_string(idempotency_key)
        with _model_named(body.model, body.version):
            if isinstance(body, DatasetJobRequest):
                path = dataset_under(c.settings.data_dir, body.dataset)
                job = c.score_dataset(path, body.model, body.version, body.batch_size, body.columns, body.priority,
                                      owner=caller.name, idempotency_key=key)
            else:
                assert isinstance(body, JobFields)
                rows = parsed.table(lambda: c.repository.resolve(body.model, body.version))
                with request.app.state.large_submissions if rows.nbytes > INLINE_PARSE_BYTES else nullcontext():
                    job = c.score_rows(rows, body.model, body.version, body.batch_size, body.columns,
                                       priority=body.priority, owner=caller.name, idempotency_key=key)
        if job.replayed:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        log.info("request %s: job %s %s by %s (model %s)", request.state.request_id, job.id,
                 "found by its idempotency key" if job.replayed else "submitted", caller.name or "-", body.model)
        return JobOut.of(job.status(), c.settings)

    @api.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses={404: {"model": ApiError}})
    def get_job(job_id: OwnedJobId, c: ClientDep) -> JobOut:
        """A job's state and progress; a unique prefix of the id (8 characters or more) works too."""
        return JobOut.of(c.get_job(job_id).status(), c.settings)

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], responses={404: {"model": ApiError}})
    def cancel_job(job_id: OwnedJobId, c: ClientDep) -> JobOut:
        """Cancel a job: no further shard starts; recorded results stay. A finished job is left as it is."""
        return JobOut.of(c.get_job(job_id).cancel(), c.settings)

    @api.delete("/v1/jobs/{job_id}", status_code=204, response_class=Response, tags=["jobs"],
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

    @api.get("/v1/jobs/{job_id}/results", response_model=ResultsPage, tags=["jobs"],
             responses={404: {"model": ApiError},
                        200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
    def job_results(
        job_id: OwnedJobId, c: ClientDep, request: Request,
        offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_ROWS)] = 1000,
        format: Annotated[Literal["json", "csv", "parquet"], Query()] = "json",
    ) -> Any:
        """Results in input-row order: a JSON page, or the whole result as CSV / Parquet."""
        job = c.get_job(job_id)
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
                           limit=limit, next_offset=end if end < status.n_rows else None, rows=_finite(rows))

    @api.get("/v1/models", tags=["models"])
    def list_models(c: ClientDep, _: User) -> list[dict[str, Any]]:
        """Every model version in the repository, with its manifest."""
        return [m.model_dump(mode="json") for m in c.models()]

    @api.post("/v1/models/{name}/predict", response_model=PredictResponse, tags=["models"],
              responses={404: {"model": ApiError}, 504: {"model": ApiError}}, openapi_extra=openapi_body("predict"))
    async def predict(caller: User, name: str, parsed: Annotated[ParsedBody, Depends(json_body("predict"))],
                      c: ClientDep) -> PredictResponse:
        """Score a few rows now (a ``PredictRequest``): the request goes on the online queue,
        which workers drain before their next bulk shard; 504 when no answer comes within
        ``timeout_s``. Waiting holds no thread, so one API process keeps many requests in flight."""
        body = parsed.request
        assert isinstance(body, PredictFields)
        with _model_named(name, body.version):
            table = parsed.table(lambda: c.repository.resolve(name, body.version))
            answer = await c.apredict(name, table, body.version, timeout_s=body.timeout_s, owner=caller.name)
        job_id = answer.attrs["job_id"]
        rows = await asyncio.to_thread(c.store.results_page, job_id, 0, table.num_rows)
        return PredictResponse(job_id=job_id, model=name, rows=_finite(rows))

    @api.get("/health", tags=["operations"])
    async def health(request: Request) -> dict[str, Any]:
        """Liveness: the API process answers (on the event loop: nothing queues it behind
        other requests). ``warnings`` says when authentication is off."""
        warning = request.app.state.keys.warning
        return {"status": "ok", "warnings": [warning]} if warning else {"status": "ok"}

    @api.get("/ready", tags=["operations"], responses={503: {"description": "Not ready; the checks say why."}})
    def ready(c: ClientDep, request: Request) -> JSONResponse:
        """Readiness: the broker and the results database are reachable and at least one
        worker heartbeat is younger than 30 s. 503 with the failing checks otherwise (the
        reasons are in the log, under the request id given)."""
        checks: dict[str, str] = {}
        try:
            c.store.ping()
            checks["database"] = "ok"
        except StoreUnavailableError as exc:
            checks["database"] = problem(exc, request, "unreachable")
        try:
            with c.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the log says which
            checks["broker"] = problem(exc, request, "unreachable")
        if checks["database"] == "ok":
            n = len(c.live_workers(WORKER_LIVE_S))
            checks["workers"] = f"ok: {n} live" if n else f"no worker heartbeat in the last {WORKER_LIVE_S:.0f} s"
        else:
            checks["workers"] = "unknown: the database is unreachable"
        ok = all(v.startswith("ok") for v in checks.values())
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "checks": checks})

    @api.get("/gpu-status", tags=["operations"])
    def gpu_status(c: ClientDep, _: User) -> dict[str, Any]:
        """Per-GPU telemetry from the live workers' heartbeats (NVML readings, loaded models,
        rows/s); an empty list and the reason on a CPU-only fleet."""
        workers = c.workers(WORKER_LIVE_S)
        gpus = [
            {"worker": w.hostname, "uuid": w.device_uuid, "name": w.device_name,
             "memory_used_bytes": w.device_memory_used_bytes, "memory_total_bytes": w.device_memory_total_bytes,
             "utilization_pct": w.device_utilization_pct, "temperature_c": w.device_temperature_c,
             "power_w": w.device_power_w, "models": w.models, "rows_per_s": w.rows_per_s,
             "last_seen_at": w.last_seen_at.isoformat() if w.last_seen_at else None}
            for w in workers if w.device_uuid
        ]
        reason = None
        if not gpus:
            reason = (f"{len(workers)} live worker process(es), none on a GPU" if workers
                      else f"no worker heartbeat in the last {WORKER_LIVE_S:.0f} s")
        return _finite({"gpus": gpus, "reason": reason, "checked_at": datetime.now(UTC).isoformat()})

    @api.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def metrics(c: ClientDep, _: MetricsReader) -> Response:
        """Prometheus metrics of the fleet as the results store sees it (role ``metrics`` or ``admin``)."""
        from producer.metrics import render

        body, content_type = render(c)
        return Response(body, media_type=content_type)

    api.include_router(ui_router)  # the job pages, /ui/... (producer.ui)
    return api


app = create_app()
