"""The producer side imports no ML framework and no worker code."""

from __future__ import annotations

import subprocess
import sys


def test_producer_imports_no_framework_or_worker():
    """Importing the client and CLI pulls in neither torch, tensorflow, sklearn, ONNX (Runtime) nor worker."""
    code = (
        "import sys, producer, producer.cli, producer.client, ml_framework.celery_app, ml_framework.store\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'tensorflow', 'keras', 'sklearn', 'skops', 'onnx', 'onnxruntime', 'skl2onnx', 'worker'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
