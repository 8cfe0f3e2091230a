"""Monitoring against real processes: the workers' and the API's Prometheus metrics,
Flower, a real Prometheus server scraping configs/prometheus.yml, and the job context in
the workers' log file."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ml_framework.credentials import hash_key
from ml_framework.settings import load_settings
from producer.api import create_app
from tests.conftest import free_port, wait_for_http

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
RATE_QUERY = "sum by (model) (rate(mlf_rows_scored_total[1m]))"  # per-model rows/s, as on the dashboard


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition, parsed by prometheus-client."""
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items()))


def worker_metrics(backend) -> str:
    response = wait_for_http(f"http://127.0.0.1:{backend.values['worker_metrics_port']}/metrics")
    assert response.status_code == 200
    return response.text


def test_worker_and_api_metrics_count_the_rows_of_a_job(backend, data_dir):
    """After a job of 1,797 rows (one bad cell), the workers' counters grew by exactly its
    rows scored and rows failed; batch, queue-wait and load metrics exist for the model;
    the API reports jobs by state and the depth of both queues."""
    import pandas as pd

    frame = pd.read_csv(data_dir / "digits.csv")
    frame = frame.astype({"pixel_5": object})
    frame.loc[7, "pixel_5"] = "oops"
    before = worker_metrics(backend)
    job = backend.client.score_rows(frame, model="digits-sklearn")
    status = job.wait(timeout_s=TIMEOUT_S)
    assert (status.rows_ok, status.rows_failed) == (1796, 1)
    after = worker_metrics(backend)
    model = {"model": "digits-sklearn", "version": "1", "device": "cpu"}
    assert total(after, "mlf_rows_scored_total", **model) - total(before, "mlf_rows_scored_total", **model) == 1796
    assert total(after, "mlf_row_errors_total", **model) - total(before, "mlf_row_errors_total", **model) == 1
    n_batches = total(after, "mlf_batch_size_rows_count", **model) - total(before, "mlf_batch_size_rows_count", **model)
    assert n_batches >= status.n_shards  # at least one forward pass per shard
    assert total(after, "mlf_batches_total", **model) - total(before, "mlf_batches_total", **model) == n_batches
    rows_in_batches = total(after, "mlf_batch_size_rows_sum", **model) - total(before, "mlf_batch_size_rows_sum", **model)
    assert rows_in_batches >= 1796  # the bad row's batch is retried in halves: some rows run twice
    assert total(after, "mlf_queue_wait_seconds_count", queue="bulk") - \
        total(before, "mlf_queue_wait_seconds_count", queue="bulk") == status.n_shards
    assert total(after, "mlf_model_load_seconds_count", model="digits-sklearn") >= 1

    with TestClient(create_app(load_settings(**backend.values, api_auth="none"))) as http:
        api = http.get("/metrics")
        # both worker processes live; a heartbeat delayed on a loaded machine is waited for,
        # a worker gone for good is reported with every heartbeat's age
        deadline = time.monotonic() + 30
        while (live := total(api.text, "mlf_workers_live")) != 2 and time.monotonic() < deadline:
            time.sleep(1)
            api = http.get("/metrics")
    assert api.status_code == 200
    assert total(api.text, "mlf_jobs", state="PARTIAL") >= 1
    queues = {lab["queue"] for n, lab, _ in samples(api.text) if n == "mlf_queue_depth"}
    # both of this backend's queues; every other queue of ours on the same broker is listed
    # too (producer/queues.py), e.g. those earlier tests left on the shared Redis
    assert {backend.values["bulk_queue"], backend.values["online_queue"]} <= queues
    assert total(api.text, "mlf_broker_up") == 1
    assert live == 2, [(w.hostname, w.age_s, w.clock_skew_s) for w in backend.client.store.workers(None)]


@pytest.fixture
def redis_backend(backend):
    if backend.name != "redis-postgres":
        pytest.skip("Flower and Prometheus run against the Redis deployment")
    return backend


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mlf(*args: str) -> list[str]:
    return [sys.executable, "-c", "from producer.cli import main; main()", *args]


