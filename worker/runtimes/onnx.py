"""ONNX runtime: ``.onnx`` graphs served by ONNX Runtime, on the CUDA execution provider of
the process's pinned GPU (``onnxruntime-gpu``), else on the CPU execution provider."""

from __future__ import annotations

import gc
import logging
from typing import Any, get_args

import numpy as np

from ml_framework.errors import ManifestError, ModelLoadError
from ml_framework.manifest import MANIFEST_FILE, InputSpec
from worker.devices import discover, memory_fraction
from worker.runtimes.base import Runtime, Signature
from worker.runtimes.batching import first_line

log = logging.getLogger(__name__)

ONNX_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
"""ONNX Runtime's type strings (``NodeArg.type``) -> NumPy dtype names."""
_MANIFEST_DTYPES = get_args(InputSpec.model_fields["dtype"].annotation)
"""The input dtypes a manifest can declare (``inputs.dtype``)."""
_NUMERIC_OUTPUTS = {"float32", "float64", "float16", "int32", "int64", "int8", "uint8"}
_OOM_TEXT = ("out of memory", "failed to allocate memory", "bad_alloc")
"""How ONNX Runtime words an allocation failure (its errors are one exception type)."""


def import_onnxruntime():
    """``import onnxruntime`` with its C++ logging at ERROR (its warnings about unused
    initialisers and provider fallbacks are not actionable per batch). Returns the module.

    Raises:
        ModelLoadError: ONNX Runtime is not installed (the ``onnx`` extra).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelLoadError(
            "framework onnx needs ONNX Runtime: pip install 'ml-framework[onnx]' "
            f"('ml-framework[onnx-gpu]' on GPU hosts): {exc}") from exc
    ort.set_default_logger_severity(3)
    return ort


def session_providers(ort) -> list[Any]:
    """The execution providers to ask for: CUDA on the process's GPU when this process sees
    one (``mlf worker`` pins each process with ``CUDA_VISIBLE_DEVICES``, so it is device 0)
    and ONNX Runtime was built with CUDA, then the CPU (ONNX Runtime places nodes the CUDA
    provider lacks there). With several processes on one GPU, the CUDA arena of each is
    capped at its share of the device's memory (``gpu_mem_limit``, bytes)."""
    gpus = discover().gpus
    if not gpus or "CUDAExecutionProvider" not in ort.get_available_providers():
        return ["CPUExecutionProvider"]
    if hasattr(ort, "preload_dlls"):  # 1.21+: the CUDA / cuDNN of the nvidia-* wheels, not on the library path
        try:
            ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
        except Exception as exc:  # noqa: BLE001 - the session then falls back to the CPU, logged at load
            log.warning("onnxruntime could not preload the CUDA libraries: %s", exc)
    cuda: dict[str, Any] = {"device_id": 0}
    if (fraction := memory_fraction()) is not None:
        cuda["gpu_mem_limit"] = int(gpus[0].memory_total_bytes * fraction)
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


