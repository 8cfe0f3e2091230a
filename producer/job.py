"""A handle on one scoring job (:class:`Job`): its status, waiting for it with warnings
that say why it waits, its results, cancelling and deleting it. Made by a client, direct
(:class:`producer.client.Client`: the results store and the broker) or over HTTP
(:class:`producer.http_client.HttpClient`), through whose small :class:`JobClient`
protocol it reads."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa

from ml_framework.errors import JobTimeoutError
from ml_framework.store import JobState, JobStatus, PruneReport
from producer.results import write_results

__all__ = ["Job", "JobClient"]

POLL_START_S = 0.01
POLL_MAX_S = 0.05
"""``Job.wait`` polls the store from every 10 ms, backing off to every 50 ms, so that it
returns within 100 ms of the job finishing (one primary-key read per poll: on PostgreSQL
about 0.2 ms of server time, 20 a second per waiting caller)."""
NO_WORKER_WARNING_S = 5.0

log = logging.getLogger("producer.client")


class JobClient(Protocol):
    """What a :class:`Job` asks of the client that made it; the direct client and the
    HTTP client both provide it, so that ``Job`` has one code path.

    Attributes:
        poll_s: ``(first, longest)`` pause between two status reads of :meth:`Job.wait`,
            seconds.
    """

    poll_s: tuple[float, float]

    def _job_status(self, job_id: str) -> JobStatus:
        """The job's state and counters. Raises ``JobNotFoundError``."""

    def _cancel_job(self, job_id: str) -> JobStatus:
        """Cancel the job; its status after. Raises ``JobNotFoundError``."""

    def _results_table(self, job_id: str) -> pa.Table:
        """``ResultStore.results_table`` of the job. Raises ``JobNotFoundError``."""

    def _results_frame(self, job_id: str) -> pd.DataFrame:
        """:func:`producer.results.job_results` of the job. Raises ``JobNotFoundError``."""

    def _queue_warning(self, job_id: str) -> str | None:
        """Why the PENDING job waits when live workers consume no queue of it, else ``None``."""

    def worker_warning(self) -> str | None:
        """Why a job sent now may wait (no live worker...), or ``None``."""

    def delete_jobs(self, job_ids: Sequence[str]) -> dict[str, PruneReport | None]:
        """Delete jobs by full id."""

    def answer(self, job: Job, timeout_s: float) -> Job:
        """Wait for an online request."""


