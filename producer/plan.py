"""One shard plan for every way of submitting work: what a job asks for, and its shard messages.

- :class:`JobOptions`: the options of a job (model, version, batch size, columns,
  priority), one value shared by the Python client, ``mlf score``, the HTTP API's request
  bodies (which extend it) and the idempotency hash of a submission.
- :class:`ShardPlan`: a job cut into shards, by reference or inline, and the one builder
  of its ``mlf.score_shard`` messages (:meth:`ShardPlan.messages`), used by bulk jobs over
  a file (:func:`plan_dataset`), by rows given in memory (:func:`plan_rows`) and by online
  requests (the same, with ``online`` set).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ml_framework.celery_app import check_priority
from ml_framework.constants import CALLBACK_URL_MAX_CHARS, MAX_INT32, MAX_PRIORITY, MIN_PRIORITY
from ml_framework.datasets import DatasetInfo, shard_ranges
from ml_framework.errors import JobOptionError, MessageTooLargeError
from ml_framework.manifest import ModelManifest
from ml_framework.protocol import DatasetRef, InlineRows, ScoreShard
from ml_framework.store import NewJob
from ml_framework.store.outputs import output_schema
from producer.datasets import plan_sources, resolve_columns
from producer.rows import RowsLike, inline_sources, rows_to_table

__all__ = ["JobOptions", "ShardPlan", "check_message_bytes", "plan_dataset", "plan_rows"]

Source = DatasetRef | InlineRows


class JobOptions(BaseModel):
    """The options of a job, as its submitter gave them (defaults still unresolved).

    The HTTP API's request bodies extend this model (its fields and limits are their
    schema); the Python client and ``mlf score`` make it with :meth:`of`.

    Attributes:
        model: model name in the repository.
        version: model version; ``None``: the highest.
        batch_size: rows per forward pass; ``None``: the manifest's, then the settings'.
        columns: dataset columns mapped onto the manifest's input columns, in order;
            ``None``: the manifest's column names.
        priority: 0 (default) to 9 (most urgent), see
            :func:`~ml_framework.celery_app.message_priority`.
        callback_url: where the job's ``job.finished`` event is POSTed, signed, once it
            ends (see :mod:`ml_framework.callbacks`); checked at submit
            (:meth:`producer.client.Client.check_callback`).
        output_uri: write each shard's results as one Parquet file under this prefix
            (``s3://bucket/prefix``, or a local directory on a single host) instead of the
            results database; see :mod:`ml_framework.store.output_files`. ``None``: the
            database.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Model name in the repository.", min_length=1, max_length=128)
    version: int | None = Field(default=None, ge=1, le=MAX_INT32, description="Model version; default latest.")
    batch_size: int | None = Field(default=None, ge=1, le=MAX_INT32, description="Rows per forward pass.")
    columns: list[str] | None = Field(default=None, max_length=65_536,
                                      description="Dataset columns mapped onto the model inputs, in order.")
    priority: int = Field(default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                          description="0 (default) to 9 (most urgent): shards of higher-priority jobs are taken first.")
    callback_url: str | None = Field(default=None, description=(
        "http(s) URL the signed job.finished event is POSTed to once the job ends (a host the server allows, "
        f"at most {CALLBACK_URL_MAX_CHARS} characters, no credentials); see docs/security.md."))

    output_uri: str | None = Field(
        default=None, min_length=1, max_length=2048,
        description="Write the results as Parquet files, one per shard, under this prefix "
                    "(s3://bucket/prefix, under a prefix the operator allows) instead of the results database; "
                    "reading them back is unchanged.")

    @classmethod
    def of(cls, model: str, version: int | None = None, batch_size: int | None = None,
           columns: Sequence[str] | None = None, priority: int = 0, *, callback_url: str | None = None,
           output_uri: str | None = None) -> JobOptions:
        """The options of a Python caller's submission, checked with the client's messages.

        Raises:
            JobOptionError: ``batch_size`` outside 1 to 2**31 - 1, or ``priority`` outside 0
                to 9 (a ``ValueError`` too).
        """
        check_priority(priority)
        if batch_size is not None and not 0 < batch_size <= MAX_INT32:
            raise JobOptionError(f"batch_size must be between 1 and {MAX_INT32}, got {batch_size}")
        return cls.model_construct(model=model, version=version, batch_size=batch_size,
                                   columns=None if columns is None else list(columns), priority=priority,
                                   callback_url=callback_url, output_uri=output_uri)

    def options(self) -> JobOptions:
        """These options alone (a request body that extends them drops its other fields)."""
        if type(self) is JobOptions:
            return self
        return JobOptions.model_construct(**{name: getattr(self, name) for name in JobOptions.model_fields})

    def request(self) -> dict[str, Any]:
        """The options as the idempotency hash of a submission takes them
        (:func:`~ml_framework.store.idempotency.request_hash`). Options added after the
        first release (:data:`LATER_OPTIONS`) count only when set: a request without them
        hashes as it did before they existed, so a retry across an upgrade replays."""
        fields = {name: getattr(self, name) for name in JobOptions.model_fields}
        for name in LATER_OPTIONS:
            if fields[name] is None:
                del fields[name]
        return fields


LATER_OPTIONS = ("callback_url", "output_uri")
"""Job options that entered after idempotency keys did (see :meth:`JobOptions.request`)."""


@dataclass
class ShardPlan:
    """A job cut into shards, ready to record and send.

    Attributes:
        manifest: the model version resolved from ``options``.
        options: the options as submitted.
        batch_size: rows per forward pass, resolved (option, manifest, settings).
        columns: the dataset columns that feed the model, resolved, in the manifest's order.
        dataset: how the job names its rows: the file's path, or ``<N inline rows>``.
        n_rows: rows in the job.
        ranges: ``[row_start, row_end)`` of each shard.
        sources: where each shard's rows are, one per range; an iterator (a file read
            once, shard by shard) is consumed by the one pass of :meth:`messages`.
        inline: the rows were given in memory (``score_rows``, ``predict``, the HTTP API's
            ``rows``), not named as a file.
        online: an online request (the worker batches it with other waiting ones).
    """

    manifest: ModelManifest
    options: JobOptions
    batch_size: int
    columns: list[str]
    dataset: str
    n_rows: int
    ranges: list[tuple[int, int]]
    sources: Iterable[Source]
    inline: bool
    online: bool = False
    _head: list[Source] = field(init=False, repr=False)
    _rest: Iterator[Source] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.sources, Sequence):
            self._head, self._rest = list(self.sources), iter(())
        else:
            self._rest = iter(self.sources)
            self._head = list(itertools.islice(self._rest, 1))

    @property
    def n_checked(self) -> int:
        """Shards whose messages :meth:`head` gives before anything is sent: all of them
        for sources given as a sequence, else the first."""
        return len(self._head)

    def head(self) -> list[ScoreShard]:
        """The messages of the first :attr:`n_checked` shards, under a throwaway job id of
        the real one's length, to check their sizes before the job is recorded."""
        return [self.message(uuid.uuid4().hex, index, source) for index, source in enumerate(self._head)]

    def message(self, job_id: str, index: int, source: Source, enqueued_at: float | None = None) -> ScoreShard:
        """The ``mlf.score_shard`` body of shard ``index`` of job ``job_id``, rows ``source``,
        sent at ``enqueued_at`` (Unix seconds; default now)."""
        return ScoreShard(job_id=job_id, shard_index=index, model=self.manifest.name, version=self.manifest.version,
                          batch_size=self.batch_size, columns=self.columns, source=source, online=self.online,
                          enqueued_at=time.time() if enqueued_at is None else enqueued_at)

    def messages(self, job_id: str, enqueued_at: float | None = None) -> Iterator[ScoreShard]:
        """Every shard's message of job ``job_id``, in shard order (see :meth:`message`).

        Sources given as an iterator are read here, once: a second call yields only the
        shards :meth:`head` holds.
        """
        for index, source in enumerate(itertools.chain(self._head, self._rest)):
            yield self.message(job_id, index, source, enqueued_at)

    def inline_bytes(self) -> int:
        """Base64 characters of inline rows the shards carry (an online request's; sources
        given as a sequence only)."""
        return sum(len(s.data_b64) for s in self._head if isinstance(s, InlineRows))

    def new_job(self, job_id: str, owner: str | None = None) -> NewJob:
        """The store's record of this plan as job ``job_id``, submitted by ``owner``."""
        return NewJob(job_id, self.manifest.name, self.manifest.version, self.dataset, self.n_rows, self.ranges,
                      self.batch_size, self.options.priority, owner, output_schema(self.manifest.outputs),
                      callback_url=self.options.callback_url,
                      output_uri=self.options.output_uri)


