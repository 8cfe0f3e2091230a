"""The HTTP API: ``uvicorn producer.api:app --host 0.0.0.0 --port 8000``.

A FastAPI app (:func:`create_app`, :mod:`producer.api.app`) of one router per resource:
:mod:`~producer.api.jobs`, :mod:`~producer.api.models`, :mod:`~producer.api.operations`, the
job pages (:mod:`~producer.api.ui`) and the Open Inference Protocol (:mod:`~producer.api.oip`). Authentication and the body-size limit are
dependencies (:mod:`producer.api.auth`, :mod:`producer.api.deps`).

Endpoints (JSON unless said otherwise; errors are ``{"error": {"type", "message", "request_id"}}``):

==========================================  ===============================================
``POST /v1/jobs``                           submit a job: a dataset under the data directory,
                                            or inline ``rows``; 202 with the job's status (200
                                            with the same job for a repeated ``Idempotency-Key``)
``GET /v1/jobs``                            the caller's jobs (admins: all), open ones first
                                            (``limit``, 20 by default)
``GET /v1/jobs/{id}``                       state and progress (id or unique 8+ character prefix)
``GET /v1/jobs/{id}/results``               a page of rows (``offset``, ``limit``), or the
                                            whole result as ``?format=csv`` / ``parquet``
``POST /v1/jobs/{id}/cancel``               cancel: no further shard starts; results stay
``DELETE /v1/jobs/{id}``                    delete the job and its results (cancelled first
                                            if running); 204, also when already deleted
``GET /v1/models``                          the model repository
``POST /v1/models/{name}/predict``          online: score a few rows, answer synchronously
``GET /health``                             liveness: the process answers
``GET /ready``                              broker and database reachable, a worker alive
``GET /metrics``                            Prometheus text format
``GET /gpu-status``                         per-GPU telemetry from worker heartbeats
``GET /ui/jobs``, ``/ui/jobs/{id}``         HTML job pages for a browser (:mod:`producer.api.ui`)
``/v2/...``                                 KServe v2 REST (Open Inference Protocol): health,
                                            model metadata and readiness, ``infer``
                                            (:mod:`producer.api.oip`; errors ``{"error": "..."}``)
==========================================  ===============================================

Authentication (:mod:`producer.api.auth`): every endpoint but ``/health``, ``/ready``,
``/v2/health/live``, ``/v2/health/ready`` and the schema needs ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; the API refuses to
start without ``api_keys`` unless ``api_auth: none``. A job belongs to the key that
submitted it: other keys get 404 for it (admins see every job). ``/metrics`` needs the
``metrics`` or ``admin`` role.

Errors (:mod:`producer.api.errors`) name no server path or URL; each response carries
``X-Request-ID``, and error bodies the same ``request_id``, under which the log has the
detail. Bodies larger than ``api_max_request_bytes`` are refused with 413; bodies are
parsed off the event loop (:mod:`producer.api.bodies`), so ``/health`` answers while
large requests are in flight. A JSON route's body sent with another ``Content-Type`` (curl's
default ``application/x-www-form-urlencoded``) is answered 415 "send the body as JSON".
Dataset paths are relative to the data directory; one that misses is answered with the path
under it that exists, when some tail of it does (``data/digits.csv``: "did you mean
'digits.csv'?").

Idempotency (:mod:`ml_framework.store.idempotency`): ``POST /v1/jobs`` takes an
``Idempotency-Key`` header (IETF draft-ietf-httpapi-idempotency-key-header): a repeat with
the key and the same body from the same API key within ``idempotency_window`` answers 200
with the job the key submitted (``Idempotent-Replayed: true``), the key with another body
422. The online ``predict`` route takes no key: it answers synchronously, a few rows.

Changed in 0.2: ``DELETE /v1/jobs/{id}`` deletes the job and its results; it used to cancel,
which is now ``POST /v1/jobs/{id}/cancel``. Deleting is idempotent: 204 the first time and
every time after for the key that owned the job (while its tombstone is kept,
``deleted_job_retention``; by full id), 404 for another key, as for any job not its own.

JSON rule: outputs are stored as finite numbers (a model returning NaN or infinity fails
that row with a row error), so results never hold NaN; any NaN or infinity that reaches a
response otherwise is written as ``null``.
"""

from __future__ import annotations

from producer.api.app import create_app

__all__ = ["app", "create_app"]

app = create_app()
"""The app ``uvicorn producer.api:app`` serves (settings are read at start-up)."""
