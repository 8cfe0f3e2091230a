"""What every input converter shares: the converted piece, the converter interface, and the
checks every numeric input goes through (finiteness per row, the affine transform)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ml_framework.datasets import ROW_ERROR, decode_dictionaries
from ml_framework.manifest import ModelManifest
from ml_framework.store import RowError

if TYPE_CHECKING:
    from ml_framework.settings import Settings

PIECE_BYTES = 16 * 2**20
"""About how many bytes of model input one piece of a shard holds: a piece is read and
converted on the prefetch thread while the device runs the previous one, so it should be
several batches long (fewer hand-overs) but small enough that two fit easily in memory."""
MAX_VALUE_CHARS = 40


@dataclass
class Converted:
    """One piece of a shard, converted: the model input of its good rows, and why the
    others were refused.

    Attributes:
        x: the model input: ``(n_ok, *row_shape)`` array of the manifest's dtype, or a
            batch of another kind that supports ``len()``, slicing and ``take(indices)``
            (text: token ids; see :mod:`worker.inputs.text`).
        rows: ``(n_ok,)`` int64 dataset row numbers of ``x``'s rows, ascending unless the
            converter reorders them (text, by length, to pad batches less).
        errors: one :class:`RowError` per refused row, in row order.
        n_rows: rows the piece covered (``n_ok`` plus the refused ones).
    """

    x: Any
    rows: np.ndarray
    errors: list[RowError] = field(default_factory=list)
    n_rows: int = 0


def show(value: object) -> str:
    """``value`` for an error message: its repr, cut at :data:`MAX_VALUE_CHARS`."""
    if isinstance(value, np.generic):  # NumPy 2 reprs scalars as np.float64(inf)
        value = value.item()
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "...'"


def finite_rows(x: np.ndarray, allow_nan: bool = False) -> np.ndarray | None:
    """``(n,)`` mask of the rows of float array ``x`` whose values are all finite (NaN
    allowed with ``allow_nan``: missing values the manifest accepts), or ``None`` when
    every row is (the common case, found without a mask per value).

    A row's sum is finite exactly when its values are, unless finite values overflow the
    sum; rows whose sum is not finite are therefore checked value by value.
    """
    if x.dtype.kind != "f" or x.size == 0:
        return None
    flat = x.reshape(len(x), -1)
    sums = np.add.reduce(flat, axis=1)
    suspect = ~np.isfinite(sums)
    if not suspect.any():
        return None
    ok = np.ones(len(x), dtype=bool)
    idx = np.flatnonzero(suspect)
    ok[idx] = ~np.isinf(flat[idx]).any(axis=1) if allow_nan else np.isfinite(flat[idx]).all(axis=1)
    return None if ok.all() else ok


def non_finite_reason(values: np.ndarray) -> str:
    """What is not finite in ``values``: ``NaN``, ``infinity`` or both, and where first."""
    flat = np.asarray(values).reshape(-1)
    what = " and ".join(w for w, bad in (("NaN", np.isnan(flat).any()), ("infinity", np.isinf(flat).any())) if bad)
    return f"{what} at index {int(np.flatnonzero(~np.isfinite(flat))[0])}"


def take_rows(x: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of a model input (an array, or a batch that can ``take`` rows)."""
    return x[index] if isinstance(x, np.ndarray) else x.take(index)


def fail_rows(piece: Converted, reasons: dict[int, str]) -> Converted:
    """``piece`` with the rows of ``reasons`` (dataset row -> why) failed: dropped from
    its input, their errors (if any) replaced by ``row N: <reason>``."""
    keep = ~np.isin(piece.rows, np.fromiter(reasons, dtype=np.int64, count=len(reasons)))
    x, rows = (piece.x, piece.rows) if keep.all() else (take_rows(piece.x, np.flatnonzero(keep)), piece.rows[keep])
    errors = [e for e in piece.errors if e.row_index not in reasons]
    errors += [RowError(row, f"row {row}: {reason}") for row, reason in reasons.items()]
    return Converted(x, rows, sorted(errors, key=lambda e: e.row_index), piece.n_rows)


