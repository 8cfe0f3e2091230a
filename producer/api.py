"""The HTTP API: ``uvicorn producer.api:app --host 0.0.0.0 --port 8000``.

Endpoints (JSON unless said otherwise; errors are ``{"error": {"type", "message"}}``):

==========================================  ===============================================
``POST /v1/jobs``                           submit a job: a dataset under the data directory,
                                            or inline ``rows``; 202 with the job's status
``GET /v1/jobs/{id}``                       state and progress (id or unique prefix)
``GET /v1/jobs/{id}/results``               a page of rows (``offset``, ``limit``), or the
                                            whole result as ``?format=csv`` / ``parquet``
``DELETE /v1/jobs/{id}``                    cancel: no further shard starts
``GET /v1/models``                          the model repository
``POST /v1/models/{name}/predict``          online: score a few rows, answer synchronously
``GET /health``                             liveness: the process answers
``GET /ready``                              broker and database reachable, a worker alive
``GET /metrics``                            Prometheus text format
``GET /gpu-status``                         per-GPU telemetry from worker heartbeats
==========================================  ===============================================

Authentication: when ``api_keys`` is set, every endpoint except ``/health``, ``/ready``
and ``/metrics`` needs ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.
Bodies larger than ``api_max_request_bytes`` are refused with 413.

JSON rule: outputs are stored as finite numbers (a model returning NaN or infinity fails
that row with a row error), so results never hold NaN; any NaN or infinity that reaches a
response otherwise is written as ``null``.
"""

from __future__ import annotations

import asyncio
import hmac
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml_framework.celery_app import MAX_PRIORITY, MIN_PRIORITY
from ml_framework.errors import (
    DatasetError,
    DatasetNotFoundError,
    JobNotFoundError,
    JobTimeoutError,
    ManifestError,
    MLFrameworkError,
    ModelNotFoundError,
    StoreUnavailableError,
)
from ml_framework.logging import configure_logging
from ml_framework.manifest import MAX_INT32
from ml_framework.settings import Settings, get_settings
from ml_framework.store import JobStatus
from producer.cache import ResultsCache
from producer.client import Client
from producer.results import encode_results

PUBLIC_PATHS = {"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/redoc"}
MAX_PAGE_ROWS = 10_000
READY_WORKER_MAX_AGE_S = 30.0

Scalar = float | int | str | bool | None
Value = Scalar | list[Any]
"""A cell: a number, a text (or image path), or a tensor as nested lists."""


class ApiError(BaseModel):
    """The body of every error response."""

    class Detail(BaseModel):
        type: str = Field(description="Error class, e.g. ModelNotFoundError, ValidationError.")
        message: str = Field(description="What was wrong, naming the field, row or file.")

    error: Detail


class _JobFields(BaseModel):
    model_config = {"extra": "forbid"}

    model: str = Field(description="Model name in the repository.", min_length=1, max_length=128)
    version: int | None = Field(default=None, ge=1, le=MAX_INT32, description="Model version; default latest.")
    batch_size: int | None = Field(default=None, ge=1, le=MAX_INT32, description="Rows per forward pass.")
    columns: list[str] | None = Field(default=None, description="Dataset columns mapped onto the model inputs, in order.")
    priority: int = Field(default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                          description="0 (default) to 9 (most urgent): shards of higher-priority jobs are taken first.")


class DatasetJobRequest(_JobFields):
    """A job over a CSV or Parquet file under the data directory (read by reference)."""

    dataset: str = Field(description="Path relative to the data directory.", min_length=1)


class RowsJobRequest(_JobFields):
    """A job over rows sent in the request."""

    rows: list[dict[str, Value]] = Field(description="One object of column -> value per row (a tensor as nested "
                                                     "lists).", min_length=1)


JobRequest = DatasetJobRequest | RowsJobRequest


class PredictRequest(BaseModel):
    """An online request: a few rows scored ahead of any bulk backlog."""

    model_config = {"extra": "forbid"}

    rows: list[dict[str, Value]] = Field(min_length=1, description="One object of column -> value per row (a tensor "
                                                                   "as nested lists).")
    version: int | None = Field(default=None, ge=1, le=MAX_INT32, description="Model version; default latest.")
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Seconds to wait for the answer.")


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
    dataset: str
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
    def of(cls, st: JobStatus) -> JobOut:
        """From the store's :class:`JobStatus`."""
        return cls(job_id=st.job_id, model=st.model, model_version=st.model_version, dataset=st.dataset,
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


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message}}, headers=headers)


_STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    (JobNotFoundError, 404), (ModelNotFoundError, 404), (DatasetNotFoundError, 404), (JobTimeoutError, 504),
    (ManifestError, 409), (DatasetError, 422), (StoreUnavailableError, 503), (MLFrameworkError, 400),
]


def _client(request: Request) -> Client:
    return request.app.state.client


