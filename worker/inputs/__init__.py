"""Input converters: from a piece of a shard (an Arrow table) to the model's input batch,
one per input kind of the manifest (see :mod:`ml_framework.manifest.specs`).

- ``columns``: :mod:`worker.inputs.columns`
- ``tensor``: :mod:`worker.inputs.tensor`
- ``image``: :mod:`worker.inputs.image` (decoding with Pillow)
- ``text``: :mod:`worker.inputs.text` (Hugging Face ``tokenizers``)
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ml_framework.manifest import ModelManifest
from ml_framework.settings import Settings
from worker.inputs.base import Converted, InputConverter, finite_rows

_CONVERTERS = {
    "columns": ("worker.inputs.columns", "ColumnsConverter"),
    "tensor": ("worker.inputs.tensor", "TensorConverter"),
    "image": ("worker.inputs.image", "ImageConverter"),
    "text": ("worker.inputs.text", "TextConverter"),
}


def converter_for(manifest: ModelManifest, directory: Path, data_dir: Path | None = None,
                  threads: int | None = None, settings: Settings | None = None) -> InputConverter:
    """The input converter of a model version (its module imported on first use).

    Args:
        data_dir: the workers' data directory (image inputs' files).
        threads: decoding threads of image inputs (``None``: the CPU count).
        settings: the worker's settings (image inputs' object storage; ``None``: the
            process's).

    Raises:
        ManifestError: the converter cannot be set up (a tokenizer file that is missing
            or unreadable).
    """
    module, name = _CONVERTERS[manifest.inputs.kind]
    return getattr(import_module(module), name)(manifest, directory, data_dir, threads=threads, settings=settings)


__all__ = ["Converted", "InputConverter", "converter_for", "finite_rows"]
