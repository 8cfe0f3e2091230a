"""Overhead benchmark: our per-row cost against a raw loop doing the same I/O, with a model
that does almost no compute (the CPU stand-in for a fast GPU, where our own per-row work is
what users feel).

Data: ``--rows`` random 3x32x32 float32 images in two Parquet layouts, row groups of
``--row-group`` rows: one ``fixed_size_list<float>[3072]`` tensor column, and 3,072
one-value columns (``p0`` .. ``p3071``). Model: one ``Linear(3072, 10)`` layer with a
softmax (``torch.export``), published twice: with a ``tensor`` input and with a
``columns`` input.

- **raw**: one process, one torch thread: ``pyarrow.parquet.ParquetFile.iter_batches``
  over the file in chunks of 8,192 rows (pyarrow's own decoding threads, as anyone gets
  them), each chunk to one NumPy array, the model over it in batches under
  ``torch.inference_mode()``, softmax / argmax, and the same result columns
  (``prediction``, ``score``, ``probabilities``) written as one Parquet file.
- **ours**: ``Client.score_dataset`` on the same file through the queue, from the call to
  the job being finished (every shard's rows committed to the results store), against a
  warm ``python -m worker --processes 1 --threads 1 --preload MODEL`` (model loaded, one
  warm-up job run first).

Both in the same run, same batch size. Prints a table and one line ``ours/raw <ratio>``
per layout, tensor column first.

Usage, from the repository root::

    .venv/bin/python bench/overhead.py --quick    # 50,000 rows, embedded broker: ~3 min on 2 cores
    .venv/bin/python bench/overhead.py            # 200,000 rows (5 GB of data under var/)
    .venv/bin/python bench/overhead.py --backend redis-postgres   # WIPES Redis db 10 and the
                                                                  # PostgreSQL database mlf_bench_overhead

``--profile`` records the worker with py-spy during one extra job and prints where its
time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

SIDE, CHANNELS, CLASSES = 32, 3, 10
VALUES = CHANNELS * SIDE * SIDE
COLUMNS = [f"p{i}" for i in range(VALUES)]
REDIS_URL = "redis://127.0.0.1:6379/10"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_DB = "mlf_bench_overhead"
RAW_CHUNK_ROWS = 8192
LAYOUTS = {"tensor": "tensor column (fixed_size_list<float>[3072])", "columns": "3,072 float columns"}


def one_thread() -> None:
    """One framework thread in this process (the raw loop), as the worker gets."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def build_data(data_dir: Path, rows: int, row_group: int) -> dict[str, Path]:
    """Write the two layouts of ``rows`` random images, row group by row group."""
    paths = {"tensor": data_dir / "images-tensor.parquet", "columns": data_dir / "images-columns.parquet"}
    rng = np.random.default_rng(0)
    tensor_schema = pa.schema([("image", pa.list_(pa.float32(), VALUES))])
    columns_schema = pa.schema([(c, pa.float32()) for c in COLUMNS])
    with pq.ParquetWriter(paths["tensor"], tensor_schema) as tw, pq.ParquetWriter(paths["columns"], columns_schema) as cw:
        for start in range(0, rows, row_group):
            x = rng.random((min(row_group, rows - start), VALUES), dtype=np.float32)
            tw.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), VALUES)}))
            cw.write_table(pa.Table.from_arrays([pa.array(x[:, j]) for j in range(VALUES)], schema=columns_schema))
    return paths


def build_models(models_dir: Path) -> None:
    """``lin-tensor`` and ``lin-columns``: the same Linear(3072, 10), two input layouts."""
    import torch

    from worker.export import export_torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(VALUES, CLASSES)).eval()
    outputs = {"kind": "classification", "labels": list(range(CLASSES)), "activation": "softmax"}
    export_torch(model, models_dir, "lin-tensor", inputs={"kind": "tensor", "columns": ["image"],
                                                          "shape": [CHANNELS, SIDE, SIDE]}, outputs=outputs)
    export_torch(model, models_dir, "lin-columns", inputs={"columns": COLUMNS, "shape": [CHANNELS, SIDE, SIDE]},
                 outputs=outputs)
    torch.save(model.state_dict(), models_dir / "lin.pt")


