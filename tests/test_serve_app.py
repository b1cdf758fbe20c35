"""`deepscope serve` web app through Starlette's test client: every endpoint with known answers, and the guards
(path traversal, unknown and corrupt images, the token off the loopback, the Host check, body size, JSON only)."""

from __future__ import annotations

import errno
import socket
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

from conftest import rgba
from deepscope.cli import build_parser, main
from deepscope.data.scribbles import read_sparse_labels
from deepscope.errors import DeepscopeError
from deepscope.serve import labels as labels_module
from deepscope.serve.app import LOOPBACK_NAMES, create_app, is_loopback, serve
from deepscope.serve.folder import ServedFolder
from deepscope.serve.http import visible_region
from deepscope.serve.project import PROJECT_FILE
from deepscope.tasks.pixel.classifier import PixelClassifier

BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # the default colours of classes 1 and 2
LEFT = {"points": [[32, 6], [32, 40]], "radius": 3, "label": 1}
RIGHT = {"points": [[32, 56], [32, 90]], "radius": 3, "label": 2}


def two_regions(rng: np.random.Generator, shape: tuple[int, ...] = (64, 96)) -> np.ndarray:
    """Dark noisy left half, bright noisy right half (uint8)."""
    image = rng.integers(20, 60, shape).astype(np.uint8)
    image[..., shape[-1] // 2 :] += 150
    return image


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    Image.fromarray(two_regions(rng)).save(root / "cells.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    tifffile.imwrite(root / "stack.tif", two_regions(rng, (5, 40, 50)).astype(np.uint16))
    tifffile.imwrite(root / "big.tif", np.zeros((520, 300), np.uint8))
    (tmp_path / "secret.png").write_bytes(b"outside")
    return root


@pytest.fixture
def client(folder: Path):
    with TestClient(create_app(folder)) as test_client:
        yield test_client


def post(client: TestClient, path: str, body: dict | None = None, **kwargs):
    return client.post(path, json=body or {}, **kwargs)


def settle(client: TestClient, image: str) -> dict:
    """The live status once the background prediction is done (bounded wait, so a hang fails the test)."""
    deadline = time.monotonic() + 60
    while (status := client.get(f"/api/status?image={image}").json())["busy"]:
        assert time.monotonic() < deadline, f"background prediction of {image} never finished: {status}"
        time.sleep(0.05)
    return status


def test_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text and page.headers["cache-control"] == "no-store"
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_image_list_shows_corrupt_file_with_its_error(client: TestClient) -> None:
    images = {entry["name"]: entry for entry in client.get("/api/images").json()}
    assert sorted(images) == ["big.tif", "broken.png", "cells.png", "stack.tif"]
    assert images["cells.png"] == {"name": "cells.png", "shape": [64, 96], "error": None}
    assert images["broken.png"]["shape"] is None and images["broken.png"]["error"]
    response = client.get("/api/info?image=broken.png")
    assert response.status_code == 400 and "broken.png" in response.json()["error"]


def test_info_of_2d_image_and_stack(client: TestClient) -> None:
    info = client.get("/api/info?image=cells.png").json()
    assert info["spatial"] == [64, 96] and info["channels"] == 1 and info["ndim"] == 2 and info["tile"] == 256
    assert info["levels"] == 1 and info["labels_version"] == 0 and info["model"] is None
    assert client.get("/api/info?image=big.tif").json()["levels"] == 3  # 520 -> 260 -> 130 fits one tile
    stack = client.get("/api/info?image=stack.tif").json()
    assert stack["ndim"] == 3 and stack["spatial"] == [5, 40, 50] and len(stack["contrast"]) == 1


def test_tiles_show_the_pixels_at_the_asked_contrast(client: TestClient, folder: Path) -> None:
    image = np.asarray(Image.open(folder / "cells.png"))
    response = client.get("/api/tile?image=cells.png&level=0&ty=0&tx=0&contrast=0,255")
    tile = rgba(response)
    assert tile.shape == (64, 96, 3) and np.array_equal(tile[..., 0], image)
    assert response.headers["cache-control"] != "no-store"  # tiles are cached by the browser, overlays not
    low = rgba(client.get("/api/tile?image=cells.png&level=0&ty=0&tx=0&contrast=0,60"))[..., 0]
    assert (low[:, 48:] == 255).all() and (low[:, :48] < 255).any()  # the bright half saturates
    coarse = rgba(client.get("/api/tile?image=big.tif&level=2&ty=0&tx=0"))
    assert coarse.shape == (130, 75, 3)
    stack = rgba(client.get("/api/tile?image=stack.tif&level=0&ty=0&tx=0&z=4&contrast=0,255"))
    assert stack.shape == (40, 50, 3)
    for bad in (
        "level=1&ty=0&tx=0",
        "level=0&ty=1&tx=0",
        "level=0&ty=0&tx=0&contrast=9,1",
        "level=0&ty=0&tx=0&contrast=0,1;0,1",
        "level=x&ty=0&tx=0",
        "level=0&ty=0",
    ):
        response = client.get(f"/api/tile?image=cells.png&{bad}")
        assert response.status_code == 400 and response.json()["error"], bad
    assert client.get("/api/tile?image=stack.tif&level=0&ty=0&tx=0&z=5").status_code == 400


def test_paths_outside_the_folder_are_refused(client: TestClient) -> None:
    for name in ("../secret.png", "/etc/passwd", "images/../../secret.png", ".deepscope/journal/cells.jsonl"):
        response = client.get("/api/info", params={"image": name})
        assert response.status_code == 403, name
        assert response.json()["error"] and "Traceback" not in response.text
    response = client.get("/api/tile", params={"image": "../secret.png", "level": 0, "ty": 0, "tx": 0})
    assert response.status_code == 403
    assert client.get("/api/info?image=nope.png").status_code == 404
    assert client.get("/api/info?image=labels").status_code == 404
    assert client.get("/api/info").status_code == 400
    assert client.get("/api/nothing").status_code == 404


def test_strokes_labels_predictions_undo_redo(client: TestClient, folder: Path) -> None:
    first = post(client, "/api/stroke?image=cells.png", {**LEFT, "visible": [0, 64, 0, 96]}).json()
    assert first["labels_version"] == 1 and first["model"] is None  # one class: nothing to fit yet
    assert first["bbox"] == [[29, 36], [3, 44]]
    assert yaml.safe_load((folder / PROJECT_FILE).read_text())["labelled"] == ["cells.png"]  # the project lists it
    labels = rgba(client.get("/api/overlay?kind=labels&image=cells.png&level=0&ty=0&tx=0&v=1"))
    assert labels.shape == (64, 96, 4) and tuple(labels[32, 20]) == (*BLUE, 255) and labels[10, 20, 3] == 0

    second = post(client, "/api/stroke?image=cells.png", {**RIGHT, "visible": [0, 64, 0, 96]}).json()
    assert second["labels_version"] == 2 and isinstance(second["model"], int)
    status = settle(client, "cells.png")
    assert status["model"] == second["model"] and status["predicted"] == 1.0 and status["labels_version"] == 2
    classes = rgba(client.get("/api/overlay?kind=classes&image=cells.png&level=0&ty=0&tx=0&v=2"))
    assert (classes[:, :40, :3] == BLUE).all(axis=-1).mean() > 0.95
    assert (classes[:, 56:, :3] == ORANGE).all(axis=-1).mean() > 0.95
    probs = rgba(client.get("/api/overlay?kind=probabilities&image=cells.png&level=0&ty=0&tx=0")).astype(int)
    assert probs[:, :, 3].min() >= 250  # every pixel predicted
    assert (np.abs(probs[:, :40, :3] - BLUE).sum(-1) < np.abs(probs[:, :40, :3] - ORANGE).sum(-1)).mean() > 0.95
    uncertainty = rgba(client.get("/api/overlay?kind=uncertainty&image=cells.png&level=0&ty=0&tx=0"))
    assert uncertainty[:, :40, 3].mean() < 128 and uncertainty[:, 56:, 3].mean() < 128

    undone = post(client, "/api/undo?image=cells.png").json()
    assert undone["labels_version"] == 3 and undone["bbox"] == [[29, 36], [53, 94]] and undone["model"] is None
    labels = rgba(client.get("/api/overlay?kind=labels&image=cells.png&level=0&ty=0&tx=0"))
    assert labels[32, 70, 3] == 0 and labels[32, 20, 3] == 255
    redone = post(client, "/api/redo?image=cells.png", {"visible": [0, 10, 0, 10]}).json()
    assert redone["labels_version"] == 4 and isinstance(redone["model"], int)
    assert post(client, "/api/redo?image=cells.png").json()["bbox"] is None  # nothing left to redo

    erased = post(client, "/api/stroke?image=cells.png", {"points": [[32, 20]], "radius": 2, "label": 0}).json()
    assert erased["labels_version"] == 5
    client.app.state.session.store.flush()
    saved = read_sparse_labels(folder / "labels" / "cells.tif")
    assert saved[32, 20] == 0 and saved[32, 10] == 1 and saved[32, 70] == 2 and saved[10, 10] == 0


def test_predict_and_stack_strokes(client: TestClient, folder: Path) -> None:
    assert post(client, "/api/predict?image=stack.tif&z=2").json() == {"labels_version": 0, "model": None}
    for stroke in ({"points": [[20, 5], [20, 20]], "label": 1}, {"points": [[20, 30], [20, 45]], "label": 2}):
        reply = post(client, "/api/stroke?image=stack.tif", {**stroke, "radius": 2, "z": 2}).json()
        assert len(reply["bbox"]) == 3 and reply["bbox"][0] == [2, 3]
    predicted = post(client, "/api/predict?image=stack.tif&z=3", {"visible": [0, 40, 0, 50]}).json()
    assert isinstance(predicted["model"], int) and predicted["labels_version"] == 2
    on_slice = rgba(client.get("/api/overlay?kind=labels&image=stack.tif&z=2&level=0&ty=0&tx=0"))
    assert tuple(on_slice[20, 10]) == (*BLUE, 255)
    assert rgba(client.get("/api/overlay?kind=labels&image=stack.tif&z=3&level=0&ty=0&tx=0"))[..., 3].max() == 0
    classes = rgba(client.get("/api/overlay?kind=classes&image=stack.tif&z=3&level=0&ty=0&tx=0"))
    assert tuple(classes[10, 5, :3]) == BLUE and tuple(classes[10, 45, :3]) == ORANGE
    response = post(client, "/api/predict?image=cells.png", {"visible": [100, 200, 0, 5]})
    assert response.status_code == 400 and "visible" in response.json()["error"]
    for level in (1, "x", -1):  # cells.png has a single pyramid level
        response = post(client, "/api/predict?image=cells.png", {"visible": [0, 64, 0, 96], "level": level})
        assert response.status_code == 400 and "level" in response.json()["error"], level
    # a zoomed-out view predicts first only the pixels its overlay tiles show
    big = ServedFolder(folder).open("big.tif")
    assert visible_region([0, 520, -5, 300], big, 2) == (slice(0, 520, 4), slice(0, 300, 4))
    assert visible_region([0, 520, 0, 300], big) == (slice(0, 520, 1), slice(0, 300, 1))
    assert client.get("/api/overlay?kind=edges&image=cells.png&level=0&ty=0&tx=0").status_code == 400


def test_bad_strokes_are_400_with_a_message(client: TestClient) -> None:
    cases = [
        ({**LEFT, "label": 7}, "not a class"),
        ({"radius": 3, "label": 1}, "points"),
        ({**LEFT, "points": [[500, 500]]}, "beyond"),
        ({**LEFT, "radius": "big"}, "radius"),
    ]
    for body, words in cases:
        response = post(client, "/api/stroke?image=cells.png", body)
        assert response.status_code == 400 and words in response.json()["error"], body
    response = client.post(
        "/api/stroke?image=cells.png", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]
    response = client.post("/api/stroke?image=cells.png", json=[1, 2])
    assert response.status_code == 400
    assert client.get("/api/info?image=cells.png").json()["labels_version"] == 0  # nothing was applied


def test_a_label_file_that_cannot_be_written_is_reported_and_written_later(
    client: TestClient, folder: Path, full_disk
) -> None:
    assert post(client, "/api/stroke?image=cells.png", LEFT).status_code == 200
    client.app.state.session.store.flush()
    old = (folder / "labels" / "cells.tif").read_bytes()
    disk = full_disk("cells.tif")
    assert post(client, "/api/stroke?image=cells.png", RIGHT).status_code == 200  # acknowledged: it is journalled
    with pytest.raises(DeepscopeError):
        client.app.state.session.store.flush()
    error = client.get("/api/status?image=cells.png").json()["labels_error"]
    assert (
        error
        == "labels/cells.tif: could not write label file (No space left on device); the previous label file is intact"
    )
    assert (folder / "labels" / "cells.tif").read_bytes() == old

    disk.space_back()
    assert post(client, "/api/undo?image=cells.png").json()["bbox"] is not None
    assert post(client, "/api/redo?image=cells.png").status_code == 200
    client.app.state.session.store.flush()
    assert client.get("/api/status?image=cells.png").json()["labels_error"] is None
    assert set(np.unique(read_sparse_labels(folder / "labels" / "cells.tif"))) == {0, 1, 2}


def test_a_stroke_that_cannot_be_journalled_is_a_507(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    assert post(client, "/api/stroke?image=cells.png", LEFT).status_code == 200
    client.app.state.session.store.flush()
    monkeypatch.setattr(labels_module.os, "fsync", full)  # the journal's: the disk filled up
    response = post(client, "/api/stroke?image=cells.png", RIGHT)
    assert response.status_code == 507 and "could not record the change, so it was not made" in response.json()["error"]
    monkeypatch.undo()
    assert client.get("/api/info?image=cells.png").json()["labels_version"] == 1
    assert post(client, "/api/stroke?image=cells.png", RIGHT).json()["labels_version"] == 2


def test_a_stroke_whose_project_cannot_be_saved_is_refused_whole(client: TestClient, full_disk) -> None:
    disk = full_disk("deepscope-project.yaml")  # the first stroke of an image records it in the project
    response = post(client, "/api/stroke?image=cells.png", LEFT)
    assert (
        response.status_code == 507
        and "could not write project file (No space left on device)" in response.json()["error"]
    )
    assert client.get("/api/info?image=cells.png").json()["labels_version"] == 0  # refused whole: not painted either
    disk.space_back()
    assert post(client, "/api/stroke?image=cells.png", LEFT).json()["labels_version"] == 1


def test_project_classes_features_and_classifier(client: TestClient, folder: Path) -> None:
    project = client.get("/api/project").json()
    assert [c["value"] for c in project["classes"]] == [1, 2] and "gaussian" in project["filters"]
    classes = [
        {**project["classes"][0], "name": "cytoplasm"},
        {**project["classes"][1], "colour": "#00ff00"},
        {"value": 3, "name": "nucleus", "colour": "#ff0000"},
    ]
    updated = client.put("/api/project", json={"classes": classes}).json()
    assert [(c["value"], c["name"], c["colour"]) for c in updated["classes"]] == [
        (1, "cytoplasm", "#1f77b4"),
        (2, "foreground", "#00ff00"),
        (3, "nucleus", "#ff0000"),
    ]
    assert "nucleus" in (folder / PROJECT_FILE).read_text()
    for body, words in (
        ({"classes": classes[:2]}, "cannot be removed"),
        ({"classes": [{**classes[0], "colour": "red"}, *classes[1:]]}, "colour"),
        ({"features": {"sharpen": [1.0]}}, "sharpen"),
        ({"colour": 1}, "unknown"),
    ):
        response = client.put("/api/project", json=body)
        assert response.status_code == 400 and words in response.json()["error"], body

    assert post(client, "/api/classifier/save").status_code == 400  # nothing fitted yet
    post(client, "/api/stroke?image=cells.png", LEFT)
    post(client, "/api/stroke?image=cells.png", RIGHT)
    features = client.put("/api/project", json={"features": {"gaussian": [1.0], "log": [1.0, 2.0]}}).json()["features"]
    assert features == {"gaussian": [1.0], "log": [1.0, 2.0]}
    assert isinstance(post(client, "/api/predict?image=cells.png").json()["model"], int)  # refitted on 3 features
    saved = post(client, "/api/classifier/save").json()
    classifier = PixelClassifier.load(saved["path"])
    assert classifier.classes == [1, 2] and classifier.spec.count == 3 and Path(saved["path"]).parent == folder
    assert client.get("/api/project").json()["classifier"] == Path(saved["path"]).name

    # pixel predict takes the project (its folder or its file) for its saved classifier
    for given in (folder, folder / PROJECT_FILE, Path(saved["path"])):
        out = folder.parent / f"out-{given.name}"
        assert main(["pixel", "predict", str(given), str(folder / "cells.png"), "--out", str(out)]) == 0
    by_file, by_project = (
        tifffile.imread(folder.parent / f"out-{n}" / "cells_classes.tif")
        for n in ("pixel-classifier.safetensors", "data")
    )
    np.testing.assert_array_equal(by_project, by_file)
    assert (by_file[:, :40] == 1).mean() > 0.9 and (by_file[:, 56:] == 2).mean() > 0.9


def test_pixel_predict_refuses_a_project_without_classifier(folder: Path, capsys) -> None:
    (folder / PROJECT_FILE).write_text("classes: [{value: 1, name: a, colour: '#000000'}]\n")
    assert main(["pixel", "predict", str(folder), str(folder / "cells.png"), "--out", str(folder / "out")]) != 0
    assert "no classifier saved yet" in capsys.readouterr().err


def test_token_is_required_when_set(folder: Path) -> None:
    with TestClient(create_app(folder, token="s3cret")) as client:
        for path in ("/", "/api/images", "/static/app.js"):
            assert client.get(path).status_code == 401
        assert client.get("/api/images", params={"token": "wrong"}).status_code == 401
        assert client.get("/api/images", headers={"X-Deepscope-Token": "s3cret"}).status_code == 200
        page = client.get("/?token=s3cret")
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        assert client.get("/api/images").status_code == 200  # the cookie the page set


def test_changes_under_a_token_need_the_page_origin_and_any_token_is_compared_safely(folder: Path) -> None:
    with TestClient(create_app(folder, token="s3cret"), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/?token=s3cret").status_code == 200  # the page sets the cookie
        page = {"Origin": "http://127.0.0.1:8000"}
        # with the cookie alone (a browser), a change must come from the page: another local site's page is refused
        assert post(client, "/api/undo?image=cells.png").status_code == 403
        assert post(client, "/api/undo?image=cells.png", headers={"Origin": "http://127.0.0.1:9999"}).status_code == 403
        assert post(client, "/api/undo?image=cells.png", headers={"Origin": "null"}).status_code == 403
        assert post(client, "/api/undo?image=cells.png", headers=page).status_code == 200
        assert (
            post(client, "/api/undo?image=cells.png", headers={"Referer": "http://127.0.0.1:8000/?x"}).status_code
            == 200
        )
        assert post(client, "/api/undo?image=cells.png", headers={"Referer": "http://evil.example/"}).status_code == 403
        assert client.get("/api/info?image=cells.png").status_code == 200  # reading needs no Origin
        client.cookies.clear()
        # a script given the token may leave Origin out, but not send a foreign one
        script = {"X-Deepscope-Token": "s3cret"}
        assert post(client, "/api/undo?image=cells.png", headers=script).status_code == 200
        assert (
            post(client, "/api/undo?image=cells.png", headers={**script, "Origin": "http://evil.example"}).status_code
            == 403
        )
        # tokens of any characters are refused in constant time, not with a 500
        for bad in ("sécret", "s3cret\u2028", "\U0001f512"):
            assert client.get("/api/images", params={"token": bad}).status_code == 401
            assert client.get("/api/images", headers={"X-Deepscope-Token": bad.encode()}).status_code == 401
            assert client.get("/api/images", headers={"Cookie": f"deepscope_token={bad}".encode()}).status_code == 401


def test_serve_requires_a_token_off_the_loopback(folder: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(DeepscopeError, match="token is required"):
        serve(folder, host="0.0.0.0", open_token=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DeepscopeError, match="cannot listen"):
            serve(folder, port=taken.getsockname()[1])


def test_host_origin_content_type_and_size_guards(folder: Path) -> None:
    app = create_app(folder, max_body=2000, hosts=LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/images").status_code == 200
        assert client.get("/api/images", headers={"Host": "evil.example:8000"}).status_code == 403  # DNS rebinding
        response = post(client, "/api/stroke?image=cells.png", LEFT, headers={"Origin": "http://evil.example"})
        assert response.status_code == 403
        response = client.post("/api/undo?image=cells.png", content=b"{}", headers={"Content-Type": "text/plain"})
        assert response.status_code == 415  # a cross-site form could send this without a preflight
        big = {**LEFT, "points": [[32, 6]] * 400}
        response = post(client, "/api/stroke?image=cells.png", big)
        assert response.status_code == 413
        assert client.get("/api/info?image=cells.png").json()["labels_version"] == 0


def test_cli_serve_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.folder, args.port, args.host) == (".", 8000, "127.0.0.1")
    args = build_parser().parse_args(["serve", "data", "--port", "9000", "--host", "0.0.0.0"])
    assert (args.folder, args.port, args.host) == ("data", 9000, "0.0.0.0")
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
