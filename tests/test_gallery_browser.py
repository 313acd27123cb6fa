"""``report --html`` in a real headless Chromium (Debian's chromium and chromium-driver, through selenium):
the embedded images decode and are painted where the page puts them, and a click on a column header sorts
the leaderboard by value. Run by ``tox -e browser`` (tools/ensure_chromium.sh installs the browser)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from bench.aggregate import aggregate_stage
from bench.generate import generate_stage
from bench.methods import load_method
from bench.report import report_stage
from bench.runfiles import read_manifest
from bench.score import score_stage
from rtdmd.suites import load_suite

pytestmark = pytest.mark.browser
METHODS = ("toy-rtdmd", "toy-euler4", "toy-dmd")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A three-method toy leaderboard with its HTML page."""
    out = tmp_path_factory.mktemp("gallery")
    suite = load_suite("toy-geneval-quick")
    for method in METHODS:
        generate_stage(load_method(method), suite, out, limit=12, device="cpu")
        score_stage(out / method / suite.card.name, ["toy-geneval", "toy-clip"], device="cpu")
        aggregate_stage(out / method / suite.card.name)
    summaries = [out / m / suite.card.name / "summary.json" for m in METHODS]
    report_stage(summaries, out / "board.md", html=True)
    return out


@pytest.fixture(scope="module")
def browser():
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail(
            "Debian's chromium and chromium-driver are needed: run tools/ensure_chromium.sh (tox -e browser does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_the_images_are_painted_where_the_page_puts_them(page, browser):
    browser.get((page / "board.html").as_uri())
    images = browser.find_elements("css selector", "td.cell img")
    manifest_rows = sum(
        len([r for r in read_manifest(page / m / "toy-geneval-quick") if r["sample_index"] == 0]) for m in METHODS
    )
    assert len(images) == manifest_rows  # 12 prompts in <= 8 per category: all of them here
    assert all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in images
    )
    first = images[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", first)
    rect = browser.execute_script(
        "var r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height]", first
    )
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    left, top, width, height = (round(v) for v in rect)
    painted = np.asarray(shot.crop((left, top, left + width, top + height)), dtype=np.float64)
    source_row = read_manifest(page / METHODS[0] / "toy-geneval-quick")[0]
    source = Image.open(page / METHODS[0] / "toy-geneval-quick" / source_row["file"]).convert("RGB")
    expected = np.asarray(source.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)
    # JPEG and the browser's own scaling differ from ours by a few levels; another image differs by far more
    assert np.abs(painted - expected).mean() < 12, np.abs(painted - expected).mean()
    other = read_manifest(page / METHODS[0] / "toy-geneval-quick")[5]
    wrong = Image.open(page / METHODS[0] / "toy-geneval-quick" / other["file"]).convert("RGB")
    assert np.abs(painted - np.asarray(wrong.resize((width, height)), dtype=np.float64)).mean() > 12


def test_a_click_on_a_column_header_sorts_by_value(page, browser):
    browser.get((page / "board.html").as_uri())
    table = browser.find_element("css selector", "table.leaderboard")
    header = [th for th in table.find_elements("css selector", "th") if th.text.startswith("toy-clip")][0]
    column = [th.text for th in table.find_elements("css selector", "th")].index(header.text)

    def column_values():
        rows = table.find_elements("css selector", "tbody tr")
        return [float(r.find_elements("css selector", "td")[column].get_attribute("data-value")) for r in rows]

    header.click()
    ascending = column_values()
    header.click()
    descending = column_values()
    assert ascending == sorted(ascending) and descending == sorted(ascending, reverse=True)
    assert len(set(ascending)) == len(METHODS)  # three different values: the order is a real test
