"""Durations and rates as `mlf status`, the job pages and the demo print them: a tiny job
shows milliseconds and no rate computed from a time rounded to nothing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from ml_framework.store import JobState, JobStatus
from producer.durations import MIN_RATE_S, duration, job_rows_per_s, rows_per_s


def test_durations_keep_their_precision():
    """Under a second: milliseconds; then tenths of seconds, minutes, hours."""
    assert [duration(s) for s in (None, 0.0, 0.0042, 0.04, 0.9994, 0.9996, 2.345, 59.9, 245, 7380)] == [
        "-", "0 ms", "4 ms", "40 ms", "999 ms", "1.0 s", "2.3 s", "59.9 s", "4 min 05 s", "2 h 03 min"]


def test_no_rate_over_a_time_too_short_to_mean_one():
    """661 rows/s from 10 rows in 15 ms is noise: no rate below MIN_RATE_S."""
    assert rows_per_s(10, 0.015) is None and rows_per_s(10, None) is None
    assert rows_per_s(1797, 2.0) == 898.5 and rows_per_s(5, MIN_RATE_S) == 50.0


def test_mlf_status_of_a_tiny_job_prints_milliseconds_and_no_rate(capsys):
    """`elapsed 0.0 s (661 rows/s)` was printed for a 10-row job scored in 15 ms."""
    from producer.cli import print_status

    start = datetime(2026, 12, 1, tzinfo=UTC)
    status = JobStatus(job_id="j", model="m", model_version=1, dataset="d.csv", state=JobState.SUCCEEDED, n_rows=10,
                       n_shards=1, shards_done=1, rows_ok=10, rows_failed=0, batch_size=256, created_at=start,
                       started_at=start, finished_at=start + timedelta(milliseconds=15))
    print_status(status)
    assert "  elapsed  15 ms since its first shard started\n" in capsys.readouterr().out
    print_status(replace(status, finished_at=start + timedelta(seconds=2)))
    assert "  elapsed  2.0 s since its first shard started (5 rows/s)\n" in capsys.readouterr().out


def test_mlf_status_prints_no_rate_before_a_row_is_scored_ok(capsys):
    """`elapsed 2.0 s (5 rows/s)` was printed for a job whose 10 rows all failed, and
    `(0 rows/s)` for one with nothing done yet: no throughput without a row scored ok."""
    from producer.cli import print_status

    start = datetime(2026, 12, 1, tzinfo=UTC)
    failed = JobStatus(job_id="j", model="m", model_version=1, dataset="d.csv", state=JobState.FAILED, n_rows=10,
                       n_shards=1, shards_done=1, rows_ok=0, rows_failed=10, batch_size=256, created_at=start,
                       started_at=start, finished_at=start + timedelta(seconds=2))
    running = replace(failed, state=JobState.RUNNING, shards_done=0, rows_failed=0)
    for status in (failed, running):
        assert job_rows_per_s(status) is None
        print_status(status)
        assert "  elapsed  2.0 s since its first shard started\n" in capsys.readouterr().out
    assert job_rows_per_s(replace(failed, rows_ok=4, rows_failed=6)) == 5.0  # rows recorded, failed ones included


def test_mlf_status_shows_the_time_a_job_waited_in_the_queue(capsys):
    """A job created 9 s before its first shard started showed only `elapsed` (from that
    start): the wait in the queue was nowhere (found by the README walk-through). Now a
    `queued` line gives it; a job no worker has taken yet has none."""
    from producer.cli import print_status

    created = datetime(2026, 12, 1, tzinfo=UTC)
    done = JobStatus(job_id="j", model="m", model_version=1, dataset="d.csv", state=JobState.SUCCEEDED, n_rows=10,
                     n_shards=1, shards_done=1, rows_ok=10, rows_failed=0, batch_size=256, created_at=created,
                     started_at=created + timedelta(seconds=9), finished_at=created + timedelta(seconds=11))
    print_status(done)
    text = capsys.readouterr().out
    assert "  queued   9.0 s before its first shard started\n" in text
    assert "  elapsed  2.0 s since its first shard started (5 rows/s)\n" in text
    print_status(replace(done, state=JobState.PENDING, shards_done=0, rows_ok=0, started_at=None, finished_at=None))
    assert "queued" not in capsys.readouterr().out


def bar_lines(*statuses: JobStatus) -> list[str]:
    """The progress bar of ``Job.wait(progress=True)`` as a terminal shows it after each
    status in turn (one bar for them all, as a wait updates it)."""
    import io
    import types

    from rich.console import Console

    from producer.job import _ProgressBar

    bar = _ProgressBar(types.SimpleNamespace(id="j"))
    try:
        lines = []
        for status in statuses:
            bar.update(status)
            screen = io.StringIO()
            Console(file=screen, width=120).print(bar.progress.get_renderable())
            lines.append(screen.getvalue())
        return lines
    finally:
        bar.close()


def test_the_progress_bar_shows_the_jobs_own_elapsed_time():
    """The demo waits on its jobs one after another; the second had run while it waited on
    the first, and its bar showed `0:00:00` (the bar's own time) for a shard of 8.8 s. The
    bar shows the job's time from its first shard's start, `queued` before it."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    queued = JobStatus(job_id="j", model="m", model_version=1, dataset="d.csv", state=JobState.PENDING, n_rows=10,
                       n_shards=1, shards_done=0, rows_ok=0, rows_failed=0, batch_size=256, created_at=start,
                       started_at=None, finished_at=None)
    done = replace(queued, state=JobState.SUCCEEDED, shards_done=1, rows_ok=10, started_at=start,
                   finished_at=start + timedelta(seconds=8.8))
    lines = bar_lines(queued, done)
    assert "0/10 rows queued PENDING" in lines[0], lines[0]
    assert "10/10 rows 0:00:08 SUCCEEDED" in lines[1], lines[1]


