"""Flower tells the truth, seen in real Chromium (Selenium) on Redis with two worker
processes: busy workers stay Online and their running shard Active; a shard's Celery
state says what happened to it (FAILURE with the reason, REVOKED when its job was
cancelled, SUCCESS with the row counts); the task list shows the shard's job, shard,
model and rows; the broker page lists our queues before any worker ran; and an idle
worker set stops at once on SIGTERM.

One Flower and one worker set serve the whole module. A screenshot of each page is kept
under ``$MLF_TEST_ARTIFACTS/flower`` (default ``test-artifacts/flower/``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ml_framework.store import JobState
from tests import browser as browser_tools
from tests.conftest import (
    REDIS_URL,
    check_redis,
    free_port,
    new_pg_database,
    queues,
    service_unavailable,
    start_workers,
    wait_for_http,
)
from tests.faults.conftest import Workers, wait_until

pytestmark = pytest.mark.integration
AUTH = ("admin", "flower-test")
PUBLIC_URL = "https://mlf.example.test"
"""``api_public_url``: Flower's pages link job ids to ``<PUBLIC_URL>/ui/jobs/<id>``."""
IDLE_STOP_S = 5.0
"""Bound of an idle worker set's stop on SIGTERM, seconds (generous: the machine may be loaded)."""


@pytest.fixture(scope="module")
def screenshots() -> Path:
    """Where the pages' screenshots go: ``$MLF_TEST_ARTIFACTS/flower`` (tests/browser.py)."""
    return browser_tools.artifacts_dir("flower")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a new, empty profile (tests/browser.py)."""
    if why := browser_tools.missing():
        service_unavailable("Chromium", RuntimeError(why))
    with browser_tools.chromium(window_size="1600,1000") as driver:
        yield driver


@pytest.fixture(scope="module")
def stack(trained, data_dir, fault_models, tmp_path_factory):
    """Flower (started first, before any worker: the broker page must know our queues
    from the start) and two worker processes on Redis and a PostgreSQL database of the
    module's own; yields ``(workers, flower base URL, broker page HTML before workers)``."""
    from ml_framework.settings import load_settings
    from producer.client import Client

    check_redis()
    tmp = tmp_path_factory.mktemp("flower-stack")
    database = new_pg_database()
    values = {"models_dir": trained[0], "data_dir": data_dir, "var_dir": tmp / "var", **queues("mlf.flower."),
              "database_url": next(database), "broker_url": REDIS_URL, "worker_metrics_port": 0,
              "shard_size": 500, "task_time_limit_s": 60, "broker_visibility_timeout_s": 70,
              "api_public_url": PUBLIC_URL}
    workers = Workers(values, Client(load_settings(**values)), tmp / "workers.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_FRAMEWORK_")}
    env.update({f"ML_FRAMEWORK_{k.upper()}": str(v) for k, v in values.items()})
    env["ML_FRAMEWORK_FLOWER_BASIC_AUTH"] = ":".join(AUTH)
    port = free_port()
    flower = subprocess.Popen([sys.executable, "-c", "from producer.cli import main; main()", "flower",
                               "--port", str(port), "--db", str(tmp / "flower.db")],
                              env=env, stdout=(tmp / "flower.log").open("wb"), stderr=subprocess.STDOUT)
    base = f"http://{':'.join(AUTH)}@127.0.0.1:{port}"  # Chromium takes the credentials from the URL
    try:
        assert wait_for_http(f"{base}/healthcheck", timeout_s=120).text == "OK"
        broker_page = httpx.get(f"{base}/broker", timeout=30)
        assert broker_page.status_code == 200, broker_page.text
        broker_page = broker_page.text
        workers.proc = start_workers(values, workers.log, 2)
        wait_until(lambda: len(workers.client.store.live_workers()) >= 2, 180, "two live workers")
        yield workers, base, broker_page
    finally:
        flower.terminate()
        flower.wait(timeout=30)
        workers.stop()
        workers.client.close()
        next(database, None)


def producer(request, workers: Workers, **overrides):
    """A client configured like ``workers``, with ``overrides`` (e.g. ``shard_size``),
    closed after the test."""
    from ml_framework.settings import load_settings
    from producer.client import Client

    client = Client(load_settings(**{**workers.values, **overrides}))
    request.addfinalizer(client.close)
    return client


