"""Data lifecycle of the results store: delete jobs, prune what has expired, give the space
back, and measure the store.

Deleting a job removes, in this order and in bounded transactions, its shards (a chunk of
:data:`DELETE_SHARDS_PER_TXN` at a time) with their output blobs and row errors, then the job
row, leaving a tombstone (``deleted_jobs``: id, owner, time) so that deleting it again is
answered the same for its owner. The shard row goes first in each chunk: a worker still
running a shard of the (cancelled) job flips that row before it writes anything
(:meth:`ResultStore.complete_shard`), so once the row is gone its late recording writes
nothing; and rows are locked in the order the recorders use (shard, then its rows), which
cannot deadlock against them on PostgreSQL. No transaction holds more than one chunk's rows.

A prune pass (:func:`prune`) deletes jobs that finished (SUCCEEDED, PARTIAL, FAILED,
CANCELLED) more than ``results_retention`` ago, at most :data:`PRUNE_JOBS_PER_PASS` per
pass, oldest first; heartbeats of worker processes silent for more than
``worker_heartbeat_retention``; and tombstones older than ``deleted_job_retention``.
:func:`exclusive_pass` makes one host at a time run it (a PostgreSQL advisory lock, a file
lock beside a SQLite file).

Space: SQLite reuses the pages freed by deleting rows, so the file stops growing once
retention holds; in a store created with ``auto_vacuum=INCREMENTAL`` (every store created
since revision 0010) :func:`reclaim_space` also hands them back to the file system, and
truncates the WAL. PostgreSQL's autovacuum marks the deleted rows' space (the blobs' TOAST
chunks included) reusable; the files do not shrink (see docs/operations.md).

A job with an ``output_uri`` also has its part files (``<output_uri>/<job_id>/``, see
:mod:`~ml_framework.store.output_files`): they are deleted before its rows (a failure there
keeps the job, to be deleted again: the error says why), and swept once more after them, for
a shard that a worker was writing meanwhile (a failure of that sweep is logged). A dry run
does not count them.

Result files a job's user wrote (``mlf results -o``, ``Job.save_results``) are not recorded
in the store, so deleting a job cannot remove them.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, insert, select, text

from ml_framework.errors import ObjectStoreError
from ml_framework.store.models import (
    FINISHED_JOB,
    OPEN_JOB,
    DeletedJobRow,
    JobRow,
    RowErrorRow,
    ShardOutputRow,
    ShardRow,
    WorkerRow,
    as_utc,
    utc_now,
)

if TYPE_CHECKING:
    from ml_framework.store.result_store import ResultStore

log = logging.getLogger(__name__)

DELETE_SHARDS_PER_TXN = 16
"""Shards (with their output blobs and row errors) deleted per transaction: at the default
10,000 rows a shard, one transaction frees some 10 MB of blobs and holds its locks for
milliseconds."""
PRUNE_JOBS_PER_PASS = 500
"""Most jobs one prune pass deletes; the next pass goes on where it stopped."""
PG_PRUNE_LOCK_ID = 72_616_002  # arbitrary constant key for pg_try_advisory_lock
TABLES = ("jobs", "shards", "shard_outputs", "row_errors", "workers", "deleted_jobs")


_now = utc_now
_aware = as_utc


@dataclass
class PruneReport:
    """What a deletion or a prune pass removed (or, with ``dry_run``, would remove).

    Attributes:
        jobs: ids of the jobs deleted.
        shards / shard_outputs / row_errors: rows deleted from each table.
        result_bytes: bytes of result data in those rows (output blobs and row-error
            messages); the database's own overhead (indexes, page slack) comes on top.
        output_files: part files deleted from jobs' output prefixes (``output_uri``).
        workers: hostnames of the dead workers' heartbeats deleted.
        tombstones: tombstones of deleted jobs that expired.
        dry_run: nothing was deleted; the counts say what would be.
        skipped: another host holds the prune lock; this pass did nothing.
    """

    jobs: list[str] = field(default_factory=list)
    shards: int = 0
    shard_outputs: int = 0
    row_errors: int = 0
    result_bytes: int = 0
    output_files: int = 0
    workers: list[str] = field(default_factory=list)
    tombstones: int = 0
    dry_run: bool = False
    skipped: bool = False

    def add(self, other: PruneReport) -> None:
        """Add ``other``'s counts to this report."""
        self.jobs += other.jobs
        self.shards += other.shards
        self.shard_outputs += other.shard_outputs
        self.row_errors += other.row_errors
        self.result_bytes += other.result_bytes
        self.output_files += other.output_files
        self.workers += other.workers
        self.tombstones += other.tombstones


