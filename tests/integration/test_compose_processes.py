"""docker-compose.prod.yml as plain processes (no Docker engine here): the api, worker and
flower services run with the commands and environment the compose file gives them, the
image's environment from Dockerfile.prod underneath, and only these mapped to this
machine: service host names to 127.0.0.1 (a password-protected Redis started for the
test, the local PostgreSQL with a database of the test's own), container paths (the
Docker secrets under /run/secrets among them) to temporary files and directories, and
listening ports to free ones. Then each service's compose health check runs, and a small
job is scored end to end with an API key."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from ml_framework.credentials import hash_key
from tests.conftest import PG_ADMIN_URL, free_port, wait_for_http

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
API_KEY = "compose-" + uuid.uuid4().hex
ENV_FILE = {"ML_FRAMEWORK_API_KEYS": f"tester={hash_key(API_KEY)}"}  # what .env.prod gives: names and hashes
SECRETS = {"redis_password": "r3dis-" + uuid.uuid4().hex[:8], "postgres_password": "unused-with-trust-auth",
           "flower_basic_auth": "admin:fl0wer-" + uuid.uuid4().hex[:6]}  # the Docker secret files
TLS_PROXY = "172.31.250.2"
"""The tls service's address on the compose network (the one the API trusts for X-Forwarded-*)."""
PROXY_HERE = "127.0.0.2"
"""What stands for it here: requests sent from this loopback address act as the proxy."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` (``$$`` is a ``$``)."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if op == ":?" and not env.get(name):
            raise KeyError(f"{name}: {arg}")
        return env.get(name) or (arg if op == ":-" else "")
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value).replace("$$", "$")


def load_compose() -> dict:
    """docker-compose.prod.yml parsed, then interpolated value by value, as Compose does."""
    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return interpolate(node, ENV_FILE) if isinstance(node, str) else node
    return walk(yaml.safe_load((REPO / "docker-compose.prod.yml").read_text()))


def image_env() -> dict[str, str]:
    """The ENV of Dockerfile.prod's final stage."""
    final = re.split(r"(?m)^FROM ", (REPO / "Dockerfile.prod").read_text())[-1]
    env: dict[str, str] = {}
    for block in re.findall(r"(?ms)^ENV (.*?)(?<!\\)\n", final):
        for pair in shlex.split(block.replace("\\\n", " ")):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def image_cmd() -> list[str]:
    return yaml.safe_load(re.findall(r"(?m)^CMD (.*)$", (REPO / "Dockerfile.prod").read_text())[-1])


@pytest.fixture
def deployment(trained, data_dir, tmp_path):
    """Redis with a password, a PostgreSQL database, and the mapping of the compose file's
    names onto them."""
    import psycopg

    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--requirepass", SECRETS["redis_password"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = f"mlf_compose_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mlf'").fetchone():
            conn.execute("CREATE ROLE mlf LOGIN")
        conn.execute(f'CREATE DATABASE "{db}" OWNER mlf')
    dirs = {"/app/models": trained[0], "/app/data": data_dir, "/app/logs": tmp_path / "logs",
            "/tmp/mlf": tmp_path / "var", "/app/configs/production.yaml": REPO / "configs" / "production.yaml"}
    (tmp_path / "logs").mkdir()
    (tmp_path / "secrets").mkdir()
    for name, value in SECRETS.items():  # as `echo value > secrets/name` writes them
        (tmp_path / "secrets" / name).write_text(value + "\n")
        dirs[f"/run/secrets/{name}"] = tmp_path / "secrets" / name
    mapping = {"redis://redis:6379": f"redis://127.0.0.1:{redis_port}", "@postgres:5432/mlf": f"@127.0.0.1:5432/{db}",
               TLS_PROXY: PROXY_HERE,
               **{k: str(v) for k, v in dirs.items()}}
    yield mapping, tmp_path
    redis.terminate()
    redis.wait()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def localize(value: str, mapping: dict[str, str]) -> str:
    for container, here in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        value = value.replace(container, here)
    return value


