"""``mlf --api URL``: the global options that make the producer commands talk to the HTTP
API (:meth:`producer.Client.connect`) instead of the broker and the database, and the
refusal of the commands that need those."""

from __future__ import annotations

from typing import Annotated

import typer

from ml_framework.errors import MLFrameworkError
from producer.cli_console import fail

__all__ = ["KEY_HINT", "NO_KEY_HINT", "REMOTE_COMMANDS", "global_options", "refuse_remote", "remote", "remote_client", "remote_url"]

REMOTE_COMMANDS = frozenset({"score", "status", "results", "cancel", "jobs", "models"})
"""Commands that work over the HTTP API (``mlf --api URL``); ``status`` and ``models`` refuse
their forms that need the store or the repository's directory (:func:`refuse_remote`)."""
_remote: dict[str, str | None] = {"url": None, "key": None}  # set by the global options, per invocation
NO_KEY_HINT = "set the MLF_API_KEY variable, or pass --api-key KEY (a command line shows in ps)"
"""What ``mlf --api`` says when the API answers 401 to a command sent without a key."""
KEY_HINT = "from --api-key or MLF_API_KEY"
"""Where ``mlf --api``'s key came from, said when the API refuses it (401)."""


def global_options(
    ctx: typer.Context,
    api: Annotated[str | None, typer.Option(
        "--api", envvar="MLF_API_URL", metavar="URL",
        help="Talk to the HTTP API at URL (e.g. http://api:8000) instead of the broker and the database: "
             "score, status JOB, results, cancel, jobs list, jobs delete and models.")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="MLF_API_KEY", metavar="KEY",
        help="API key for --api (prefer the MLF_API_KEY variable: a command line shows in ps).")] = None,
) -> None:
    """ml-framework: batch inference on Celery workers."""
    _remote.update(url=api, key=api_key)
    if api and ctx.invoked_subcommand not in REMOTE_COMMANDS:
        raise fail(f"`mlf {ctx.invoked_subcommand}` needs direct access to the broker and the database; it does "
                   f"not work over the HTTP API (--api / MLF_API_URL). Commands that do: "
                   f"{', '.join(sorted(REMOTE_COMMANDS))}.", 2)


def remote() -> bool:
    """Whether this invocation talks to the HTTP API (``--api``)."""
    return _remote["url"] is not None


def remote_url() -> str | None:
    """The API's URL given with ``--api`` (``None`` without)."""
    return _remote["url"]


def remote_client():
    """The HTTP client of the ``--api`` URL, with the ``--api-key`` key. Without a key it
    still sends (an API may run with ``api_auth: none``); a 401 then says how to give one
    (:data:`NO_KEY_HINT`).

    Raises:
        typer.Exit: status 2 when the URL is no http(s) URL (said on stderr).
    """
    from producer.http_client import HTTP_TIMEOUT_S, HttpClient

    try:
        return HttpClient(_remote["url"] or "", _remote["key"], HTTP_TIMEOUT_S, no_key_hint=NO_KEY_HINT,
                          key_hint=KEY_HINT)
    except MLFrameworkError as exc:
        raise fail(str(exc), 2) from None


def refuse_remote(what: str) -> None:
    """Exit with a clear message when ``what`` is asked for over the HTTP API.

    Raises:
        typer.Exit: status 2 under ``--api``.
    """
    if remote():
        raise fail(f"{what} needs direct access to the broker and the database; it does not work over the "
                   "HTTP API (--api / MLF_API_URL)", 2)
