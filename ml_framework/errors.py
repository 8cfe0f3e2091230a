"""Every error ml-framework raises on purpose.

Hierarchy::

    MLFrameworkError
    ├── SettingsError            bad or unknown configuration key
    ├── ModelError
    │   ├── ModelNotFoundError   no such model / version in the model repository
    │   ├── ManifestError        manifest missing, malformed or inconsistent with its artifact
    │   ├── ModelLoadError       the runtime could not load the artifact
    │   ├── ModelUnavailableError  (API) the model failed a request as a whole: not servable now
    │   └── BatchContractError   a batch returned outputs its manifest does not allow
    ├── DatasetError
    │   ├── DatasetNotFoundError the dataset path does not exist
    │   ├── DatasetPathError     the path leaves the data directory: refused unread
    │   ├── DatasetFormatError   unsupported or unreadable file
    │   └── DatasetSchemaError   columns the model needs are missing
    ├── ObjectStoreError         an s3:// location is malformed, unknown, refused or unreachable
    │   └── ObjectStoreUnavailableError  the store refuses this server or cannot be reached, or
    │                            results it held are gone: the server's fault (503)
    ├── JobError
    │   ├── JobNotFoundError     no job with that id in the results store
    │   ├── JobTimeoutError      ``Job.wait`` ran out of time
    │   │   └── RequestCancelledError  an online request was cancelled before its answer
    │   ├── JobOptionError       a batch size or priority out of range (also a ValueError)
    │   ├── MessageTooLargeError a shard or online request over ``max_message_bytes``
    │   ├── CallbackError        a callback_url refused at submit (scheme, host, no secret)
    │   └── IdempotencyKeyError  a malformed idempotency key
    │       └── IdempotencyKeyReusedError  the key was used for a different request
    ├── ApiRequestError          the HTTP API refuses one request (raised by the API, and by
    │   │                        the HTTP client for the API's answer)
    │   ├── UnauthorizedError    no API key, or an unknown one (401)
    │   ├── ForbiddenError       the key's role does not allow the endpoint (403)
    │   ├── RequestTooLargeError the body is over ``api_max_request_bytes`` (413)
    │   ├── UnsupportedMediaTypeError  a JSON route got another type of body (415)
    │   ├── BodyInvalidError     the body does not validate (422)
    │   ├── InferenceInputError  a /v2 inference request's tensors do not fit the model (400)
    │   ├── ParserUnavailableError  the process parsing the body died (503)
    │   └── ApiResponseError     (HTTP client) an error answer no other class names
    ├── ApiUnavailableError      (HTTP client) the HTTP API cannot be reached (retry later)
    ├── StoreError               the results database refused an operation
    │   └── StoreUnavailableError    the results database cannot be reached (retry later)
    ├── BrokerError              the message broker refused an operation
    │   └── BrokerUnavailableError   the broker cannot be reached (retry later)
    ├── ShardFailed              (worker) every row of a shard failed: its task's FAILURE
    └── ImageRowError            (worker) one row's image cannot be prepared: that row fails

Row-level problems (a non-numeric value in one row) are not exceptions: they are recorded
as row errors and the rest of the job goes on.
"""

from __future__ import annotations


class MLFrameworkError(Exception):
    """Root of every error raised on purpose by ml-framework."""


class SettingsError(MLFrameworkError):
    """Raised when a configuration key is unknown or its value invalid.

    The message names each offending key and where it came from (YAML file or env var).
    """


class ModelError(MLFrameworkError):
    """Raised when a model cannot be found, described or loaded."""


class ModelNotFoundError(ModelError):
    """Raised when a model name or version is not in the model repository."""


class ManifestError(ModelError):
    """Raised when a model manifest is missing, malformed or does not match its artifact."""


class ModelLoadError(ModelError):
    """Raised when a runtime fails to load a model artifact."""


