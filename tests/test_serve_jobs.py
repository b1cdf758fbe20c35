"""Training jobs of ``deepscope serve`` through Starlette's test client: a U-Net trained on sparse labels end to end
(progress, curves, a checkpoint ``deepscope predict`` uses), the queue, cancelling (the process group is gone),
shutdown, a failing job, and every refusal of a bad or empty request."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2 for its test client; httpx works the same here
    warnings.filterwarnings("ignore", "Using `httpx`")
    from starlette.testclient import TestClient

from deepscope.cli import main
from deepscope.serve.app import create_app
from deepscope.serve.folder import ServedFolder
from deepscope.serve.jobs import DEFAULT_MINUTES, fraction
from deepscope.serve.project import Project

try:  # the page's fixtures and helpers; without selenium only the browser test is skipped
    from test_serve_browser import (  # noqa: F401
        CHROMEDRIVER,
        CHROMIUM,
        READY,
        browser,
        paint,
        server,
        wait,
    )
except pytest.skip.Exception:
    CHROMIUM = CHROMEDRIVER = None

SMALL = {"model_args": {"features": 4, "depth": 2}}  # a U-Net small enough to train in seconds on a CPU
SHAPE = (64, 64)


def two_regions(rng: np.random.Generator) -> np.ndarray:
    """Dark noisy left half, bright noisy right half (uint8)."""
    image = rng.integers(20, 60, SHAPE).astype(np.uint8)
    image[:, SHAPE[1] // 2 :] += 150
    return image


def sparse_labels(classes: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """A stroke of class 1 in the dark half and of class 2 in the bright half (those in ``classes``); 0 elsewhere."""
    labels = np.zeros(SHAPE, np.uint8)
    for value, columns in ((1, slice(4, 28)), (2, slice(36, 60))):
        if value in classes:
            labels[30:34, columns] = value
    return labels


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two images, both labelled with a stroke of each of the project's two default classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "labels").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(two_regions(rng)).save(root / f"{name}.png")
        tifffile.imwrite(root / "labels" / f"{name}.tif", sparse_labels())
    return root


def post(client: TestClient, path: str, body: dict):
    return client.post(path, json=body)


def job_of(client: TestClient, job_id: str) -> dict:
    reply = client.get("/api/jobs")
    assert reply.status_code == 200
    return next(job for job in reply.json()["jobs"] if job["id"] == job_id)


def wait_for(client: TestClient, job_id: str, done, what: str, limit: float = 180) -> dict:
    """The job once ``done(job)`` holds (bounded wait, so a hang fails the test)."""
    deadline = time.monotonic() + limit
    while not done(job := job_of(client, job_id)):
        assert time.monotonic() < deadline, f"job never {what}: {job}"
        time.sleep(0.1)
    return job


def finished(client: TestClient, job_id: str) -> dict:
    return wait_for(client, job_id, lambda job: job["state"] in ("done", "failed", "cancelled"), "finished")


def gone(pid: int) -> bool:
    """Whether the process, and every process of its group, has exited."""
    for check in (os.kill, os.killpg):
        try:
            check(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


def test_segment_job_trains_on_sparse_labels_and_its_checkpoint_predicts(folder: Path, tmp_path: Path) -> None:
    with TestClient(create_app(folder)) as client:
        reply = post(client, "/api/jobs", {"kind": "segment", "epochs": 1, "max_minutes": 2, "settings": SMALL})
        assert reply.status_code == 200, reply.text
        started = reply.json()
        assert (
            started["kind"] == "segment" and started["source"] == "labels" and started["state"] in ("queued", "running")
        )
        job = finished(client, started["id"])
        log = client.get(f"/api/jobs/log?id={started['id']}").json()["log"]
    assert job["state"] == "done", job["error"]
    assert job["progress"] == 1.0 and (job["epoch"], job["epochs"]) == (1, 1)
    assert [h["epoch"] for h in job["history"]] == [1] and job["metric"] == "val_mean_iou"
    assert job["metric"] in job["history"][0] and job["pid"] and gone(job["pid"])
    run = folder / "models" / started["id"]
    assert job["checkpoint"] == f"models/{started['id']}/best.pt" and (run / "best.pt").is_file()
    assert Project.load(ServedFolder(folder)).models == [job["checkpoint"]]  # the project records the trained model
    assert "epoch 1/1" in log and "run written to" in log

    # the staged data: links to the images, copies of the labels; the run took the project's classes, 0 ignored
    data = folder / ".deepscope" / "jobs" / started["id"] / "data"
    assert sorted(p.name for p in (data / "images").iterdir()) == ["a.png", "b.png"]
    assert (data / "images" / "a.png").resolve() == (folder / "a.png").resolve()
    assert np.array_equal(tifffile.imread(data / "labels" / "b.tif"), sparse_labels())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["target"], config["ignore_label"], config["class_values"]) == ("semantic", 0, [1, 2])
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["train_loss"] for h in metrics["history"]] == [h["train_loss"] for h in job["history"]]
    # validation scored the labelled pixels of the validation image only: 2 strokes of 4 x 24 pixels
    assert np.sum(metrics["val"]["confusion"]) == np.count_nonzero(sparse_labels()) == 192

    out = tmp_path / "predicted"
    assert main(["predict", str(run / "best.pt"), str(folder / "a.png"), "--out", str(out), "--device", "cpu"]) == 0
    classes = [p for p in out.rglob("*.tif") if "classes" in p.name]
    assert len(classes) == 1
    predicted = tifffile.imread(classes[0])
    assert predicted.shape == SHAPE and set(np.unique(predicted)) <= {0, 1}


def test_queue_cancel_failure_and_shutdown(folder: Path) -> None:
    """One job trains at a time; cancelling stops its process group and the next job starts; a job that exits with
    an error is failed with its log's last lines; shutting the server down stops the job still running."""
    long = {"kind": "segment", "epochs": 100000, "max_minutes": 600, "settings": SMALL}
    broken = {"kind": "segment", "epochs": 1, "settings": {"model_args": {"nonsense": 1}}}
    app = create_app(folder)
    with TestClient(app) as client:
        first, second, third, fourth = (post(client, "/api/jobs", body).json() for body in (long, broken, long, long))
        assert first["state"] == "running" and second["state"] == third["state"] == fourth["state"] == "queued"
        assert second["pid"] is None and len({first["id"], second["id"], third["id"], fourth["id"]}) == 4
        assert post(client, "/api/jobs/cancel", {"id": third["id"]}).json()["state"] == "cancelled"  # just dropped
        job = wait_for(client, first["id"], lambda job: job["epochs"] is not None, "started training")
        assert job["state"] == "running" and 0 <= job["progress"] < 0.01
        reply = post(client, "/api/jobs/cancel", {"id": first["id"]})
        assert reply.status_code == 200 and reply.json()["state"] == "cancelled"
        assert gone(first["pid"])

        failed = finished(client, second["id"])  # started once the first was cancelled
        assert (
            failed["state"] == "failed" and failed["checkpoint"] is None and failed["started"] >= reply.json()["ended"]
        )
        assert "error: model 'unet' has no argument(s) nonsense" in failed["error"]
        running = wait_for(client, fourth["id"], lambda job: job["state"] != "queued", "started")
        assert running["state"] == "running"
    # server shutdown cancelled the running job: no training outlives the server
    states = [job["state"] for job in app.state.session.jobs.jobs()]
    assert states == ["cancelled", "failed", "cancelled", "cancelled"]
    assert gone(running["pid"]) and app.state.session.jobs.jobs()[2]["pid"] is None  # a dropped job never started
    assert not list((folder / "models").glob("*/metrics.json"))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "classify"}, "job kind 'classify': expected one of segment, pixel-deep"),
        ({}, "job kind None"),
        ({"kind": ["segment"]}, "job kind ['segment']"),
        ({"kind": "segment", "source": ["labels"]}, "job source ['labels']"),
        ({"kind": "segment", "source": "boxes"}, "job source 'boxes'"),
        ({"kind": "pixel-deep", "source": "instances"}, "a pixel-deep job trains on labels"),
        ({"kind": "segment", "max_minutes": 0}, "max_minutes: expected a number of minutes above 0"),
        ({"kind": "segment", "max_minutes": -1}, "max_minutes"),
        ({"kind": "segment", "max_minutes": "5"}, "max_minutes"),
        ({"kind": "segment", "max_minutes": True}, "max_minutes"),
        ({"kind": "segment", "max_minutes": 1e9}, "max_minutes"),
        ({"kind": "segment", "epochs": 0}, "epochs: expected 1 to"),
        ({"kind": "segment", "epochs": 1.5}, "epochs: expected an integer"),
        ({"kind": "segment", "target": "flows"}, "target 'flows': only instance jobs take a target"),
        ({"kind": "segment", "source": "instances", "target": "cubes"}, "target 'cubes'"),
        ({"kind": "segment", "speed": "fast"}, "job: unknown setting(s) speed"),
        ({"kind": "segment", "settings": [1]}, "settings: expected an object"),
        ({"kind": "segment", "settings": {"out": "/tmp/elsewhere"}}, "settings: 'out' cannot be set for a job"),
        ({"kind": "segment", "settings": {"init_from": "../secret.pt"}}, "settings: 'init_from' cannot be set"),
        ({"kind": "segment", "settings": {"data": "/"}}, "settings: 'data' cannot be set"),
        ({"kind": "segment", "settings": {"model_args.x=1 --out": 1}}, "cannot be set for a job"),
    ],
)
def test_bad_requests_are_refused_in_one_line(folder: Path, body: dict, message: str) -> None:
    with TestClient(create_app(folder)) as client:
        reply = post(client, "/api/jobs", body)
        assert reply.status_code == 400 and message in reply.json()["error"], reply.text
        assert "\n" not in reply.json()["error"]
        assert client.get("/api/jobs").json() == {"jobs": []}
    assert not (folder / "models").exists()
    assert not list((folder / ".deepscope").glob("jobs/*"))  # a refused job leaves nothing behind


