"""Results store: jobs, shards, results and row errors in SQL (SQLite or PostgreSQL)."""

from ml_framework.store.api import (
    JobStatus,
    NewJob,
    ResultStore,
    RowError,
    ShardClaim,
    ShardOutcomeRecord,
    WorkerInfo,
    results_frame,
)
from ml_framework.store.lifecycle import PruneReport, StoreStats
from ml_framework.store.schema import JobState, ShardState

__all__ = ["JobState", "JobStatus", "NewJob", "PruneReport", "ResultStore", "RowError", "ShardClaim", "ShardOutcomeRecord", "ShardState", "StoreStats", "WorkerInfo", "results_frame"]
