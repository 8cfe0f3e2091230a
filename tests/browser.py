"""A real browser for the tests: Debian's Chromium driven by Selenium (chromium-driver).

Screenshots are kept as test artifacts under ``MLF_TEST_ARTIFACTS`` (default
``test-artifacts/`` at the repository root, ignored by git), so a CI run can publish them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = os.environ.get("MLF_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MLF_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""Launch flags: headless, no sandbox (containers), and nothing that reaches the network."""
REPO = Path(__file__).resolve().parent.parent


def artifacts_dir(*parts: str) -> Path:
    """The directory for test artifacts (screenshots) ``parts`` below the root, created."""
    path = Path(os.environ.get("MLF_TEST_ARTIFACTS", REPO / "test-artifacts")).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing() -> str | None:
    """Why no browser can run here (the binaries or Selenium are missing), or ``None``."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@contextmanager
def chromium(page_load_timeout_s: float = 60.0, window_size: str = "1280,900") -> Iterator:
    """A headless Chromium (a Selenium ``WebDriver``) with a new empty profile and a window
    of ``window_size`` ("width,height" in pixels), quit and its profile removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mlf-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--window-size={window_size}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(page_load_timeout_s)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
