"""``mlf``: the command line of ml-framework.

Exit codes (for shell scripts):

====  ===========================================================
0     success (with ``--wait``: the job SUCCEEDED)
1     an error, explained on stderr (unknown model, missing file...)
2     bad command-line usage
3     the job ended PARTIAL (some rows failed; see ``mlf results``)
4     the job ended FAILED
5     the job was CANCELLED
6     ``--timeout`` reached before the job finished
====  ===========================================================

``mlf --api URL`` (or ``MLF_API_URL``) makes ``score``, ``status JOB``, ``results``,
``cancel``, ``jobs delete`` and ``models`` talk to the HTTP API with an API key
(``--api-key`` or ``MLF_API_KEY``) instead of the broker and the database; the other
commands need those and refuse ``--api``.

Commands that live outside the producer (``mlf worker``, ``mlf models add``, ``mlf demo``)
are plugged in through the ``mlf.commands`` entry-point group, so a producer-only
install never imports the worker or an ML framework.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from ml_framework.constants import MAX_INT32, MAX_PRIORITY, MIN_PRIORITY, WORKER_LIVE_S
from ml_framework.endpoints import where_line
from ml_framework.errors import JobTimeoutError, MLFrameworkError
from ml_framework.logging import configure_logging
from ml_framework.store import JobState, JobStatus
from producer.cli_console import EXIT_ERROR, err, fail, out, printable, say, warn
from producer.cli_remote import global_options, refuse_remote, remote, remote_client, remote_url
from producer.durations import duration, job_rows_per_s, when
from producer.results import check_output_path

if TYPE_CHECKING:
    from ml_framework.manifest import ModelManifest

__all__ = ["app", "err", "fail", "main", "out", "say", "warn"]  # the consoles, for the other cli modules
EXIT_BY_STATE = {JobState.SUCCEEDED: 0, JobState.PARTIAL: 3, JobState.FAILED: 4, JobState.CANCELLED: 5}
EXIT_TIMEOUT = 6

app = typer.Typer(help="ml-framework: batch inference on Celery workers.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="The model repository.", invoke_without_command=True)
app.add_typer(models_app, name="models")
app.callback()(global_options)  # --api URL, --api-key KEY (producer.cli_remote)


def client():
    """A :class:`producer.Client` from the current settings, or under ``--api`` the HTTP
    client (:meth:`producer.Client.connect`) of that API."""
    from producer.client import Client

    return remote_client() if remote() else Client()


def where(c) -> str:
    """The line saying what ``c`` talks to: the broker and the store, or the API."""
    url = getattr(c, "url", None)
    return f"API {url}" if url is not None else where_line(c.settings)


def status_json(status: JobStatus) -> str:
    """A job's status as one line of JSON, every field of :class:`JobStatus` (states as
    text, times in ISO 8601 ending in ``Z`` as the HTTP API gives them), as ``mlf status
    --json`` and ``mlf jobs list --json`` print it."""

    def text(value: object) -> str:  # UTC as pydantic writes it in the API's JSON: ...Z
        return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else str(value)

    return json.dumps({k: getattr(status, k) for k in status.__dataclass_fields__}, default=text)


def print_status(status: JobStatus) -> None:
    """Human-readable summary of a job."""
    pct = 100.0 * status.rows_done / status.n_rows if status.n_rows else 100.0
    say(f"job {status.job_id}  ", (status.state.value, "bold"), f"  model {printable(status.model)}/{status.model_version}")
    out.print(f"  dataset  {printable(status.dataset)}")
    if status.output_uri is not None:
        out.print(f"  results  {status.output_uri.rstrip('/')}/{status.job_id}/ (Parquet, one file per shard)")
    out.print(f"  rows     {status.rows_done}/{status.n_rows} ({pct:.1f}%): {status.rows_ok} ok, "
              f"{status.rows_failed} failed")
    out.print(f"  shards   {status.shards_done}/{status.n_shards}" + (f"  (priority {status.priority})"
                                                                        if status.priority else ""))
    if status.oom_splits:
        out.print(f"  memory   {status.oom_splits} batch(es) ran out of memory and were retried in halves")
    if status.model_load_s is not None:
        out.print(f"  model    loaded cold in {status.model_load_s:.1f} s (load and warm-up before the first shard; "
                  "`mlf worker --preload` loads it at start)")
    if status.callback_state is not None:
        out.print(f"  callback {status.callback_state} ({status.callback_attempts} attempt(s))")
    if status.started_at is not None:  # the wait before any worker took a shard, then the run itself
        queued_s = max((status.started_at - status.created_at).total_seconds(), 0.0)
        out.print(f"  queued   {duration(queued_s)} before its first shard started")
    if status.elapsed_s is not None:
        rate = job_rows_per_s(status)
        out.print(f"  elapsed  {duration(status.elapsed_s)} since its first shard started"
                  + (f" ({rate:.0f} rows/s)" if rate is not None else ""))


@app.command()
def score(
    dataset: Annotated[str, typer.Argument(help="Dataset file or directory (CSV, Parquet, Arrow, .npy, images), "
                                               "or s3://bucket/key in object storage.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name.")],
    version: Annotated[int | None, typer.Option(min=1, max=MAX_INT32, help="Model version (default: latest).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=MAX_INT32, help="Rows per forward pass.")] = None,
    columns: Annotated[str | None, typer.Option(help="Comma-separated dataset columns mapped onto the model's inputs.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write results here (.parquet / .csv); implies --wait.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job, with a progress bar.")] = False,
    timeout: Annotated[float | None, typer.Option(min=0, help="Seconds to wait at most.")] = None,
    priority: Annotated[int, typer.Option(min=MIN_PRIORITY, max=MAX_PRIORITY,
                                          help="0 (default) to 9 (most urgent): shards of higher-priority jobs go first.")] = 0,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Makes a retry safe: the same command with the same key within idempotency_window (default 24h) "
             "prints the job it submitted instead of submitting another (e.g. a UUID).")] = None,
    callback_url: Annotated[str | None, typer.Option(
        help="POST a signed job.finished event here once the job ends (its host must be in "
             "callback_allowed_hosts; signed with callback_secrets' default entry).")] = None,
    output_uri: Annotated[str | None, typer.Option(
        help="Keep the results as Parquet files, one per shard, under this prefix (s3://bucket/prefix, or a "
             "local directory when the workers run on this host) instead of the results database; "
             "`mlf results` reads them back the same.")] = None,
) -> None:
    """Submit a bulk-scoring job; prints the job id (and waits with --wait / -o)."""
    if output is not None:
        try:
            check_output_path(output)
        except ValueError as exc:
            raise fail(str(exc)) from None
    from producer.plan import JobOptions

    try:
        options = JobOptions.of(model, version, batch_size, columns.split(",") if columns else None, priority,
                                callback_url=callback_url, output_uri=output_uri)
        with client() as c:
            say(where(c), console=err)
            job = c.submit_dataset(dataset, options, idempotency_key=idempotency_key)
            submitted = job.status()
            if job.replayed:
                say(replay_line(submitted), console=err)
            warning = None if submitted.state.terminal else c.worker_warning()  # a job without rows is done
            if not (wait or output):
                if warning:
                    warn(warning)
                print(job.id)
                return
            if not job.replayed:
                say(f"job {job.id} submitted", console=err)
            if warning:
                warn(warning)
            status = job.wait(timeout_s=timeout, progress=sys.stderr.isatty(), warned=warning, on_warning=warn)
            print_status(status)
            if output:
                job.save_results(output)
                out.print(f"results written to {output}")
    except JobTimeoutError as exc:
        raise fail(str(exc), EXIT_TIMEOUT) from None
    except (MLFrameworkError, ValueError) as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(EXIT_BY_STATE.get(status.state, 0))


def replay_line(status: JobStatus) -> str:
    """What ``mlf score --idempotency-key K`` says when K found a job submitted before:
    ``job <id> already submitted with this idempotency key at <UTC time> (now SUCCEEDED);
    not sent again``."""
    return (f"job {status.job_id} already submitted with this idempotency key at {when(status.created_at)} "
            f"(now {status.state.value}); not sent again")


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="Job id; without one, the results store's size.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a job's state and progress; without a job, the results store: its size, rows,
    jobs by state, the oldest finished job and the retention in force."""
    if job_id is None:
        from producer.cli_lifecycle import print_store_status

        refuse_remote("`mlf status` without a job id (the results store's size)")
        print_store_status(as_json)
        return
    try:
        with client() as c:
            st = c.get_job(job_id).status()
    except MLFrameworkError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(status_json(st))
    else:
        print_status(st)
    if st.state is JobState.PENDING:
        _warn_unserved(job_id)


