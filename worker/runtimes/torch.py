"""PyTorch runtime: ``torch.export`` programs (``.pt2``) or TorchScript (``.pt``)."""

from __future__ import annotations

import contextlib
import gc

import numpy as np

from ml_framework.errors import ModelLoadError
from worker.runtimes.base import Runtime, Signature

_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


class HostStaging:
    """A host buffer reused between batches to stage inputs for the device.

    With ``pin`` (a CUDA device), the buffer is page-locked, so the copy to the device can
    run asynchronously (``non_blocking=True``); pinning is slow, hence one buffer grown
    on demand rather than one per batch. Without ``pin`` (CPU), :meth:`stage` returns a
    zero-copy view of the NumPy array: there is nothing to gain from a copy.

    Args:
        torch: the imported ``torch`` module.
        pin: allocate page-locked memory (needs CUDA).
    """

    def __init__(self, torch, pin: bool) -> None:
        self._torch = torch
        self.pin = pin
        self.buffer = None
        self.allocations = 0

    def stage(self, x: np.ndarray):
        """``x`` as a host tensor: ``(N, *row_shape)``, same dtype; a view into the reused
        buffer when pinning."""
        torch = self._torch
        src = torch.from_numpy(np.ascontiguousarray(x))
        if not self.pin:
            return src
        buf = self.buffer
        if buf is None or buf.dtype != src.dtype or buf.shape[1:] != src.shape[1:] or buf.shape[0] < src.shape[0]:
            self.buffer = buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self.allocations += 1
        view = buf[: src.shape[0]]
        view.copy_(src)
        return view


class TorchRuntime(Runtime):
    """Serves a PyTorch model on the process's device (the pinned GPU, else CPU).

    ``.pt2`` files load with ``torch.export.load(...).module()``; anything else with
    ``torch.jit.load``. Fast paths from the manifest's ``runtime`` options:
    ``torch.inference_mode()`` (else ``torch.no_grad()``), ``torch.autocast`` in bf16 or
    fp16, and on CUDA a reused pinned host buffer with non-blocking copies. Outputs come
    back as float32 NumPy arrays; a model returning a tuple or list answers with its
    first item.
    """

    framework = "torch"

    def load(self) -> None:
        """Load the program onto the device. Raises ``ModelLoadError``."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self._torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        options = self.manifest.runtime
        self.staging = HostStaging(torch, pin=options.pin_memory and self.device.type == "cuda")
        self._grad_mode = torch.inference_mode if options.inference_mode else torch.no_grad
        dtype = _AUTOCAST_DTYPES.get(options.precision)
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=getattr(torch, dtype))) if dtype
            else contextlib.nullcontext
        )
        path = self.artifact_path
        try:
            if path.suffix == ".pt2":
                program = torch.export.load(str(path))
                self.signature = program_signature(program)
                self.model = program.module()
            else:
                self.model = torch.jit.load(str(path), map_location=self.device)
                self.model.eval()
            self.model.to(self.device)
        except Exception as exc:
            raise ModelLoadError(f"{path}: torch failed to load: {exc}") from exc

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """``(N, *row_shape)`` -> ``(N, K)`` float32.

        The staging buffer is safe to refill on the next call: the input copy is queued on
        the same CUDA stream before the forward pass, and ``.cpu()`` waits for that stream.
        """
        with self._grad_mode(), self._autocast():
            batch = self.staging.stage(x).to(self.device, non_blocking=self.staging.pin)
            out = self.model(batch)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.float().cpu().numpy()

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """CUDA's ``OutOfMemoryError``, the CPU allocator's "can't allocate memory", and
        either message wrapped by the TorchScript interpreter."""
        torch = self._torch
        if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
            return True
        text = str(exc)
        return isinstance(exc, (RuntimeError, torch.jit.Error)) and (
            "out of memory" in text or "can't allocate memory" in text)

    def release_memory(self) -> None:
        """Free unreferenced tensors and return CUDA's cached blocks to the device."""
        gc.collect()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def unload(self) -> None:
        """Drop the model and the staging buffer, then empty the CUDA cache."""
        self.staging.buffer = None
        super().unload()


def program_signature(program) -> Signature:
    """What a ``torch.export`` program records of its one tensor input and output: the
    per-row shapes (a symbolic dimension, such as the exported dynamic batch, is any
    size) and the input dtype. Programs with several inputs or outputs declare nothing."""
    from torch.export.graph_signature import InputKind, OutputKind

    inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    outputs = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if len(inputs) != 1:
        return Signature()
    nodes = {n.name: n for n in program.graph.nodes}
    value = getattr(nodes.get(inputs[0]), "meta", {}).get("val")
    if value is None or not hasattr(value, "shape") or len(value.shape) < 1:
        return Signature()
    row_shape = tuple(d if isinstance(d, int) else None for d in value.shape[1:])
    dtype = str(value.dtype).removeprefix("torch.")
    width = None
    out_node = next((n for n in program.graph.nodes if n.op == "output"), None)
    if len(outputs) == 1 and out_node is not None and len(out_node.args[0]) == 1:
        out = getattr(out_node.args[0][0], "meta", {}).get("val")
        dims = list(getattr(out, "shape", [])[1:]) if out is not None else None
        if dims is not None and all(isinstance(d, int) for d in dims):
            width = int(np.prod(dims, dtype=np.int64))
    return Signature(row_shape=row_shape, dtype=dtype, output_width=width)
