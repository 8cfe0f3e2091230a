"""The operations endpoints: ``/health`` (liveness), ``/ready`` (broker, database and a
live worker), ``/gpu-status`` (per-GPU telemetry from worker heartbeats) and ``/metrics``
(Prometheus)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ml_framework.constants import WORKER_LIVE_S
from ml_framework.errors import StoreUnavailableError
from producer.api.auth import MetricsReader, User
from producer.api.deps import ClientDep
from producer.api.errors import problem
from producer.api.schemas import finite
from producer.client import Client

__all__ = ["all_ok", "ready_checks", "router"]

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: the API process answers (on the event loop: nothing queues it behind
    other requests). ``warnings`` says when authentication is off."""
    warning = request.app.state.keys.warning
    return {"status": "ok", "warnings": [warning]} if warning else {"status": "ok"}


def ready_checks(c: Client, request: Request) -> dict[str, str]:
    """The readiness checks ``/ready`` and ``/v2/health/ready`` both answer from.

    Args:
        c: the API's client (its results store and broker connection).
        request: the request, whose id the log lines of failed checks carry.

    Returns:
        ``{"database", "broker", "workers": text}``: each text starts with ``ok`` when the
        check passed (``workers``: ``ok: <n> live``, a heartbeat younger than
        ``WORKER_LIVE_S``), else says why, naming no server (the reason is logged under
        the request id). Workers are ``unknown`` while the database is unreachable.
    """
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
    return checks


def all_ok(checks: dict[str, str]) -> bool:
    """Whether every check of :func:`ready_checks` passed."""
    return all(v.startswith("ok") for v in checks.values())


@router.get("/ready", responses={503: {"description": "Not ready; the checks say why."}})
def ready(c: ClientDep, request: Request) -> JSONResponse:
    """Readiness: the broker and the results database are reachable and at least one
    worker heartbeat is younger than ``WORKER_LIVE_S`` (30 s). 503 with the failing checks otherwise (the
    reasons are in the log, under the request id given)."""
    checks = ready_checks(c, request)
    ok = all_ok(checks)
    return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "checks": checks})


@router.get("/gpu-status")
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
    return finite({"gpus": gpus, "reason": reason, "checked_at": datetime.now(UTC).isoformat()})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(c: ClientDep, _: MetricsReader) -> Response:
    """Prometheus metrics of the fleet as the results store sees it (role ``metrics`` or ``admin``)."""
    from producer.metrics import render

    body, content_type = render(c)
    return Response(body, media_type=content_type)
