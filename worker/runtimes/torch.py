"""PyTorch runtime: ``torch.export`` programs (``.pt2``) or TorchScript (``.pt``)."""

from __future__ import annotations

import numpy as np

from ml_framework.errors import ModelLoadError
from worker.runtimes.base import Runtime


class TorchRuntime(Runtime):
    """Serves a PyTorch model on the process's device (the pinned GPU, else CPU).

    ``.pt2`` files load with ``torch.export.load(...).module()``; anything else with
    ``torch.jit.load``. Inference runs under ``torch.inference_mode()``; outputs come back
    as float32 NumPy arrays. A model returning a tuple or list answers with its first item.
    """

    framework = "torch"

    def load(self) -> None:
        """Load the program onto the device. Raises ``ModelLoadError``."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self._torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        path = self.artifact_path
        try:
            if path.suffix == ".pt2":
                self.model = torch.export.load(str(path)).module()
            else:
                self.model = torch.jit.load(str(path), map_location=self.device)
                self.model.eval()
            self.model.to(self.device)
        except Exception as exc:
            raise ModelLoadError(f"{path}: torch failed to load: {exc}") from exc

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """``(N, *row_shape)`` -> ``(N, K)`` float32."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.float().cpu().numpy()
