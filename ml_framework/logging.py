"""Logging set-up shared by every process (API, CLI, workers, Flower's launcher).

As the production guide specifies:

- the level comes from ``ML_FRAMEWORK_LOGGING_LEVEL`` (setting ``logging_level``);
- records are formatted ``%(asctime)s - %(name)s - %(levelname)s - %(message)s``
  (:data:`LOG_FORMAT`), or as one JSON object per line with
  ``ML_FRAMEWORK_LOG_FORMAT=json`` (python-json-logger);
- they go to stdout and to a rotating file, ``<log_dir>/ml_framework.log``, 10 MB x 5
  backups by default (``log_max_bytes``, ``log_backup_count``), shared safely by the
  processes of a host (concurrent-log-handler rotates under a file lock);
- records logged while a worker runs a task carry the task context as attributes
  ``job_id``, ``shard``, ``model`` and ``device`` (see :func:`task_context`); the text
  format appends them as ``[job=... shard=... model=... device=...]``, JSON has them as
  keys.

The handlers sit on the root logger, so Celery's own records (``celery.*``, at WARNING and
above unless the level is DEBUG) go through the same handlers once: nothing is printed
twice and nothing is lost. Worker processes connect :func:`configure_logging` to Celery's
``setup_logging`` signal, which stops Celery from installing handlers of its own.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml_framework.settings import Settings

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
LOG_FILE = "ml_framework.log"
CONTEXT_FIELDS = ("job_id", "shard", "model", "device")
OUR_LOGGERS = ("ml_framework", "producer", "worker", "demo")
_HANDLER_TAG = "_mlf_handler"

_context: contextvars.ContextVar[tuple[tuple[str, object], ...]] = contextvars.ContextVar("mlf_log_context",
                                                                                         default=())


@contextmanager
def task_context(**fields: object) -> Iterator[None]:
    """Attach ``fields`` (any of ``job_id``, ``shard``, ``model``, ``device``) to every
    record logged inside the block, in this thread or task.

    Example::

        with task_context(job_id=msg.job_id, shard=msg.shard_index, model="digits/1", device="gpu0"):
            log.info("scoring")   # ... - scoring [job=3f2a... shard=4 model=digits/1 device=gpu0]
    """
    merged = {**dict(_context.get()), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(tuple(merged.items()))
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the current task context onto each record (``None`` where unset), so that
    formatters and JSON output can name the job, shard, model and device."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the context attributes; never drops a record."""
        context = dict(_context.get())
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, context.get(name))
        return True


class TextFormatter(logging.Formatter):
    """:data:`LOG_FORMAT`, with ``[job=... shard=... model=... device=...]`` appended when
    the record carries a task context."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Format as :data:`LOG_FORMAT`, then append the context that is set."""
        text = super().format(record)
        labels = {"job_id": "job"}
        context = [f"{labels.get(n, n)}={getattr(record, n)}" for n in CONTEXT_FIELDS
                   if getattr(record, n, None) is not None]
        return f"{text} [{' '.join(context)}]" if context else text


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("%(asctime)s %(name)s %(levelname)s %(message)s " + " ".join(f"%({n})s" for n in CONTEXT_FIELDS),
                         rename_fields={"levelname": "level", "asctime": "time"})


def configure_logging(level: str = "INFO", settings: Settings | None = None, *, to_file: bool = True) -> None:
    """Install the stdout handler and, with ``settings``, the rotating file handler.

    Idempotent: a second call replaces the handlers this module installed.

    Args:
        level: a standard level name (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``); our
            loggers get it, Celery's and other libraries' stay at WARNING unless DEBUG.
        settings: where the file goes and in which format (see the module docstring);
            without it, text to stdout only.
        to_file: ``False`` for short-lived commands (``mlf status`` ...): stdout only.

    A log directory that cannot be written is reported (a warning) and skipped: logging
    to stdout goes on.
    """
    level_no = logging.getLevelName(level.upper())
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    formatter = _json_formatter() if settings is not None and settings.log_format == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    problem = None
    if settings is not None and settings.log_to_file and to_file:
        log_dir = Path(settings.effective_log_dir)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            # Several processes (a host's worker processes, the API's Uvicorn workers) share
            # the file: the standard RotatingFileHandler would let each rotate on its own
            # and lose records; concurrent-log-handler rotates under a file lock.
            from concurrent_log_handler import ConcurrentRotatingFileHandler

            handlers.append(ConcurrentRotatingFileHandler(
                str(log_dir / LOG_FILE), maxBytes=settings.log_max_bytes, backupCount=settings.log_backup_count,
                encoding="utf-8"))
        except OSError as exc:  # e.g. a read-only file system: keep stdout
            problem = f"cannot write the log file under {log_dir} ({exc}); logging to stdout only"
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter())
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries; ours propagate whatever their level
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level_no)
        logger.propagate = True
    logging.getLogger("celery").setLevel(logging.DEBUG if level_no == logging.DEBUG else logging.WARNING)
    if problem:
        logging.getLogger(__name__).warning(problem)


@contextmanager
def native_stderr_filtered(noise: Sequence[str]) -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (by native libraries as much as by
    Python) inside the block, then write it to stderr less the lines that contain one of
    the ``noise`` strings; those are logged at DEBUG instead (``--loglevel debug`` shows
    them). For imports whose native start-up messages cannot be switched off otherwise
    (TensorFlow's oneDNN notice ignores ``TF_CPP_MIN_LOG_LEVEL``).

    What the block writes reaches stderr when it ends, also when it raises; a process
    killed inside the block loses it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            _pass_on(held.read().decode("utf-8", errors="replace"), noise)


def _pass_on(text: str, noise: Sequence[str]) -> None:
    """Write ``text`` to stderr, less the lines holding one of ``noise`` (logged at DEBUG)."""
    for line in text.splitlines():
        if any(n in line for n in noise):
            logging.getLogger(__name__).debug("%s", line)
        else:
            print(line, file=sys.stderr)
    sys.stderr.flush()
