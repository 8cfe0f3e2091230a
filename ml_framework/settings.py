"""Typed settings: defaults, then a YAML file, then files named by ``ML_FRAMEWORK_<KEY>_FILE``
(secrets only), then ``ML_FRAMEWORK_*`` environment variables.

The YAML file is ``configs/development.yaml`` (relative to the working directory) when it
exists, or the file named by ``ML_FRAMEWORK_CONFIG``. Relative paths in settings are taken
relative to the working directory. Unknown keys, in the file or as ``ML_FRAMEWORK_*``
variables, and invalid values fail at start with :class:`~ml_framework.errors.SettingsError`.

Secrets (:data:`SECRET_FIELDS`: API keys, passwords, URLs that may carry one) are masked in
``repr``, in error messages and in ``mlf config``; each can come from a file
(``ML_FRAMEWORK_REDIS_PASSWORD_FILE=/run/secrets/redis_password``, Docker secrets). With
``deployment: production`` the placeholders of the examples (``change-me``...) are refused.
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ml_framework import credentials
from ml_framework.callbacks import parse_host_rule
from ml_framework.constants import (
    CALLBACK_MAX_ATTEMPTS,
    MAX_INT32,
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
)
from ml_framework.errors import ObjectStoreError, SettingsError
from ml_framework.manifest import parse_model_ref
from ml_framework.objectstore import parse_uri
from ml_framework.settings_sources import (
    CONFIG_ENV,
    ENV_PREFIX,
    FILE_SUFFIX,
    file_key,
    secret_files,
    sources,
    yaml_data,
)
from ml_framework.settings_sources import config_path as default_config_path

SECRET_FIELDS = frozenset({"api_keys", "flower_basic_auth", "broker_password", "redis_password",
                           "database_password", "broker_url", "redis_url", "database_url",
                           "s3_access_key_id", "s3_secret_access_key", "callback_secrets"})
"""Settings that hold secrets or may (URLs with a password): masked wherever shown, and
each readable from the file named by ``ML_FRAMEWORK_<KEY>_FILE``."""
_URL_PASSWORDS = (("broker_url", "broker_password"), ("redis_url", "redis_password"),
                  ("database_url", "database_password"))
ApiRole = Literal["user", "admin", "metrics"]
_BASE_URLS = {
    "api_public_url": (r"https?://[^\s/?#@]+(/[^\s?#]*)?",
                       "the API's base URL as browsers reach it, e.g. https://mlf.example.com"),
    "s3_endpoint_url": (r"https?://[^\s/?#@]+/?", "the server's base URL, e.g. http://127.0.0.1:8333"),
}
"""URL settings checked by one rule: ``(full-match pattern, what to give)`` (no credentials,
query or fragment; the endpoint no path either)."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(value: Any) -> timedelta | None:
    """A retention setting: ``none`` (keep for ever), a number of seconds, or a number with
    a unit (``90s``, ``15m``, ``12h``, ``30d``, ``2w``); a ``timedelta`` as it is.

    Raises:
        ValueError: anything else, naming the value.
    """
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _bounded_duration(value, value)
    text = str(value).strip().lower()
    if text in ("none", "never", "off", ""):
        return None
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{value!r} is not a duration: use none, a number of seconds, or e.g. 90s, 15m, 12h, 30d, 2w")
    return _bounded_duration(float(match.group(1)) * _DURATION_UNIT_S[match.group(2) or "s"], value)


MAX_DURATION_S = 100 * 365 * 86_400
"""The longest retention taken (100 years); ``none`` keeps for ever. Longer ones would
overflow the dates a prune pass computes."""


def _bounded_duration(seconds: float, value: Any) -> timedelta:
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"{value!r} is out of range: a duration is 0 to 100 years (36500d); use none to keep "
                         "for ever")
    return timedelta(seconds=seconds)


