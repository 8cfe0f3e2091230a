"""The Celery app as a worker process loads it: ``celery -A worker.app worker ...``."""

from __future__ import annotations

import logging
import os

from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from ml_framework.celery_app import create_app
from ml_framework.logging import configure_logging
from ml_framework.settings import get_settings
from worker import tasks
from worker.bindings import NodeNamedGossipQueue
from worker.metrics import DEVICE_ENV
from worker.process import WorkerContext

settings = get_settings()
app = create_app(settings)
log = logging.getLogger(__name__)
tasks.register(app)
app.steps["consumer"].add(NodeNamedGossipQueue)  # one gossip binding per node name, not per start

_hostname: list[str] = []


@setup_logging.connect
def _configure_logging(**_: object) -> None:
    """Configure the worker process's logging (stdout and the rotating file), when Celery
    sets up the worker, not when this module is imported: importing it (a test, a tool)
    must leave the importer's logging alone. Connected, so Celery installs no handlers of
    its own: its records reach ours (see :mod:`ml_framework.logging`)."""
    configure_logging(settings.logging_level, settings)


@celeryd_after_setup.connect
def _remember_hostname(sender: str, **_: object) -> None:
    _hostname.append(sender)


@worker_ready.connect
def _start_context(sender: object = None, **_: object) -> None:
    """Per-process start-up hook: make the process's context (open the store, start the
    heartbeat), then load and warm up ``worker_preload_models``. This runs in the process's
    main thread before it consumes, so no shard starts before the models are ready.
    Ends with the process's one line: ``worker cpu0@host ready: device cpu (4 threads),
    queues mlf.online, mlf.bulk, models digits/1`` (a model that failed to preload is
    logged on its own)."""
    ctx = app.mlf_context = WorkerContext(settings, _hostname[0] if _hostname else "worker")
    ctx.start()
    if settings.worker_preload_models:
        ctx.registry.preload(settings.worker_preload_models)
    log.info("worker %s ready: %s", ctx.hostname, ready_line(ctx, sender))


def ready_line(ctx: WorkerContext, consumer: object = None) -> str:
    """What a worker process says once ready: its device (and framework threads), the
    queues it consumes (from Celery's ``consumer``, else the settings) and its loaded models."""
    queues = getattr(getattr(getattr(consumer, "app", None), "amqp", None), "queues", None)
    names = list(queues.consume_from) if queues is not None and queues.consume_from else [
        ctx.settings.online_queue, ctx.settings.bulk_queue]
    device = os.environ.get(DEVICE_ENV) or "cpu"
    threads = ctx.settings.worker_threads
    return (f"device {device}" + (f" ({threads} thread{'s' if threads != 1 else ''})" if threads else "")
            + f", queues {', '.join(names)}, models {', '.join(ctx.registry.loaded()) or 'none yet'}")


def _say_through_logging(msg: str, f: object = None) -> None:
    """Celery's ``safe_say`` as a log record: Celery writes its shutdown notices
    (``worker: Warm shutdown (MainProcess)``, each after a blank line) straight to the
    terminal in every process; here they are DEBUG records (``--loglevel debug`` shows
    them), and :func:`_say_stopping` gives the one line a user needs."""
    log.debug("celery: %s", msg.strip())


def quiet_shutdown_notices() -> None:
    """Route Celery's direct terminal notices through :func:`_say_through_logging`
    (the signal handlers look ``safe_say`` up in their module when they run)."""
    import celery.apps.worker

    celery.apps.worker.safe_say = _say_through_logging


quiet_shutdown_notices()


@worker_shutting_down.connect
def _say_stopping(sender: str = "", sig: str = "", how: str = "", **_: object) -> None:
    """One line per process on a shutdown request, and only when it has something to
    finish (an idle process says nothing at INFO; the launcher said it stops them all)."""
    from celery.worker import state

    busy = len(state.active_requests)
    level = logging.INFO if busy else logging.DEBUG
    log.log(level, "worker %s: %s shutdown on %s%s", sender, how.lower(), sig,
            f", finishing {busy} running task(s) first" if busy else "")


@worker_shutdown.connect
def _stop_context(sender: object = None, **_: object) -> None:
    """Per-process shutdown hook: stop the heartbeat and remove its row. Then, in a
    process of ``mlf worker`` (which reaps it and cleans up after it), end the process
    at once once Celery has stopped (see :func:`worker.launcher.exit_now`): the interpreter's
    teardown of the libraries a worker imports took most of a second of an idle worker's
    stop."""
    ctx = getattr(app, "mlf_context", None)
    if ctx is not None:
        ctx.stop()
    from celery.bootsteps import CLOSE, TERMINATE

    from worker.watchdog import TASK_FILE_ENV

    blueprint = getattr(sender, "blueprint", None)
    if os.environ.get(TASK_FILE_ENV) and blueprint is not None and blueprint.state in (CLOSE, TERMINATE):
        from worker.launcher import exit_now

        exit_now(getattr(sender, "exitcode", None) or 0)