@dataclass(frozen=True)
class StoreStats:
    """The size of the results store.

    Attributes:
        size_bytes: on SQLite the database file plus its WAL, bytes; on PostgreSQL the
            store's tables with their indexes and TOAST, bytes.
        rows: rows per table (:data:`TABLES`). Exact on SQLite; on PostgreSQL exact for
            tables under 100,000 rows, else the planner's estimate (``pg_class.reltuples``,
            refreshed by autovacuum / ANALYZE).
        oldest_finished_age_s: seconds since the oldest finished job ended; ``None`` when none
            has.
    """

    size_bytes: int
    rows: dict[str, int]
    oldest_finished_age_s: float | None


def delete_job(store: ResultStore, job_id: str) -> PruneReport | None:
    """Delete job ``job_id`` and every row it owns (see the module docstring); cancel it
    first if it is still PENDING or RUNNING.

    Args:
        job_id: the full job id.

    Returns:
        What was deleted, or ``None`` when there was no such job (already deleted:
        deleting is idempotent).

    Raises:
        ObjectStoreError: the job's part files could not be deleted; the job is kept
            (cancelled, if it was open).
    """
    with store._read() as conn:
        job = conn.execute(select(JobRow.state, JobRow.owner, JobRow.n_shards, JobRow.output_uri)
                           .where(JobRow.id == job_id)).one_or_none()
    if job is None:
        return None
    if job.state in OPEN_JOB:
        from ml_framework.errors import JobNotFoundError

        try:
            store.cancel(job_id)
        except JobNotFoundError:  # deleted meanwhile by another caller
            return None
    report = PruneReport(jobs=[job_id])
    prefix = None if job.output_uri is None else store.files.open(job.output_uri)
    if prefix is not None:
        report.output_files += prefix.delete_job(job_id)
    for lo in range(0, max(job.n_shards, 1), DELETE_SHARDS_PER_TXN):
        with store.engine.begin() as conn:
            ranges = conn.execute(
                delete(ShardRow).where(ShardRow.job_id == job_id, ShardRow.shard_index >= lo,
                                       ShardRow.shard_index < lo + DELETE_SHARDS_PER_TXN)
                .returning(ShardRow.row_start, ShardRow.row_end)).all()
            report.shards += len(ranges)
            _delete_rows(conn, report, job_id, lo, lo + DELETE_SHARDS_PER_TXN, ranges)
    with store.engine.begin() as conn:
        _delete_rows(conn, report, job_id, 0, None, None)  # stragglers: none, unless shards went missing
        if not conn.execute(delete(JobRow).where(JobRow.id == job_id)).rowcount:
            return None  # another caller deleted it meanwhile
        conn.execute(delete(DeletedJobRow).where(DeletedJobRow.id == job_id))
        conn.execute(insert(DeletedJobRow).values(id=job_id, owner=job.owner, deleted_at=_now()))
    if prefix is not None:
        try:  # a part a worker wrote while the rows went (its recording then found no shard)
            report.output_files += prefix.delete_job(job_id)
        except ObjectStoreError as exc:
            log.warning("job %s deleted, but a results file written meanwhile may remain: %s", job_id, exc)
    return report


def _delete_rows(conn, report: PruneReport, job_id: str, shard_lo: int, shard_hi: int | None,
                 ranges: list | None) -> None:
    """Delete the output blobs of shards ``[shard_lo, shard_hi)`` of a job and the row
    errors among the rows those shards covered (``ranges``: their ``(row_start, row_end)``;
    ``None``: every row), adding the counts to ``report``."""
    outs = delete(ShardOutputRow).where(ShardOutputRow.job_id == job_id, ShardOutputRow.shard_index >= shard_lo)
    if shard_hi is not None:
        outs = outs.where(ShardOutputRow.shard_index < shard_hi)
    sizes = conn.execute(outs.returning(func.length(ShardOutputRow.data))).scalars().all()
    report.shard_outputs += len(sizes)
    report.result_bytes += sum(n or 0 for n in sizes)
    if ranges is not None and not ranges:
        return
    errs = delete(RowErrorRow).where(RowErrorRow.job_id == job_id)
    if ranges is not None:
        errs = errs.where(RowErrorRow.row_index >= min(a for a, _ in ranges),
                          RowErrorRow.row_index < max(b for _, b in ranges))
    sizes = conn.execute(errs.returning(func.length(RowErrorRow.message))).scalars().all()
    report.row_errors += len(sizes)
    report.result_bytes += sum(n or 0 for n in sizes)