ClientDep = Annotated[Client, Depends(_client)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API over one :class:`~producer.client.Client` (opened at start-up).

    Args:
        settings: default :func:`~ml_framework.settings.get_settings`, read at start-up.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = settings or get_settings()
        configure_logging(cfg.logging_level, cfg)
        app.state.client = Client(cfg)
        app.state.cache = ResultsCache(cfg)
        try:
            yield
        finally:
            app.state.cache.close()
            app.state.client.close()

    api = FastAPI(
        title="ml-framework", version="0.1.0", lifespan=lifespan,
        description="Batch inference jobs on Celery workers: submit, poll, fetch results.",
        responses={code: {"model": ApiError} for code in (400, 401, 404, 409, 413, 422, 503)},
    )

    @api.middleware("http")
    async def guard(request: Request, call_next):
        cfg = request.app.state.client.settings
        if cfg.api_keys and request.url.path not in PUBLIC_PATHS:
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if not given and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not any(hmac.compare_digest(given.encode(), k.encode()) for k in cfg.api_keys):
                return _error(401, "Unauthorized", "missing or wrong API key (X-API-Key or Authorization: Bearer)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.api_max_request_bytes):
            return _error(413, "RequestTooLarge",
                          f"request body of {length} bytes exceeds api_max_request_bytes ({cfg.api_max_request_bytes})")
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > cfg.api_max_request_bytes:
                    return _error(413, "RequestTooLarge",
                                  f"request body exceeds api_max_request_bytes ({cfg.api_max_request_bytes})")
            request._body = body
        return await call_next(request)

    @api.exception_handler(MLFrameworkError)
    async def framework_error(_: Request, exc: MLFrameworkError) -> JSONResponse:
        status = next(code for cls, code in _STATUS_BY_ERROR if isinstance(exc, cls))
        return _error(status, type(exc).__name__, str(exc))

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(422, "ValidationError", "; ".join(parts))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "HTTPError", str(exc.detail), getattr(exc, "headers", None))  # e.g. Allow on 405

    @api.post("/v1/jobs", status_code=202, response_model=JobOut, tags=["jobs"])
    def submit_job(body: JobRequest, c: ClientDep) -> JobOut:
        """Submit a scoring job over a dataset file under the data directory, or inline rows."""
        if isinstance(body, DatasetJobRequest):
            root = c.settings.data_dir.resolve()
            path = (root / body.dataset).resolve()
            if not path.is_relative_to(root):
                raise DatasetError(f"dataset {body.dataset!r} is outside the data directory")
            job = c.score_dataset(path, body.model, body.version, body.batch_size, body.columns, body.priority)
        else:
            job = c.score_rows(body.rows, body.model, body.version, body.batch_size, body.columns,
                               priority=body.priority)
        return JobOut.of(job.status())

    @api.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses={404: {"model": ApiError}})
    def get_job(job_id: str, c: ClientDep) -> JobOut:
        """A job's state and progress; a unique prefix of the id works too."""
        return JobOut.of(c.get_job(job_id).status())

    @api.delete("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses={404: {"model": ApiError}})
    def cancel_job(job_id: str, c: ClientDep) -> JobOut:
        """Cancel a job: no further shard starts; recorded results stay."""
        return JobOut.of(c.get_job(job_id).cancel())

    @api.get("/v1/jobs/{job_id}/results", response_model=ResultsPage, tags=["jobs"],
             responses={404: {"model": ApiError},
                        200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
    def job_results(
        job_id: str, c: ClientDep, request: Request,
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
    def list_models(c: ClientDep) -> list[dict[str, Any]]:
        """Every model version in the repository, with its manifest."""
        return [m.model_dump(mode="json") for m in c.models()]

    @api.post("/v1/models/{name}/predict", response_model=PredictResponse, tags=["models"],
              responses={404: {"model": ApiError}, 504: {"model": ApiError}})
    async def predict(name: str, body: PredictRequest, c: ClientDep) -> PredictResponse:
        """Score a few rows now: the request goes on the online queue, which workers drain
        before their next bulk shard; 504 when no answer comes within ``timeout_s``.
        Waiting holds no thread, so one API process keeps many requests in flight."""
        answer = await c.apredict(name, body.rows, body.version, timeout_s=body.timeout_s)
        job_id = answer.attrs["job_id"]
        rows = await asyncio.to_thread(c.store.results_page, job_id, 0, len(body.rows))
        return PredictResponse(job_id=job_id, model=name, rows=_finite(rows))

    @api.get("/health", tags=["operations"])
    def health() -> dict[str, str]:
        """Liveness: the API process answers."""
        return {"status": "ok"}

    @api.get("/ready", tags=["operations"], responses={503: {"description": "Not ready; the checks say why."}})
    def ready(c: ClientDep) -> JSONResponse:
        """Readiness: the broker and the results database are reachable and at least one
        worker heartbeat is younger than 30 s. 503 with the failing checks otherwise."""
        checks: dict[str, str] = {}
        try:
            c.store.ping()
            checks["database"] = "ok"
        except StoreUnavailableError as exc:
            checks["database"] = str(exc)
        try:
            with c.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            checks["broker"] = f"{type(exc).__name__}: {exc}"
        if checks["database"] == "ok":
            n = len(c.live_workers(READY_WORKER_MAX_AGE_S))
            checks["workers"] = f"ok: {n} live" if n else "no worker heartbeat in the last 30 s"
        else:
            checks["workers"] = "unknown: the database is unreachable"
        ok = all(v.startswith("ok") for v in checks.values())
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "checks": checks})

    @api.get("/gpu-status", tags=["operations"])
    def gpu_status(c: ClientDep) -> dict[str, Any]:
        """Per-GPU telemetry from the live workers' heartbeats (NVML readings, loaded models,
        rows/s); an empty list and the reason on a CPU-only fleet."""
        workers = c.workers(READY_WORKER_MAX_AGE_S)
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
                      else "no worker heartbeat in the last 30 s")
        return _finite({"gpus": gpus, "reason": reason, "checked_at": datetime.now(UTC).isoformat()})

    @api.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def metrics(c: ClientDep) -> Response:
        """Prometheus metrics of the fleet as the results store sees it."""
        from producer.metrics import render

        body, content_type = render(c)
        return Response(body, media_type=content_type)

    return api


app = create_app()
