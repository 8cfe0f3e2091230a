"""Settings: defaults, YAML file, environment, and clear errors for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_framework.errors import SettingsError
from ml_framework.settings import load_settings

pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_select_the_embedded_broker_and_sqlite():
    """With nothing configured the broker and results store are SQLite files under var/."""
    s = load_settings()
    assert s.embedded_broker
    assert s.effective_broker_url.startswith("mlfsqla+sqlite:///") and s.effective_broker_url.endswith("var/broker.sqlite")
    assert s.effective_database_url.endswith("var/results.sqlite")
    assert s.shard_size == 10_000 and s.default_batch_size == 256


def test_yaml_then_env_precedence(tmp_path, monkeypatch):
    """The YAML file overrides defaults and ML_FRAMEWORK_* variables override the file."""
    cfg = write(tmp_path / "c.yaml", "shard_size: 123\ndefault_batch_size: 7\nbroker_url: redis://h:1/0\n")
    monkeypatch.setenv("ML_FRAMEWORK_CONFIG", str(cfg))
    monkeypatch.setenv("ML_FRAMEWORK_DEFAULT_BATCH_SIZE", "9")
    s = load_settings()
    assert (s.shard_size, s.default_batch_size, s.broker_url) == (123, 9, "redis://h:1/0")
    assert not s.embedded_broker


def test_development_yaml_is_read_from_configs(tmp_path):
    """configs/development.yaml in the working directory is the default file."""
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs" / "development.yaml", "logging_level: DEBUG\n")
    assert load_settings().logging_level == "DEBUG"


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    """An unknown key in the file fails with the key and the file's path."""
    cfg = write(tmp_path / "bad.yaml", "shard_sise: 10\n")
    with pytest.raises(SettingsError, match=r"bad\.yaml: unknown key 'shard_sise'"):
        load_settings(cfg)


def test_bad_value_names_key_and_file(tmp_path):
    """An invalid value fails with the key, the file and the value."""
    cfg = write(tmp_path / "bad.yaml", "shard_size: -5\n")
    with pytest.raises(SettingsError, match=r"bad\.yaml: shard_size: .*greater than 0.*-5"):
        load_settings(cfg)


def test_bad_env_value_names_the_variable(monkeypatch):
    """An invalid environment value names the variable."""
    monkeypatch.setenv("ML_FRAMEWORK_SHARD_SIZE", "lots")
    with pytest.raises(SettingsError, match="ML_FRAMEWORK_SHARD_SIZE: shard_size"):
        load_settings()


def test_unknown_env_variable_is_refused(monkeypatch):
    """A misspelt ML_FRAMEWORK_* variable is not silently ignored."""
    monkeypatch.setenv("ML_FRAMEWORK_BROKER_ULR", "redis://x")
    with pytest.raises(SettingsError, match="ML_FRAMEWORK_BROKER_ULR"):
        load_settings()


def test_missing_config_file_is_an_error(monkeypatch, tmp_path):
    """ML_FRAMEWORK_CONFIG naming a missing file fails with its name."""
    monkeypatch.setenv("ML_FRAMEWORK_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(SettingsError, match="nope.yaml"):
        load_settings()


def test_visibility_timeout_must_exceed_task_time_limit(tmp_path):
    """A visibility timeout shorter than the task limit would run long shards twice: refused."""
    cfg = write(tmp_path / "c.yaml", "task_time_limit_s: 600\nbroker_visibility_timeout_s: 300\n")
    with pytest.raises(SettingsError, match="broker_visibility_timeout_s"):
        load_settings(cfg)


def test_cross_key_error_names_each_source(tmp_path, monkeypatch):
    """A rule across keys names where each key came from (file or environment)."""
    cfg = write(tmp_path / "c.yaml", "broker_visibility_timeout_s: 300\n")
    monkeypatch.setenv("ML_FRAMEWORK_TASK_TIME_LIMIT_S", "600")
    with pytest.raises(SettingsError) as info:
        load_settings(cfg)
    assert f"broker_visibility_timeout_s from {cfg}" in str(info.value)
    assert "task_time_limit_s from environment variable ML_FRAMEWORK_TASK_TIME_LIMIT_S" in str(info.value)


def test_preload_models_from_env_list_and_yaml(tmp_path, monkeypatch):
    """worker_preload_models takes a comma-separated variable or a YAML list; bad refs name the source."""
    monkeypatch.setenv("ML_FRAMEWORK_WORKER_PRELOAD_MODELS", "digits-torch, iris:2")
    assert load_settings().worker_preload_models == ["digits-torch", "iris:2"]
    monkeypatch.delenv("ML_FRAMEWORK_WORKER_PRELOAD_MODELS")
    cfg = write(tmp_path / "c.yaml", "worker_preload_models: [a, 'b:3']\n")
    assert load_settings(cfg).worker_preload_models == ["a", "b:3"]
    monkeypatch.setenv("ML_FRAMEWORK_WORKER_PRELOAD_MODELS", "iris:0")
    with pytest.raises(SettingsError, match=r"ML_FRAMEWORK_WORKER_PRELOAD_MODELS: worker_preload_models: .*'iris:0'"):
        load_settings()


def test_a_bad_secret_is_named_but_never_printed(monkeypatch):
    """A malformed ML_FRAMEWORK_FLOWER_BASIC_AUTH is reported by name without its value
    (every process reads the settings, so the message lands in every log)."""
    monkeypatch.setenv("ML_FRAMEWORK_FLOWER_BASIC_AUTH", "admin:TopSecret,oops")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "flower_basic_auth" in str(raised.value) and "<hidden>" in str(raised.value)
    assert "TopSecret" not in str(raised.value)


def test_redis_url_is_the_broker_and_the_cache():
    s = load_settings(redis_url="redis://:pw@redis:6379/0", cache_backend="redis")
    assert (s.broker_url, s.broker_is_redis, s.cache_url) == ("redis://:pw@redis:6379/0", True, "redis://:pw@redis:6379/0")
    assert load_settings(redis_url="redis://r:6379/0", broker_url="amqp://guest@rabbit//").broker_url.startswith("amqp")
    with pytest.raises(SettingsError, match="cache_backend: redis needs redis_url"):
        load_settings(cache_backend="redis")


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "expected a mapping of setting: value"),
    ("just words\n", "expected a mapping of setting: value"),
    ("shard_size: [\n", "not valid YAML"),
])
def test_a_yaml_file_that_is_not_a_mapping_is_refused_by_name(tmp_path, text, message):
    cfg = write(tmp_path / "odd.yaml", text)
    with pytest.raises(SettingsError, match=rf"odd\.yaml: {message}"):
        load_settings(cfg)


def test_settings_loaded_at_once_from_two_files_do_not_mix(tmp_path):
    """The YAML file is a per-call source (pydantic-settings' ``YamlConfigSettingsSource``),
    not data set on a class around construction, so threads loading different files at
    the same time each get their own."""
    from concurrent.futures import ThreadPoolExecutor

    files = [write(tmp_path / f"c{n}.yaml", f"shard_size: {100 + n}\n") for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda n: load_settings(files[n % 8]).shard_size, range(400)))
    assert sizes == [100 + n % 8 for n in range(400)]
