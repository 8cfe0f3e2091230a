"""scikit-learn runtime: skops artifacts, loaded with an explicit trusted-types list."""

from __future__ import annotations

import numpy as np

from ml_framework.errors import ManifestError, ModelLoadError
from ml_framework.manifest import MANIFEST_FILE
from worker.runtimes.base import Runtime, Signature


class SklearnRuntime(Runtime):
    """Serves a scikit-learn estimator saved with ``skops.io.dump``.

    Classifiers answer with ``predict_proba`` (``(N, K)`` probabilities, columns in
    ``classes_`` order, which must equal the manifest's labels); other estimators with
    ``predict``. Input is flattened to ``(N, prod(row_shape))``.
    """

    framework = "sklearn"
    flattens_input = True

    def load(self) -> None:
        """Load the skops file, refusing any type not in the manifest's ``trusted_types``.

        Raises:
            ManifestError: the file holds types the manifest does not trust, or the
                classifier's classes differ from the manifest's labels.
            ModelLoadError: the file cannot be read.
        """
        import skops.io as sio
        from threadpoolctl import threadpool_limits

        if self.threads:
            threadpool_limits(self.threads)
        path = self.artifact_path
        try:
            untrusted = sio.get_untrusted_types(file=path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable skops file: {exc}") from exc
        refused = sorted(set(untrusted) - set(self.manifest.trusted_types))
        if refused:
            raise ManifestError(
                f"{path}: holds types not listed in the manifest's trusted_types: {refused}. "
                "Review them and add them to trusted_types if you trust this file."
            )
        try:
            self.model = sio.load(path, trusted=list(untrusted))
        except Exception as exc:
            raise ModelLoadError(f"{path}: skops failed to load: {exc}") from exc
        spec = self.manifest.outputs
        self._proba = spec.kind == "classification" and hasattr(self.model, "predict_proba")
        if self._proba and spec.activation != "none":
            raise ManifestError(
                f"{path}: predict_proba already returns probabilities; set outputs.activation: none "
                f"(got {spec.activation!r})"
            )
        if self._proba:
            classes = [c.item() if hasattr(c, "item") else c for c in self.model.classes_]
            if [str(c) for c in classes] != [str(c) for c in spec.labels]:
                raise ManifestError(
                    f"{self.directory / MANIFEST_FILE}: outputs.labels: classifier classes {classes} "
                    f"({len(classes)}) of {path.name} differ from manifest labels {spec.labels} ({len(spec.labels)})"
                )
        n_features = getattr(self.model, "n_features_in_", None)
        self.signature = Signature(row_shape=(int(n_features),) if n_features is not None else None,
                                   output_width=len(classes) if self._proba else None)

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """``(N, *row_shape)`` -> ``(N, K)`` probabilities or ``(N,)`` / ``(N, D)`` predictions."""
        flat = x.reshape(x.shape[0], -1)
        if self._proba:
            return self.model.predict_proba(flat)
        return self.model.predict(flat)
