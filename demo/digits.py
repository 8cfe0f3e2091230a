"""The demo: three models trained on scikit-learn's bundled digits dataset, scored through
the queue.

The digits dataset (1,797 8x8 grey-level images, 10 classes, pixel values 0-16) ships
inside scikit-learn (``sklearn.datasets.load_digits``); nothing is downloaded. Pixels are
scaled by 1/16 through the manifests' preprocessing, so the models see values in [0, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml_framework.manifest import ModelManifest

log = logging.getLogger(__name__)

PIXELS = [f"pixel_{i}" for i in range(64)]
LABELS = list(range(10))
SCALE = 1.0 / 16.0  # digits pixels are 0..16 (sklearn's load_digits docs)
SEED = 0


@dataclass(frozen=True)
class DigitsData:
    """The digits dataset as a frame, with a fixed train/test split.

    Attributes:
        frame: 1,797 rows: ``pixel_0`` .. ``pixel_63`` (float, 0-16), ``label`` (int),
            ``split`` (``train`` / ``test``, 25 % test, stratified, seed 0).
    """

    frame: pd.DataFrame

    def xy(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of one split: ``X`` (N, 64) float32 scaled to [0, 1], ``y`` (N,) int64."""
        part = self.frame[self.frame["split"] == split]
        return (part[PIXELS].to_numpy(np.float32) * SCALE, part["label"].to_numpy(np.int64))


def load_data() -> DigitsData:
    """Load sklearn's digits and split it 75/25 (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    frame = pd.DataFrame(digits.data.astype(np.float64), columns=PIXELS)
    frame["label"] = digits.target.astype(np.int64)
    _, test_idx = train_test_split(np.arange(len(frame)), test_size=0.25, random_state=SEED,
                                   stratify=digits.target)
    frame["split"] = "train"
    frame.loc[test_idx, "split"] = "test"
    return DigitsData(frame)


def _common(description: str, shape: list[int]) -> dict:
    return {
        "inputs": {"columns": PIXELS, "dtype": "float32", "shape": shape},
        "preprocessing": {"scale": SCALE, "shift": 0.0},
        "default_batch_size": 256,
        "description": description,
    }


def fit_sklearn(data: DigitsData):
    """A logistic regression fitted on the train split (inputs (N, 64) in [0, 1])."""
    from sklearn.linear_model import LogisticRegression

    x, y = data.xy("train")
    return LogisticRegression(max_iter=2000, random_state=SEED).fit(x, y)


def export_sklearn_model(clf, models_dir: Path) -> ModelManifest:
    """Publish the fitted classifier as ``digits-sklearn`` (skops)."""
    from worker.export import export_sklearn

    return export_sklearn(clf, models_dir, "digits-sklearn",
                          **_common("logistic regression on 8x8 digits", [64]))


def build_torch_cnn():
    """A small CNN: (N, 1, 8, 8) float32 -> (N, 10) logits."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return DigitsCNN()


def fit_torch(data: DigitsData, epochs: int = 30):
    """The torch CNN trained with Adam on the train split; in eval mode."""
    import torch

    torch.manual_seed(SEED)
    x, y = data.xy("train")
    xt, yt = torch.from_numpy(x.reshape(-1, 1, 8, 8).copy()), torch.from_numpy(y.copy())
    model = build_torch_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def export_torch_model(model, models_dir: Path) -> ModelManifest:
    """Publish the CNN as ``digits-torch`` (``torch.export``, logits -> softmax)."""
    from worker.export import export_torch

    return export_torch(model, models_dir, "digits-torch",
                        outputs={"kind": "classification", "labels": LABELS, "activation": "softmax"},
                        **_common("CNN on 8x8 digits (PyTorch, torch.export)", [1, 8, 8]))


def fit_keras(data: DigitsData, epochs: int = 30):
    """A Keras CNN trained on the train split: (N, 8, 8, 1) -> (N, 10) probabilities."""
    from worker.runtimes.tensorflow import import_tensorflow

    import_tensorflow()  # without its start-up notices
    import keras

    keras.utils.set_random_seed(SEED)
    x, y = data.xy("train")
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x.reshape(-1, 8, 8, 1), y, epochs=epochs, batch_size=64, verbose=0)
    return model


def export_keras_model(model, models_dir: Path) -> ModelManifest:
    """Publish the Keras CNN as ``digits-keras`` (``.keras``)."""
    from worker.export import export_keras

    return export_keras(model, models_dir, "digits-keras",
                        outputs={"kind": "classification", "labels": LABELS, "activation": "none"},
                        **_common("CNN on 8x8 digits (Keras / TensorFlow)", [8, 8, 1]))


def train_and_export(framework: str, data: DigitsData, models_dir: Path, epochs: int = 30) -> ModelManifest:
    """Train the demo model of ``framework`` (``sklearn``, ``torch``, ``tensorflow``) and publish it."""
    if framework == "sklearn":
        return export_sklearn_model(fit_sklearn(data), models_dir)
    if framework == "torch":
        return export_torch_model(fit_torch(data, epochs), models_dir)
    if framework == "tensorflow":
        return export_keras_model(fit_keras(data, epochs), models_dir)
    raise ValueError(f"unknown framework {framework!r}")


FRAMEWORKS = ("sklearn", "torch", "tensorflow")
