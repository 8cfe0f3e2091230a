"""The models resource: ``GET /v1/models`` (the model repository) and
``POST /v1/models/{name}/predict`` (online: a few rows, answered synchronously)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from producer.api.auth import User
from producer.api.bodies import ParsedBody, PredictFields, openapi_body
from producer.api.deps import ClientDep, json_body, model_named
from producer.api.schemas import ApiError, PredictResponse, finite

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(c: ClientDep, _: User) -> list[dict[str, Any]]:
    """Every model version in the repository, with its manifest."""
    return [m.model_dump(mode="json") for m in c.models()]


@router.post("/{name}/predict", response_model=PredictResponse,
             responses={404: {"model": ApiError}, 504: {"model": ApiError}}, openapi_extra=openapi_body("predict"))
async def predict(caller: User, name: str, parsed: Annotated[ParsedBody, Depends(json_body("predict"))],
                  c: ClientDep) -> PredictResponse:
    """Score a few rows now (a ``PredictRequest``): the request goes on the online queue,
    which workers drain before their next bulk shard; 504 when no answer comes within
    ``timeout_s``. Waiting holds no thread, so one API process keeps many requests in flight."""
    body = parsed.request
    assert isinstance(body, PredictFields)
    with model_named(name, body.version):
        table = parsed.table(lambda: c.repository.resolve(name, body.version))
        answer = await c.apredict(name, table, body.version, timeout_s=body.timeout_s, owner=caller.name)
    job_id = answer.attrs["job_id"]
    rows = await asyncio.to_thread(c.store.results_page, job_id, 0, table.num_rows)
    return PredictResponse(job_id=job_id, model=name, rows=finite(rows))
