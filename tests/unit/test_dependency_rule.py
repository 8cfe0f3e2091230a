"""The producer side imports no ML framework and no worker code; the store imports no pandas."""

from __future__ import annotations

import subprocess
import sys


def _fresh_python(code: str) -> str:
    """What ``code`` prints when run by a new interpreter (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_producer_imports_no_framework_or_worker():
    """Importing the client and CLI pulls in neither torch, tensorflow, sklearn, ONNX (Runtime) nor worker."""
    code = (
        "import sys, producer, producer.cli, producer.client, ml_framework.celery_app, ml_framework.store\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'tensorflow', 'keras', 'sklearn', 'skops', 'onnx', 'onnxruntime', 'skl2onnx', 'worker'})\n"
        "print(','.join(bad))\n"
    )
    assert _fresh_python(code) == ""


def test_the_store_returns_arrow_and_imports_no_pandas():
    """Importing the results store (every module of it) pulls in no pandas: the DataFrame
    view of results is the producer's (producer/results.py)."""
    code = (
        "import sys, pkgutil, importlib, ml_framework.store\n"
        "for m in pkgutil.iter_modules(ml_framework.store.__path__):\n"
        "    if m.name != 'migrations':\n"
        "        importlib.import_module('ml_framework.store.' + m.name)\n"
        "print('pandas' in sys.modules)\n"
    )
    assert _fresh_python(code) == "False"
