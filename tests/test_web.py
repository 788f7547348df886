"""The web page of `csm serve` (GET /): served from the package, self-contained, and used in a real headless
Chromium against a server on a loopback port with the tiny random checkpoint."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from browser import console, find_chromium, start_chromium, wait_for
from serving import SAMPLES_PER_FRAME, demo_checkpoint, serve

from csm.server import service as server_service

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "src" / "csm" / "server" / "static"
FRAMES = 20  # the module's server speaks at most 20 frames (1.6 s) per request unless a test raises it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = demo_checkpoint(tmp_path_factory)
    with serve(
        checkpoint, tmp_path_factory.mktemp("web"), max_frames=FRAMES, max_batch_size=2, max_input_chars=300
    ) as client:
        yield client


def stats(server) -> dict:
    return server.get("/health").json()["scheduler"]


# ---- the files, without a browser ---------------------------------------------------------------------


def test_page_and_its_assets_are_served_with_a_strict_content_policy(server):
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert {"/static/app.js", "/static/style.css", "/static/favicon.svg"} <= set(assets)
    types = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in assets:
        response = server.get(path)
        assert response.status_code == 200, path
        assert types[Path(path).suffix] in response.headers["content-type"], path
    for name in ["api.js", "player.js", "voices.js"]:  # imported by app.js as modules
        assert server.get(f"/static/{name}").status_code == 200
    assert server.get("/static/nothing.js").status_code == 404
    assert "/" not in server.get("/openapi.json").json()["paths"]  # the page is not API


def test_page_loads_nothing_from_elsewhere():
    """No CDN, no external font, no remote image: the page works on a machine with no internet."""
    for path in sorted(STATIC.iterdir()):
        text = path.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\((?!\"?data:)", text), (
            path.name
        )


def test_static_files_ship_in_the_wheel_and_the_sdist(tmp_path):
    """An installed package (not only this checkout) serves the page: pyproject's package-data takes it along."""
    build_meta = pytest.importorskip("setuptools.build_meta")
    del build_meta
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, source / name)
    build = "from setuptools import build_meta as b; b.build_wheel('../dist'); b.build_sdist('../dist')"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True)
    wanted = {path.name for path in STATIC.iterdir()}
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = {Path(n).name for n in archive.namelist() if n.startswith("csm/server/static/")}
    assert shipped == wanted
    sdist = next((tmp_path / "dist").glob("*.tar.gz"))
    with tarfile.open(sdist) as archive:
        shipped = {Path(n).name for n in archive.getnames() if "/src/csm/server/static/" in n}
    assert shipped >= wanted


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_this_server(server, path):
    """/docs and /redoc name only this server's files (FastAPI's own pages load Swagger UI and ReDoc from a
    CDN: blank offline), and a Content-Security-Policy holds them to it."""
    page = server.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "https:" not in policy
    assert not re.search(r"https?://", page.text.replace("https://github.com/swagger-api", ""))
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        response = server.get(asset)
        assert response.status_code == 200 and len(response.content) > 100, asset
        assert "cdn.redoc.ly" not in response.text  # ReDoc's logo: our copy names none


# ---- in a real browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    find_chromium()  # skips the browser tests where there is no Chromium or selenium
    profile = tmp_path_factory.mktemp("chromium")
    driver = start_chromium(profile / "profile", downloads=profile / "downloads")
    driver.downloads = profile / "downloads"
    try:
        yield driver
    finally:
        driver.quit()


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def open_page(driver, server):
    """Load the page afresh and wait until it shows the speech form (voices listed); the console log starts
    empty (what earlier tests left there is dropped)."""
    console(driver)
    driver.get(str(server.base_url) + "/")
    wait_for(lambda: by_id(driver, "app").is_displayed() and by_id(driver, "voice").text, message="the app")


