"""TensorFlow runtime: Keras ``.keras`` files or SavedModel directories."""

from __future__ import annotations

import contextlib
import gc
import os

import numpy as np

from ml_framework.errors import ModelLoadError
from ml_framework.logging import native_stderr_filtered
from worker.devices import discover, memory_fraction
from worker.runtimes.base import Runtime, Signature

TF_IMPORT_NOISE = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog() is called")
"""TensorFlow's start-up lines on stderr that ``TF_CPP_MIN_LOG_LEVEL`` does not silence."""


def import_tensorflow():
    """``import tensorflow``, its start-up notices (:data:`TF_IMPORT_NOISE`) logged at
    DEBUG instead of printed, C++ INFO and WARNING records off unless
    ``TF_CPP_MIN_LOG_LEVEL`` is set. Returns the ``tensorflow`` module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_filtered(TF_IMPORT_NOISE):
        import tensorflow as tf
    return tf


class TensorFlowRuntime(Runtime):
    """Serves a Keras model (``keras.models.load_model``, safe mode on) or a SavedModel's
    ``serving_default`` signature.

    TensorFlow is imported here, on first load, so processes that never serve a TF model
    never pay its start-up cost. GPU memory grows on demand (``set_memory_growth``, also
    ``TF_FORCE_GPU_ALLOW_GROWTH=true``) instead of TensorFlow's default of reserving the
    whole device; with several processes on one GPU, each gets a fixed share of its
    memory instead (a logical device with a memory limit). With the manifest's
    ``runtime.jit_compile`` the Keras forward pass runs as ``tf.function(jit_compile=True)``
    (XLA).
    """

    framework = "tensorflow"

    def load(self) -> None:
        """Load the model. Raises ``ModelLoadError``."""
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        tf = import_tensorflow()

        if self.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass  # TF already initialised in this process; keep its thread pools
        limit_mb = memory_limit_mb()
        for gpu in tf.config.list_physical_devices("GPU"):
            # RuntimeError: devices already initialised by an earlier model; set then
            with contextlib.suppress(RuntimeError):
                if limit_mb is not None:  # several processes share the GPU: cap this one
                    tf.config.set_logical_device_configuration(
                        gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit_mb)])
                else:
                    tf.config.experimental.set_memory_growth(gpu, True)
        self._tf = tf
        self._fn = None
        path = self.artifact_path
        try:
            if path.is_dir():
                loaded = tf.saved_model.load(str(path))
                self._signature = loaded.signatures["serving_default"]
                self._saved = loaded  # keep the object alive
                self.model = None
            else:
                import keras

                self.model = keras.models.load_model(path, compile=False, safe_mode=True)
                self.signature = keras_signature(self.model)
                if self.manifest.runtime.jit_compile:
                    model = self.model
                    self._fn = tf.function(lambda x: model(x, training=False), jit_compile=True)
        except Exception as exc:
            raise ModelLoadError(f"{path}: tensorflow failed to load: {exc}") from exc

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """``(N, *row_shape)`` -> ``(N, K)``."""
        if self._fn is not None:
            out = self._fn(self._tf.constant(x))
        elif self.model is not None:
            out = self.model.predict_on_batch(x)
        else:
            result = self._signature(self._tf.constant(x))
            out = next(iter(result.values()))
        if isinstance(out, (list, tuple)):
            out = out[0]
        return np.asarray(out)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """TensorFlow's ``ResourceExhaustedError`` (the OOM of its allocators) or ``MemoryError``."""
        return isinstance(exc, (MemoryError, self._tf.errors.ResourceExhaustedError))

    def unload(self) -> None:
        """Drop the model, its compiled function and any SavedModel object."""
        self._fn = None
        self._saved = None
        self._signature = None
        super().unload()
        gc.collect()


def memory_limit_mb() -> int | None:
    """This process's share of its GPU's memory in MiB, when several processes share the
    device (see :func:`worker.devices.memory_fraction`), from NVML's total."""
    fraction = memory_fraction()
    if fraction is None:
        return None
    gpus = discover().gpus
    return int(gpus[0].memory_total_bytes * fraction / 2**20) if gpus else None


def keras_signature(model) -> Signature:
    """The per-row input shape and output width a Keras model with one input and one
    output declares (``None`` dimensions are any size). The dtype is left out: Keras
    casts inputs to its layers' dtype."""
    try:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            return Signature()
        row_shape = tuple(None if d is None else int(d) for d in model.inputs[0].shape[1:])
        out = model.outputs[0].shape[1:]
    except (AttributeError, TypeError, ValueError):  # subclassed models may not know their shapes
        return Signature()
    width = int(np.prod(out, dtype=np.int64)) if all(d is not None for d in out) else None
    return Signature(row_shape=row_shape, output_width=width)
