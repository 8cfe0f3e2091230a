"""PyTorch runtime: ``torch.export`` programs (``.pt2``) or TorchScript (``.pt``)."""

from __future__ import annotations

import contextlib
import gc
import warnings

import numpy as np

from ml_framework.errors import ModelLoadError
from worker.devices import memory_fraction
from worker.runtimes.base import Runtime, Signature

_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}



class HostStaging:
    """Page-locked host buffers reused between batches to stage inputs for the device.

    With ``pin`` (a CUDA device), each input position has :data:`SLOTS` page-locked
    buffers used in turn, so that the host fills one while the device still copies from
    the other (``non_blocking=True``); before a buffer is refilled, the copy that last read
    it is waited for. Pinning is slow, hence buffers grown on demand and kept, not one per
    batch. Without ``pin`` (CPU), :meth:`stage` returns zero-copy views of the NumPy
    arrays: there is nothing to gain from a copy.

    Args:
        torch: the imported ``torch`` module.
        pin: allocate page-locked memory (needs CUDA).
    """

    SLOTS = 2

    def __init__(self, torch, pin: bool) -> None:
        self._torch = torch
        self.pin = pin
        self._buffers: dict[tuple[int, int], object] = {}  # (input, slot) -> pinned tensor
        self._copied: dict[int, object] = {}  # slot -> CUDA event after its last copy
        self._slot = 0

    def stage(self, arrays: list[np.ndarray], device) -> list:
        """The arrays on ``device``: ``(N, ...)`` tensors of the same dtypes, copied from
        page-locked buffers without blocking the host when pinning."""
        torch = self._torch
        sources = [torch.from_numpy(np.ascontiguousarray(x)) for x in arrays]
        if not self.pin:
            return [src.to(device) for src in sources]
        slot = self._slot
        self._slot = (slot + 1) % self.SLOTS
        if (event := self._copied.get(slot)) is not None:
            event.synchronize()  # the device has finished reading this slot's buffers
        staged = []
        for i, src in enumerate(sources):
            buf = self._buffers.get((i, slot))
            if buf is None or buf.dtype != src.dtype or buf.shape[1:] != src.shape[1:] or buf.shape[0] < src.shape[0]:
                buf = self._buffers[(i, slot)] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            view = buf[: src.shape[0]]
            view.copy_(src)
            staged.append(view.to(device, non_blocking=True))
        event = torch.cuda.Event()
        event.record()
        self._copied[slot] = event
        return staged

    def release(self) -> None:
        """Drop the buffers (model unloaded)."""
        self._buffers.clear()
        self._copied.clear()


class TorchRuntime(Runtime):
    """Serves a PyTorch model on the process's device (the pinned GPU, else CPU).

    ``.pt2`` files load with ``torch.export.load(...).module()``; anything else with
    ``torch.jit.load``. Fast paths from the manifest's ``runtime`` options:
    ``torch.inference_mode()`` (else ``torch.no_grad()``), ``torch.autocast`` in bf16 or
    fp16, and on CUDA page-locked staging buffers with non-blocking copies, the forward
    pass queued by :meth:`submit` while the host prepares the next batch, and the outputs
    copied back asynchronously. With several processes on one GPU, each is capped at its
    share of the device's memory (``torch.cuda.set_per_process_memory_fraction``). Outputs
    come back as float32 NumPy arrays; a model returning a tuple or list answers with its
    first item. Text models take their tokenizer outputs as positional inputs.
    """

    framework = "torch"

    def load(self) -> None:
        """Load the program onto the device. Raises ``ModelLoadError``."""
        import torch

        # Arrow hands its buffers over read-only; they are this process's own copies (or
        # copy-on-write pages), so a model that writes into its input harms nothing
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if self.threads:
            torch.set_num_threads(self.threads)
        self._torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and (fraction := memory_fraction()) is not None:
            torch.cuda.set_per_process_memory_fraction(fraction)
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

    def _forward(self, x):
        """Queue the copies and the forward pass; the float32 outputs on the device."""
        arrays = x.arrays() if hasattr(x, "arrays") else [x]
        with self._grad_mode(), self._autocast():
            out = self.model(*self.staging.stage(arrays, self.device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.float()

    def predict_batch(self, x) -> np.ndarray:
        """``(N, *row_shape)`` (or a text batch) -> ``(N, K)`` float32."""
        return self._forward(x).cpu().numpy()

    def submit(self, x):
        """Queue the pass and an asynchronous copy of its outputs into page-locked host
        memory; on CPU, run it."""
        if self.device.type != "cuda":
            return self.predict_batch(x)
        out = self._forward(x).to("cpu", non_blocking=True)
        done = self._torch.cuda.Event()
        done.record()
        return out, done

    def collect(self, handle) -> np.ndarray:
        """Wait for the pass and its copy to the host."""
        if self.device.type != "cuda":
            return handle
        out, done = handle
        done.synchronize()
        return out.numpy()

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
        """Drop the model and the staging buffers, then empty the CUDA cache."""
        self.staging.release()
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