def _batch_size(manifest: ModelManifest, options: JobOptions, default_batch_size: int) -> int:
    return options.batch_size or manifest.default_batch_size or default_batch_size


def plan_dataset(manifest: ModelManifest, options: JobOptions, info: DatasetInfo, *, data_dir: Path,
                 shard_size: int, default_batch_size: int) -> ShardPlan:
    """The plan of a job over the dataset ``info`` (schema and row count only, read by
    :func:`~ml_framework.datasets.inspect`): by reference under ``data_dir``, else inline,
    reading the file once as the messages are sent (see :func:`producer.datasets.plan_sources`).

    Args:
        manifest: the model version (resolved from ``options``).
        data_dir: the data directory, which workers mount.
        shard_size: rows per shard.
        default_batch_size: the settings' batch size, when neither the options nor the
            manifest give one.

    Raises:
        DatasetSchemaError: the columns do not fit the model (see
            :func:`producer.datasets.resolve_columns`).
        DatasetPathError: the path leaves the data directory through a link or '..'.
    """
    columns = resolve_columns(info, manifest, options.columns)
    ranges = shard_ranges(info.n_rows, shard_size)
    return ShardPlan(manifest, options, _batch_size(manifest, options, default_batch_size), columns, str(info.path),
                     info.n_rows, ranges, plan_sources(info, ranges, columns, data_dir), inline=False)


