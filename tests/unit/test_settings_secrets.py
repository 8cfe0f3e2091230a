"""Secrets in settings: masked in repr, errors and `mlf config`; read from *_FILE files;
API keys by name or hash; placeholders refused in production."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ml_framework.errors import SettingsError
from ml_framework.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
PASSWORDS = {"redis": "r3d-Vq8xP2", "pg": "pg-Hw7mZ4t", "flower": "fl-Jk3nB6", "key": "api-key-Zt5yR8wQ1cV0"}


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


def with_secrets(**extra):
    return load_settings(redis_url=f"redis://:{PASSWORDS['redis']}@redis:6379/0",
                         database_url=f"postgresql+psycopg://mlf:{PASSWORDS['pg']}@postgres:5432/mlf",
                         flower_basic_auth=f"admin:{PASSWORDS['flower']}", api_keys=f"ops={PASSWORDS['key']}", **extra)


def test_repr_masks_every_password_and_key_but_keeps_the_rest():
    """repr(Settings) (what a log of the settings would show) holds no password or key;
    hosts and the other settings stay readable."""
    settings = with_secrets()
    text = repr(settings)
    assert not [name for name, value in PASSWORDS.items() if value in text], text
    assert "redis://:**********@redis:6379/0" in text and "postgresql+psycopg://mlf:**********@postgres" in text
    assert "'ops': '**********'" in text and "shard_size=10000" in text
    assert settings.broker_url == f"redis://:{PASSWORDS['redis']}@redis:6379/0"  # the real value, to connect with


def test_mlf_config_prints_the_settings_with_secrets_masked(tmp_path):
    """`mlf config` shows every setting; passwords, keys and URL passwords are masked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({"ML_FRAMEWORK_REDIS_URL": f"redis://:{PASSWORDS['redis']}@redis:6379/0",
                "ML_FRAMEWORK_API_KEYS": f"ops={PASSWORDS['key']}",
                "ML_FRAMEWORK_FLOWER_BASIC_AUTH": f"admin:{PASSWORDS['flower']}"})
    run = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "config"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert 'redis_url: "redis://:**********@redis:6379/0"' in run.stdout
    assert 'api_keys: {"ops": "**********"}' in run.stdout and "shard_size: 10000" in run.stdout
    assert not [name for name, value in PASSWORDS.items() if value in run.stdout + run.stderr]