def service(name: str, mapping: dict[str, str], ports: dict[str, int]) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one compose service, localized."""
    spec = load_compose()["services"][name]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_FRAMEWORK_", "FLOWER_"))}
    env.update({k: localize(v, mapping) for k, v in image_env().items() if k not in ("PATH", "HOME")})
    env.update({k: localize(str(v), mapping) for k, v in spec.get("environment", {}).items()})
    env["ML_FRAMEWORK_WORKER_METRICS_PORT"] = str(ports["9191"])
    command = [localize(str(a), mapping) for a in spec.get("command") or image_cmd()]
    command = [ports.get(a, a) if i and command[i - 1] == "--port" else a for i, a in enumerate(command)]
    command = [str(a) for a in command]
    return [str(BIN / command[0]), *command[1:]], env


def health_check(name: str, mapping: dict[str, str], ports: dict[str, int]) -> subprocess.CompletedProcess:
    """Run service ``name``'s compose health check here, with its environment."""
    check = load_compose()["services"][name]["healthcheck"]["test"]
    assert check[0] == "CMD", check
    _, env = service(name, mapping, ports)
    argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{ports['8000']}").replace("127.0.0.1:5555",
                                                                            f"127.0.0.1:{ports['5555']}")
            for a in check[1:]]
    argv[0] = sys.executable if argv[0] == "python3.11" else str(BIN / argv[0])
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_api_worker_and_flower_run_as_composed_and_score_a_job(deployment, digits):
    """The api, worker and flower services start as composed; each one's own health check
    passes (the worker's reads its own heartbeats); the API needs the key; a job is scored.
    Signing in through the TLS proxy (X-Forwarded-Proto: https from its address) gives a
    Secure cookie; the same header from another address is not trusted."""
    mapping, tmp_path = deployment
    ports = {"8000": free_port(), "5555": free_port(), "9191": free_port()}
    procs = {}
    try:
        for name in ("ml-api", "worker", "flower"):
            argv, env = service(name, mapping, ports)
            procs[name] = subprocess.Popen(argv, env=env, stdout=(tmp_path / f"{name}.log").open("wb"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
        api = f"http://127.0.0.1:{ports['8000']}"
        wait_for_http(f"{api}/health", timeout_s=120)
        assert health_check("ml-api", mapping, ports).returncode == 0
        for source, secure in ((PROXY_HERE, True), ("127.0.0.1", False)):  # the TLS proxy; anyone else
            with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as browser:
                signed_in = browser.post(f"{api}/ui/login", data={"key": API_KEY}, timeout=30,
                                         headers={"X-Forwarded-Proto": "https"})
            assert signed_in.status_code == 303, signed_in.text
            assert ("; secure" in signed_in.headers["set-cookie"].lower()) is secure, (source, signed_in.headers)

        deadline = time.monotonic() + 120
        while httpx.get(f"{api}/ready", timeout=10).status_code != 200:  # broker, database and workers up
            assert time.monotonic() < deadline, httpx.get(f"{api}/ready", timeout=10).json()
            time.sleep(1)
        worker_check = health_check("worker", mapping, ports)  # this host's heartbeats are fresh
        assert worker_check.returncode == 0 and "@" in worker_check.stdout, worker_check.stdout + worker_check.stderr
        key = {"X-API-Key": API_KEY}
        rows = digits.frame.drop(columns=["label"]).iloc[:40].to_dict("records")
        assert httpx.post(f"{api}/v1/jobs", json={"model": "digits-sklearn", "rows": rows}, timeout=30).status_code == 401
        job = httpx.post(f"{api}/v1/jobs", json={"model": "digits-sklearn", "rows": rows}, headers=key, timeout=30).json()
        assert job.get("owner") == "tester", job
        while (state := httpx.get(f"{api}/v1/jobs/{job['job_id']}", headers=key, timeout=10).json()["state"]) in (
                "PENDING", "RUNNING"):
            assert time.monotonic() < deadline + 120, state
            time.sleep(0.5)
        assert state == "SUCCEEDED"
        page = httpx.get(f"{api}/v1/jobs/{job['job_id']}/results", params={"limit": 40}, headers=key,
                         timeout=30).json()
        assert [r["row"] for r in page["rows"]] == list(range(40)) and all("prediction" in r for r in page["rows"])

        flower = f"http://127.0.0.1:{ports['5555']}"
        assert wait_for_http(f"{flower}/healthcheck", timeout_s=60).text == "OK"
        assert health_check("flower", mapping, ports).returncode == 0
        assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
        user, password = SECRETS["flower_basic_auth"].split(":")
        assert httpx.get(f"{flower}/api/workers", auth=(user, password), timeout=30).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{ports['9191']}/metrics", timeout=10).text
        assert 'mlf_rows_scored_total{device="cpu",model="digits-sklearn",version="1"} 40.0' in metrics
        log = (tmp_path / "logs" / "ml_framework.log").read_text()
        assert f'"job_id": "{job["job_id"]}"' in log  # production.yaml: JSON lines, with the job id
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
