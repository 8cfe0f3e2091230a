"""Online requests on the producer side: sent in groups, answered through announcements.

Many threads or coroutines calling :meth:`producer.client.Client.predict` at once share
the fixed costs, the way a database's group commit does:

- a *sender* thread takes every request waiting, records their jobs in one transaction
  (:meth:`~ml_framework.store.ResultStore.create_jobs`) and sends them in one
  ``mlf.score_online`` message (:class:`~ml_framework.protocol.OnlineBatch`; several
  when large), which the worker scores as one dynamic batch with whatever else waits on
  the online queue; a caller's future is registered before its message leaves, so no
  answer can be missed;
- a *listener* thread (Redis brokers) follows the workers' announcements of finished
  requests (pub/sub channel :func:`~ml_framework.protocol.done_channel`), reconnecting
  with backoff if Redis drops it; it reads the announced jobs' durable results from the
  results store in one query (:meth:`~ml_framework.store.ResultStore.finished`) and
  completes each caller's future with a DataFrame;
- a *receiver* thread polls the store the same way for every request still waiting,
  backing off from 0.2 s to 1 s (5 ms to 100 ms without Redis, where there are no
  announcements), so a lost announcement delays an answer but never loses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import pandas as pd
from celery import Celery

from ml_framework.constants import ONLINE_GROUP_BYTES, SCORE_ONLINE_TASK
from ml_framework.endpoints import broker_errors, broker_unavailable
from ml_framework.errors import JobNotFoundError, JobTimeoutError, RequestCancelledError
from ml_framework.protocol import OnlineBatch, done_channel
from ml_framework.settings import Settings
from ml_framework.store import JobState, NewJob, ResultStore
from producer.plan import ShardPlan
from producer.results import results_frame

log = logging.getLogger(__name__)

MAX_GROUP = 256
"""Most requests recorded together, and carried by one message."""
NOTIFIED_POLL_S = (0.2, 1.0)
"""Fallback poll of the store with Redis announcements: first and longest pause, seconds."""
UNNOTIFIED_POLL_S = (0.005, 0.1)
"""Poll of the store with the embedded broker (no announcements), seconds."""
POLL_BACKOFF = 1.5
SUBSCRIBE_WAIT_S = 2.0
"""How long the first send waits for the announcement subscription (polls cover a miss)."""
RECONNECT_S = (0.1, 5.0)


@dataclass
class OnlineRequest:
    """One online request on its way: its job record, its shard plan (inline rows, online
    set), the future of its answer, and the event set once its job is recorded and its
    messages are sent (or sending failed)."""

    job: NewJob
    plan: ShardPlan
    answer: Future = field(default_factory=Future)
    sent: threading.Event = field(default_factory=threading.Event)
    send_error: BaseException | None = None


class OnlineDispatcher:
    """Sends online requests in groups and completes their answers (see the module doc).

    Args:
        settings: queue names and the broker URL.
        store: the results store (jobs are recorded and answers read through it).
        app: the Celery app that sends the shard messages.
    """

    def __init__(self, settings: Settings, store: ResultStore, app: Celery) -> None:
        self.settings = settings
        self.store = store
        self.app = app
        self._outbox: queue.SimpleQueue[OnlineRequest | None] = queue.SimpleQueue()
        self._waiting: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._subscribed = threading.Event()
        self.subscriber_name = f"mlf-online-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        """``CLIENT SETNAME`` of the Redis connection that listens for announcements, so
        that ``CLIENT LIST`` tells it from other processes' connections."""
        self._notified = settings.broker_is_redis
        self._poll = NOTIFIED_POLL_S if self._notified else UNNOTIFIED_POLL_S
        self._poll_delay = self._poll[0]
        self._poll_soon: float | None = None
        self._threads = [threading.Thread(target=self._send_loop, name="mlf-online-send", daemon=True),
                         threading.Thread(target=self._receive_loop, name="mlf-online-receive", daemon=True)]
        if self._notified:
            self._threads.append(threading.Thread(target=self._listen_loop, name="mlf-online-listen", daemon=True))
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """How many online requests wait for their answer now (0 once each one is
        answered, timed out or abandoned)."""
        with self._lock:
            return len(self._waiting)

    # ------------------------------------------------------------------ caller side
    def send(self, request: OnlineRequest) -> OnlineRequest:
        """Queue ``request`` for the sender; returns it (wait on ``request.sent`` for the
        job to be recorded, on ``request.answer`` for its results)."""
        with self._send_lock:  # so that nothing is queued behind close()'s sentinel
            if self._closed.is_set():
                raise RuntimeError("the client is closed")
            self._outbox.put(request)
        return request

    def watch(self, job_id: str) -> Future:
        """The future of ``job_id``'s answer: the one already registered, or a new one
        that the next store poll completes (which is brought forward to now)."""
        with self._lock:
            answer = self._waiting.get(job_id)
            if answer is None:
                answer = self._waiting[job_id] = Future()
                self._poll_soon = 0.0
        self._wake.set()
        return answer

    def result(self, job_id: str, answer: Future, timeout_s: float | None) -> pd.DataFrame:
        """Block until ``answer`` completes, at most ``timeout_s`` seconds.

        Returns:
            The answer (see :func:`~producer.results.results_frame`), with
            ``frame.attrs["job_id"]``.

        Raises:
            JobTimeoutError: no answer in time; the job is then cancelled (if it finished
                just then, its results are returned instead).
            RequestCancelledError: the job was cancelled meanwhile.
        """
        try:
            return answer.result(timeout_s)
        except FutureTimeout:
            return self.expire(job_id, answer, timeout_s)

    def expire(self, job_id: str, answer: Future, timeout_s: float | None) -> pd.DataFrame:
        """Give up on ``answer`` after ``timeout_s``: cancel the job, unless it finished
        just now (then its answer is returned). Raises as :meth:`result`."""
        if not answer.cancel():  # completed just now
            return answer.result()
        # cancelled: a request not yet sent is dropped by the sender
        with self._lock:
            self._waiting.pop(job_id, None)
        try:
            state = self.store.cancel(job_id).state
        except JobNotFoundError:
            state = JobState.CANCELLED  # never recorded: the sender drops it
        except Exception as exc:  # noqa: BLE001 - the caller is owed a timeout, not a store error
            log.warning("could not cancel timed-out online request %s: %s", job_id, exc)
            state = JobState.CANCELLED
        if state is not JobState.CANCELLED:
            found = self.store.finished([job_id]).get(job_id)
            if found is not None:
                return _frame(job_id, found[1], found[2])
        raise JobTimeoutError(
            f"online request {job_id} got no answer within {timeout_s} s, and was cancelled; are workers "
            "running (`mlf workers`)? A worker loads a model on its first request for it, which takes "
            "seconds (`mlf worker --preload MODEL` avoids that).", job_id=job_id,
        )

    def abandon(self, job_id: str, answer: Future) -> None:
        """Stop waiting for ``answer`` (its caller went away: an asyncio task cancelled,
        a client disconnected) and cancel its job, unless it has finished."""
        with contextlib.suppress(JobTimeoutError):  # the expected outcome: cancelled
            self.expire(job_id, answer, 0)

    def close(self) -> None:
        """Stop the threads (within 0.2 s) and fail the answers still waiting."""
        with self._send_lock:
            self._closed.set()
            self._outbox.put(None)
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():
            _complete(answer, error=RuntimeError("the client was closed before the answer came"))

    # ------------------------------------------------------------------ sender
    def _send_loop(self) -> None:
        while True:
            first = self._outbox.get()
            if first is None:
                self._fail_unsent()
                return
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    item = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._outbox.put(None)
                    break
                group.append(item)
            if self._notified and not self._subscribed.is_set():
                self._subscribed.wait(SUBSCRIBE_WAIT_S)
            self._send_group([r for r in group if not r.answer.cancelled()])
            for request in group:
                request.sent.set()

    def _fail_unsent(self) -> None:
        """After close: fail whatever is still queued (nothing is queued after the sentinel)."""
        while True:
            try:
                request = self._outbox.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.send_error = RuntimeError("the client was closed before the request was sent")
                _complete(request.answer, error=request.send_error)
                request.sent.set()

    def _send_group(self, group: list[OnlineRequest]) -> None:
        if not group:
            return
        try:
            self.store.create_jobs([r.job for r in group])
        except Exception as exc:  # noqa: BLE001 - handed to each caller
            for request in group:
                request.send_error = exc
                _complete(request.answer, error=exc)
            return
        with self._lock:
            for request in group:
                self._waiting[request.job.job_id] = request.answer
            self._poll_soon = self._poll[0] if self._poll_soon is None else min(self._poll_soon, self._poll[0])
        # a caller may time out while its job is recorded; a request without rows has no
        # message to send (its job is recorded SUCCEEDED: the next poll answers it)
        unsent = [r for r in group if not r.answer.cancelled() and r.plan.ranges]
        try:
            with self.app.producer_or_acquire() as producer:
                for part in _messages(unsent):
                    sent_at = time.time()
                    batch = OnlineBatch(requests=[message for r in part
                                                  for message in r.plan.messages(r.job.job_id, sent_at)])
                    self.app.send_task(SCORE_ONLINE_TASK, kwargs=batch.model_dump(mode="json"), argsrepr="()",
                                       kwargsrepr=batch.summary(), queue=self.settings.online_queue,
                                       producer=producer)
                    del unsent[:len(part)]
        except Exception as exc:  # noqa: BLE001 - handed to each unsent caller
            down = isinstance(exc, broker_errors())
            self._cancel_quietly([r.job.job_id for r in unsent])  # before the callers hear of it
            for request in unsent:
                job_id = request.job.job_id
                request.send_error = (broker_unavailable(self.settings, exc, job_id, f"Online request {job_id} was "
                                                         "cancelled.") if down else exc)
                with self._lock:
                    self._waiting.pop(job_id, None)
                _complete(request.answer, error=request.send_error)
        for request in group:
            if request.answer.cancelled():
                self._cancel_quietly([request.job.job_id])
        self._wake.set()  # the receiver schedules its first poll of these requests

    def _cancel_quietly(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            try:
                self.store.cancel(job_id)
            except Exception as exc:  # noqa: BLE001 - the job stays PENDING; its shard message is not sent
                log.warning("could not cancel unsent online request %s: %s", job_id, exc)

    # ------------------------------------------------------------------ listener
    def _listen_loop(self) -> None:
        import redis

        channel = done_channel(self.settings.online_queue)
        backoff = RECONNECT_S[0]
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub = redis.Redis.from_url(self.settings.broker_url, client_name=self.subscriber_name).pubsub(
                    ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                pubsub.get_message(timeout=1.0)  # the subscribe confirmation, so sends after this are covered
                self._subscribed.set()
                backoff = RECONNECT_S[0]
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        job_ids = json.loads(message["data"])
                    except (ValueError, TypeError):
                        continue
                    with self._lock:
                        mine = [j for j in job_ids if j in self._waiting]
                    if mine:  # read and hand out the answers here: no hand-off to another thread
                        self._deliver(mine)
            except Exception as exc:  # noqa: BLE001 - reconnect; the store poll covers the gap
                self._subscribed.clear()
                log.warning("online announcements lost (%s); reconnecting in %.1f s, polling the store meanwhile",
                            exc, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_S[1])
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # the connection is gone anyway
                        pubsub.close()

    # ------------------------------------------------------------------ receiver
    def _receive_loop(self) -> None:
        next_poll = float("inf")
        while not self._closed.is_set():
            self._wake.wait(min(max(0.0, next_poll - time.monotonic()), self._poll[1]))
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                if self._poll_soon is not None:  # new requests: poll soon, then back off again
                    next_poll = min(next_poll, now + self._poll_soon)
                    self._poll_soon, self._poll_delay = None, self._poll[0]
                waiting = list(self._waiting) if self._waiting and now >= next_poll else None
                if not self._waiting:
                    next_poll = float("inf")
            if waiting:
                self._deliver(waiting)
                next_poll = time.monotonic() + self._poll_delay
                self._poll_delay = min(self._poll_delay * POLL_BACKOFF, self._poll[1])

    def _deliver(self, job_ids: list[str]) -> None:
        try:
            found = self.store.finished(job_ids)
        except Exception as exc:  # noqa: BLE001 - the next poll retries
            log.warning("could not read online answers from the results store: %s", exc)
            return
        for job_id, (state, outputs, errors) in found.items():
            with self._lock:
                answer = self._waiting.pop(job_id, None)
            if answer is None:
                continue
            if state is JobState.CANCELLED:
                _complete(answer, error=RequestCancelledError(f"online request {job_id} was cancelled", job_id))
            else:
                _complete(answer, result=_frame(job_id, outputs, errors))


def _messages(requests: list[OnlineRequest]) -> Iterator[list[OnlineRequest]]:
    """Split ``requests`` into consecutive parts of at most :data:`MAX_GROUP` requests and
    about :data:`~ml_framework.constants.ONLINE_GROUP_BYTES` of inline rows (a request larger than that goes alone)."""
    part: list[OnlineRequest] = []
    size = 0
    for request in requests:
        n = request.plan.inline_bytes()
        if part and (len(part) >= MAX_GROUP or size + n > ONLINE_GROUP_BYTES):
            yield part
            part, size = [], 0
        part.append(request)
        size += n
    if part:
        yield part


def _frame(job_id: str, outputs: list, errors: list) -> pd.DataFrame:
    frame = results_frame(outputs, errors)
    frame.attrs["job_id"] = job_id
    return frame


def _complete(answer: Future, result: object = None, error: BaseException | None = None) -> None:
    """Set ``answer`` unless it is already done or cancelled (a caller that timed out)."""
    try:
        if not answer.set_running_or_notify_cancel():
            return
    except RuntimeError:  # already completed
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)