def deleted_owner(store: ResultStore, job_id: str) -> tuple[bool, str | None]:
    """Whether ``job_id`` (a full id) was deleted, and the name of the API key that owned
    it (``None``: CLI or Python client)."""
    with store._read() as conn:
        row = conn.execute(select(DeletedJobRow.owner).where(DeletedJobRow.id == job_id)).one_or_none()
    return (False, None) if row is None else (True, row.owner)


def _expired(cutoff: datetime):
    return select(JobRow.id).where(JobRow.state.in_(FINISHED_JOB), JobRow.finished_at < cutoff)


def prune(store: ResultStore, *, results_retention_s: float | None, worker_retention_s: float | None = None,
          deleted_job_retention_s: float | None = None, dry_run: bool = False, limit: int = PRUNE_JOBS_PER_PASS,
          now: datetime | None = None) -> PruneReport:
    """One prune pass (see the module docstring). Running jobs are never touched.

    Args:
        results_retention_s: finished jobs are kept this long after they ended, seconds;
            ``None``: for ever.
        worker_retention_s: heartbeats of workers silent this long are deleted, seconds;
            ``None``: kept.
        deleted_job_retention_s: tombstones of deleted jobs are kept this long, seconds;
            ``None``: kept.
        dry_run: delete nothing; report what would go (every expired job, not only
            ``limit``).
        limit: most jobs deleted by this pass.
        now: the present (tests).

    Returns:
        What was (or would be) deleted.
    """
    now = now or _now()
    report = PruneReport(dry_run=dry_run)
    if results_retention_s is not None:
        cutoff = now - timedelta(seconds=results_retention_s)
        if dry_run:
            report.add(_measure(store, cutoff))
        else:
            with store._read() as conn:
                ids = conn.execute(_expired(cutoff).order_by(JobRow.finished_at).limit(limit)).scalars().all()
            for job_id in ids:
                try:
                    done = delete_job(store, job_id)
                except ObjectStoreError as exc:  # kept; the next pass tries again
                    log.warning("expired job %s kept: its results files could not be deleted: %s", job_id, exc)
                    continue
                if done is not None:
                    report.add(done)
    if worker_retention_s is not None:
        dead = WorkerRow.last_seen_at < now - timedelta(seconds=worker_retention_s)
        with store._read() as conn:
            report.workers = list(conn.execute(select(WorkerRow.hostname).where(dead)).scalars())
        if not dry_run and report.workers:
            with store.engine.begin() as conn:
                conn.execute(delete(WorkerRow).where(dead))
    if deleted_job_retention_s is not None:
        old = DeletedJobRow.deleted_at < now - timedelta(seconds=deleted_job_retention_s)
        if dry_run:
            with store._read() as conn:
                report.tombstones = conn.execute(select(func.count()).where(old)).scalar_one()
        else:
            with store.engine.begin() as conn:
                report.tombstones = conn.execute(delete(DeletedJobRow).where(old)).rowcount
    return report


def _measure(store: ResultStore, cutoff: datetime) -> PruneReport:
    """What deleting every job that finished before ``cutoff`` would remove."""
    expired = _expired(cutoff)
    with store._read() as conn:
        jobs = list(conn.execute(expired.order_by(JobRow.finished_at)).scalars())
        shards = conn.execute(select(func.count()).where(ShardRow.job_id.in_(expired))).scalar_one()
        outs, out_bytes = conn.execute(select(func.count(), func.coalesce(func.sum(func.length(ShardOutputRow.data)), 0))
                                       .where(ShardOutputRow.job_id.in_(expired))).one()
        errs, err_bytes = conn.execute(select(func.count(), func.coalesce(func.sum(func.length(RowErrorRow.message)), 0))
                                       .where(RowErrorRow.job_id.in_(expired))).one()
    return PruneReport(jobs=jobs, shards=shards, shard_outputs=outs, row_errors=errs,
                       result_bytes=int(out_bytes) + int(err_bytes), dry_run=True)


