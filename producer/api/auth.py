"""Who calls the HTTP API, and which jobs they may see.

Authentication is a FastAPI security dependency over two schemes, so the OpenAPI document
declares them and the docs page's Authorize button works: ``X-API-Key: <key>``
(:data:`API_KEY`) or ``Authorization: Bearer <key>`` (:data:`BEARER`). A key is checked
against the SHA-256 digests of the configured keys in constant time; the caller becomes a
:class:`Principal` named by the key's name, never by the key.

Roles (``api_key_roles``): ``user`` (default) sees its own jobs, the models and predict;
``admin`` sees every job and ``/metrics``; ``metrics`` only ``/metrics``.

Browsers (the job pages, :mod:`producer.api.ui`): ``POST /ui/login`` with a key in the form
body sets the :data:`UI_COOKIE` cookie, HttpOnly and SameSite=Lax, holding a session
token (:meth:`KeyTable.session_token`: the key's name, the time it was issued, a random
nonce and an HMAC keyed by the key's digest), never the key. The token is taken on GET and HEAD requests only
(so that it reads pages and downloads results but cancels or submits nothing), for
:data:`UI_SESSION_S`, and dies with its key or when its browser signs out (``POST
/ui/logout`` records it in the results store, :mod:`ml_framework.store.sessions`, which
every API process reads).

Ownership: a job belongs to the name of the key that submitted it. :func:`owned_job_id`
resolves a job id or prefix (8 characters at least) among the caller's own jobs (every job
for an admin) and answers 404 for anything else, the same 404 whether the job is someone
else's or does not exist. Routes taking a ``{job_id}`` depend on it (:data:`OwnedJobId`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ml_framework.credentials import key_digest
from ml_framework.errors import ForbiddenError, JobNotFoundError, SettingsError, UnauthorizedError
from ml_framework.settings import Settings
from producer.api.errors import public

log = logging.getLogger(__name__)

API_PREFIX_MIN_CHARS = 8
"""Fewest characters of a job id the API resolves: 32 bits, so a prefix cannot be used to
list ids, and it resolves among the caller's own jobs only."""
AUTH_OFF_WARNING = ("authentication is off (api_auth: none): every caller can submit, read and cancel every "
                    "job; set api_keys and remove api_auth: none")

UI_COOKIE = "mlf_ui"
"""Name of the browser session cookie (see the module's docstring)."""
UI_SESSION_S = 12 * 3600
"""How long a browser session token is taken after it was issued, seconds (a working day)."""

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey",
                       description="An API key (`api_keys`), in the X-API-Key header.")
BEARER = HTTPBearer(auto_error=False, scheme_name="Bearer",
                    description="An API key (`api_keys`), as `Authorization: Bearer <key>`.")


@dataclass(frozen=True)
class Principal:
    """The caller of a request.

    Attributes:
        name: the key's name (``None`` when authentication is off).
        role: ``user``, ``admin`` or ``metrics``.
    """

    name: str | None
    role: str

    @property
    def sees_all_jobs(self) -> bool:
        """Admins, and everyone when authentication is off."""
        return self.role == "admin"


ANONYMOUS = Principal(None, "admin")


class KeyTable:
    """The configured keys, by digest, checked in constant time.

    Args:
        settings: ``api_auth``, ``api_keys`` and ``api_key_roles``.

    Raises:
        SettingsError: ``api_auth: keys`` (the default) with no key, or ``api_auth: none``
            with keys (one of the two is a mistake).
    """

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.api_auth == "keys"
        if self.enabled and not settings.api_keys:
            raise SettingsError(
                "the HTTP API needs API keys: set api_keys (ML_FRAMEWORK_API_KEYS=name=key,... or "
                "name=sha256:<hex>, or ML_FRAMEWORK_API_KEYS_FILE; `mlf api-key NAME` makes one), or say "
                "api_auth: none (ML_FRAMEWORK_API_AUTH=none) to run without authentication")
        if not self.enabled and settings.api_keys:
            raise SettingsError("api_auth: none but api_keys is set: remove one of the two")
        self._keys = [(key_digest(value.get_secret_value()), Principal(name, settings.api_key_roles.get(name, "user")))
                      for name, value in settings.api_keys.items()]

    @property
    def warning(self) -> str | None:
        """What ``/health`` and the start-up log say when authentication is off."""
        return None if self.enabled else AUTH_OFF_WARNING

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key``, or ``None``. Every configured digest is compared, so
        the time taken does not tell which key came close."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, principal in self._keys:
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    def session_token(self, principal: Principal, now_s: float | None = None) -> str:
        """A browser session token for ``principal`` (a configured key's), issued at
        ``now_s`` (Unix seconds; default now): ``<name, base64url>.<issued_s>.<nonce, 16
        hex>.<HMAC-SHA256 hex>``, the HMAC keyed by the key's digest, so the token holds no
        key and cannot be made without the configuration. The random nonce makes each
        sign-in's token its own, so that signing one out ends no other.

        Raises:
            KeyError: ``principal`` is no configured key's.
        """
        issued = int(time.time() if now_s is None else now_s)
        digest = next((d for d, p in self._keys if p == principal), None)
        if digest is None or principal.name is None:
            raise KeyError("no configured key of that name")
        name = base64.urlsafe_b64encode(principal.name.encode()).decode().rstrip("=")
        nonce = secrets.token_hex(8)
        return f"{name}.{issued}.{nonce}.{self._sign(digest, name, issued, nonce)}"

    def lookup_session(self, token: str, now_s: float | None = None) -> Principal | None:
        """The principal of a session token that is well-formed, signed by a configured
        key's digest and at most :data:`UI_SESSION_S` old; else ``None``."""
        parts = token.split(".")
        if len(parts) != 4:
            return None
        name, issued, nonce, mac = parts
        if not (issued.isascii() and issued.isdigit()) or not 0 <= (time.time() if now_s is None else now_s) - int(issued) <= UI_SESSION_S:
            return None
        try:
            wanted = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        found = None
        for digest, principal in self._keys:  # every digest compared, as in lookup
            if hmac.compare_digest(self._sign(digest, name, int(issued), nonce), mac) and principal.name == wanted:
                found = principal
        return found

    def session_expires_s(self, token: str, now_s: float | None = None) -> float | None:
        """When a valid session token (:meth:`lookup_session`) stops being taken, Unix
        seconds; ``None`` for a token that is not taken now."""
        if self.lookup_session(token, now_s) is None:
            return None
        return int(token.split(".")[1]) + UI_SESSION_S

    @staticmethod
    def _sign(digest: bytes, name: str, issued: int, nonce: str) -> str:
        return hmac.new(digest, f"mlf-ui:{name}:{issued}:{nonce}".encode(), hashlib.sha256).hexdigest()