def set_text(driver, element_id: str, text: str):
    """Fill a text box at once (typing hundreds of characters key by key is slow), as typing would."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        text,
    )


def player(driver) -> dict:
    data = driver.execute_script("return {...document.getElementById('player').dataset}")
    return {"state": data["state"], "received": float(data["received"]), "played": float(data["played"])}


def downloaded(driver, name: str) -> Path:
    path = driver.downloads / name
    wait_for(lambda: path.is_file() and path.stat().st_size, timeout=20, message=f"download of {name}")
    return path


def test_page_loads_without_console_errors_and_shows_voices_and_health(browser, server):
    open_page(browser, server)
    options = [o.get_attribute("value") for o in by_id(browser, "voice").find_elements("tag name", "option")]
    assert options[:2] == ["0", "1"]
    wait_for(lambda: "rows busy" in by_id(browser, "health-text").text, message="the health corner")
    assert "of 2 rows busy" in by_id(browser, "health-text").text
    assert not by_id(browser, "key-form").is_displayed()
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => e.getAttribute('aria-hidden') !== 'true' && !e.labels.length).map(e => e.outerHTML)"
    )
    assert unlabelled == []
    assert console(browser) == []


def test_speak_plays_audio_while_it_is_made_and_downloads_it(browser, server):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server)
    before = stats(server)["completed"]
    by_id(browser, "seed-random").click()  # a fixed seed
    by_id(browser, "seed").send_keys("7")
    by_id(browser, "text").send_keys("Hello from the page.", Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter speaks
    seen = wait_for(lambda: (p := player(browser))["state"] == "generating" and p["received"] > 0 and p)
    assert (
        seen["received"] < FRAMES * SAMPLES_PER_FRAME / 24000
    )  # playing began before the audio was complete
    wait_for(lambda: player(browser)["state"] == "idle", message="the end of playback")
    done = player(browser)
    assert done["received"] == pytest.approx(FRAMES * SAMPLES_PER_FRAME / 24000, abs=1e-3)
    assert done["played"] > 0.9 * done["received"]
    assert stats(server)["completed"] == before + 1
    assert "seed 7" in by_id(browser, "status").text

    by_id(browser, "download").click()  # wav: what was heard, encoded in the page
    heard, rate = sf.read(downloaded(browser, "csm-7.wav"), dtype="int16")
    assert rate == 24000 and len(heard) == FRAMES * SAMPLES_PER_FRAME
    by_id(browser, "format").send_keys("flac")
    by_id(browser, "download").click()  # flac: the same request and seed again, made by the server
    again, rate = sf.read(io.BytesIO(downloaded(browser, "csm-7.flac").read_bytes()), dtype="int16")
    assert rate == 24000 and np.array_equal(again, heard)
    assert stats(server)["completed"] == before + 2
    assert console(browser) == []


def test_stop_during_generation_cancels_it_on_the_server(browser, server):
    open_page(browser, server)
    settings = server.app.state.settings
    settings.max_frames = 1500  # long enough that Stop always comes first
    try:
        before = stats(server)
        set_text(browser, "text", "A long answer that goes on " * 7)  # one chunk of ~190 characters
        by_id(browser, "speak").click()
        wait_for(lambda: player(browser)["received"] > 0, message="the first audio")
        by_id(browser, "stop").click()
        wait_for(lambda: stats(server)["cancelled"] == before["cancelled"] + 1, message="the server's cancel")
    finally:
        settings.max_frames = FRAMES
    wait_for(lambda: stats(server)["active"] == 0, message="the row freed")
    after = stats(server)
    assert (
        after["completed"] == before["completed"]
        and after["frames_generated"] - before["frames_generated"] < 400
    )
    assert player(browser)["state"] == "idle" and "Stopped" in by_id(browser, "status").text
    assert by_id(browser, "speak").is_enabled() and not by_id(browser, "stop").is_enabled()
    assert console(browser) == []


def test_over_long_input_and_unknown_voice_show_the_servers_message(browser, server):
    open_page(browser, server)
    set_text(browser, "text", "x" * 350)
    by_id(browser, "speak").click()
    error = wait_for(lambda: by_id(browser, "error").is_displayed() and by_id(browser, "error").text)
    assert error == "Input is 350 characters; the limit is 300."
    assert player(browser)["state"] == "idle" and by_id(browser, "speak").is_enabled()

    set_text(browser, "text", "Hello.")  # a voice deleted since the list was loaded
    browser.execute_script(
        "const s = document.getElementById('voice'); s.add(new Option('gone', 'gone')); s.value = 'gone'"
    )
    by_id(browser, "speak").click()
    wait_for(lambda: "gone" in by_id(browser, "error").text, message="the unknown voice's message")
    assert by_id(browser, "error").text.startswith("Unknown voice 'gone' (saved voices: ")


def add_voice(driver, name: str, transcript: str, clip: Path | None = None):
    if not by_id(driver, "add-voice").get_attribute("open"):
        driver.find_element("css selector", "#add-voice summary").click()
    by_id(driver, "voice-name").send_keys(name)
    if clip is not None:
        by_id(driver, "voice-file").send_keys(str(clip))
    set_text(driver, "voice-transcript", transcript)
    by_id(driver, "save-voice").click()


def test_a_voice_uploaded_from_a_file_appears_in_the_picker(browser, server, tmp_path):
    clip = tmp_path / "clip.wav"
    sf.write(clip, 0.3 * np.sin(np.arange(24000) * 2 * np.pi * 220 / 24000), 24000)
    open_page(browser, server)
    add_voice(browser, "page-file", "Hello from a file.", clip)
    wait_for(lambda: by_id(browser, "voice").get_attribute("value") == "page-file", message="the new voice")
    assert "Saved “page-file” (1.0 s)" in by_id(browser, "voice-status").text
    assert "page-file" in [v["id"] for v in server.get("/v1/voices").json()["voices"]]

    add_voice(browser, "page-file", "Again.", clip)  # the server refuses a taken name, in plain words
    error = wait_for(
        lambda: by_id(browser, "voice-error").is_displayed() and by_id(browser, "voice-error").text
    )
    assert error == "A voice named 'page-file' exists already."


def test_a_voice_recorded_from_the_microphone_appears_in_the_picker(browser, server):
    open_page(browser, server)
    if not by_id(browser, "record").is_enabled():
        pytest.skip("this Chromium offers no microphone")
    driver = browser
    driver.find_element("css selector", "#add-voice summary").click()
    by_id(driver, "record").click()
    wait_for(lambda: "recording 0:01" in by_id(driver, "record-time").text, message="a second of recording")
    by_id(driver, "record").click()
    wait_for(lambda: "recorded" in by_id(driver, "record-time").text, message="the recording")
    add_voice(driver, "page-mic", "A tone from the fake microphone.")
    wait_for(
        lambda: by_id(driver, "voice").get_attribute("value") == "page-mic", message="the recorded voice"
    )
    seconds = float(re.search(r"\(([\d.]+) s\)", by_id(driver, "voice-status").text).group(1))
    assert 0.8 < seconds < 5


def test_dialogue_editor_speaks_turns_in_context_and_plays_them_as_they_come(
    browser, server, tmp_path, monkeypatch
):
    from selenium.webdriver.common.keys import Keys

    # --max-frames bounds the whole request: each turn gets FRAMES (as if the model ended it there), 3 in all.
    monkeypatch.setattr(server_service, "frames_for_text", lambda text, frame_rate: FRAMES)
    monkeypatch.setattr(server.app.state.settings, "max_frames", 3 * FRAMES)
    # The last turn waits until the first was heard, so a fast machine cannot finish the whole dialogue
    # between two looks at the page (the check below would see it all arrived).
    first_heard = threading.Event()
    job_for = server_service.Service.job_for

    def last_turn_waits(self, plan, turn, *args):
        if turn == 2:
            first_heard.wait(timeout=60)
        return job_for(self, plan, turn, *args)

    monkeypatch.setattr(server_service.Service, "job_for", last_turn_waits)

    clip = tmp_path / "bea.wav"
    sf.write(clip, 0.3 * np.sin(np.arange(12000) * 2 * np.pi * 330 / 24000), 24000)
    with open(clip, "rb") as f:
        created = server.post(
            "/v1/voices", data={"name": "dialogue-bea", "transcript": "Hi."}, files={"audio_file": f}
        )
    assert created.status_code == 201, created.text
    open_page(browser, server)
    before = stats(server)["completed"]
    by_id(browser, "seed-random").click()
    by_id(browser, "seed").send_keys("11")
    rows = browser.find_elements("css selector", "#turns input.words")
    rows[0].send_keys("Did you get my message?")
    rows[1].send_keys("I did, yes.", Keys.ENTER)  # Enter adds a turn, for the other speaker, and moves there
    browser.switch_to.active_element.send_keys("Great, see you then.")
    by_id(browser, "bind-1").send_keys("dialogue-bea")  # speaker 1 speaks with a saved voice
    browser.switch_to.active_element.send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter in the card speaks it

    def dialogue() -> dict:
        return browser.execute_script(
            "const p = document.getElementById('dialogue-player').dataset;"
            "return {state: p.state, received: Number(p.received), played: Number(p.played),"
            " rows: [...document.querySelectorAll('#turns li')].map(r => [r.className, r.dataset.end])}"
        )

    first = wait_for(lambda: (d := dialogue())["rows"][0][0].endswith("made") and d, interval=0.02)
    assert first["state"] == "generating" and first["received"] > 0  # heard before the last turn was made
    assert "made" not in first["rows"][2][0]
    first_heard.set()
    wait_for(lambda: dialogue()["state"] == "idle", message="the end of the dialogue")
    done = dialogue()
    assert [row[0] for row in done["rows"]] == ["turn made"] * 3
    assert stats(server)["completed"] == before + 3  # one job per turn, each in the context of those before

    by_id(browser, "dialogue-manifest").click()
    manifest = json.loads(downloaded(browser, "dialogue-11.json").read_text())
    assert [(t["speaker"], t["text"]) for t in manifest["turns"]] == [
        (0, "Did you get my message?"),
        (1, "I did, yes."),
        (0, "Great, see you then."),
    ]
    assert manifest["voices"] == {"1": "dialogue-bea"} and manifest["seed"] == 11
    assert [float(row[1]) for row in done["rows"]] == [t["end"] for t in manifest["turns"]]
    by_id(browser, "dialogue-download").click()
    mix, rate = sf.read(downloaded(browser, "dialogue-11.wav"))
    assert rate == 24000 and len(mix) / rate == pytest.approx(manifest["seconds"], abs=1e-3)
    assert done["received"] == pytest.approx(manifest["seconds"], abs=1e-3)
    assert console(browser) == []


def test_with_an_api_key_the_page_asks_for_it_and_shows_nothing_else(browser, server):
    settings = server.app.state.settings
    settings.api_key = "page-secret"
    try:
        browser.get(str(server.base_url) + "/")
        wait_for(lambda: by_id(browser, "key-form").is_displayed(), message="the key form")
        assert not by_id(browser, "app").is_displayed() and not by_id(browser, "health").is_displayed()
        by_id(browser, "key").send_keys("wrong\n")
        wait_for(lambda: by_id(browser, "key-error").text == "That key was not accepted.")
        assert not by_id(browser, "app").is_displayed()
        by_id(browser, "key").clear()
        by_id(browser, "key").send_keys("page-secret\n")
        wait_for(lambda: by_id(browser, "app").is_displayed() and by_id(browser, "voice").text)
        open_page(browser, server)  # asked once: a reload keeps the key for this tab
        assert not by_id(browser, "key-form").is_displayed()
        set_text(browser, "text", "With a key.")
        by_id(browser, "speak").click()
        wait_for(lambda: player(browser)["received"] > 0 and player(browser)["state"] == "idle")
        assert not by_id(browser, "error").is_displayed()
    finally:
        settings.api_key = None
        browser.execute_script("sessionStorage.clear()")
    console(browser)  # the 401s of the wrong key are logged as failed loads: expected here


def loaded_from(driver) -> set[str]:
    """The origins of every resource the page loaded."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return {re.match(r"^[a-z]+://[^/]+", u).group(0) for u in urls if not u.startswith(("data:", "blob:"))}


