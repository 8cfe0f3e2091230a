"""The read-only view of the model repository, and what an artifact file is.

Layout (as Triton's model repository)::

    <models_dir>/<name>/<version>/manifest.yaml
    <models_dir>/<name>/<version>/<artifact file>

Versions are positive integers; "latest" is the highest. Reading manifests needs no ML
framework, so producers use this module to list models and validate jobs at submit time.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from ml_framework.constants import MAX_INT32
from ml_framework.errors import ManifestError, ModelNotFoundError
from ml_framework.manifest.model import MANIFEST_FILE, NAME_PATTERN, ModelManifest

_FORMATS: dict[str, str] = {
    "sklearn": "a scikit-learn skops file",
    "torch": "a PyTorch archive (torch.export .pt2 or TorchScript .pt)",
    "tensorflow": "a Keras / TensorFlow model",
    "onnx": "an ONNX model (.onnx)",
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # legacy Keras .h5 files
_ONNX_FIRST_BYTE = b"\x08"  # protobuf tag of ModelProto field 1 (ir_version), wire type varint


_KINDS: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    # kind: (framework, what it is, the file name endings it goes by, whether its loader needs one of them)
    "skops": ("sklearn", "a scikit-learn skops file", (".skops",), False),
    "torch.export": ("torch", "a torch.export program", (".pt2",), True),  # loaded by name: .pt2
    "torchscript": ("torch", "a TorchScript archive", (".pt", ".pth"), False),
    "torch": ("torch", "a PyTorch archive", (".pt", ".pth"), False),
    "keras": ("tensorflow", "a Keras v3 file", (".keras",), True),  # keras.models.load_model goes by name
    "h5": ("tensorflow", "a legacy Keras HDF5 file", (".h5", ".hdf5"), True),
    "savedmodel": ("tensorflow", "a TensorFlow SavedModel directory", (), False),
    "onnx": ("onnx", "an ONNX graph", (".onnx",), False),
}
_SUFFIX_KIND = {suffix: kind for kind, (_, _, suffixes, _) in _KINDS.items() for suffix in suffixes}


def artifact_kind(path: Path) -> str | None:
    """What the artifact at ``path`` is, from its layout alone (no ML framework is
    imported, nothing is unpickled): a key of ``_KINDS``.

    Recognised: skops files (a zip with ``schema.json`` at its root), PyTorch archives
    (one top-level folder holding ``data.pkl``, ``archive_format`` or ``version``:
    ``torch.export`` programs have ``archive_format``, TorchScript ``code/``), Keras v3
    ``.keras`` zips (``config.json`` and ``metadata.json`` at the root), HDF5 files,
    SavedModel directories (``saved_model.pb``) and ONNX graphs (an ``.onnx`` file that
    starts as an ONNX ``ModelProto`` does: field 1, ``ir_version``, a varint; the format has
    no magic bytes). ``None`` when the file is none of these (or cannot be read): the
    runtime's own loader then decides.
    """
    path = Path(path)
    if path.is_dir():
        return "savedmodel" if (path / "saved_model.pb").is_file() else None
    try:
        with path.open("rb") as f:
            head = f.read(8)
        if head == _HDF5_SIGNATURE:
            return "h5"
        if not zipfile.is_zipfile(path):
            return "onnx" if path.suffix.lower() == ".onnx" and head[:1] == _ONNX_FIRST_BYTE else None
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return None
    if "schema.json" in names:
        return "skops"
    if {"config.json", "metadata.json"} <= names:
        return "keras"
    inner = {n.split("/", 1)[1] for n in names if n.count("/") >= 1}
    if "archive_format" in inner:
        return "torch.export"
    if any(n.startswith("code/") for n in inner):
        return "torchscript"
    if inner & {"data.pkl", "version"}:
        return "torch"
    return None


def artifact_format(path: Path) -> str | None:
    """Which framework wrote the artifact at ``path`` (see :func:`artifact_kind`).

    Returns:
        ``sklearn``, ``torch``, ``tensorflow`` or ``onnx``; ``None`` when the file is none of these
        (or cannot be read): the runtime's own loader then decides.
    """
    kind = artifact_kind(path)
    return None if kind is None else _KINDS[kind][0]


def artifact_name_mismatch(path: Path, name: str) -> tuple[str, str | None] | None:
    """What is wrong when the artifact at ``path`` is stored under the file name ``name``:
    a name whose ending belongs to another kind of file (``model.pt2`` for a skops file),
    or a kind whose loader goes by the name stored without its ending (a ``torch.export``
    program not named ``*.pt2``, a Keras file not named ``*.keras``).

    Returns:
        ``None`` when the name fits (or the file's kind is unknown); else ``(problem,
        suggested name or None)``, e.g. ``("'model.pt2' is the name of a torch.export
        program, but the file is a scikit-learn skops file", "model.skops")``.
    """
    kind = artifact_kind(path)
    if kind is None:
        return None
    _, what, suffixes, required = _KINDS[kind]
    suffix = Path(name).suffix.lower()
    claimed = _SUFFIX_KIND.get(suffix)
    if suffix in suffixes or (claimed is None and not required):
        return None
    suggestion = Path(name).stem + suffixes[0] if suffixes else Path(name).stem
    said = f"the name of {_KINDS[claimed][1]}" if claimed else f"a name without {' or '.join(suffixes)}"
    return f"{name!r} is {said}, but the file is {what}", suggestion


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
    misnamed = artifact_name_mismatch(path, manifest.artifact)
    if misnamed is not None:
        problem, suggestion = misnamed
        raise ManifestError(f"{where}: artifact: {problem}; rename the file to {suggestion!r} and set artifact: "
                            f"{suggestion}" if suggestion else f"{where}: artifact: {problem}")



def framework_mismatch(path: Path, framework: str) -> str | None:
    """What is wrong when the artifact at ``path`` is another framework's file than
    ``framework`` (see :func:`artifact_format`): ``"this is a scikit-learn skops file, but
    framework says 'torch'; set framework: sklearn"``. ``None`` when it matches, or when
    the file's layout does not tell."""
    found = artifact_format(Path(path))
    if found is None or found == framework:
        return None
    return f"this is {_FORMATS[found]}, but framework says {framework!r}; set framework: {found}"

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
