"""The Open Inference Protocol (KServe v2 REST) over the online path: :data:`router`.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ (the
HTTP/REST API). Triton's and KServe's clients (``tritonclient[http]``) talk to it
unchanged. Endpoints:

==================================================  =========================================
``GET /v2/health/live``                              200 while the API process answers
``GET /v2/health/ready``                             200 when the broker and the results
                                                     database answer and a worker is alive;
                                                     400 otherwise (the spec's 4xx for false)
``GET /v2``                                          server metadata: name, version, extensions
``GET /v2/models/{name}[/versions/{v}]``             model metadata: versions, platform, input
                                                     and output tensors (:mod:`producer.api.oip_tensors`)
``GET /v2/models/{name}[/versions/{v}]/ready``       200 when the model exists and a worker is
                                                     alive (it loads models on first use)
``POST /v2/models/{name}[/versions/{v}]/infer``      inference: the rows go through
                                                     :meth:`producer.client.Client.apredict`,
                                                     batched with other callers' on the workers
==================================================  =========================================

Authentication is that of ``/v1`` (:mod:`producer.api.auth`: ``X-API-Key`` or ``Authorization:
Bearer``; role ``user`` or ``admin``); the two health endpoints are open, as ``/health`` and
``/ready`` are. Errors are the spec's ``{"error": "<message>"}`` (401 without a key, 404 for
an unknown model or version, 400 for a request that does not fit the model: a wrong input
name, datatype, shape or element count, or an input sent both as ``data`` and as binary
data; 503 when the workers could not load or run the model, or the results database is
unreachable; 504 when no answer comes in time), with the same
``X-Request-ID`` and message rules as ``/v1`` (:mod:`producer.api.errors`).

An inference request's ``parameters`` are accepted and ignored but ``timeout_s`` (seconds
to wait for the answer, default 30). Its ``id`` is echoed. ``outputs`` picks outputs by
name (an unknown one is refused); outputs come back as JSON even when binary ones were
asked for, which the binary extension allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml_framework.constants import MAX_INT32, PREDICT_TIMEOUT_S, WORKER_LIVE_S
from ml_framework.errors import (
    DatasetError,
    MLFrameworkError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from ml_framework.manifest import ModelManifest
from producer.api.auth import User
from producer.api.deps import ClientDep, read_body
from producer.api.errors import (
    REQUEST_ID_HEADER,
    framework_error_of,
    is_json,
    public,
    public_error,
    request_id,
    send_json,
)
from producer.api.oip_tensors import (
    InferenceInputError,
    decode_input,
    encode_outputs,
    input_spec,
    output_specs,
)
from producer.api.operations import all_ok, ready_checks
from producer.client import Client

__all__ = ["ErrorResponse", "InferenceRequest", "InferenceResponse", "ModelMetadata", "OipRoute", "router"]

log = logging.getLogger("producer.api")

"""A worker whose heartbeat is older than this does not make the server or a model ready,
seconds (as ``/ready``)."""
BINARY_HEADER = "Inference-Header-Content-Length"
"""Request header of the binary tensor data extension: bytes of JSON before the binary data."""
PLATFORMS = {"torch": "pytorch_libtorch", "tensorflow": "tensorflow_savedmodel", "onnx": "onnxruntime_onnx",
             "sklearn": "sklearn"}
"""Model metadata's ``platform`` per manifest ``framework``. KServe leaves the value to the
server; these are Triton's platform names (docs/user_guide/model_repository.md of
github.com/triton-inference-server/server: ``pytorch_libtorch``, ``tensorflow_savedmodel``,
``onnxruntime_onnx``), so clients written against Triton recognise them. Triton has no
scikit-learn platform (its FIL backend sets ``backend``, not ``platform``): ``sklearn``."""
DEFAULT_TIMEOUT_S = PREDICT_TIMEOUT_S
MAX_TIMEOUT_S = 600.0


class RequestInput(BaseModel):
    """The spec's ``$request_input``: one input tensor, elements flattened row-major in
    ``data`` (or sent as binary data, ``parameters.binary_data_size`` bytes)."""

    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] = Field(max_length=16)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """The spec's ``$request_output``: an output wanted in the response, by name."""

    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """The spec's ``$inference_request``."""

    id: str | None = Field(default=None, max_length=256, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(default=None, description="Only 'timeout_s' is read.")
    inputs: list[RequestInput] = Field(min_length=1, max_length=64)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=64,
                                                description="Outputs to answer; default all.")


