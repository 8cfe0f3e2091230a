"""The Python client over the HTTP API: :class:`HttpClient`, made by
:meth:`producer.client.Client.connect`.

It has the methods of :class:`producer.client.Client` that a producer host uses (submit,
status, wait, results, cancel, delete, predict, models) and hands back the same
:class:`~producer.job.Job`, which reads through the :class:`~producer.job.JobClient`
protocol both clients share. It talks to ``producer.api`` with ``httpx`` and nothing else:
it constructs no Celery app, broker connection or results store, and reads no broker or
database setting, so the host needs an API key, not those passwords.

What differs from the direct client, because the API decides it:

- datasets are paths relative to the API's data directory (what the API can read);
- a job belongs to the API key (``owner=`` is refused: the key names the owner);
- :meth:`HttpClient.submit` sends the rows as a bulk job (the API's online route answers
  synchronously: :meth:`HttpClient.predict`);
- :meth:`~producer.job.Job.wait` polls ``GET /v1/jobs/{id}`` with backoff (:data:`POLL_S`)
  and warns when the API's ``/ready`` reports no live worker;
- :meth:`HttpClient.delete_jobs` reports the shards and row errors the job's status gave
  before it was deleted (the API answers 204 without counts; ``result_bytes`` is 0).

Errors are the direct client's classes, with the API's message (:mod:`producer.http_errors`);
an unreachable API raises :class:`~ml_framework.errors.ApiUnavailableError`.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

import httpx
import pandas as pd
import pyarrow as pa
from pydantic import TypeAdapter

from ml_framework.constants import PREDICT_TIMEOUT_S
from ml_framework.errors import (
    ApiUnavailableError,
    JobNotFoundError,
    JobOptionError,
    JobTimeoutError,
    ModelNotFoundError,
)
from ml_framework.manifest import ModelManifest
from ml_framework.store import JobStatus, PruneReport
from ml_framework.store.idempotency import check_key
from producer.http_errors import error_of, not_the_apis, unreachable
from producer.job import Job
from producer.plan import JobOptions
from producer.results import results_frame, table_frame
from producer.rows import RowsLike, rows_to_table

__all__ = ["HTTP_TIMEOUT_S", "KEY_HINT", "NO_KEY_HINT", "POLL_S", "HttpClient"]

HTTP_TIMEOUT_S = 60.0
"""Default seconds to wait for one HTTP answer (connect, each read); a results download
streams, so only a pause that long fails it. ``predict`` waits its own ``timeout_s`` more."""
NO_KEY_HINT = "pass api_key to Client.connect"
"""How an :class:`HttpClient` made without a key tells its caller to give one when the API
answers 401 (``mlf --api`` passes its own: ``--api-key`` / ``MLF_API_KEY``)."""
KEY_HINT = "the api_key given to Client.connect"
"""Where the key a 401 refused came from, as said in its error (see :class:`HttpClient`)."""
POLL_S = (0.05, 0.5)
"""First and longest pause, seconds, between two ``GET /v1/jobs/{id}`` of ``Job.wait``
(x1.5 per poll): a finished job is seen within half a second, and a long wait costs the
API two requests a second, as its event stream's own read every 0.5 s
(``producer.api.streams.EVENTS_POLL_S``)."""
_STATUS = TypeAdapter(JobStatus)


def _quoted(job_id: str) -> str:
    """``job_id`` as one path segment (a stray ``/`` stays inside it)."""
    return quote(job_id.strip(), safe="")


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``body`` as a request's JSON content. NaN and infinities are written as ``NaN`` /
    ``Infinity``, which the API's parser reads (as the direct client sends them to the
    worker: they become row errors there), where httpx's own ``json=`` refuses them."""
    return {"content": json.dumps(body, separators=(",", ":")).encode(),
            "headers": {**(headers or {}), "Content-Type": "application/json"}}


