"""Operators' ``mlf`` commands: ``mlf config``, ``mlf api-key`` and the worker health
check behind ``mlf workers --self``."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ml_framework.constants import WORKER_GONE_S, WORKER_LIVE_S
from ml_framework.errors import MLFrameworkError
from producer.cli import err, fail, out


def check_own_heartbeats() -> int:
    """``mlf workers --self``: 0 when this host (``os.uname().nodename``, the container's
    hostname, which ``mlf worker`` names its processes after) has a worker process with a
    fresh heartbeat and none whose heartbeat stopped in the last five minutes; else 1.
    Reads the results store directly (no broker, no migration), so it is light enough for
    a health check every 30 s."""
    import os

    from ml_framework.settings import get_settings
    from ml_framework.store import ResultStore

    host = os.uname().nodename
    try:
        store = ResultStore(get_settings().effective_database_url, migrate=False)
        try:
            infos = store.workers(WORKER_GONE_S)
        finally:
            store.close()
    except MLFrameworkError as exc:
        err.print(f"unhealthy: {exc}", markup=False, highlight=False)
        return 1
    # ages by the database server's clock (WorkerInfo.age_s), not this host's
    ages = {w.hostname: w.age_s for w in infos if w.hostname.endswith(f"@{host}")}
    for name, age in sorted(ages.items()):
        out.print(f"{name}: heartbeat {age:.0f} s ago", markup=False, highlight=False)
    stale = [name for name, age in ages.items() if age > WORKER_LIVE_S]
    if not ages or stale:
        err.print(f"unhealthy: {'no worker heartbeat from ' + host if not ages else f'no heartbeat for over {WORKER_LIVE_S:.0f} s from ' + ', '.join(sorted(stale))}",
                  markup=False, highlight=False)
        return 1
    return 0


def config(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the settings in effect (defaults, the YAML file, ML_FRAMEWORK_* variables and
    *_FILE secrets), with every secret masked."""
    from ml_framework.settings import get_settings

    values = get_settings().public_dump()
    if as_json:
        print(json.dumps(values))
        return
    for key, value in values.items():
        print(f"{key}: {json.dumps(value)}")


def api_key(
    name: Annotated[str, typer.Argument(help="The key's name: what logs, metrics and jobs' owner show.")],
    role: Annotated[str, typer.Option(help="user (its own jobs), admin (every job, /metrics) or metrics (/metrics only).")] = "user",
) -> None:
    """Make a new API key: print it (once) and the entries that configure it by its hash."""
    import secrets

    from ml_framework.credentials import KEY_NAME, hash_key

    if not KEY_NAME.match(name):
        raise fail("NAME: use 1 to 64 letters, digits, '_', '.' or '-'", 2)
    if role not in ("user", "admin", "metrics"):
        raise fail("--role: user, admin or metrics", 2)
    key = secrets.token_urlsafe(32)
    print(f"key:       {key}")
    print(f"api_keys:  {name}=" + hash_key(key) + "     (ML_FRAMEWORK_API_KEYS, comma-separated)")
    if role != "user":
        print(f"api_key_roles: {name}={role}     (ML_FRAMEWORK_API_KEY_ROLES, comma-separated)")
    print("Give the key to its user now: the configuration holds only its hash.", file=sys.stderr)



def register(app: typer.Typer) -> None:
    """Plug these commands into ``mlf``."""
    app.command()(config)
    app.command(name="api-key")(api_key)
