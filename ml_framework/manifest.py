"""Model manifests and the read-only view of the model repository.

Layout (as Triton's model repository)::

    <models_dir>/<name>/<version>/manifest.yaml
    <models_dir>/<name>/<version>/<artifact file>

Versions are positive integers; "latest" is the highest. Reading manifests needs no ML
framework, so producers use this module to list models and validate jobs at submit time.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from ml_framework.errors import ManifestError, ModelNotFoundError

MANIFEST_FILE = "manifest.yaml"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

Framework = Literal["torch", "tensorflow", "sklearn"]
MAX_INT32 = 2**31 - 1  # the results store keeps versions and batch sizes in INTEGER columns
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Version = Annotated[PositiveInt, Field(le=MAX_INT32)]
BatchSize = Annotated[PositiveInt, Field(le=MAX_INT32)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """What one row of input is.

    Attributes:
        columns: dataset columns fed to the model, in this order.
        dtype: NumPy dtype name of the model input (e.g. ``float32``).
        shape: per-row tensor shape, batch dimension excluded; the row's column values
            (in ``columns`` order) are reshaped to it, e.g. 64 pixel columns -> ``[1, 8, 8]``.
            Default ``[len(columns)]``. The model sees ``(N, *shape)``.
        allow_missing: when false, a row with an empty / NaN value fails with a row error.
    """

    columns: list[str] = Field(min_length=1)
    dtype: Literal["float32", "float64", "int32", "int64"] = "float32"
    shape: list[PositiveInt] | None = None
    allow_missing: bool = False

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("inputs.columns has duplicate names")
        if self.shape is not None and math.prod(self.shape) != len(self.columns):
            raise ValueError(
                f"inputs.shape {self.shape} holds {math.prod(self.shape)} values but "
                f"inputs.columns names {len(self.columns)}"
            )
        return self

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Per-row shape the model receives (batch dimension excluded)."""
        return tuple(self.shape) if self.shape else (len(self.columns),)


class OutputSpec(_Strict):
    """What the model returns per row and how it becomes a result.

    Attributes:
        kind: ``classification``: the model returns ``(N, K)`` scores, the result holds
            ``prediction`` (a label), ``score`` and ``probabilities``; ``regression``:
            ``(N,)`` or ``(N, 1)`` -> ``prediction``; ``embedding``: ``(N, D)`` -> ``embedding``.
        labels: class labels (strings or numbers, as they should appear in results),
            index ``k`` naming score column ``k`` (classification). Quote labels that
            YAML would read as dates or booleans.
        activation: ``softmax`` when the model returns logits, ``none`` when it already
            returns probabilities.
        size: ``K`` or ``D``; checked against what the model returns.
    """

    kind: Literal["classification", "regression", "embedding"]
    labels: list[StrictStr | StrictInt | FiniteFloat] | None = None
    activation: Literal["none", "softmax"] = "none"
    size: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> OutputSpec:
        if self.kind == "classification":
            if not self.labels:
                raise ValueError("outputs.labels is required for kind: classification")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"outputs.labels has duplicates: {self.labels}")
            if self.size is not None and self.size != len(self.labels):
                raise ValueError(f"outputs.size {self.size} != {len(self.labels)} labels")
        return self

    @property
    def width(self) -> int | None:
        """Expected output width per row (``K`` or ``D``), ``None`` if not declared."""
        if self.kind == "classification":
            return len(self.labels or [])
        return self.size


class Preprocessing(_Strict):
    """Element-wise affine transform applied to inputs: ``x * scale + shift``."""

    scale: float = 1.0
    shift: float = 0.0


class RuntimeOptions(_Strict):
    """Inference fast paths of one model version; every default is the safe choice.

    Attributes:
        inference_mode: torch: run under ``torch.inference_mode()`` (no autograd
            bookkeeping); false falls back to ``torch.no_grad()`` for models that
            mutate tensors in place under inference mode.
        precision: torch: ``fp32`` (default), or ``bf16`` / ``fp16`` to run the forward
            pass under ``torch.autocast`` with that dtype. Outputs are returned as float32.
            bf16 keeps fp32's exponent range; fp16 can overflow on large activations.
        pin_memory: torch on a GPU: stage each batch in a page-locked host buffer that is
            reused between batches and copy it with ``non_blocking=True``. Ignored on CPU.
        jit_compile: tensorflow: compile the forward pass with XLA
            (``tf.function(jit_compile=True)``); each new batch shape compiles once.
        warmup: run one batch of zeros right after loading, so the first real batch
            does not pay for lazy initialisation (cuDNN autotuning, XLA compilation).
    """

    inference_mode: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    pin_memory: bool = True
    jit_compile: bool = False
    warmup: bool = True