class Job:
    """Handle on one scoring job; every method reads through the client that made it
    (the results store, or the HTTP API).

    Attributes:
        id: the job id (32 hex characters).
        replayed: ``True`` when a submission with an idempotency key found this job,
            submitted before with that key, instead of submitting a new one.
    """

    def __init__(self, client: JobClient, job_id: str, *, replayed: bool = False, answer: Future | None = None) -> None:
        self.client = client
        self.id = job_id
        self.replayed = replayed
        self._answer = answer  # the online answer's future, for an online request this client sent

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """Current state and counters. Raises ``JobNotFoundError``."""
        return self.client._job_status(self.id)

    def wait(self, timeout_s: float | None = None, progress: bool = False, *,
             poll_start_s: float | None = None, poll_max_s: float | None = None, warned: str | None = None,
             on_warning: Callable[[str], object] | None = None) -> JobStatus:
        """Block until the job is finished (any terminal state).

        Polls the job's status with backoff (x1.5 per poll) from ``poll_start_s`` to
        ``poll_max_s`` (by default the client's ``poll_s``: 10 ms to 50 ms from the store, so
        the call returns within 100 ms of the job finishing; over HTTP see
        :data:`producer.http_client.POLL_S`).
        Warns once when the job is still PENDING after 5 s and no worker heartbeat is live,
        or the live workers listen on another broker (see :meth:`Client.worker_warning`),
        or none of them consumes the job's queue.

        Args:
            timeout_s: give up after this many seconds (``None``: wait forever).
            progress: show a progress bar of rows done on the terminal.
            poll_start_s / poll_max_s: first and longest pause between polls, seconds
                (default: the client's ``poll_s``).
            warned: why the job may wait, as the caller has already told the user (``mlf
                score`` warns at submit): not said again, and a timeout refers to it.
            on_warning: called with each warning's text; default: logged at WARNING on
                this module's logger. Each warning is given once.

        Returns:
            The final status.

        Raises:
            JobTimeoutError: the job did not finish within ``timeout_s``; its message says
                why a PENDING job waits, when that is known, consistently with the warning
                given (no worker, workers on another broker, no consumer of its queue).
        """
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        first_s, longest_s = self.client.poll_s
        delay = first_s if poll_start_s is None else poll_start_s
        poll_max_s = longest_s if poll_max_s is None else poll_max_s
        reason = warned  # why the job waits, when known
        told = checked = warned is not None
        queue_checked = False
        say = on_warning or (lambda text: log.warning("%s", text))
        bar = _ProgressBar(self) if progress else None
        try:
            while True:
                status = self.status()
                if bar:
                    bar.update(status)
                if status.state.terminal:
                    return status
                timed_out = deadline is not None and time.monotonic() >= deadline
                if status.state is JobState.PENDING and reason is None and (
                        timed_out or time.monotonic() - started > NO_WORKER_WARNING_S):
                    if not checked:  # no live worker, or live workers on another broker
                        checked = True
                        if warning := self.client.worker_warning():
                            reason = warning
                            queue_checked = True  # no worker here to consume any queue
                    if not queue_checked:  # live workers, but none consumes the job's queue
                        queue_checked = True  # asked once: the workers take up to a second to say what they consume
                        reason = self.client._queue_warning(self.id)
                    if reason is not None and not timed_out:  # at the timeout, the error says it
                        told = True
                        say(f"job {self.id} is still PENDING: {reason}")
                if timed_out:
                    raise JobTimeoutError(self._timeout_message(status, timeout_s, reason, warned=told),
                                          job_id=self.id)
                time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, poll_max_s)
        finally:
            if bar:
                bar.close()

    def _timeout_message(self, status: JobStatus, timeout_s: float | None, reason: str | None, *,
                         warned: bool) -> str:
        """What a timed-out :meth:`wait` says: the known reason a PENDING job waits (by
        reference when a warning gave it already), else what may hold it."""
        head = (f"job {self.id} still {status.state.value} after {timeout_s:g} s "
                f"({status.rows_done}/{status.n_rows} rows)")
        if status.state is not JobState.PENDING:
            return f"{head}: workers are scoring it; wait longer (`mlf status {self.id}`)"
        if reason is not None:
            return f"{head}: no worker took it, as the warning above says" if warned else f"{head}: {reason}"
        return (f"{head}: live workers consume its queue but have not started it (busy with other jobs? "
                "`mlf queues`); a worker loads a model on its first shard for it, which takes seconds "
                "(`mlf worker --preload`)")

    def results(self) -> pd.DataFrame:
        """Outputs and row errors in input row order (see :func:`producer.results.job_results`)."""
        return self.client._results_frame(self.id)

    def cancel(self) -> JobStatus:
        """Cancel the job: no further shard starts; recorded results stay."""
        return self.client._cancel_job(self.id)

    def delete(self) -> PruneReport | None:
        """Delete the job and everything the store holds of it (shards, results, row
        errors, the API's cached renderings, and the Parquet files under its ``output_uri``);
        a PENDING or RUNNING job is cancelled first. Idempotent. Result files written with
        :meth:`save_results` are the caller's: the store does not know them, and they stay.

        Returns:
            The rows, bytes and files deleted; ``None`` when the job was already deleted.

        Raises:
            ObjectStoreError: the job's Parquet files could not be deleted; the job is kept.
        """
        return self.client.delete_jobs([self.id])[self.id]

    def save_results(self, path: Path | str) -> Path:
        """Write the results (as :meth:`results`, ``row`` as the first column) to
        ``.parquet`` or ``.csv`` (list values as JSON in CSV), straight from Arrow."""
        return write_results(self.client._results_table(self.id), Path(path))


class _ProgressBar:
    """Rows done of a job on the terminal, with the job's own elapsed time: from its first
    shard's start (``queued`` before it), not from the bar's, so a job that ran while the
    caller waited on another shows the time it took."""

    def __init__(self, job: Job) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
        )
        from rich.text import Text

        class JobElapsed(ProgressColumn):
            def render(self, task) -> Text:
                elapsed, polled, running = (task.fields.get(k) for k in ("elapsed_s", "polled", "running"))
                if elapsed is None:  # no shard started: waiting, or ended so (cancelled)
                    return Text("queued" if running is not False else "-", style="progress.elapsed")
                if running:  # ticks between polls
                    elapsed += time.monotonic() - polled
                seconds = max(int(elapsed), 0)  # the workers' clocks may run ahead of this host's
                return Text(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.elapsed")

        # No markup: the progress line prints what it is given as plain text.
        self.progress = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("rows", markup=False), JobElapsed(),
                                 TextColumn("{task.fields[state]}", markup=False))
        self.task = self.progress.add_task(f"job {job.id}", total=None, state="", elapsed_s=None)
        self.progress.start()

    def update(self, status: JobStatus) -> None:
        self.progress.update(self.task, total=status.n_rows, completed=status.rows_done,
                             state=status.state.value, elapsed_s=status.elapsed_s, polled=time.monotonic(),
                             running=not status.state.terminal)

    def close(self) -> None:
        self.progress.stop()
