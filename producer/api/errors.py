"""Error responses of the HTTP API, and the request id that ties each to the log.

Every response carries ``X-Request-ID`` (the client's, when it sent a sane one, else a new
one). An error body is ``{"error": {"type", "message", "request_id"}}``: the message says
what was wrong with the request, and names no server path, URL or other tenant: errors
whose text may hold them (the results store's URL, the models directory, a database or
broker failure) get a fixed message, and every message is scrubbed of file system paths
and URLs (:func:`scrub`). The full detail goes to the log under the request id.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ml_framework.errors import (
    BodyInvalidError,
    BrokerUnavailableError,
    DatasetError,
    DatasetNotFoundError,
    ForbiddenError,
    IdempotencyKeyReusedError,
    JobNotFoundError,
    JobTimeoutError,
    ManifestError,
    MessageTooLargeError,
    MLFrameworkError,
    ModelError,
    ModelNotFoundError,
    ModelUnavailableError,
    ObjectStoreUnavailableError,
    ParserUnavailableError,
    RequestTooLargeError,
    SettingsError,
    StoreError,
    StoreUnavailableError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from ml_framework.store.engine import CONNECTION_ERRORS, unavailable

log = logging.getLogger("producer.api")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_URL = re.compile(r"\b(?![sS]3://)[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]*")
"""A URL, shown as ``<url>``: a server's (the broker's, the store's, an endpoint's). An
``s3://bucket/key`` URI is not one: it names a dataset the caller gave, and is echoed."""
_ABS_PATH = re.compile(r"(?:^|(?<=[\s'\"(=]))/(?!v[12]/|health|ready|metrics|docs|openapi)[^\s'\",;:()]+")
"""An absolute path: a ``/`` at the start or after a space, quote, ``(`` or ``=``, so that a
name such as ``a[/]`` (a column, a model) is echoed as the user sent it."""
_MAX_MESSAGE_CHARS = 2000



STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    (UnauthorizedError, 401), (ForbiddenError, 403), (RequestTooLargeError, 413), (MessageTooLargeError, 413),
    (UnsupportedMediaTypeError, 415), (ParserUnavailableError, 503), (JobNotFoundError, 404), (ModelNotFoundError, 404),
    (DatasetNotFoundError, 404), (JobTimeoutError, 504), (ManifestError, 409), (DatasetError, 422),
    (IdempotencyKeyReusedError, 422),
    (StoreUnavailableError, 503),
    (BrokerUnavailableError, 503), (ModelUnavailableError, 503), (ObjectStoreUnavailableError, 503),
    (MLFrameworkError, 400),
]
"""HTTP status of each error class (the first that matches)."""
FIXED_MESSAGES: list[tuple[type[Exception], str]] = [
    (StoreUnavailableError, "the results database is unreachable; retry later"),
    (StoreError, "the results database refused the operation"),
    (SettingsError, "the server is misconfigured"),
    (ModelNotFoundError, "no such model or version; GET /v1/models lists them"),
    (ModelError, "the model could not be used; the operator has the details"),
]
"""Errors whose text may name server internals (the results store's URL, the models
directory and every model in it) get these messages instead, unless the API made the
message itself (:func:`public`); the log has the original."""
E = TypeVar("E", bound=BaseException)


def public(exc: E) -> E:
    """Mark ``exc``'s message as made for the caller (it names only what the request
    sent), so that it is answered as it is; returns ``exc``."""
    exc.public_message = str(exc)  # type: ignore[attr-defined]
    return exc