def test_flower_lists_workers_and_shard_tasks_behind_basic_auth(redis_backend, data_dir, tmp_path):
    backend = redis_backend
    refused = subprocess.run(mlf("flower", "--port", str(free_port())), env=backend.env, capture_output=True,
                             text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "ML_FRAMEWORK_FLOWER_BASIC_AUTH" in refused.stderr

    port = free_port()
    env = {**backend.env, "ML_FRAMEWORK_FLOWER_BASIC_AUTH": "admin:s3cret"}
    proc = start(mlf("flower", "--port", str(port), "--db", str(tmp_path / "flower.db")), env, tmp_path / "flower.log")
    auth = ("admin", "s3cret")
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for_http(f"{base}/healthcheck").text == "OK"
        # Flower answers before its event receiver is connected, and events are not kept for a
        # late receiver: wait until it has heard the workers' heartbeats
        heard = time.monotonic() + 60
        while not total(httpx.get(f"{base}/metrics", timeout=10).text, "flower_worker_online"):
            assert time.monotonic() < heard, (tmp_path / "flower.log").read_text()[-2000:]
            time.sleep(0.5)
        job = backend.client.score_dataset(data_dir / "digits.csv", model="digits-sklearn")
        assert job.wait(timeout_s=TIMEOUT_S).state.value == "SUCCEEDED"
        deadline = time.monotonic() + 60
        while True:  # Flower learns of tasks from the workers' events, asynchronously
            tasks = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
            mine = [t for t in tasks.values() if f"job={job.id}" in (t.get("kwargs") or "")]
            if len(mine) == job.status().n_shards and all(t["state"] == "SUCCESS" for t in mine):
                break
            assert time.monotonic() < deadline, (len(mine), (tmp_path / "flower.log").read_text()[-2000:])
            time.sleep(0.5)
        assert {t["name"] for t in mine} == {"mlf.score_shard"}
        assert all("model=digits-sklearn/1" in t["kwargs"] and "rows=" in t["kwargs"] for t in mine)
        workers = httpx.get(f"{base}/api/workers", params={"refresh": "true"}, auth=auth, timeout=30).json()
        live = {w.hostname for w in backend.client.workers()}
        assert live <= set(workers), (live, list(workers))
        assert httpx.get(f"{base}/", timeout=10).status_code == 401
        assert httpx.get(f"{base}/api/tasks", auth=("admin", "wrong"), timeout=10).status_code == 401
        flower_metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert total(flower_metrics, "flower_events_total", type="task-succeeded") >= len(mine)
    finally:
        stop(proc)
    assert (tmp_path / "flower.db").exists() or any(tmp_path.glob("flower.db*"))  # the persistent state


def prometheus_config(targets: dict[str, str], path: Path, secrets: dict[str, Path]) -> Path:
    """configs/prometheus.yml with each job's targets replaced by a loopback address, the
    Docker secret files it reads by the ``secrets`` given (/run/secrets/NAME -> file), and
    a 1 s scrape interval; everything else as shipped."""
    config = yaml.safe_load((REPO / "configs" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), f"configs/prometheus.yml scrapes {sorted(jobs)}"
    for name, job in jobs.items():
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [targets[name]]}]
        if "authorization" in job:
            secret = job["authorization"]["credentials_file"]
            job["authorization"]["credentials_file"] = str(secrets[secret.removeprefix("/run/secrets/")])
    path.write_text(yaml.safe_dump(config))
    return path


