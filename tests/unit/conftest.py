"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    """No ML_FRAMEWORK_* variables, and a working directory without configs/."""
    for name in list(os.environ):
        if name.startswith("ML_FRAMEWORK_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def model_root(root: Path, name: str = "m") -> Path:
    """``root`` with ``models/<name>/1/manifest.yaml`` of an sklearn regression on columns
    ``a`` and ``b`` (a manifest only: nothing can be loaded, which tests without workers
    never need), and a ``data/`` directory; returns ``root``."""
    version = root / "models" / name / "1"
    version.mkdir(parents=True)
    (version / "manifest.yaml").write_text(yaml.safe_dump({
        "name": name, "version": 1, "framework": "sklearn", "artifact": "model.skops",
        "inputs": {"columns": ["a", "b"]}, "outputs": {"kind": "regression"}}))
    (root / "data").mkdir(exist_ok=True)
    return root