def flower_tasks(base: str, job_id: str) -> list[dict]:
    """Flower's tasks (its API) of one job."""
    tasks = httpx.get(f"{base}/api/tasks", timeout=10).json()
    return [t for t in tasks.values() if f"job={job_id} " in (t.get("kwargs") or "")]


def shot(browser, screenshots: Path, url: str, name: str, ready) -> None:
    """Open ``url``, wait until ``ready(browser)`` holds, and keep a screenshot as ``name``.png."""
    browser.get(url)
    wait_until(lambda: ready(browser), 30, f"{url} to show what the test expects", interval_s=0.5)
    browser.save_screenshot(str(screenshots / f"{name}.png"))


def test_the_broker_page_lists_our_queues_before_any_worker_ran(stack):
    workers, _, broker_page = stack
    for queue in (workers.values["bulk_queue"], workers.values["online_queue"]):
        assert f">{queue}<" in broker_page.replace(" ", "").replace("\n", ""), queue


def test_busy_workers_stay_online_and_a_long_shard_shows_active(request, stack, browser, screenshots, fault_models, data_dir):
    """While one ~18 s shard runs, Flower's Workers page shows both workers Online and one
    active task, and the task list shows the shard STARTED; it ends SUCCESS with its counts."""
    from selenium.webdriver.common.by import By

    workers, base, _ = stack
    client = producer(request, workers, shard_size=10_000)
    job = client.score_dataset(data_dir / "digits.csv", fault_models["slow"], batch_size=10)
    wait_until(lambda: any(t["state"] == "STARTED" for t in flower_tasks(base, job.id)), 60, "the shard STARTED")
    time.sleep(6)  # past a heartbeat interval of Celery's (2 s) and Flower's refresh, mid-shard

    def both_online_one_active(b) -> bool:
        rows = b.find_elements(By.CSS_SELECTOR, "#workers-table tbody tr")
        return (len(rows) >= 2 and all("Online" in r.text for r in rows)
                and b.find_element(By.ID, "workers-active").text.strip() == "1")

    shot(browser, screenshots, f"{base}/workers", "flower-workers-busy", both_online_one_active)
    assert job.status().state is JobState.RUNNING  # still mid-shard when the page was read
    shot(browser, screenshots, f"{base}/tasks?state=STARTED", "flower-tasks-started",
         lambda b: job.id in b.find_element(By.ID, "tasks-table").text)
    assert job.wait(timeout_s=120).state is JobState.SUCCEEDED
    done = wait_until(lambda: [t for t in flower_tasks(base, job.id) if t["state"] == "SUCCESS"], 60,
                      lambda: f"SUCCESS; Flower has {[(t['state'], t['kwargs']) for t in flower_tasks(base, job.id)]}")
    assert "'outcome': 'DONE', 'rows_ok': 1797, 'rows_failed': 0" in done[0]["result"]


def test_a_job_whose_rows_all_fail_shows_failure_rows_with_the_reason(request, stack, browser, screenshots, data_dir,
                                                                      tmp_path):
    """The producer sees a dataset the workers do not (it vanished): every shard ends
    FAILURE with "not found" as its exception, acknowledged once (no redelivery)."""
    from selenium.webdriver.common.by import By

    workers, base, _ = stack
    shutil.copy(data_dir / "digits.csv", tmp_path / "vanished.csv")
    job = producer(request, workers, data_dir=tmp_path).score_dataset(tmp_path / "vanished.csv",
                                                                      model="digits-sklearn")
    assert job.wait(timeout_s=120).state is JobState.FAILED
    n_shards = job.status().n_shards
    failed = wait_until(lambda: len(t := [x for x in flower_tasks(base, job.id) if x["state"] == "FAILURE"])
                        == n_shards and t, 30, "every shard FAILURE")
    assert all("ShardFailed" in t["exception"] and "not found" in t["exception"] for t in failed), failed
    assert all(s["deliveries"] == 1 for s in workers.client.store.shards(job.id))
    shot(browser, screenshots, f"{base}/tasks?state=FAILURE", "flower-tasks-failure",
         lambda b: job.id in b.find_element(By.ID, "tasks-table").text and "not found" in b.find_element(
             By.ID, "tasks-table").text)
    badges = browser.find_elements(By.CSS_SELECTOR, "#tasks-table tbody .badge")
    assert badges and {b.text for b in badges} == {"FAILURE"}


