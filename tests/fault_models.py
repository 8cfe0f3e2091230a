"""Misbehaving scikit-learn models for the fault suite (``tests/faults``).

Each is a real :class:`~sklearn.linear_model.LogisticRegression` fitted on the digits,
whose ``predict_proba`` misbehaves when a row carries :data:`MARKER` in its first input
column (``pixel_0``; digits pixels are 0-16). They are saved with skops like any model; the
worker imports this module to load them (its working directory is the repository root).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import numpy as np
from sklearn.linear_model import LogisticRegression

MARKER = 1000.0
"""The value of ``pixel_0`` that triggers the fault."""


class KillsItsWorker(LogisticRegression):
    """SIGKILLs its own process when a batch holds a marked row: a poison shard, as a
    segfault in native code or the kernel's out-of-memory killer would be."""

    def predict_proba(self, X):
        if (np.asarray(X)[:, 0] == MARKER).any():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict_proba(X)


class HangsInNativeCode(LogisticRegression):
    """Sleeps for an hour inside C, holding the GIL (``PyDLL`` calls keep it), when a
    batch holds a marked row: a model call that never returns."""

    def predict_proba(self, X):
        if (np.asarray(X)[:, 0] == MARKER).any():
            ctypes.PyDLL(None).sleep(3600)
        return super().predict_proba(X)


class Slow(LogisticRegression):
    """Sleeps ``delay_s`` seconds per batch, so that shards are in flight long enough for
    a fault to hit them (``delay_s`` is saved with the model)."""

    delay_s: float = 0.0

    def predict_proba(self, X):
        time.sleep(self.delay_s)
        return super().predict_proba(X)


def fit(cls: type[LogisticRegression], x: np.ndarray, y: np.ndarray, **attrs: float) -> LogisticRegression:
    """``cls`` fitted on ``(x, y)`` (``x``: ``(N, 64)`` float pixels), with ``attrs`` set."""
    model = cls(max_iter=200)
    model.fit(x, y)
    for key, value in attrs.items():
        setattr(model, key, value)
    return model


# ----------------------------------------------------------- models that break their contract
class DropsLastRow(LogisticRegression):
    """Returns one row of probabilities fewer than it was given (``N - 1`` for ``N``): a
    model that silently drops inputs."""

    def predict_proba(self, X):
        return super().predict_proba(X)[:-1]


class NaNOnMarkedRows(LogisticRegression):
    """Returns NaN probabilities for the rows carrying :data:`MARKER` in ``pixel_0``, as a
    model overflowing on out-of-range input does."""

    def predict_proba(self, X):
        out = super().predict_proba(X)
        out[np.asarray(X)[:, 0] == MARKER] = np.nan
        return out


class FiveOfTenClasses(LogisticRegression):
    """Fitted on 10 classes (so ``classes_`` matches 10 labels) but returns only the first
    5 probability columns: an output narrower than its labels."""

    def predict_proba(self, X):
        return super().predict_proba(X)[:, :5]
