"""Data-lifecycle ``mlf`` commands: ``mlf jobs delete``, ``mlf prune`` and the store summary
of ``mlf status`` without a job."""

from __future__ import annotations

from typing import Annotated

import typer

from ml_framework.errors import JobNotFoundError, MLFrameworkError, ObjectStoreError
from producer.cli import client, err, fail, out, status_json

jobs_app = typer.Typer(help="Jobs: list or delete them (see also `mlf status`, `mlf results`, `mlf cancel`).",
                       no_args_is_help=True)


def _mb(n: int) -> str:
    """``n`` bytes in the largest decimal unit that keeps it at 1 or more (kB, MB, GB)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _say(text: str) -> None:
    out.print(text, markup=False, highlight=False)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@jobs_app.command("list")
def list_jobs(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="Most jobs listed.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job and line (as `mlf status --json`).")]
    = False,
) -> None:
    """List jobs: the open ones (PENDING, RUNNING) newest first, then the most recently
    ended; each with its id, state, model, rows ok / failed of all, when it was created and
    its dataset. Over the HTTP API (--api), the jobs of the key (an admin key: every job)."""
    from rich.table import Column, Table
    from rich.text import Text

    from producer.cli_console import printable
    from producer.cli_remote import remote_url
    from producer.durations import when

    try:
        with client() as c:
            jobs = c.recent_jobs(limit)
    except MLFrameworkError as exc:
        raise fail(str(exc)) from None
    if as_json:
        for st in jobs:
            print(status_json(st))
        return
    if not jobs:
        _say("no job of this API key (submit one with `mlf score`)" if remote_url() else
             "no job in the results store (submit one with `mlf score`)")
        return
    table = Table("state", "model", "rows ok", "failed", "of", "created", "dataset")
    table.columns.insert(0, Column("job", no_wrap=True, min_width=32))  # ids whole, to copy
    for st in jobs:  # user data (model names, paths) as plain text, never markup
        table.add_row(st.job_id, st.state.value, Text(printable(f"{st.model}/{st.model_version}")), str(st.rows_ok),
                      str(st.rows_failed), str(st.n_rows), when(st.created_at), Text(printable(st.dataset)))
    out.print(table)


@jobs_app.command("delete")
def delete_jobs(
    job_ids: Annotated[list[str], typer.Argument(help="Job ids (or unique prefixes of 4+ characters).")],
) -> None:
    """Delete jobs and everything the store holds of them (shards, results, row errors, and
    the Parquet files of a job scored with --output-uri); a running job is cancelled first. A
    job deleted already is reported, not an error. Files written with `mlf results -o` are
    yours: they stay."""
    failed = 0
    with client() as c:
        for job_id in job_ids:
            try:
                full = c.get_job(job_id).id
            except JobNotFoundError as exc:
                if len(job_id.strip()) == 32 and c.was_deleted(job_id):
                    _say(f"job {job_id.strip().lower()} was deleted already")
                    continue
                err.print(f"error: {exc}", markup=False, highlight=False)
                failed += 1
                continue
            try:
                report = c.delete_jobs([full])[full]
            except ObjectStoreError as exc:  # its results files stay, and so does the job
                err.print(f"error: job {full} not deleted: {exc}", markup=False, highlight=False)
                failed += 1
                continue
            if report is None:
                _say(f"job {full} was deleted already")
            else:
                files = f", {report.output_files} results file(s)" if report.output_files else ""
                _say(f"deleted job {full}: {report.shards} shard(s), {report.row_errors} row error(s)"
                     + (f", {_mb(report.result_bytes)} of results" if report.result_bytes else "") + files)
    if failed:
        raise typer.Exit(1)


def prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted, and delete nothing.")] = False,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", help="Retention for this run instead of results_retention, e.g. 30d, 12h, 3600.")] = None,
    vacuum: Annotated[bool, typer.Option(
        "--vacuum", help="SQLite: also rewrite the file (VACUUM) so that it shrinks and hands space back from now "
                         "on; locks out writers while it runs (for stores made before this release).")] = False,
) -> None:
    """Delete the finished jobs past retention (results_retention), the heartbeats of dead
    workers (worker_heartbeat_retention) and old tombstones, as `mlf worker` does every
    prune_interval_s; then give the space back (SQLite)."""
    from ml_framework.settings import parse_duration
    from ml_framework.store.lifecycle import (
        PRUNE_JOBS_PER_PASS,
        PruneReport,
        prune_pass,
        reclaim_space,
    )

    with client() as c:
        retention = dict(c.settings.retention_s)
        if older_than is not None:
            try:
                span = parse_duration(older_than)
            except ValueError as exc:
                raise fail(f"--older-than: {exc}", 2) from None
            retention["results_retention_s"] = None if span is None else span.total_seconds()
        before = c.store.stats().size_bytes
        if dry_run:
            report = c.store.prune(dry_run=True, **retention)
        else:
            report = PruneReport()
            while True:
                try:
                    step = prune_pass(c.store, **retention)
                except MLFrameworkError as exc:
                    raise fail(str(exc)) from None
                if step.skipped:
                    raise fail("another process is pruning the results store now (it holds the prune lock); "
                               "try again later")
                report.add(step)
                if len(step.jobs) < PRUNE_JOBS_PER_PASS:
                    break
                retention["worker_retention_s"] = retention["deleted_job_retention_s"] = None  # done once
            if report.jobs and c.settings.cache_backend == "redis":
                from producer.cache import ResultsCache

                cache = ResultsCache(c.settings)
                cache.forget(report.jobs)
                cache.close()
            if vacuum:
                reclaim_space(c.store, full=True)
        after = c.store.stats().size_bytes
    verb = "would delete" if dry_run else "deleted"
    keep = retention["results_retention_s"]
    if keep is None:
        _say("results_retention is none: finished jobs are kept (set results_retention, or pass --older-than)")
    else:
        _say(f"{verb} {len(report.jobs)} finished job(s) that ended over {_age(keep)} ago: {report.shards} shard(s), "
             f"{report.shard_outputs} result blob(s), {report.row_errors} row error(s), "
             f"{_mb(report.result_bytes)} of results")
        for job_id in report.jobs[:20] if dry_run else []:
            _say(f"  {job_id}")
        if dry_run and len(report.jobs) > 20:
            _say(f"  ... and {len(report.jobs) - 20} more")
    if c.settings.worker_heartbeat_retention is not None:
        _say(f"{verb} {len(report.workers)} heartbeat(s) of dead worker processes"
             + (f": {', '.join(report.workers[:10])}" if report.workers else ""))
    if c.settings.deleted_job_retention is not None:
        _say(f"{verb} {report.tombstones} tombstone(s) of deleted jobs")
    _say(f"store size {_mb(before)}" + ("" if dry_run else f" -> {_mb(after)}"))


def print_store_status(as_json: bool = False) -> None:
    """``mlf status`` without a job: the store's size, rows per table, jobs by state, the
    oldest finished job and the retention in force (``as_json``: one JSON object)."""
    try:
        with client() as c:
            st = c.store.stats()
            counts = c.store.job_counts()
            settings = c.settings
    except MLFrameworkError as exc:
        raise fail(str(exc)) from None
    if as_json:
        import json

        keep = settings.results_retention
        print(json.dumps({"size_bytes": st.size_bytes, "rows": st.rows, "jobs": counts,
                          "oldest_finished_age_s": st.oldest_finished_age_s,
                          "results_retention_s": None if keep is None else keep.total_seconds()}))
        return
    _say(f"results store  {_mb(st.size_bytes)}  ({c.store.engine.url.get_backend_name()})")
    _say("  rows         " + ", ".join(f"{table} {n}" for table, n in st.rows.items()))
    _say("  jobs         " + (", ".join(f"{state} {n}" for state, n in counts.items() if n) or "none"))
    _say(f"  oldest finished job ended {_age(st.oldest_finished_age_s)} ago" if st.oldest_finished_age_s is not None
         else "  no finished job")
    keep = settings.results_retention
    _say(f"  retention    results {'none (kept for ever)' if keep is None else _age(keep.total_seconds())}; "
         f"`mlf prune --dry-run` shows what has expired")


def register(app: typer.Typer) -> None:
    """Plug these commands into ``mlf``."""
    app.add_typer(jobs_app, name="jobs")
    app.command()(prune)
