"""Request bodies of the HTTP API, parsed off the event loop.

JSON parsing and validation hold the GIL for their whole length (a 16 MiB body of rows:
0.2 s with pydantic's ``validate_json``, 0.7 s with ``json.loads``, measured on 2 cores), so
a thread does not help: the event loop would wait for them and ``/health`` with it. Bodies
up to :data:`INLINE_PARSE_BYTES` are parsed on the loop (well under a millisecond); larger
ones in a parsing process (:class:`BodyParser`), which also turns the rows into an
Arrow table, so that the API process receives compact columns instead of building a
Python dict per row (the 1.1 GB peak of six 16 MiB bodies).

The bodies' JSON schemas are declared in the OpenAPI document by :func:`openapi_body` and
:func:`add_body_schemas`, since FastAPI does not parse these bodies itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from ml_framework.constants import MAX_INT32, PREDICT_TIMEOUT_S
from ml_framework.errors import BodyInvalidError, DatasetError
from ml_framework.manifest import InputSpec
from producer.plan import JobOptions

INLINE_PARSE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop: about 0.3 ms for 64 KiB of rows."""
PARSE_PROCESSES = 1
"""Processes per API process that parse larger bodies (started on the first one). One: a
parse of a 16 MiB body of rows peaks at about 400 MiB in its process, and the production
image runs four API processes (Uvicorn workers), so four bodies are parsed at once."""
MAX_ERRORS = 20
"""Validation errors reported per request: a 16 MiB body of bad rows has a million."""
Scalar = float | int | str | bool | None
Value = Scalar | list[Any]
"""A cell: a number, a text (or image path), or a tensor as nested lists."""


class DatasetJobRequest(JobOptions):
    """A job over a CSV or Parquet file under the data directory (read by reference)."""

    dataset: str = Field(description="Path relative to the data directory (no NUL character: no file "
                                     "system takes one), or an s3://bucket/key URI under a prefix the "
                                     "operator allows (setting api_object_prefixes).", min_length=1, max_length=4096, pattern=r"^[^\x00]+$")


class RowsJobRequest(JobOptions):
    """A job over rows sent in the request."""

    rows: list[dict[str, Value]] = Field(description="One object of column -> value per row (a tensor as nested "
                                                     "lists); none: a job with nothing to score, SUCCEEDED at once.")


class JobFields(JobOptions):
    """The fields of a :class:`RowsJobRequest` but its rows (which come as an Arrow table)."""


JobRequest = DatasetJobRequest | RowsJobRequest


class PredictRequest(BaseModel):
    """An online request: a few rows scored ahead of any bulk backlog."""

    model_config = {"extra": "forbid"}

    rows: list[dict[str, Value]] = Field(description="One object of column -> value per row (a tensor as nested "
                                                     "lists); none: answered at once, with no rows.")
    version: int | None = Field(default=None, ge=1, le=MAX_INT32, description="Model version; default latest.")
    timeout_s: float = Field(default=PREDICT_TIMEOUT_S, gt=0, le=600, description="Seconds to wait for the answer.")


class PredictFields(BaseModel):
    """The fields of a :class:`PredictRequest` but its rows."""

    version: int | None = None
    timeout_s: float = PREDICT_TIMEOUT_S


BODIES: dict[str, Any] = {"job": JobRequest, "predict": PredictRequest}
"""Body kinds by name (what travels to a parsing process), and their types."""
_ADAPTERS = {kind: TypeAdapter(t) for kind, t in BODIES.items()}
_WITHOUT_ROWS: dict[type, type[BaseModel]] = {RowsJobRequest: JobFields, PredictRequest: PredictFields}


@dataclass(frozen=True)
class ParsedBody:
    """A validated request body.

    Attributes:
        request: the request's fields: a :class:`DatasetJobRequest`, or for bodies with rows
            a :class:`JobFields` / :class:`PredictFields`.
        rows: the rows as an Arrow table (columns in first-seen key order; columns whose
            values mix types travel as text, as :func:`producer.client.rows_to_table`
            does), or ``None``.
        rows_error: why the rows make no table, when they do not.
    """

    request: BaseModel
    rows: pa.Table | None = None
    rows_error: str | None = None

    def table(self, check_model) -> pa.Table:
        """The rows; when they make no Arrow table (say, an integer beyond 64 bits), call
        ``check_model()`` first (so that an unknown model is answered as such, before the
        rows are looked at) and raise.

        Raises:
            DatasetError: the rows cannot be converted, naming why.
        """
        if self.rows is None:
            check_model()
            raise DatasetError(f"rows cannot be read: {self.rows_error or 'none given'}")
        return self.rows


