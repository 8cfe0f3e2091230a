"""Delivery of completion callbacks, from the HTTP API process: a background thread that
every :data:`~ml_framework.constants.CALLBACK_POLL_S` claims due callbacks in the results
store and POSTs each job's signed ``job.finished`` event (see :mod:`ml_framework.callbacks`
for the event and its signature, :mod:`ml_framework.store.callbacks` for the claims).

Every API process (replica, Uvicorn worker) runs one; a claim is one conditional UPDATE, so
each attempt is posted by one process only. A 2xx answer marks the callback ``delivered``;
anything else (another status, a timeout, a refused connection) schedules the next attempt
after :func:`~ml_framework.callbacks.backoff_s`, until ``callback_max_attempts``, then
``failed``. Redirects are not followed (the allowed host is the one posted to). Logs name
the job, the attempt and the URL without its query (:func:`~ml_framework.callbacks.public_url`),
never the secret.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import httpx

from ml_framework.callbacks import (
    DEFAULT_SECRET,
    backoff_s,
    check_callback_url,
    event_body,
    headers,
    public_url,
)
from ml_framework.constants import (
    CALLBACK_BACKOFF_BASE_S,
    CALLBACK_BATCH,
    CALLBACK_LEASE_S,
    CALLBACK_POLL_S,
    CALLBACK_TIMEOUT_S,
)
from ml_framework.errors import CallbackError
from ml_framework.settings import Settings
from ml_framework.store import ResultStore
from ml_framework.store.callbacks import DueCallback

__all__ = ["CallbackSender"]

log = logging.getLogger("producer.api.callbacks")


class CallbackSender:
    """Claims due callbacks and delivers them, in a thread of its own (:meth:`start`,
    :meth:`stop`) or one pass at a time (:meth:`run_once`).

    Args:
        settings: ``callback_allowed_hosts`` (checked again before each attempt),
            ``callback_secrets``, ``callback_max_attempts``, ``api_public_url``.
        store: the results store holding the jobs.
        transport: an httpx transport (tests pass ``httpx.MockTransport``); default the
            network.
        clock: Unix seconds, for the ``X-MLF-Timestamp`` header.
        rng: a draw in ``[0, 1)`` for the backoff's jitter.
        backoff_base_s: delay after the first failed attempt, seconds, doubled after each.
    """

    def __init__(self, settings: Settings, store: ResultStore, *, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.time, rng: Callable[[], float] = random.random,
                 backoff_base_s: float = CALLBACK_BACKOFF_BASE_S) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.rng = rng
        self.backoff_base_s = backoff_base_s
        self._http = httpx.Client(timeout=CALLBACK_TIMEOUT_S, follow_redirects=False, transport=transport)
        self._pool = ThreadPoolExecutor(CALLBACK_BATCH, thread_name_prefix="mlf-callback")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Deliver in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="mlf-callbacks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = CALLBACK_TIMEOUT_S + 5) -> None:
        """Stop the thread (an attempt under way finishes first, up to ``timeout_s``) and
        close the HTTP client. A callback claimed and not attempted is taken again by any
        API process when its lease passes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _loop(self) -> None:
        """Keep up to :data:`~ml_framework.constants.CALLBACK_BATCH` attempts in flight:
        claim only as many callbacks as there are free threads, and never wait for a batch
        to finish, so that a receiver that hangs holds one thread (up to its timeout), not
        every other job's delivery."""
        in_flight: set[Future] = set()
        while not self._stop.is_set():
            in_flight = {f for f in in_flight if not f.done()}
            free = CALLBACK_BATCH - len(in_flight)
            if not free:  # every thread busy: go on when one is done
                wait(in_flight, timeout=CALLBACK_POLL_S, return_when=FIRST_COMPLETED)
                continue
            try:
                due = self.store.claim_callbacks(CALLBACK_LEASE_S, free)
            except Exception:  # a store outage must not end deliveries
                log.exception("callbacks: cannot claim due callbacks; trying again in %.0f s", CALLBACK_POLL_S)
                due = []
            in_flight |= {self._pool.submit(self._attempt_logged, cb) for cb in due}
            if len(due) < free:  # nothing more is due now
                self._stop.wait(CALLBACK_POLL_S)

    def _attempt_logged(self, cb: DueCallback) -> None:
        try:
            self.attempt(cb)
        except Exception:  # the store's errors: the lease passes and the callback is claimed again
            log.exception("callback of job %s: its outcome could not be recorded; it will be tried again", cb.job_id)

    def run_once(self) -> int:
        """Claim up to :data:`~ml_framework.constants.CALLBACK_BATCH` due callbacks and
        attempt each (at once, one thread each); record each outcome.

        Returns:
            The number of callbacks attempted.
        """
        due = self.store.claim_callbacks(CALLBACK_LEASE_S, CALLBACK_BATCH)
        if len(due) == 1:
            self.attempt(due[0])
        else:
            list(self._pool.map(self.attempt, due))
        return len(due)

    def attempt(self, cb: DueCallback) -> bool:
        """POST ``cb``'s event once and record the outcome; True if delivered. Never raises
        for the receiver's failures; the store's errors propagate."""
        where = public_url(cb.url)
        secret = self.settings.callback_secrets.get(cb.owner or DEFAULT_SECRET)
        try:
            check_callback_url(cb.url, self.settings.callback_allowed_hosts)
            if secret is None:
                raise CallbackError(f"no callback_secrets entry for {cb.owner or DEFAULT_SECRET!r} any more")
        except CallbackError as exc:  # the settings changed since the job was submitted
            self.store.callback_failed(cb.job_id, cb.attempt, None)
            log.warning("callback of job %s to %s cannot be sent: %s; marked failed", cb.job_id, where, exc)
            return False
        body = event_body(job_id=cb.job_id, state=cb.state, rows_ok=cb.rows_ok, rows_failed=cb.rows_failed,
                          n_rows=cb.n_rows, finished_at=cb.finished_at, attempt=cb.attempt,
                          api_public_url=self.settings.api_public_url)
        sent = headers(secret.get_secret_value(), body, cb.job_id, int(self.clock()))
        try:
            answer = self._http.post(cb.url, content=body, headers=sent)
            problem = None if answer.is_success else f"answered HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {str(exc).replace(cb.url, where)[:200] or 'no answer'}"
        if problem is None:
            if self.store.callback_delivered(cb.job_id, cb.attempt):
                log.info("callback of job %s delivered to %s (attempt %d)", cb.job_id, where, cb.attempt)
            return True
        last = cb.attempt >= self.settings.callback_max_attempts
        delay = None if last else backoff_s(cb.attempt, base_s=self.backoff_base_s, rng=self.rng)
        self.store.callback_failed(cb.job_id, cb.attempt, delay)
        if last:
            log.warning("callback of job %s to %s failed: %s (attempt %d of %d); no further attempt", cb.job_id,
                        where, problem, cb.attempt, self.settings.callback_max_attempts)
        else:
            log.info("callback of job %s to %s failed: %s (attempt %d of %d); next in %.1f s", cb.job_id, where,
                     problem, cb.attempt, self.settings.callback_max_attempts, delay)
        return False
