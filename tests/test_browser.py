"""The demo page in a real browser: Debian's Chromium, headless, driven by selenium through
/usr/bin/chromedriver (nothing downloads a browser of its own). It starts `python demo.py` on a free
port with the tiny test model and clicks through what a learner does. .ci/run installs the three and
sets REQUIRE_BROWSER=1, so that in CI a missing one fails instead of skipping."""
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
MISSING = [name for name, ok in (("chromium", CHROMIUM), ("chromedriver", DRIVER), ("selenium", HAVE_SELENIUM)) if not ok]
if MISSING and not os.environ.get("REQUIRE_BROWSER"):
    pytest.skip(f"no {', '.join(MISSING)} here (apt install chromium chromium-driver; pip install selenium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def page(tiny_ckpt, wild_adapter):
    """`python demo.py --port 0` with the tiny model and an adapter; -> its URL."""
    assert not MISSING, f"REQUIRE_BROWSER is set but {', '.join(MISSING)} is missing"
    adapter = wild_adapter
    server = subprocess.Popen([sys.executable, "demo.py", "--checkpoint", tiny_ckpt, "--lora", adapter, "--port", "0",
                               "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    url = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert url, (line, server.stderr.read() if server.poll() is not None else "")
    yield url.group(0)
    server.terminate()
    assert server.wait(timeout=30) is not None


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(lambda b: condition(b))


def count(browser, element_id):
    return int(browser.find_element("id", element_id).get_attribute("data-count"))


def set_value(browser, element_id, value):
    """A slider or field set as a user's drag would leave it (the value, then an input event)."""
    browser.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                           "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                           element_id, str(value))


def test_a_learner_clicks_through_the_page(page, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select
    browser.get(page)
    wait_for(browser, lambda b: b.find_element("id", "source").text.startswith("model:"))
    assert [o.text for o in Select(browser.find_element("id", "adapter")).options] == ["none", "wild"]
    # pick 7, generate -> the film plays and a grid appears
    Select(browser.find_element("id", "label")).select_by_visible_text("7")
    set_value(browser, "steps", 4)
    browser.find_element("id", "generate").click()
    wait_for(browser, lambda b: count(b, "grid") == 1)
    grid = browser.find_element("id", "grid").get_attribute("src")
    assert grid.startswith("data:image/png;base64,") and "step 4 of 4" in browser.find_element("id", "status").text
    # choose the adapter, move its strength -> the same seed, redrawn differently
    Select(browser.find_element("id", "adapter")).select_by_visible_text("wild")
    assert browser.find_element("id", "scale").is_enabled()
    set_value(browser, "scale", 0.5)
    wait_for(browser, lambda b: count(b, "grid") == 2)
    assert browser.find_element("id", "grid").get_attribute("src") != grid
    # draw a stroke, inpaint the rest
    canvas = browser.find_element("id", "canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, -40, -90).click_and_hold() \
        .move_by_offset(10, 60).move_by_offset(10, 60).release().perform()
    Select(browser.find_element("id", "mode")).select_by_value("inpaint")
    browser.find_element("id", "edit").click()
    wait_for(browser, lambda b: count(b, "edit-grid") == 1)
    assert browser.find_element("id", "edit-grid").get_attribute("src").startswith("data:image/png;base64,")
    assert not browser.find_element("id", "error").is_displayed()
    # a bad value -> a message on the page, and the server goes on serving
    set_value(browser, "seed", -5)
    browser.find_element("id", "generate").click()
    wait_for(browser, lambda b: b.find_element("id", "error").is_displayed())
    assert "seed -5" in browser.find_element("id", "error").text
    set_value(browser, "seed", 3)
    browser.find_element("id", "generate").click()
    wait_for(browser, lambda b: count(b, "grid") == 3)
    assert not browser.find_element("id", "error").is_displayed()
    # the attention maps of the last drawing
    browser.find_element("id", "attn").click()
    wait_for(browser, lambda b: len(b.find_elements("css selector", "#attn-maps img")) == 3)


def test_the_page_asks_nothing_of_any_other_host(page, browser):
    """Every resource the page loaded came from the demo itself."""
    browser.get(page)
    wait_for(browser, lambda b: b.find_element("id", "source").text.startswith("model:"))
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(page) for u in urls), urls