Parsed = tuple[str, dict, bytes | None, str | None]


def parse_body(kind: str, raw: bytes) -> Parsed | list[tuple[tuple, str]]:
    """Validate ``raw`` JSON as the body ``kind`` (see :data:`BODIES`); runs in a parsing process.

    Returns:
        ``(model name, fields but rows, rows as Arrow IPC stream bytes or None, why the
        rows make no table or None)``, or the validation errors as ``(location, message)``
        pairs.
    """
    try:
        value = _ADAPTERS[kind].validate_json(raw)
    except ValidationError as exc:
        return [(("body", *e["loc"]), e["msg"]) for e in exc.errors(include_url=False)[:MAX_ERRORS]]
    if not hasattr(value, "rows"):
        return type(value).__name__, value.model_dump(), None, None
    from producer.rows import rows_to_table

    fields = value.model_dump(exclude={"rows"})
    try:
        # rows without a single field: as many rows without columns (the client names the
        # columns missing); a tensor given as nested lists stays nested (the worker flattens each row)
        table = (rows_to_table(value.rows, InputSpec(columns=["-"])) if any(value.rows)
                 else pa.table({"-": pa.nulls(len(value.rows))}).drop_columns(["-"]))
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an integer beyond 64 bits
        return type(value).__name__, fields, None, f"{type(exc).__name__}: {exc}"
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return type(value).__name__, fields, sink.getvalue().to_pybytes(), None


def _build(result: Parsed | list[tuple[tuple, str]]) -> ParsedBody:
    if isinstance(result, list):
        raise BodyInvalidError(result)
    name, fields, ipc, rows_error = result
    model = next(m for m in (DatasetJobRequest, RowsJobRequest, PredictRequest) if m.__name__ == name)
    request = _WITHOUT_ROWS.get(model, model).model_validate(fields)
    return ParsedBody(request, None if ipc is None else pa.ipc.open_stream(ipc).read_all(), rows_error)


def _lower_priority() -> None:
    """In a parsing process: yield the CPU to the API's event loop first."""
    with contextlib.suppress(OSError):
        os.nice(10)


class BodyParser:
    """Parses request bodies: small ones at once, larger ones in a pool of
    :data:`PARSE_PROCESSES` processes (spawned, at lower CPU priority, on first use).

    Args:
        processes: size of the pool.
        inline_bytes: largest body parsed on the calling thread.
    """

    def __init__(self, processes: int = PARSE_PROCESSES, inline_bytes: int = INLINE_PARSE_BYTES) -> None:
        self.processes = processes
        self.inline_bytes = inline_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        import multiprocessing

        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_lower_priority)
            return self._pool

    async def parse(self, kind: str, raw: bytes) -> ParsedBody:
        """The validated body ``kind`` (a key of :data:`BODIES`) from ``raw`` JSON bytes.

        Raises:
            BodyInvalidError: the body does not validate.
            BrokenProcessPool: a parsing process died (say, killed for memory); the pool
                is replaced for the next request.
        """
        if len(raw) <= self.inline_bytes:
            return _build(parse_body(kind, raw))
        pool = self._executor()
        try:
            result = await asyncio.wrap_future(pool.submit(parse_body, kind, raw))
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return _build(result)  # zero-copy Arrow: no parsing left for the event loop

    def close(self) -> None:
        """Stop the parsing processes."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_REF = "#/components/schemas/{model}"


def openapi_body(kind: str) -> dict[str, Any]:
    """``openapi_extra`` of a route whose body is ``kind``: the request body's schema, by
    reference to the components :func:`add_body_schemas` adds."""
    schema = _ADAPTERS[kind].json_schema(ref_template=_REF)
    if "$ref" not in schema and "anyOf" not in schema:  # one model: refer to it by name
        schema = {"$ref": _REF.format(model=schema["title"])}
    else:
        schema = {k: v for k, v in schema.items() if k != "$defs"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_body_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Add the body models' schemas to ``openapi["components"]["schemas"]`` (in place)."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for adapter in _ADAPTERS.values():
        schema = adapter.json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        if "title" in schema and "anyOf" not in schema:
            schemas[schema["title"]] = schema
    return openapi