def test_api_docs_render_every_operation_with_no_network(browser, server):
    """Swagger UI at /docs and ReDoc at /redoc render the API from this server alone (this machine has no
    internet, so a CDN would leave them blank), with no console error (a refused load would be one)."""
    from selenium.webdriver.common.by import By

    console(browser)
    base = str(server.base_url)
    paths = set(server.get("/openapi.json").json()["paths"])
    browser.get(base + "/docs")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"), message="Swagger UI")
    shown = {
        e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert shown == paths
    assert loaded_from(browser) == {base}
    assert console(browser) == []
    browser.get(base + "/redoc")
    wait_for(lambda: "/v1/audio/speech" in browser.find_element(By.TAG_NAME, "body").text, message="ReDoc")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert all(p in text for p in paths), [p for p in paths if p not in text]
    assert loaded_from(browser) == {base}
    assert console(browser) == []


def test_page_fits_a_phone_screen(browser, server):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, server)
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1]
        assert by_id(browser, "speak").is_displayed() and by_id(browser, "text").size["width"] > 300
    finally:
        browser.set_window_size(1100, 900)


def test_screenshot_of_the_page(browser, server, tmp_path):
    """Writes the README's picture when CSM_SCREENSHOT names a file (`CSM_SCREENSHOT=docs/page.png pytest
    tests/test_web.py -k screenshot`); else only checks that one can be taken. Taken while audio plays."""
    open_page(browser, server)
    settings = server.app.state.settings
    settings.max_frames = 60
    try:
        set_text(browser, "text", "Hello! This is CSM speaking in your browser, sentence by sentence.")
        rows = browser.find_elements("css selector", "#turns input.words")
        rows[0].send_keys("Did you get my message about Saturday?")
        rows[1].send_keys("I did, yes. Count me in!")
        by_id(browser, "speak").click()
        wait_for(lambda: player(browser)["played"] > 1.0, message="a second of playback")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        metrics = {"width": 960, "height": height, "deviceScaleFactor": 1, "mobile": False}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # the whole page, no scrollbar
        target = Path(os.environ.get("CSM_SCREENSHOT") or tmp_path / "page.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        by_id(browser, "stop").click()
        settings.max_frames = FRAMES
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