def test_secrets_come_from_the_files_named_by_file_variables(tmp_path, monkeypatch):
    """ML_FRAMEWORK_<KEY>_FILE (Docker secrets): passwords go into their URLs, keys one per
    line; surrounding whitespace (echo's newline) is dropped."""
    files = {"REDIS_PASSWORD": PASSWORDS["redis"] + "\n", "DATABASE_PASSWORD": PASSWORDS["pg"],
             "FLOWER_BASIC_AUTH": f"admin:{PASSWORDS['flower']}\n",
             "API_KEYS": f"ops=sha256:{hashlib.sha256(b'k1' * 9).hexdigest()}\nbatch={PASSWORDS['key']}\n"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        monkeypatch.setenv(f"ML_FRAMEWORK_{name}_FILE", str(tmp_path / name))
    monkeypatch.setenv("ML_FRAMEWORK_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("ML_FRAMEWORK_DATABASE_URL", "postgresql+psycopg://mlf@postgres:5432/mlf")
    s = load_settings()
    assert s.redis_url == s.broker_url == s.cache_url == f"redis://:{PASSWORDS['redis']}@redis:6379/0"
    assert s.effective_database_url == f"postgresql+psycopg://mlf:{PASSWORDS['pg']}@postgres:5432/mlf"
    assert [e.get_secret_value() for e in s.flower_basic_auth] == [f"admin:{PASSWORDS['flower']}"]
    assert {k: v.get_secret_value() for k, v in s.api_keys.items()} == {
        "ops": "sha256:" + hashlib.sha256(b"k1" * 9).hexdigest(), "batch": PASSWORDS["key"]}


def test_a_password_with_url_characters_is_quoted_into_the_url(monkeypatch, tmp_path):
    (tmp_path / "pw").write_text("p@ss:w/rd%")
    monkeypatch.setenv("ML_FRAMEWORK_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    from urllib.parse import unquote, urlsplit

    s = load_settings(redis_url="redis://redis:6379/0")
    assert unquote(urlsplit(s.broker_url).password) == "p@ss:w/rd%" and urlsplit(s.broker_url).hostname == "redis"


def test_file_variable_problems_are_named_without_content(tmp_path, monkeypatch):
    """A missing file names the variable and the path; a value given twice is refused; a
    _FILE variable for a setting that is not a secret is an unknown variable."""
    monkeypatch.setenv("ML_FRAMEWORK_REDIS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match=r"ML_FRAMEWORK_REDIS_PASSWORD_FILE=.*missing: cannot read it"):
        load_settings(redis_url="redis://redis:6379/0")
    (tmp_path / "pw").write_text(PASSWORDS["redis"])
    monkeypatch.setenv("ML_FRAMEWORK_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("ML_FRAMEWORK_REDIS_PASSWORD", "other")
    with pytest.raises(SettingsError, match="both ML_FRAMEWORK_REDIS_PASSWORD and ML_FRAMEWORK_REDIS_PASSWORD_FILE"):
        load_settings(redis_url="redis://redis:6379/0")
    monkeypatch.delenv("ML_FRAMEWORK_REDIS_PASSWORD")
    with pytest.raises(SettingsError, match="carries a password already") as raised:
        load_settings(redis_url="redis://:inline@redis:6379/0")
    assert PASSWORDS["redis"] not in str(raised.value) and "inline" not in str(raised.value)
    monkeypatch.delenv("ML_FRAMEWORK_REDIS_PASSWORD_FILE")
    monkeypatch.setenv("ML_FRAMEWORK_SHARD_SIZE_FILE", str(tmp_path / "pw"))
    with pytest.raises(SettingsError, match="unknown variable ML_FRAMEWORK_SHARD_SIZE_FILE"):
        load_settings()


def test_api_keys_by_name_by_hash_and_bare():
    """name=key, name=sha256:<hex>, and bare keys of earlier releases (named by their hash's
    first 8 hex digits, stable whatever the order); roles must name configured keys."""
    digest = hashlib.sha256(b"bare-key").hexdigest()
    s = load_settings(api_keys=f"ops=sha256:{'A' * 64}, bare-key ,team.b=k=with=equals",
                      api_key_roles="ops=admin")
    assert list(s.api_keys) == ["ops", f"key-{digest[:8]}", "team.b"]
    assert s.api_keys["team.b"].get_secret_value() == "k=with=equals" and s.api_key_roles == {"ops": "admin"}
    assert list(load_settings(api_keys={"a": "x" * 20, "b": "y" * 20}).api_keys) == ["a", "b"]  # YAML mapping
    for bad, match in [("a=k1,a=k2", "given twice"), ("a=same-key,b=same-key", "are the same key"),
                       ("a=sha256:abc", "64 hex digits"), ({"bad name!": "k" * 20}, "key name 'bad name!'")]:
        with pytest.raises(SettingsError, match=match) as raised:
            load_settings(api_keys=bad)
        assert "k1" not in str(raised.value) and "same-key" not in str(raised.value)
    with pytest.raises(SettingsError, match="api_key_roles names keys that api_keys does not hold: ghost"):
        load_settings(api_keys="ops=" + "k" * 20, api_key_roles="ghost=admin")
    with pytest.raises(SettingsError, match="api_key_roles"):
        load_settings(api_keys="ops=" + "k" * 20, api_key_roles="ops=root")


@pytest.mark.parametrize("setting, value, named, secret", [
    ("redis_url", "redis://:change-me@redis:6379/0", "the password in redis_url", "change-me"),
    ("database_url", "postgresql+psycopg://mlf:CHANGE_ME@pg/mlf", "the password in database_url", "CHANGE_ME"),
    ("api_keys", "ops=change-me-ops", "api_keys[ops]", "change-me-ops"),
    ("api_keys", "ops=short-key", "api_keys[ops] (shorter than 16 characters)", "short-key"),
    ("flower_basic_auth", "admin:password", "flower_basic_auth[admin]", "password"),
])
def test_production_refuses_placeholder_and_weak_secrets(setting, value, named, secret):
    """deployment: production refuses the examples' placeholders and short keys in clear,
    naming the setting and never the value; development accepts them; real ones pass."""
    with pytest.raises(SettingsError, match="production refuses placeholder or weak secrets") as raised:
        load_settings(deployment="production", **{setting: value})
    assert named in str(raised.value) and secret not in str(raised.value)
    assert load_settings(**{setting: value})  # development
    real = {"redis_url": "redis://:Vn3xq9Lk2@redis:6379/0", "database_url": "postgresql+psycopg://mlf:Vn3xq9Lk2@pg/mlf",
            "api_keys": "ops=" + "Vn3xq9Lk2" * 2, "flower_basic_auth": "admin:Vn3xq9Lk2"}[setting]
    assert load_settings(deployment="production", **{setting: real})


def test_the_example_env_file_holds_only_placeholders_production_refuses(monkeypatch):
    """Each secret in .env.prod.example is refused by configs/production.yaml's settings."""
    example = dict(line.split("=", 1) for line in (REPO / ".env.prod.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    monkeypatch.setenv("ML_FRAMEWORK_CONFIG", str(REPO / "configs" / "production.yaml"))
    monkeypatch.setenv("ML_FRAMEWORK_REDIS_URL", "redis://:Vn3xq9Lk2@redis:6379/0")
    monkeypatch.setenv("ML_FRAMEWORK_API_KEYS", example["ML_FRAMEWORK_API_KEYS"])
    monkeypatch.setenv("ML_FRAMEWORK_API_KEY_ROLES", example["ML_FRAMEWORK_API_KEY_ROLES"])
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "api_keys[ops]" in str(raised.value) and "api_keys[prometheus]" in str(raised.value)
