"""The results cache of the HTTP API (``cache_backend: redis``).

A job that ended SUCCEEDED, PARTIAL or FAILED never changes again, so its rendered results
(a JSON page, or the CSV / Parquet download) can be kept and served again without reading
the results database. CANCELLED jobs are not cached: shards that were running when the job
was cancelled may still record rows. Every key expires after ``cache_ttl_s`` seconds.
A Redis that cannot be reached is logged and bypassed: the results are read from the store
as without a cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from ml_framework.settings import Settings
from ml_framework.store import JobState

log = logging.getLogger(__name__)

IMMUTABLE = (JobState.SUCCEEDED, JobState.PARTIAL, JobState.FAILED)
KEY_PREFIX = "mlf:results:"


class ResultsCache:
    """Rendered results of finished jobs in Redis, or nothing (``cache_backend: none``).

    Args:
        settings: ``cache_backend``, ``cache_url`` and ``cache_ttl_s``.
    """

    def __init__(self, settings: Settings) -> None:
        self.ttl_s = settings.cache_ttl_s
        self._redis = None
        if settings.cache_backend == "redis":
            import redis

            self._redis = redis.Redis.from_url(settings.cache_url, socket_timeout=2, socket_connect_timeout=2)

    @staticmethod
    def key(job_id: str, *parts: object) -> str:
        """The cache key of one rendering of a job's results, e.g. ``mlf:results:<id>:csv``."""
        return KEY_PREFIX + ":".join([job_id, *map(str, parts)])

    def caches(self, state: JobState) -> bool:
        """Whether results of a job in ``state`` are cached (a cache is configured and the
        job is finished for good, see :data:`IMMUTABLE`)."""
        return self._redis is not None and state in IMMUTABLE

    def get_or_compute_json(self, key: str, state: JobState, compute: Callable[[], Any]) -> Any:
        """:meth:`get_or_render` for a JSON-serialisable value; without caching,
        ``compute()`` is returned as it is, with no encoding round trip."""
        if not self.caches(state):
            return compute()
        return json.loads(self.get_or_render(key, state, lambda: json.dumps(compute()).encode()))

    def get_or_render(self, key: str, state: JobState, render: Callable[[], bytes]) -> bytes:
        """The cached bytes of ``key``, or ``render()`` (then cached when the job is
        finished for good, see :data:`IMMUTABLE`)."""
        if not self.caches(state):
            return render()
        try:
            cached = self._redis.get(key)
        except Exception as exc:  # noqa: BLE001 - the store still answers
            log.warning("results cache unreachable (%s); reading the results store", exc)
            return render()
        if cached is not None:
            return cached
        body = render()
        try:
            self._redis.set(key, body, ex=self.ttl_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not cache results %s: %s", key, exc)
        return body

    def forget(self, job_ids: list[str]) -> int:
        """Drop every cached rendering of the results of ``job_ids`` (deleted jobs); an
        unreachable Redis is logged (the keys expire after ``cache_ttl_s`` anyway, and a
        deleted job is answered 404 before the cache is read).

        Returns:
            The number of keys dropped.
        """
        if self._redis is None:
            return 0
        dropped = 0
        try:
            for job_id in job_ids:
                keys = list(self._redis.scan_iter(match=self.key(job_id, "*"), count=500))
                if keys:
                    dropped += self._redis.delete(*keys)
        except Exception as exc:  # noqa: BLE001 - deleting the job itself succeeded
            log.warning("could not drop cached results of deleted job(s) %s: %s", ", ".join(job_ids[:5]), exc)
        return dropped

    def close(self) -> None:
        """Release the Redis connection."""
        if self._redis is not None:
            self._redis.close()