class ErrorResponse(BaseModel):
    """The spec's error body (``$inference_error_response`` and the others alike)."""

    error: str = Field(description="What was wrong; the server log has more under the X-Request-ID header.")


class TensorMetadata(BaseModel):
    """The spec's ``$metadata_tensor``: ``-1`` in ``shape`` for a dimension of any size."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """The spec's ``$metadata_model_response``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ResponseOutput(TensorMetadata):
    """The spec's ``$response_output``: elements flattened row-major."""

    data: list[Any]


class InferenceResponse(BaseModel):
    """The spec's ``$inference_response``."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


_REQUEST = TypeAdapter(InferenceRequest)


def _status_and_message(exc: Exception, roots: list[Path]) -> tuple[int, str]:
    """What to answer for ``exc``: a request that does not fit the model is 400 (the spec's
    "bad request"), not ``/v1``'s 422; everything else as ``/v1`` answers it."""
    exc = framework_error_of(exc)
    if isinstance(exc, MLFrameworkError):
        status, message = public_error(exc, roots)
        return (400 if isinstance(exc, InferenceInputError | DatasetError) else status), message
    if isinstance(exc, RequestValidationError | ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:20]]
        return 400, "; ".join(parts)
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, str(exc.detail)
    raise exc


class OipRoute(APIRoute):
    """A route answering every error as the spec's ``{"error": "<message>"}``, including
    those raised by its dependencies (an unknown API key) and its path parameters."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, wrapped so that errors become the spec's bodies."""
        handle = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:  # noqa: BLE001 - each kind is answered or re-raised below
                client = getattr(request.app.state, "client", None)
                cfg = client.settings if client is not None else None
                roots = [*((cfg.data_dir, cfg.models_dir, cfg.var_dir) if cfg else ()), Path.cwd()]
                try:
                    status, message = _status_and_message(exc, roots)
                except Exception:
                    log.exception("request %s: %s %s -> 500", request_id(request), request.method,
                                  request.url.path)
                    status = 500
                    message = f"internal error; the server log has the details under request id {request_id(request)}"
                else:
                    log.log(logging.ERROR if status >= 500 else logging.INFO, "request %s: %s %s -> %d %s: %s",
                            request_id(request), request.method, request.url.path, status, type(exc).__name__, exc)
                headers = {REQUEST_ID_HEADER: request_id(request)}
                if status == 401:
                    headers["WWW-Authenticate"] = 'Bearer, ApiKey header="X-API-Key"'
                return JSONResponse({"error": message}, status_code=status, headers=headers)

        return answer


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=OipRoute,
                   responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 500, 503, 504)})
"""The ``/v2`` endpoints; ``create_app`` includes them."""


def _manifest(c: Client, name: str, version: str | None) -> ModelManifest:
    """The manifest of ``name`` at ``version`` (a path segment; default the latest).

    Raises:
        ModelNotFoundError: no such model or version (the message names only what was asked).
    """
    wanted = f"model {name[:128]!r}" + (f" version {version[:32]!r}" if version is not None else "")
    if version is not None and (not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= MAX_INT32):
        raise public(ModelNotFoundError(f"{wanted} not found: versions are positive integers"))
    try:
        return c.repository.resolve(name, None if version is None else int(version))
    except ModelNotFoundError as exc:
        raise public(ModelNotFoundError(f"{wanted} not found")) from exc


def _workers_alive(c: Client) -> int:
    return len(c.live_workers(WORKER_LIVE_S))


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    """Liveness: the API process answers (no key needed)."""
    return {"live": True}