def refusal(folder: Path, body: dict) -> str:
    with TestClient(create_app(folder)) as client:
        reply = post(client, "/api/jobs", body)
    assert reply.status_code == 400, reply.text
    assert not list((folder / ".deepscope").glob("jobs/*"))
    return reply.json()["error"]


def test_nothing_to_train_on_is_refused(folder: Path) -> None:
    for path in (folder / "labels").iterdir():
        tifffile.imwrite(path, sparse_labels((1,)))
    assert "only class 1 (background) is labelled; label at least two classes" in refusal(folder, {"kind": "segment"})
    assert "at least two classes" in refusal(folder, {"kind": "pixel-deep"})
    assert "no instance masks with objects in masks/" in refusal(folder, {"kind": "segment", "source": "instances"})
    (folder / "masks").mkdir()
    tifffile.imwrite(folder / "masks" / "a.tif", np.zeros(SHAPE, np.uint16))  # a mask without objects
    assert "no instance masks" in refusal(folder, {"kind": "segment", "source": "instances"})
    for path in (folder / "labels").iterdir():
        path.unlink()
    assert "no image has labels yet" in refusal(folder, {"kind": "segment"})


def test_unknown_jobs_and_bad_ids(folder: Path) -> None:
    with TestClient(create_app(folder)) as client:
        reply = post(client, "/api/jobs/cancel", {"id": "20260101-000000-segment"})
        assert reply.status_code == 404 and "no such job" in reply.json()["error"]
        assert client.get("/api/jobs/log?id=../../labels/a.tif").status_code == 404  # ids are looked up, never paths
        assert post(client, "/api/jobs/cancel", {}).status_code == 400
        assert post(client, "/api/jobs/cancel", {"id": 3}).status_code == 400
        assert client.get("/api/jobs/log").status_code == 400
        assert client.post("/api/jobs", content=b"kind=segment").status_code == 415  # JSON only


