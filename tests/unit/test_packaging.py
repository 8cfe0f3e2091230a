"""Production packaging, checked statically (no Docker engine here): Dockerfile.prod
against the issue's rules, the production lock against what TensorFlow and PyTorch
require for CUDA, docker-compose.prod.yml against the Compose specification and the
deployment's rules, and configs/production.yaml against the settings. (hadolint and the
resolution against the package registry: tests/integration/test_packaging_tools.py.)"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ml_framework.credentials import url_password
from ml_framework.settings import SECRET_FIELDS, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile.prod"


def stages(text: str) -> list[str]:
    """The Dockerfile's stages, each as its text from its FROM line."""
    joined = re.sub(r"\\\n", " ", text)
    parts = re.split(r"(?m)^(?=FROM )", joined)
    return [p for p in parts if p.startswith("FROM ")]


def test_final_stage_is_small_and_safe():
    """A published major.minor.patch base tag (the `base` flavour: the wheels bring their
    CUDA libraries), a numeric non-root user, no compiler, no single-service HEALTHCHECK."""
    builder, final = stages(DOCKERFILE.read_text())
    assert re.match(r"FROM \$\{BASE_IMAGE\} AS builder", builder)
    assert re.search(r"(?m)^ARG BASE_IMAGE=nvidia/cuda:13\.\d+\.\d+-base-ubuntu22\.04$", DOCKERFILE.read_text())
    assert final.startswith("FROM ${BASE_IMAGE}")
    for unwanted in ("build-essential", "-dev", "jupyter", "matplotlib", "gcc", "pip install"):
        assert unwanted not in final, unwanted
    assert not re.search(r"(?m)^HEALTHCHECK", final)  # one image, three services: compose checks each
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert re.search(r"(?m)^USER 10001:10001$", final) and "--uid 10001 --gid 10001" in final
    for env in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "ML_FRAMEWORK_CONFIG=/app/configs/production.yaml"):
        assert env in final
    assert 'VOLUME ["/app/models", "/app/data", "/app/configs", "/app/logs"]' in final
    assert final.rstrip().endswith('CMD ["uvicorn", "producer.api:app", "--host", "0.0.0.0", "--port", "8000", '
                                   '"--workers", "4", "--proxy-headers"]')
    assert "FORWARDED_ALLOW_IPS=127.0.0.1" in final  # uvicorn's own default, stated: compose sets the proxy's
    assert "rm -rf /var/lib/apt/lists/*" in final


def test_dependencies_are_their_own_cached_layer_before_the_source():
    """The lock is installed (BuildKit pip cache) before any source is copied, so a code
    change reinstalls nothing; the project goes in last, without dependencies, and pip
    checks the result."""
    builder = stages(DOCKERFILE.read_text())[0]
    steps = [line for line in builder.splitlines() if line.startswith(("COPY", "RUN"))]
    lock = next(i for i, line in enumerate(steps) if "pip install --no-deps -r constraints/prod.txt" in line)
    assert steps[lock].startswith("RUN --mount=type=cache,target=/root/.cache/pip ")
    assert [line for line in steps[:lock] if line.startswith("COPY")] == ["COPY constraints/prod.txt constraints/prod.txt"]
    sources = [i for i, line in enumerate(steps) if re.match(r"COPY (ml_framework|producer|worker|demo|pyproject)", line)]
    assert sources and min(sources) > lock
    assert "pip install --no-deps --no-build-isolation --no-cache-dir . && pip check" in steps[-1]


def cuda_check() -> str:
    """The Python program of Dockerfile.prod's build-stage CUDA check."""
    joined = re.sub(r"\\\n", "", stages(DOCKERFILE.read_text())[0])
    return re.search(r'RUN python -c "(.*is_built_with_cuda.*)"', joined).group(1)