async def caller(request: Request, key: Annotated[str | None, Security(API_KEY)] = None,
                 bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None) -> Principal:
    """The request's :class:`Principal` (FastAPI security dependency).

    Raises:
        UnauthorizedError: no key, or an unknown one (logged with the client address,
            never the key).
    """
    table: KeyTable = request.app.state.keys
    if not table.enabled:
        return ANONYMOUS
    given = key or (bearer.credentials if bearer else None)
    principal = table.lookup(given) if given else None
    if not given and request.method in ("GET", "HEAD") and (token := request.cookies.get(UI_COOKIE)):
        given, principal = token, table.lookup_session(token)
        if principal is not None and await run_in_threadpool(request.app.state.client.store.session_revoked, token):
            principal = None  # signed out (POST /ui/logout) before it expired
    if principal is None:
        log.warning("request %s: %s key from %s for %s %s", getattr(request.state, "request_id", "-"),
                    "unknown" if given else "no", request.client.host if request.client else "-",
                    request.method, request.url.path)
        raise public(UnauthorizedError("missing or wrong API key (X-API-Key: <key> or Authorization: Bearer <key>)"))
    request.state.principal = principal
    return principal


def _role(*allowed: str):
    async def check(principal: Annotated[Principal, Security(caller)]) -> Principal:
        if principal.role not in allowed and principal.role != "admin":
            raise public(ForbiddenError(f"the role of key {principal.name!r} ({principal.role}) does not allow "
                                         "this endpoint"))
        return principal

    return check


User = Annotated[Principal, Security(_role("user"))]
"""A caller allowed the jobs and models endpoints (role ``user`` or ``admin``)."""
MetricsReader = Annotated[Principal, Security(_role("metrics"))]
"""A caller allowed ``/metrics`` (role ``metrics`` or ``admin``)."""


def owned_job_id(job_id: str, request: Request, principal: User) -> str:
    """The full id of the caller's job ``job_id`` (an id, or its first 8+ characters).

    Raises:
        JobNotFoundError: no such job among the caller's, a prefix under 8 characters, or
            an ambiguous one; the message names only what the caller sent.
    """
    store = request.app.state.client.store
    try:
        return store.resolve_job_id(job_id, owned_by=None if principal.sees_all_jobs else principal.name,
                                    min_prefix=API_PREFIX_MIN_CHARS)
    except JobNotFoundError as exc:
        if "ambiguous" in str(exc):  # lists the caller's own ids only
            raise public(exc) from None
        raise public(JobNotFoundError(f"no job {job_id[:64]!r}: give the job id (32 hex characters) or at least "
                                       f"{API_PREFIX_MIN_CHARS} of its first characters")) from exc


OwnedJobId = Annotated[str, Depends(owned_job_id)]
"""The resolved id of a ``{job_id}`` path parameter the caller owns (see :func:`owned_job_id`)."""


def deletable_job_id(job_id: str, request: Request, principal: User) -> str | None:
    """For ``DELETE``: the full id of the caller's job ``job_id`` (as :func:`owned_job_id`),
    or ``None`` when the caller's job of that full id was deleted already (its tombstone
    names the caller's key; an admin: any key), so that deleting again answers the same.

    Raises:
        JobNotFoundError: as :func:`owned_job_id`, also for a deleted job of another key
            (404 whether it existed or not).
    """
    try:
        return owned_job_id(job_id, request, principal)
    except JobNotFoundError:
        full = job_id.strip().lower()
        gone, owner = request.app.state.client.store.deleted_owner(full) if len(full) == 32 else (False, None)
        if gone and (principal.sees_all_jobs or owner == principal.name):
            return None
        raise


DeletableJobId = Annotated[str | None, Depends(deletable_job_id)]
"""The resolved id of a ``{job_id}`` the caller owns, or ``None`` when the caller deleted it
already (see :func:`deletable_job_id`)."""