def _warn_unserved(job_id: str) -> None:
    """Warn on stderr why PENDING job ``job_id`` waits, when known: no live worker, live
    workers on another broker (:meth:`Client.worker_warning`), or none consuming its queue."""
    from ml_framework.endpoints import workers_warning
    from producer.queues import job_queue_warning

    if remote():
        with client() as c:
            warning = c.worker_warning()
        if warning:
            warn(warning)
        return
    with client() as c:
        live = c.workers(30.0)
        elsewhere = workers_warning(c.settings, live) if live else None  # live workers, on another broker
        warning = elsewhere or job_queue_warning(c, job_id) or workers_warning(c.settings, live)
    if warning:
        warn(warning)


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Destination .parquet or .csv.")],
) -> None:
    """Write a job's results (outputs and row errors, in input order) to a file."""
    try:
        check_output_path(output)
        with client() as c:
            job = c.get_job(job_id)
            st = job.status()
            job.save_results(output)
    except (MLFrameworkError, ValueError) as exc:
        raise fail(str(exc)) from None
    out.print(f"{st.rows_done} rows ({st.rows_failed} failed) of job {job.id} "
              f"[{st.state.value}] written to {output}")


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job: no further shard starts; recorded results stay."""
    try:
        with client() as c:
            st = c.get_job(job_id).cancel()
    except MLFrameworkError as exc:
        raise fail(str(exc)) from None
    out.print(f"job {st.job_id} is {st.state.value}")


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


@app.command()
def workers(
    all_: Annotated[bool, typer.Option("--all", help=f"Include workers whose heartbeat is older than {WORKER_LIVE_S:.0f} s.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines, one per worker process.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every --interval seconds until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between refreshes with --watch.")] = 2.0,
    self_: Annotated[bool, typer.Option("--self", help="Health check of this host's (container's) worker "
                                        "processes: exit 0 only if each has a fresh heartbeat.")] = False,
) -> None:
    """List live worker processes: device, loaded models, throughput, memory."""
    if self_:
        from producer.cli_admin import check_own_heartbeats

        raise typer.Exit(check_own_heartbeats())
    from ml_framework.endpoints import workers_warning

    elsewhere: list[str] = []  # the live workers listen on another broker than ours

    def listed(c) -> list:
        infos = c.workers(None if all_ else WORKER_LIVE_S)
        live = c.workers(WORKER_LIVE_S) if all_ else infos
        elsewhere[:] = [w for w in [workers_warning(c.settings, live) if live else None] if w]
        return infos

    if as_json:
        try:
            with client() as c:
                infos = listed(c)
        except MLFrameworkError as exc:
            raise fail(str(exc)) from None
        for info in infos:
            print(json.dumps(info.__dict__, default=str))
    else:
        _show(lambda c: _workers_table(listed(c), all_), watch, interval)
    if not watch:
        for warning in elsewhere:
            err.print(f"warning: {warning}", markup=False, highlight=False)


def _workers_table(infos, all_: bool):
    if not infos:
        return ("no worker heartbeat recorded (start workers with `mlf worker`)" if all_
                else f"no worker heartbeat in the last {WORKER_LIVE_S:.0f} s (start workers with `mlf worker`)")
    table = Table("worker", "pid", "device", "models", "shards", "rows", "rows/s", "OOM splits",
                  "RSS GiB", "device mem GiB", "util %", "seen")
    for w in infos:
        threads = "?" if w.threads is None else f"{w.threads} thread{'s' if w.threads != 1 else ''}"
        device = f"{w.device_name} {w.device_uuid[:12]}" if w.device_uuid else f"CPU ({threads})"
        mem = f"{_gib(w.device_memory_used_bytes)}/{_gib(w.device_memory_total_bytes)}" if w.device_uuid else "-"
        util = "-" if w.device_utilization_pct is None else f"{w.device_utilization_pct:.0f}"
        seen = "-" if w.age_s is None else f"{w.age_s:.0f} s ago"
        if w.notable_skew_s is not None:  # ages are by the database's clock; a host off it is named
            seen += f" (clock {w.notable_skew_s:+.0f} s)"
        table.add_row(w.hostname, str(w.pid), device, ", ".join(w.models) or "-", str(w.shards_done),
                      str(w.rows_done), f"{w.rows_per_s:.0f}", str(w.oom_splits), _gib(w.rss_bytes), mem, util, seen)
    return table


@app.command()
def queues(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every --interval seconds until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Every queue of ours: the online and bulk queues, and any other holding messages or
    PENDING jobs (a queue no worker consumes is flagged); jobs by state, oldest pending job."""
    from ml_framework.endpoints import broker_errors, broker_label, broker_unavailable
    from producer.queues import list_queues, unserved_warning

    unreachable: list[str] = []
    unserved: list[str] = []

    def table(c) -> Table:
        t = Table("queue", "waiting", "consumers", "PENDING jobs", title="queues")
        unserved.clear()
        marks: set[str] = set()
        try:
            for q in list_queues(c):
                consumers = "?" if q.consumers is None else f"{q.consumers}{'' if q.exact else '+'}"
                marks.update(m for m in "?+" if consumers.endswith(m))
                flag = "  (no consumer)" if q.unserved else ""
                t.add_row(Text(q.name + flag), str(q.waiting), consumers, str(len(q.pending_jobs)))
                if q.unserved:
                    unserved.append(unserved_warning(q))
        except Exception as exc:  # noqa: BLE001 - shown, the watch goes on
            message = (str(broker_unavailable(c.settings, exc)) if isinstance(exc, broker_errors()) else
                       f"cannot read the queues from the broker at {broker_label(c.settings)}: "
                       f"{str(exc).strip() or type(exc).__name__}")
            unreachable.append(message)
            if watch:  # once the watch ends, the error says it once, on stderr
                t.add_row("(broker unreachable)", Text(message[:80]), "", "")
        counts = c.store.job_counts()
        age = c.store.oldest_pending_age_s()
        t.caption = (", ".join(f"{state} {n}" for state, n in counts.items() if n) or "no jobs") + (
            f"; oldest PENDING job {age:.0f} s old" if age is not None else "") + consumers_legend(marks)
        return t

    _show(table, watch, interval)
    if not watch:
        for warning in unserved:
            err.print(f"warning: {warning}", markup=False, highlight=False)
    if unreachable and not watch:
        raise fail(unreachable[-1])


