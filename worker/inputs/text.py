"""``text`` inputs: one string column, tokenized on the worker with Hugging Face ``tokenizers``.

The tokenizer is the manifest's ``tokenizer.file`` (a ``tokenizer.json``) in the model
version's directory, loaded once per model version. A piece of a shard is tokenized with
one ``encode_batch`` call (Rust, several threads, the GIL released), on the worker's
prefetch thread while the device runs the previous piece.

- ``tokenizer.truncation`` true: texts are cut at ``tokenizer.max_length`` tokens
  (special tokens included), as ``transformers``' ``truncation=True`` cuts one sequence;
  false: a longer text fails its own row with an error naming its token count.
- Padding is per batch (``padding: longest``): the rows of a piece are sorted by token
  count, longest first (as ``sentence-transformers``' ``encode`` sorts its input), so that
  a batch holds texts of about the same length, and each batch sliced from the piece is cut
  to its own longest row. ``Converted.rows`` follows the sorted order, so every output
  keeps its dataset row number. ``padding: max_length`` pads every row to
  ``tokenizer.max_length`` (models exported with a fixed length).
- A null cell (unless ``inputs.allow_missing``, which reads it as an empty text), a cell
  that is not UTF-8 (CSV cells arrive as bytes) or a cell of a column that does not hold
  strings fails only its own row, naming row and field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from ml_framework.errors import ManifestError
from ml_framework.manifest import ModelManifest
from ml_framework.settings import Settings
from ml_framework.store import RowError
from worker.inputs.base import Converted, InputConverter

_PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>")
"""Padding tokens tried, in order, when ``tokenizer.json`` configures no padding: BERT's
WordPiece vocabularies, SentencePiece / RoBERTa vocabularies, GPT-NeoX's."""


def _is_text(column_type: pa.DataType) -> bool:
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(column_type))


