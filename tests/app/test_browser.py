"""``celldiff app`` in a real browser: Debian's headless Chromium driven by Selenium (nothing downloaded).

The test starts the app on a free port with a tiny model (or ``CELLDIFF_APP_CKPT``), uploads a real sample
cell, clicks Run with no mask (the page says so), paints one stroke across the middle of the canvas, runs,
downloads the first sample and checks it against the input: the same size, every pixel far from the stroke
unchanged, the pixels under it changed; then generates a grid on the other tab. ``CELLDIFF_SCREENSHOT=PATH`` saves the page after the run (the
README's docs/app_screenshot.png).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from celldiff.app.inputs import read_upload
from tests.app.helpers import tiny_checkpoint
from tests.conftest import REPO, SAMPLE

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
STROKE = (-60, 0, 120)  # from (dx, dy) CSS px off the canvas centre, this many px to the right

pytestmark = pytest.mark.slow


def _browser() -> None:
    """Skip, saying why, unless Chromium, its driver, Selenium and Gradio are all installed."""
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install selenium (.ci/run does)")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"chromium not installed: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    """``python -m celldiff.app`` on a free port; its URL once it answers."""
    _browser()
    ckpt = os.environ.get("CELLDIFF_APP_CKPT") or str(tiny_checkpoint(tmp_path / "tiny.ckpt"))
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "app.log", "w+")  # closed below, after the server
    server = subprocess.Popen([sys.executable, "-m", "celldiff.app", "--ckpt_path", ckpt, "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"celldiff app exited with {server.returncode}: {(tmp_path / 'app.log').read_text()}"
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"celldiff app did not answer: {(tmp_path / 'app.log').read_text()}"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        print((tmp_path / "app.log").read_text())


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Chromium at /usr/bin/chromium with downloads into ``tmp_path/downloads``."""
    _browser()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a driver or a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1700"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except Exception as err:  # a driver that does not match the browser, a browser that cannot start
        pytest.skip(f"chromium could not be started: {str(err).splitlines()[0]}")
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float = 60, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message=what)


def test_upload_paint_run_download(app_url, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    driver.get(app_url)
    cell_path = sorted((SAMPLE / "erythroblast").glob("*.jpg"))[0]
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#image-upload input[type=file]"), what="the page")
    driver.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]").send_keys(str(cell_path))
    _wait(driver, lambda d: "paint the missing region" in d.find_element(By.ID, "inpaint-note").text, what="the upload")

    driver.find_element(By.ID, "run").click()  # nothing painted yet: a message in the page, no result
    _wait(driver, lambda d: "the mask is empty" in d.find_element(By.TAG_NAME, "body").text, 30, "the empty-mask message")
    for close in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):
        close.click()

    editor = driver.find_element(By.ID, "mask-editor")
    zoom = float(next(e.text for e in editor.find_elements(By.XPATH, ".//*[contains(text(), '%')]")).rstrip("%")) / 100
    canvas = editor.find_elements(By.CSS_SELECTOR, "canvas")[-1]
    dx, dy, length = STROKE
    stroke = ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).click_and_hold()
    for _ in range(12):
        stroke.move_by_offset(length // 12, 0)
    stroke.release().perform()
    time.sleep(0.5)
    driver.find_element(By.ID, "run").click()
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#downloads a")) == 5, 120, "the samples")
    summary = driver.find_element(By.ID, "inpaint-summary").text
    assert "4 samples of 360 x 363 px" in summary and "dpmsolver 20 steps" in summary
    link = driver.find_elements(By.CSS_SELECTOR, "#downloads a")[0]
    assert link.get_attribute("download") == "inpainted_0.png"
    link.click()
    target = downloads / "inpainted_0.png"
    _wait(driver, lambda d: target.is_file() and not list(downloads.glob("*.crdownload")), 30, "the download")
    if os.environ.get("CELLDIFF_SCREENSHOT"):
        driver.set_window_size(1400, driver.execute_script("return document.body.scrollHeight") + 200)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        driver.save_screenshot(os.environ["CELLDIFF_SCREENSHOT"])

    from PIL import Image

    from celldiff.app.inputs import EDITOR_SIDE, frame_box
    from celldiff.app.ui import BRUSH_SIZE

    original, result = read_upload(cell_path), np.asarray(Image.open(target).convert("RGB"))
    assert result.shape == original.shape
    # The stroke in image pixels: the square canvas is centred in the editor at its zoom, the image framed on it.
    height, width = original.shape[:2]
    left, top, box_width, _ = frame_box((width, height))
    scale = box_width / width  # canvas pixels per image pixel
    start_x = (EDITOR_SIDE / 2 + dx / zoom - left) / scale
    start_y = (EDITOR_SIDE / 2 + dy / zoom - top) / scale
    span, radius = length / zoom / scale, BRUSH_SIZE / scale
    ys, xs = np.mgrid[0:height, 0:width]
    along = np.clip((xs - start_x) / span, 0, 1)
    distance = np.hypot(xs - (start_x + along * span), ys - start_y)
    changed = (result != original).any(axis=2)
    far = distance > 1.5 * radius + 4
    assert np.array_equal(result[far], original[far]), f"{changed[far].sum()} pixels changed far from the stroke"
    under = distance < radius / 2
    assert changed[under].mean() > 0.5, f"only {changed[under].mean():.0%} of the pixels under the stroke changed"
    assert changed.sum() > 0.5 * (distance < radius).sum()
    shutil.copy(target, tmp_path / "result.png")

    # A preset lands in the editor as a layer the brush adds to: the centre square and a stroke near a corner.
    driver.find_element(By.ID, "preset-centre").click()
    _wait(driver, lambda d: "the centre square" in d.find_element(By.ID, "inpaint-note").text, 30, "the preset")
    time.sleep(1)
    corner = ActionChains(driver).move_to_element_with_offset(canvas, -150, -150).click_and_hold()
    for _ in range(6):
        corner.move_by_offset(10, 0)
    corner.release().perform()
    time.sleep(0.5)
    def preview(d) -> str:
        return d.find_element(By.CSS_SELECTOR, "#masked-input img").get_attribute("src")

    first_preview = preview(driver)
    driver.find_element(By.ID, "run").click()
    _wait(driver, lambda d: preview(d) != first_preview, 120, "the second run")
    preview_url = preview(driver)
    urllib.request.urlretrieve(preview_url, tmp_path / "masked.png")
    grey = (np.asarray(Image.open(tmp_path / "masked.png").convert("RGB")) == 128).all(axis=2)
    corner_x = round((EDITOR_SIDE / 2 + (-150 + 30) / zoom - left) / scale)
    corner_y = round((EDITOR_SIDE / 2 - 150 / zoom - top) / scale)
    assert grey[height // 2, width // 2] and grey[corner_y, corner_x], "the preset or the stroke on it is missing"

    driver.find_element(By.ID, "tab-generate-button").click()  # the other tab: cells from scratch, as a grid
    _wait(driver, lambda d: d.find_element(By.ID, "generate").is_displayed(), 30, "the Generate tab")
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: "8 cells of" in d.find_element(By.ID, "generate-summary").text, 120, "the generated grid")
    assert driver.find_elements(By.CSS_SELECTOR, "#grid img")
