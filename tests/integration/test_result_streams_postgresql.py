"""Results read page by page and streamed (Arrow IPC, NDJSON) on PostgreSQL: the tests of
``tests/unit/test_result_streams.py`` that take a store, run again over this directory's
``db_kind`` (see :func:`tests.conftest.database_tests`)."""

from __future__ import annotations

from tests.conftest import database_tests
from tests.unit import test_result_streams
from tests.unit.test_result_streams import store  # noqa: F401 - the fixture, over this directory's db_kind

globals().update(database_tests(test_result_streams))
