"""The model manifest: ``manifest.yaml`` beside each model version's artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, model_validator

from ml_framework.constants import MAX_INT32
from ml_framework.errors import ManifestError
from ml_framework.manifest.specs import (
    BatchSize,
    DynamicBatching,
    InputSpec,
    OnnxSpec,
    OutputSpec,
    Preprocessing,
    RuntimeOptions,
    TokenizerSpec,
    _Strict,
)

MANIFEST_FILE = "manifest.yaml"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

Framework = Literal["torch", "tensorflow", "sklearn", "onnx"]
Version = Annotated[PositiveInt, Field(le=MAX_INT32)]

_TORCH_ONLY = ("inference_mode", "precision", "pin_memory")
_TF_ONLY = ("jit_compile",)


class ModelManifest(_Strict):
    """Description of one model version; stored as ``manifest.yaml`` beside the artifact.

    Attributes:
        name: model name (letters, digits, ``._-``).
        version: positive integer version.
        framework: ``torch`` (``torch.export`` ``.pt2`` or TorchScript ``.pt``),
            ``tensorflow`` (``.keras`` or a SavedModel directory), ``sklearn`` (``.skops``)
            or ``onnx`` (an ``.onnx`` graph, served by ONNX Runtime).
        artifact: file (or directory) name inside the version directory.
        inputs / outputs / preprocessing: see :class:`InputSpec`, :class:`OutputSpec`,
            :class:`Preprocessing`.
        tokenizer: text inputs only: see :class:`TokenizerSpec`.
        default_batch_size: rows per forward pass unless the job says otherwise.
        trusted_types: scikit-learn only: the exact types skops may instantiate when
            loading; anything else in the file makes loading fail (no bare pickle).
        onnx: ``onnx`` only: the graph input and output to use, see :class:`OnnxSpec`.
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
    tokenizer: TokenizerSpec | None = None
    default_batch_size: BatchSize | None = None
    trusted_types: list[str] = Field(default_factory=list)
    onnx: OnnxSpec | None = None
    runtime: RuntimeOptions = RuntimeOptions()
    dynamic_batching: DynamicBatching = DynamicBatching()
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> ModelManifest:
        if "/" in self.artifact or self.artifact in {".", ".."}:
            raise ValueError(f"artifact must be a name inside the version directory, got {self.artifact!r}")
        if self.trusted_types and self.framework != "sklearn":
            raise ValueError("trusted_types applies to framework: sklearn only")
        if self.onnx is not None and self.framework != "onnx":
            raise ValueError("onnx (graph input and output names) applies to framework: onnx only")
        for keys, framework in ((_TORCH_ONLY, "torch"), (_TF_ONLY, "tensorflow")):
            changed = [k for k in keys if getattr(self.runtime, k) != RuntimeOptions.model_fields[k].default]
            wrong = changed if self.framework != framework else []
            if wrong:
                raise ValueError(f"runtime.{', runtime.'.join(wrong)} applies to framework: {framework} only")
        self._check_inputs()
        return self

    def _check_inputs(self) -> None:
        kind, prep = self.inputs.kind, self.preprocessing
        if (self.tokenizer is None) != (kind != "text"):
            raise ValueError("inputs.kind text needs a tokenizer" if kind == "text"
                             else "tokenizer applies to inputs.kind text only")
        if kind != "image" and (fields := prep.image_fields()):
            raise ValueError(f"preprocessing.{', preprocessing.'.join(fields)} applies to inputs.kind image only")
        if kind == "text" and self.framework != "torch":  # features go in as positional tensors
            raise ValueError(f"inputs.kind text needs a torch model, not {self.framework}")
        if kind == "text" and (prep.affine or prep.mean is not None):
            raise ValueError("preprocessing (scale, shift, mean, std) does not apply to text inputs")
        if kind != "image":
            if prep.mean is not None:
                raise ValueError("preprocessing.mean / std apply to inputs.kind image only")
            return
        if self.framework == "sklearn":
            raise ValueError("inputs.kind image needs a torch, tensorflow or onnx model")
        if prep.image_size is None:
            raise ValueError("inputs.kind image needs a fixed image size: preprocessing.crop, "
                             "or preprocessing.resize as [height, width]")
        crop, resize = prep.crop, prep.resize
        if crop is not None and resize is not None:
            ch, cw = (crop, crop) if isinstance(crop, int) else crop
            rh, rw = (resize, resize) if isinstance(resize, int) else resize  # an int is the shorter side
            if ch > rh or cw > rw:
                raise ValueError(f"preprocessing.crop {crop} is larger than preprocessing.resize {resize}: "
                                 "every image would be smaller than the crop")
        if prep.mean is not None and len(prep.mean) != prep.channels:
            raise ValueError(f"preprocessing.mean / std give {len(prep.mean)} values for "
                             f"{prep.channels} channel(s) ({prep.color})")
        if self.inputs.shape is not None and tuple(self.inputs.shape) != self.row_shape:
            raise ValueError(f"inputs.shape {self.inputs.shape} differs from the prepared image's "
                             f"{list(self.row_shape)} ({prep.layout}, from preprocessing)")

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Per-row shape of the model's input, batch dimension excluded: the prepared
        image's ``(C, H, W)`` / ``(H, W, C)``, a text's ``(tokenizer.max_length,)`` (the
        longest; batches are often shorter), else ``inputs.row_shape``."""
        if self.inputs.kind == "image":
            return self.preprocessing.image_shape()
        if self.inputs.kind == "text" and self.tokenizer is not None:
            return (self.tokenizer.max_length,)
        return self.inputs.row_shape

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
