"""Loads model versions from the model repository once per worker process and caches them."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ml_framework.errors import ManifestError
from ml_framework.manifest import ModelManifest, ModelRepository
from worker.runtimes import Runtime, runtime_class
from worker.runtimes.base import to_record

log = logging.getLogger(__name__)


def load_runtime(manifest: ModelManifest, directory: Path, threads: int | None = None) -> Runtime:
    """Instantiate and load the runtime for ``manifest`` (framework imported lazily)."""
    runtime = runtime_class(manifest.framework)(manifest, directory, threads)
    runtime.load()
    return runtime


def validate_runtime(runtime: Runtime, sample: np.ndarray | None = None) -> None:
    """Run one small batch through a loaded model and check it honours its manifest.

    Args:
        runtime: a loaded runtime.
        sample: ``(N, *row_shape)`` input; default two rows of zeros.

    Raises:
        ManifestError: the input spec does not fit the model, or the outputs do not fit
            the output spec (count, width, finiteness); the message says which.
    """
    spec = runtime.manifest.inputs
    if sample is None:
        sample = np.zeros((2, *spec.row_shape), dtype=spec.dtype)
    try:
        y = np.asarray(runtime.predict_batch(sample.astype(spec.dtype, copy=False)))
    except Exception as exc:
        raise ManifestError(
            f"{runtime.manifest.name}: a batch shaped {(len(sample), *spec.row_shape)} "
            f"{spec.dtype} (the manifest's input spec) fails in the model: {type(exc).__name__}: {exc}"
        ) from exc
    if y.ndim == 0 or y.shape[0] != len(sample):
        raise ManifestError(
            f"{runtime.manifest.name}: model returned {y.shape} for a batch of {len(sample)} rows"
        )
    try:
        for row in y:
            to_record(row, runtime.manifest.outputs)
    except Exception as exc:
        raise ManifestError(f"{runtime.manifest.name}: output spec does not fit the model: {exc}") from exc


class ModelRegistry:
    """Per-process cache of loaded runtimes, keyed by ``(name, version)``.

    Args:
        models_dir: root of the model repository.
        threads: framework intra-op threads for every runtime this process loads.
    """

    def __init__(self, models_dir: Path, threads: int | None = None) -> None:
        self.repository = ModelRepository(models_dir)
        self.threads = threads
        self._cache: dict[tuple[str, int], Runtime] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: int | None = None) -> Runtime:
        """The loaded runtime of ``name``/``version``, loading it on first use.

        Raises:
            ModelNotFoundError, ManifestError, ModelLoadError: see the repository and runtimes.
        """
        manifest = self.repository.resolve(name, version)
        key = (manifest.name, manifest.version)
        with self._lock:
            runtime = self._cache.get(key)
            if runtime is None:
                started = time.perf_counter()
                runtime = load_runtime(manifest, self.repository.version_dir(*key), self.threads)
                log.info("loaded model %s/%s (%s) in %.2f s", key[0], key[1], manifest.framework,
                         time.perf_counter() - started)
                self._cache[key] = runtime
            return runtime
