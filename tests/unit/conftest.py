"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    """No ML_FRAMEWORK_* variables, and a working directory without configs/."""
    for name in list(os.environ):
        if name.startswith("ML_FRAMEWORK_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
