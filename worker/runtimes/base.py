"""The runtime interface: each framework implements ``load`` and ``predict_batch`` only.

Shared code here owns batching, the batch contract (one output per input), isolation of
failing rows by halving a failing batch, and turning raw outputs into result records.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ml_framework.manifest import ModelManifest, OutputSpec

log = logging.getLogger(__name__)


class BatchContractError(RuntimeError):
    """Raised when a model returns a number or shape of outputs its manifest does not allow."""


class Runtime(ABC):
    """One loaded model version in one worker process.

    Subclasses set :attr:`framework` and implement :meth:`load` and :meth:`predict_batch`.

    Args:
        manifest: the model version's manifest.
        directory: the version directory holding the artifact.
        threads: intra-op threads the framework may use (``None``: framework default).
    """

    framework: ClassVar[str]

    def __init__(self, manifest: ModelManifest, directory: Path, threads: int | None = None) -> None:
        self.manifest = manifest
        self.directory = Path(directory)
        self.threads = threads

    @property
    def artifact_path(self) -> Path:
        """Path of the artifact file or directory."""
        return self.directory / self.manifest.artifact

    @abstractmethod
    def load(self) -> None:
        """Load the artifact; called once per process. Raises ``ModelLoadError``."""

    @abstractmethod
    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """Run one forward pass.

        Args:
            x: ``(N, *row_shape)`` array of the manifest's input dtype.

        Returns:
            ``(N, K)`` or ``(N,)`` array of raw model outputs (scores, logits, values).
        """

    def run(self, x: np.ndarray, batch_size: int) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Predict every row of ``x`` in batches of ``batch_size``.

        A batch that raises is split in halves and retried down to single rows, so only
        the rows that really fail get an error.

        Returns:
            ``(outputs, errors)``, both of length ``N``: for each row its raw output row or
            ``None``, and ``None`` or the error message.
        """
        n = x.shape[0]
        outputs: list[np.ndarray | None] = [None] * n
        errors: list[str | None] = [None] * n
        for start in range(0, n, batch_size):
            self._run_span(x, start, min(start + batch_size, n), outputs, errors, top=True)
        return outputs, errors

    def _run_span(self, x: np.ndarray, a: int, b: int, outputs: list, errors: list, top: bool = False) -> None:
        try:
            y = np.asarray(self.predict_batch(x[a:b]))
            if y.ndim == 0 or y.shape[0] != b - a:
                raise BatchContractError(
                    f"model returned {y.shape[0] if y.ndim else 'a scalar'} outputs for {b - a} inputs"
                )
        except Exception as exc:  # noqa: BLE001 - any model failure is isolated per row
            if b - a == 1:
                errors[a] = f"model failed on this row: {type(exc).__name__}: {exc}"
                return
            if top:  # one line per failing batch, not per split
                log.warning("batch of %d rows failed (%s); retrying in halves to isolate the bad rows",
                            b - a, exc)
            mid = (a + b) // 2
            self._run_span(x, a, mid, outputs, errors)
            self._run_span(x, mid, b, outputs, errors)
            return
        for i in range(b - a):
            outputs[a + i] = y[i]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def to_record(raw: np.ndarray, spec: OutputSpec) -> dict[str, Any]:
    """Turn one row's raw output into the stored result (a JSON-ready dict).

    Raises:
        BatchContractError: wrong output width for the spec, or non-finite values.
    """
    vec = np.asarray(raw, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(vec)):
        raise BatchContractError("model returned a non-finite output (NaN or infinity)")
    width = spec.width
    if width is not None and vec.size != width:
        raise BatchContractError(f"model returned {vec.size} values per row, manifest expects {width}")
    if spec.kind == "classification":
        probs = _softmax(vec) if spec.activation == "softmax" else vec
        k = int(np.argmax(probs))
        return {"prediction": spec.labels[k], "score": float(probs[k]),
                "probabilities": [float(p) for p in probs]}
    if spec.kind == "regression":
        return {"prediction": float(vec[0]) if vec.size == 1 else [float(v) for v in vec]}
    return {"embedding": [float(v) for v in vec]}
