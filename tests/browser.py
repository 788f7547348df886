"""A real headless Chromium for the web page's tests (Debian's `chromium` and `chromium-driver` with selenium);
the tests that need it skip cleanly where either is missing."""

from __future__ import annotations

import os
import shutil
import time

import pytest

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # as root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: the machine may have no network
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-device-for-media-stream",  # a microphone that plays a tone
    "--use-fake-ui-for-media-stream",  # and grants its permission without asking
]


def find_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver (or $CSM_CHROMIUM and $CSM_CHROMEDRIVER), or skip the test."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    browser = os.environ.get("CSM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CSM_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (browser and os.path.isfile(browser) and driver and os.path.isfile(driver)):
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver")
    return browser, driver


def start_chromium(user_data_dir, downloads=None, width: int = 1100, height: int = 900):
    """A headless Chromium driven by selenium, with its console log readable through `console()`; files the
    page downloads land in `downloads`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        prefs = {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        options.add_experimental_option("prefs", prefs)
    return webdriver.Chrome(service=Service(driver), options=options)


def console(driver, level: str = "SEVERE") -> list[str]:
    """Console messages at `level` since the last call (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == level]


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Poll `condition()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")
