"""TensorFlow runtime: Keras ``.keras`` files or SavedModel directories."""

from __future__ import annotations

import os

import numpy as np

from ml_framework.errors import ModelLoadError
from worker.runtimes.base import Runtime


class TensorFlowRuntime(Runtime):
    """Serves a Keras model (``keras.models.load_model``, safe mode on) or a SavedModel's
    ``serving_default`` signature.

    TensorFlow is imported here, on first load, so processes that never serve a TF model
    never pay its start-up cost.
    """

    framework = "tensorflow"

    def load(self) -> None:
        """Load the model. Raises ``ModelLoadError``."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        import tensorflow as tf

        if self.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass  # TF already initialised in this process; keep its thread pools
        self._tf = tf
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
        except Exception as exc:
            raise ModelLoadError(f"{path}: tensorflow failed to load: {exc}") from exc

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """``(N, *row_shape)`` -> ``(N, K)``."""
        if self.model is not None:
            out = self.model.predict_on_batch(x)
        else:
            result = self._signature(self._tf.constant(x))
            out = next(iter(result.values()))
        if isinstance(out, (list, tuple)):
            out = out[0]
        return np.asarray(out)