class DynamicBatching(_Strict):
    """How a worker batches concurrent online requests for this model (as Triton's
    ``dynamic_batching``): it gathers waiting requests until ``max_batch_size`` rows or
    ``max_queue_delay_ms`` after taking the first, then runs them as one forward pass.

    Attributes:
        max_batch_size: most rows in one gathered forward pass.
        max_queue_delay_ms: longest the first request waits for others, milliseconds.
            Default 0, as Triton's ``max_queue_delay_microseconds``: take only what is
            already queued. Under load, requests queue while the previous batch runs, so
            batches form without anyone waiting; a delay only adds latency when load is
            light. Raise it when a bigger batch is worth that wait (an expensive model on
            a GPU that scales well with batch size).
    """

    max_batch_size: BatchSize = 64
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=10_000)


_TORCH_ONLY = ("inference_mode", "precision", "pin_memory")
_TF_ONLY = ("jit_compile",)


class ModelManifest(_Strict):
    """Description of one model version; stored as ``manifest.yaml`` beside the artifact.

    Attributes:
        name: model name (letters, digits, ``._-``).
        version: positive integer version.
        framework: ``torch`` (``torch.export`` ``.pt2`` or TorchScript ``.pt``),
            ``tensorflow`` (``.keras`` or a SavedModel directory) or ``sklearn`` (``.skops``).
        artifact: file (or directory) name inside the version directory.
        inputs / outputs / preprocessing: see :class:`InputSpec`, :class:`OutputSpec`,
            :class:`Preprocessing`.
        default_batch_size: rows per forward pass unless the job says otherwise.
        trusted_types: scikit-learn only: the exact types skops may instantiate when
            loading; anything else in the file makes loading fail (no bare pickle).
        runtime: inference fast paths, see :class:`RuntimeOptions`.
        dynamic_batching: batching of online requests, see :class:`DynamicBatching`.
        description: free text.
    """

    name: str = Field(pattern=NAME_PATTERN)
    version: Version
    framework: Framework
    artifact: str = Field(min_length=1)
    inputs: InputSpec
    outputs: OutputSpec
    preprocessing: Preprocessing = Preprocessing()
    default_batch_size: BatchSize | None = None
    trusted_types: list[str] = []
    runtime: RuntimeOptions = RuntimeOptions()
    dynamic_batching: DynamicBatching = DynamicBatching()
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> ModelManifest:
        if "/" in self.artifact or self.artifact in {".", ".."}:
            raise ValueError(f"artifact must be a name inside the version directory, got {self.artifact!r}")
        if self.trusted_types and self.framework != "sklearn":
            raise ValueError("trusted_types applies to framework: sklearn only")
        for keys, framework in ((_TORCH_ONLY, "torch"), (_TF_ONLY, "tensorflow")):
            changed = [k for k in keys if getattr(self.runtime, k) != RuntimeOptions.model_fields[k].default]
            wrong = changed if self.framework != framework else []
            if wrong:
                raise ValueError(f"runtime.{', runtime.'.join(wrong)} applies to framework: {framework} only")
        return self

    @classmethod
    def read(cls, path: Path) -> ModelManifest:
        """Read and validate a ``manifest.yaml``.

        Raises:
            ManifestError: the file is missing, not YAML, or fails validation (the message
                names the file and each bad field).
        """
        if not path.is_file():
            raise ManifestError(f"{path}: manifest not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            return cls.model_validate(data)
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(manifest)'}: {e['msg']}" for e in exc.errors()
            )
            raise ManifestError(f"{path}: invalid manifest: {details}") from None

    def write(self, directory: Path) -> Path:
        """Write this manifest as ``directory/manifest.yaml`` and return its path."""
        path = directory / MANIFEST_FILE
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        return path


