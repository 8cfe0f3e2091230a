"""configs/prometheus.yml and the Grafana dashboard only name metrics that exist, and
`mlf queues` / `mlf flower` behave without a running fleet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from worker import metrics as worker_metrics

REPO = Path(__file__).resolve().parents[2]
API_METRICS = {"mlf_jobs", "mlf_workers_live", "mlf_worker_rows_per_second", "mlf_worker_rows_total",
               "mlf_worker_oom_splits_total", "mlf_worker_gpu_memory_used_bytes", "mlf_worker_gpu_utilization_ratio",
               "mlf_queue_depth", "mlf_broker_up", "mlf_oldest_pending_job_age_seconds", "mlf_jobs_by_owner",
               "mlf_store_size_bytes", "mlf_store_rows", "mlf_oldest_finished_job_age_seconds"}


def worker_metric_names() -> set[str]:
    names = set()
    for obj in vars(worker_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_dashboard_queries_only_metrics_we_export():
    dashboard = json.loads((REPO / "configs" / "grafana" / "ml-framework-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bmlf_[a-z_]+", e)}
    known = worker_metric_names() | API_METRICS
    assert used and used <= known, used - known
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("rows scored per second", "queue depth", "p99", "gpu memory", "gpu utilisation", "failures"):
        assert needed in titles


def test_prometheus_config_scrapes_api_workers_and_flower():
    config = yaml.safe_load((REPO / "configs" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["mlf-api"]["static_configs"][0]["targets"] == ["ml-api:8000"]
    assert jobs["mlf-workers"]["dns_sd_configs"][0] == {"names": ["worker"], "type": "A", "port": 9191,
                                                        "refresh_interval": "30s"}
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


def run_mlf(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    base.update({"ML_FRAMEWORK_VAR_DIR": str(tmp_path / "var"), **env})
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args], env=base,
                          capture_output=True, text=True, timeout=60, check=False)


def test_mlf_queues_shows_both_queues(tmp_path):
    run = run_mlf(tmp_path, "queues", ML_FRAMEWORK_BULK_QUEUE="t.bulk", ML_FRAMEWORK_ONLINE_QUEUE="t.online")
    assert run.returncode == 0, run.stderr
    assert re.search(r"t\.online\s*│\s*0", run.stdout) and re.search(r"t\.bulk\s*│\s*0", run.stdout), run.stdout
    assert "no jobs" in run.stdout


def test_mlf_flower_refuses_the_embedded_broker_and_missing_auth(tmp_path):
    run = run_mlf(tmp_path, "flower")
    assert run.returncode == 1 and "embedded SQLite broker" in run.stderr
    run = run_mlf(tmp_path, "flower", ML_FRAMEWORK_BROKER_URL="redis://127.0.0.1:6379/15")
    assert run.returncode == 1 and "ML_FRAMEWORK_FLOWER_BASIC_AUTH" in run.stderr
    run = run_mlf(tmp_path, "flower", ML_FRAMEWORK_BROKER_URL="redis://127.0.0.1:6379/15",
                  ML_FRAMEWORK_FLOWER_BASIC_AUTH="no-colon")
    assert run.returncode == 1 and "user:password" in run.stderr


def test_a_broker_that_never_answers_does_not_hang_a_scrape_or_mlf_queues(tmp_path):
    """A "broker" that accepts connections and never replies: the API's /metrics still
    answers within seconds, with broker_up 0 and the store's metrics; `mlf queues` exits 1
    naming the problem. (Before, both waited for ever.)"""
    import socket
    import threading

    from ml_framework.settings import load_settings
    from producer.client import Client
    from producer.metrics import render

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    with Client(load_settings(var_dir=tmp_path / "var", broker_url=url)) as client:
        rendered: list[bytes] = []
        scrape = threading.Thread(target=lambda: rendered.append(render(client)[0]), daemon=True)
        scrape.start()
        scrape.join(60)  # a bound for a hang, far above the scrape's own broker timeout
        assert rendered, "the scrape hung on the silent broker"
        text = rendered[0].decode()
    assert "mlf_broker_up 0.0" in text and 'mlf_jobs{state="PENDING"} 0.0' in text
    assert 'mlf_store_rows{table="shard_outputs"} 0.0' in text and "mlf_oldest_finished_job_age_seconds 0.0" in text
    assert float(text.split("\nmlf_store_size_bytes ")[1].split()[0]) > 0
    run = run_mlf(tmp_path, "queues", ML_FRAMEWORK_BROKER_URL=url)  # a hang is a TimeoutExpired (60 s)
    assert run.returncode == 1 and run.stderr.count("error: cannot reach the broker at redis://127.0.0.1:") == 1, run.stderr
    server.close()


def test_metric_files_left_by_a_killed_launcher_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(__import__("tempfile").gettempdir()) / f"mlf-metrics-{dead.pid}-test"
    stale.mkdir(exist_ok=True)
    (stale / "counter_1.db").write_bytes(b"x")
    fresh = worker_metrics.make_multiproc_dir()
    try:
        assert not stale.exists() and fresh.is_dir()
        assert fresh.name.startswith(f"mlf-metrics-{os.getpid()}-")
    finally:
        worker_metrics.cleanup(fresh)
