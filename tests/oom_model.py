"""A real torch model that runs out of memory above a batch size, for the OOM tests.

No GPU exists on the test machines, so the out-of-memory error is raised by the model
itself, with the message ``torch.cuda.OutOfMemoryError`` carries ("CUDA out of memory"),
whenever a batch has more than ``limit`` rows, as a device does when activations grow
with the batch. It is scripted (``torch.jit.script``) so the condition survives export.
"""

from __future__ import annotations


def oom_above(limit: int, in_features: int, classes: int):
    """``(N, in_features) -> (N, classes)`` logits; raises for ``N > limit``."""
    import torch

    class OomAbove(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(in_features, classes)
            self.limit = limit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > self.limit:
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.linear(x)

    torch.manual_seed(0)
    return OomAbove()


def expected_splits(rows: int, limit: int) -> int:
    """Halvings needed until every piece of a ``rows``-row batch fits in ``limit`` rows."""
    if rows <= limit:
        return 0
    half = rows // 2
    return 1 + expected_splits(half, limit) + expected_splits(rows - half, limit)


def fails_on_negative(in_features: int, classes: int):
    """``(N, in_features) -> (N, classes)`` logits; raises when any input is negative, as
    a model with a domain check does. Scripted, so the check survives export."""
    import torch

    class FailsOnNegative(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(in_features, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x < 0).any()):
                raise RuntimeError("negative input")
            return self.linear(x)

    torch.manual_seed(0)
    return FailsOnNegative()
