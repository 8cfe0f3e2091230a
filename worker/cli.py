"""Worker-side ``mlf`` commands: ``mlf worker`` and ``mlf models add``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml


def worker(
    processes: Annotated[int | None, typer.Option(min=1, help="Worker processes (default: one per CPU core).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Framework threads per process (default: cores / processes).")] = None,
    grace: Annotated[float, typer.Option(help="Seconds running shards get to finish on shutdown.")] = 60.0,
) -> None:
    """Start and supervise worker processes until SIGTERM / Ctrl-C."""
    from ml_framework.settings import get_settings
    from worker.launcher import Supervisor, plan_children

    settings = get_settings()
    children = plan_children(settings, processes, threads)
    typer.echo(f"starting {len(children)} worker process(es) on queue {settings.bulk_queue} "
               f"(broker: {'embedded SQLite' if settings.embedded_broker else settings.broker_url})", err=True)
    raise typer.Exit(Supervisor(children, grace_s=grace).run())


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit (code 1) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def models_add(
    artifact: Annotated[Path, typer.Argument(help="Model file (.skops, .pt2, .pt, .keras) or SavedModel directory.")],
    manifest: Annotated[Path, typer.Option(help="YAML/JSON manifest: framework, inputs, outputs, ...")],
    name: Annotated[str | None, typer.Option(help="Model name (overrides the manifest).")] = None,
    version: Annotated[int | None, typer.Option(min=1, max=2**31 - 1, help="Version (default: next free).")] = None,
) -> None:
    """Validate an existing artifact against its manifest (load + one batch) and add it."""
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
    try:
        published = add_artifact(artifact, get_settings().models_dir, fields)
    except (MLFrameworkError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"added {published.name}/{published.version} ({published.framework})")
    typer.echo(json.dumps(published.model_dump(mode="json"), indent=2))


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    """Plug the worker commands into ``mlf``."""
    app.command(name="worker")(worker)
    models_app.command(name="add")(models_add)
