"""Loads model versions from the model repository once per worker process and caches them."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ml_framework.errors import ManifestError, MLFrameworkError
from ml_framework.manifest import (
    MANIFEST_FILE,
    ModelManifest,
    ModelRepository,
    check_artifact,
    parse_model_ref,
)
from ml_framework.settings import Settings
from worker import metrics
from worker.inputs import converter_for
from worker.outputs import check_outputs
from worker.runtimes import Runtime, runtime_class

log = logging.getLogger(__name__)


def load_runtime(manifest: ModelManifest, directory: Path, threads: int | None = None,
                 data_dir: Path | None = None, settings: Settings | None = None) -> Runtime:
    """Instantiate and load the runtime for ``manifest`` (framework imported lazily), with
    its input converter.

    Args:
        threads: framework intra-op threads, also the decoding threads of image inputs.
        data_dir: where image inputs' files lie (the workers' data directory).
        settings: the worker's settings, handed to the input converter (image inputs'
            object storage); ``None``: the process's.

    Raises:
        ManifestError: the artifact is missing or another framework's file (checked
            before any framework is imported), the runtime refused the manifest, or the
            input converter cannot be set up (a missing tokenizer file).
        ModelLoadError: the framework could not load the artifact.
    """
    check_artifact(manifest, directory)
    converter = converter_for(manifest, directory, data_dir, threads, settings)
    runtime = runtime_class(manifest.framework)(manifest, directory, threads)
    runtime.converter = converter
    runtime.load()
    return runtime


def _shape(dims: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def check_signature(runtime: Runtime) -> None:
    """Compare the manifest with what the loaded artifact itself declares
    (:attr:`Runtime.signature`): per-row input shape, input dtype, output width.

    A mismatch would fail every row, so it is refused at load, before any row runs.
    Artifacts that declare nothing (TorchScript, SavedModels) pass; the warm-up batch
    still tries them.

    Raises:
        ManifestError: naming the manifest file, the field to fix, and both values.
    """
    sig, manifest = runtime.signature, runtime.manifest
    spec = manifest.inputs
    where = f"{runtime.directory / MANIFEST_FILE}"
    model = f"the model {manifest.name}/{manifest.version} ({manifest.artifact})"
    row_shape = manifest.row_shape
    ours = (math.prod(row_shape),) if runtime.flattens_input else row_shape
    theirs = sig.row_shape
    if theirs is not None and (len(theirs) != len(ours) or any(t not in (None, o) for t, o in zip(theirs, ours, strict=True))):
        field = "inputs.shape" if spec.shape else "inputs.columns"
        raise ManifestError(
            f"{where}: {field}: the manifest gives the model rows of shape {_shape(ours)} "
            f"({len(spec.columns)} columns) but {model} takes rows of shape {_shape(theirs)}; "
            f"fix {field} to match the model"
        )
    if sig.dtype is not None and sig.dtype != spec.dtype:
        raise ManifestError(f"{where}: inputs.dtype: the manifest feeds {spec.dtype} but {model} takes {sig.dtype}")
    width = manifest.outputs.width
    if sig.output_width is not None and width is not None and sig.output_width != width:
        field = "outputs.labels" if manifest.outputs.kind == "classification" else "outputs.size"
        raise ManifestError(
            f"{where}: {field}: {model} returns {sig.output_width} values per row but the manifest's "
            f"{field} expects {width}"
        )


def validate_runtime(runtime: Runtime, sample=None) -> None:
    """Run one small batch through a loaded model and check it honours its manifest.

    Args:
        runtime: a loaded runtime.
        sample: a model input of a few rows; default two rows of neutral input (zeros;
            empty texts).

    Raises:
        ManifestError: the input spec does not fit the model, or the outputs do not fit
            the output spec (count, width, finiteness); the message says which.
    """
    manifest = runtime.manifest
    if sample is None:
        sample = runtime.converter.example(2)
    try:
        y = np.asarray(runtime.predict_batch(sample))
    except Exception as exc:
        raise ManifestError(
            f"{manifest.name}: a batch shaped {(len(sample), *manifest.row_shape)} "
            f"{manifest.inputs.dtype} (the manifest's input spec) fails in the model: {type(exc).__name__}: {exc}"
        ) from exc
    if y.ndim == 0 or y.shape[0] != len(sample):
        raise ManifestError(f"{manifest.name}: model returned {y.shape} for a batch of {len(sample)} rows")
    problem = check_outputs(y, manifest.outputs)
    if problem:
        raise ManifestError(f"{manifest.name}: output spec does not fit the model: {problem}")


def warm_up(runtime: Runtime, batch_size: int) -> str | None:
    """Run ``batch_size`` rows of zeros through a freshly loaded model, so that lazy
    initialisation (cuDNN autotuning, XLA compilation, allocator growth) happens before
    the first real batch.

    The batch goes through :meth:`Runtime.run`, so a warm-up batch too big for the device
    is split like any other. Zeros are not real data: a model may rightly fail on them
    (``log(x)``, a domain check), so a failure never stops the model from serving.

    An output whose width does not fit the output spec is the model's doing, not the
    zeros': that is raised.

    Returns:
        ``None``, or what went wrong (no row succeeded, or the output does not fit the
        output spec), for the caller to log.

    Raises:
        ManifestError: the model returns more or fewer values per row than the output
            spec declares (naming the manifest file and field).
    """
    manifest = runtime.manifest
    x = runtime.converter.example(batch_size)
    run = runtime.run(x, batch_size)
    if run.contract_error:
        raise ManifestError(f"{runtime.directory / MANIFEST_FILE}: {run.contract_error}")
    if not run.ok.any():
        return (f"a warm-up batch of {batch_size} rows of zeros shaped {manifest.row_shape} {manifest.inputs.dtype} "
                f"(the manifest's input spec) fails in the model: {next(iter(run.errors.values()))}")
    problem = check_outputs(run.outputs[run.ok][:1], manifest.outputs)
    return f"the warm-up output does not fit the output spec: {problem}" if problem else None


class ModelRegistry:
    """Per-process cache of loaded runtimes, keyed by ``(name, version)``, least recently
    used first out.

    A new model is loaded (and warmed up) before the least recently used one is unloaded,
    so a model that fails to load never costs a healthy one its place; while a load runs,
    ``max_models + 1`` models are in memory.

    Args:
        models_dir: root of the model repository.
        threads: framework intra-op threads for every runtime this process loads.
        data_dir: the workers' data directory (image inputs' files).
        settings: the worker's settings, handed to every input converter (image inputs'
            object storage); ``None``: the process's.
        max_models: loaded versions kept; loading one more unloads the least recently
            used, freeing its host and device memory.
        warmup_batch_size: rows of the warm-up batch run after each load (for manifests
            with ``runtime.warmup``; the manifest's ``default_batch_size`` wins).
    """

    def __init__(self, models_dir: Path, threads: int | None = None, max_models: int = 4,
                 warmup_batch_size: int = 32, data_dir: Path | None = None,
                 settings: Settings | None = None) -> None:
        self.repository = ModelRepository(models_dir)
        self.threads = threads
        self.data_dir = data_dir
        self.settings = settings
        self.max_models = max_models
        self.warmup_batch_size = warmup_batch_size
        self.load_seconds: dict[tuple[str, int], float] = {}
        self._cache: OrderedDict[tuple[str, int], Runtime] = OrderedDict()
        self._names: tuple[str, ...] = ()  # snapshot for readers that must not wait on a load
        self._lock = threading.Lock()

    def get(self, name: str, version: int | None = None) -> Runtime:
        """:meth:`fetch` without the load time."""
        return self.fetch(name, version)[0]

    def fetch(self, name: str, version: int | None = None) -> tuple[Runtime, float | None]:
        """The loaded runtime of ``name``/``version`` (latest when ``None``), loading and
        warming it up on first use, and the seconds that load took (``None`` when the
        model was loaded already: a warm start).

        A manifest that does not fit its artifact (missing file, other framework, input
        shape or dtype, output width: :func:`check_signature`, :func:`warm_up`) is refused
        here, so a shard for it fails as a whole with that error.

        Raises:
            ModelNotFoundError, ManifestError, ModelLoadError: see the repository and runtimes.
        """
        manifest = self.repository.resolve(name, version)
        key = (manifest.name, manifest.version)
        with self._lock:
            runtime = self._cache.get(key)
            if runtime is not None:
                self._cache.move_to_end(key)
                self._names = tuple(f"{n}/{v}" for n, v in self._cache)
                return runtime, None
            started = time.perf_counter()
            runtime = load_runtime(manifest, self.repository.version_dir(*key), self.threads, self.data_dir,
                                   self.settings)
            try:
                check_signature(runtime)
                problem = warm_up(runtime, min(manifest.default_batch_size or self.warmup_batch_size, 1024)) \
                    if manifest.runtime.warmup else None
            except BaseException:
                runtime.unload()  # refused: free its memory now, the cache never held it
                raise
            if problem:
                log.warning("model %s/%s: %s; it stays loaded, and rows it fails on get row errors",
                            key[0], key[1], problem)
            self.load_seconds[key] = elapsed = time.perf_counter() - started
            metrics.MODEL_LOAD.labels(**metrics.model_labels(*key)).observe(elapsed)
            log.info("loaded model %s/%s (%s)%s in %.2f s", key[0], key[1], manifest.framework,
                     " and warmed it up" if manifest.runtime.warmup else "", elapsed)
            while len(self._cache) >= self.max_models:
                old_key, old = self._cache.popitem(last=False)
                old.unload()
                log.info("unloaded model %s/%s (max %d cached models)", *old_key, self.max_models)
            self._cache[key] = runtime
            self._names = tuple(f"{n}/{v}" for n, v in self._cache)
            return runtime, elapsed

    def close(self) -> None:
        """Unload every model, freeing its host and device memory."""
        with self._lock:
            while self._cache:
                self._cache.popitem(last=False)[1].unload()
            self._names = ()

    def loaded(self) -> list[str]:
        """``name/version`` of each cached model, least recently used first. Never waits
        for a load in progress (the heartbeat thread calls it)."""
        return list(self._names)

    def preload(self, refs: list[str]) -> list[str]:
        """Load (and warm up) each of ``refs`` (``name`` or ``name:version``).

        A model that fails to load is logged and skipped: the worker still starts, and
        shards for that model fail with the same error.

        Returns:
            One line per model that failed.

        Raises:
            ValueError: more refs than ``max_models``: the first ones would be unloaded
                again before the worker starts.
        """
        if len(refs) > self.max_models:
            raise ValueError(f"{len(refs)} models to preload but at most {self.max_models} stay loaded "
                             "(worker_max_cached_models)")
        failures = []
        for ref in refs:
            try:
                self.get(*parse_model_ref(ref))
            except (MLFrameworkError, ValueError) as exc:
                log.error("preloading model %s failed: %s", ref, exc)
                failures.append(f"{ref}: {exc}")
        return failures
