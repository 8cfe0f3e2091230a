"""Results store: jobs, shards, results and row errors in SQL (SQLite or PostgreSQL).

A package of concepts (see docs/architecture.md): :mod:`.models` (tables and states),
:mod:`.jobs`, :mod:`.shards` (the shard ledger), :mod:`.fleet` (worker heartbeats),
:mod:`.outputs` (results as Arrow), :mod:`.lifecycle` (deletion, retention, size) and
:mod:`.idempotency`, behind the facade :class:`ResultStore`.
"""

from ml_framework.store.fleet import WorkerInfo
from ml_framework.store.jobs import JobStatus, NewJob
from ml_framework.store.lifecycle import PruneReport, StoreStats
from ml_framework.store.models import JobState, ShardClaim, ShardState
from ml_framework.store.outputs import RowError
from ml_framework.store.result_store import ResultStore
from ml_framework.store.shards import ShardOutcomeRecord

__all__ = ["JobState", "JobStatus", "NewJob", "PruneReport", "ResultStore", "RowError", "ShardClaim",
           "ShardOutcomeRecord", "ShardState", "StoreStats", "WorkerInfo"]