def plan_rows(manifest: ModelManifest, options: JobOptions, rows: RowsLike, *, shard_size: int,
              default_batch_size: int, online: bool = False) -> ShardPlan:
    """The plan of a job over rows given in memory: every shard inline (Arrow IPC).

    Args:
        manifest: the model version (resolved from ``options``).
        rows: see :func:`producer.rows.rows_to_table`.
        shard_size: rows per shard.
        default_batch_size: as :func:`plan_dataset`.
        online: an online request.

    Raises:
        DatasetSchemaError: missing columns, an array of the wrong width or shape, or a
            column whose type can never feed the model.
    """
    table = rows_to_table(rows, manifest.inputs)
    info = DatasetInfo(path=Path("<inline rows>"), format="inline", columns=table.column_names,
                       n_rows=table.num_rows, schema=table.schema)
    columns = resolve_columns(info, manifest, options.columns)
    ranges = shard_ranges(table.num_rows, shard_size)
    return ShardPlan(manifest, options, _batch_size(manifest, options, default_batch_size), columns,
                     f"<{table.num_rows} inline rows>", table.num_rows, ranges,
                     inline_sources(table.select(columns), ranges), inline=True, online=online)


def check_message_bytes(size: int, limit: int, what: str, advice: str, outcome: str) -> None:
    """Refuse a message of ``size`` bytes over ``limit`` (the ``max_message_bytes`` setting).

    Raises:
        MessageTooLargeError: naming ``what``, both sizes, ``advice`` and ``outcome``.
    """
    if size > limit:
        raise MessageTooLargeError(
            f"{what} is too large to send: its message would be {size / 2**20:.1f} MiB ({size} bytes), "
            f"over the max_message_bytes limit of {limit / 2**20:.1f} MiB ({limit} bytes); {advice}. {outcome}"
        )