def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header names JSON (``application/json``, ``application/*+json``,
    parameters allowed); a request without one is taken as JSON."""
    if content_type is None:
        return True
    header = EmailMessage()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def send_json(content_type: str | None) -> UnsupportedMediaTypeError:
    """The error answering a JSON route's body of type ``content_type``."""
    return public(UnsupportedMediaTypeError(
        f"send the body as JSON with Content-Type: application/json (got {(content_type or '')[:100]!r}; "
        "curl sends application/x-www-form-urlencoded unless told -H 'Content-Type: application/json', "
        "or use --json)"))


def _expects_json(request: Request) -> bool:
    """Whether the request's route takes a JSON body that FastAPI parses itself (not a form)."""
    route = request.scope.get("route")
    body = getattr(route, "body_field", None) if isinstance(route, APIRoute) else None
    return body is not None and not isinstance(getattr(body, "field_info", None), params.Form)


def request_id(request: Request) -> str:
    """The id of ``request`` (set by :class:`RequestIdMiddleware`)."""
    return request.scope.get("state", {}).get("request_id") or "-"


class RequestIdMiddleware:
    """Pure ASGI middleware: gives each HTTP request an id, and its response the
    ``X-Request-ID`` header (a client's own id is kept when it is 8 to 64 characters of
    ``[A-Za-z0-9._-]``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class StartupErrorMiddleware:
    """Pure ASGI middleware: a start-up refused for a reason of ours (an
    :class:`~ml_framework.errors.MLFrameworkError`, e.g. ``SettingsError``: no API keys)
    reaches the server as that one sentence, not as Starlette's traceback of the lifespan
    (Uvicorn printed 41 lines of framework frames before the sentence saying what to set).
    Any other start-up failure keeps its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_plain(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                exc = sys.exc_info()[1]  # Starlette reports the failure while it handles it
                if isinstance(exc, MLFrameworkError):
                    message = {**message, "message": f"cannot start: {type(exc).__name__}: {exc}"}
            await send(message)

        await self.app(scope, receive, send_plain)


def scrub(message: str, roots: list[Path]) -> str:
    """``message`` without server locations: each of ``roots`` (the data directory first,
    so that a dataset stays named as the caller gave it) removed from the paths under it,
    then URLs as ``<url>`` and other absolute paths as ``<path>``."""
    for root in roots:  # absolute forms only: a relative root ("data") would eat the caller's own "data/"
        for form in {str(root.absolute()), str(root.resolve())}:
            message = message.replace(form.rstrip("/") + "/", "")
    message = _URL.sub("<url>", message)
    message = _ABS_PATH.sub("<path>", message)
    return message[:_MAX_MESSAGE_CHARS]


def shown_dataset(dataset: str, data_dir: Path) -> str:
    """A job's dataset as the API shows it: relative to ``data_dir`` when it lies under it,
    ``<server path>/NAME`` (its file name only) for another absolute path (a job the CLI or
    the Python client submitted from elsewhere on the server), an ``s3://`` URI or
    ``<N inline rows>`` as they are. Unlike :func:`scrub`, which finds paths inside free
    text, this takes the whole value as one path, so no part of it (a directory with a
    space, or one named like an endpoint) is shown."""
    if not dataset.startswith("/"):
        return scrub(dataset, [data_dir])
    path = Path(os.path.normpath(dataset))  # no ".." left to climb out of the data directory
    for root in {data_dir.absolute(), data_dir.resolve()}:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return f"<server path>/{path.name}"


def error_response(request: Request, status: int, kind: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body, with the request id in it and in the headers."""
    rid = request_id(request)
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message, "request_id": rid}},
                        headers={**(headers or {}), REQUEST_ID_HEADER: rid})


def _detail(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}" + (f" (from {type(cause).__name__}: {cause})" if cause else "")


def framework_error_of(exc: Exception) -> Exception:
    """``exc``, or the :class:`~ml_framework.errors.StoreUnavailableError` it means when it is
    a connection error of the results database (a raw SQLAlchemy ``OperationalError`` from a
    store read): the one translation of store outages every route answers 503 with."""
    return unavailable(exc) or exc


def public_error(exc: MLFrameworkError, roots: list[Path]) -> tuple[int, str]:
    """``(status, message)`` to answer for ``exc``: a fixed message for errors that may
    name server internals (:data:`FIXED_MESSAGES`), else its text scrubbed."""
    status = next(code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls))
    if hasattr(exc, "public_message"):
        return status, scrub(exc.public_message, roots)
    fixed = next((m for cls, m in FIXED_MESSAGES if isinstance(exc, cls)), None)
    return status, fixed or scrub(str(exc), roots)


def install_error_handlers(api: FastAPI) -> None:
    """Register the handlers that turn every error into :func:`error_response` and log it."""

    def roots(request: Request) -> list[Path]:
        client = getattr(request.app.state, "client", None)  # None: an app (or test app) without one
        cfg = client.settings if client is not None else None
        return [*((cfg.data_dir, cfg.models_dir, cfg.var_dir) if cfg else ()), Path.cwd()]

    @api.exception_handler(MLFrameworkError)
    async def framework_error(request: Request, exc: MLFrameworkError) -> JSONResponse:
        status, message = public_error(exc, roots(request))
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "request %s: %s %s -> %d %s", request_id(request), request.method, request.url.path, status,
                _detail(exc))
        headers = {"WWW-Authenticate": 'Bearer, ApiKey header="X-API-Key"'} if status == 401 else None
        return error_response(request, status, type(exc).__name__, message, headers)

    async def store_down(request: Request, exc: Exception) -> JSONResponse:
        return await framework_error(request, framework_error_of(exc))  # type: ignore[arg-type]

    for kind in CONNECTION_ERRORS:  # a store read of any route during a database outage: 503, not 500
        api.add_exception_handler(kind, store_down)

    @api.exception_handler(BodyInvalidError)
    async def body_error(request: Request, exc: BodyInvalidError) -> JSONResponse:
        return error_response(request, 422, "ValidationError", scrub(str(exc), []))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type")
        if not is_json(content_type) and _expects_json(request):  # FastAPI's "a valid dictionary" otherwise
            return await framework_error(request, send_json(content_type))
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:20]]
        return error_response(request, 422, "ValidationError", scrub("; ".join(parts), []))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, "HTTPError", scrub(str(exc.detail), []),
                              getattr(exc, "headers", None))  # e.g. Allow on 405

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("request %s: %s %s -> 500", request_id(request), request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "InternalError",
                              f"internal error; the server log has the details under request id {request_id(request)}")


def problem(exc: BaseException, request: Request, what: str) -> str:
    """Log ``exc`` under the request id and return what a public answer may say of it
    (``/ready``'s checks): ``what`` and the request id."""
    log.warning("request %s: %s: %s", request_id(request), what, _detail(exc))
    return f"{what} (request id {request_id(request)})"