@router.get("/health/ready", responses={400: {"description": "Not ready; 'reason' says why."}})
def server_ready(c: ClientDep, request: Request) -> JSONResponse:
    """Readiness (no key needed): the results database and the broker answer, and a worker's
    heartbeat is younger than ``WORKER_LIVE_S`` (30 s): the checks of ``/ready``
    (:func:`~producer.api.operations.ready_checks`). 400 otherwise, as the spec answers false."""
    checks = ready_checks(c, request)
    if all_ok(checks):
        return JSONResponse({"ready": True})
    if checks["database"] != "ok" or checks["broker"] != "ok":
        reason = "the broker or the results database is unreachable"
    else:
        reason = checks["workers"]
    return JSONResponse({"ready": False, "reason": reason}, status_code=400)


@router.get("")
async def server_metadata(_: User) -> dict[str, Any]:
    """Server metadata: name, version, and the protocol extensions served."""
    try:
        version = package_version("ml-framework")
    except PackageNotFoundError:
        version = "unknown"
    return {"name": "ml-framework", "version": version, "extensions": ["binary_tensor_data"]}


def _metadata(c: Client, name: str, version: str | None) -> ModelMetadata:
    manifest = _manifest(c, name, version)
    return ModelMetadata(
        name=manifest.name, versions=[str(v) for v in c.repository.versions(manifest.name)],
        platform=PLATFORMS.get(manifest.framework, manifest.framework),
        inputs=[TensorMetadata(**input_spec(manifest).as_json())],
        outputs=[TensorMetadata(**s.as_json()) for s in output_specs(manifest)])


@router.get("/models/{name}", response_model=ModelMetadata)
def model_metadata(name: str, c: ClientDep, _: User) -> ModelMetadata:
    """Model metadata of the latest version: its input and output tensors."""
    return _metadata(c, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata)
def model_version_metadata(name: str, version: str, c: ClientDep, _: User) -> ModelMetadata:
    """Model metadata of one version."""
    return _metadata(c, name, version)


def _model_ready(c: Client, name: str, version: str | None) -> JSONResponse:
    manifest = _manifest(c, name, version)
    ready = _workers_alive(c) > 0
    body = {"name": manifest.name, "version": str(manifest.version), "ready": ready}
    return JSONResponse(body if ready else {**body, "reason": f"no worker heartbeat in the last {WORKER_LIVE_S:.0f} s"},
                        status_code=200 if ready else 400)


@router.get("/models/{name}/ready", responses={400: {"description": "Not ready: no live worker."}})
def model_ready(name: str, c: ClientDep, _: User) -> JSONResponse:
    """200 when the model's latest version exists and a worker is alive; 400 otherwise."""
    return _model_ready(c, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses={400: {"description": "Not ready: no live worker."}})
def model_version_ready(name: str, version: str, c: ClientDep, _: User) -> JSONResponse:
    """As ``/v2/models/{name}/ready``, for one version."""
    return _model_ready(c, name, version)


async def _read_request(request: Request, limit: int) -> tuple[InferenceRequest, list[bytes | None]]:
    """The request's JSON object and each input's binary data (``None``: JSON ``data``).

    Raises:
        RequestTooLargeError: a body over ``limit`` bytes.
        InferenceInputError: the body is not the spec's object, or its binary data sizes
            do not add up.
    """
    header = request.headers.get(BINARY_HEADER)
    raw = await read_body(request, limit)
    json_bytes = raw
    if header is not None:
        if not (header.isascii() and header.isdigit()) or int(header) > len(raw):
            raise InferenceInputError(f"{BINARY_HEADER} {header[:20]!r} is not a size within the body")
        json_bytes = raw[:int(header)]
    try:
        body = _REQUEST.validate_json(json_bytes)
    except ValidationError as exc:
        raise InferenceInputError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                            for e in exc.errors(include_url=False)[:20])) from None
    blobs: list[bytes | None] = []
    at = len(json_bytes)
    for given in body.inputs:
        n = (given.parameters or {}).get("binary_data_size")
        if n is None:
            blobs.append(None)
            continue
        if given.data is not None:  # which one would be meant: refuse rather than drop one
            raise InferenceInputError(f"input {given.name[:64]!r}: both 'data' and the 'binary_data_size' "
                                      "parameter; send the tensor one way")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or at + n > len(raw):
            raise InferenceInputError(f"input {given.name[:64]!r}: binary_data_size {n!r} is not a size "
                                      "within the body's binary data")
        blobs.append(raw[at:at + n])
        at += n
    if at != len(raw):
        raise InferenceInputError(f"{len(raw) - at} bytes after the inputs' binary data")
    return body, blobs