def test_prometheus_scrapes_the_api_workers_and_flower(redis_backend, data_dir, tmp_path):
    """A real Prometheus with configs/prometheus.yml (targets on loopback) scrapes the API,
    the workers and Flower; after a job its HTTP API returns rows scored for the model and
    the per-model rows/s query the dashboard uses."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is missing (Debian package `prometheus`; .ci/run installs it)")
        pytest.skip("the prometheus binary is missing (apt-get install prometheus)")
    backend = redis_backend
    api_port, flower_port, prom_port = free_port(), free_port(), free_port()
    metrics_key = secrets.token_urlsafe(32)  # the API's /metrics takes a key of role metrics, as in production
    (tmp_path / "metrics_api_key").write_text(metrics_key + "\n")
    api_env = {**backend.env, "ML_FRAMEWORK_API_KEYS": f"prometheus={hash_key(metrics_key)}",
               "ML_FRAMEWORK_API_KEY_ROLES": "prometheus=metrics"}
    procs = [
        start([sys.executable, "-m", "uvicorn", "producer.api:app", "--host", "127.0.0.1", "--port", str(api_port)],
              api_env, tmp_path / "api.log"),
        start(mlf("flower", "--no-auth", "--port", str(flower_port), "--db", str(tmp_path / "flower.db")),
              backend.env, tmp_path / "flower.log"),
    ]
    config = prometheus_config({"mlf-api": f"127.0.0.1:{api_port}",
                                "mlf-workers": f"127.0.0.1:{backend.values['worker_metrics_port']}",
                                "flower": f"127.0.0.1:{flower_port}"}, tmp_path / "prometheus.yml",
                                {"metrics_api_key": tmp_path / "metrics_api_key"})
    procs.append(start([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}"], backend.env, tmp_path / "prometheus.log"))
    prom = f"http://127.0.0.1:{prom_port}"
    try:
        # each server answers before the job, or the test says which did not and why
        for url, proc, log in [(f"http://127.0.0.1:{api_port}/health", procs[0], "api.log"),
                               (f"http://127.0.0.1:{flower_port}/healthcheck", procs[1], "flower.log"),
                               (f"{prom}/-/ready", procs[2], "prometheus.log")]:
            wait_for_http(url, timeout_s=60, proc=proc, log=tmp_path / log)
        job = backend.client.score_dataset(data_dir / "digits.csv", model="digits-sklearn")
        assert job.wait(timeout_s=TIMEOUT_S).rows_ok == 1797

        def query(q: str) -> list[dict]:
            body = httpx.get(f"{prom}/api/v1/query", params={"query": q}, timeout=10).json()
            assert body["status"] == "success", body
            return body["data"]["result"]

        deadline = time.monotonic() + 90
        while True:
            up = {r["metric"]["job"]: r["value"][1] for r in query("up")}
            scored = query('sum by (model) (mlf_rows_scored_total{model="digits-sklearn"})')
            rate = query(RATE_QUERY)
            if up == {"mlf-api": "1", "mlf-workers": "1", "flower": "1"} and scored and float(
                    scored[0]["value"][1]) >= 1797 and rate:
                break
            if time.monotonic() > deadline:
                targets = httpx.get(f"{prom}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
                pytest.fail(f"up {up}; scored {scored}; rate {rate}\ntargets: "
                            + "; ".join(f"{t['labels']['job']} {t['health']} {t['lastError']!r} "
                                        f"{t['lastScrapeDuration']:.3f}s" for t in targets)
                            + "\napi.log:\n" + (tmp_path / "api.log").read_text()[-1500:])
            time.sleep(1)
        # The series starts at the first scored row, so the first job is a jump from nothing:
        # rate() sees an increase only within a series. A second job shows as rows/s.
        second = backend.client.score_dataset(data_dir / "digits.csv", model="digits-sklearn")
        assert second.wait(timeout_s=TIMEOUT_S).rows_ok == 1797
        deadline = time.monotonic() + 60
        while True:  # Flower, up for a while now, has seen this job's task events too
            rate = query(RATE_QUERY)
            flower_events = query('flower_events_total{type="task-succeeded"}')
            if any(float(r["value"][1]) > 0 for r in rate) and flower_events:
                break
            assert time.monotonic() < deadline, (rate, flower_events)
            time.sleep(1)
        print("per-model rows/s:", {r["metric"].get("model"): r["value"][1] for r in rate})
        assert query("mlf_queue_depth")  # from the API's scrape
    finally:
        for proc in procs:
            stop(proc)


def test_worker_log_records_carry_the_job_id(backend, data_dir):
    """The workers' rotating log file (<var_dir>/logs/ml_framework.log) names the job,
    shard, model and device of the records logged while scoring it."""
    job = backend.client.score_dataset(data_dir / "digits.parquet", model="digits-sklearn")
    job.wait(timeout_s=TIMEOUT_S)
    log_file = Path(backend.values["var_dir"]) / "logs" / "ml_framework.log"
    deadline = time.monotonic() + 30
    while True:
        lines = [ln for ln in log_file.read_text().splitlines() if f"[job={job.id} shard=" in ln]
        shard_lines = [ln for ln in lines if " - worker.tasks - " in ln]  # one as each shard ends
        if len(shard_lines) >= job.status().n_shards:
            break
        assert time.monotonic() < deadline, f"no line of job {job.id} in {log_file}"
        time.sleep(0.2)
    # every record logged in the shard's context carries it, whoever logs it (the task; the
    # registry too when this job's shard loaded the model, as the first job of a model does)
    assert all(" model=digits-sklearn/1 device=cpu]" in ln for ln in lines)
    assert {ln.split(" - ")[1] for ln in lines} <= {"worker.tasks", "worker.registry"}, lines