FAKE_FRAMEWORKS = {
    "tensorflow/__init__.py": "from types import SimpleNamespace as N\n__version__ = '2.99'\n"
                              "sysconfig = N(get_build_info=lambda: {{'cuda_version': '12.5.1', 'cudnn_version': '9'}})\n"
                              "test = N(is_built_with_cuda=lambda: {tf})\n",
    "torch/__init__.py": "from types import SimpleNamespace as N\n__version__ = '2.99'\n"
                         "version = N(cuda={cuda})\n"
                         "backends = N(cudnn=N(version=lambda: 91000), cuda=N(is_built=lambda: {torch}))\n",
    "onnxruntime/__init__.py": "__version__ = '1.99'\n"
                               "def get_available_providers():\n"
                               "    return ['CUDAExecutionProvider', 'CPUExecutionProvider'] if {ort} else ['CPUExecutionProvider']\n",
}


def test_the_build_stage_fails_unless_every_framework_is_a_cuda_build(tmp_path):
    """Run as the build would: with the CPU builds installed here it exits 1 (and prints
    each framework's CUDA, and ONNX Runtime's providers); with stand-ins that report CUDA
    builds, 0; with any one a CPU build, 1."""
    run = subprocess.run([sys.executable, "-c", cuda_check()], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"(?m)^tensorflow \S+ CUDA ", run.stdout) and re.search(r"(?m)^torch \S+ CUDA None", run.stdout)
    assert re.search(r"(?m)^onnxruntime \S+ providers \[.*'CPUExecutionProvider'", run.stdout)
    for tf, torch, cuda, ort, code in [(True, True, "'13.0'", True, 0), (False, True, "'13.0'", True, 1),
                                       (True, False, "None", True, 1), (True, True, "'13.0'", False, 1)]:
        fake = tmp_path / f"{tf}-{torch}-{ort}"
        for path, text in FAKE_FRAMEWORKS.items():
            (fake / path).parent.mkdir(parents=True, exist_ok=True)
            (fake / path).write_text(text.format(tf=tf, torch=torch, cuda=cuda, ort=ort))
        run = subprocess.run([sys.executable, "-c", cuda_check()], capture_output=True, text=True, timeout=60,
                             check=False, env={**os.environ, "PYTHONPATH": str(fake)})
        assert run.returncode == code, (tf, torch, ort, run.stdout + run.stderr)


def test_build_context_holds_what_the_dockerfile_copies():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = re.findall(r"(?m)^COPY (?!--from)(?:--chown=\S+ )?(.+) \S+$", DOCKERFILE.read_text())
    for sources in copied:
        for source in sources.split():
            assert (REPO / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_production_config_documents_every_setting_and_env_overrides_it(monkeypatch):
    path = REPO / "configs" / "production.yaml"
    keys = set(yaml.safe_load(path.read_text()))
    assert keys == set(Settings.model_fields), keys ^ set(Settings.model_fields)
    for key in keys:  # each key carries a comment on its line or in its section
        assert re.search(rf"(?m)^{key}:", path.read_text())
    monkeypatch.setenv("ML_FRAMEWORK_CONFIG", str(path))
    settings = load_settings()
    assert (settings.models_dir, settings.log_dir, settings.log_format, settings.worker_metrics_host) == (
        Path("/app/models"), Path("/app/logs"), "json", "0.0.0.0")
    monkeypatch.setenv("ML_FRAMEWORK_LOG_FORMAT", "text")
    monkeypatch.setenv("ML_FRAMEWORK_BROKER_URL", "redis://:Vn3xq9Lk2pQ@redis:6379/0")
    settings = load_settings()
    assert settings.log_format == "text" and settings.broker_is_redis and settings.deployment == "production"


COMPOSE = REPO / "docker-compose.prod.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def check_jsonschema(*args: str) -> subprocess.CompletedProcess:
    binary = Path(__import__("sys").executable).with_name("check-jsonschema")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=False)