def raw_loop(path: Path, layout: str, model, batch_size: int, out: Path) -> float:
    """The raw loop (see the module docstring); seconds. It reads the file in chunks of
    :data:`RAW_CHUNK_ROWS` rows (converting 3,072 columns once per chunk, not per batch: the
    strongest simple loop) and runs the model over each chunk in batches of ``batch_size``."""
    import torch

    started = time.perf_counter()
    pf = pq.ParquetFile(path)
    parts = []
    with torch.inference_mode():
        for chunk in pf.iter_batches(batch_size=RAW_CHUNK_ROWS):
            if layout == "tensor":
                images = chunk.column(0).values.to_numpy().reshape(-1, CHANNELS, SIDE, SIDE)
            else:
                images = np.column_stack([c.to_numpy() for c in chunk.columns]).reshape(-1, CHANNELS, SIDE, SIDE)
            for a in range(0, len(images), batch_size):
                probs = torch.softmax(model(torch.from_numpy(images[a:a + batch_size])), dim=1).numpy()
                probs = probs.astype(np.float64)
                k = probs.argmax(axis=1)
                parts.append(pa.table({
                    "prediction": pa.array(k), "score": pa.array(probs[np.arange(len(k)), k]),
                    "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), CLASSES)}))
    pq.write_table(pa.concat_tables(parts), out)
    return time.perf_counter() - started


def backend_settings(root: Path, backend: str, shard_size: int, tag: str = "benchoverhead") -> dict[str, object]:
    """Settings of a bench's worker and client under ``root`` (``models``, ``data``, ``var``),
    on queues named after ``tag``. ``redis-postgres`` WIPES Redis db 10 and :data:`PG_DB`."""
    values: dict[str, object] = {
        "models_dir": root / "models", "data_dir": root / "data", "var_dir": root / "var",
        "shard_size": shard_size, "bulk_queue": f"mlf.{tag}.bulk", "online_queue": f"mlf.{tag}.online",
        "worker_metrics_port": 0, "log_to_file": False, "logging_level": "WARNING",
    }
    if backend == "redis-postgres":
        import psycopg
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{PG_DB}"')
        values.update(broker_url=REDIS_URL,
                      database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DB}")
    return values


def start_worker(values: dict[str, object], models: list[str], log: Path, threads: int = 1) -> subprocess.Popen:
    """``python -m worker``: one process of ``threads`` framework threads, ``models`` preloaded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    preload = [arg for m in models for arg in ("--preload", m)]
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "worker", "--processes", "1", "--threads", str(threads), *preload,
                                 "--grace", "20"], env=env, cwd=values["var_dir"], stdout=out, stderr=subprocess.STDOUT)


def wait_for_models(client, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Wait until a worker process reports its preloaded models.

    Raises:
        RuntimeError: the worker exited or did not load them within ``timeout_s``
            (with the end of its log).
    """
    deadline = time.monotonic() + timeout_s
    while not any(w.models for w in client.workers()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.3)


def scratch_root(name: str) -> Path:
    """A new directory ``var/bench-<name>-*`` with ``data``, ``models`` and ``var`` in it."""
    (REPO / "var").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=REPO / "var"))
    for sub in ("data", "models", "var"):
        (root / sub).mkdir()
    return root


def save_results(name: str, quick: bool, payload: dict) -> None:
    """``payload`` as ``bench/results/<name>[-quick].json``."""
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}{'-quick' if quick else ''}.json").write_text(json.dumps(payload, indent=2))


def clean_up(proc: subprocess.Popen | None, root: Path, keep: bool) -> None:
    """Stop the worker (killed if it has not stopped within 30 s) and remove ``root``
    unless ``keep``."""
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


def ours(client, path: Path, model: str, batch_size: int, rows: int) -> float:
    """One job through the queue; seconds from the call to the job finished."""
    started = time.perf_counter()
    job = client.score_dataset(path, model=model, batch_size=batch_size)
    status = job.wait(timeout_s=3600)
    elapsed = time.perf_counter() - started
    if status.state.value != "SUCCEEDED" or status.rows_ok != rows:
        raise RuntimeError(f"job {job.id}: {status.state.value}, {status.rows_ok}/{rows} rows ok")
    return elapsed


