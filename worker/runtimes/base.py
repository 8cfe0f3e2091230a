"""The runtime interface: each framework implements ``load`` and ``predict_batch`` (and,
where it has them, its out-of-memory error, cache release and an asynchronous
``submit`` / ``collect`` pair for devices that run ahead of the host).

Shared code owns the rest: batching, the batch contract (one output per input), isolation
of failing rows by halving a failing batch, out-of-memory splitting and the batch size that
fits (:mod:`worker.runtimes.batching`), input conversion (:mod:`worker.inputs`) and output
decoding (:mod:`worker.outputs`).
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ml_framework.errors import BatchContractError
from ml_framework.manifest import ModelManifest
from worker.runtimes.batching import Batcher, BatchRun

__all__ = ["BatchContractError", "BatchRun", "Runtime", "Signature"]


@dataclass(frozen=True)
class Signature:
    """What a loaded artifact itself declares about its input and output, where its
    format records it (``torch.export`` programs, Keras models, scikit-learn's
    ``n_features_in_``); ``None`` where it does not say.

    Attributes:
        row_shape: per-row input shape, batch dimension excluded; ``None`` entries are
            dimensions of any size.
        dtype: NumPy dtype name of the input.
        output_width: values per output row.
    """

    row_shape: tuple[int | None, ...] | None = None
    dtype: str | None = None
    output_width: int | None = None


class Runtime(ABC):
    """One loaded model version in one worker process, on the process's device.

    Subclasses set :attr:`framework` and implement :meth:`load` and :meth:`predict_batch`.

    Args:
        manifest: the model version's manifest.
        directory: the version directory holding the artifact.
        threads: intra-op threads the framework may use (``None``: framework default).

    Attributes:
        converter: the model's input converter (:mod:`worker.inputs`), set by the registry.
        batch_limit: rows per forward pass that fit on the device after an out-of-memory
            error (``None``: no limit known); see :class:`~worker.runtimes.batching.Batcher`.
    """

    framework: ClassVar[str]
    flattens_input: ClassVar[bool] = False
    """The runtime reshapes rows to ``(N, prod(row_shape))`` before the model sees them (a
    runtime may set it per instance at load, from what the artifact takes: ONNX graphs)."""

    def __init__(self, manifest: ModelManifest, directory: Path, threads: int | None = None) -> None:
        self.manifest = manifest
        self.directory = Path(directory)
        self.threads = threads
        self.signature = Signature()  # what the artifact declares; set by load where known
        self.converter = None
        self.model = None
        self.batcher = Batcher(self)

    @property
    def label(self) -> str:
        """``name/version`` of the model, for messages."""
        return f"{self.manifest.name}/{self.manifest.version}"

    @property
    def artifact_path(self) -> Path:
        """Path of the artifact file or directory."""
        return self.directory / self.manifest.artifact

    @property
    def batch_limit(self) -> int | None:
        """Rows per forward pass known to fit after an out-of-memory error, or ``None``."""
        return self.batcher.limit

    @abstractmethod
    def load(self) -> None:
        """Load the artifact; called once per process. Raises ``ModelLoadError``."""

    @abstractmethod
    def predict_batch(self, x: Any) -> np.ndarray:
        """Run one forward pass.

        Args:
            x: ``(N, *row_shape)`` array of the manifest's input dtype, or a batch of
                several inputs (text: token ids and attention mask, see
                :mod:`worker.inputs.text`) whose ``arrays()`` are the model's positional
                inputs.

        Returns:
            ``(N, K)`` or ``(N,)`` array of raw model outputs (scores, logits, values).
        """

    def submit(self, x: Any) -> Any:
        """Start a forward pass over ``x`` and return a handle for :meth:`collect`.

        The default runs the pass at once (the handle is its output). A runtime whose
        device runs asynchronously (CUDA) only queues the copies and the pass, so that the
        host prepares the next batch while the device computes this one.
        """
        return self.predict_batch(x)

    def collect(self, handle: Any) -> np.ndarray:
        """The outputs of a pass started by :meth:`submit`, waiting for the device."""
        return handle

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """True when ``exc`` means the batch did not fit in memory (device or host).

        The base rule knows Python's ``MemoryError``; framework runtimes add their own
        (``torch.cuda.OutOfMemoryError``, TensorFlow's ``ResourceExhaustedError``).
        """
        return isinstance(exc, MemoryError)

    def release_memory(self) -> None:
        """Return cached, unused memory after an out-of-memory error (framework hook)."""
        gc.collect()

    def unload(self) -> None:
        """Drop the model so its host and device memory can be reclaimed."""
        self.model = None
        self.release_memory()

    def run(self, x: Any, batch_size: int) -> BatchRun:
        """Predict every row of ``x`` in batches of ``batch_size`` (see :meth:`stream`).

        Returns:
            A :class:`BatchRun` with one output or error per row.
        """
        return next(self.batcher.stream([x], batch_size))[1]

    def stream(self, inputs: Iterable[Any], batch_size: int,
               x_of: Callable[[Any], Any] | None = None) -> Iterator[tuple[Any, BatchRun]]:
        """Predict every row of each input of ``inputs``, keeping the next batch queued on
        the device while the outputs of the last one are collected, across inputs.

        Args:
            x_of: the model input of an item of ``inputs`` (default: the item itself).

        Yields:
            ``(item, run)`` per item, in order, once all its batches are done.
        """
        return self.batcher.stream(inputs, batch_size, x_of)
