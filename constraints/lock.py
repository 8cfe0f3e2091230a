"""Regenerate the production lock and the frameworks' metadata kept beside it.

    .venv/bin/python constraints/lock.py            # needs the package registry (PyPI), ~1 min

1. Resolves what ``Dockerfile.prod`` installs, ``'.[prod]'``, with ``pip install --dry-run
   --ignore-installed --report`` (pip fetches only the wheels' metadata, PEP 658), for
   this interpreter (CPython 3.11 on Linux x86_64, as in the image).
2. Writes ``constraints/prod.txt``: ``name==version`` of every package but ml-framework.
3. Writes ``constraints/metadata/<name>.json`` for tensorflow, torch and cuda-toolkit
   (through whose extras torch asks for its CUDA libraries): the core metadata
   (name, version, ``Requires-Dist``, ``Provides-Extra``) of the wheels resolved, as pip
   read it from the registry. ``tests/unit/test_packaging.py`` checks offline that the lock
   pins every CUDA library these ask for (TensorFlow's ``and-cuda`` extra, torch's
   Linux requirements) and that the copies are of the pinned versions; its registry test
   checks the copies against the registry.

Pass ``--upgrade`` to resolve the newest versions instead of keeping the current pins.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCK = HERE / "prod.txt"
METADATA_DIR = HERE / "metadata"
FRAMEWORKS = ("tensorflow", "torch", "cuda-toolkit")  # cuda-toolkit: torch asks for its CUDA libraries through it
HEADER = """\
# Lock of the production image's Python packages: Dockerfile.prod installs exactly these
# (pip install --no-deps -r constraints/prod.txt), then ml-framework itself. Regenerate
# after changing dependencies, with the registry reachable:
#   .venv/bin/python constraints/lock.py [--upgrade]
# which also refreshes constraints/metadata/ (the core metadata of tensorflow and torch).
# tests/unit/test_packaging.py checks that it resolves against the registry and holds every
# CUDA library TensorFlow's and-cuda extra and torch require.
"""


def resolve(upgrade: bool) -> list[dict]:
    """pip's installation report for ``'.[prod]'`` (the ``install`` list)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                "--disable-pip-version-check", "--report", str(report), ".[prod]"]
        if not upgrade and LOCK.exists():
            argv[-1:-1] = ["-c", str(LOCK)]
        subprocess.run(argv, cwd=REPO, check=True)
        return json.loads(report.read_text())["install"]


def main() -> None:
    """Write the lock and the metadata copies (see the module docstring)."""
    installs = resolve("--upgrade" in sys.argv[1:])
    pins = sorted(((i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in installs
                   if i["metadata"]["name"].lower() != "ml-framework"), key=lambda p: p[0].lower())
    LOCK.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in pins))
    METADATA_DIR.mkdir(exist_ok=True)
    for install in installs:
        meta = install["metadata"]
        if meta["name"].lower() in FRAMEWORKS:
            kept = {k: meta.get(k, []) for k in ("name", "version", "requires_dist", "provides_extra")}
            kept["wheel"] = install["download_info"]["url"].rsplit("/", 1)[-1]
            (METADATA_DIR / f"{meta['name'].lower()}.json").write_text(json.dumps(kept, indent=2) + "\n")
    print(f"wrote {LOCK.relative_to(REPO)} ({len(pins)} packages) and {METADATA_DIR.relative_to(REPO)}/")


if __name__ == "__main__":
    main()
