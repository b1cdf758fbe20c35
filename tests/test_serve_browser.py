"""`deepscope serve` in a real headless Chromium (Selenium): paint two classes with the pointer on a two-region image,
see the live prediction overlay classify both regions, undo with the keyboard, and find the labels after a reload.

The test waits on the data attributes the page sets on its body (``data-ready`` once every visible tile of the shown
layers is current and nothing is pending), never on fixed sleeps. It skips, saying why, without Chromium and its
driver (Debian: ``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepscope.serve.app import LOOPBACK_NAMES, background_server, create_app

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver)",
)
HEIGHT, WIDTH = 120, 180
READY = (
    "document.body.dataset.ready === '1' && document.body.dataset.pending === '0' && document.body.dataset.busy === '0'"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """The app on a free loopback port, in a thread; yields its URL."""
    rng = np.random.default_rng(1)
    image = rng.integers(10, 70, (HEIGHT, WIDTH)).astype(np.uint8)
    image[:, WIDTH // 2 :] += 160  # dark left half, bright right half
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(image).save(folder / "cells.png")
    with background_server(create_app(folder, hosts=LOOPBACK_NAMES)) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.skip(f"Chromium does not start here: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, *conditions: str, timeout: float = 60) -> None:
    """Until the JavaScript ``conditions`` all hold in the page; on timeout, fail with where the page stands."""
    script = "return " + " && ".join(f"({c})" for c in conditions)
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))
    except TimeoutException:
        state = driver.execute_script(
            "return [JSON.stringify(document.body.dataset), document.getElementById('status').textContent]"
        )
        raise AssertionError(f"page never reached {script!r}: {state}") from None


def paint(driver: webdriver.Chrome, points: list[tuple[float, float]]) -> None:
    """A left-button stroke through image points (y, x), as real pointer events."""
    actions = ActionBuilder(driver, mouse=PointerInput(interaction.POINTER_MOUSE, "mouse"), duration=20)
    for i, (y, x) in enumerate(points):
        cx, cy = driver.execute_script("return deepscope.toClient(arguments[0], arguments[1])", y, x)
        actions.pointer_action.move_to_location(round(cx), round(cy))
        if i == 0:
            actions.pointer_action.pointer_down()
    actions.pointer_action.pointer_up()
    actions.perform()


def pixels(driver: webdriver.Chrome, layer: str, points: list[tuple[float, float]]) -> np.ndarray:
    """(N, 4) RGBA of a layer canvas at image points (y, x)."""
    return np.array(
        driver.execute_script(
            """
        const ctx = document.getElementById('layer-' + arguments[0]).getContext('2d');
        return arguments[1].map(([y, x]) => {
            const [cx, cy] = deepscope.toCanvas(y, x);
            return Array.from(ctx.getImageData(cx, cy, 1, 1).data);
        });""",
            layer,
            [list(p) for p in points],
        )
    )


def rgb(colour: str) -> list[int]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def test_paint_predict_undo_reload(server: str, browser: webdriver.Chrome) -> None:
    browser.get(server)
    wait(browser, "document.body.dataset.image === 'cells.png'", READY)
    colours = [rgb(c) for c in browser.execute_script("return deepscope.state.project.classes.map(c => c.colour)")]
    left_stroke = [(60.5, 15.5), (40.5, 40.5), (80.5, 60.5)]
    right_stroke = [(30.5, 120.5), (60.5, 150.5), (95.5, 170.5)]
    paint(browser, left_stroke)  # class 1 is selected at start
    ActionChains(browser).send_keys("2").perform()
    paint(browser, right_stroke)
    wait(browser, "document.body.dataset.labelsVersion === '2'", "document.body.dataset.modelVersion !== ''", READY)

    assert browser.execute_script("return deepscope.state.strokes.length") == 0  # the label tiles replaced them
    browser.find_element(By.ID, "overlay-classes").click()
    wait(browser, READY)
    left = [(y, x) for y in (10.5, 60.5, 110.5) for x in (5.5, 30.5, 70.5)]
    right = [(y, x) for y in (10.5, 60.5, 110.5) for x in (110.5, 140.5, 175.5)]
    shown = pixels(browser, "classes", left + right)
    assert (shown[:, 3] == 255).all(), shown
    assert np.abs(shown[: len(left), :3] - colours[0]).max() <= 2, shown
    assert np.abs(shown[len(left) :, :3] - colours[1]).max() <= 2, shown

    labels = pixels(browser, "labels", [left_stroke[1], right_stroke[1]])
    assert np.abs(labels[:, :3] - np.array(colours[:2])).max() <= 2 and (labels[:, 3] == 255).all(), labels
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()  # undo the right stroke
    wait(browser, "document.body.dataset.labelsVersion === '3'", READY)
    assert pixels(browser, "labels", [right_stroke[1]])[0, 3] == 0

    browser.refresh()
    wait(browser, "document.body.dataset.image === 'cells.png'", "document.body.dataset.labelsVersion === '3'", READY)
    labels = pixels(browser, "labels", [left_stroke[0], left_stroke[1], right_stroke[1], (5.5, 5.5)])
    assert np.abs(labels[:2, :3] - colours[0]).max() <= 2 and (labels[:2, 3] == 255).all(), labels
    assert (labels[2:, 3] == 0).all(), labels
    assert browser.execute_script("return document.body.dataset.error") is None
