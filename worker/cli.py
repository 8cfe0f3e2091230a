"""Worker-side ``mlf`` commands: ``mlf worker`` and ``mlf models add``."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from ml_framework.constants import MAX_INT32
from ml_framework.manifest import ModelManifest, ModelRepository


class LogLevel(str, enum.Enum):
    """``mlf worker --loglevel`` values."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def worker(
    processes: Annotated[int | None, typer.Option("--cpu-processes", "--processes", min=0, help="CPU worker processes (default: one per core when there is no GPU, else none).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Framework threads per process (default: cores / processes).")] = None,
    devices: Annotated[str | None, typer.Option(help="GPUs to use: NVML indices or UUIDs, e.g. 0,2 (default: all visible).")] = None,
    processes_per_device: Annotated[int, typer.Option(min=1, help="Worker processes per GPU.")] = 1,
    grace: Annotated[float, typer.Option(min=0, help="Seconds running shards get to finish on shutdown.")] = 60.0,
    preload: Annotated[list[str] | None, typer.Option(help="Model to load and warm up in every process before its first shard: name or name:version (repeatable; default: worker_preload_models).")] = None,
    loglevel: Annotated[LogLevel | None, typer.Option("--loglevel", case_sensitive=False, help="Log level (default: logging_level). At debug, each process also prints Celery's banner and start-up warnings; otherwise it says one line when ready.")] = None,
    name: Annotated[str | None, typer.Option(help="This launcher's part of its processes' node names, cpu0-NAME@host (default: the launcher's pid, so that two launchers on one host never share a name).")] = None,
) -> None:
    """Start one worker process per GPU (CPU processes where there is none) and supervise
    them until SIGTERM / Ctrl-C."""
    import os

    from ml_framework.endpoints import check_broker, where_line
    from ml_framework.errors import MLFrameworkError
    from ml_framework.logging import configure_logging
    from ml_framework.manifest import ModelRepository, parse_model_ref
    from ml_framework.settings import get_settings
    from worker.devices import discover, select_visible
    from worker.launcher import Supervisor, exit_now, plan_children

    if loglevel is not None:  # the worker processes read it from their environment too
        os.environ["ML_FRAMEWORK_LOGGING_LEVEL"] = loglevel.value.upper()
        get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings.logging_level, settings)  # the launcher's restarts go to the log file too
    repository = ModelRepository(settings.models_dir)
    if preload is not None and len(preload) > settings.worker_max_cached_models:
        raise fail(f"--preload names {len(preload)} models but worker_max_cached_models "
                   f"({settings.worker_max_cached_models}) keeps fewer loaded")
    for ref in preload if preload is not None else settings.worker_preload_models:
        try:
            repository.resolve(*parse_model_ref(ref))
        except (ValueError, MLFrameworkError) as exc:
            raise fail(f"--preload {ref}: {exc}") from None
    try:  # once, before any process starts: Celery would otherwise retry for many minutes
        check_broker(settings)
    except MLFrameworkError as exc:
        raise fail(f"{exc} No worker process was started.") from None
    report = discover()
    gpus = report.gpus
    if devices is not None:
        if not gpus:
            raise fail(f"--devices {devices}: no GPU is visible: {report.reason}")
        gpus, reason = select_visible(gpus, devices)
        if not gpus:
            raise fail(f"--devices {devices}: {reason}; visible: "
                       f"{', '.join(f'{g.index} ({g.uuid})' for g in report.gpus) or 'none'}")
    for g in gpus:
        typer.echo(f"GPU {g.index}: {g.name} {g.uuid} ({g.memory_total_bytes / 2**30:.0f} GiB)", err=True)
    if not gpus:
        typer.echo(f"no GPU: {report.reason}; running on CPU", err=True)
    try:
        children = plan_children(settings, processes, threads, gpus=gpus, processes_per_device=processes_per_device,
                                 preload=preload, launcher_id=name)
    except ValueError as exc:
        raise fail(f"--name: {exc}") from None
    if not children:
        raise fail("nothing to start: no GPU selected and --cpu-processes 0")
    note_other_launchers(settings, children)
    typer.echo(f"starting {len(children)} worker process(es) on queues {settings.online_queue}, {settings.bulk_queue}; "
               f"{where_line(settings)}", err=True)
    address = (settings.worker_metrics_host, settings.worker_metrics_port) if settings.worker_metrics_port else None
    reconcile = prune_bindings = None
    if settings.broker_is_redis:
        from ml_framework.celery_app import create_app
        from worker.bindings import pruner
        from worker.reconcile import resend_lost_shards

        app = create_app(settings)
        prune_bindings = pruner(app)
        if settings.reconcile_interval_s:
            reconcile = lambda store: (resend_lost_shards(app, settings, store), prune_bindings(store))  # noqa: E731
    prune = None
    if settings.prunes and settings.prune_interval_s:
        from worker.retention import prune_expired

        prune = lambda store: prune_expired(settings, store)  # noqa: E731
    supervisor = Supervisor(children, grace_s=grace, metrics_address=address, time_limit_s=settings.task_time_limit_s,
                            store_url=settings.effective_database_url, on_time_limit=settings.on_time_limit,
                            reconcile=reconcile, reconcile_interval_s=settings.reconcile_interval_s,
                            prune=prune, prune_interval_s=settings.prune_interval_s, at_start=prune_bindings)
    exit_now(supervisor.run())  # the launcher's work is done; skip the interpreter's teardown


