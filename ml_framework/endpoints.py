"""Where the work goes: the broker and the results store, named for people with their
passwords masked, and the error raised when the broker cannot be reached.

``mlf score``, ``mlf worker`` and ``mlf demo`` print these names; worker processes record
:func:`broker_label` in their heartbeat, so that a producer can tell that the live workers
listen on another broker than the one its job went to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ml_framework.constants import WORKER_LIVE_S
from ml_framework.credentials import mask_url
from ml_framework.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from ml_framework.settings import Settings
    from ml_framework.store import WorkerInfo


def broker_label(settings: Settings) -> str:
    """The broker, as people read it and heartbeats record it: its URL with the password
    masked (``redis://:**********@127.0.0.1:6379/0``), or ``embedded SQLite
    (<var_dir>/broker.sqlite)`` (absolute) when no ``broker_url`` is set."""
    if settings.embedded_broker:
        return f"embedded SQLite ({(settings.var_dir / 'broker.sqlite').resolve()})"
    return mask_url(settings.broker_url)


def store_label(settings: Settings) -> str:
    """The results store's URL, password masked (``sqlite:////abs/var/results.sqlite`` by default)."""
    return mask_url(settings.effective_database_url)


def where_line(settings: Settings) -> str:
    """One line naming the broker and the results store: ``broker: ...; results store: ...``."""
    return f"broker: {broker_label(settings)}; results store: {store_label(settings)}"


def broker_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a send raises when the broker cannot be reached: kombu's
    ``OperationalError`` (kombu wraps the transport's connection errors in it: refused,
    reset, DNS) and the Redis client's connection errors. Not ``OSError`` itself: reading
    a dataset's shards during a send may raise it, and that is no broker's fault."""
    from kombu.exceptions import OperationalError

    errors: tuple[type[BaseException], ...] = (OperationalError,)
    try:
        import redis

        errors += (redis.ConnectionError, redis.TimeoutError)
    except ImportError:  # a RabbitMQ-only install
        pass
    return errors


BROKER_CONNECT_RETRIES = 2
"""Connection attempts after the first that :func:`reach_broker` makes before giving up
(about 0.5 s in all): a submit records its job only once the broker answers."""


def reach_broker(connection) -> None:
    """Connect ``connection`` (a kombu ``Connection``), retrying :data:`BROKER_CONNECT_RETRIES`
    times 0.2-0.5 s apart: what ``mlf score`` does before it records a job, and ``mlf worker``
    before it starts a process (:func:`check_broker`).

    Raises:
        the transport's connection errors (:func:`broker_errors`) when the broker cannot be
        reached; callers wrap them with :func:`broker_unavailable`.
    """
    connection.ensure_connection(max_retries=BROKER_CONNECT_RETRIES, interval_start=0, interval_step=0.2,
                                 interval_max=0.5)


def check_broker(settings: Settings) -> None:
    """Reach ``settings``' broker once (:func:`reach_broker`) and close the connection. The
    embedded SQLite broker needs no server and is not checked.

    Raises:
        BrokerUnavailableError: the broker cannot be reached.
    """
    if settings.embedded_broker:
        return
    from ml_framework.celery_app import create_app

    try:
        with create_app(settings).connection_for_write() as conn:
            reach_broker(conn)
    except broker_errors() as exc:
        raise broker_unavailable(settings, exc) from exc


def broker_unavailable(settings: Settings, exc: BaseException, job_id: str | None = None,
                       outcome: str = "") -> BrokerUnavailableError:
    """A :class:`BrokerUnavailableError` for ``exc``: ``cannot reach the broker at <label>:
    <reason>`` followed by ``outcome`` (what became of the job). The reason is the
    transport's own text (``Error 111 connecting to 127.0.0.1:6390. Connection refused.``),
    which names host and port but no password."""
    reason = str(exc).strip() or type(exc).__name__
    message = f"cannot reach the broker at {broker_label(settings)}: {reason}"
    return BrokerUnavailableError(message + (f" {outcome}" if outcome else ""), job_id)


def workers_warning(settings: Settings, live: Sequence[WorkerInfo]) -> str | None:
    """Why a job sent with ``settings`` may wait for ever, judged from the heartbeats of
    the live worker processes ``live``; ``None`` when some live worker listens on the
    same broker (or heartbeats of older workers do not say which broker they use).

    Returns:
        ``no worker heartbeat in the last 30 s ...`` (:data:`~ml_framework.constants.WORKER_LIVE_S`) when ``live`` is empty, or a message
        naming the brokers the live workers listen on and the one this job went to.
    """
    if not live:
        return f"no worker heartbeat in the last {WORKER_LIVE_S:.0f} s; the job waits until one runs (`mlf worker`)"
    ours = broker_label(settings)
    theirs = sorted({w.broker for w in live if w.broker is not None})
    if any(w.broker is None for w in live) or ours in theirs:
        return None
    return (f"{len(live)} live worker process(es) listen on {', '.join(theirs)}, but this job went to {ours}: "
            f"it waits until a worker runs there (set ML_FRAMEWORK_BROKER_URL as the workers have it, or start "
            f"`mlf worker` with these settings)")
