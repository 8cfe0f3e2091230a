"""Where a dataset may be read from: one rule for every entry point.

The rule (docs/security.md, "Dataset paths"):

1. The path is made absolute (relative to the data directory for the HTTP API and the
   worker, to the working directory for the CLI and the Python client) and its ``.`` and
   ``..`` are applied as written.
2. Every symbolic link on it is followed, with ``lstat`` and ``readlink`` only: nothing is
   opened, so no byte of a file is read before the path is admitted.
3. A path whose real location lies inside the real data directory is admitted: workers
   read it by reference.
4. A path that enters the data directory (as written, or through any link it passes) and
   ends outside it is refused: a symlink dropped into the data directory cannot lead a
   producer, the API or a worker to a file elsewhere.
5. Otherwise the file lies outside and was named directly: the CLI and the Python client
   read it themselves and inline its rows in the shard messages (a documented feature);
   the HTTP API and the worker refuse it.

Refusals name the path as the caller gave it, never the link's target nor its content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ml_framework.errors import DatasetPathError

MAX_LINKS = 40
"""Symbolic links followed on one path before giving up: Linux's MAXSYMLINKS
(``include/linux/namei.h``), past which ``open`` fails with ELOOP."""

__all__ = ["DatasetLocation", "exists", "locate_dataset", "resolve_under", "suggest_under"]


@dataclass(frozen=True)
class DatasetLocation:
    """Where a dataset path leads.

    Attributes:
        path: the real, absolute path (every symbolic link followed); read this one.
        relative: ``path`` relative to the real data directory, as POSIX text (what a
            by-reference shard carries); ``None`` for a file outside the data directory.
    """

    path: Path
    relative: PurePosixPath | None


def _walk(path: str) -> tuple[str, list[str]]:
    """Resolve the absolute, normalized ``path`` as the kernel would, link by link.

    Returns:
        ``(real path, locations visited)``: every component as it was reached and every
        link target, so that a caller can tell whether the path passed through a
        directory on its way. Components that do not exist are joined as written.

    Raises:
        DatasetPathError: more than :data:`MAX_LINKS` links (a loop).
    """
    pending = [p for p in reversed(path.split("/")) if p]
    current, visited, links = "/", [], 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        visited.append(candidate)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:  # missing or not searchable: the open that follows will say so
            is_link = False
        if not is_link:
            current = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            raise DatasetPathError(f"too many levels of symbolic links in {path!r}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = "/"
        pending.extend(p for p in reversed(target.split("/")) if p)
    return current, visited


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def locate_dataset(data_dir: Path | str, path: Path | str, *, name: str | None = None) -> DatasetLocation:
    """Apply the module's rule to ``path`` for a producer (CLI, Python client).

    Args:
        data_dir: the data directory (``settings.data_dir``).
        path: the dataset as given; a relative path is taken relative to ``data_dir``
            (callers holding a path relative to the working directory pass it absolute).
        name: how a refusal names the path (default: ``path`` as given; the HTTP API
            passes it cut short).

    Returns:
        Its :class:`DatasetLocation`: inside the data directory, or outside it and named
        directly.

    Raises:
        DatasetPathError: the path enters the data directory and leads out of it (a
            symbolic link or ``..``), or loops, or holds a NUL character. Nothing was opened.
    """
    shown = os.fspath(path) if name is None else name
    if "\x00" in os.fspath(path):  # no file system takes it: os.lstat would raise ValueError
        raise DatasetPathError(f"dataset {shown!r}: a path cannot contain a NUL character")
    root_written = os.path.abspath(data_dir)
    root, _ = _walk(root_written)
    written = os.path.normpath(os.path.join(root_written, os.fspath(path)))
    real, visited = _walk(written)
    if _inside(real, root):
        return DatasetLocation(Path(real), PurePosixPath(os.path.relpath(real, root)))
    if _inside(written, root_written) or any(_inside(v, root) for v in visited):
        raise DatasetPathError(
            f"dataset {shown!r} leaves the data directory (a symbolic link or '..' on it leads "
            "outside); refused without reading it. Copy the file into the data directory, or give its "
            "real path outside it")
    return DatasetLocation(Path(real), None)


def resolve_under(data_dir: Path | str, path: Path | str, *, name: str | None = None) -> Path:
    """The real path of ``path`` when it lies inside ``data_dir``, for the HTTP API and the
    worker, which read nothing else.

    Args:
        data_dir: the data directory.
        path: relative to ``data_dir`` (an absolute path is taken as it is).
        name: how a refusal names the path (default: ``path`` as given).

    Returns:
        The real, absolute path (every symbolic link followed), inside the real data
        directory. It may not exist; the reader says so.

    Raises:
        DatasetPathError: the path leaves the data directory, or lies outside it.
    """
    location = locate_dataset(data_dir, path, name=name)
    if location.relative is None:
        raise DatasetPathError(f"dataset {os.fspath(path) if name is None else name!r} leaves the data directory "
                               "(it lies outside it)")
    return location.path


def exists(path: Path) -> bool:
    """Whether ``path`` exists; ``False`` also where the system cannot tell (a name too
    long, a directory on the way not searchable)."""
    try:
        return path.exists()
    except OSError:
        return False


def suggest_under(data_dir: Path | str, path: Path | str) -> str | None:
    """What a caller of the HTTP API probably meant by ``path``, which names nothing under
    ``data_dir``: the longest tail of it that does (``data/digits.csv`` given the CLI's
    habit, or a path on the caller's own machine, ``/home/me/proj/data/digits.csv``, both
    give ``digits.csv``).

    Args:
        data_dir: the data directory.
        path: the path as the caller gave it.

    Returns:
        That tail, relative to ``data_dir`` as POSIX text, or ``None`` when no tail of
        ``path`` exists under ``data_dir`` (by the module's rule: a tail that leaves the
        data directory is never suggested).
    """
    parts = [p for p in PurePosixPath(os.fspath(path)).parts if p not in ("/", ".", "..")]
    for start in range(len(parts)):
        tail = PurePosixPath(*parts[start:])
        try:
            location = locate_dataset(data_dir, tail)
        except DatasetPathError:
            continue
        if location.relative is not None and exists(location.path) and str(tail) != os.fspath(path):
            return str(tail)
    return None
