"""`meissonic app` in a real browser: headless Chromium from the system packages, driven by Selenium
with the system chromedriver (nothing downloaded at run time). Types a prompt, clicks Generate, waits
for the image in the gallery and saves the page as docs/app.png (the README's screenshot).

`.ci/run` installs chromium and chromium-driver when missing and sets MEISSONIC_REQUIRE_BROWSER=1, so
in CI a missing browser fails this test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a driver: the system one is given

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "app.png"
DRIVER_PATHS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _system_browser() -> tuple[str, str]:
    """(browser binary, chromedriver) from the system, or skip — or fail where the browser is required."""
    browser = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    driver = next((p for p in DRIVER_PATHS if Path(p).is_file()), None) or shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    why = "headless Chromium not installed (apt-get install chromium chromium-driver; .ci/run does it)"
    if os.environ.get("MEISSONIC_REQUIRE_BROWSER", "") not in ("", "0"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.mark.slow
def test_page_generates_an_image_in_a_real_browser(tiny_model_dir: Path, tmp_path: Path) -> None:
    browser, driver_path = _system_browser()
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from test_app import start_app

    served = start_app(tiny_model_dir, tmp_path / "out", steps=4, resolution="64")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(served.url)
        wait = WebDriverWait(driver, 180)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.send_keys("a red circle above a blue square")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        image = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        assert driver.execute_script("return arguments[0].naturalWidth", image) == 64
        written = sorted((served.out / "generate").glob("*.json"))
        assert [p.name for p in written] == ["00000-a-red-circle-above-a-blue-square.json"]
        assert "a red circle above a blue square" in written[0].read_text(encoding="utf-8")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.quit()
        served.close()