def test_compose_file_is_valid_against_the_compose_specification():
    run = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_services_health_checks_and_resources_are_as_the_guide_says():
    services = compose()["services"]
    assert set(services) == {"ml-api", "worker", "redis", "postgres", "flower", "prometheus", "tls"}
    api = services["ml-api"]
    assert api["ports"] == ["${MLF_API_BIND:-0.0.0.0}:8000:8000"] and "/health" in " ".join(api["healthcheck"]["test"])
    assert {k: api["healthcheck"][k] for k in ("interval", "timeout", "retries", "start_period")} == {
        "interval": "30s", "timeout": "10s", "retries": 3, "start_period": "40s"}
    for name in ("ml-api", "worker"):
        resources = services[name]["deploy"]["resources"]
        assert resources["limits"] == {"cpus": "4.0", "memory": "8G"}
        assert {k: resources["reservations"][k] for k in ("cpus", "memory")} == {"cpus": "2.0", "memory": "4G"}
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]  # --scale works
    assert services["redis"]["image"] == "redis:7-alpine" and "--requirepass" in services["redis"]["command"][-1]
    assert "healthcheck" in services["postgres"] and services["postgres"]["volumes"]
    assert services["prometheus"]["volumes"][0] == "./configs/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert "ML_FRAMEWORK_FLOWER_BASIC_AUTH_FILE" in services["flower"]["environment"]
    assert services["tls"]["profiles"] == ["tls"]  # Caddy only with --profile tls
    for name in ("ml-api", "worker", "flower"):
        assert services[name]["read_only"] is True and services[name]["tmpfs"] == ["/tmp"]
        volumes = services[name]["volumes"]
        assert {"./models:/app/models:ro", "./data:/app/data:ro", "./logs:/app/logs"} <= set(volumes)
        env = services[name]["environment"]
        for var in ("ML_FRAMEWORK_LOGGING_LEVEL", "ML_FRAMEWORK_MODELS_DIR", "ML_FRAMEWORK_DATA_DIR",
                    "ML_FRAMEWORK_REDIS_URL", "ML_FRAMEWORK_CACHE_BACKEND", "PYTORCH_CUDA_ALLOC_CONF",
                    "TF_FORCE_GPU_ALLOW_GROWTH"):
            assert var in env, (name, var)


def test_each_service_has_its_own_health_check():
    """Every service checks itself: the API its /health, a worker its own heartbeats
    (`mlf workers --self`), Flower its /healthcheck on its own port, and so on; no service
    probes the API's port but the API."""
    checks = {name: " ".join(map(str, svc["healthcheck"]["test"])) for name, svc in compose()["services"].items()}
    assert set(checks) == set(compose()["services"])
    assert "127.0.0.1:8000/health" in checks["ml-api"]
    assert checks["worker"] == "CMD mlf workers --self"
    assert "127.0.0.1:5555/healthcheck" in checks["flower"] and "127.0.0.1:9090/-/healthy" in checks["prometheus"]
    assert "redis-cli ping" in checks["redis"] and "pg_isready" in checks["postgres"]
    assert [name for name, check in checks.items() if ":8000" in check] == ["ml-api"]
    assert compose()["services"]["worker"]["healthcheck"]["start_period"] == "120s"  # model preloading