def note_other_launchers(settings, children) -> None:
    """Say so on stderr when worker processes of another launcher on this host and this
    broker beat in the results store, and that this launcher's processes have names of
    their own (nothing when the store cannot be read yet: the launcher starts anyway).
    Processes whose heartbeat names another broker are not counted: they take no work
    from this one (heartbeats of older workers, which name none, are)."""
    import os

    from ml_framework.endpoints import broker_label
    from ml_framework.store import ResultStore

    host = os.uname().nodename
    ours = {c.name for c in children}
    broker = broker_label(settings)
    try:
        store = ResultStore(settings.effective_database_url, migrate=False)
        try:
            others = sorted(w.hostname for w in store.workers() if w.hostname.endswith(f"@{host}")
                            and w.hostname not in ours and w.broker in (None, broker))
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - a fresh or unreachable store: nothing to compare with
        return
    if others:
        typer.echo(f"note: {len(others)} worker process(es) of another `mlf worker` already run on this host "
                   "with this broker "
                   f"({', '.join(others[:4])}{' ...' if len(others) > 4 else ''}); this launcher's are "
                   f"{', '.join(sorted(ours))}, and `mlf workers` lists both", err=True)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit (code 1) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def models_add(
    artifact: Annotated[Path, typer.Argument(help="Model file (.skops, .pt2, .pt, .keras, .onnx) or SavedModel directory.")],
    manifest: Annotated[Path, typer.Option(help="YAML/JSON manifest: framework, inputs, outputs, ...")],
    name: Annotated[str | None, typer.Option(help="Model name (overrides the manifest).")] = None,
    version: Annotated[int | None, typer.Option(min=1, max=MAX_INT32, help="Version (default: next free).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON instead of a summary.")] = False,
) -> None:
    """Validate an existing artifact against its manifest (load + one batch) and add it.
    Prints a summary (name, version, framework, inputs, outputs, where it went); with
    --json, the manifest written. A failed add leaves nothing in the repository."""
    from ml_framework.errors import MLFrameworkError
    from ml_framework.settings import get_settings
    from worker.export import add_artifact

    try:
        fields = yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise fail(f"{manifest}: cannot read manifest: {exc}") from None
    if not isinstance(fields, dict):
        raise fail(f"{manifest}: expected a mapping")
    if name:
        fields["name"] = name
    if version:
        fields["version"] = version
    models_dir = get_settings().models_dir
    try:
        published = add_artifact(artifact, models_dir, fields, search=[manifest.parent], manifest_path=manifest)
    except (MLFrameworkError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(published.model_dump(mode="json"), indent=2))
        return
    for line in summary(published, ModelRepository(models_dir).version_dir(published.name, published.version).resolve()):
        typer.echo(line)


def _few(values: list, most: int = 6) -> str:
    """``a, b, c`` or, past ``most`` values, the first ones and how many in all."""
    shown = ", ".join(str(v) for v in values[:most])
    return shown if len(values) <= most else f"{shown}, ... ({len(values)} in all)"


def summary(m: ModelManifest, path: Path) -> list[str]:
    """What ``mlf models add`` prints: one line each for the model, its framework and
    artifact, inputs, outputs and directory."""
    inputs = m.inputs
    shape = f", shape {list(inputs.shape)}" if inputs.shape else ""
    outputs = m.outputs.kind + (f", {len(m.outputs.labels)} labels: {_few(m.outputs.labels)}" if m.outputs.labels
                                else f", size {m.outputs.size}" if m.outputs.size else "")
    return [f"added {m.name}/{m.version}",
            f"  framework  {m.framework} ({m.artifact})",
            f"  inputs     {inputs.kind} {_few(inputs.columns)}; {inputs.dtype}{shape}",
            f"  outputs    {outputs}",
            f"  path       {path}"]


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    """Plug the worker commands into ``mlf``."""
    app.command(name="worker")(worker)
    models_app.command(name="add")(models_add)
