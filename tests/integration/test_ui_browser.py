"""The job pages in a real browser (Debian's Chromium through Selenium), served by Uvicorn
over real worker processes that score a real model: a dataset with some bad rows ends
PARTIAL, and the pages show the counts the store holds. Screenshots of each page are kept
under test-artifacts/ui/ (see tests/browser.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from demo.digits import PIXELS
from ml_framework.settings import load_settings
from producer.api import create_app
from producer.api.auth import UI_COOKIE
from tests import browser
from tests.conftest import SHARD_SIZE, free_port, service_unavailable

pytestmark = pytest.mark.integration
KEY = "ui-browser-key-0123456789abcdef"
BAD_ROWS = (3, SHARD_SIZE + 100, 2 * SHARD_SIZE + 50)
N_ROWS = 2 * SHARD_SIZE + 100
TIMEOUT_S = 240


@pytest.fixture
def api_url(backend) -> Iterator[tuple[str, object]]:
    """The API (with one user key) served by Uvicorn on a free port, over the backend's
    workers; yields ``(base URL, backend)``."""
    import uvicorn

    app = create_app(load_settings(**backend.values, api_keys={"ui-tester": KEY}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", backend
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def chromium() -> Iterator:
    if why := browser.missing():
        service_unavailable("Chromium", RuntimeError(why))
    with browser.chromium() as driver:
        yield driver


def partial_job(base: str, backend, digits) -> dict:
    """Score a CSV of N_ROWS digits (three shards) whose BAD_ROWS hold text in a pixel
    column with the sklearn model; return the finished job's /v1 status."""
    frame = digits.frame[PIXELS].iloc[:N_ROWS].astype(object).copy()
    for row in BAD_ROWS:
        frame.iloc[row, 5] = "smudge"
    name = f"ui-partial-{uuid.uuid4().hex[:8]}.csv"
    frame.to_csv(backend.values["data_dir"] / name, index=False)
    headers = {"X-API-Key": KEY}
    r = httpx.post(f"{base}/v1/jobs", json={"model": "digits-sklearn", "dataset": name}, headers=headers)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + TIMEOUT_S
    while (status := httpx.get(f"{base}/v1/jobs/{r.json()['job_id']}", headers=headers).json())["state"] in (
            "PENDING", "RUNNING"):
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    return status


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_job_page_shows_the_counts_of_a_partial_job_in_chromium(api_url, chromium, digits):
    """Signed in through the form, the job page of a PARTIAL job reads the store's state,
    shards and rows done, rows ok and failed, and its row errors by row; its CSV link works
    with the browser's session; the list shows the job and the live workers with the model
    they loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, backend = api_url
    status = partial_job(base, backend, digits)
    job_id = status["job_id"]
    assert (status["state"], status["rows_failed"], status["n_shards"]) == ("PARTIAL", len(BAD_ROWS), 3)
    shots = browser.artifacts_dir("ui")

    chromium.get(f"{base}/ui/jobs/{job_id}")
    assert chromium.find_element(By.ID, "message").text.startswith("Sign in")
    chromium.save_screenshot(str(shots / "sign-in.png"))
    chromium.find_element(By.ID, "key").send_keys(KEY)
    chromium.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(chromium, 30).until(lambda d: d.find_elements(By.ID, "state"))

    text = {i: chromium.find_element(By.ID, i).text for i in
            ("job-id", "state", "model", "model-version", "shards-done", "n-shards", "rows-done", "n-rows",
             "rows-ok", "rows-failed")}
    assert text == {"job-id": job_id, "state": "PARTIAL", "model": "digits-sklearn",
                    "model-version": str(status["model_version"]), "shards-done": "3", "n-shards": "3",
                    "rows-done": str(N_ROWS), "n-rows": str(N_ROWS),
                    "rows-ok": str(status["rows_ok"]), "rows-failed": str(status["rows_failed"])}
    assert status["rows_ok"] == N_ROWS - len(BAD_ROWS)
    error_rows = chromium.find_elements(By.CSS_SELECTOR, "#row-errors tbody tr")
    assert [int(r.find_element(By.TAG_NAME, "td").text) for r in error_rows] == list(BAD_ROWS)
    assert all("smudge" in r.text for r in error_rows)
    assert chromium.find_element(By.ID, "rows-per-s").text != "-"
    chromium.save_screenshot(str(shots / "job-partial.png"))

    csv_link = chromium.find_element(By.LINK_TEXT, "CSV").get_attribute("href")
    session = chromium.get_cookie(UI_COOKIE)
    assert session and session["httpOnly"] and KEY not in session["value"]
    csv = httpx.get(csv_link, cookies={UI_COOKIE: session["value"]})
    assert csv.status_code == 200 and csv.text.count("smudge") == len(BAD_ROWS)

    chromium.get(f"{base}/ui/jobs")
    row = chromium.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')
    assert "PARTIAL" in row.text and f"{N_ROWS} / {N_ROWS}" in row.text

    def workers_with_model(d) -> bool:  # heartbeats every 5 s; the page refreshes itself
        try:
            table = d.find_element(By.ID, "workers").text
        except Exception:  # noqa: BLE001 - the page is reloading
            return False
        return table.count("CPU") >= 2 and f"digits-sklearn/{status['model_version']}" in table

    WebDriverWait(chromium, 30, poll_frequency=0.5).until(workers_with_model)
    chromium.save_screenshot(str(shots / "jobs.png"))
