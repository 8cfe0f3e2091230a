"""The response bodies of the HTTP API, and the JSON rule for numbers.

JSON rule: outputs are stored as finite numbers (a model returning NaN or infinity fails
that row with a row error), so results never hold NaN; any NaN or infinity that reaches a
response otherwise is written as ``null`` (:func:`finite`).
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, computed_field, field_validator

from ml_framework.store import JobStatus
from producer.api.errors import shown_dataset

__all__ = ["ApiError", "JobList", "JobOut", "PredictResponse", "ResultsPage", "finite"]


class ApiError(BaseModel):
    """The body of every error response."""

    class Detail(BaseModel):
        type: str = Field(description="Error class, e.g. ModelNotFoundError, ValidationError.")
        message: str = Field(description="What was wrong, naming the field, row or file; never a server path.")
        request_id: str = Field(description="Also in the X-Request-ID header; the server log has the detail under it.")

    error: Detail


class PredictResponse(BaseModel):
    """The outputs of an online request, one per input row, in order."""

    job_id: str
    model: str
    rows: list[dict[str, Any]] = Field(description="As in a results page: 'row' and outputs, or 'error'.")


# Validated from the store's JobStatus (JobOut.of), not copied field by field; the
# docstring is the schema's description.
class JobOut(BaseModel):
    """A job's state and progress."""

    model_config = ConfigDict(from_attributes=True)

    job_id: str
    model: str
    model_version: int
    dataset: str = Field(description="Path relative to the data directory, or '<N inline rows>'.")
    owner: str | None = Field(description="Name of the API key that submitted the job (null: CLI, Python client).")
    state: Literal["PENDING", "RUNNING", "SUCCEEDED", "PARTIAL", "FAILED", "CANCELLED"]
    n_rows: int
    rows_ok: int
    rows_failed: int
    n_shards: int
    shards_done: int
    batch_size: int
    oom_splits: int
    priority: int = Field(description="0 to 9 (9 most urgent), as submitted.")
    model_load_s: float | None = Field(description="Longest cold start (model load and warm-up) a shard waited for, "
                                                   "seconds; null when every shard found its model loaded.")
    output_uri: str | None = Field(default=None, description="Where the results are kept as Parquet files, one per "
                                                          "shard (s3://bucket/prefix/<job_id>/); null: the results "
                                                          "database. Read them through /results either way.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    callback_state: Literal["pending", "delivered", "failed"] | None = Field(
        default=None, description="Delivery of the job's callback_url event: null (no callback, or the job has not "
                                  "ended), pending (being delivered or retried), delivered (2xx), failed (attempts "
                                  "exhausted).")
    callback_attempts: int = Field(default=0, description="Delivery attempts of the callback so far.")

    @computed_field(description="Fraction of rows recorded, 0 to 1.")  # type: ignore[prop-decorator]
    @property
    def progress(self) -> float:
        """Rows recorded (with an output or a row error) over all rows; 1 for a job without rows."""
        return (self.rows_ok + self.rows_failed) / self.n_rows if self.n_rows else 1.0

    @field_validator("dataset")
    @classmethod
    def _relative(cls, dataset: str, info: ValidationInfo) -> str:
        """The dataset as :func:`~producer.api.errors.shown_dataset` shows it (``context["data_dir"]``)."""
        data_dir = (info.context or {}).get("data_dir")
        return shown_dataset(dataset, Path(data_dir)) if data_dir is not None else dataset

    @field_validator("output_uri")
    @classmethod
    def _no_server_path(cls, output_uri: str | None) -> str | None:
        """A local output directory (set from the CLI) is a server path: not shown."""
        return output_uri if output_uri is None or output_uri.startswith("s3://") else "<local directory>"

    @classmethod
    def of(cls, status: JobStatus, data_dir: Path) -> JobOut:
        """The answer for ``status``, its dataset shown relative to ``data_dir``."""
        return cls.model_validate(status, context={"data_dir": data_dir})


class JobList(BaseModel):
    """Jobs as ``GET /v1/jobs`` lists them: the open ones (PENDING, RUNNING) newest first,
    then the most recently ended."""

    jobs: list[JobOut]


class ResultsPage(BaseModel):
    """Recorded rows among ``[offset, offset + limit)``; rows still running are absent."""

    job_id: str
    state: str
    n_rows: int
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null after the last row.")
    rows: list[dict[str, Any]] = Field(
        description="Per row: 'row' (0-based input row) and the outputs (prediction, score, "
                    "probabilities / embedding), or 'error' and 'error_field'.")


def finite(value: Any) -> Any:
    """``value`` by the JSON rule: NaN and infinities become ``None``; dicts and lists are
    walked; anything else is returned as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value
