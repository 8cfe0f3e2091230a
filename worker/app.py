"""The Celery app as a worker process loads it: ``celery -A worker.app worker ...``."""

from __future__ import annotations

import logging

from celery.signals import celeryd_after_setup, setup_logging, worker_ready, worker_shutdown

from ml_framework.celery_app import create_app
from ml_framework.logging import configure_logging
from ml_framework.settings import get_settings
from worker import tasks
from worker.process import WorkerContext

settings = get_settings()
configure_logging(settings.logging_level, settings)
app = create_app(settings)
log = logging.getLogger(__name__)
tasks.register(app)

_hostname: list[str] = []


@setup_logging.connect
def _keep_our_logging(**_: object) -> None:
    """Connected, so Celery installs no handlers of its own: its records reach ours
    (see :mod:`ml_framework.logging`)."""


@celeryd_after_setup.connect
def _remember_hostname(sender: str, **_: object) -> None:
    _hostname.append(sender)


@worker_ready.connect
def _start_context(**_: object) -> None:
    """Per-process start-up hook: make the process's context (open the store, start the
    heartbeat), then load and warm up ``worker_preload_models``. This runs in the process's
    main thread before it consumes, so no shard starts before the models are ready."""
    ctx = app.mlf_context = WorkerContext(settings, _hostname[0] if _hostname else "worker")
    ctx.start()
    if settings.worker_preload_models:
        failures = ctx.registry.preload(settings.worker_preload_models)
        log.info("preloaded %d of %d model(s): %s", len(settings.worker_preload_models) - len(failures),
                 len(settings.worker_preload_models), ", ".join(ctx.registry.loaded()) or "none")


@worker_shutdown.connect
def _stop_context(**_: object) -> None:
    ctx = getattr(app, "mlf_context", None)
    if ctx is not None:
        ctx.stop()