_FORMATS: dict[str, str] = {
    "sklearn": "a scikit-learn skops file",
    "torch": "a PyTorch archive (torch.export .pt2 or TorchScript .pt)",
    "tensorflow": "a Keras / TensorFlow model",
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # legacy Keras .h5 files


def artifact_format(path: Path) -> str | None:
    """Which framework wrote the artifact at ``path``, from its layout alone (no ML
    framework is imported, nothing is unpickled).

    Recognised: skops files (a zip with ``schema.json`` at its root), PyTorch archives
    (``torch.export`` and TorchScript zips: one top-level folder holding ``data.pkl``,
    ``archive_format`` or ``version``), Keras v3 ``.keras`` zips (``config.json`` and
    ``metadata.json`` at the root), HDF5 ``.h5`` files and SavedModel directories
    (``saved_model.pb``).

    Returns:
        ``sklearn``, ``torch`` or ``tensorflow``; ``None`` when the file is none of these
        (or cannot be read): the runtime's own loader then decides.
    """
    path = Path(path)
    if path.is_dir():
        return "tensorflow" if (path / "saved_model.pb").is_file() else None
    try:
        with path.open("rb") as f:
            head = f.read(8)
        if head == _HDF5_SIGNATURE:
            return "tensorflow"
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return None
    if "schema.json" in names:
        return "sklearn"
    if {"config.json", "metadata.json"} <= names:
        return "tensorflow"
    if any(n.count("/") == 1 and n.split("/")[1] in {"data.pkl", "archive_format", "version"} for n in names):
        return "torch"
    return None


def check_artifact(manifest: ModelManifest, directory: Path) -> None:
    """Check that ``directory`` holds the manifest's artifact and that the artifact is of
    the manifest's framework (see :func:`artifact_format`). Cheap: no model is loaded.

    Raises:
        ManifestError: the artifact is missing, or it is another framework's file; the
            message names the manifest file and the field to fix (``artifact`` or
            ``framework``).
    """
    directory = Path(directory)
    where = directory / MANIFEST_FILE
    path = directory / manifest.artifact
    if not path.exists():
        present = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST_FILE) if directory.is_dir() else []
        raise ManifestError(
            f"{where}: artifact: {manifest.artifact!r} not found in {directory} "
            f"(files there: {', '.join(present) or 'none'}); publish the model again, or fix artifact"
        )
    found = artifact_format(path)
    if found is not None and found != manifest.framework:
        raise ManifestError(
            f"{where}: framework: says {manifest.framework!r} but the artifact {manifest.artifact!r} is "
            f"{_FORMATS[found]}; set framework: {found}, or point artifact at the {manifest.framework} file"
        )


_CACHE: dict[Path, tuple[tuple[int, int], ModelManifest]] = {}


def _read_cached(path: Path) -> ModelManifest:
    """:meth:`ModelManifest.read`, skipped while the file's mtime and size are unchanged
    (parsing and validating the YAML costs ~10 ms, on every online request otherwise)."""
    try:
        st = path.stat()
    except OSError:
        return ModelManifest.read(path)  # raises the usual "not found"
    key = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    manifest = ModelManifest.read(path)
    _CACHE[path] = (key, manifest)
    return manifest


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """Split ``name`` or ``name:version`` into ``(name, version or None)``.

    Raises:
        ValueError: the name breaks the naming rule or the version is not a canonical
            positive integer.
    """
    name, sep, version = ref.strip().partition(":")
    if not re.match(NAME_PATTERN, name) or (sep and not is_version(version)):
        raise ValueError(f"{ref!r} is not 'name' or 'name:version' (a positive integer version)")
    return name, int(version) if sep else None


def is_version(name: str) -> bool:
    """A canonical positive integer in ASCII digits: ``1``, ``12``; not ``01``, ``²`` or ``0``."""
    return name.isascii() and name.isdecimal() and name == str(int(name)) and 0 < int(name) <= MAX_INT32


class ModelRepository:
    """Read-only view of ``<root>/<name>/<version>/manifest.yaml``.

    Args:
        root: the models directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def version_dir(self, name: str, version: int) -> Path:
        """Directory of one model version (it may not exist)."""
        if not re.match(NAME_PATTERN, name):
            raise ModelNotFoundError(f"invalid model name {name!r}")
        return self.root / name / str(int(version))

    def versions(self, name: str) -> list[int]:
        """Versions of ``name`` present in the repository, ascending."""
        model_dir = self.root / name
        if not re.match(NAME_PATTERN, name) or not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir()
                      if is_version(p.name) and (p / MANIFEST_FILE).is_file())

    def names(self) -> list[str]:
        """Model names that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def resolve(self, name: str, version: int | None = None) -> ModelManifest:
        """Manifest of ``name`` at ``version`` (the highest version when ``None``).

        Raises:
            ModelNotFoundError: no such model or version; the message lists what exists.
            ManifestError: the manifest is invalid or names another model / version.
        """
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(
                f"model {name!r} not found in {self.root} (models there: {known})"
            )
        if version is None:
            version = versions[-1]
        elif int(version) not in versions:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version} in {self.root} (versions: {versions})"
            )
        path = self.version_dir(name, version) / MANIFEST_FILE
        manifest = _read_cached(path)
        if manifest.name != name or manifest.version != int(version):
            raise ManifestError(
                f"{path}: manifest says {manifest.name}/{manifest.version}, "
                f"directory says {name}/{version}"
            )
        return manifest

    def check_artifact(self, manifest: ModelManifest) -> None:
        """:func:`check_artifact` for a manifest of this repository (e.g. at submit time).

        Raises:
            ManifestError: the artifact is missing or of another framework.
        """
        check_artifact(manifest, self.version_dir(manifest.name, manifest.version))

    def list(self) -> list[ModelManifest]:
        """Every valid manifest in the repository (invalid ones are skipped)."""
        out = []
        for name in self.names():
            for version in self.versions(name):
                try:
                    out.append(self.resolve(name, version))
                except ManifestError:
                    continue
        return out
