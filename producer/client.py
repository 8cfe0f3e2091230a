"""The Python client: submit scoring jobs, follow them, read their results.

Example::

    from producer import Client
    client = Client()
    job = client.score_dataset("data/digits.csv", model="digits-sklearn")
    job.wait(timeout_s=600, progress=True)
    df = job.results()            # one row per input row, in input order

Over the HTTP API instead (an API key, no broker or database credentials):
``Client.connect("http://api:8000", api_key=...)`` returns an
:class:`~producer.http_client.HttpClient` with the same methods and :class:`Job`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa

from ml_framework.callbacks import DEFAULT_SECRET, check_callback_url
from ml_framework.celery_app import create_app, message_priority
from ml_framework.constants import (
    MAX_MESSAGE_BYTES,
    PREDICT_TIMEOUT_S,
    SCORE_SHARD_TASK,
    WORKER_LIVE_S,
)
from ml_framework.datasets import inspect, object_source
from ml_framework.endpoints import (
    broker_errors,
    broker_label,
    broker_unavailable,
    reach_broker,
    workers_warning,
)
from ml_framework.errors import CallbackError
from ml_framework.manifest import ModelManifest, ModelRepository
from ml_framework.objectstore import is_object_uri
from ml_framework.paths import locate_dataset
from ml_framework.protocol import ScoreShard
from ml_framework.settings import Settings, get_settings
from ml_framework.store import JobStatus, PruneReport, ResultStore, WorkerInfo
from ml_framework.store.idempotency import Idempotency, check_key, request_hash
from producer.job import POLL_MAX_S, POLL_START_S, Job
from producer.online import OnlineDispatcher, OnlineRequest
from producer.plan import JobOptions, ShardPlan, check_message_bytes, plan_dataset, plan_rows
from producer.results import job_results
from producer.rows import RowsLike, rows_nbytes

if TYPE_CHECKING:
    from producer.http_client import HttpClient

MESSAGES_PER_WRITE = 1000
MESSAGE_BYTES_PER_WRITE = 16 * 2**20
"""Sent shard messages kept in the store per write (see ``ResultStore.set_shard_messages``):
at most this many, or this many bytes, so that inline shards stream through the producer."""
ONLINE_INLINE_BYTES = 256 * 1024
"""Largest online input (Arrow or NumPy bytes) :meth:`Client.apredict` converts and encodes
on the event loop (about a millisecond); larger ones go to a worker thread."""

log = logging.getLogger(__name__)


class Client:
    """Submits jobs to the broker and reads jobs from the results store.

    Args:
        settings: default :func:`~ml_framework.settings.get_settings`.

    Attributes:
        poll_s: first and longest pause of :meth:`Job.wait` between two reads, seconds.
    """

    poll_s = (POLL_START_S, POLL_MAX_S)

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.store = ResultStore(self.settings.effective_database_url, settings=self.settings)
        self.repository = ModelRepository(self.settings.models_dir)
        self.app = create_app(self.settings)
        self._dispatcher: OnlineDispatcher | None = None
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, timeout_s: float | None = None) -> HttpClient:
        """A client of the HTTP API at ``url`` (``uvicorn producer.api:app``), with this
        class's methods and the same :class:`Job`: the host needs an API key, not the
        broker's or the database's credentials (see :mod:`producer.http_client`).

        Args:
            url: the API's base URL, e.g. ``http://api:8000``.
            api_key: sent as ``Authorization: Bearer``; never shown in a repr or an error.
            timeout_s: seconds to wait for one HTTP answer (default
                :data:`~producer.http_client.HTTP_TIMEOUT_S`).

        Raises:
            ApiUnavailableError: ``url`` is not an ``http://`` or ``https://`` URL (nothing
                is sent before the first call).
        """
        from producer.http_client import HTTP_TIMEOUT_S, HttpClient

        return HttpClient(url, api_key, HTTP_TIMEOUT_S if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Release broker and database connections."""
        if self._dispatcher is not None:
            self._dispatcher.close()
        self.store.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def models(self) -> list[ModelManifest]:
        """Every model version in the model repository."""
        return self.repository.list()

    def recent_jobs(self, limit: int = 20, *, owned_by: str | None = None) -> list[JobStatus]:
        """Jobs still open (PENDING, RUNNING), newest first, then the most recently ended;
        ``limit`` in all (``mlf jobs list``).

        Args:
            owned_by: only the jobs submitted with this API key name; ``None``: every job.
        """
        return self.store.recent_jobs(limit, owned_by=owned_by)

    def get_job(self, job_id: str) -> Job:
        """A handle on an existing job, by id or unique id prefix (from any process).

        Raises:
            JobNotFoundError: no such job, or the prefix matches several.
        """
        return Job(self, self.store.resolve_job_id(job_id))

    def delete_jobs(self, job_ids: Sequence[str]) -> dict[str, PruneReport | None]:
        """Delete jobs by full id (see :meth:`Job.delete`), and forget their cached results
        when ``cache_backend: redis``.

        Returns:
            Per id, what was deleted, or ``None`` when there was no such job (any more).
        """
        done = {job_id: self.store.delete_job(job_id) for job_id in job_ids}
        if self.settings.cache_backend == "redis":
            from producer.cache import ResultsCache

            cache = ResultsCache(self.settings)
            try:
                cache.forget(list(done))
            finally:
                cache.close()
        return done

    def was_deleted(self, job_id: str) -> bool:
        """Whether job ``job_id`` (a full id) was deleted and its tombstone is still kept."""
        return self.store.deleted_owner(job_id.strip().lower())[0]

    # The JobClient protocol (producer.job): what a Job reads through.
    def _job_status(self, job_id: str) -> JobStatus:
        return self.store.job(job_id)

    def _cancel_job(self, job_id: str) -> JobStatus:
        return self.store.cancel(job_id)

    def _results_table(self, job_id: str) -> pa.Table:
        return self.store.results_table(job_id)

    def _results_frame(self, job_id: str) -> pd.DataFrame:
        return job_results(self.store, job_id)

    def _queue_warning(self, job_id: str) -> str | None:
        from producer.queues import job_queue_warning

        return job_queue_warning(self, job_id, prefix=False)

    def live_workers(self, max_age_s: float = WORKER_LIVE_S) -> list[str]:
        """Worker processes whose heartbeat reached the results store in the last ``max_age_s``."""
        return self.store.live_workers(max_age_s)

    def worker_warning(self) -> str | None:
        """Why a job sent now may wait: no live worker process, or the live ones listen on
        another broker (see :func:`ml_framework.endpoints.workers_warning`); ``None`` when
        a live worker listens on this client's broker."""
        return workers_warning(self.settings, self.workers(WORKER_LIVE_S))

    def workers(self, max_age_s: float | None = WORKER_LIVE_S) -> list[WorkerInfo]:
        """Heartbeats and telemetry of the worker processes seen in the last ``max_age_s``
        seconds (every one ever recorded and not cleanly stopped when ``None``); see
        :class:`ml_framework.store.WorkerInfo`."""
        return self.store.workers(max_age_s)

    def score_dataset(
        self,
        path: Path | str,
        model: str,
        version: int | None = None,
        batch_size: int | None = None,
        columns: Sequence[str] | None = None,
        priority: int = 0,
        *,
        owner: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        output_uri: str | None = None,
    ) -> Job:
        """Submit a bulk-scoring job over a CSV or Parquet file.

        Only the schema and row count are read here; the rows travel by reference
        (dataset under ``settings.data_dir``) or inlined per shard, one pass over the file.

        Args:
            path: dataset file (``.csv``, ``.parquet``, ``.arrow`` / ``.feather``,
                ``.npy``), a directory of Parquet parts or images, or the same in object
                storage: ``s3://bucket/key`` (an object, or a prefix of Parquet parts or
                images; read through the ``s3_*`` settings, workers read their rows from
                the store).
            model: model name in the repository.
            version: model version; default the highest.
            batch_size: rows per forward pass; default the manifest's, then settings'.
            columns: dataset columns to feed, mapped onto the manifest's input columns
                in order; default the manifest's column names.
            priority: 0 (default) to 9 (most urgent): workers take the shards of a
                higher-priority bulk job before those of lower ones already queued (online
                requests still come first). See :func:`~ml_framework.celery_app.message_priority`.
            owner: name of the API key submitting the job (the HTTP API sets it).
            idempotency_key: makes a retry safe: a submission with the key and the same
                request (path, model and options) from the same owner within
                ``settings.idempotency_window`` returns the job the key first submitted
                (``job.replayed`` is ``True``; nothing is read or sent again). 1 to 255
                printable ASCII characters; a UUID is a good one.
            callback_url: once the job ends, the HTTP API's side POSTs a signed
                ``job.finished`` event there, once (see :mod:`ml_framework.callbacks`; an API
                process must be running). Its host must be in ``callback_allowed_hosts``,
                and ``callback_secrets`` must hold the owner's secret (``default`` without
                an owner).
            output_uri: keep the results as Parquet files, one per shard, under this
                prefix (``s3://bucket/prefix``, or a local directory when every worker runs
                on this host) instead of the results database; :meth:`Job.results` and
                the other readers read them back the same. The bucket must exist (a local
                directory is created).

        Returns:
            The new :class:`Job` (state PENDING; SUCCEEDED at once when the dataset has
            no rows: its results are empty, with the model's output columns), or the
            key's job.

        Raises:
            IdempotencyKeyError: a malformed key.
            IdempotencyKeyReusedError: the key names a job submitted with another request.
            JobOptionError: ``batch_size`` or ``priority`` out of range (also a ``ValueError``).
            CallbackError: a ``callback_url`` refused (see :meth:`check_callback`).
            ObjectStoreError: ``output_uri`` is malformed, its bucket unknown or unreachable,
                or its directory cannot be written (nothing was recorded or sent).
            MessageTooLargeError: a shard message (inline rows) over ``max_message_bytes``.
            ModelNotFoundError: unknown model or version.
            DatasetPathError: the path enters the data directory and leads out of it (a
                symbolic link or '..'); refused before anything is read
                (see :mod:`ml_framework.paths`).
            DatasetNotFoundError, DatasetFormatError, DatasetSchemaError: the file is
                missing, unreadable, or lacks columns.
            ObjectStoreError: an ``s3://`` dataset whose URI is malformed, or that the store
                refuses (credentials, bucket) or that cannot be reached; names the URI.
            BrokerUnavailableError: the broker cannot be reached; nothing was recorded, or
                (the broker went away mid-send) the job named by its ``job_id`` was cancelled.
        """
        options = JobOptions.of(model, version, batch_size, columns, priority, callback_url=callback_url,
                                output_uri=output_uri)
        return self.submit_dataset(path, options, owner=owner, idempotency_key=idempotency_key)

    def submit_dataset(self, path: Path | str, options: JobOptions, *, owner: str | None = None,
                       idempotency_key: str | None = None) -> Job:
        """:meth:`score_dataset` with the job's options as one :class:`~producer.plan.JobOptions`
        (what ``mlf score`` and the HTTP API hold). Returns and raises as :meth:`score_dataset`."""
        self.check_callback(options.callback_url, owner)
        options = self._check_output(options)
        if is_object_uri(path):
            source = object_source(str(path), self.settings)
            dataset = str(source)
        else:
            location = locate_dataset(self.settings.data_dir, Path(path).absolute())
            source, dataset = location.path, str(location.relative or location.path)
        key = self._idempotency(idempotency_key, owner, options, dataset=dataset)
        if key is not None and (existing := self.store.idempotent_job(key)) is not None:
            return Job(self, existing, replayed=True)
        manifest = self.repository.resolve(options.model, options.version)
        plan = plan_dataset(manifest, options.options(), inspect(source), data_dir=self.settings.data_dir,
                            shard_size=self.settings.shard_size, default_batch_size=self.settings.default_batch_size)
        return self._submit(plan, owner, idempotency=key)

    def score_rows(
        self,
        rows: RowsLike,
        model: str,
        version: int | None = None,
        batch_size: int | None = None,
        columns: Sequence[str] | None = None,
        priority: int = 0,
        *,
        owner: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        output_uri: str | None = None,
    ) -> Job:
        """Submit rows held in memory; they travel inside the shard messages.

        Args:
            rows: a DataFrame or Arrow table (named columns), a list of dicts (one per
                row), or a 2-D array / list of lists whose columns are the manifest's
                input columns in order; an array of shape ``(N, *inputs.shape)`` (tensor
                inputs, or columns reshaped to that shape); a list of texts or image paths
                (text and image inputs). See :mod:`producer.rows`. Values that are not
                numbers become row errors on the worker, naming the row and field; they do
                not fail the job.
            model, version, batch_size, columns, priority, owner, callback_url, output_uri: as :meth:`score_dataset`.
            idempotency_key: as :meth:`score_dataset`; the request compared is the rows
                as they would be sent (their values and column order) and the options.

        Returns:
            The new :class:`Job` (or the key's job); its rows are numbered from 0 in the
            order given (no rows: a job SUCCEEDED at once, as :meth:`score_dataset`).

        Raises:
            DatasetSchemaError: missing columns, an array of the wrong width or shape, or
                a column whose type can never feed the model.
            ModelNotFoundError, JobOptionError, MessageTooLargeError, BrokerUnavailableError,
                IdempotencyKeyError, ObjectStoreError: as :meth:`score_dataset`.
        """
        options = JobOptions.of(model, version, batch_size, columns, priority, callback_url=callback_url,
                                output_uri=output_uri)
        return self.submit_rows(rows, options, owner=owner, idempotency_key=idempotency_key)

    def submit_rows(self, rows: RowsLike, options: JobOptions, *, owner: str | None = None,
                    idempotency_key: str | None = None) -> Job:
        """:meth:`score_rows` with the job's options as one :class:`~producer.plan.JobOptions`
        (what the HTTP API holds). Returns and raises as :meth:`score_rows`."""
        if idempotency_key is not None:
            check_key(idempotency_key)
        self.check_callback(options.callback_url, owner)
        options = self._check_output(options)
        plan = self._plan_rows(rows, options)
        digest = hashlib.sha256()
        for source in plan.sources if idempotency_key is not None else ():
            digest.update(f"{source.row_start}:{source.row_end}:".encode())
            digest.update(source.data_b64.encode())
        key = self._idempotency(idempotency_key, owner, options, rows=digest.hexdigest())
        if key is not None and (existing := self.store.idempotent_job(key)) is not None:
            return Job(self, existing, replayed=True)
        return self._submit(plan, owner, idempotency=key)

    def check_callback(self, url: str | None, owner: str | None) -> None:
        """Refuse a job's ``callback_url`` that could not be delivered, before anything is
        recorded: see :func:`ml_framework.callbacks.check_callback_url`; and the owner (the
        API key name; ``None``: the ``default`` entry) must have a ``callback_secrets`` entry
        to sign it with. ``None``: no callback, nothing to check.

        Raises:
            CallbackError: naming what is wrong and the setting that would allow it.
        """
        if url is None:
            return
        check_callback_url(url, self.settings.callback_allowed_hosts)
        name = owner or DEFAULT_SECRET
        if name not in self.settings.callback_secrets:
            whose = f"API key {name!r}" if owner else "jobs submitted without an API key"
            raise CallbackError(f"no callback secret for {whose}: the operator adds {name}=<secret> to "
                                "callback_secrets (ML_FRAMEWORK_CALLBACK_SECRETS) to sign its callbacks")

    def _check_output(self, options: JobOptions) -> JobOptions:
        """``options`` with ``output_uri`` checked and as the job records it (see
        :meth:`OutputFiles.check <ml_framework.store.output_files.OutputFiles.check>`).

        Raises:
            ObjectStoreError: malformed, unknown bucket, unreachable, not writable.
        """
        if options.output_uri is None:
            return options
        uri = self.store.files.check(options.output_uri)
        return options.options().model_copy(update={"output_uri": uri})

    def _idempotency(self, key: str | None, owner: str | None, options: JobOptions,
                     **source: str) -> Idempotency | None:
        """The :class:`Idempotency` of a submission of ``source`` (the dataset, or a digest
        of the rows) with ``options`` and ``key`` (``None`` without a key).
        Raises ``IdempotencyKeyError`` for a malformed key."""
        if key is None:
            return None
        request = {**source, **options.request()}
        return Idempotency(check_key(key), request_hash(request), owner, self.settings.idempotency_window)

    def _plan_rows(self, rows: RowsLike, options: JobOptions, online: bool = False) -> ShardPlan:
        """Check ``rows`` against the model and cut them into inline shards (see :func:`producer.plan.plan_rows`)."""
        manifest = self.repository.resolve(options.model, options.version)
        return plan_rows(manifest, options.options(), rows, shard_size=self.settings.shard_size,
                         default_batch_size=self.settings.default_batch_size, online=online)

    def submit(self, model: str, inputs: RowsLike, version: int | None = None,
               batch_size: int | None = None) -> Job:
        """Submit an online request: a few rows, on the online queue, which every worker
        drains before taking its next bulk shard. Non-blocking form of :meth:`predict`:
        returns once the job is recorded and sent; :meth:`answer` waits for it.

        Args and errors: as :meth:`score_rows`; also whatever recording or sending raised.
        """
        request = self._send_online(model, inputs, version, batch_size)
        request.sent.wait()
        if request.send_error is not None:
            raise request.send_error
        return Job(self, request.job.job_id, answer=request.answer)

    def predict(self, model: str, inputs: RowsLike, version: int | None = None,
                timeout_s: float = PREDICT_TIMEOUT_S) -> pd.DataFrame:
        """Score a few rows and return their results, blocking at most ``timeout_s``.

        The request goes on the online queue (see :meth:`submit`). Requests made at the
        same time from many threads are recorded and sent in groups; the worker's
        announcement (Redis) wakes the wait, and the answer is read from the results
        store (see :mod:`producer.online`).

        Args:
            model, inputs, version: as :meth:`score_rows`.
            timeout_s: seconds to wait at most.

        Returns:
            One row per input row, in order, as :meth:`Job.results` (outputs, or ``error``
            and ``error_field`` for rows that failed); ``frame.attrs["job_id"]`` names the job.

        Raises:
            JobTimeoutError: no answer within ``timeout_s`` (the request is cancelled).
            DatasetSchemaError, DatasetError, ModelNotFoundError: as :meth:`score_rows`.
            MessageTooLargeError: the request is over ``max_message_bytes`` (nothing sent).
        """
        request = self._send_online(model, inputs, version)
        return self._online().result(request.job.job_id, request.answer, timeout_s)

    def predict_many(self, model: str, inputs: Sequence[RowsLike], version: int | None = None,
                     timeout_s: float = PREDICT_TIMEOUT_S) -> list[pd.DataFrame]:
        """Score many small requests at once (each as :meth:`predict`): all are sent
        before any is waited for, so workers batch them together.

        Args:
            inputs: one ``RowsLike`` per request.
            timeout_s: seconds to wait at most for all of them together.

        Returns:
            One answer per request, in order (see :meth:`predict`).

        Raises:
            JobTimeoutError: some request got no answer in time (those are cancelled).
            DatasetSchemaError, DatasetError, ModelNotFoundError, MessageTooLargeError: a
                request is invalid (raised before anything is sent).
        """
        plans = [self._plan_online(model, rows, version) for rows in inputs]
        online = self._online()
        requests = [online.send(plan) for plan in plans]
        deadline = time.monotonic() + timeout_s
        answers = []
        try:
            for r in requests:
                answers.append(online.result(r.job.job_id, r.answer, max(0.0, deadline - time.monotonic())))
        except BaseException:
            for r in requests[len(answers) + 1:]:  # the one that raised is dealt with already
                online.abandon(r.job.job_id, r.answer)
            raise
        return answers

    async def apredict(self, model: str, inputs: RowsLike, version: int | None = None,
                       timeout_s: float = PREDICT_TIMEOUT_S, *, owner: str | None = None) -> pd.DataFrame:
        """:meth:`predict` for asyncio: awaits the answer without holding a thread, so one
        event loop can keep thousands of requests in flight. Inputs of more than
        :data:`ONLINE_INLINE_BYTES` are converted and encoded in a worker thread, so that a
        large request does not hold the event loop.

        Args, returns and errors: as :meth:`predict`; ``owner`` as :meth:`score_dataset`.
        """
        import asyncio

        if rows_nbytes(inputs) > ONLINE_INLINE_BYTES:
            request = await asyncio.to_thread(self._send_online, model, inputs, version, owner=owner)
        else:
            request = self._send_online(model, inputs, version, owner=owner)
        online = self._online()
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(request.answer)), timeout_s)
        except TimeoutError:
            return await asyncio.to_thread(online.expire, request.job.job_id, request.answer, timeout_s)
        except asyncio.CancelledError:  # the caller went away: cancel the job, off the event loop
            threading.Thread(target=online.abandon, args=(request.job.job_id, request.answer), daemon=True).start()
            raise

    def answer(self, job: Job, timeout_s: float) -> Job:
        """Wait for an online request (see :meth:`submit`); cancel it if no answer comes
        within ``timeout_s``.

        With a Redis broker the worker's announcement wakes the wait at once, and the
        store is polled only as a fallback, every 0.2 s backing off to 1 s. With the
        embedded broker the store is polled from 5 ms, backing off to 100 ms.

        Returns:
            ``job``, now finished.

        Raises:
            JobTimeoutError: no answer in time (the job is cancelled).
        """
        online = self._online()
        answer = job._answer or online.watch(job.id)
        online.result(job.id, answer, timeout_s)
        return job

    def _plan_online(self, model: str, inputs: RowsLike, version: int | None,
                     batch_size: int | None = None, owner: str | None = None) -> OnlineRequest:
        plan = self._plan_rows(inputs, JobOptions.of(model, version, batch_size), online=True)
        job = plan.new_job(uuid.uuid4().hex, owner)
        self._check_message_bytes(sum(m.message_bytes() for m in plan.messages(job.job_id)),
                                  f"online request {job.job_id} ({plan.n_rows} rows)",
                                  "send fewer rows per request, or score them as a bulk job (score_dataset) "
                                  "from a file under the data directory", "Nothing was recorded or sent.")
        return OnlineRequest(job, plan)

    def _check_message_bytes(self, size: int, what: str, advice: str, outcome: str) -> None:
        """Refuse a message of ``size`` bytes over the ``max_message_bytes`` setting
        (see :func:`producer.plan.check_message_bytes`).

        Raises:
            MessageTooLargeError: naming ``what``, both sizes, ``advice`` and ``outcome``.
        """
        check_message_bytes(size, getattr(self.settings, "max_message_bytes", MAX_MESSAGE_BYTES), what,
                            advice, outcome)

    def _send_online(self, model: str, inputs: RowsLike, version: int | None,
                     batch_size: int | None = None, owner: str | None = None) -> OnlineRequest:
        return self._online().send(self._plan_online(model, inputs, version, batch_size, owner))

    @property
    def online(self) -> OnlineDispatcher:
        """This client's online dispatcher (:mod:`producer.online`), started on first use."""
        return self._online()

    def _online(self) -> OnlineDispatcher:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = OnlineDispatcher(self.settings, self.store, self.app)
            return self._dispatcher

    def _submit(self, plan: ShardPlan, owner: str | None = None, idempotency: Idempotency | None = None) -> Job:
        """Connect to the broker, record the job, then send one shard message per shard of
        ``plan``; cancel the job if sending fails. An unreachable broker records nothing.

        With ``idempotency``, the job is recorded only if the key names none yet (else that
        job is returned, nothing sent); a job whose sending failed gives the key back.

        Every shard message is checked against ``max_message_bytes`` (only inline shards
        come near it): the plan's :meth:`~producer.plan.ShardPlan.head` before the job is
        recorded (every shard of rows given in memory; the first of a file read once,
        shard by shard), and a later shard over the limit cancels the job as it is reached.

        Raises:
            MessageTooLargeError: a shard message over ``max_message_bytes``.
            BrokerUnavailableError: the broker cannot be reached (see :meth:`score_dataset`).
        """
        advice = f"use a smaller shard_size (now {self.settings.shard_size} rows)"
        if not plan.inline:  # a file, not rows given in memory
            advice += (f", or put the file under the data directory ({self.settings.data_dir}) so that workers "
                       "read it by reference")

        def check(body: ScoreShard, job: str, outcome: str) -> None:
            self._check_message_bytes(body.message_bytes(), f"{job}shard {body.shard_index} (rows "
                                      f"{body.source.row_start}-{body.source.row_end} of {plan.dataset})", advice,
                                      outcome)

        for body in plan.head():
            check(body, "", "Nothing was recorded or sent.")

        def record() -> tuple[str, bool]:
            """Record the job (under the idempotency key, if any): ``(job id, created)``."""
            new = plan.new_job(uuid.uuid4().hex, owner)
            if idempotency is None:
                self.store.create_jobs([new])
                return new.job_id, True
            return self.store.create_job_once(new, idempotency)

        if not plan.ranges:  # no rows: nothing to send; the store records the job SUCCEEDED
            job_id, created = record()
            return Job(self, job_id, replayed=not created)
        job_id = None
        n_sent = 0
        try:
            with self.app.producer_or_acquire() as producer:
                # Reach the broker before recording the job: an unreachable broker leaves no job behind.
                reach_broker(producer.connection)
                job_id, created = record()
                if not created:  # a submission with the key recorded its job first
                    return Job(self, job_id, replayed=True)
                try:
                    broker_priority = message_priority(self.settings, plan.options.priority)
                    broker = broker_label(self.settings)  # kept with each message: where it went
                    sent: list[tuple[int, str]] = []  # kept in the store, to send again should the broker lose one
                    sent_bytes = 0
                    for body in plan.messages(job_id):
                        index = body.shard_index
                        if index >= plan.n_checked:
                            check(body, f"job {job_id} ", "The job was cancelled; no further shard is sent.")
                        kwargs = body.model_dump(mode="json")
                        self.app.send_task(SCORE_SHARD_TASK, kwargs=kwargs, argsrepr="()",
                                           kwargsrepr=body.summary(), queue=self.settings.bulk_queue,
                                           priority=broker_priority, producer=producer)
                        n_sent += 1
                        sent.append((index, json.dumps({"queue": self.settings.bulk_queue, "broker": broker,
                                                        "kwargs": kwargs}, separators=(",", ":"))))
                        sent_bytes += len(sent[-1][1])
                        if len(sent) >= MESSAGES_PER_WRITE or sent_bytes >= MESSAGE_BYTES_PER_WRITE:
                            self.store.set_shard_messages(job_id, sent)
                            sent, sent_bytes = [], 0
                    self.store.set_shard_messages(job_id, sent)
                except BaseException:
                    self.store.cancel(job_id)
                    if idempotency is not None:
                        self.store.release_idempotency_key(job_id)
                    raise
        except broker_errors() as exc:
            if job_id is None:
                raise broker_unavailable(self.settings, exc, outcome="Nothing was recorded or sent.") from exc
            raise broker_unavailable(self.settings, exc, job_id, f"Job {job_id} was cancelled after {n_sent} of "
                                     f"{len(plan.ranges)} shard(s) were sent; submit it again.") from exc
        return Job(self, job_id)
