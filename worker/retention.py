"""The periodic pruning pass ``mlf worker`` runs (every ``prune_interval_s``): deletes the
finished jobs past ``results_retention``, dead workers' heartbeats and old tombstones, one
host at a time, then gives the space back (see :mod:`ml_framework.store.lifecycle`).

Cached renderings of deleted jobs' results in the API's Redis cache are not reached from
here: the API answers 404 for a deleted job before it looks at the cache, and those keys
expire after ``cache_ttl_s``.
"""

from __future__ import annotations

import logging

from ml_framework.settings import Settings
from ml_framework.store import PruneReport, ResultStore
from ml_framework.store.lifecycle import prune_pass

log = logging.getLogger(__name__)


def prune_expired(settings: Settings, store: ResultStore) -> PruneReport:
    """One pruning pass under the prune lock (skipped when another host holds it).

    Returns:
        What was deleted.

    Raises:
        SQLAlchemy errors when the store cannot be reached (the launcher logs them).
    """
    report = prune_pass(store, **settings.retention_s)
    if report.skipped:
        log.debug("another process holds the prune lock; skipping this pass")
    elif report.jobs or report.workers or report.tombstones:
        log.info("pruned %d expired job(s) (%d shard blobs, %d row errors, %.1f MB of results), %d dead worker "
                 "heartbeat(s), %d tombstone(s)", len(report.jobs), report.shard_outputs, report.row_errors,
                 report.result_bytes / 1e6, len(report.workers), report.tombstones)
    return report