CONSUMER_MARKS = {"?": "the broker cannot tell", "+": "some live worker did not answer (busy), so maybe more"}
"""What a mark in the consumers column of ``mlf queues`` means."""


def consumers_legend(marks: set[str]) -> str:
    """``; consumers: ? = ...`` for the marks of :data:`CONSUMER_MARKS` that the table
    shows, ``""`` when it shows none (a legend of nothing is noise)."""
    used = [f"{m} = {CONSUMER_MARKS[m]}" for m in CONSUMER_MARKS if m in marks]
    return f"; consumers: {', '.join(used)}" if used else ""


def _show(render, watch: bool, interval: float) -> None:
    """Print ``render(client)`` once, or refresh it in place with rich's Live until Ctrl-C."""
    import time

    from rich.live import Live

    try:
        with client() as c:
            if not watch:
                out.print(render(c))
                return
            with Live(render(c), console=out, auto_refresh=False) as live:
                try:
                    while True:
                        time.sleep(interval)
                        live.update(render(c), refresh=True)
                except KeyboardInterrupt:
                    pass
    except MLFrameworkError as exc:
        raise fail(str(exc)) from None


FLOWER_TASK_COLUMNS = "name,uuid,state,kwargs,result,exception,received,started,runtime,worker"
"""The columns of Flower's task list: ``kwargs`` is the shard's one-line summary
(``job=… shard=… model=…/… rows=…-…``), ``result`` a recorded shard's row counts and
``exception`` the reason a shard failed."""


