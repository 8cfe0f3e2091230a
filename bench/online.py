"""Online-request benchmark: requests/s and p50 / p99 latency of single-row requests.

Compares, in one run on this machine, with the same scikit-learn digits model and two
worker processes each:

(a) plain Celery, one task per request, answers through Celery's Redis result backend
    (``bench/naive_celery.py``, prefork pool, concurrency 2);
(b) ours: ``Client.predict`` against ``mlf worker --cpu-processes 2`` (Redis broker,
    PostgreSQL results store), dynamic batching on the workers; the callers are threads
    of one process, as in (a), and then asyncio tasks awaiting ``Client.apredict``;

at 1, 16 and 128 concurrent callers (threads), and prints the model's own compute time
for one row, measured in this process, to show the latency we add on top of it.

Needs Redis on 127.0.0.1:6379 (db 6 for the baseline, db 7 for ours) and PostgreSQL on
127.0.0.1:5432 (user postgres, trust auth). It WIPES them: FLUSHDB of Redis db 6 and 7,
and DROP DATABASE mlf_bench_online. Usage, from the repository root::

    .venv/bin/python bench/online.py            # ~3 minutes on 2 cores
    .venv/bin/python bench/online.py --quick    # fewer requests
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REDIS_NAIVE = "redis://127.0.0.1:6379/6"
REDIS_OURS = "redis://127.0.0.1:6379/7"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_DB = "mlf_bench_online"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run_load(call, rows: np.ndarray, concurrency: int, n: int) -> tuple[float, list[float]]:
    """``n`` calls of ``call(row)`` from ``concurrency`` threads: requests/s and latencies (s)."""
    latencies: list[float] = []

    def one(i: int) -> None:
        started = time.perf_counter()
        call(rows[i % len(rows)])
        latencies.append(time.perf_counter() - started)

    for i in range(min(concurrency, 8)):  # warm connections and caches
        one(i)
    latencies.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - started), latencies


def run_async_load(call, rows: np.ndarray, concurrency: int, n: int) -> tuple[float, list[float]]:
    """As :func:`run_load`, with ``concurrency`` asyncio tasks awaiting ``call(row)`` on one
    event loop instead of threads."""
    import asyncio

    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        await call(rows[i % len(rows)])
        latencies.append(time.perf_counter() - started)

    async def caller(ids: range) -> None:
        for i in ids:
            await one(i)

    async def main() -> float:
        for i in range(min(concurrency, 8)):
            await one(i)
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(caller(range(k, n, concurrency)) for k in range(concurrency)))
        return n / (time.perf_counter() - started)

    return asyncio.run(main()), latencies


def timeline(client, model: str, rows: np.ndarray, n: int = 150) -> dict[str, float]:
    """Median milliseconds of each stage of one request at a time, from timestamps taken
    around the client's own calls: planning (checking and encoding the rows), recording
    the job, sending the message, the worker's part (from sent to the answer being read:
    broker, scoring, recording, announcement), reading the answer, and the rest (building
    the DataFrame, waking the caller)."""
    marks: dict[str, float] = {}

    def wrap(obj, name: str, before: str | None, after: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if before:
                marks[before] = time.perf_counter()
            result = inner(*args, **kwargs)
            marks[after] = time.perf_counter()
            return result

        setattr(obj, name, timed)

    wrap(client.store, "create_jobs", "create0", "create1")
    wrap(client.app, "send_task", None, "sent")
    wrap(client.store, "finished", "wake", "read")
    stages = []
    for i in range(n):
        marks.clear()
        started = time.perf_counter()
        client.predict(model, rows[i % len(rows)].reshape(1, -1), timeout_s=60)
        done = time.perf_counter()
        stages.append([marks["create0"] - started, marks["create1"] - marks["create0"],
                       marks["sent"] - marks["create1"], marks["wake"] - marks["sent"],
                       marks["read"] - marks["wake"], done - marks["read"], done - started])
    names = ["plan", "record job", "send", "worker", "read answer", "frame + wake", "total"]
    return dict(zip(names, (1000 * np.median(np.array(stages[20:]), axis=0)).tolist(), strict=True))


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds used so far by each group of processes."""
    import psutil

    used = {}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        used[name] = total
    return used


def service_pids() -> dict[str, list[int]]:
    """PostgreSQL and Redis server processes on this machine."""
    import psutil

    pids: dict[str, list[int]] = {"postgres": [], "redis": []}
    for proc in psutil.process_iter(["name", "username"]):
        if proc.info["username"] == "postgres":
            pids["postgres"].append(proc.pid)
        elif "redis-server" in (proc.info["name"] or ""):
            pids["redis"].append(proc.pid)
    return pids


