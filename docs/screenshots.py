"""The README's pictures of ``deepscope serve``, taken in headless Chromium on real data: labelling with the live
prediction (ISBI 2012 EM), instance proofreading of a trained nuclei model's output (DSB2018), and a training job
started from the labels.

    python docs/screenshots.py --checkpoint runs/nuclei/best.pt     # a segment checkpoint of nuclei (any target)

Needs ``../shared/data`` beside the checkout (or DEEPSCOPE_SHARED_DATA), Chromium and chromedriver. Writes
``docs/images/serve-*.png``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from deepscope.serve.app import LOOPBACK_NAMES, background_server, create_app

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("DEEPSCOPE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
NUCLEI = "550450e4bff4036fd671decdc5d42fec23578198d6a2fd79179c4368b9d6da18"  # DSB2018 test, fluorescence, 264 nuclei
READY = (
    "document.body.dataset.ready === '1' && document.body.dataset.pending === '0' && document.body.dataset.busy === '0'"
)
STROKES = [  # ISBI EM mosaic: (label, points); class 1 cell interior, class 2 membrane
    (1, [[105, 230], [160, 262]]),
    (1, [[548, 610], [600, 640]]),
    (1, [[830, 130], [880, 160]]),
    (2, [[300, 300], [300, 360]]),
    (2, [[700, 800], [740, 820]]),
    (2, [[150, 820], [200, 850]]),
]


def folder_with_data(root: Path, checkpoint: Path) -> Path:
    """EM mosaic (1024x1024), one DSB2018 fluorescence image and the nuclei model under models/."""
    slices = [np.asarray(Image.open(SHARED / "isbi2012_em" / "images" / f"{i:02d}.png")) for i in range(4)]
    tifffile.imwrite(root / "em.tif", np.block([[slices[0], slices[1]], [slices[2], slices[3]]]))
    Image.open(SHARED / "dsb2018" / "test" / "images" / f"{NUCLEI}.png").convert("L").save(root / "nuclei.png")
    (root / "models" / "nuclei").mkdir(parents=True)
    shutil.copy(checkpoint, root / "models" / "nuclei" / "best.pt")
    return root


def chromium(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1500,1000",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def until(driver: webdriver.Chrome, condition: str, timeout: float = 300) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(f"return {condition}"))


def shoot(
    driver: webdriver.Chrome, url: str, section: str, name: str, condition: str = READY, hide: tuple[str, ...] = ()
) -> None:
    """Open ``url``, wait for ``condition``, untick the overlays ``hide``, show the panel ``section`` and save the
    page as docs/images/<name>."""
    driver.get(url)
    driver.refresh()  # a new hash alone does not reload the page
    until(driver, condition)
    for overlay in hide:
        driver.execute_script(f"const box = document.getElementById('{overlay}'); if (box.checked) box.click();")
    until(driver, READY)
    driver.execute_script(f"document.getElementById('{section}').scrollIntoView()")
    time.sleep(0.5)
    (HERE / "images").mkdir(exist_ok=True)
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot.quantize(256, method=Image.Quantize.MEDIANCUT).save(HERE / "images" / name, optimize=True)  # a fifth the size
    print("wrote", HERE / "images" / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="segment checkpoint of nuclei (DSB2018)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "data"
        folder.mkdir()
        folder_with_data(folder, Path(args.checkpoint))
        with (
            background_server(create_app(folder, hosts=LOOPBACK_NAMES)) as url,
            httpx.Client(base_url=url, timeout=300) as api,
        ):
            driver = chromium(Path(scratch) / "profile")
            try:
                classes = [
                    {"value": 1, "name": "cell interior", "colour": "#1f77b4"},
                    {"value": 2, "name": "membrane", "colour": "#ff7f0e"},
                ]
                api.put("/api/project", json={"classes": classes}).raise_for_status()
                for label, points in STROKES:
                    api.post(
                        "/api/stroke", params={"image": "em.tif"}, json={"points": points, "radius": 4, "label": label}
                    ).raise_for_status()
                shoot(driver, url + "#em.tif", "classes", "serve-labelling.png")

                api.post("/api/models/open", json={"path": "models/nuclei/best.pt"}).raise_for_status()
                api.post("/api/models/predict", params={"image": "nuclei.png"}, json={}).raise_for_status()
                while api.get("/api/models/status", params={"image": "nuclei.png"}).json()["state"] != "done":
                    time.sleep(0.5)
                api.post(
                    "/api/instances/load", params={"image": "nuclei.png"}, json={"source": "model"}
                ).raise_for_status()
                # the EM forest's; the editor's own
                shoot(
                    driver,
                    url + "#nuclei.png",
                    "instances-section",
                    "serve-proofreading.png",
                    READY + " && document.body.dataset.instancesVersion !== ''",
                    hide=("overlay-probabilities", "model-overlay-outlines"),
                )

                api.post(
                    "/api/jobs", json={"kind": "segment", "source": "labels", "max_minutes": 1.5}
                ).raise_for_status()
                while api.get("/api/jobs").json()["jobs"][-1]["state"] in ("queued", "running"):
                    time.sleep(2)
                shoot(
                    driver,
                    url + "#em.tif",
                    "jobs-section",
                    "serve-training.png",
                    READY + " && document.body.dataset.jobState === 'done'",
                )
            finally:
                driver.quit()


if __name__ == "__main__":
    main()