def flower_purge_offline_s(settings) -> int:
    """Seconds after which Flower forgets an offline worker: an hour, or more than the hard
    time limit of a shard, so that a worker whose beats stop while its task holds the GIL
    (until the launcher kills it at ``task_time_limit_s``) stays on the page meanwhile."""
    return max(3600, settings.task_time_limit_s + 60)


@app.command()
def flower(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of Flower's web UI and API.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 in a container).")] = "127.0.0.1",
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Run without basic auth (local use only).")] = False,
    db: Annotated[Path | None, typer.Option(help="Flower's state file (default <var_dir>/flower.db).")] = None,
) -> None:
    """Run Flower, the Celery monitor, on our app: workers, shard tasks (job, shard, model
    and rows in their arguments), and Prometheus metrics at /metrics.

    Basic auth comes from ML_FRAMEWORK_FLOWER_BASIC_AUTH (user:password, comma-separated);
    without it Flower does not start unless --no-auth. The state (tasks seen) is kept in
    --db across restarts. Needs a broker with events (Redis or RabbitMQ).
    """
    import os

    from ml_framework.settings import get_settings

    settings = get_settings()
    if settings.embedded_broker:
        raise fail("Flower needs a broker that carries Celery events (Redis or RabbitMQ); the embedded SQLite "
                   "broker does not: set ML_FRAMEWORK_BROKER_URL")
    if not settings.flower_basic_auth and not no_auth:
        raise fail("set ML_FRAMEWORK_FLOWER_BASIC_AUTH=user:password to protect Flower (or pass --no-auth "
                   "for local use)")
    db = db or settings.var_dir / "flower.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    # Flower's own FLOWER_* options pass through, except those that would change its
    # authentication behind our back.
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API")}
    if settings.flower_basic_auth and not no_auth:
        # in the environment, not on the command line, where ps shows it
        env["FLOWER_BASIC_AUTH"] = ",".join(e.get_secret_value() for e in settings.flower_basic_auth)
    argv = [sys.executable, "-m", "celery", "-A", "producer.flower", "flower", f"--port={port}", f"--address={address}",
            "--persistent=True", f"--db={db}", "--state_save_interval=60000",
            f"--purge_offline_workers={flower_purge_offline_s(settings)}", f"--tasks_columns={FLOWER_TASK_COLUMNS}"]
    say(f"Flower on http://{address}:{port} ({'basic auth' if 'FLOWER_BASIC_AUTH' in env else 'NO auth'}; "
        f"state in {db})", console=err)
    os.execve(sys.executable, argv, env)