def test_progress_counts_epochs_and_steps_or_the_time_used() -> None:
    assert fraction({}, DEFAULT_MINUTES) == 0.0
    assert fraction({"epoch": 1, "epochs": 4, "step": 5, "steps": 10, "elapsed_s": 1.0}, 10) == 0.375
    assert fraction({"epoch": 0, "epochs": 100, "step": 0, "steps": 10, "elapsed_s": 150.0}, 10) == 0.25  # by time
    assert fraction({"epoch": 9, "epochs": 4, "elapsed_s": 0.0}, 10) == 1.0


@pytest.mark.slow
def test_queued_job_runs_after_the_first(folder: Path) -> None:
    quick = {"kind": "segment", "epochs": 1, "settings": SMALL}
    with TestClient(create_app(folder)) as client:
        first = post(client, "/api/jobs", quick).json()
        second = post(client, "/api/jobs", quick).json()
        assert second["state"] == "queued" and second["id"] != first["id"]
        one, two = finished(client, first["id"]), finished(client, second["id"])
    assert one["state"] == two["state"] == "done", (one["error"], two["error"])
    assert two["started"] >= one["ended"]
    assert (folder / "models" / first["id"] / "best.pt").is_file() and (
        folder / "models" / second["id"] / "best.pt"
    ).is_file()


