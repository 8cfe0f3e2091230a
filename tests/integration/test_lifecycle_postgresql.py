"""Data lifecycle of the results store on PostgreSQL: the tests of
``tests/unit/test_lifecycle.py`` that take a store, run again here over this directory's
``db_kind`` (see :func:`tests.conftest.database_tests`), and the results cache on Redis."""

from __future__ import annotations

from tests.conftest import database_tests
from tests.unit import test_lifecycle
from tests.unit.test_lifecycle import finished_job, store  # noqa: F401 - store: the fixture, over db_kind

globals().update(database_tests(test_lifecycle))


def test_deleting_forgets_the_cached_renderings_of_the_job(tmp_path):
    """``Client.delete_jobs`` with ``cache_backend: redis`` drops the job's cached results
    (every rendering) and no other job's."""
    import redis

    from ml_framework.settings import load_settings
    from producer.cache import ResultsCache
    from producer.client import Client
    from tests.conftest import REDIS_URL, check_redis

    check_redis()
    settings = load_settings(var_dir=tmp_path / "var", redis_url=REDIS_URL, cache_backend="redis")
    with Client(settings) as client:
        job, other = finished_job(client.store), finished_job(client.store)
        r = redis.Redis.from_url(REDIS_URL)
        keys = [ResultsCache.key(j, *parts) for j in (job, other) for parts in (("csv",), ("json", 0, 100))]
        for key in keys:
            r.set(key, b"x", ex=60)
        client.delete_jobs([job])
        assert [bool(r.exists(k)) for k in keys] == [False, False, True, True]
        r.delete(*keys)
        r.close()
