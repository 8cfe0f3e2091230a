"""The results store on PostgreSQL: the store tests of ``tests/unit/test_store.py``, run
again here over this directory's ``db_kind`` (see :func:`tests.conftest.database_tests`),
and the migration lock, which needs a server."""

from __future__ import annotations

import subprocess
import sys

import psycopg

from tests.conftest import PG_ADMIN_URL, database_tests
from tests.unit import test_store
from tests.unit.test_store import store  # noqa: F401 - the fixture, over this directory's db_kind

globals().update(database_tests(test_store))


def test_concurrent_first_open_migrates_once(tmp_path, pg_database):
    """Several processes opening a fresh store at once all succeed (migration lock)."""
    for url in (f"sqlite:///{tmp_path / 'fresh.sqlite'}", pg_database.replace("/mlf_test_", "/mlf_test_m")):
        if url.startswith("postgresql"):
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{url.rsplit("/", 1)[1]}"')
        code = "import sys; from ml_framework.store import ResultStore; ResultStore(sys.argv[1]); print('ok')"
        procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
        if url.startswith("postgresql"):
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