class Settings(BaseSettings):
    """Every setting of ml-framework, validated once at start.

    Attributes:
        broker_url: Celery broker URL (``redis://host:6379/0``). ``None`` selects the
            embedded, server-less SQLite transport under ``var_dir``.
        database_url: SQLAlchemy URL of the results store
            (``postgresql+psycopg://user@host/db``). ``None`` selects SQLite under ``var_dir``.
        models_dir: root of the model repository, ``<models_dir>/<name>/<version>/``.
        data_dir: datasets under this directory travel to workers by reference
            (path + row range); others are inlined into the shard messages.
        var_dir: local state of the embedded default (broker and results SQLite files).
        logging_level: standard level name.
        default_batch_size: rows per forward pass when neither job nor manifest says.
        shard_size: rows per shard (one Celery task each).
        worker_processes: worker processes ``mlf worker`` starts; default one per CPU core.
        worker_threads: framework intra-op threads per worker process; default
            ``cores // worker_processes`` (at least 1).
        bulk_queue: Celery queue that carries bulk-scoring shards.
        online_queue: Celery queue of online requests (``Client.submit`` / ``predict``,
            ``POST /v1/models/{name}/predict``); every worker takes from it before taking
            its next bulk shard.
        task_time_limit_s: hard limit of one shard or online batch, seconds. Celery's threads
            pool does not enforce time limits, so ``mlf worker`` does: it SIGKILLs a
            process whose task runs longer, even inside native code that holds the GIL,
            and starts a new one (see :mod:`worker.watchdog`). Also the length of a
            running shard's lease (plus a margin).
        on_time_limit: what becomes of a bulk shard killed by the hard time limit:
            ``fail`` (default) records it FAILED at once, every row with "hard time limit
            exceeded"; ``retry`` lets the broker redeliver it, up to ``max_shard_attempts``
            starts in all.
        broker_visibility_timeout_s: seconds before Redis redelivers an unacknowledged
            shard; must exceed ``task_time_limit_s`` (refused otherwise), so that a shard
            still running is never handed to a second worker.
        broker_polling_interval_s: how often the embedded transport polls, seconds.
        worker_preload_models: models each worker process loads (and warms up) at start,
            before taking its first shard: ``name`` (latest version) or ``name:version``.
            In the environment, a comma-separated list.
        worker_max_cached_models: loaded model versions a worker process keeps; loading
            one more unloads the least recently used (and frees its device memory).
        deployment: ``development`` (default) or ``production`` (``configs/production.yaml``):
            production refuses the placeholder secrets of the examples (``change-me``...)
            and API keys in clear shorter than 16 characters, at start, in every process.
        api_auth: ``keys`` (default): the HTTP API refuses to start without ``api_keys``;
            ``none``: no authentication, said by a warning at start and on ``/health``.
        api_keys: keys the HTTP API accepts (``X-API-Key: <key>`` or ``Authorization:
            Bearer <key>``), by name: ``{name: key}`` or, better, ``{name: "sha256:<hex>"}``
            (the key's SHA-256, so that the configuration never holds the key; ``mlf api-key``
            prints both). A job belongs to the name of the key that submitted it; logs and
            metrics show the name, never the key. In the environment (or the file named by
            ``ML_FRAMEWORK_API_KEYS_FILE``): ``name=key`` entries separated by commas or new
            lines; a bare ``key`` (earlier releases) is named ``key-<first 8 hex of its SHA-256>``.
        api_key_roles: ``{name: role}``; ``user`` (default): its own jobs, the models,
            predict; ``admin``: every job and ``/metrics``; ``metrics``: ``/metrics`` only
            (Prometheus). In the environment, ``name=role`` comma-separated.
        broker_password / redis_password / database_password: the password to put into
            ``broker_url`` / ``redis_url`` / ``database_url`` (which then carry none), so that it
            can come from a file (``ML_FRAMEWORK_REDIS_PASSWORD_FILE=/run/secrets/...``).
        api_max_request_bytes: largest request body the HTTP API reads, bytes.
        api_public_url: the HTTP API's base URL as browsers reach it (``https://mlf.example.com``,
            a path prefix allowed); links from elsewhere (Flower's task list) to a job's page
            are ``<api_public_url>/ui/jobs/<job id>`` (:meth:`job_page_url`). ``None``: no links.
        log_dir: directory of the rotating log file ``ml_framework.log``; default
            ``<var_dir>/logs`` (``/app/logs`` in the production image).
        log_to_file: write that file besides stdout.
        log_format: ``text`` (``%(asctime)s - %(name)s - %(levelname)s - %(message)s``,
            the task context appended) or ``json`` (one JSON object per line).
        log_max_bytes / log_backup_count: the log file rotates at this size, keeping this
            many old files (``ml_framework.log.1`` ...).
        worker_metrics_port: port on which ``mlf worker`` serves the Prometheus metrics of
            all its processes (``/metrics``); 0 turns it off.
        worker_metrics_host: address it binds (``0.0.0.0`` in containers, so that
            Prometheus can reach it).
        flower_basic_auth: ``user:password`` pairs Flower accepts (``mlf flower``); in the
            environment, comma-separated. ``mlf flower`` refuses to start without one
            unless told ``--no-auth``.
        redis_url: the deployment's Redis (``ML_FRAMEWORK_REDIS_URL``, as the production
            guide names it): the broker when ``broker_url`` is unset, and the results cache.
        cache_backend: ``none``, or ``redis``: the HTTP API keeps the results of finished
            jobs (SUCCEEDED, PARTIAL, FAILED: they never change) in Redis, rendered, for
            ``cache_ttl_s`` seconds, so clients polling or downloading them again do not
            read the results database again. Needs ``redis_url`` or a Redis ``broker_url``.
        cache_ttl_s: expiry of each cached result, seconds.
        max_shard_attempts: a bulk shard started this many times without being recorded
            (each time its worker process died) is failed, every row with "worker lost",
            instead of being run again: one poison shard cannot requeue for ever.
        broker_queue_type: RabbitMQ only: ``classic`` queues (default; with message
            priorities) or ``quorum`` queues, replicated over the cluster's nodes (no
            message priorities on RabbitMQ 3.x). See docs/operations.md.
        reconcile_interval_s: with Redis, how often ``mlf worker`` looks for open shards
            whose messages the broker lost (kombu's Redis transport can lose a message
            taken at the moment a connection dies) and sends them again; 0: never.
        results_retention: how long finished jobs (SUCCEEDED, PARTIAL, FAILED, CANCELLED)
            and their results are kept after they ended: ``none`` (default: for ever), or a
            duration (``30d``, ``12h``, seconds as a number). ``mlf worker`` deletes what has
            expired every ``prune_interval_s``; ``mlf prune`` does it by hand.
        worker_heartbeat_retention: heartbeats of worker processes silent this long are
            deleted by the same pass (``mlf workers --all`` forgets them); default ``7d``;
            ``none`` keeps them.
        deleted_job_retention: how long the tombstone of a deleted job (its id and owner)
            is kept, so that deleting it again answers the same; default ``30d``.
        idempotency_window: how long an idempotency key (HTTP ``Idempotency-Key``,
            ``idempotency_key=``, ``mlf score --idempotency-key``) names the job it first
            submitted: a repeat from the same owner within it returns that job instead of
            submitting another; default ``24h``; ``none``: as long as the job is kept.
        prune_interval_s: how often ``mlf worker`` runs the pruning pass, seconds (one host
            at a time: a database lock); 0: never.
        max_message_bytes: the largest message a producer sends, bytes (an inline shard
            or a group of online requests); larger ones are refused before anything is
            recorded. Default 64 MiB, half of RabbitMQ's default ``max_message_size``
            (128 MiB) and far below Redis's 512 MB string limit.
        s3_endpoint_url: the S3-compatible server for ``s3://`` datasets and result
            prefixes (``http://seaweedfs:8333``, ``https://minio.example.com``); ``None``:
            AWS S3 itself. See :mod:`ml_framework.objectstore`.
        s3_region: its region (``us-east-1`` when unset and an endpoint is given).
        s3_access_key_id / s3_secret_access_key: its credentials (masked; each can come from
            ``ML_FRAMEWORK_S3_SECRET_ACCESS_KEY_FILE``); unset: the AWS SDK's default chain
            (``AWS_ACCESS_KEY_ID``..., an instance role).
        callback_allowed_hosts: the hosts a job's ``callback_url`` may name: host names
            (``hooks.example.com``, ``*.example.com``), ``host:port``, IP addresses or CIDR
            networks (matched against IP addresses written in the URL). Empty (default):
            every ``callback_url`` is refused at submit. In the environment, comma-separated.
            See docs/security.md.
        callback_secrets: ``{api key name: secret}`` (masked; also from
            ``ML_FRAMEWORK_CALLBACK_SECRETS_FILE``): the completion event of a job is signed
            with its owner's secret, ``default`` for jobs submitted without a key (Python
            client, ``mlf score``). In the environment, ``name=secret`` comma-separated.
        callback_max_attempts: delivery attempts of a completion event before it is marked
            ``failed`` (1 s, 2 s, 4 s ... apart, at most 5 minutes, jittered).
        api_output_prefixes: the ``s3://bucket/prefix`` locations under which HTTP API
            callers may have a job's results written (the job option ``output_uri``); empty
            (default): the API refuses ``output_uri``. The CLI and Python client are not
            bound by it. In the environment, comma-separated.
        api_object_prefixes: the ``s3://bucket/prefix`` locations whose objects the HTTP
            API may be asked to score (a job's ``dataset`` naming an ``s3://`` URI under one
            of them); empty (default): every ``s3://`` dataset is refused by the API. In the
            environment, a comma-separated list. The Python client and ``mlf score`` are
            not limited (they run with the caller's own settings).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    broker_url: str | None = None
    database_url: str | None = None
    models_dir: Path = Path("models")
    data_dir: Path = Path("data")
    var_dir: Path = Path("var")
    logging_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    default_batch_size: PositiveInt = Field(default=256, le=MAX_INT32)
    shard_size: PositiveInt = Field(default=10_000, le=MAX_INT32)
    worker_processes: PositiveInt | None = None
    worker_threads: PositiveInt | None = None
    bulk_queue: str = Field(default="mlf.bulk", min_length=1)
    online_queue: str = Field(default="mlf.online", min_length=1)
    task_time_limit_s: PositiveInt = 3600
    on_time_limit: Literal["fail", "retry"] = "fail"
    broker_visibility_timeout_s: PositiveInt = 7200
    broker_polling_interval_s: float = Field(default=0.05, gt=0, le=10)
    worker_preload_models: Annotated[list[str], NoDecode] = []
    worker_max_cached_models: PositiveInt = Field(default=4, le=1000)
    deployment: Literal["development", "production"] = "development"
    api_auth: Literal["keys", "none"] = "keys"
    api_keys: Annotated[dict[str, SecretStr], NoDecode] = {}
    api_key_roles: Annotated[dict[str, ApiRole], NoDecode] = {}
    broker_password: SecretStr | None = None
    redis_password: SecretStr | None = None
    database_password: SecretStr | None = None
    api_max_request_bytes: PositiveInt = MAX_REQUEST_BYTES
    api_public_url: str | None = None
    log_dir: Path | None = None
    log_to_file: bool = True
    log_format: Literal["text", "json"] = "text"
    log_max_bytes: PositiveInt = 10 * 2**20
    log_backup_count: int = Field(default=5, ge=0, le=1000)
    worker_metrics_port: int = Field(default=9191, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    flower_basic_auth: Annotated[list[SecretStr], NoDecode] = []
    redis_url: str | None = None
    cache_backend: Literal["none", "redis"] = "none"
    cache_ttl_s: PositiveInt = 3600
    max_shard_attempts: PositiveInt = Field(default=3, le=1000)
    broker_queue_type: Literal["classic", "quorum"] = "classic"
    reconcile_interval_s: float = Field(default=60.0, ge=0)
    max_message_bytes: PositiveInt = MAX_MESSAGE_BYTES
    results_retention: timedelta | None = None
    worker_heartbeat_retention: timedelta | None = timedelta(days=7)
    deleted_job_retention: timedelta | None = timedelta(days=30)
    idempotency_window: timedelta | None = timedelta(hours=24)
    prune_interval_s: float = Field(default=600.0, ge=0)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    callback_allowed_hosts: Annotated[list[str], NoDecode] = []
    callback_secrets: Annotated[dict[str, SecretStr], NoDecode] = {}
    callback_max_attempts: PositiveInt = Field(default=CALLBACK_MAX_ATTEMPTS, le=100)
    api_output_prefixes: Annotated[list[str], NoDecode] = []
    api_object_prefixes: Annotated[list[str], NoDecode] = []

    @field_validator("results_retention", "worker_heartbeat_retention", "deleted_job_retention",
                     "idempotency_window", mode="before")
    @classmethod
    def _parse_duration(cls, value: Any) -> timedelta | None:
        return parse_duration(value)

    @field_validator("results_retention", "worker_heartbeat_retention", "deleted_job_retention",
                     "idempotency_window")
    @classmethod
    def _check_duration(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value.total_seconds() < 0:
            raise ValueError("a duration cannot be negative")
        return value

    @property
    def retention_s(self) -> dict[str, float | None]:
        """The three retentions in seconds (``None``: kept for ever), as
        :meth:`ml_framework.store.ResultStore.prune` takes them."""
        def secs(d: timedelta | None) -> float | None:
            return None if d is None else d.total_seconds()

        return {"results_retention_s": secs(self.results_retention),
                "worker_retention_s": secs(self.worker_heartbeat_retention),
                "deleted_job_retention_s": secs(self.deleted_job_retention)}

    @property
    def prunes(self) -> bool:
        """Whether a pruning pass has anything to do (some retention is set)."""
        return any(v is not None for v in self.retention_s.values())

    @field_validator("api_object_prefixes", "api_output_prefixes")
    @classmethod
    def _check_prefixes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        try:
            return [parse_uri(p).uri for p in value]
        except ObjectStoreError as exc:
            raise ValueError(f"{info.field_name}: give s3://bucket/prefix locations: {exc}") from None

    @field_validator("worker_preload_models", "flower_basic_auth", "callback_allowed_hosts", "api_output_prefixes",
                     "api_object_prefixes", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> dict[str, str]:
        return credentials.parse_key_entries(value)

    @field_validator("callback_allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_host_rule(entry)
        return value

    @field_validator("callback_secrets", mode="before")
    @classmethod
    def _parse_callback_secrets(cls, value: Any) -> dict[str, Any]:
        return credentials.parse_secret_entries(value, "callback_secrets")

    @field_validator("api_key_roles", mode="before")
    @classmethod
    def _parse_roles(cls, value: Any) -> dict[str, str]:
        return credentials.parse_pairs(value)

    @field_validator("flower_basic_auth")
    @classmethod
    def _check_basic_auth(cls, value: list[SecretStr]) -> list[SecretStr]:
        for entry in value:
            user, sep, password = entry.get_secret_value().partition(":")
            if not (user and sep and password):
                raise ValueError("flower_basic_auth: give user:password pairs, comma-separated")
        return value

    @field_validator("api_public_url", "s3_endpoint_url")
    @classmethod
    def _check_base_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        pattern, what = _BASE_URLS[info.field_name]
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{info.field_name}: give {what}, not {value[:200]!r}")
        return value.rstrip("/")

    def job_page_url(self, job_id: str) -> str | None:
        """The address of job ``job_id``'s page (``GET /ui/jobs/{id}``) under
        ``api_public_url``, or ``None`` when that is unset."""
        return None if self.api_public_url is None else f"{self.api_public_url}/ui/jobs/{job_id}"

    @model_validator(mode="before")
    @classmethod
    def _complete_urls(cls, data: Any) -> Any:
        """Put each ``*_password`` into its URL; take ``redis_url`` as the broker when unset."""
        return credentials.complete_urls(data, _URL_PASSWORDS) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_roles(self) -> Settings:
        unknown = sorted(set(self.api_key_roles) - set(self.api_keys))
        if unknown:
            raise ValueError(f"api_key_roles names keys that api_keys does not hold: {', '.join(unknown)}")
        return self

    @model_validator(mode="after")
    def _check_production_secrets(self) -> Settings:
        bad = credentials.weak_secrets(self) if self.deployment == "production" else []
        if bad:
            raise ValueError(f"deployment: production refuses placeholder or weak secrets: {', '.join(bad)}; set real "
                             "ones (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return self

    def public_dump(self) -> dict[str, Any]:
        """Every setting as JSON-ready values, secrets masked (``mlf config``)."""
        return {k: credentials.masked(v) if k in SECRET_FIELDS else v for k, v in self.model_dump(mode="json").items()}

    def __repr_args__(self) -> Any:
        """Field values for ``repr``: secrets masked, passwords in URLs masked."""
        for name, value in super().__repr_args__():
            yield name, credentials.masked(value) if name in SECRET_FIELDS else value

    @field_validator("worker_preload_models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_model_ref(entry)
        return value

    @model_validator(mode="after")
    def _check_s3_credentials(self) -> Settings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            given, missing = ("s3_access_key_id", "s3_secret_access_key") if self.s3_secret_access_key is None \
                else ("s3_secret_access_key", "s3_access_key_id")
            raise ValueError(f"{given} is set but {missing} is not: set both (or {missing}_FILE), or neither "
                             "(the AWS SDK's default chain)")
        return self

    @model_validator(mode="after")
    def _check_cache(self) -> Settings:
        if self.cache_backend == "redis" and not self.cache_url:
            raise ValueError("cache_backend: redis needs redis_url (or a redis:// broker_url)")
        return self

    @property
    def cache_url(self) -> str | None:
        """The Redis of the results cache: ``redis_url``, else a Redis ``broker_url``."""
        return self.redis_url or (self.broker_url if self.broker_is_redis else None)

    @model_validator(mode="after")
    def _check_preload(self) -> Settings:
        if len(self.worker_preload_models) > self.worker_max_cached_models:
            raise ValueError(
                f"worker_preload_models names {len(self.worker_preload_models)} models but "
                f"worker_max_cached_models ({self.worker_max_cached_models}) keeps fewer loaded"
            )
        return self

    @model_validator(mode="after")
    def _check_queues(self) -> Settings:
        if self.online_queue == self.bulk_queue:
            raise ValueError(f"online_queue and bulk_queue must differ (both {self.bulk_queue!r}): "
                             "online requests would wait behind bulk shards")
        return self

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        if self.broker_visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                f"broker_visibility_timeout_s ({self.broker_visibility_timeout_s}) must exceed "
                f"task_time_limit_s ({self.task_time_limit_s}); otherwise the broker "
                "redelivers shards that are still running"
            )
        return self

    @property
    def embedded_broker(self) -> bool:
        """True when no broker URL is configured and the SQLite transport is used."""
        return not self.broker_url

    @property
    def broker_is_redis(self) -> bool:
        """True when the broker is Redis (which also carries online-request announcements)."""
        return bool(self.broker_url) and self.broker_url.startswith(("redis://", "rediss://"))

    @property
    def effective_broker_url(self) -> str:
        """The broker URL to connect to, the embedded SQLite transport if none is set."""
        if self.broker_url:
            return self.broker_url
        return f"mlfsqla+sqlite:///{(self.var_dir / 'broker.sqlite').resolve()}"

    @property
    def effective_log_dir(self) -> Path:
        """Where ``ml_framework.log`` goes: ``log_dir``, else ``<var_dir>/logs``."""
        return self.log_dir or self.var_dir / "logs"

    @property
    def effective_database_url(self) -> str:
        """The results-store URL, SQLite under ``var_dir`` if none is set."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'results.sqlite').resolve()}"


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, the YAML file, the environment and ``overrides``.

    Args:
        config_path: YAML file to read; default ``$ML_FRAMEWORK_CONFIG`` or
            ``configs/development.yaml`` when it exists.
        **overrides: values that win over every other source (used by tests and the CLI).

    Returns:
        The validated, immutable :class:`Settings`.

    Raises:
        SettingsError: an unknown key or a bad value; the message names each key and
            its source (the YAML file or the environment variable).
    """
    path = config_path if config_path is not None else default_config_path()
    files, file_problems = secret_files(SECRET_FIELDS)
    layers = sources(Settings, path, overrides, files)
    data = yaml_data(layers[-1])
    fields = set(Settings.model_fields)
    problems = [f"{path}: unknown key {key!r}" for key in data if key not in fields]
    problems += [
        f"environment: unknown variable {name}"
        for name in os.environ
        if name.startswith(ENV_PREFIX)
        and name != CONFIG_ENV
        and name[len(ENV_PREFIX):].lower() not in fields
        and file_key(name) not in SECRET_FIELDS
    ]
    if problems or file_problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems + file_problems)
                            + (f"\n  known keys: {', '.join(sorted(fields))}" if problems else ""))
    def source(key: str) -> str:
        if key in overrides:
            return "argument"
        if ENV_PREFIX + key.upper() in os.environ:
            return f"environment variable {ENV_PREFIX + key.upper()}"
        if key in files:
            return f"the file named by {ENV_PREFIX + key.upper() + FILE_SUFFIX}"
        return str(path) if key in data else "defaults"

    try:
        return Settings(_build_sources=(layers, overrides))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if err["loc"]:
                key = str(err["loc"][0])
                shown = "<hidden>" if key in SECRET_FIELDS else credentials.scrub_userinfo(repr(err.get("input")))
                lines.append(f"{source(key)}: {key}: {credentials.scrub_userinfo(err['msg'])} (got {shown})")
            else:  # a rule across keys: name where each key involved came from
                involved = [k for k in fields if k in err["msg"]]
                where = "; ".join(f"{k} from {source(k)}" for k in involved) or str(path or "settings")
                lines.append(f"{err['msg']} ({where})")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, loaded once (see :func:`load_settings`)."""
    return load_settings()