class InputConverter(ABC):
    """Turns pieces of a shard (Arrow tables) into model input, one row error per row that
    cannot be converted. One per loaded model version; :meth:`convert` runs on the worker's
    prefetch thread, so it must not touch the device.

    Args:
        manifest: the model version's manifest.
        directory: its version directory (where a tokenizer file lies).
        data_dir: the workers' data directory (where image files lie).
        threads: threads a converter may use to decode rows (image files); ``None``: the
            CPU count. Workers pass their ``worker_threads`` (cores per process).
        settings: the worker's settings, whose ``s3_*`` reach object storage (image
            ``s3://`` URIs); ``None``: the process's (``get_settings()``), read when first
            needed. Workers pass their context's settings.
    """

    def __init__(self, manifest: ModelManifest, directory: Path, data_dir: Path | None = None,
                 threads: int | None = None, settings: Settings | None = None) -> None:
        self.manifest = manifest
        self.spec = manifest.inputs
        self.preprocessing = manifest.preprocessing
        self.directory = Path(directory)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.threads = threads
        self.settings = settings

    def convert(self, table: pa.Table, columns: Sequence[str], row_start: int) -> Converted:
        """Convert the rows of ``table``: what every reader's pieces and every inline
        shard go through, whatever the input kind.

        Dictionary-encoded columns (a pandas ``category``) are decoded to their value
        type first, so a converter sees numbers, text or paths, never dictionary codes.
        Rows that the reader could not read (the
        :data:`~ml_framework.datasets.common.ROW_ERROR` column: a CSV line with too many
        or too few fields) fail with the reader's reason, whatever their cells hold.

        Args:
            table: a piece of a shard; ``columns`` feed the model, in the order of
                ``inputs.columns``.
            row_start: dataset row number of ``table``'s first row (for error messages).

        Returns:
            A :class:`Converted` whose ``rows`` and ``errors`` cover each row exactly once.
        """
        unread = None
        if ROW_ERROR in table.column_names:
            unread = table.column(ROW_ERROR)
            table = table.drop_columns([ROW_ERROR])
        piece = self._convert(decode_dictionaries(table), columns, row_start)
        if unread is not None and unread.null_count < len(unread):
            reasons = unread.to_pylist()
            piece = fail_rows(piece, {row_start + i: r for i, r in enumerate(reasons) if r is not None})
        return piece

    @abstractmethod
    def _convert(self, table: pa.Table, columns: Sequence[str], row_start: int) -> Converted:
        """Convert the rows of ``table`` (see :meth:`convert`; no column is
        dictionary-encoded, and ``table`` has no ``ROW_ERROR`` column)."""

    def example(self, n: int) -> Any:
        """``n`` rows of neutral input (zeros) shaped as :meth:`convert` shapes them, for
        warm-up and validation batches."""
        return np.zeros((n, *self.manifest.row_shape), dtype=self.spec.dtype)

    def concat(self, parts: Sequence[Any]) -> Any:
        """Several converted inputs as one batch (online requests gathered together)."""
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def bytes_per_row(self) -> int:
        """Bytes of model input per row (for sizing pieces)."""
        return int(np.prod(self.manifest.row_shape)) * np.dtype(self.spec.dtype).itemsize

    def piece_rows(self, batch_size: int) -> int:
        """Rows per piece of a shard: about :data:`PIECE_BYTES` of input, a whole number of
        batches, at least one batch."""
        batches = max(1, PIECE_BYTES // max(1, self.bytes_per_row() * batch_size))
        return batch_size * batches

    def finish(self, x: np.ndarray, rows: np.ndarray, bad: dict[int, RowError], row_start: int,
               n: int) -> Converted:
        """Drop the rows in ``bad`` (index within the piece -> error) from ``x`` (whose other
        rows the caller checked for finiteness), apply ``preprocessing`` (``x * scale +
        shift``, then ``(x - mean) / std``) and reject rows that are not finite afterwards
        (scaling can overflow)."""
        if bad:
            keep = np.ones(len(x), dtype=bool)
            keep[list(bad)] = False
            x, rows = x[keep], rows[keep]
        transformed = self.transform(x)
        # values were checked before; only a transform (scaling) can make them overflow
        ok = finite_rows(transformed, allow_nan=self.spec.allow_missing) if transformed is not x else None
        x = transformed
        if ok is not None:
            for i in np.flatnonzero(~ok):
                row = int(rows[i])
                field_ = self.spec.columns[0] if self.spec.kind != "columns" else None
                where = f", field {field_!r}" if field_ else ""
                bad[row - row_start] = RowError(row, f"row {row}{where}: not finite after preprocessing "
                                                     f"({non_finite_reason(x[i])})", field_)
            x, rows = x[ok], rows[ok]
        return Converted(x, rows, [bad[i] for i in sorted(bad)], n)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``preprocessing`` applied to ``x`` (``(n, *row_shape)``), in the input dtype."""
        prep = self.preprocessing
        if prep.affine:
            x = x * np.asarray(prep.scale, dtype=x.dtype if x.dtype.kind == "f" else np.float64) + prep.shift
        if prep.mean is not None:
            axis = 1 if prep.layout == "NCHW" else x.ndim - 1
            shape = [1] * x.ndim
            shape[axis] = len(prep.mean)
            x = (x - np.asarray(prep.mean, dtype=np.float32).reshape(shape)) / np.asarray(
                prep.std, dtype=np.float32).reshape(shape)
        return x if x.dtype == np.dtype(self.spec.dtype) else x.astype(self.spec.dtype)
