"""Where ``mlf`` prints: two Rich consoles that print every string as plain text.

User data (column names, cell values, dataset paths, model and worker names, error
messages quoting any of these) reaches these consoles in messages, tables and progress
lines. Rich would read ``[bold]`` in a path as a style, ``a[/]`` in a column name as a
closing tag (``MarkupError``) and ``:x:`` as an emoji, so both consoles have markup,
emoji and highlighting off; the few styled words (``error:``, ``warning:``, a job's state)
are :class:`rich.text.Text` spans, never markup.
"""

from __future__ import annotations

import re
import sys

import typer
from rich.console import Console
from rich.text import Text

EXIT_ERROR = 1

_PLAIN = {"markup": False, "emoji": False, "highlight": False}
# Tables are wide; keep them whole when output goes to a file or pipe (rich assumes 80).
out = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True, **_PLAIN)
err = Console(stderr=True, soft_wrap=True, **_PLAIN)  # never wrap messages scripts may grep


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
"""C0 and C1 control characters (ESC starts terminal escape sequences), zero-width and
line / paragraph separators, and Unicode's bidirectional embeddings, overrides and
isolates (U+202A-U+202E, U+2066-U+2069: they reorder what follows on the line)."""


def printable(value: str) -> str:
    """``value`` with each character of :data:`_UNPRINTABLE` written as its Python escape
    (``\\x1b``, ``\\n``, ``\\u202e``), for user data printed on a terminal (datasets, model
    names: another API key's, in an admin's ``mlf --api URL jobs list``): a name cannot move
    the cursor, recolour the terminal, split a table row or reverse the text after it."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)


def say(*parts: str | tuple[str, str], console: Console = out) -> None:
    """Print one line of plain text: each part a string, or ``(text, style)`` for a styled
    word (the text itself is never read as markup)."""
    console.print(Text.assemble(*parts))


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr."""
    say(("warning:", "yellow"), " ", message, console=err)


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    say(("error:", "red"), " ", message, console=err)
    return typer.Exit(code)