def _timeout_s(body: InferenceRequest) -> float:
    value = (body.parameters or {}).get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_S:
        raise InferenceInputError(f"parameters.timeout_s: a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return float(value)


async def _infer(request: Request, c: Client, caller: Any, name: str, version: str | None) -> InferenceResponse:
    content_type = request.headers.get("content-type")
    if request.headers.get(BINARY_HEADER) is None and not is_json(content_type):  # binary data: any type
        raise send_json(content_type)  # first, as /v1 answers it
    manifest = _manifest(c, name, version)  # an unknown model is 404 before the body is read
    body, blobs = await _read_request(request, c.settings.api_max_request_bytes)
    want = input_spec(manifest)
    if len(body.inputs) != 1:
        raise InferenceInputError(f"{len(body.inputs)} inputs; the model takes one, {want.name!r}")
    specs = output_specs(manifest)
    if body.outputs is not None:
        by_name = {s.name: s for s in specs}
        unknown = [o.name for o in body.outputs if o.name not in by_name]
        if unknown:
            raise InferenceInputError(f"unknown output {unknown[0][:64]!r}: the model's outputs are "
                                      f"{', '.join(by_name)}")
        specs = [by_name[o.name] for o in body.outputs]
    rows = decode_input(body.inputs[0].model_dump(), want, blobs[0])
    answer = await c.apredict(manifest.name, rows, manifest.version, timeout_s=_timeout_s(body), owner=caller.name)
    await _check_served(c, manifest, answer)
    return InferenceResponse(model_name=manifest.name, model_version=str(manifest.version), id=body.id,
                             outputs=[ResponseOutput(**o) for o in encode_outputs(answer, specs)])


async def _check_served(c: Client, manifest: ModelManifest, answer: pd.DataFrame) -> None:
    """Raise when the workers failed the request as a whole rather than row by row.

    Raises:
        ModelUnavailableError: every row failed and the request's shard records an error of
            its own (the model could not be loaded or run), public with that reason: 503,
            where Triton answers UNAVAILABLE (HTTP 503, ``HttpCodeFromError`` in its
            ``src/http_server.cc``) for a model that is not ready. Rows failing on their own
            data stay 400 (:func:`~producer.api.oip_tensors.encode_outputs`).
    """
    job_id = answer.attrs.get("job_id")
    if job_id is None or not len(answer) or "error" not in answer or not answer["error"].notna().all():
        return
    shards = await asyncio.to_thread(c.store.shards, job_id)
    reason = next((s["error"] for s in shards if s.get("error")), None)
    if reason:
        raise public(ModelUnavailableError(f"model {manifest.name[:128]!r} version {manifest.version} could not "
                                           f"serve the request: {reason}"))


def _inlined(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with its ``#/$defs/...`` references replaced by what they name."""
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inlined(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inlined(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inlined(v, defs) for v in schema]
    return schema


_SCHEMA = _REQUEST.json_schema()
_INFER_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": _inlined(_SCHEMA, _SCHEMA.get("$defs", {}))}}}}
"""The request body in the OpenAPI document (the route reads the body itself: binary data
may follow the JSON)."""


@router.post("/models/{name}/infer", response_model=InferenceResponse, response_model_exclude_none=True,
             openapi_extra=_INFER_DOC)
async def infer(name: str, request: Request, c: ClientDep, caller: User) -> InferenceResponse:
    """Inference on the latest version (an ``InferenceRequest``), through the online queue
    with dynamic batching, as ``POST /v1/models/{name}/predict``."""
    return await _infer(request, c, caller, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
             response_model_exclude_none=True, openapi_extra=_INFER_DOC)
async def infer_version(name: str, version: str, request: Request, c: ClientDep, caller: User) -> InferenceResponse:
    """Inference on one version."""
    return await _infer(request, c, caller, name, version)