def test_the_progress_bar_never_shows_a_negative_time_nor_queued_for_an_ended_job():
    """A review found `-1:59:59` for a job whose first shard started by a worker's clock 3 s
    ahead of this host's, and `queued` for a job cancelled before any shard started."""
    from ml_framework.store.models import utc_now

    ahead = utc_now() + timedelta(seconds=3)
    running = JobStatus(job_id="j", model="m", model_version=1, dataset="d.csv", state=JobState.RUNNING, n_rows=10,
                        n_shards=1, shards_done=0, rows_ok=0, rows_failed=0, batch_size=256, created_at=ahead,
                        started_at=ahead, finished_at=None)
    backwards = replace(running, state=JobState.SUCCEEDED, rows_ok=10, finished_at=ahead - timedelta(seconds=2))
    cancelled = replace(running, state=JobState.CANCELLED, started_at=None, finished_at=ahead)
    shown = [bar_lines(status)[0] for status in (running, backwards, cancelled)]
    assert "0/10 rows 0:00:00 RUNNING" in shown[0], shown[0]
    assert "10/10 rows 0:00:00 SUCCEEDED" in shown[1], shown[1]
    assert "0/10 rows - CANCELLED" in shown[2], shown[2]


def test_the_demo_says_warm_only_when_rows_were_scored_by_a_loaded_model():
    """The demo's model load column said `warm` for a job whose model failed to load (no
    load time is recorded then): `-` unless a row was scored ok."""
    from demo.cli import model_load

    start = datetime(2026, 1, 1, tzinfo=UTC)
    done = JobStatus(job_id="j", model="m", model_version=1, dataset="d.csv", state=JobState.SUCCEEDED, n_rows=10,
                     n_shards=1, shards_done=1, rows_ok=10, rows_failed=0, batch_size=256, created_at=start,
                     started_at=start, finished_at=start)
    assert [model_load(s) for s in (replace(done, model_load_s=2.84), done,
                                    replace(done, state=JobState.FAILED, rows_ok=0, rows_failed=10))] == [
        "2.8 s", "warm", "-"]