class OnnxRuntime(Runtime):
    """Serves an ONNX graph through one ``onnxruntime.InferenceSession``.

    The manifest's ``onnx.input`` is fed ``(N, *row_shape)`` rows of ``inputs.dtype``
    (flattened to ``(N, prod(row_shape))`` when the graph takes rank-2 input, as skl2onnx
    graphs do); ``onnx.output`` is returned (``(N, K)`` or ``(N,)``). Both names, the input
    dtype and the output's type are checked against the graph at load, so ``mlf models add``
    refuses a manifest that does not fit. ONNX Runtime is imported here, on first load:
    processes that never serve an ONNX model never import it. Intra-op threads come from
    the worker's thread count; inter-op parallelism is off (one graph, sequential).
    """

    framework = "onnx"

    def load(self) -> None:
        """Create the session on the process's device and check the graph's input and output.

        Raises:
            ModelLoadError: ONNX Runtime is missing or cannot load the file.
            ManifestError: the manifest's input / output names, input dtype or output type
                do not fit the graph, or the graph's batch size is fixed (the message names
                the file, the field and the graph's own inputs / outputs).
        """
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        path = self.artifact_path
        providers = session_providers(ort)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"{path}: onnxruntime failed to load: {first_line(exc)}") from exc
        self.device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        if self.device == "cpu" and len(providers) > 1:
            log.warning("model %s: ONNX Runtime could not use the CUDA execution provider; running on CPU "
                        "(check the CUDA 13 and cuDNN 9 libraries of onnxruntime-gpu[cuda,cudnn])", self.label)
        self._input, self._output = self._graph_io(session)
        self.model = session
        shape = list(self._input.shape)
        self.flattens_input = len(shape) == 2 and len(self.manifest.row_shape) > 1
        out_dims = list(self._output.shape)[1:]
        self.signature = Signature(
            row_shape=tuple(d if isinstance(d, int) else None for d in shape[1:]),
            dtype=ONNX_DTYPES.get(self._input.type),
            output_width=int(np.prod(out_dims, dtype=np.int64))
            if all(isinstance(d, int) for d in out_dims) else None,
        )

    def _graph_io(self, session) -> tuple[Any, Any]:
        """The graph's input and output ``NodeArg`` the manifest names (or the only ones)."""
        path, where = self.artifact_path, self.directory / MANIFEST_FILE
        spec, want = self.manifest.onnx, self.manifest.inputs.dtype
        inputs, outputs = session.get_inputs(), session.get_outputs()

        def pick(args: list, name: str | None, what: str) -> Any:
            listed = ", ".join(f"{a.name!r} {a.type} {list(a.shape)}" for a in args)
            if name is None:
                if len(args) != 1:
                    raise ManifestError(f"{where}: onnx.{what}: the graph {path} has {len(args)} {what}s "
                                        f"({listed}); name the one to use in onnx.{what}")
                return args[0]
            found = next((a for a in args if a.name == name), None)
            if found is None:
                raise ManifestError(f"{where}: onnx.{what}: the graph {path} has no {what} {name!r}; "
                                    f"its {what}s: {listed}")
            return found

        arg = pick(inputs, spec.input if spec else None, "input")
        if extra := [a.name for a in inputs if a.name != arg.name]:
            raise ManifestError(f"{where}: the graph {path} takes inputs {extra} besides {arg.name!r}; "
                                "framework onnx feeds one input")
        if (got := ONNX_DTYPES.get(arg.type)) != want:
            fix = (f"set inputs.dtype: {got}" if got in _MANIFEST_DTYPES else
                   f"the manifest feeds {' | '.join(_MANIFEST_DTYPES)}: export the graph with one of those input types")
            raise ManifestError(f"{where}: inputs.dtype: the manifest feeds {want} but the graph {path}'s "
                                f"input {arg.name!r} takes {got or arg.type}; {fix}")
        batch = arg.shape[0] if len(arg.shape) else None
        if not len(arg.shape) or isinstance(batch, int):
            raise ManifestError(f"{where}: the graph {path}'s input {arg.name!r} has shape {list(arg.shape)}: "
                                "its first axis must be a dynamic batch axis (any number of rows); export it "
                                "with one (torch.onnx.export's dynamic_axes or dynamic_shapes, skl2onnx's None)")
        out = pick(outputs, spec.output if spec else None, "output")
        if ONNX_DTYPES.get(out.type) not in _NUMERIC_OUTPUTS:
            hint = (" (skl2onnx's ZipMap: convert with options={id(model): {'zipmap': False}})"
                    if out.type.startswith("seq(") else "")
            others = [f"{o.name!r} {o.type}" for o in outputs if o.name != out.name]
            raise ManifestError(f"{where}: onnx.output: the graph {path}'s output {out.name!r} is {out.type}{hint}, "
                                f"not a numeric tensor; other outputs: {', '.join(others) or 'none'}")
        return arg, out

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """``(N, *row_shape)`` -> the named output, ``(N, K)`` or ``(N,)``."""
        x = np.ascontiguousarray(x)
        if self.flattens_input:
            x = x.reshape(x.shape[0], -1)
        return self.model.run([self._output.name], {self._input.name: x})[0]

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """``MemoryError``, or an ONNX Runtime error whose message says an allocation
        failed (CUDA's "out of memory", the arena's "Failed to allocate memory")."""
        text = str(exc).lower()
        return isinstance(exc, MemoryError) or any(t in text for t in _OOM_TEXT)

    def release_memory(self) -> None:
        """Collect garbage; ONNX Runtime's arena keeps its blocks for the session's life
        (it shrinks only when configured to, per run), so unloading frees device memory."""
        gc.collect()
