""":class:`ResultStore`, the facade over the results store's concepts: the only code that
writes jobs, shards, results and row errors.

Each method delegates to the module that owns the concept, where the details are
documented: :mod:`~ml_framework.store.jobs` (recording, reading, listing and cancelling
jobs), :mod:`~ml_framework.store.shards` (the shard ledger: claims, leases, idempotent
completion), :mod:`~ml_framework.store.fleet` (worker heartbeats),
:mod:`~ml_framework.store.outputs` (results, as Arrow),
:mod:`~ml_framework.store.callbacks` (completion callbacks),
:mod:`~ml_framework.store.output_files` (results of jobs with an ``output_uri``, as Parquet
files under that prefix) and :mod:`~ml_framework.store.lifecycle` (deletion, retention, size).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import pyarrow as pa
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import SQLAlchemyError

from ml_framework.constants import WORKER_LIVE_S
from ml_framework.errors import StoreError, StoreUnavailableError
from ml_framework.store import (
    callbacks,
    fleet,
    idempotency,
    jobs,
    lifecycle,
    outputs,
    pages,
    sessions,
)
from ml_framework.store import shards as ledger
from ml_framework.store.callbacks import DueCallback
from ml_framework.store.engine import CONNECTION_ERRORS, make_engine, read, upgrade
from ml_framework.store.fleet import WorkerInfo
from ml_framework.store.jobs import JobStatus, NewJob
from ml_framework.store.lifecycle import PruneReport, StoreStats
from ml_framework.store.models import CallbackState, JobState, ShardClaim
from ml_framework.store.output_files import OutputFiles
from ml_framework.store.outputs import RowError, as_table
from ml_framework.store.shards import ShardOutcomeRecord

if TYPE_CHECKING:
    from ml_framework.settings import Settings

OUTPUT_URIS_KEPT = 1024
"""Jobs whose ``output_uri`` a store handle remembers (a worker records many shards of few jobs)."""


class ResultStore:
    """Jobs, shards, results and row errors in a SQL database.

    Args:
        url: SQLAlchemy URL (SQLite or PostgreSQL).
        migrate: run the Alembic upgrade to the newest schema on open (idempotent).
        settings: the ``s3_*`` settings with which jobs' ``s3://`` output prefixes are
            reached (:attr:`files`); ``None``: the process's settings, read when first needed.

    Raises:
        StoreUnavailableError: ``migrate`` and the database cannot be reached.
        StoreError: ``migrate`` and the schema cannot be brought up to date.
    """

    def __init__(self, url: str, *, migrate: bool = True, settings: Settings | None = None) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        self.files = OutputFiles(settings)
        self._output_uris: dict[str, str | None] = {}  # job id -> output_uri, which never changes
        if migrate:
            try:
                upgrade(self.engine)
            except CONNECTION_ERRORS as exc:
                raise StoreUnavailableError(f"cannot reach results store {self.engine.url!r}: {exc}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(f"cannot open results store {self.engine.url!r}: {exc}") from exc

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def _read(self) -> Connection:
        return read(self.engine)

    def ping(self) -> None:
        """Run ``SELECT 1``. Raises ``StoreUnavailableError`` when the database is unreachable."""
        try:
            with self._read() as conn:
                conn.execute(select(1))
        except SQLAlchemyError as exc:
            raise StoreUnavailableError(f"results store {self.engine.url!r} unreachable: {exc}") from exc

    # --------------------------------------------------------------- sessions
    def revoke_session(self, token: str, expires_at: datetime) -> None:
        """Refuse browser session ``token`` until ``expires_at`` (:func:`~ml_framework.store.sessions.revoke`)."""
        sessions.revoke(self.engine, token, expires_at)

    def session_revoked(self, token: str) -> bool:
        """Whether browser session ``token`` was signed out (:func:`~ml_framework.store.sessions.revoked`)."""
        return sessions.revoked(self.engine, token)

    # ------------------------------------------------------------------- jobs
    def create_job(self, *, model: str, model_version: int, dataset: str, n_rows: int,
                   shard_ranges: Sequence[tuple[int, int]], batch_size: int, priority: int = 0,
                   owner: str | None = None, output_schema: pa.Schema | None = None) -> str:
        """Record a PENDING job and its shards; return its id (:func:`~ml_framework.store.jobs.create_job`)."""
        return jobs.create_job(self.engine, model=model, model_version=model_version, dataset=dataset, n_rows=n_rows,
                               shard_ranges=shard_ranges, batch_size=batch_size, priority=priority, owner=owner,
                               output_schema=output_schema)

    def create_jobs(self, new_jobs: Sequence[NewJob]) -> None:
        """Record several jobs in one transaction (:func:`~ml_framework.store.jobs.create_jobs`)."""
        jobs.create_jobs(self.engine, new_jobs)

    def create_job_once(self, job: NewJob, key: idempotency.Idempotency) -> tuple[str, bool]:
        """Record ``job`` unless ``key`` names a job already: ``(job id, created)``
        (:func:`~ml_framework.store.jobs.create_job_once`)."""
        return jobs.create_job_once(self.engine, job, key)

    def idempotent_job(self, key: idempotency.Idempotency) -> str | None:
        """The id of the job ``key`` names, or ``None`` (:func:`~ml_framework.store.jobs.idempotent_job`)."""
        return jobs.idempotent_job(self.engine, key)

    def release_idempotency_key(self, job_id: str) -> None:
        """Take the idempotency key off ``job_id`` (its messages could not be sent)."""
        jobs.release_idempotency_key(self.engine, job_id)

    def job(self, job_id: str) -> JobStatus:
        """Current status of ``job_id``. Raises ``JobNotFoundError`` (:func:`~ml_framework.store.jobs.job`)."""
        return jobs.job(self.engine, job_id)

    def recent_jobs(self, limit: int = 50, *, owned_by: str | None = None) -> list[JobStatus]:
        """Open jobs, newest first, then the most recently ended (:func:`~ml_framework.store.jobs.recent_jobs`)."""
        return jobs.recent_jobs(self.engine, limit, owned_by=owned_by)

    def resolve_job_id(self, id_or_prefix: str, *, owned_by: str | None = None, min_prefix: int = 4) -> str:
        """The full id of the one job matching ``id_or_prefix``
        (:func:`~ml_framework.store.jobs.resolve_job_id`)."""
        return jobs.resolve_job_id(self.engine, id_or_prefix, owned_by=owned_by, min_prefix=min_prefix)

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job that has not finished (:func:`~ml_framework.store.jobs.cancel`)."""
        return jobs.cancel(self.engine, job_id)

    def job_counts(self) -> dict[str, int]:
        """Number of jobs in each :class:`JobState`, zeros included."""
        return jobs.job_counts(self.engine)

    def job_counts_by_owner(self) -> dict[tuple[str | None, str], int]:
        """Number of jobs by ``(owner, state)`` (:func:`~ml_framework.store.jobs.job_counts_by_owner`)."""
        return jobs.job_counts_by_owner(self.engine)

    def oldest_pending_age_s(self) -> float | None:
        """Seconds since the oldest PENDING job was created; ``None`` when none is."""
        return jobs.oldest_pending_age_s(self.engine)

    def pending_jobs_by_queue(self, job_ids: Sequence[str] | None = None, limit: int = 1000) -> dict[str, list[str]]:
        """PENDING bulk jobs by broker queue (:func:`~ml_framework.store.jobs.pending_jobs_by_queue`)."""
        return jobs.pending_jobs_by_queue(self.engine, job_ids, limit)

    # --------------------------------------------------------------- lifecycle
    def delete_job(self, job_id: str) -> PruneReport | None:
        """Delete a job and everything it owns, leaving a tombstone; ``None`` if there was
        no such job (:func:`~ml_framework.store.lifecycle.delete_job`)."""
        return lifecycle.delete_job(self, job_id)

    def deleted_owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether job ``job_id`` (a full id) was deleted (its tombstone is still kept),
        and the name of the API key that owned it (``None``: CLI or Python client)."""
        return lifecycle.deleted_owner(self, job_id)

    def prune(self, *, results_retention_s: float | None, worker_retention_s: float | None = None,
              deleted_job_retention_s: float | None = None, dry_run: bool = False,
              limit: int = lifecycle.PRUNE_JOBS_PER_PASS, now: datetime | None = None) -> PruneReport:
        """One pass of retention: see :func:`ml_framework.store.lifecycle.prune`."""
        return lifecycle.prune(self, results_retention_s=results_retention_s, worker_retention_s=worker_retention_s,
                               deleted_job_retention_s=deleted_job_retention_s, dry_run=dry_run, limit=limit,
                               now=now)

    def stats(self) -> StoreStats:
        """Size in bytes, rows per table, age of the oldest finished job (see
        :class:`~ml_framework.store.lifecycle.StoreStats`)."""
        return lifecycle.stats(self)

    # ----------------------------------------------------------------- results
    def recorded_rows(self, job_id: str, lo: int = 0, hi: int | None = None) -> tuple[pa.Table | None, list]:
        """The output table and ``(row_index, field, message)`` row errors of a job among
        rows ``[lo, hi)`` (:func:`~ml_framework.store.outputs.recorded_rows`)."""
        return outputs.recorded_rows(self.engine, job_id, lo, hi, files=self.files)

    def results_table(self, job_id: str) -> pa.Table:
        """Outputs and row errors of a job as one Arrow table, in input row order
        (:func:`~ml_framework.store.outputs.results_table`)."""
        return outputs.results_table(self.engine, job_id, files=self.files)

    def results_pages(self, job_id: str, page_rows: int = pages.STREAM_PAGE_ROWS) -> Iterator[pa.Table]:
        """:meth:`results_table` in pages of at most ``page_rows`` input rows, each read when
        it is asked for, all with the same columns (:func:`~ml_framework.store.pages.results_pages`)."""
        return pages.results_pages(self.engine, job_id, page_rows, files=self.files)

    def results_page(self, job_id: str, offset: int, limit: int) -> list[dict]:
        """The recorded rows among input rows ``[offset, offset + limit)``, one dict each
        (:func:`~ml_framework.store.outputs.results_page`)."""
        return outputs.results_page(self.engine, job_id, offset, limit, files=self.files)

    def finished(self, job_ids: Sequence[str]) -> dict[str, tuple[JobState, pa.Table | None, list]]:
        """The jobs among ``job_ids`` that have ended, with their recorded rows
        (:func:`~ml_framework.store.outputs.finished`)."""
        return outputs.finished(self.engine, job_ids)

    def row_errors(self, job_id: str, limit: int = 10) -> list[RowError]:
        """The first ``limit`` row errors of a job, by row; empty for an unknown job."""
        return outputs.row_errors(self.engine, job_id, limit)

    # ------------------------------------------------------------ shard ledger
    def set_shard_messages(self, job_id: str, messages: Sequence[tuple[int, str]]) -> None:
        """Keep each sent shard's message to send again should the broker lose it
        (:func:`~ml_framework.store.shards.set_messages`)."""
        ledger.set_messages(self.engine, job_id, messages)

    def orphaned_shards(self, min_age_s: float, limit: int = 1000) -> list[tuple[str, int, str, int]]:
        """Open bulk shards no worker holds, with their kept messages
        (:func:`~ml_framework.store.shards.orphaned`)."""
        return ledger.orphaned(self.engine, min_age_s, limit)

    def shards(self, job_id: str) -> list[dict]:
        """Every shard of a job as a dict of its columns, by shard index."""
        return ledger.shards(self.engine, job_id)

    def claim_shard(self, job_id: str, shard_index: int, worker: str, max_attempts: int | None = None, *,
                    owner: str | None = None, lease_s: float | None = None) -> ShardClaim:
        """Mark a shard RUNNING unless finished, cancelled or held by another live process
        (:func:`~ml_framework.store.shards.claim`)."""
        return ledger.claim(self.engine, job_id, shard_index, worker, max_attempts, owner=owner, lease_s=lease_s)

    def release_leases(self, owner: str) -> int:
        """End every lease ``owner`` holds; the number released
        (:func:`~ml_framework.store.shards.release_leases`)."""
        return ledger.release_leases(self.engine, owner)

    def release_lease(self, job_id: str, shard_index: int, owner: str) -> bool:
        """End ``owner``'s lease on one shard it could not record
        (:func:`~ml_framework.store.shards.release_lease`)."""
        return ledger.release_lease(self.engine, job_id, shard_index, owner)

    def fail_running_shard(self, job_id: str, shard_index: int, owner: str, reason: str) -> bool:
        """Record a shard ``owner`` was running as FAILED, every row with ``reason``
        (:func:`~ml_framework.store.shards.fail_running`)."""
        return ledger.fail_running(self.engine, job_id, shard_index, owner, reason)

    def complete_shard(self, job_id: str, shard_index: int, outputs: pa.Table | Sequence[tuple[int, dict]],
                       errors: Sequence[RowError], *, shard_error: str | None = None, oom_splits: int = 0,
                       batch_rows: int | None = None, owner: str | None = None,
                       model_load_s: float | None = None) -> bool:
        """Record a shard's outputs and row errors in one transaction; False when it was
        recorded already or its lease passed on (:func:`~ml_framework.store.shards.complete`
        documents the arguments).

        For a job with an ``output_uri`` the outputs are first written as the shard's part
        file (:meth:`OutputPrefix.write <ml_framework.store.output_files.OutputPrefix.write>`:
        idempotent, a redelivery overwrites it with the same rows); the database records
        their count and the row errors. A part written for a job deleted meanwhile is
        removed again.

        Raises:
            ObjectStoreError: the part file could not be written (nothing was recorded).
        """
        table = as_table(outputs)
        output_uri = self._output_uri(job_id) if table.num_rows else None
        prefix = None if output_uri is None else self.files.open(output_uri)
        if prefix is not None:
            prefix.write(job_id, shard_index, table)
        record = ShardOutcomeRecord(job_id, shard_index, table, list(errors), shard_error, oom_splits,
                                    batch_rows, model_load_s, outputs_in_file=prefix is not None)
        recorded = ledger.complete(self.engine, record, owner=owner)
        if prefix is not None and not recorded and not jobs.output_uri(self.engine, job_id)[0]:
            prefix.delete_part(job_id, shard_index)  # the job was deleted while the shard ran
        return recorded

    def _output_uri(self, job_id: str) -> str | None:
        """Job ``job_id``'s ``output_uri``, read once per job (at most :data:`OUTPUT_URIS_KEPT` kept)."""
        if job_id not in self._output_uris:
            found, uri = jobs.output_uri(self.engine, job_id)
            if not found:
                return None
            if len(self._output_uris) >= OUTPUT_URIS_KEPT:
                self._output_uris.clear()
            self._output_uris[job_id] = uri
        return self._output_uris[job_id]

    def record_online(self, records: Sequence[ShardOutcomeRecord], worker: str) -> list[bool]:
        """Record several online requests' shards in one transaction; per record, whether
        this call recorded it (:func:`~ml_framework.store.shards.record_online`)."""
        return ledger.record_online(self.engine, records, worker)

    # ---------------------------------------------------------------- callbacks
    def claim_callbacks(self, lease_s: float, limit: int) -> list[DueCallback]:
        """Claim due completion callbacks for one attempt each, so that no other process
        posts them (:func:`~ml_framework.store.callbacks.claim`)."""
        return callbacks.claim(self.engine, lease_s, limit)

    def callback_delivered(self, job_id: str, attempt: int) -> bool:
        """Record a callback attempt answered 2xx (:func:`~ml_framework.store.callbacks.delivered`)."""
        return callbacks.delivered(self.engine, job_id, attempt)

    def callback_failed(self, job_id: str, attempt: int, retry_in_s: float | None) -> CallbackState | None:
        """Record a failed callback attempt, due again in ``retry_in_s`` seconds or, with
        ``None``, failed for good (:func:`~ml_framework.store.callbacks.failed_attempt`)."""
        return callbacks.failed_attempt(self.engine, job_id, attempt, retry_in_s)

    # -------------------------------------------------------------------- fleet
    def heartbeat(self, info: WorkerInfo) -> None:
        """Record that worker process ``info.hostname`` is alive now (by the database
        server's clock), with its telemetry and its host's clock skew
        (:func:`~ml_framework.store.fleet.heartbeat`)."""
        fleet.heartbeat(self.engine, info)

    def remove_worker(self, hostname: str) -> None:
        """Forget a worker process's heartbeat (on clean shutdown)."""
        fleet.remove_worker(self.engine, hostname)

    def live_workers(self, max_age_s: float = WORKER_LIVE_S) -> list[str]:
        """Hostnames of worker processes whose heartbeat is younger than ``max_age_s``
        seconds by the database server's clock."""
        return fleet.live_workers(self.engine, max_age_s)

    def workers(self, max_age_s: float | None = WORKER_LIVE_S) -> list[WorkerInfo]:
        """Worker processes whose heartbeat is younger than ``max_age_s`` seconds by the
        database server's clock (all when ``None``), by hostname, each with ``age_s``."""
        return fleet.workers(self.engine, max_age_s)

