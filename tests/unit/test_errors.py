"""One error tree: every exception class of the project is in ``ml_framework/errors.py``
under ``MLFrameworkError``, too-large messages and bad job options raise their own classes,
and the HTTP API answers a message too large with 413. The app runs in process on the
embedded broker with no worker."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from ml_framework import errors
from ml_framework.celery_app import check_priority
from ml_framework.constants import MAX_INT32
from ml_framework.errors import DatasetError, JobOptionError, MessageTooLargeError, MLFrameworkError
from ml_framework.settings import load_settings
from producer.api import create_app
from producer.api.errors import public_error
from producer.client import Client
from tests.unit.conftest import model_root

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ml_framework", "producer", "worker")
KEY = "alice-key-0123456789abcdef"


def _exception_classes_outside_errors_py() -> list[str]:
    """``path:line class`` of each class defined in the packages, outside errors.py, whose
    base is named like an exception (``...Error``, ``...Exception``, ``...Failed``)."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "ml_framework" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ClassDef):
                    continue
                names = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                         for b in node.bases]
                if any(n.endswith(("Error", "Exception", "Failed")) for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return found


def _error_classes() -> list[type[BaseException]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__ == errors.__name__]


def test_every_exception_class_is_defined_in_errors_py():
    """No module of ml_framework, producer or worker defines an exception class of its own."""
    assert _exception_classes_outside_errors_py() == []


def test_every_error_is_under_the_root_and_named_in_the_tree():
    """Each class of errors.py derives from MLFrameworkError and appears in the module's
    hierarchy drawing."""
    classes = _error_classes()
    assert len(classes) > 25
    for cls in classes:
        assert issubclass(cls, MLFrameworkError), cls
        assert f" {cls.__name__} " in errors.__doc__ or f" {cls.__name__}\n" in errors.__doc__, cls


def test_message_too_large_is_its_own_class_and_a_bad_option_is_also_a_value_error():
    """MessageTooLargeError is not a DatasetError (rows given in memory are no dataset);
    JobOptionError stays a ValueError for callers that catch that."""
    assert not issubclass(MessageTooLargeError, DatasetError)
    assert issubclass(JobOptionError, ValueError) and issubclass(JobOptionError, MLFrameworkError)
    assert public_error(MessageTooLargeError("shard 0 is too large"), [])[0] == 413


@pytest.mark.parametrize("priority", [-1, 10, 1.5, "9"])
def test_a_priority_out_of_range_raises_job_option_error(priority):
    """check_priority refuses anything but an integer 0-9 with JobOptionError naming the range."""
    with pytest.raises(JobOptionError, match="priority must be an integer from 0 to 9"):
        check_priority(priority)


@pytest.fixture()
def root(tmp_path) -> Path:
    """One model's manifest (nothing is loaded: no worker), a data directory and var/."""
    return model_root(tmp_path)


def settings(root: Path, **extra):
    return load_settings(models_dir=root / "models", data_dir=root / "data", var_dir=root / "var",
                         bulk_queue="mlf.err.bulk", online_queue="mlf.err.online", **extra)


@pytest.mark.parametrize("batch_size", [0, -3, MAX_INT32 + 1])
def test_a_batch_size_out_of_range_raises_job_option_error(root, batch_size):
    """score_rows with a batch size outside 1..2**31-1 raises JobOptionError; nothing is recorded."""
    with Client(settings(root)) as client:
        with pytest.raises(JobOptionError, match=f"batch_size must be between 1 and {MAX_INT32}, got {batch_size}"):
            client.score_rows(pd.DataFrame({"a": [1.0], "b": [2.0]}), "m", batch_size=batch_size)
        assert sum(client.store.job_counts().values()) == 0


def test_rows_in_memory_over_max_message_bytes_raise_message_too_large(root):
    """score_rows whose one shard is over max_message_bytes raises MessageTooLargeError,
    not DatasetError: the rows were given in memory."""
    rows = pd.DataFrame({"a": ["0" * 5000] * 4, "b": ["1"] * 4})
    with Client(settings(root, max_message_bytes=4096)) as client:
        with pytest.raises(MessageTooLargeError, match=r"^shard 0 \(rows 0-4 of <4 inline rows>\) is too large"):
            client.score_rows(rows, "m")
        assert sum(client.store.job_counts().values()) == 0


@pytest.mark.parametrize(("path", "body"), [("/v1/jobs", {"model": "m"}), ("/v1/models/m/predict", {})])
def test_the_api_answers_413_for_posted_rows_over_max_message_bytes(root, path, body):
    """A POST of rows (a bulk job, an online request) within api_max_request_bytes whose
    message would be over max_message_bytes is answered 413 MessageTooLargeError (was 422
    DatasetError); nothing is recorded."""
    body = {**body, "rows": [{"a": "0" * 5000, "b": "1"} for _ in range(4)]}
    app = create_app(settings(root, api_keys={"alice": KEY}, max_message_bytes=4096))
    with TestClient(app) as http:
        r = http.post(path, json=body, headers={"X-API-Key": KEY})
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["type"] == "MessageTooLargeError" and "max_message_bytes" in error["message"]
        assert sum(app.state.client.store.job_counts().values()) == 0
