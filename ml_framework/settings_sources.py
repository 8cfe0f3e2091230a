"""Where settings come from, below the arguments and the environment: the YAML file and
the files named by ``ML_FRAMEWORK_<KEY>_FILE`` (secrets; Docker secrets). Used by
:func:`ml_framework.settings.load_settings`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

from ml_framework.credentials import read_secret_file
from ml_framework.errors import SettingsError

ENV_PREFIX = "ML_FRAMEWORK_"
CONFIG_ENV = "ML_FRAMEWORK_CONFIG"
FILE_SUFFIX = "_FILE"
DEFAULT_CONFIG = Path("configs/development.yaml")


class MappingSource(PydanticBaseSettingsSource):
    """Feeds an already-read mapping in (the YAML file; the secret files)."""

    data: ClassVar[dict[str, Any]] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


class YamlSource(MappingSource):
    """The YAML file, below everything else."""

    data: ClassVar[dict[str, Any]] = {}


class SecretFilesSource(MappingSource):
    """Values read from the files named by ``ML_FRAMEWORK_<KEY>_FILE``: below the
    environment, above the YAML file."""

    data: ClassVar[dict[str, Any]] = {}


def config_path() -> Path | None:
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(f"{CONFIG_ENV}={named}: no such file")
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    return data


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