class HttpClient:
    """The client of :class:`producer.client.Client`'s interface over the HTTP API.

    Args:
        url: the API's base URL, ``http://`` or ``https://`` (e.g. ``http://api:8000``).
        api_key: the API key, sent as ``Authorization: Bearer <key>`` (masked by httpx in
            any repr of the headers); ``None`` for an API run with ``api_auth: none``.
        timeout_s: see :data:`HTTP_TIMEOUT_S`.
        transport: an ``httpx`` transport (tests: ``httpx.MockTransport``).
        no_key_hint: without ``api_key``, how to give one, said in the
            :class:`~ml_framework.errors.UnauthorizedError` of a 401 (default
            :data:`NO_KEY_HINT`); requests still go without a key.
        key_hint: with ``api_key``, where it came from, said in the error of a 401 (the
            key was refused; default :data:`KEY_HINT`).

    Attributes:
        url: the base URL, without credentials or a trailing ``/``.
        poll_s: see :data:`POLL_S`.

    Raises:
        ApiUnavailableError: ``url`` is not an http(s) URL with a host.
    """

    poll_s = POLL_S

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = HTTP_TIMEOUT_S, *,
                 transport: httpx.BaseTransport | None = None, no_key_hint: str = NO_KEY_HINT,
                 key_hint: str = KEY_HINT) -> None:
        try:
            parsed = httpx.URL(url.strip())
        except (httpx.InvalidURL, TypeError) as exc:
            raise ApiUnavailableError(f"not an API URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ApiUnavailableError(f"the API's URL must be http://HOST[:PORT] or https://...; got {url[:200]!r}")
        self.url = str(parsed.copy_with(username=None, password=None, query=None, fragment=None)).rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._no_key_hint = None if api_key else no_key_hint
        self._key_hint = key_hint if api_key else None
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)
        self._manifests: list[ModelManifest] | None = None

    def __repr__(self) -> str:
        return f"HttpClient({self.url!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, job_id: str | None = None, **kwargs: Any) -> httpx.Response:
        """One API call; an error answer raised as its class (:func:`~producer.http_errors.error_of`).

        Raises:
            ApiUnavailableError: the API cannot be reached.
            MLFrameworkError: the class the API's error answer names.
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None
        if response.is_error:
            raise error_of(response, job_id=job_id, no_key_hint=self._no_key_hint, key_hint=self._key_hint)
        return response

    def _body(self, response: httpx.Response, field: str | None = None) -> Any:
        """The JSON of a success answer (its ``field``, when given).

        Raises:
            ApiResponseError: the answer is not JSON, or has no ``field``: not the API's
                answer (a proxy's page at the URL; :func:`~producer.http_errors.not_the_apis`).
        """
        try:
            body = response.json()
        except ValueError:
            raise not_the_apis(response, "JSON") from None
        if field is None:
            return body
        if not isinstance(body, dict) or field not in body:
            raise not_the_apis(response, f"JSON with field {field}")
        return body[field]

    def models(self) -> list[ModelManifest]:
        """Every model version in the API's model repository (``GET /v1/models``)."""
        self._manifests = [ModelManifest.model_validate(m) for m in self._body(self._request("GET", "/v1/models"))]
        return list(self._manifests)

    def recent_jobs(self, limit: int = 20) -> list[JobStatus]:
        """This key's jobs (an admin key's: every job) still open, newest first, then the
        most recently ended; ``limit`` (1 to 1,000) in all (``GET /v1/jobs``)."""
        listed = self._body(self._request("GET", "/v1/jobs", params={"limit": limit}), "jobs")
        return [_STATUS.validate_python(job) for job in listed]

    def get_job(self, job_id: str) -> Job:
        """A handle on an existing job of this key, by id or unique prefix (8+ characters).

        Raises:
            JobNotFoundError: no such job among this key's (admins: any key's), or the
                prefix is short or matches several.
        """
        return Job(self, self._job_status(job_id).job_id)

    def delete_jobs(self, job_ids: Sequence[str]) -> dict[str, PruneReport | None]:
        """Delete jobs by full id (see :meth:`producer.job.Job.delete`; ``DELETE /v1/jobs/{id}``).

        Returns:
            Per id, a report of the job's shards and row errors as its status gave them just
            before (``result_bytes`` 0: the API does not count them), or ``None`` when there
            was no such job of this key (any more).
        """
        done: dict[str, PruneReport | None] = {}
        for job_id in job_ids:
            try:
                status = self._job_status(job_id)
            except JobNotFoundError:
                status = None
            try:
                self._request("DELETE", f"/v1/jobs/{_quoted(job_id)}", job_id=job_id)
            except JobNotFoundError:
                status = None
            done[job_id] = None if status is None else PruneReport(jobs=[status.job_id], shards=status.n_shards,
                                                                   row_errors=status.rows_failed)
        return done

    def was_deleted(self, job_id: str) -> bool:
        """Whether this key's job ``job_id`` (a full id) was deleted and its tombstone is
        still kept (``DELETE`` answers 204 again for it; for a job still there, this deletes it)."""
        try:
            self._request("DELETE", f"/v1/jobs/{_quoted(job_id)}", job_id=job_id)
        except JobNotFoundError:
            return False
        return True

    def worker_warning(self) -> str | None:
        """Why a job sent now may wait, as the API's ``GET /ready`` says it (no worker
        heartbeat, database or broker unreachable); ``None`` when ready, or when ``/ready``
        cannot be asked (the warning is advice; the job's own calls raise)."""
        try:
            response = self._http.get("/ready")
            checks = response.json().get("checks", {})
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        failing = [f"{name}: {value}" for name, value in checks.items() if not str(value).startswith("ok")]
        return f"the API at {self.url} is not ready ({'; '.join(failing)})" if failing else None

    def score_dataset(self, path: Path | str, model: str, version: int | None = None, batch_size: int | None = None,
                      columns: Sequence[str] | None = None, priority: int = 0, *, owner: str | None = None,
                      idempotency_key: str | None = None, callback_url: str | None = None,
                      output_uri: str | None = None) -> Job:
        """Submit a bulk-scoring job over a dataset the API reads (``POST /v1/jobs``).

        Args:
            path: the dataset's path relative to the API's data directory.
            model, version, batch_size, columns, priority, idempotency_key, callback_url, output_uri:
                as :meth:`producer.client.Client.score_dataset` (the API checks the callback URL
                against its own ``callback_allowed_hosts`` and signs with the key's secret, and
                an ``output_uri`` against ``api_output_prefixes``).
            owner: must be ``None``: the API key names the job's owner.

        Raises:
            DatasetPathError, DatasetNotFoundError: an absolute path, one leaving the data
                directory, or a missing file (the message names the path under the data
                directory that exists, when a tail of ``path`` does).
            DatasetFormatError, DatasetSchemaError, ModelNotFoundError, JobOptionError,
                IdempotencyKeyError, MessageTooLargeError, BrokerUnavailableError: as the
                direct client; UnauthorizedError, ApiUnavailableError.
        """
        options = JobOptions.of(model, version, batch_size, columns, priority, callback_url=callback_url,
                                output_uri=output_uri)
        return self.submit_dataset(path, options, owner=owner, idempotency_key=idempotency_key)

    def submit_dataset(self, path: Path | str, options: JobOptions, *, owner: str | None = None,
                       idempotency_key: str | None = None) -> Job:
        """:meth:`score_dataset` with the options as one :class:`~producer.plan.JobOptions`
        (every field is sent, as the API's body takes it)."""
        dataset = path.as_posix() if isinstance(path, PurePath) else str(path)
        return self._submit({**self._options(options, owner), "dataset": dataset}, idempotency_key)

    def score_rows(self, rows: RowsLike, model: str, version: int | None = None, batch_size: int | None = None,
                   columns: Sequence[str] | None = None, priority: int = 0, *, owner: str | None = None,
                   idempotency_key: str | None = None, callback_url: str | None = None,
                   output_uri: str | None = None) -> Job:
        """Submit rows held in memory; they travel in the request's JSON body (``rows``).

        Args and errors: as :meth:`producer.client.Client.score_rows` (an array or list of
        lists is named by the model's input columns, read from ``GET /v1/models``);
        ``owner`` as :meth:`score_dataset`.
        """
        options = JobOptions.of(model, version, batch_size, columns, priority, callback_url=callback_url,
                                output_uri=output_uri)
        return self.submit_rows(rows, options, owner=owner, idempotency_key=idempotency_key)

    def submit_rows(self, rows: RowsLike, options: JobOptions, *, owner: str | None = None,
                    idempotency_key: str | None = None) -> Job:
        """:meth:`score_rows` with the options as one :class:`~producer.plan.JobOptions`."""
        body = self._options(options, owner)
        return self._submit({**body, "rows": self._records(rows, options.model, options.version)}, idempotency_key)

    def submit(self, model: str, inputs: RowsLike, version: int | None = None, batch_size: int | None = None) -> Job:
        """Send a few rows and return at once; :meth:`answer` waits for them. Over HTTP the
        rows go as a bulk job (the API's online route answers synchronously: :meth:`predict`).
        Args and errors: as :meth:`score_rows`."""
        return self.score_rows(inputs, model, version, batch_size)

    def answer(self, job: Job, timeout_s: float) -> Job:
        """Wait for ``job`` (see :meth:`submit`); cancel it if it has not ended within ``timeout_s``.

        Raises:
            JobTimeoutError: not ended in time (the job is cancelled).
        """
        try:
            job.wait(timeout_s)
        except JobTimeoutError:
            self._cancel_job(job.id)
            raise
        return job

    def predict(self, model: str, inputs: RowsLike, version: int | None = None,
                timeout_s: float = PREDICT_TIMEOUT_S) -> pd.DataFrame:
        """Score a few rows now (``POST /v1/models/{model}/predict``), waiting at most
        ``timeout_s`` (0 to 600) for the answer.

        Returns:
            As :meth:`producer.client.Client.predict`: one row per input row, in order, with
            ``frame.attrs["job_id"]``.

        Raises:
            JobTimeoutError: no answer within ``timeout_s`` (the API cancels the request).
            DatasetSchemaError, DatasetError, ModelNotFoundError, MessageTooLargeError: as
                the direct client; BodyInvalidError for a ``timeout_s`` out of range.
        """
        body = {"rows": self._records(inputs, model, version), "version": version, "timeout_s": timeout_s}
        answer = self._body(self._request("POST", f"/v1/models/{quote(model, safe='')}/predict", **_json(body),
                                          timeout=self.timeout_s + timeout_s))
        ok = [(r["row"], {k: v for k, v in r.items() if k != "row"}) for r in answer["rows"] if "error" not in r]
        errors = [(r["row"], r.get("error_field"), r["error"]) for r in answer["rows"] if "error" in r]
        frame = results_frame(None if errors and not ok else ok, errors)
        frame.attrs["job_id"] = answer["job_id"]
        return frame

    def predict_many(self, model: str, inputs: Sequence[RowsLike], version: int | None = None,
                     timeout_s: float = PREDICT_TIMEOUT_S) -> list[pd.DataFrame]:
        """Many :meth:`predict` requests sent at once (up to 8 in flight), so that workers
        batch them; ``timeout_s`` bounds all of them together. Returns one answer per request,
        in order; raises as :meth:`predict`."""
        deadline = time.monotonic() + timeout_s
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(inputs)))) as pool:
            futures = [pool.submit(lambda rows: self.predict(model, rows, version,
                                                             max(0.001, deadline - time.monotonic())), rows)
                       for rows in inputs]
            return [f.result() for f in futures]

    async def apredict(self, model: str, inputs: RowsLike, version: int | None = None,
                       timeout_s: float = PREDICT_TIMEOUT_S) -> pd.DataFrame:
        """:meth:`predict` for asyncio (the request runs in a worker thread of the loop)."""
        return await asyncio.to_thread(self.predict, model, inputs, version, timeout_s)

    # The JobClient protocol (producer.job): what a Job reads through.
    def _job_status(self, job_id: str) -> JobStatus:
        return _STATUS.validate_python(self._body(self._request("GET", f"/v1/jobs/{_quoted(job_id)}", job_id=job_id)))

    def _cancel_job(self, job_id: str) -> JobStatus:
        response = self._request("POST", f"/v1/jobs/{_quoted(job_id)}/cancel", job_id=job_id)
        return _STATUS.validate_python(self._body(response))

    def _results_table(self, job_id: str) -> pa.Table:
        """The job's results as the API streams them (``?format=arrow``): the columns and
        types of ``ResultStore.results_table``."""
        response = self._request("GET", f"/v1/jobs/{_quoted(job_id)}/results", job_id=job_id,
                                 params={"format": "arrow"})
        try:
            return pa.ipc.open_stream(io.BytesIO(response.content)).read_all()
        except pa.ArrowInvalid:
            raise not_the_apis(response, "an Arrow IPC stream") from None

    def _results_frame(self, job_id: str) -> pd.DataFrame:
        return table_frame(self._results_table(job_id))

    def _queue_warning(self, job_id: str) -> str | None:
        return None  # the API does not say which queues the workers consume

    def _options(self, options: JobOptions, owner: str | None) -> dict[str, Any]:
        if owner is not None:
            raise JobOptionError("owner cannot be set over the HTTP API: the API key names a job's owner")
        return options.model_dump(mode="json")

    def _submit(self, body: dict[str, Any], idempotency_key: str | None) -> Job:
        headers = {}
        if idempotency_key is not None:  # sent as a structured-field string (RFC 8941), as the API reads it
            escaped = check_key(idempotency_key).replace("\\", "\\\\").replace('"', '\\"')
            headers["Idempotency-Key"] = f'"{escaped}"'
        response = self._request("POST", "/v1/jobs", **_json(body, headers))
        return Job(self, self._body(response, "job_id"), replayed=response.headers.get("Idempotent-Replayed") == "true")

    def _records(self, rows: RowsLike, model: str, version: int | None) -> list[dict[str, Any]]:
        """``rows`` (any form :func:`producer.rows.rows_to_table` takes, by the model's input
        spec) as one JSON object per row."""
        return rows_to_table(rows, self._manifest(model, version).inputs).to_pylist()

    def _manifest(self, model: str, version: int | None) -> ModelManifest:
        """The model's manifest from ``GET /v1/models`` (asked again when not in the last list).

        Raises:
            ModelNotFoundError: no such model or version.
        """
        for fresh in (False, True):
            if fresh or self._manifests is None:
                self.models()
            found = [m for m in self._manifests or () if m.name == model and version in (None, m.version)]
            if found:
                return max(found, key=lambda m: m.version)
        wanted = f"model {model!r}" + (f" version {version}" if version else "")
        raise ModelNotFoundError(f"{wanted} not found; GET /v1/models lists the models")
