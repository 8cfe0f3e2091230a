"""Durations, times and rates as ``mlf``, the job pages and the demo print them.

A tiny job finishes in milliseconds: ``0.0 s`` beside ``661 rows/s`` reads as a rate
computed from nothing. Durations under a second are given in milliseconds, and a
rate is only given over a time long enough to mean something (:data:`MIN_RATE_S`), and
a job's rate only once it scored a row: ``0 rows/s`` while nothing is done yet, or
``800 rows/s`` of rows that all failed, reads as a throughput the job never had.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml_framework.store import JobStatus

MIN_RATE_S = 0.1
"""Shortest elapsed time, seconds, over which a rows/s rate is given: below it the time is
mostly the store's and the poll's, not the scoring's."""


def duration(seconds: float | None) -> str:
    """``40 ms``, ``2.3 s``, ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``; ``-`` for ``None``.

    Args:
        seconds: a duration in seconds (negative values count as 0).
    """
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def rows_per_s(rows: int, seconds: float | None) -> float | None:
    """``rows / seconds``, or ``None`` when ``seconds`` is unknown or shorter than
    :data:`MIN_RATE_S` (such a rate is noise)."""
    if seconds is None or seconds < MIN_RATE_S:
        return None
    return rows / seconds


def job_rows_per_s(status: JobStatus) -> float | None:
    """A job's rate: rows recorded (ok or failed) per second since its first shard started,
    as ``mlf status``, the job pages and the demo print it.

    Returns:
        :func:`rows_per_s` of ``status.rows_done`` over ``status.elapsed_s``; ``None``
        while no row was scored ok (nothing done yet, or every row failed: no throughput
        to speak of) or the time is too short to mean a rate.
    """
    if status.rows_ok == 0:
        return None
    return rows_per_s(status.rows_done, status.elapsed_s)


def when(moment: datetime | None) -> str:
    """A time as ``2026-12-01 09:30:05 UTC``; ``-`` for ``None``."""
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


__all__ = ["MIN_RATE_S", "duration", "job_rows_per_s", "rows_per_s", "when"]