@pytest.mark.slow
def test_pixel_deep_job_trains_from_the_live_forest(folder: Path) -> None:
    with TestClient(create_app(folder)) as client:
        assert post(client, "/api/predict?image=a.png", {}).status_code == 200  # fits the live forest
        reply = post(client, "/api/jobs", {"kind": "pixel-deep", "epochs": 1, "settings": SMALL})
        assert reply.status_code == 200, reply.text
        job = finished(client, reply.json()["id"])
    assert job["state"] == "done", job["error"]
    assert job["checkpoint"] == f"models/{job['id']}/unet/best.pt" and job["progress"] == 1.0
    assert len(job["history"]) == 1
    assert (folder / ".deepscope" / "jobs" / job["id"] / "classifier.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="selenium, Chromium or chromedriver not found")
def test_train_from_the_page_and_open_the_result(server: str, browser, tmp_path: Path) -> None:
    """The user's way: paint two classes, start training in the Training section, watch it finish, open the model."""
    browser.get(server)
    wait(browser, "document.body.dataset.image === 'cells.png'", READY)
    assert browser.execute_script("return document.body.dataset.jobState") == ""  # no job yet
    paint(browser, [(60.5, 15.5), (40.5, 40.5), (80.5, 60.5)])  # class 1 in the dark half
    browser.find_element("tag name", "body").send_keys("2")
    paint(browser, [(30.5, 120.5), (60.5, 150.5), (95.5, 170.5)])  # class 2 in the bright half
    wait(browser, "document.body.dataset.labelsVersion === '2'", READY)
    browser.find_element("id", "job-epochs").send_keys("1")
    browser.find_element("id", "job-start").click()
    wait(browser, "document.body.dataset.jobState === 'done'", timeout=300)

    job = browser.find_element("css selector", "#jobs li.job")
    assert "epoch 1/1" in job.text
    assert job.find_element("css selector", ".job-bar > div").get_attribute("style") == "width: 100%;"
    assert job.find_elements("css selector", "svg.job-curve [data-series='train_loss']")
    checkpoint = job.find_element("css selector", ".job-open").get_attribute("title")
    assert checkpoint.startswith("models/") and (tmp_path / "data" / checkpoint).is_file()
    browser.execute_script("window.deepscopeModels = {open: (path) => { window.openedCheckpoint = path; }};")
    job.find_element("css selector", ".job-open").click()
    assert browser.execute_script("return window.openedCheckpoint") == checkpoint
    browser.execute_script("delete window.deepscopeModels;")
    job.find_element("css selector", ".job-open").click()
    assert "the models panel is not loaded" in browser.find_element("id", "status").text
