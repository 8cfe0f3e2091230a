"""Put models into the model repository: one helper per framework, plus existing artifacts.

Every path validates before publishing: the artifact is loaded by the same runtime a
worker uses and one batch runs through it (a sample you pass, else zeros of the input
spec's shape). Only then is the version directory moved into place, atomically, so
workers never see a half-written version.

Example::

    from worker.export import export_sklearn
    export_sklearn(clf, "models", "digits-sklearn",
                   inputs={"columns": [f"pixel_{i}" for i in range(64)]})
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ml_framework.errors import ManifestError, MLFrameworkError
from ml_framework.manifest import (
    MANIFEST_FILE,
    InputSpec,
    ModelManifest,
    ModelRepository,
    OutputSpec,
    Preprocessing,
    TokenizerSpec,
    framework_mismatch,
)
from worker.registry import load_runtime, validate_runtime

SpecLike = Mapping[str, Any] | InputSpec | OutputSpec | Preprocessing


def _dump(spec: SpecLike | None) -> Any:
    if spec is None or isinstance(spec, Mapping):
        return spec
    return spec.model_dump()


def _publish(
    models_dir: Path | str,
    write: Callable[[Path], None],
    *,
    name: str,
    framework: str,
    artifact: str,
    inputs: SpecLike,
    outputs: SpecLike,
    version: int | None,
    preprocessing: SpecLike | None,
    default_batch_size: int | None,
    trusted_types: list[str] | None,
    description: str,
    sample: np.ndarray | None,
    runtime: SpecLike | None = None,
    dynamic_batching: SpecLike | None = None,
    tokenizer: SpecLike | None = None,
    shown: Mapping[str, str] | None = None,
    onnx: SpecLike | None = None,
) -> ModelManifest:
    """Validate the manifest, ``write`` the artifact into a staging directory beside the
    version's, load it and run one batch, then move it into place. On any failure nothing
    is left behind: neither the staging directory nor the directories made for it. The
    files in an error message are named as in ``shown`` (``artifact`` and ``manifest``:
    what the user gave), not by their staging path."""
    repo = ModelRepository(Path(models_dir))
    version = version or max(repo.versions(name), default=0) + 1
    fields = {
        "name": name, "version": version, "framework": framework, "artifact": artifact,
        "inputs": _dump(inputs), "outputs": _dump(outputs),
        "default_batch_size": default_batch_size, "trusted_types": trusted_types or [],
        "description": description,
    }
    if preprocessing is not None:
        fields["preprocessing"] = _dump(preprocessing)
    if runtime is not None:
        fields["runtime"] = _dump(runtime)
    if dynamic_batching is not None:
        fields["dynamic_batching"] = _dump(dynamic_batching)
    if tokenizer is not None:  # text inputs; ``write`` puts the tokenizer file beside the artifact
        fields["tokenizer"] = _dump(tokenizer)
    if onnx is not None:  # framework onnx: the graph's input and output names
        fields["onnx"] = _dump(onnx)
    try:
        manifest = ModelManifest.model_validate(fields)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ManifestError(f"{name}/{version}: invalid manifest: {details}") from None
    final = repo.version_dir(name, version)
    if final.exists():
        raise ManifestError(f"{final} already exists; versions are immutable, pick another version")
    made = [d for d in (final.parent, *final.parent.parents) if not d.exists()]  # innermost first
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=final.parent))
    try:
        write(staging / artifact)
        manifest.write(staging)
        validate_runtime(load_runtime(manifest, staging), sample)
        staging.rename(final)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in made:
            with contextlib.suppress(OSError):  # not empty: another version appeared meanwhile
                directory.rmdir()
        if isinstance(exc, MLFrameworkError) and shown:
            exc.args = (_as_shown(str(exc), staging, artifact, shown), *exc.args[1:])
        raise
    return manifest


def _as_shown(message: str, staging: Path, artifact: str, shown: Mapping[str, str]) -> str:
    """``message`` with the staging paths of the artifact and manifest replaced by the
    names in ``shown`` (keys ``artifact``, ``manifest``), and the staging directory by
    ``the new version``."""
    for path, key in ((staging / artifact, "artifact"), (staging / MANIFEST_FILE, "manifest")):
        if key in shown:
            message = message.replace(str(path), shown[key])
    if "artifact" in shown:
        message = message.replace(repr(artifact), repr(shown["artifact"]))
    return message.replace(str(staging), "the new version")


def export_sklearn(
    model: Any,
    models_dir: Path | str,
    name: str,
    *,
    inputs: SpecLike,
    outputs: SpecLike | None = None,
    version: int | None = None,
    preprocessing: SpecLike | None = None,
    default_batch_size: int | None = None,
    description: str = "",
    sample: np.ndarray | None = None,
) -> ModelManifest:
    """Save a fitted scikit-learn estimator with skops and publish it.

    The types skops does not trust by default are recorded in the manifest's
    ``trusted_types`` (you are exporting your own object, so you vouch for them);
    workers refuse any other type at load.

    Args:
        model: a fitted estimator or pipeline.
        models_dir: model repository root.
        name: model name.
        inputs: input spec (``columns``, ``dtype``, ``shape``...).
        outputs: output spec; default: classification over ``model.classes_`` for
            classifiers, regression otherwise.
        version: default: the next free integer.
        sample: ``(N, *row_shape)`` rows to validate with; default zeros.

    Returns:
        The published manifest.

    Raises:
        ManifestError: invalid spec, or the model does not honour it.
    """
    import skops.io as sio

    if outputs is None:
        if hasattr(model, "classes_"):
            outputs = {"kind": "classification",
                       "labels": [c.item() if hasattr(c, "item") else c for c in model.classes_]}
        else:
            outputs = {"kind": "regression"}
    trusted = sio.get_untrusted_types(data=sio.dumps(model))
    return _publish(
        models_dir, lambda path: sio.dump(model, path), name=name, framework="sklearn",
        artifact="model.skops", inputs=inputs, outputs=outputs, version=version,
        preprocessing=preprocessing, default_batch_size=default_batch_size,
        trusted_types=trusted, description=description, sample=sample,
    )


def export_torch(
    model: Any,
    models_dir: Path | str,
    name: str,
    *,
    inputs: SpecLike,
    outputs: SpecLike,
    version: int | None = None,
    preprocessing: SpecLike | None = None,
    default_batch_size: int | None = None,
    description: str = "",
    sample: np.ndarray | None = None,
    method: str = "export",
    runtime: SpecLike | None = None,
    dynamic_batching: SpecLike | None = None,
) -> ModelManifest:
    """Export a ``torch.nn.Module`` and publish it.

    Args:
        model: the module; it is put in eval mode and moved to CPU for export.
        method: ``export`` (``torch.export`` with a dynamic batch dimension, ``.pt2``),
            ``torchscript`` (``torch.jit.trace``, ``.pt``) for models ``torch.export``
            cannot capture, or ``script`` (``torch.jit.script``, ``.pt``) for models whose
            control flow depends on the input.
        runtime: the manifest's ``runtime`` options (precision, pinned memory, ...).
        dynamic_batching: the manifest's ``dynamic_batching`` options for online requests.
        Other arguments: as :func:`export_sklearn`.

    Raises:
        ManifestError: invalid spec, export failure, or the model does not honour the spec.
    """
    import torch

    spec = InputSpec.model_validate(_dump(inputs))
    shape = spec.row_shape
    if spec.kind == "image":  # the prepared image's shape, from preprocessing
        shape = Preprocessing.model_validate(_dump(preprocessing) or {}).image_shape()
    example = torch.zeros((2, *shape), dtype=getattr(torch, spec.dtype))
    model = model.eval().to("cpu")

    def write(path: Path) -> None:
        try:
            if method == "export":
                batch = torch.export.Dim("batch", min=1, max=1 << 24)
                program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
                torch.export.save(program, str(path))
            elif method == "torchscript":
                torch.jit.save(torch.jit.trace(model, example), str(path))
            elif method == "script":
                torch.jit.save(torch.jit.script(model), str(path))
            else:
                raise ValueError(f"method must be 'export', 'torchscript' or 'script', got {method!r}")
        except Exception as exc:
            raise ManifestError(f"{name}: torch {method} failed: {exc}") from exc

    artifact = "model.pt2" if method == "export" else "model.pt"
    return _publish(
        models_dir, write, name=name, framework="torch", artifact=artifact, inputs=inputs,
        outputs=outputs, version=version, preprocessing=preprocessing,
        default_batch_size=default_batch_size, trusted_types=None, description=description,
        sample=sample, runtime=runtime, dynamic_batching=dynamic_batching,
    )


def export_keras(
    model: Any,
    models_dir: Path | str,
    name: str,
    *,
    inputs: SpecLike,
    outputs: SpecLike,
    version: int | None = None,
    preprocessing: SpecLike | None = None,
    default_batch_size: int | None = None,
    description: str = "",
    sample: np.ndarray | None = None,
    runtime: SpecLike | None = None,
    dynamic_batching: SpecLike | None = None,
) -> ModelManifest:
    """Save a Keras model as ``model.keras`` and publish it. Arguments as :func:`export_sklearn`;
    ``runtime``: the manifest's ``runtime`` options (``jit_compile``, ``warmup``);
    ``dynamic_batching``: its options for online requests."""
    return _publish(
        models_dir, lambda path: model.save(path), name=name, framework="tensorflow",
        artifact="model.keras", inputs=inputs, outputs=outputs, version=version,
        preprocessing=preprocessing, default_batch_size=default_batch_size, trusted_types=None,
        description=description, sample=sample, runtime=runtime, dynamic_batching=dynamic_batching,
    )


def add_artifact(artifact: Path | str, models_dir: Path | str, manifest: Mapping[str, Any],
                 search: Sequence[Path | str] = (), manifest_path: Path | str | None = None) -> ModelManifest:
    """Publish an existing artifact (file, SavedModel directory, ``.onnx`` graph) with a manifest.

    Args:
        artifact: path of the artifact to copy into the repository.
        manifest: manifest fields (``name``, ``framework``, ``inputs``, ``outputs``, ...,
            every key of :class:`ModelManifest`); ``artifact`` defaults to the file's name,
            ``version`` to the next free one.
        search: directories where a text model's tokenizer file (``tokenizer.file``) is
            looked for after the artifact's own directory (``mlf models add`` passes the
            manifest's directory); it is copied beside the artifact.
        manifest_path: the file ``manifest`` was read from, named in error messages.

    Errors name ``artifact`` and ``manifest_path`` as given (never the staging copy), and
    a failed add leaves nothing in ``models_dir``.

    Raises:
        ManifestError: invalid manifest, a tokenizer file not found, or the artifact does
            not honour the manifest.
        FileNotFoundError: ``artifact`` does not exist.
    """
    src = Path(artifact)
    if not src.exists():
        raise FileNotFoundError(f"artifact not found: {src}")
    fields = dict(manifest)
    where = str(manifest_path) if manifest_path is not None else "the manifest"
    known = set(ModelManifest.model_fields)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ManifestError(f"unknown manifest key(s): {unknown} (known: {sorted(known)})")
    for key in ("name", "framework", "inputs", "outputs"):
        if key not in fields:
            raise ManifestError(f"manifest needs {key!r}")
    mismatch = framework_mismatch(src, str(fields["framework"]))
    if mismatch:
        raise ManifestError(f"{src}: {mismatch} in {where}, or give the {fields['framework']} file. "
                            "Nothing was added.")
    tokenizer_src = None
    if fields.get("tokenizer") is not None:
        spec = fields["tokenizer"]
        file = TokenizerSpec.model_validate(spec).file if isinstance(spec, Mapping) else spec.file
        places = [src.parent, *map(Path, search)]
        tokenizer_src = next((d / file for d in places if (d / file).is_file()), None)
        if tokenizer_src is None:
            raise ManifestError(f"tokenizer file {file!r} not found beside the artifact or the manifest "
                                f"(looked in {', '.join(str(d) for d in places)})")

    def write(path: Path) -> None:
        if src.is_dir():
            shutil.copytree(src, path)
        else:
            shutil.copy2(src, path)
        if tokenizer_src is not None:
            shutil.copy2(tokenizer_src, path.parent / tokenizer_src.name)

    return _publish(
        models_dir, write, name=fields["name"], framework=fields["framework"],
        artifact=fields.get("artifact") or src.name, inputs=fields["inputs"],
        outputs=fields["outputs"], version=fields.get("version"),
        preprocessing=fields.get("preprocessing"), default_batch_size=fields.get("default_batch_size"),
        trusted_types=fields.get("trusted_types"), description=fields.get("description", ""),
        sample=None, runtime=fields.get("runtime"), dynamic_batching=fields.get("dynamic_batching"),
        tokenizer=fields.get("tokenizer"), shown={"artifact": str(src), "manifest": where},
        onnx=fields.get("onnx"),
    )
