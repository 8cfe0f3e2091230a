"""Writing a job's results to Parquet or CSV."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

SUFFIXES = (".parquet", ".pq", ".csv")


def check_output_path(path: Path) -> None:
    """Refuse, before any work, a destination results cannot be written to.

    Creates missing parent directories and a throw-away file beside ``path`` to prove
    the directory is writable.

    Raises:
        ValueError: another suffix than ``.parquet`` / ``.pq`` / ``.csv``, a directory,
            or a place that cannot be written.
    """
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: results can be written as .parquet or .csv")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise ValueError(f"{path}: cannot write there: {exc.strerror or exc}") from None


def write_results(frame: pd.DataFrame, path: Path) -> Path:
    """Write a results frame to Parquet or CSV, chosen by suffix (list values as JSON in CSV).

    Raises:
        ValueError: see :func:`check_output_path`.
    """
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        flat = frame.copy()
        for col in flat.columns:
            if flat[col].map(lambda v: isinstance(v, list)).any():
                flat[col] = flat[col].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
        flat.to_csv(path)
    else:
        frame.to_parquet(path)
    return path
