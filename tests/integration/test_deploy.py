"""deploy.sh: pull, stop, retag, start, health-check, roll back. There is no Docker engine
here, so `docker` is a stand-in script that records each call and keeps image tags in a
file; the health check is a real HTTP server on loopback answering 200 or 503. (The
release workflow's tests are in tests/unit/test_release_workflow.py.)"""

from __future__ import annotations

import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/team/ml-framework"

FAKE_DOCKER = r"""#!/usr/bin/env bash
# Records the call; keeps tags in $FAKE_DOCKER_TAGS (one image:tag per line).
echo "$*" >> "$FAKE_DOCKER_LOG"
tags="$FAKE_DOCKER_TAGS"
case "$1 $2" in
  "image inspect") grep -qxF "$3" "$tags" ;;
  "pull "*) echo "$2" >> "$tags" ;;
  "tag "*) grep -qxF "$2" "$tags" && echo "$3" >> "$tags" ;;
  *) exit 0 ;;
esac
"""


@pytest.fixture
def health():
    """A /health endpoint whose status the test sets."""
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(state["status"])
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/health"
    yield state
    server.shutdown()


def deploy(tmp_path: Path, health: dict, tag: str, existing: list[str]) -> tuple[int, list[str], list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    (tmp_path / "tags").write_text("".join(f"{t}\n" for t in existing))
    (tmp_path / "calls").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DOCKER_LOG": str(tmp_path / "calls"),
           "FAKE_DOCKER_TAGS": str(tmp_path / "tags"), "REGISTRY": "registry.example.com/team",
           "HEALTH_URL": health["url"], "RETRIES": "3", "DELAY": "0"}
    run = subprocess.run(["bash", str(REPO / "deploy.sh"), tag], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    return (run.returncode, (tmp_path / "calls").read_text().splitlines(),
            (tmp_path / "tags").read_text().splitlines(), run.stdout + run.stderr)


def test_a_healthy_release_replaces_the_running_one(tmp_path, health):
    code, calls, tags, out = deploy(tmp_path, health, "v1.2.0", existing=[f"{IMAGE}:current"])
    assert code == 0, out
    assert calls == [
        f"pull {IMAGE}:v1.2.0",
        f"image inspect {IMAGE}:current",
        f"tag {IMAGE}:current {IMAGE}:previous",
        "compose -f docker-compose.prod.yml --env-file .env.prod stop ml-api worker flower",
        f"tag {IMAGE}:v1.2.0 {IMAGE}:current",
        "compose -f docker-compose.prod.yml --env-file .env.prod up -d --no-build",
    ]
    assert "healthy after 1 check(s)" in out and f"{IMAGE}:previous" in tags


def test_an_unhealthy_release_is_rolled_back(tmp_path, health):
    health["status"] = 503
    code, calls, _tags, out = deploy(tmp_path, health, "v1.3.0", existing=[f"{IMAGE}:current"])
    assert code == 1
    assert out.count("health check") >= 3 and "rolling back" in out
    assert calls[-2:] == [
        f"tag {IMAGE}:previous {IMAGE}:current",
        "compose -f docker-compose.prod.yml --env-file .env.prod up -d --no-build --force-recreate ml-api worker flower",
    ]


def test_a_first_unhealthy_release_has_nothing_to_roll_back_to(tmp_path, health):
    health["status"] = 503
    code, calls, _tags, out = deploy(tmp_path, health, "v1.0.0", existing=[])
    assert code == 1 and "no previous image" in out
    assert not any(c.startswith(f"tag {IMAGE}:previous") for c in calls)


def test_the_tag_is_required(tmp_path, health):
    code, calls, _tags, out = deploy(tmp_path, health, "", existing=[])
    assert code != 0 and calls == [] and "usage: deploy.sh TAG" in out
