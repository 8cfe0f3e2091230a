"""/health stays fast while large bodies are parsed: a real Uvicorn process receives six
concurrent ~16 MiB job submissions (rows inline, the most parsing a body can cost) and is
probed on /health meanwhile. Probes are timed against the submissions' own start and end,
so only probes sent while all six were in flight count."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid

import httpx
import pytest
import yaml

from tests.conftest import api_server

pytestmark = pytest.mark.integration
KEY = "latency-test-key-0123456789"
CONCURRENT = 6
LIMIT_BYTES = 16 * 2**20
COLUMNS = [f"x{i}" for i in range(64)]
HEALTH_BUDGET_S = 0.100
"""The issue's bound for /health while the six bodies are in flight."""
PROBE_EVERY_S = 0.02


def big_body() -> bytes:
    """A RowsJobRequest just under the 16 MiB limit: rows of 64 floats."""
    row = {c: 0.123456789 + i for i, c in enumerate(COLUMNS)}
    one = len(json.dumps(row)) + 2
    n = (LIMIT_BYTES - 1024) // one
    body = json.dumps({"model": "wide", "rows": [row] * n}).encode()
    assert LIMIT_BYTES - 4096 < len(body) <= LIMIT_BYTES, len(body)
    return body


@pytest.fixture
def api(tmp_path):
    """Uvicorn on the embedded broker (no worker: the jobs are recorded and queued), with a
    64-column model's manifest (the producer reads no artifact)."""
    version = tmp_path / "models" / "wide" / "1"
    version.mkdir(parents=True)
    (version / "manifest.yaml").write_text(yaml.safe_dump({
        "name": "wide", "version": 1, "framework": "sklearn", "artifact": "model.skops",
        "inputs": {"columns": COLUMNS}, "outputs": {"kind": "regression"}}))
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    tag = uuid.uuid4().hex[:8]
    env.update({"ML_FRAMEWORK_MODELS_DIR": str(tmp_path / "models"), "ML_FRAMEWORK_DATA_DIR": str(tmp_path / "data"),
                "ML_FRAMEWORK_VAR_DIR": str(tmp_path / "var"), "ML_FRAMEWORK_API_KEYS": f"t={KEY}",
                "ML_FRAMEWORK_BULK_QUEUE": f"mlf.lat.{tag}", "ML_FRAMEWORK_ONLINE_QUEUE": f"mlf.lat.{tag}.online",
                "ML_FRAMEWORK_LOG_TO_FILE": "false"})
    with api_server(env, tmp_path / "api.log") as (url, proc):
        yield url, proc, tmp_path / "api.log"


def peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    """Sample the API process's resident memory every 20 ms (its parsing processes apart)."""
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        out.append(proc.memory_info().rss)
        time.sleep(0.02)


def test_health_answers_within_100_ms_while_six_16_mib_bodies_are_in_flight(api):
    """Six concurrent ~16 MiB submissions are all accepted (202); /health, probed every
    20 ms meanwhile, answers within 100 ms at the 90th percentile of the probes sent while
    all six were in flight (at least 5 of them), and never takes over a second."""
    base, proc, log = api
    body = big_body()
    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
    posts: list[tuple[float, float, int]] = []
    probes: list[tuple[float, float]] = []
    done = threading.Event()
    rss: list[int] = []

    def submit() -> None:
        start = time.monotonic()
        r = httpx.post(f"{base}/v1/jobs", content=body, headers=headers, timeout=300)
        posts.append((start, time.monotonic(), r.status_code))

    def probe() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                start = time.monotonic()
                assert client.get(f"{base}/health").status_code == 200
                probes.append((start, time.monotonic() - start))
                time.sleep(PROBE_EVERY_S)

    stop_rss = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(proc.pid, stop_rss, rss), daemon=True)
    prober = threading.Thread(target=probe, daemon=True)
    sampler.start()
    prober.start()
    senders = [threading.Thread(target=submit) for _ in range(CONCURRENT)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(600)
    done.set()
    stop_rss.set()
    prober.join(60)
    sampler.join(10)
    assert sorted(code for *_, code in posts) == [202] * CONCURRENT, (posts, log.read_text()[-3000:])
    all_in_flight = (max(start for start, _, _ in posts), min(end for _, end, _ in posts))
    during = sorted(d for start, d in probes if all_in_flight[0] <= start and start + d <= all_in_flight[1])
    report = (f"{len(during)} probes while all {CONCURRENT} bodies ({len(body) / 2**20:.1f} MiB each) were in flight "
              f"({all_in_flight[1] - all_in_flight[0]:.2f} s): median {statistics.median(during) * 1000:.1f} ms, "
              f"p90 {during[int(0.9 * (len(during) - 1))] * 1000:.1f} ms, max {during[-1] * 1000:.1f} ms; "
              f"submissions took {min(e - s for s, e, _ in posts):.2f}-{max(e - s for s, e, _ in posts):.2f} s; "
              f"API process peak RSS {max(rss) / 2**20:.0f} MiB" if during else f"no probe in {all_in_flight}")
    print(report)
    t0 = all_in_flight[0]
    print("slow probes (s after all six started, ms):",
          [(round(start - t0, 2), round(d * 1000)) for start, d in probes if d > HEALTH_BUDGET_S])
    assert len(during) >= 5, report
    assert during[int(0.9 * (len(during) - 1))] <= HEALTH_BUDGET_S, report
    assert during[-1] <= 1.0, report