def _sqlite_path(store: ResultStore) -> str | None:
    if store.engine.url.get_backend_name() != "sqlite":
        return None
    db = store.engine.url.database
    return None if db in (None, "", ":memory:") else db


@contextmanager
def exclusive_pass(store: ResultStore) -> Iterator[bool]:
    """Hold the prune lock while the block runs, if no other process holds it.

    Yields:
        True when this process holds the lock (go on), False when another does (skip
        this pass). PostgreSQL: a session advisory lock (released with the connection
        should the process die); SQLite: an exclusive ``flock`` on ``<db>.prune.lock``.
    """
    path = _sqlite_path(store)
    if store.engine.url.get_backend_name() == "postgresql":
        with store.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": PG_PRUNE_LOCK_ID}).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_PRUNE_LOCK_ID})
                    conn.commit()
        return
    if path is None:
        yield True
        return
    with open(f"{path}.prune.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def reclaim_space(store: ResultStore, *, full: bool = False) -> None:
    """Give freed space back to the file system, on SQLite: ``PRAGMA incremental_vacuum``
    (stores created with ``auto_vacuum=INCREMENTAL``) and a ``wal_checkpoint(TRUNCATE)``.
    Nothing on PostgreSQL, where autovacuum makes the space reusable.

    Args:
        full: SQLite only: first convert the file to incremental auto-vacuum with a full
            ``VACUUM`` (rewrites the whole file and locks out writers while it runs; for a
            store created before revision 0010; ``mlf prune --vacuum``).
    """
    if _sqlite_path(store) is None:
        return
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        if full:
            cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cur.execute("VACUUM")
        cur.execute("PRAGMA incremental_vacuum").fetchall()
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        cur.close()
    finally:
        raw.close()


def stats(store: ResultStore) -> StoreStats:
    """The store's size, its row counts and the age of its oldest finished job (see
    :class:`StoreStats`)."""
    path = _sqlite_path(store)
    with store._read() as conn:
        oldest = conn.execute(select(func.min(JobRow.finished_at)).where(JobRow.state.in_(FINISHED_JOB))).scalar()
        if store.engine.url.get_backend_name() == "postgresql":
            size = int(conn.execute(text(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = ANY(:t) AND n.nspname = current_schema() AND c.relkind = 'r'"),
                {"t": list(TABLES)}).scalar_one())  # fixed table names
            estimates = dict(conn.execute(text(
                "SELECT c.relname, c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = ANY(:t) AND n.nspname = current_schema() AND c.relkind = 'r'"),
                {"t": list(TABLES)}).all())
        else:
            size, estimates = 0, {}
            if path is not None:
                size = sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))
        rows = {}
        for table in TABLES:
            estimate = estimates.get(table, -1)
            rows[table] = (int(estimate) if estimate is not None and estimate >= 100_000
                           else conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())  # fixed table names
    age = None if oldest is None else max(0.0, (_now() - _aware(oldest)).total_seconds())
    return StoreStats(size_bytes=size, rows=rows, oldest_finished_age_s=age)


def prune_pass(store: ResultStore, *, results_retention_s: float | None, worker_retention_s: float | None = None,
               deleted_job_retention_s: float | None = None, limit: int = PRUNE_JOBS_PER_PASS) -> PruneReport:
    """What ``mlf worker`` runs every ``prune_interval_s``: under :func:`exclusive_pass`, one
    :func:`prune` of at most ``limit`` jobs, then :func:`reclaim_space`.

    Returns:
        What was deleted; ``skipped`` when another process holds the prune lock.
    """
    with exclusive_pass(store) as mine:
        if not mine:
            return PruneReport(skipped=True)
        report = prune(store, results_retention_s=results_retention_s, worker_retention_s=worker_retention_s,
                       deleted_job_retention_s=deleted_job_retention_s, limit=limit)
        reclaim_space(store)
        return report
