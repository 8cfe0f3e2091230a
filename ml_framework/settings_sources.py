"""Where settings come from, below the arguments and the environment: the YAML file and
the files named by ``ML_FRAMEWORK_<KEY>_FILE`` (secrets; Docker secrets). Used by
:func:`ml_framework.settings.load_settings`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    YamlConfigSettingsSource,
)

from ml_framework.credentials import read_secret_file
from ml_framework.errors import SettingsError

ENV_PREFIX = "ML_FRAMEWORK_"
CONFIG_ENV = "ML_FRAMEWORK_CONFIG"
FILE_SUFFIX = "_FILE"
DEFAULT_CONFIG = Path("configs/development.yaml")


def sources(settings_cls: type[BaseSettings], yaml_file: Path | None, overrides: dict[str, Any],
            files: dict[str, str]) -> tuple[PydanticBaseSettingsSource, ...]:
    """pydantic-settings' own sources, highest priority first: the arguments, the
    environment, the secret files, the YAML file (``YamlConfigSettingsSource``).

    Handed to the settings class as ``_build_sources``, so the YAML path and the secret
    files are per call, not state kept on a class.

    Raises:
        SettingsError: the YAML file is not valid YAML or not a mapping of setting: value.
    """
    try:
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{yaml_file}: not valid YAML: {exc}") from exc
    except (AttributeError, TypeError, ValueError) as exc:  # a list or a scalar at the top
        raise SettingsError(f"{yaml_file}: expected a mapping of setting: value") from exc
    return (InitSettingsSource(settings_cls, init_kwargs=overrides), EnvSettingsSource(settings_cls),
            InitSettingsSource(settings_cls, init_kwargs=files), yaml_source)


def yaml_data(source: PydanticBaseSettingsSource) -> dict[str, Any]:
    """The mapping the YAML source read (empty without a file)."""
    assert isinstance(source, YamlConfigSettingsSource)
    return source.yaml_data


def config_path() -> Path | None:
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(f"{CONFIG_ENV}={named}: no such file")
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def file_key(variable: str) -> str | None:
    """``redis_password`` for ``ML_FRAMEWORK_REDIS_PASSWORD_FILE``; ``None`` for other names."""
    if variable.startswith(ENV_PREFIX) and variable.endswith(FILE_SUFFIX):
        return variable[len(ENV_PREFIX):-len(FILE_SUFFIX)].lower()
    return None


def secret_files(secret_fields: frozenset[str]) -> tuple[dict[str, str], list[str]]:
    """The values of ``secret_fields`` read from the files named by ``ML_FRAMEWORK_<KEY>_FILE``,
    and the problems met (a file unreadable, a value given both ways), as messages naming
    the variables, never the content."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for variable, file in os.environ.items():
        key = file_key(variable)
        if key not in secret_fields:
            continue
        if ENV_PREFIX + key.upper() in os.environ:
            problems.append(f"environment: both {ENV_PREFIX + key.upper()} and {variable} are set; give one")
            continue
        try:
            values[key] = read_secret_file(variable, file)
        except ValueError as exc:
            problems.append(f"environment: {exc}")
    return values, problems