def test_every_service_runs_without_new_privileges_or_capabilities():
    """no-new-privileges and cap_drop ALL everywhere; capabilities come back only where an
    image's entrypoint needs them (redis and postgres drop to their user; Caddy binds 443)."""
    services = compose()["services"]
    for name, svc in services.items():
        assert svc["security_opt"] == ["no-new-privileges:true"], name
        assert svc["cap_drop"] == ["ALL"], name
    added = {name: set(svc.get("cap_add", [])) for name, svc in services.items() if svc.get("cap_add")}
    assert added == {"redis": {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"},
                     "postgres": {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"},
                     "tls": {"NET_BIND_SERVICE"}}


def test_the_api_trusts_forwarded_headers_from_the_tls_proxy_only():
    """Behind the tls profile's Caddy, uvicorn takes X-Forwarded-Proto/-For (so the sign-in
    cookie is Secure over HTTPS) from Caddy's fixed address only, which lies outside the
    range the other containers of its network get; MLF_FORWARDED_ALLOW_IPS overrides it."""
    spec = compose()
    api, tls, edge = spec["services"]["ml-api"], spec["services"]["tls"], spec["networks"]["edge"]["ipam"]["config"][0]
    proxy = tls["networks"]["edge"]["ipv4_address"]
    assert api["environment"]["FORWARDED_ALLOW_IPS"] == "${MLF_FORWARDED_ALLOW_IPS:-" + proxy + "}"
    assert list(tls["networks"]) == ["edge"] and "edge" in api["networks"] and "edge" in spec["services"]["flower"]["networks"]
    assert ipaddress.ip_address(proxy) in ipaddress.ip_network(edge["subnet"])
    assert ipaddress.ip_address(proxy) not in ipaddress.ip_network(edge["ip_range"])
    assert "MLF_FORWARDED_ALLOW_IPS" in (REPO / ".env.prod.example").read_text()


def test_flower_and_prometheus_are_published_on_loopback_by_default():
    """Compose's own interpolation of the port bindings, with and without the env file's say."""
    services = compose()["services"]
    assert services["flower"]["ports"] == ["${MLF_FLOWER_BIND:-127.0.0.1}:5555:5555"]
    assert services["prometheus"]["ports"] == ["${MLF_PROMETHEUS_BIND:-127.0.0.1}:9090:9090"]
    run = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False) if shutil.which(
        "docker") else None
    if run is not None and run.returncode == 0:  # a Docker client with compose: let it render the ports
        rendered = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                                  env={**os.environ, "ML_FRAMEWORK_API_KEYS": "k=sha256:" + "0" * 64},
                                  capture_output=True, text=True, check=True, cwd=REPO)
        ports = {n: s.get("ports", []) for n, s in json.loads(rendered.stdout)["services"].items()}
        assert ports["flower"][0]["host_ip"] == ports["prometheus"][0]["host_ip"] == "127.0.0.1"


def test_everything_the_compose_file_mounts_exists_and_every_variable_is_a_setting():
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source
        for var in service.get("environment", {}):
            if var.startswith("ML_FRAMEWORK_") and var != "ML_FRAMEWORK_CONFIG":
                key = var[len("ML_FRAMEWORK_"):].lower()
                assert key in Settings.model_fields or key.removesuffix("_file") in SECRET_FIELDS, var


def test_secrets_stay_out_of_the_repository():
    """Passwords are Docker secrets (files under ./secrets/, ignored by git) read through
    ML_FRAMEWORK_*_FILE; the API keys come from the env file (names and hashes) and compose
    refuses to start without them; the example env file holds no password."""
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".env.prod" in ignored and "/secrets/" in ignored
    spec = compose()
    assert {name: s["file"] for name, s in spec["secrets"].items()} == {
        name: f"./secrets/{name}" for name in ("redis_password", "postgres_password", "flower_basic_auth",
                                               "metrics_api_key")}
    text = COMPOSE.read_text()
    assert "${ML_FRAMEWORK_API_KEYS:?" in text  # required, no default
    for name in ("ml-api", "worker", "flower"):
        env = spec["services"][name]["environment"]
        assert env["ML_FRAMEWORK_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert env["ML_FRAMEWORK_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
        for var in ("ML_FRAMEWORK_REDIS_URL", "ML_FRAMEWORK_DATABASE_URL"):  # no password in the URLs
            assert url_password(env[var]) is None, var
        assert {"redis_password", "postgres_password"} <= set(spec["services"][name]["secrets"])
    assert spec["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "/run/secrets/redis_password" in spec["services"]["redis"]["command"][-1]
    prometheus = yaml.safe_load((REPO / "configs" / "prometheus.yml").read_text())
    api_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "mlf-api")
    assert api_job["authorization"]["credentials_file"] == "/run/secrets/metrics_api_key"
    example = (REPO / ".env.prod.example").read_text()
    assert "PASSWORD" not in example and "FLOWER_BASIC_AUTH" not in example
    assert re.search(r"(?m)^ML_FRAMEWORK_API_KEYS=\S+", example)


def test_every_file_variable_the_deployment_sets_names_a_secret_setting():
    for name, svc in compose()["services"].items():
        for var in svc.get("environment", {}):
            if var.startswith("ML_FRAMEWORK_") and var.endswith("_FILE"):
                assert var[len("ML_FRAMEWORK_"):-len("_FILE")].lower() in SECRET_FIELDS, (name, var)


LOCK = REPO / "constraints" / "prod.txt"
METADATA = REPO / "constraints" / "metadata"
IMAGE_ENV = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
             "python_version": "3.11", "python_full_version": "3.11.7", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "os_name": "posix"}
