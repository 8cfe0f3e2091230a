"""Model manifests (what a model version takes and returns) and the model repository.

See :mod:`ml_framework.manifest.specs` for the input kinds and tensor specs,
:mod:`ml_framework.manifest.model` for the manifest file, and
:mod:`ml_framework.manifest.repository` for the repository on disk.
"""

from ml_framework.manifest.model import (
    MANIFEST_FILE,
    NAME_PATTERN,
    Framework,
    ModelManifest,
    Version,
)
from ml_framework.manifest.repository import (
    ModelRepository,
    artifact_format,
    artifact_kind,
    artifact_name_mismatch,
    check_artifact,
    framework_mismatch,
    is_version,
    parse_model_ref,
)
from ml_framework.manifest.specs import (
    ONE_COLUMN_KINDS,
    BatchSize,
    DynamicBatching,
    InputKind,
    InputSpec,
    OnnxSpec,
    OutputSpec,
    Preprocessing,
    RuntimeOptions,
    TokenizerSpec,
)

__all__ = [
    "MANIFEST_FILE", "NAME_PATTERN", "ONE_COLUMN_KINDS", "BatchSize", "DynamicBatching", "Framework",
    "InputKind", "InputSpec", "ModelManifest", "ModelRepository", "OnnxSpec", "OutputSpec", "Preprocessing",
    "RuntimeOptions", "TokenizerSpec", "Version", "artifact_format", "artifact_kind", "artifact_name_mismatch",
    "check_artifact", "framework_mismatch",
    "is_version", "parse_model_ref",
]
