"""Open Inference Protocol benchmark: ``tritonclient`` through ``/v2`` against our ``/v1`` predict.

One run, one API process (uvicorn), the same scikit-learn digits model and two worker
processes (``mlf worker --cpu-processes 2``, Redis broker, PostgreSQL results store);
single-row requests from 16 concurrent callers (threads, one HTTP client each), in
interleaved rounds so that drift of a shared machine hits every series alike:

- ``/v1 predict``: ``POST /v1/models/{name}/predict`` with ``{"rows": [{pixel: value}]}``
  (httpx);
- ``/v2 httpx JSON``: ``POST /v2/models/{name}/infer`` with a JSON tensor, through the same
  client as ``/v1`` (httpx), so that only the server side differs;
- ``/v2 tritonclient JSON``: ``InferenceServerClient.infer`` with JSON tensor data
  (``binary_data=False``);
- ``/v2 tritonclient binary``: the same with tritonclient's default binary tensor data.

Prints p50 / p99 latency and requests/s of each, and the ratio of each ``/v2`` p50 to the
``/v1`` p50 (target: at most 1.10).

Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (user postgres, trust
auth). It WIPES them: FLUSHDB of Redis db 9 (``--redis-db``), and DROP DATABASE
mlf_bench_oip. Usage, from the repository root::

    .venv/bin/python bench/oip.py             # ~2 minutes on 2 cores
    .venv/bin/python bench/oip.py --quick     # fewer requests
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_DB = "mlf_bench_oip"
KEY = "bench-oip-key-0123456789abcdef"
CONCURRENCY = 16


def run_round(make_call, rows: np.ndarray, n: int) -> tuple[float, list[float]]:
    """``n`` single-row calls from :data:`CONCURRENCY` threads, each with its own client
    (``make_call()`` per thread): requests/s and latencies (s)."""
    local = threading.local()
    latencies: list[float] = []

    def one(i: int) -> None:
        if not hasattr(local, "call"):
            local.call = make_call()
            local.call(rows[0])  # connect outside the measurement
        started = time.perf_counter()
        local.call(rows[i % len(rows)])
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - started), latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each series")
    parser.add_argument("--redis-db", type=int, default=9, help="Redis database to FLUSH and use")
    args = parser.parse_args()
    n = 160 if args.quick else 480

    sys.path.insert(0, str(REPO))  # demo, tests.conftest
    import httpx
    import psycopg
    import redis
    import tritonclient.http as triton

    from demo.digits import PIXELS, export_sklearn_model, fit_sklearn, load_data
    from ml_framework.settings import load_settings
    from producer.client import Client
    from tests.conftest import free_port, wait_for_http

    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{PG_DB}"')

    data = load_data()
    rows = data.frame[PIXELS].to_numpy(np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="mlf-bench-oip-"))
    manifest = export_sklearn_model(fit_sklearn(data), tmp / "models")
    values = {"models_dir": tmp / "models", "var_dir": tmp / "var", "data_dir": tmp / "data",
              "broker_url": redis_url, "database_url": f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DB}",
              "log_to_file": "false"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    env["ML_FRAMEWORK_API_KEYS"] = f"bench={KEY}"
    port = free_port()
    workers = subprocess.Popen([sys.executable, "-m", "worker", "--cpu-processes", "2", "--preload", manifest.name],
                               env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "producer.api:app", "--host", "127.0.0.1", "--port",
                            str(port), "--log-level", "warning"], env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(load_settings(**values))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not (len(client.workers()) == 2 and all(w.models for w in client.workers())):
            if time.monotonic() > deadline:
                raise SystemExit("mlf worker did not start in 180 s")
            time.sleep(0.5)
        wait_for_http(f"{base}/health", timeout_s=120)

        def v1():
            http = httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=60)

            def call(row: np.ndarray) -> None:
                body = {"rows": [dict(zip(PIXELS, row.tolist(), strict=True))]}
                r = http.post(f"/v1/models/{manifest.name}/predict", json=body)
                assert r.status_code == 200 and "prediction" in r.json()["rows"][0], r.text

            return call

        def v2_httpx():
            http = httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=60)

            def call(row: np.ndarray) -> None:
                body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
                r = http.post(f"/v2/models/{manifest.name}/infer", json=body)
                assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "prediction", r.text

            return call

        def v2(binary: bool):
            def make():
                tc = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
                wanted = [triton.InferRequestedOutput(o, binary_data=binary) for o in ("prediction", "score",
                                                                                        "probabilities")]

                def call(row: np.ndarray) -> None:
                    given = triton.InferInput("input", [1, 64], "FP32")
                    given.set_data_from_numpy(row.reshape(1, 64), binary_data=binary)
                    result = tc.infer(manifest.name, [given], outputs=wanted, headers={"X-API-Key": KEY})
                    assert result.as_numpy("prediction").shape == (1,)

                return call

            return make

        series = {"/v1 predict": v1, "/v2 httpx JSON": v2_httpx, "/v2 tritonclient JSON": v2(False),
                  "/v2 tritonclient binary": v2(True)}
        latencies: dict[str, list[float]] = {name: [] for name in series}
        rates: dict[str, list[float]] = {name: [] for name in series}
        for make in series.values():  # warm-up: connections, the model, the API's code paths
            run_round(make, rows, 2 * CONCURRENCY)
        for r in range(args.rounds):
            order = list(series) if r % 2 == 0 else list(reversed(series))
            for name in order:
                rps, lat = run_round(series[name], rows, n)
                rates[name].append(rps)
                latencies[name] += lat
        print(f"\nsingle-row requests, {CONCURRENCY} concurrent callers, {args.rounds} rounds x {n} requests "
              f"per series; model {manifest.name} (scikit-learn), 2 worker processes, 1 API process")
        print(f"{'series':<26}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'p50 / v1':>10}")
        p50_v1 = float(np.percentile(latencies["/v1 predict"], 50))
        for name in series:
            p50, p99 = (1000 * float(np.percentile(latencies[name], q)) for q in (50, 99))
            print(f"{name:<26}{p50:>9.1f}{p99:>9.1f}{np.mean(rates[name]):>9.0f}{p50 / 1000 / p50_v1:>10.2f}")
    finally:
        client.close()
        for proc in (api, workers):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
