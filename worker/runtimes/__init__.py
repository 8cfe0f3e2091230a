"""One runtime per framework behind :class:`worker.runtimes.base.Runtime`."""

from __future__ import annotations

from importlib import import_module

from worker.runtimes.base import Runtime

_RUNTIMES = {
    "sklearn": ("worker.runtimes.sklearn", "SklearnRuntime"),
    "torch": ("worker.runtimes.torch", "TorchRuntime"),
    "tensorflow": ("worker.runtimes.tensorflow", "TensorFlowRuntime"),
    "onnx": ("worker.runtimes.onnx", "OnnxRuntime"),
}


def runtime_class(framework: str) -> type[Runtime]:
    """The runtime class for a manifest's ``framework`` (imports only that framework's module)."""
    module, name = _RUNTIMES[framework]
    return getattr(import_module(module), name)


__all__ = ["Runtime", "runtime_class"]
