"""Message schemas: everything that travels on the broker (the task names are in
:mod:`ml_framework.constants`).

Messages are JSON. A shard names its rows either by reference (a dataset path relative
to the workers' data directory plus a row range) or inline (Arrow IPC bytes, base64), for
datasets the workers cannot read.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

DatasetFormat = Literal["csv", "parquet", "arrow", "npy"]
"""Formats a worker reads by reference (see :mod:`ml_framework.datasets`); a directory of
images travels inline, as its paths."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Rows(_Message):
    row_start: NonNegativeInt
    row_end: NonNegativeInt

    @model_validator(mode="after")
    def _check_range(self) -> _Rows:
        if self.row_end < self.row_start:
            raise ValueError(f"row_end {self.row_end} is before row_start {self.row_start}")
        return self


class DatasetRef(_Rows):
    """Rows ``[row_start, row_end)`` of a dataset file under the workers' data directory.

    Attributes:
        path: POSIX path relative to the data directory, or the ``s3://`` URI of an
            object or prefix (read by the worker from object storage).
        format: ``csv``, ``parquet``, ``arrow`` (Arrow IPC / Feather) or ``npy``.
        row_start: first row (0-based, header excluded), inclusive.
        row_end: last row, exclusive.
        fingerprint: the dataset as the producer planned it
            (:func:`ml_framework.datasets.source.fingerprint`: size and modification time,
            or a digest of a directory's listing); a worker that finds another fails the
            shard instead of scoring rows that are not the job's. ``None`` (messages of
            earlier releases): not checked.
    """

    kind: Literal["ref"] = "ref"
    path: str
    format: DatasetFormat
    fingerprint: str | None = Field(default=None, max_length=64)


class InlineRows(_Rows):
    """Rows ``[row_start, row_end)`` carried in the message as an Arrow IPC stream.

    Attributes:
        data_b64: base64 of an Arrow IPC stream holding exactly ``row_end - row_start``
            rows of the needed columns (all strings for CSV sources).
    """

    kind: Literal["inline"] = "inline"
    data_b64: str


class ScoreShard(_Message):
    """Body of one ``mlf.score_shard`` task.

    Attributes:
        job_id: the job's id in the results store.
        shard_index: 0-based index of this shard within the job.
        model / version: which model version to run.
        batch_size: rows per forward pass.
        columns: dataset columns the model reads.
        source: where the rows are.
        online: an online request: the worker gathers other waiting online requests into
            the same forward pass (dynamic batching) and announces the answer.
        enqueued_at: when the producer sent it, Unix time in seconds (for the workers'
            queue-wait metric; ``None`` from older producers); finite, as JSON has no
            NaN or infinity.
    """

    job_id: str
    shard_index: NonNegativeInt
    model: str
    version: PositiveInt
    batch_size: PositiveInt
    columns: list[str]
    source: DatasetRef | InlineRows = Field(discriminator="kind")
    online: bool = False
    enqueued_at: Annotated[float, Field(allow_inf_nan=False)] | None = None

    @property
    def n_rows(self) -> int:
        """Rows in this shard."""
        return self.source.row_end - self.source.row_start

    def message_bytes(self) -> int:
        """Size of this body as JSON, bytes (what the producer puts on the broker, before
        the transport's own envelope). The inline rows are measured, not copied."""
        if isinstance(self.source, InlineRows):
            empty = self.model_copy(update={"source": self.source.model_copy(update={"data_b64": ""})})
            return len(empty.model_dump_json().encode()) + len(self.source.data_b64)  # base64: ASCII, unescaped
        return len(self.model_dump_json().encode())

    def summary(self) -> str:
        """One line naming the shard, for the task's ``kwargsrepr`` (what Flower and
        ``celery inspect`` show instead of the whole body, whose inline rows can be
        megabytes), e.g. ``job=3f2a... shard=4 model=digits/1 rows=4096-5120 online``."""
        return (f"job={self.job_id} shard={self.shard_index} model={self.model}/{self.version} "
                f"rows={self.source.row_start}-{self.source.row_end}{' online' if self.online else ''}")


class OnlineBatch(_Message):
    """Body of one ``mlf.score_online`` task: online requests that one client sent
    together, in one message, so that a group costs one broker round trip to send and one
    task dispatch on the worker. The worker scores them (and any other online requests it
    gathers) as one dynamic batch; each request is recorded and answered on its own.

    Attributes:
        requests: one :class:`ScoreShard` (with ``online`` set) per request shard.
    """

    requests: list[ScoreShard] = Field(min_length=1)

    def summary(self) -> str:
        """One line for the task's ``kwargsrepr``: the count and the first requests."""
        head = "; ".join(r.summary() for r in self.requests[:3])
        more = f"; +{len(self.requests) - 3} more" if len(self.requests) > 3 else ""
        return f"{len(self.requests)} online request shard(s): {head}{more}"


def done_channel(online_queue: str) -> str:
    """The Redis pub/sub channel on which workers announce finished online requests
    (a JSON list of job ids) and clients listen."""
    return f"mlf.done.{online_queue}"
