"""A handle on one scoring job (:class:`Job`): its status, waiting for it with warnings
that say why it waits, its results, cancelling and deleting it. Made by
:class:`producer.client.Client`, whose results store and broker it reads through."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ml_framework.errors import JobTimeoutError
from ml_framework.store import JobState, JobStatus, PruneReport
from producer.results import job_results, write_results

if TYPE_CHECKING:
    from producer.client import Client

__all__ = ["Job"]

POLL_START_S = 0.01
POLL_MAX_S = 0.05
"""``Job.wait`` polls the store from every 10 ms, backing off to every 50 ms, so that it
returns within 100 ms of the job finishing (one primary-key read per poll: on PostgreSQL
about 0.2 ms of server time, 20 a second per waiting caller)."""
NO_WORKER_WARNING_S = 5.0

log = logging.getLogger("producer.client")


class Job:
    """Handle on one scoring job; every method reads the results store.

    Attributes:
        id: the job id (32 hex characters).
        replayed: ``True`` when a submission with an idempotency key found this job,
            submitted before with that key, instead of submitting a new one.
    """

    def __init__(self, client: Client, job_id: str, *, replayed: bool = False, answer: Future | None = None) -> None:
        self.client = client
        self.id = job_id
        self.replayed = replayed
        self._answer = answer  # the online answer's future, for an online request this client sent

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """Current state and counters. Raises ``JobNotFoundError``."""
        return self.client.store.job(self.id)

    def wait(self, timeout_s: float | None = None, progress: bool = False, *,
             poll_start_s: float = POLL_START_S, poll_max_s: float = POLL_MAX_S, warned: str | None = None,
             on_warning: Callable[[str], object] | None = None) -> JobStatus:
        """Block until the job is finished (any terminal state).

        Polls the store with backoff (x1.5 per poll) from ``poll_start_s`` to ``poll_max_s``
        (by default 10 ms to 50 ms: the call returns within 100 ms of the job finishing).
        Warns once when the job is still PENDING after 5 s and no worker heartbeat is live,
        or the live workers listen on another broker (see :meth:`Client.worker_warning`),
        or none of them consumes the job's queue.

        Args:
            timeout_s: give up after this many seconds (``None``: wait forever).
            progress: show a progress bar of rows done on the terminal.
            poll_start_s / poll_max_s: first and longest pause between polls, seconds.
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
        delay = poll_start_s
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
                        from producer.queues import job_queue_warning

                        queue_checked = True  # asked once: the workers take up to a second to say what they consume
                        reason = job_queue_warning(self.client, self.id, prefix=False)
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
        return job_results(self.client.store, self.id)

    def cancel(self) -> JobStatus:
        """Cancel the job: no further shard starts; recorded results stay."""
        return self.client.store.cancel(self.id)

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
        return write_results(self.client.store.results_table(self.id), Path(path))


class _ProgressBar:
    def __init__(self, job: Job) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        # No markup: the progress line prints what it is given as plain text.
        self.progress = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("rows", markup=False), TimeElapsedColumn(),
                                 TextColumn("{task.fields[state]}", markup=False))
        self.task = self.progress.add_task(f"job {job.id}", total=None, state="")
        self.progress.start()

    def update(self, status: JobStatus) -> None:
        self.progress.update(self.task, total=status.n_rows, completed=status.rows_done,
                             state=status.state.value)

    def close(self) -> None:
        self.progress.stop()
