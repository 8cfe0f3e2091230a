"""The release workflow (.github/workflows/production-build.yml) that builds, scans and
pushes the image. (deploy.sh runs a script with a stand-in docker: tests/integration/test_deploy.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "production-build.yml"


def test_the_release_workflow_validates_against_githubs_schema():
    binary = Path(sys.executable).with_name("check-jsonschema")
    run = subprocess.run([str(binary), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_release_workflow_pushes_only_the_image_it_scanned():
    """Build without pushing; Trivy fails the job on a HIGH or CRITICAL finding before any
    registry login; an SBOM is written and kept; the push tags and pushes the scanned image
    (no second build)."""
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["build"]["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    build = steps[uses.index("docker/build-push-action")]["with"]
    assert build["push"] is False and build["load"] is True and build["tags"] == "${{ env.LOCAL_IMAGE }}"
    scans = [i for i, u in enumerate(uses) if u == "aquasecurity/trivy-action"]
    gate = steps[scans[0]]["with"]
    assert gate["exit-code"] == "1" and gate["severity"] == "CRITICAL,HIGH" and gate["image-ref"] == "${{ env.LOCAL_IMAGE }}"
    sbom = steps[scans[1]]["with"]
    assert sbom["format"] == "cyclonedx" and steps[uses.index("actions/upload-artifact")]["with"]["path"] == sbom["output"]
    login = uses.index("docker/login-action")
    push = next(i for i, s in enumerate(steps) if "docker push" in s.get("run", ""))
    assert scans[0] < login < push and uses.count("docker/build-push-action") == 1
    assert 'docker tag "$LOCAL_IMAGE" "$IMAGE"' in steps[push]["run"]