def test_a_cancelled_jobs_skipped_shards_are_revoked_not_green(request, stack, browser, screenshots, fault_models,
                                                                data_dir):
    from selenium.webdriver.common.by import By

    workers, base, _ = stack
    job = producer(request, workers, shard_size=100).score_dataset(data_dir / "digits.csv", fault_models["slow"],
                                                                   batch_size=20)
    wait_until(lambda: job.status().shards_done >= 2, 120, "2 shards done")
    job.cancel()
    n_shards = job.status().n_shards
    tasks = wait_until(lambda: len(t := flower_tasks(base, job.id)) == n_shards
                       and all(x["state"] in ("SUCCESS", "REVOKED") for x in t) and t, 120, "every shard ended")
    skipped = {s["shard_index"] for s in workers.client.store.shards(job.id) if s["state"] == "CANCELLED"}
    revoked = [t for t in tasks if t["state"] == "REVOKED"]
    assert skipped and len(revoked) == len(skipped), (skipped, [t["state"] for t in tasks])
    assert all(f"shard={i} " in " ".join(t["kwargs"] for t in revoked) for i in skipped)
    shot(browser, screenshots, f"{base}/tasks?state=REVOKED", "flower-tasks-revoked",
         lambda b: job.id in b.find_element(By.ID, "tasks-table").text)
    badges = browser.find_elements(By.CSS_SELECTOR, "#tasks-table tbody .badge")
    assert badges and all("text-bg-success" not in b.get_attribute("class") for b in badges)


def test_a_partial_shard_succeeds_with_its_counts_and_the_list_has_a_job_column(stack, browser, screenshots, digits,
                                                                                 data_dir):
    from selenium.webdriver.common.by import By

    workers, base, _ = stack
    frame = digits.frame.astype({"pixel_5": object})
    frame.loc[[7, 9], "pixel_5"] = "oops"
    job = workers.client.score_rows(frame, model="digits-sklearn")
    assert job.wait(timeout_s=120).state is JobState.PARTIAL
    first = wait_until(lambda: [t for t in flower_tasks(base, job.id) if "shard=0 " in t["kwargs"]
                                and t["state"] == "SUCCESS"], 30, "shard 0 SUCCESS")
    assert "'outcome': 'PARTIAL', 'rows_ok': 498, 'rows_failed': 2" in first[0]["result"]
    shot(browser, screenshots, f"{base}/tasks?state=SUCCESS", "flower-tasks",
         lambda b: job.id in b.find_element(By.ID, "tasks-table").text)
    headers = [h.get_attribute("data-column") for h in browser.find_elements(By.CSS_SELECTOR, "#tasks-table th")]
    assert {"kwargs", "result", "exception", "worker"} <= set(headers), headers
    column = headers.index("kwargs")
    cells = [r.find_elements(By.TAG_NAME, "td")[column].text
             for r in browser.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr")]
    assert any(c.startswith(f"job={job.id} shard=") and "model=digits-sklearn/1 rows=" in c for c in cells), cells
    # the job id links to the job's own page (producer/flower.py)
    links = {a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#tasks-table a.mlf-job-link")}
    assert f"{PUBLIC_URL}/ui/jobs/{job.id}" in links, links


def test_an_idle_worker_set_stops_at_once_on_sigterm(stack):
    """Last in the module: the worker set, idle now, stops on SIGTERM well within the
    grace period (a warm shutdown that waits for nothing)."""
    workers, _, _ = stack
    time.sleep(2)  # the earlier tests' last events are sent
    started = time.monotonic()
    workers.proc.send_signal(signal.SIGTERM)
    workers.proc.wait(timeout=60)
    took = time.monotonic() - started
    workers.proc = None
    print(f"idle worker set stopped in {took:.2f} s")
    assert took < IDLE_STOP_S, workers.tail()