class ModelUnavailableError(ModelError):
    """Raised by the HTTP API's ``/v2`` inference when the workers failed a request as a
    whole (the model could not be loaded or run: the shard's error, not the rows'): the
    request was fine, the model is not servable now (503, as Triton answers a model that
    is not ready)."""


class BatchContractError(ModelError):
    """Raised when a model returns a number or shape of outputs its manifest does not allow
    (one output row per input row, of the manifest's width); every row of the batch fails
    with it, as Ray Serve's and PyTriton's batchers do."""


class DatasetError(MLFrameworkError):
    """Raised when a dataset cannot be read as a whole."""


class DatasetNotFoundError(DatasetError):
    """Raised when a dataset path does not exist."""


class DatasetPathError(DatasetError):
    """Raised when a dataset path enters the data directory and leads out of it (a
    symbolic link or ``..``), or, where only the data directory may be read (HTTP API,
    worker), lies outside it. Raised before anything of the file is read; the message
    names the path as given, never its target (see :mod:`ml_framework.paths`)."""


class DatasetFormatError(DatasetError):
    """Raised when a dataset's file type is unsupported or the file cannot be parsed."""


class DatasetSchemaError(DatasetError):
    """Raised when a dataset lacks the columns a model needs."""


class ObjectStoreError(MLFrameworkError):
    """Raised when object storage (``s3://``) cannot be used: a malformed URI, no endpoint
    or credentials the server accepts, or the server cannot be reached. The message names
    the URI, never a credential."""


class ObjectStoreUnavailableError(ObjectStoreError):
    """Raised when the object store refuses the process's own credentials, cannot be
    reached or fails, or a results file it held is gone: nothing the caller can change
    (the HTTP API answers 503), as opposed to a URI or bucket the caller named wrong."""


class JobError(MLFrameworkError):
    """Raised for job-level problems on the producer side."""


class JobNotFoundError(JobError):
    """Raised when no job with the given id exists in the results store."""


class JobTimeoutError(JobError):
    """Raised when ``Job.wait`` or an online request reaches its timeout before the job
    finished.

    Attributes:
        job_id: the job that timed out, when known.
    """

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class RequestCancelledError(JobTimeoutError):
    """Raised to the caller of an online request that was cancelled (by its timeout or
    ``DELETE /v1/jobs/{id}``) before it was answered."""


class JobOptionError(JobError, ValueError):
    """Raised when a job option is out of range: a batch size outside 1 to
    :data:`~ml_framework.constants.MAX_INT32`, or a priority that is not an integer from
    :data:`~ml_framework.constants.MIN_PRIORITY` to
    :data:`~ml_framework.constants.MAX_PRIORITY`. The message names the option, its range
    and the value given. Also a :class:`ValueError`, as before it had a class of its own."""


class MessageTooLargeError(JobError):
    """Raised when a shard message or an online request would be larger than the
    ``max_message_bytes`` setting (default :data:`~ml_framework.constants.MAX_MESSAGE_BYTES`),
    whether its rows come from a file or were given in memory. Raised before the message
    is sent; the message names both sizes, what to do instead (a smaller ``shard_size``,
    fewer rows per request, a file under the data directory) and what was recorded. The
    HTTP API answers it with 413."""


class CallbackError(JobError):
    """Raised at submit when a job's ``callback_url`` cannot be accepted: not ``http`` /
    ``https``, credentials in it, too long, a host ``callback_allowed_hosts`` does not
    allow, or no ``callback_secrets`` entry to sign the submitter's events with. The
    message names the host and the setting to change, never the whole URL; the HTTP API
    answers 400."""


class IdempotencyKeyError(JobError):
    """Raised when an idempotency key (``Idempotency-Key``, ``idempotency_key=``,
    ``--idempotency-key``) is empty, too long or holds characters other than printable ASCII."""