class TokenBatch:
    """Token features of ``n`` texts, one padded ``(n, width)`` array per feature.

    Slicing (``batch[a:b]``) and :meth:`take` give the chosen rows with the columns cut to
    the longest of them (``padding: longest``), so that each batch the runtime slices from
    a piece is padded only as far as it needs; with a fixed ``pad_to`` the width stays.

    Args:
        features: feature name -> ``(n, width)`` array of the input dtype (``int64`` or
            ``int32``), in the order the model takes them (``tokenizer.features``).
        lengths: ``(n,)`` int64, tokens per row (special tokens included, before padding).
        pad_to: fixed width (``padding: max_length``), or ``None`` (pad to the longest row).
    """

    def __init__(self, features: dict[str, np.ndarray], lengths: np.ndarray, pad_to: int | None = None) -> None:
        self.features = features
        self.lengths = lengths
        self.pad_to = pad_to

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Tokens per row of the padded arrays."""
        return next(iter(self.features.values())).shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, width)``, for messages."""
        return len(self), self.width

    def arrays(self) -> list[np.ndarray]:
        """The model's positional inputs: one ``(n, width)`` array per feature, in order."""
        return list(self.features.values())

    def _cut(self, features: dict[str, np.ndarray], lengths: np.ndarray) -> TokenBatch:
        width = self.pad_to or max(1, int(lengths.max(initial=0)))
        return TokenBatch({k: v[:, :width] for k, v in features.items()}, lengths, self.pad_to)

    def __getitem__(self, index: slice) -> TokenBatch:
        if not isinstance(index, slice):
            raise TypeError(f"a TokenBatch is sliced with a slice or take(indices), not {type(index).__name__}")
        return self._cut({k: v[index] for k, v in self.features.items()}, self.lengths[index])

    def take(self, indices: np.ndarray) -> TokenBatch:
        """Rows ``indices`` (``(k,)`` integers), cut to the longest of them."""
        indices = np.asarray(indices, dtype=np.int64)
        return self._cut({k: v[indices] for k, v in self.features.items()}, self.lengths[indices])

    @classmethod
    def concat(cls, parts: Sequence[TokenBatch], pad_ids: dict[str, int]) -> TokenBatch:
        """``parts`` as one batch, each padded to the widest with ``pad_ids[feature]``."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.width for p in parts)
        features = {}
        for name in parts[0].features:
            features[name] = np.concatenate([
                np.pad(p.features[name], ((0, 0), (0, width - p.width)), constant_values=pad_ids[name])
                for p in parts])
        return cls(features, np.concatenate([p.lengths for p in parts]), parts[0].pad_to)


class TextConverter(InputConverter):
    """One string column -> a :class:`TokenBatch` of ``tokenizer.features`` (see the module
    docstring).

    Raises:
        ManifestError: at set-up, when the tokenizer file is missing or not a tokenizer
            ``tokenizers`` can read (naming the file).
    """

    def __init__(self, manifest: ModelManifest, directory: Path, data_dir: Path | None = None,
                 threads: int | None = None, settings: Settings | None = None) -> None:
        super().__init__(manifest, directory, data_dir, threads, settings)
        from tokenizers import Tokenizer

        spec = manifest.tokenizer
        assert spec is not None  # the manifest refuses text inputs without a tokenizer
        self.tokenizer_spec = spec
        path = self.directory / spec.file
        if not path.is_file():
            raise ManifestError(f"{path}: tokenizer file not found (tokenizer.file of model "
                                f"{manifest.name}/{manifest.version})")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ManifestError(f"{path}: not a tokenizer file the tokenizers library can read: {exc}") from exc
        pad_id = (tokenizer.padding or {}).get("pad_id")
        if pad_id is None:
            pad_id = next((i for t in _PAD_TOKENS if (i := tokenizer.token_to_id(t)) is not None), 0)
        self.pad_ids = {"input_ids": int(pad_id), "attention_mask": 0, "token_type_ids": 0}
        tokenizer.no_padding()  # padding is ours, per batch
        if spec.truncation:
            tokenizer.enable_truncation(spec.max_length)
        else:  # tokenize whole, to refuse (and name the count of) a text that is too long
            tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.dtype = np.dtype(self.spec.dtype)

    def _convert(self, table: pa.Table, columns: Sequence[str], row_start: int) -> Converted:
        """See :meth:`InputConverter.convert`. Rows come back sorted longest first."""
        name = columns[0]
        column = table.column(name)
        n = table.num_rows
        bad: dict[int, RowError] = {}

        def fail(i: int, reason: str) -> None:
            bad[i] = RowError(row_start + i, f"row {row_start + i}, field {name!r}: {reason}", name)

        column_type = column.type
        if _is_text(column_type):
            cells = column.to_pylist()
        elif pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
            cells = self._decoded(column, fail)  # CSV cells arrive as bytes
        else:  # a CSV column the reader took for numbers, an in-memory column of other values
            cells = [None] * n
            for i, value in enumerate(column.to_pylist()):
                if value is not None:
                    fail(i, f"not a text: {type(value).__name__} value (column type {column_type})")
        texts: list[str] = []
        index: list[int] = []
        for i, text in enumerate(cells):
            if i in bad:  # not text, not UTF-8
                continue
            if text is None:
                if not self.spec.allow_missing:
                    fail(i, "missing text (null)")
                    continue
                text = ""
            texts.append(text)
            index.append(i)
        batch, lengths = self._encode(texts)
        keep = np.arange(len(texts))
        max_length = self.tokenizer_spec.max_length
        if not self.tokenizer_spec.truncation and len(lengths) and lengths.max() > max_length:
            too_long = lengths > max_length
            for j in np.flatnonzero(too_long):
                fail(index[j], f"{int(lengths[j])} tokens, the model takes at most {max_length} "
                               f"(tokenizer.max_length; tokenizer.truncation is false)")
            keep = np.flatnonzero(~too_long)
        order = keep[np.argsort(-lengths[keep], kind="stable")]  # longest first, ties in row order
        rows = row_start + np.asarray(index, dtype=np.int64)[order]
        x = batch.take(order) if len(order) < len(batch) or (np.diff(order) != 1).any() else batch
        return Converted(x, rows, [bad[i] for i in sorted(bad)], n)

    @staticmethod
    def _decoded(column: pa.ChunkedArray, fail) -> list[str | None]:
        """A binary column's cells as ``str`` (UTF-8); a cell that is not UTF-8 fails its
        row (and reads as ``None`` here, its error already recorded)."""
        try:
            return column.cast(pa.large_string()).to_pylist()
        except pa.ArrowInvalid:  # some cell is not UTF-8: decode cell by cell to name it
            cells: list[str | None] = []
            for i, raw in enumerate(column.to_pylist()):
                try:
                    cells.append(None if raw is None else raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    fail(i, f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})")
                    cells.append(None)
            return cells

    def _encode(self, texts: list[str]) -> tuple[TokenBatch, np.ndarray]:
        """``texts`` tokenized: the padded :class:`TokenBatch` and ``(n,)`` token counts."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True) if texts else []
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        spec = self.tokenizer_spec
        width = spec.max_length if spec.padding == "max_length" else int(lengths.max(initial=1))
        # too-long rows (no truncation) are refused after; cut them here so they fit the array
        valid = np.arange(width) < np.minimum(lengths, width)[:, None]  # (n, width) real tokens
        features = {}
        for feature in spec.features:
            values = valid.astype(self.dtype) if feature == "attention_mask" else self._flat(encodings, feature, width)
            if feature != "attention_mask":
                padded = np.full((len(texts), width), self.pad_ids[feature], dtype=self.dtype)
                padded[valid] = values
                values = padded
            features[feature] = values
        return TokenBatch(features, np.minimum(lengths, width),
                          spec.max_length if spec.padding == "max_length" else None), lengths

    def _flat(self, encodings: list, feature: str, width: int) -> np.ndarray:
        """The real tokens' ``feature`` values of every encoding, row after row, each row cut
        at ``width``."""
        attr = "ids" if feature == "input_ids" else "type_ids"
        parts = [getattr(e, attr)[:width] for e in encodings]
        total = sum(len(p) for p in parts)
        return np.fromiter((v for p in parts for v in p), dtype=self.dtype, count=total)

    def example(self, n: int) -> TokenBatch:
        """``n`` empty texts, tokenized (the special tokens only): neutral input for warm-up
        and validation batches."""
        return self._encode([""] * n)[0]

    def concat(self, parts: Sequence[TokenBatch]) -> TokenBatch:
        """Several converted pieces as one batch (online requests gathered together)."""
        return TokenBatch.concat(parts, self.pad_ids)

    def bytes_per_row(self) -> int:
        """Bytes of model input per row at the longest (every feature, ``max_length`` tokens)."""
        return self.tokenizer_spec.max_length * self.dtype.itemsize * len(self.tokenizer_spec.features)
