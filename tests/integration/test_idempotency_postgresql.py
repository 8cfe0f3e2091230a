"""Idempotency keys on PostgreSQL: the tests of ``tests/unit/test_idempotency.py`` that
take a store, run again here over this directory's ``db_kind`` (see
:func:`tests.conftest.database_tests`)."""

from __future__ import annotations

from tests.conftest import database_tests
from tests.unit import test_idempotency
from tests.unit.test_idempotency import store  # noqa: F401 - the fixture, over this directory's db_kind

globals().update(database_tests(test_idempotency))