class IdempotencyKeyReusedError(IdempotencyKeyError):
    """Raised when an idempotency key already named a different submission (another
    dataset, model, rows or option) from the same owner within ``idempotency_window``:
    nothing new is recorded or sent.

    Attributes:
        job_id: the job the key names.
    """

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class ApiRequestError(MLFrameworkError):
    """Raised by the HTTP API when it refuses one request as sent, and by the Python
    client over HTTP (``Client.connect``) when the API answered so; never by the direct
    client. Each subclass has its HTTP status (``producer.api.errors.STATUS_BY_ERROR``)."""


class UnauthorizedError(ApiRequestError):
    """Raised when a request has no API key, or one the API does not know (401)."""


class ForbiddenError(ApiRequestError):
    """Raised when a key's role does not allow the endpoint (403)."""


class RequestTooLargeError(ApiRequestError):
    """Raised when a request body is over ``api_max_request_bytes`` (413)."""


class UnsupportedMediaTypeError(ApiRequestError):
    """Raised when a JSON route gets a body of another type, e.g. curl's default
    ``application/x-www-form-urlencoded`` (415)."""


class BodyInvalidError(ApiRequestError):
    """Raised when a request body does not validate (422, answered as ``ValidationError``).

    Attributes:
        errors: ``(location, message)`` pairs, the location starting with ``"body"``; the
            first ``producer.api.bodies.MAX_ERRORS`` of them.
    """

    def __init__(self, errors: list[tuple[tuple, str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors))
        self.errors = errors


class InferenceInputError(ApiRequestError):
    """Raised when an Open Inference Protocol (``/v2``) request's tensors do not fit the
    model: wrong name, datatype, shape or element count, or data of another type (400)."""


class ParserUnavailableError(ApiRequestError):
    """Raised when the process parsing a request body died, e.g. killed for memory (503)."""


class ApiResponseError(ApiRequestError):
    """Raised by the Python client over HTTP (``Client.connect``) when the API answers an
    error that no other class of this tree names (a 500, a proxy's 502, an unknown route).
    The message is the API's (never a server path: see ``producer.api.errors``).

    Attributes:
        status: the HTTP status code.
        request_id: the answer's ``X-Request-ID``, under which the API's log has the detail.
    """

    def __init__(self, message: str, status: int = 0, request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class ApiUnavailableError(MLFrameworkError):
    """Raised by the Python client over HTTP (``Client.connect``) when the API cannot be
    reached: connection refused, a timeout, a TLS failure. The message names the API's URL,
    never the API key. Transient: retry once the API is back."""


class StoreError(MLFrameworkError):
    """Raised when the results database refuses an operation."""


class StoreUnavailableError(StoreError):
    """Raised when the results database cannot be reached (connection refused, server down).

    Transient: workers retry the shard with backoff until the database is back.
    """


class BrokerError(MLFrameworkError):
    """Raised when the message broker (Redis, RabbitMQ, the embedded SQLite file) refuses
    an operation."""


class BrokerUnavailableError(BrokerError):
    """Raised when the broker cannot be reached, so a job's shard messages cannot be sent.

    The message names the broker, its password masked (see
    :func:`ml_framework.endpoints.broker_label`). Transient: retry once the broker is back.

    Attributes:
        job_id: the job recorded before the broker went away mid-send (then CANCELLED,
            with some of its shards sent), or ``None`` when nothing was recorded.
        public_message: what the HTTP API answers (503): names no host or secret.
    """

    public_message = "the broker is unreachable; retry later"

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class ShardFailed(MLFrameworkError):  # not ...Error: the name Flower shows since issue 19
    """Raised by a worker's shard task when every row of the shard failed, after the shard
    was recorded; the message is the reason. Celery reports the task as ``FAILURE`` and
    Flower shows ``ShardFailed('<reason>')`` (see :mod:`worker.task_states`)."""


class ImageRowError(MLFrameworkError):
    """Raised inside the worker's image converter (``worker.inputs.image``) when one row's
    image cannot be prepared (no path, a path leaving the data directory, a missing,
    unreadable or oversized image). Caught there: that row fails with the message as its
    row error (it names the path as given, never the worker's absolute path), the other
    rows go on."""
