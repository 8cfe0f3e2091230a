"""The systems ``bench/bulk.py`` measures, each run in a fresh process of its own (so that
the producer's peak RSS is its own): the raw loop, ours (``Client.score_dataset`` against
``python -m worker``), plain Celery (``bench/naive_bulk.py``) and Ray Data.

Each ``run_*`` returns a dict: ``seconds`` (one per repetition), ``rows``, the peak RSS
(VmHWM, bytes) of the ``producer`` and of each worker process, and extras.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.workloads import Workload, columns_of, data_path, matrix, one_thread, run_raw

REPO = Path(__file__).resolve().parents[1]
REDIS_OURS = "redis://127.0.0.1:6379/8"
REDIS_NAIVE = "redis://127.0.0.1:6379/9"
PG_DB = "mlf_bench_bulk"
PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DB}"
START_TIMEOUT_S = 240


def peak_rss(pid: int | str = "self") -> int | None:
    """Peak resident set size (VmHWM) of a process, bytes; ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children so far."""
    import psutil

    proc = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}, **extra)
    return env


def _stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for(check, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"{what} did not start; log tail:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)


# ---------------------------------------------------------------------------- raw


def run_raw_system(root: Path, w: Workload, n: int, reps: int, **_: object) -> dict:
    seconds = [run_raw(root, w, n) for _ in range(reps)]
    return {"seconds": seconds, "rows": n, "producer_rss": peak_rss(), "worker_rss": []}


# ---------------------------------------------------------------------------- ours


def run_ours(root: Path, w: Workload, n: int, reps: int, *, backend: str, processes: int,
             profile: bool = False, source: str = "local", **_: object) -> dict:
    """``Client.score_dataset`` end to end (submit -> job finished, every shard's rows
    committed) against ``python -m worker --processes N --threads 1 --preload MODEL``.

    With ``profile``, one more repetition runs under ``py-spy record`` on the first worker
    process; its collapsed stacks go to ``<root>/profiles``. With ``source="s3"`` the same
    Parquet file is read from a SeaweedFS S3 server on loopback (``tests/s3server.py``,
    started here, the file uploaded before timing) instead of the data directory.
    """
    import psutil

    from ml_framework.settings import load_settings
    from producer.client import Client

    var_dir = Path(tempfile.mkdtemp(prefix=f"var-{backend}-{processes}-", dir=root))
    values: dict[str, object] = {
        "models_dir": root / "models", "data_dir": root / "data", "var_dir": var_dir,
        "shard_size": w.shard_size, "bulk_queue": "mlf.benchbulk.bulk", "online_queue": "mlf.benchbulk.online",
        "worker_metrics_port": 0, "broker_polling_interval_s": 0.05, "log_to_file": False,
        "logging_level": "WARNING",
    }
    if backend == "redis-postgres":
        values.update(broker_url=REDIS_OURS, database_url=PG_URL)
    s3 = None
    path: Path | str = data_path(root, w.name)
    if source == "s3":
        from tests.s3server import S3Server

        s3 = S3Server(Path(tempfile.mkdtemp(prefix="s3-", dir=root))).start()
        s3.create_bucket("mlf-bench")
        path = s3.upload(path, f"s3://mlf-bench/{w.name}.parquet")
        values.update(s3.settings)
    client = Client(load_settings(**values))
    log = var_dir / "workers.log"
    env = _env({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--processes", str(processes), "--threads", "1",
                                 "--preload", w.name, "--grace", "20"],
                                env=env, cwd=var_dir, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: sum(bool(x.models) for x in client.workers()) >= processes, "mlf worker", proc, log)
        pids = [x.pid for x in client.workers()]
        seconds, submits, rss_growth = [], [], []
        store_cpu = []  # the object store server's CPU seconds per repetition (it shares these cores)
        for rep in range(reps + (1 if profile else 0)):
            spy = _start_py_spy(root, w, pids[0]) if rep == reps else None
            rss0 = psutil.Process().memory_info().rss
            s3_cpu0 = _cpu_s(s3.proc.pid) if s3 is not None else 0.0
            started = time.perf_counter()
            job = client.score_dataset(path, model=w.name, batch_size=w.batch_size)
            submitted = time.perf_counter()
            rss1 = psutil.Process().memory_info().rss
            status = job.wait(timeout_s=3600, poll_start_s=0.02, poll_max_s=0.1)
            elapsed = time.perf_counter() - started
            if status.state.value != "SUCCEEDED" or status.rows_ok != n:
                raise RuntimeError(f"job {job.id}: {status.state.value}, {status.rows_ok}/{n} rows ok")
            if spy is not None:
                profile_stats = _stop_py_spy(*spy)
                continue
            seconds.append(elapsed)
            if s3 is not None:
                store_cpu.append(_cpu_s(s3.proc.pid) - s3_cpu0)
            submits.append(submitted - started)
            rss_growth.append(rss1 - rss0)
        worker_rss = [peak_rss(pid) for pid in pids]
    finally:
        _stop(proc)
        client.close()
        if s3 is not None:
            s3.stop()
    result = {"seconds": seconds, "rows": n, "producer_rss": peak_rss(), "worker_rss": worker_rss,
              "submit_s": submits, "submit_rss_growth": rss_growth,
              "shards": -(-n // w.shard_size)}
    if store_cpu:
        result["object_store_cpu_s"] = store_cpu
    if profile:
        result["profile"] = profile_stats
    shutil.rmtree(var_dir, ignore_errors=True)
    return result


def _start_py_spy(root: Path, w: Workload, pid: int) -> tuple[subprocess.Popen, Path]:
    out = root / "profiles" / f"{w.name}.txt"
    out.parent.mkdir(exist_ok=True)
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-o", str(out),
                            "-f", "raw", "-r", "100", "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return spy, out


PHASES = {  # frame (function name) -> phase of a bulk shard on the task's thread, outermost match wins
    "claim_shard": "claim",
    "complete_shard": "result writes (complete_shard)",
    "pieces": "waiting for input (prefetch thread behind)",
    "submit": "model forward",
    "collect": "model forward",
    "predict_batch": "model forward",
    "assemble": "result decoding (assemble)",
}
PREFETCH_PHASES = {  # the same on the prefetch thread, which reads and converts ahead
    "convert": "convert inputs",
    "_pieces": "read shard",
    "_stashed": "read shard",
}


def _stop_py_spy(spy: subprocess.Popen, out: Path) -> dict:
    """Stop py-spy and split the samples by phase: those inside ``run_bulk_shard`` (the
    task's thread: the critical path) as shares of its time, and the prefetch thread's
    (reading and converting the next piece meanwhile) as shares of the same time."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
    counts = {phase: 0 for phase in PHASES.values()}
    counts["other shard work"] = 0
    ahead = {phase: 0 for phase in PREFETCH_PHASES.values()}
    busy = total = 0
    if not out.exists():
        return {"error": "py-spy wrote nothing"}
    for line in out.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        # "ResultStore.complete_shard (file:line)" -> "complete_shard"
        frames = [f.split(" (")[0].split(".<locals>")[0].rsplit(".", 1)[-1] for f in stack.split(";")]
        if "_serve" in frames or "_read_guess" in frames:
            phase = next((PREFETCH_PHASES[f] for f in frames if f in PREFETCH_PHASES), None)
            if phase is not None:
                ahead[phase] += int(n)
            continue
        if "run_bulk_shard" not in frames:
            continue
        busy += int(n)
        phase = next((PHASES[f] for f in frames if f in PHASES), "other shard work")
        counts[phase] += int(n)
    return {"file": str(out), "samples": total, "shard_samples": busy,
            "share_of_shard_time": {k: v / max(busy, 1) for k, v in counts.items()},
            "prefetch_thread_share": {k: v / max(busy, 1) for k, v in ahead.items()}}


# ---------------------------------------------------------------------------- plain Celery


def run_naive(root: Path, w: Workload, n: int, reps: int, **_: object) -> dict:
    """One ``naive.bulk.predict`` task per row (the first ``n`` rows of the file),
    ``delay`` for each, then ``get`` for each; prefork pool, concurrency 2, one thread."""
    import psutil
    import pyarrow.parquet as pq

    env = _env({"MLF_BENCH_REDIS": REDIS_NAIVE, "MLF_BENCH_DIR": str(root), "MLF_BENCH_WORKLOAD": w.name,
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"})
    log = root / f"naive-{w.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.naive_bulk", "worker", "--pool",
                                 "prefork", "--concurrency", "2", "--loglevel", "WARNING"],
                                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    os.environ["MLF_BENCH_REDIS"] = REDIS_NAIVE
    from bench import naive_bulk

    try:
        _wait_for(lambda: bool(naive_bulk.app.control.ping(timeout=1)), "plain Celery", proc, log)
        if w.name == "text":
            rows: list = (root / "data" / "text.txt").read_text(encoding="utf-8").splitlines()[:n]
        else:
            table = pq.read_table(data_path(root, w.name), columns=columns_of(w.name)).slice(0, n)
            rows = matrix(table).tolist()
        for r in [naive_bulk.predict.delay(rows[i % n]) for i in range(8)]:  # load the model in both children
            r.get(timeout=600)
        seconds = []
        for _ in range(reps):
            started = time.perf_counter()
            pending = [naive_bulk.predict.delay(row) for row in rows]
            outputs = [r.get(timeout=3600) for r in pending]
            seconds.append(time.perf_counter() - started)
            assert len(outputs) == n
        children = psutil.Process(proc.pid).children()
        worker_rss = [peak_rss(c.pid) for c in children]
    finally:
        _stop(proc)
    return {"seconds": seconds, "rows": n, "producer_rss": peak_rss(), "worker_rss": worker_rss}


# ---------------------------------------------------------------------------- Ray Data


class RayScorer:
    """Ray Data actor: loads the model once, scores one Arrow batch per call, and records
    its peak RSS in ``<root>/ray-rss/<pid>``."""

    def __init__(self, root: str, workload: str) -> None:
        from bench.workloads import Model

        self.model = Model(Path(root), workload)
        self.rss = Path(root) / "ray-rss" / str(os.getpid())
        self.rss.parent.mkdir(exist_ok=True)

    def __call__(self, batch):
        y = self.model.predict(matrix(batch))
        self.rss.write_text(str(peak_rss()))
        return {"output": y.astype(np.float32)}


def run_ray(root: Path, w: Workload, n: int, reps: int, **_: object) -> dict:
    """``read_parquet -> map_batches(RayScorer, concurrency=2) -> write_parquet`` on a local
    Ray (``num_cpus=2``); the time includes the actors' start and model load, not
    ``ray.init``. Each actor asks for half a logical CPU (it runs one thread): with a whole
    one each, the two actors hold both CPUs and the read tasks never get scheduled."""
    one_thread()
    os.environ["PYTHONPATH"] = str(REPO)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    seconds = []
    try:
        for rep in range(reps):
            out = root / f"ray-out-{w.name}-{rep}"
            started = time.perf_counter()
            ds = ray.data.read_parquet(str(data_path(root, w.name)), columns=columns_of(w.name))
            ds.map_batches(RayScorer, fn_constructor_args=(str(root), w.name), batch_size=w.batch_size,
                           batch_format="pyarrow", concurrency=2, num_cpus=0.5).write_parquet(str(out))
            seconds.append(time.perf_counter() - started)
            written = sum(f.stat().st_size for f in out.iterdir())
            assert written > 0
            shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
    rss_dir = root / "ray-rss"
    worker_rss = [int(f.read_text()) for f in rss_dir.iterdir()] if rss_dir.exists() else []
    shutil.rmtree(rss_dir, ignore_errors=True)
    return {"seconds": seconds, "rows": n, "producer_rss": peak_rss(), "worker_rss": sorted(worker_rss)[-2:]}


SYSTEMS = {"raw": run_raw_system, "ours": run_ours, "naive": run_naive, "ray": run_ray}