"""Where the image runs: Ubuntu 22.04 on x86_64 with CPython 3.11 (Dockerfile.prod)."""


def lock_pins() -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in
            (line.split("==") for line in LOCK.read_text().splitlines() if line and not line.startswith("#"))}


def cuda_requirements(metadata: dict, extras: set[str]) -> list[Requirement]:
    """The ``nvidia-*`` / ``cuda-*`` requirements of ``metadata`` that apply in the image
    with ``extras``, and, for each requirement with extras whose metadata is kept beside
    (torch's ``cuda-toolkit[cublas,...]``), those of its extras in turn."""
    wanted = []
    for text in metadata["requires_dist"]:
        req = Requirement(text)
        applies = req.marker is None or any(req.marker.evaluate({**IMAGE_ENV, "extra": e}) for e in extras | {""})
        if applies and req.name.lower().startswith(("nvidia-", "cuda-")):
            wanted.append(req)
            kept = METADATA / f"{canonicalize_name(req.name)}.json"
            if req.extras and kept.exists():
                wanted += cuda_requirements(json.loads(kept.read_text()), set(req.extras))
    return wanted


@pytest.mark.parametrize("framework, extra, cuda_major", [("tensorflow", "and-cuda", "12"), ("torch", None, "13")])
def test_the_lock_holds_every_cuda_library_the_frameworks_require(framework, extra, cuda_major):
    """Read from each framework's own metadata (constraints/metadata/, copied from the
    registry by constraints/lock.py for the pinned version): every CUDA library that
    TensorFlow's and-cuda extra, and torch on Linux, require is pinned in the lock at a
    version they accept. TensorFlow's are CUDA 12 (nvidia-*-cu12), torch's CUDA 13."""
    metadata = json.loads((METADATA / f"{framework}.json").read_text())
    pins = lock_pins()
    assert metadata["version"] == pins[framework], "constraints/metadata is of another version: run constraints/lock.py"
    if extra:
        assert extra in metadata["provides_extra"]
        assert Requirement(next(r for r in REPO.joinpath("pyproject.toml").read_text().splitlines()
                                if "tensorflow[and-cuda]" in r).split('"')[3]).extras == {extra}
    wanted = cuda_requirements(metadata, {extra} if extra else set())
    assert len(wanted) >= 10, wanted  # cuBLAS, cuDNN, cuFFT, cuSOLVER, cuSPARSE, NCCL, runtime, ...
    missing = [str(r) for r in wanted if canonicalize_name(r.name) not in pins]
    wrong = [f"{r} (locked {pins[canonicalize_name(r.name)]})" for r in wanted
             if canonicalize_name(r.name) in pins and not r.specifier.contains(pins[canonicalize_name(r.name)],
                                                                               prereleases=True)]
    assert not missing and not wrong, (missing, wrong)
    if framework == "tensorflow":
        assert all(r.name.endswith("-cu12") for r in wanted)
        assert all(pins[canonicalize_name(r.name)].startswith(cuda_major) for r in wanted
                   if r.name.startswith(("nvidia-cuda-runtime", "nvidia-cublas")))
    else:
        assert pins["cuda-toolkit"].startswith(cuda_major) and not [r for r in wanted if r.name.endswith("-cu12")]
        assert {"nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13"} <= {canonicalize_name(r.name) for r in wanted}


def test_the_tensorflow_cuda_check_reads_the_metadata_not_a_list():
    """Without the and-cuda extra, TensorFlow's metadata asks for no CUDA library: the
    check above is driven by the extra in the metadata."""
    metadata = json.loads((METADATA / "tensorflow.json").read_text())
    assert cuda_requirements(metadata, set()) == []
    assert Marker('extra == "and-cuda"').evaluate({**IMAGE_ENV, "extra": "and-cuda"})