@models_app.callback()
def models(ctx: typer.Context) -> None:
    """List the models in the repository (``mlf models add`` adds one)."""
    if ctx.invoked_subcommand is not None:
        refuse_remote(f"`mlf models {ctx.invoked_subcommand}`")
        return
    from ml_framework.manifest import ModelRepository
    from ml_framework.settings import get_settings

    try:
        if remote():
            with client() as c:
                manifests, where_ = c.models(), f"the API's repository ({remote_url()})"
        else:
            manifests, where_ = ModelRepository(get_settings().models_dir).list(), str(get_settings().models_dir)
    except MLFrameworkError as exc:
        raise fail(str(exc)) from None
    if not manifests:
        out.print(f"no models in {where_} (try `mlf demo` or `mlf models add`)", markup=False)
        return
    table = Table("name", "version", "framework", "inputs", "outputs", "batch")
    for m in manifests:
        outputs = m.outputs.kind + (f" ({len(m.outputs.labels)} labels)" if m.outputs.labels else "")
        table.add_row(m.name, str(m.version), m.framework,
                      inputs_line(m),
                      outputs, str(m.default_batch_size or "-"))
    out.print(table)


def inputs_line(m: ModelManifest) -> str:
    """What ``mlf models`` says model ``m`` takes per row, and the tensor it becomes
    (batch dimension excluded): ``4 cols -> [4] float32``, ``images 224x224 (HxW) RGB
    -> [3, 224, 224] float32``, ``text (128 tokens at most) -> [128] int64``, ``tensor ->
    [3, 32, 32] float32``."""
    inputs, shape = m.inputs, list(m.row_shape)
    if inputs.kind == "image":
        height, width = m.preprocessing.image_size or (0, 0)  # fixed for every image model (manifest check)
        takes = f"images {height}x{width} (HxW) {m.preprocessing.color}"
    elif inputs.kind == "text":
        takes = f"text ({shape[0]} tokens at most)"
    elif inputs.kind == "tensor":
        takes = "tensor"
    else:
        takes = f"{len(inputs.columns)} cols"
    return f"{takes} -> {shape} {inputs.dtype}"


def load_plugins() -> None:
    """Register the admin and lifecycle commands, and those of installed ``mlf.commands``
    entry points, on :data:`app` (:func:`main` does it before running a command; tests
    that invoke :data:`app` directly call it first)."""
    from producer import (  # they import this module, so they are registered here
        cli_admin,
        cli_lifecycle,
    )

    cli_admin.register(app)
    cli_lifecycle.register(app)
    for ep in entry_points(group="mlf.commands"):
        try:
            register = ep.load()
        except ImportError:  # e.g. a producer-only install without the worker's extras
            continue
        register(app, models_app)


def main() -> None:
    """Console-script entry point."""
    from ml_framework.settings import get_settings

    try:
        configure_logging(get_settings().logging_level, get_settings(), to_file=False)  # long-running commands add the file
    except MLFrameworkError as exc:
        fail(str(exc))
        raise SystemExit(EXIT_ERROR) from None
    load_plugins()
    try:
        app()
    except Exception as exc:  # e.g. broker unreachable, unknown URL scheme
        if get_settings().logging_level == "DEBUG":
            raise
        fail(f"{type(exc).__name__}: {exc}")
        say("(set ML_FRAMEWORK_LOGGING_LEVEL=DEBUG for the traceback)", console=err)
        raise SystemExit(EXIT_ERROR) from None
