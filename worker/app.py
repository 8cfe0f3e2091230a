"""The Celery app as a worker process loads it: ``celery -A worker.app worker ...``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from celery.signals import celeryd_after_setup, setup_logging, worker_ready, worker_shutdown

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


@worker_shutdown.connect
def _stop_context(sender: object = None, **_: object) -> None:
    """Per-process shutdown hook, sent by Celery once the worker has stopped consuming,
    finished its task, flushed its acknowledgements and said goodbye to the broker: stop
    the process's context (heartbeat, store), then, in a process that ``mlf worker``
    started, end the process at once (:func:`exit_now`)."""
    ctx = getattr(app, "mlf_context", None)
    if ctx is not None:
        ctx.stop()
    if os.environ.get(DEVICE_ENV):  # set by the launcher for each of its worker processes
        exit_now(getattr(sender, "exitcode", 0) or 0)


def exit_now(code: int) -> None:
    """Flush the logs and standard streams and end the process with ``code``, skipping the
    interpreter's finalization: with PyTorch or TensorFlow loaded its garbage collection
    of every module took 5 to 20 s on a loaded 2-core machine (py-spy: ``gc_collect_main``
    after the last Python frame), during which an idle worker that had already stopped
    looked hung to the launcher. Nothing of ours is left to run by then: Celery's
    shutdown is complete when ``worker_shutdown`` is sent."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to save
            stream.flush()
    os._exit(code)