def wait_ready(check, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start in {timeout_s} s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    args = parser.parse_args()
    levels = [(1, 30 if args.quick else 60), (16, 160 if args.quick else 400), (128, 256 if args.quick else 800)]

    import psycopg
    import redis

    from demo.digits import PIXELS, SCALE, export_sklearn_model, fit_sklearn, load_data
    from ml_framework.settings import load_settings
    from producer.client import Client

    for url in (REDIS_NAIVE, REDIS_OURS):
        redis.Redis.from_url(url).flushdb()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{PG_DB}"')

    data = load_data()
    raw_rows = data.frame[PIXELS].to_numpy(np.float64)
    tmp = Path(tempfile.mkdtemp(prefix="mlf-bench-online-"))
    clf = fit_sklearn(data)
    manifest = export_sklearn_model(clf, tmp / "models")
    model_path = tmp / "models" / manifest.name / str(manifest.version) / manifest.artifact

    one_row = raw_rows[:1] * SCALE
    compute = []
    for _ in range(200):
        started = time.perf_counter()
        clf.predict_proba(one_row)
        compute.append(time.perf_counter() - started)
    compute_ms = 1000 * statistics.median(compute)

    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    results = []
    cpu_per_request: dict[int, dict[str, float]] = {}

    # (a) plain Celery, one task per request
    naive_env = {**env, "MLF_BENCH_REDIS": REDIS_NAIVE, "MLF_BENCH_MODEL": str(model_path),
                 "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    naive = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.naive_celery", "worker", "--pool",
                              "prefork", "--concurrency", "2", "--loglevel", "WARNING"],
                             env=naive_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sys.path.insert(0, str(REPO))
        os.environ.update({"MLF_BENCH_REDIS": REDIS_NAIVE})
        from bench import naive_celery

        wait_ready(lambda: bool(naive_celery.app.control.ping(timeout=1)), "the plain Celery worker")
        scaled = raw_rows * SCALE
        for concurrency, n in levels:
            rps, lat = run_load(lambda row: naive_celery.predict.delay(row.tolist()).get(timeout=60),
                                scaled, concurrency, n)
            results.append(("plain Celery", concurrency, rps, lat))
    finally:
        stop(naive)

    # (b) ours
    values = {"models_dir": tmp / "models", "var_dir": tmp / "var", "data_dir": tmp / "data",
              "broker_url": REDIS_OURS, "database_url": f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DB}"}
    ours_env = {**env, **{f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()}}
    workers = subprocess.Popen([sys.executable, "-m", "worker", "--cpu-processes", "2", "--preload", manifest.name],
                               env=ours_env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(load_settings(**values))
    try:
        wait_ready(lambda: len(client.workers()) == 2 and all(w.models for w in client.workers()), "mlf worker")
        frame = data.frame[PIXELS]
        pids = {"producer": [os.getpid()], **{w.hostname.split("@")[0]: [w.pid] for w in client.workers()},
                **service_pids()}
        for concurrency, n in levels:
            rps, lat = run_load(lambda row: client.predict(manifest.name, row.reshape(1, -1), timeout_s=60),
                                frame.to_numpy(np.float64), concurrency, n)
            results.append(("ours (dynamic batching)", concurrency, rps, lat))
            before = cpu_seconds(pids)
            rps, lat = run_async_load(lambda row: client.apredict(manifest.name, row.reshape(1, -1), timeout_s=60),
                                      frame.to_numpy(np.float64), concurrency, n)
            after = cpu_seconds(pids)
            results.append(("ours, asyncio callers", concurrency, rps, lat))
            cpu_per_request[concurrency] = {k: 1000 * (after[k] - before[k]) / n for k in pids}
        stages = timeline(client, manifest.name, frame.to_numpy(np.float64), 60 if args.quick else 150)
        batch_rows = [r for (r,) in client.store.engine.connect().exec_driver_sql(
            "SELECT batch_rows FROM shards WHERE batch_rows IS NOT NULL")]
    finally:
        client.close()
        stop(workers)

    print(f"\nmodel compute for one row, in process: {compute_ms:.2f} ms (median of 200)")
    print(f"{'system':<26}{'callers':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p50 - compute':>15}")
    for system, concurrency, rps, lat in results:
        p50, p99 = 1000 * percentile(lat, 50), 1000 * percentile(lat, 99)
        print(f"{system:<26}{concurrency:>8}{rps:>9.1f}{p50:>9.1f}{p99:>9.1f}{p50 - compute_ms:>15.1f}")
    by = {(s, c): rps for s, c, rps, _ in results}
    for concurrency, _ in levels:
        for ours in ("ours (dynamic batching)", "ours, asyncio callers"):
            ratio = by[(ours, concurrency)] / by[("plain Celery", concurrency)]
            print(f"{ours} / plain Celery at {concurrency} callers: {ratio:.2f}x")
    print(f"dynamic batches: mean {np.mean(batch_rows):.1f} rows, max {max(batch_rows)}")
    print("\none request at a time, median ms per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print("\nCPU ms per request, ours with asyncio callers (where the time goes; 2 cores = 2,000 ms/s):")
    for concurrency, used in cpu_per_request.items():
        total = sum(used.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in used.items())
        print(f"  {concurrency:>3} callers: {parts}; total {total:.2f} -> at most {2000 / total:.0f} req/s on 2 cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