PHASES = {"prefetch thread": "_loop", "read (parquet decode wait)": "parquet_pieces", "convert": "convert",
          "forward": "predict_batch", "decode outputs": "decode_outputs", "record (store)": "complete_shard",
          "claim": "claim_shard", "broker / celery": "drain_events"}
"""Phases of a worker profile: name -> a frame whose presence on a stack puts it there."""
THREADS = ("run_bulk_shard", "mlf-prefetch", "drain_events")
"""Frames marking the stacks a profile counts (the task, the prefetch thread, the broker)."""


def profile_job(client, pid: int, path: Path, model: str, batch_size: int, rows: int, out: Path,
                phases: dict[str, str] = PHASES, threads: tuple[str, ...] = THREADS) -> dict[str, float]:
    """One more job under py-spy on the worker; the share of the samples of the stacks
    holding one of ``threads`` that fall in each of ``phases``."""
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-o", str(out),
                            "-f", "raw", "-r", "200", "--nonblocking", "--threads"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    ours(client, path, model, batch_size, rows)
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
    spy.wait(timeout=60)
    counts = dict.fromkeys(phases, 0)
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not any(frame in stack for frame in threads):
            continue
        total += int(n)
        for phase, frame in phases.items():
            if frame in stack:
                counts[phase] += int(n)
    return {k: v / total for k, v in counts.items()} if total else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50,000 rows, one layout pass each")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--row-group", type=int, default=10_000)
    parser.add_argument("--backend", choices=["embedded", "redis-postgres"], default="embedded")
    parser.add_argument("--layouts", default="tensor,columns")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data directory under var/")
    args = parser.parse_args()
    rows = args.rows or (50_000 if args.quick else 200_000)
    layouts = [name for name in LAYOUTS if name in args.layouts.split(",")]
    one_thread()
    import torch

    torch.set_num_threads(1)
    from ml_framework.settings import load_settings
    from producer.client import Client

    root = scratch_root("overhead")
    results = {}
    proc = None
    try:
        t0 = time.perf_counter()
        paths = build_data(root / "data", rows, args.row_group)
        build_models(root / "models")
        print(f"data: {rows:,} rows x {VALUES} float32, row groups of {args.row_group:,}, built in "
              f"{time.perf_counter() - t0:.0f} s; batch {args.batch_size}, shards of {args.shard_size:,}, "
              f"backend {args.backend}", flush=True)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(VALUES, CLASSES)).eval()
        model.load_state_dict(torch.load(root / "models" / "lin.pt"))
        values = backend_settings(root, args.backend, args.shard_size)
        client = Client(load_settings(**values))
        models = [f"lin-{layout}" for layout in layouts]
        proc = start_worker(values, models, root / "worker.log")
        wait_for_models(client, proc, root / "worker.log")
        for layout in layouts:  # warm-up: Parquet footers, first shards
            warm = root / "data" / f"warm-{layout}.parquet"
            pq.write_table(pq.ParquetFile(paths[layout]).read_row_group(0), warm)
            ours(client, warm, f"lin-{layout}", args.batch_size, min(args.row_group, rows))
        for layout in layouts:
            raw_s = raw_loop(paths[layout], layout, model, args.batch_size, root / f"raw-{layout}.parquet")
            our_s = ours(client, paths[layout], f"lin-{layout}", args.batch_size, rows)
            results[layout] = {"raw_s": raw_s, "ours_s": our_s}
            print(f"{LAYOUTS[layout]}: raw {raw_s:.2f} s ({rows / raw_s:,.0f} rows/s), ours {our_s:.2f} s "
                  f"({rows / our_s:,.0f} rows/s)", flush=True)
            if args.profile:
                pid = client.workers()[0].pid
                shares = profile_job(client, pid, paths[layout], f"lin-{layout}", args.batch_size, rows,
                                     root / f"profile-{layout}.txt")
                results[layout]["profile"] = shares
                print("  worker profile: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()), flush=True)
        print()
        for layout in layouts:
            r = results[layout]
            print(f"ours/raw {r['raw_s'] / r['ours_s']:.2f}  ({LAYOUTS[layout]})")
        save_results("overhead", args.quick, {"rows": rows, "batch_size": args.batch_size, "shard_size": args.shard_size,
                                              "backend": args.backend, "results": results})
        client.close()
    finally:
        clean_up(proc, root, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
