"""The FastAPI app: start-up and shutdown of the process's shared state, middleware, error
handlers, the OpenAPI document, and the routers (see :mod:`producer.api`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ml_framework.logging import configure_logging
from ml_framework.settings import Settings, get_settings
from producer.api import jobs, models, oip, operations, ui
from producer.api.auth import KeyTable
from producer.api.bodies import BodyParser, add_body_schemas
from producer.api.callbacks import CallbackSender
from producer.api.errors import RequestIdMiddleware, StartupErrorMiddleware, install_error_handlers
from producer.api.schemas import ApiError
from producer.cache import ResultsCache
from producer.client import Client

__all__ = ["create_app"]

log = logging.getLogger("producer.api")

DESCRIPTION = (
    "Batch inference jobs on Celery workers: submit, poll, fetch results. Every endpoint but "
    "/health and /ready needs an API key (Authorize).\n\n"
    "**Changed:** `DELETE /v1/jobs/{job_id}` now deletes a job and its results (idempotent: 204 "
    "again for the key that owned it); cancelling is `POST /v1/jobs/{job_id}/cancel`. Finished "
    "jobs are deleted `results_retention` after they ended (if set)."
)
ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 415, 422, 500, 503)
"""Statuses every operation may answer with an :class:`~producer.api.schemas.ApiError` body."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API over one :class:`~producer.client.Client` (opened at start-up).

    The process's shared state lives on ``app.state`` from start-up to shutdown: ``keys``
    (:class:`~producer.api.auth.KeyTable`), ``client``, ``cache``
    (:class:`~producer.cache.ResultsCache`), ``bodies`` (:class:`~producer.api.bodies.BodyParser`),
    ``large_submissions`` (see :data:`producer.api.jobs.LARGE_SUBMISSIONS`) and ``callbacks``
    (:class:`~producer.api.callbacks.CallbackSender`, delivering completion callbacks in a
    thread of its own; ``None`` without ``callback_allowed_hosts``).

    Args:
        settings: default :func:`~ml_framework.settings.get_settings`, read at start-up.

    Returns:
        The app; start-up raises ``SettingsError`` without API keys unless ``api_auth: none``.
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
        app.state.large_submissions = threading.BoundedSemaphore(jobs.LARGE_SUBMISSIONS)
        # without allowed hosts no job can carry a callback: nothing to deliver (and a
        # process configured so never fails the callbacks of replicas configured otherwise)
        app.state.callbacks = CallbackSender(cfg, app.state.client.store) if cfg.callback_allowed_hosts else None
        if app.state.callbacks is not None:
            app.state.callbacks.start()
        try:
            yield
        finally:
            if app.state.callbacks is not None:
                app.state.callbacks.stop()
            app.state.bodies.close()
            app.state.cache.close()
            app.state.client.close()

    api = FastAPI(title="ml-framework", version="0.1.0", lifespan=lifespan, description=DESCRIPTION,
                  responses={code: {"model": ApiError} for code in ERROR_STATUSES})
    api.add_middleware(RequestIdMiddleware)
    api.add_middleware(StartupErrorMiddleware)
    install_error_handlers(api)
    default_openapi = api.openapi
    api.openapi = lambda: api.openapi_schema or add_body_schemas(default_openapi())  # type: ignore[method-assign]
    api.include_router(jobs.router)
    api.include_router(models.router)
    api.include_router(operations.router)
    api.include_router(ui.router)  # the job pages, /ui/...
    api.include_router(oip.router)  # the Open Inference Protocol, /v2/... (KServe v2 REST)
    return api
