"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["postgresql"])
def db_kind(request) -> str:
    """The results store of the database tests written in ``tests/unit`` and collected
    again here: PostgreSQL (see :func:`tests.conftest.database_tests`)."""
    return request.param
