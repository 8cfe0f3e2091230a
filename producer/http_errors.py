"""The HTTP API's error answers as the exceptions the direct client raises.

The API answers every error as ``{"error": {"type", "message", "request_id"}}`` (see
:mod:`producer.api.errors`), ``type`` being the class name of :mod:`ml_framework.errors`
(``JobNotFoundError``, ``DatasetPathError``, ``UnauthorizedError`` ...) or
``ValidationError`` (a body that does not validate). :func:`error_of` raises that same class
with the API's message, so that code written against :class:`producer.client.Client` catches
the same errors over HTTP. Nothing here holds or prints the API key.
"""

from __future__ import annotations

import inspect

import httpx

from ml_framework import errors
from ml_framework.errors import (
    ApiResponseError,
    ApiUnavailableError,
    BodyInvalidError,
    ForbiddenError,
    JobNotFoundError,
    MLFrameworkError,
    UnauthorizedError,
)

__all__ = ["error_of", "unreachable"]

BY_STATUS: dict[int, type[MLFrameworkError]] = {401: UnauthorizedError, 403: ForbiddenError}
"""Classes of error answers whose body names none (say, a proxy's own 401 page)."""
_MAX_TEXT = 300
"""Characters of a body that is not the API's JSON error kept in the message."""


def _error_class(kind: str | None, status: int) -> type[MLFrameworkError]:
    """The class named ``kind`` in :mod:`ml_framework.errors` (``ValidationError``:
    :class:`BodyInvalidError`), else by ``status``, else :class:`ApiResponseError`."""
    if kind == "ValidationError":
        return BodyInvalidError
    cls = getattr(errors, kind, None) if kind and kind.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, MLFrameworkError):
        return cls
    return BY_STATUS.get(status, ApiResponseError)


def error_of(response: httpx.Response, *, job_id: str | None = None,
             no_key_hint: str | None = None, key_hint: str | None = None) -> MLFrameworkError:
    """The exception an error ``response`` (status 400 or more) stands for.

    Args:
        response: the API's answer; its body is read if it was streamed.
        job_id: the job the request named, kept as ``job_id`` on errors that have one
            (``JobTimeoutError``, ``BrokerUnavailableError``...).
        no_key_hint: the request carried no API key: how to give one, said after the
            message of an :class:`UnauthorizedError` (the API's own message names
            headers, not the caller's options).
        key_hint: the request carried an API key: where it came from, said in the
            message of an :class:`UnauthorizedError` (the key was refused).

    Returns:
        An instance of the class the body's ``error.type`` names, with its ``message``
        (a 404 without the API's body, say a wrong base URL, is an :class:`ApiResponseError`);
        every one carries ``status`` and ``request_id`` attributes.
    """
    response.read()
    kind, message = None, None
    try:
        detail = response.json().get("error")
        if isinstance(detail, dict):
            kind, message = detail.get("type"), detail.get("message")
    except (ValueError, AttributeError):  # not the API's JSON: a proxy's page, a wrong URL
        pass
    request_id = response.headers.get("x-request-id")
    if message is None:
        text = response.text.strip()[:_MAX_TEXT]
        message = (f"HTTP {response.status_code} {response.reason_phrase} from {response.request.url.copy_with(query=None)}"
                   + (f": {text}" if text else ""))
    cls = _error_class(kind, response.status_code)
    if cls is JobNotFoundError and kind is None:  # a 404 that is not the API's: not a job's absence
        cls = ApiResponseError
    if cls is UnauthorizedError and no_key_hint:
        message = f"the API at {_base(response)} requires an API key and none was sent: {no_key_hint}. It said: {message}"
    elif cls is UnauthorizedError and key_hint:
        message = (f"the API at {_base(response)} refused the API key sent ({key_hint}): check it, or ask the "
                   f"API's operator for one (`mlf api-key`). It said: {message}")
    exc = cls.__new__(cls, message)  # the API's message as it is; constructors differ in their extra arguments
    exc.args = (message,)
    if isinstance(exc, BodyInvalidError):
        exc.errors = []
    if "job_id" in inspect.signature(cls.__init__).parameters:
        exc.job_id = job_id
    exc.status = response.status_code
    exc.request_id = request_id
    return exc


def not_the_apis(response: httpx.Response, expected: str) -> ApiResponseError:
    """The error for a success answer that is not what the API answers there (a proxy's
    or another server's page, or a server too old for the route): HTTP status, content
    type and URL (no query, no credentials), and the start of the text.

    Args:
        expected: what the API answers there, for the message (``"JSON"``, ``"JSON with
            field jobs"``).
    """
    kind = response.headers.get("content-type", "no content type").split(";")[0].strip()
    text = response.text.strip()[:_MAX_TEXT]
    return ApiResponseError(f"HTTP {response.status_code} from {response.request.url.copy_with(query=None)} is not "
                            f"the ml-framework API's answer ({kind}, not {expected}): is {_base(response)} the API, "
                            "and as new as this client?" + (f" It said: {text}" if text else ""),
                            response.status_code, response.headers.get("x-request-id"))


def _base(response: httpx.Response) -> str:
    """``scheme://host[:port]`` the request went to (no path, query or credentials)."""
    url = response.request.url
    return str(url.copy_with(username=None, password=None, path="/", query=None, fragment=None)).rstrip("/")


def unreachable(url: str, exc: httpx.TransportError) -> ApiUnavailableError:
    """The error for an API that could not be reached at ``url`` (names the URL and what
    failed; an ``httpx`` error never holds request headers, so no key)."""
    what = str(exc).strip() or type(exc).__name__
    return ApiUnavailableError(f"the API at {url} cannot be reached ({type(exc).__name__}: {what}); is it running, "
                               "and is the URL right?")
