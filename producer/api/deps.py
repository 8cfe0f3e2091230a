"""Dependencies the routes share: the client, request bodies read within the size limit and
parsed off the event loop, and the answer for a model that is not there.

A body is read here, as a dependency, from the request's stream (never through Starlette's
private attributes): its declared ``Content-Length`` and the bytes that arrive are both
held to ``api_max_request_bytes`` (413 past it), and a JSON route's body of another
``Content-Type`` is answered 415 before a byte is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request

from ml_framework.errors import ModelNotFoundError
from producer.api.bodies import BodyInvalidError, ParsedBody
from producer.api.errors import (
    ParserUnavailableError,
    RequestTooLargeError,
    is_json,
    public,
    send_json,
)
from producer.client import Client

__all__ = ["ClientDep", "json_body", "model_named", "read_body"]


def _client(request: Request) -> Client:
    return request.app.state.client


ClientDep = Annotated[Client, Depends(_client)]
"""The API process's one :class:`~producer.client.Client` (opened at start-up)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes.

    Raises:
        RequestTooLargeError: the declared ``Content-Length`` (or a malformed one), or the
            bytes streamed, exceed ``limit`` (413); nothing past the limit is kept.
    """
    length = request.headers.get("content-length")
    if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > limit):
        raise RequestTooLargeError(f"request body of {length} bytes exceeds api_max_request_bytes ({limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"request body exceeds api_max_request_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(kind: str):
    """A dependency giving the route's JSON body ``kind`` (see :data:`producer.api.bodies.BODIES`),
    read within ``api_max_request_bytes`` (:func:`read_body`) and parsed off the event loop.

    The dependency raises:
        UnsupportedMediaTypeError: a ``Content-Type`` that is not JSON (415).
        RequestTooLargeError: the body is over the limit (413).
        BodyInvalidError: no body, or one that does not validate (422).
        ParserUnavailableError: the parsing process died (503).
    """

    async def parsed(request: Request) -> ParsedBody:
        content_type = request.headers.get("content-type")
        if not is_json(content_type):
            raise send_json(content_type)
        raw = await read_body(request, request.app.state.client.settings.api_max_request_bytes)
        if not raw:
            raise BodyInvalidError([(("body",), "Field required")])
        try:
            return await request.app.state.bodies.parse(kind, raw)
        except BrokenProcessPool as exc:
            raise ParserUnavailableError("the process parsing the request body died (memory?); retry") from exc

    return parsed


@contextmanager
def model_named(name: str, version: int | None) -> Iterator[None]:
    """Answer a missing model with a message naming only what the caller asked for.

    Raises:
        ModelNotFoundError: public, naming ``name`` (cut to 128 characters) and ``version``.
    """
    try:
        yield
    except ModelNotFoundError as exc:
        wanted = f"model {name[:128]!r}" + (f" version {version}" if version else "")
        raise public(ModelNotFoundError(f"{wanted} not found; GET /v1/models lists the models")) from exc
