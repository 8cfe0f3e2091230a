"""Results store: jobs, shards, results and row errors in SQL (SQLite or PostgreSQL)."""

from ml_framework.store.api import (
    JobStatus,
    ResultStore,
    RowError,
    ShardClaim,
    ShardOutcomeRecord,
    WorkerInfo,
)
from ml_framework.store.schema import JobState, ShardState

__all__ = ["JobState", "JobStatus", "ResultStore", "RowError", "ShardClaim", "ShardOutcomeRecord", "ShardState", "WorkerInfo"]
