"""Instance proofreading of `deepscope serve`: delete, merge and split with known answers, undo and redo, the saved
mask (dtype, atomic replacement, reloading), 3D stacks, the HTTP routes with bad inputs, and one browser session.

The editor takes the instances of a fake model service (``instances(name, z)`` returning known ids), so nothing
here needs a trained model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.draw import disk

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2 for its test client; httpx works the same here
    warnings.filterwarnings("ignore", "Using `httpx`")
    from starlette.testclient import TestClient

from conftest import rgba
from deepscope.errors import DataError, DeepscopeError
from deepscope.serve import proofread
from deepscope.serve.app import LOOPBACK_NAMES, background_server, create_app
from deepscope.serve.folder import ServedFolder
from deepscope.serve.proofread import InstanceEditor
from deepscope.serve.tiles import OUTLINE_COLOUR, SELECTED_FILL, rgb

try:  # the Selenium helpers of the labelling page's browser test; without selenium only the browser test skips
    from test_serve_browser import (  # noqa: F401 (a fixture)
        CHROMEDRIVER,
        CHROMIUM,
        READY,
        browser,
        paint,
        pixels,
        wait,
    )
except pytest.skip.Exception:
    CHROMIUM = CHROMEDRIVER = None

SHAPE = (48, 64)
LEFT, RIGHT = (32, 12), (32, 44)  # disc centres of the dumbbell, object 3


def known_instances() -> np.ndarray:
    """Object 1 and 2: squares; object 3: a dumbbell (two discs of radius 6 joined by a bar three pixels thick)."""
    ids = np.zeros(SHAPE, np.int32)
    ids[4:14, 4:14] = 1
    ids[4:14, 20:30] = 2
    for centre in (LEFT, RIGHT):
        ids[disk(centre, 6, shape=SHAPE)] = 3
    ids[31:34, LEFT[1] : RIGHT[1]] = 3
    return ids


class FakeModels:
    """Stands in for ModelService: ``instances`` answers the known ids of (name, z), None for anything else."""

    def __init__(self, answers: dict[tuple[str, int | None], np.ndarray]) -> None:
        self.answers = answers

    def instances(self, name: str, z: int | None = None) -> np.ndarray | None:
        return self.answers.get((name, z))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    tifffile.imwrite(root / "cells.tif", np.zeros(SHAPE, np.uint8))
    tifffile.imwrite(root / "stack.tif", np.zeros((3, *SHAPE), np.uint8), photometric="minisblack")
    (tmp_path / "secret.png").write_bytes(b"outside")
    return root


@pytest.fixture
def editor(folder: Path) -> Iterator[InstanceEditor]:
    service = InstanceEditor(ServedFolder(folder), FakeModels({("cells.tif", None): known_instances()}))
    try:
        yield service
    finally:
        service.close()


def loaded(editor: InstanceEditor) -> dict:
    reply = editor.load("cells.tif", None, "model")
    assert reply["objects"] == 3 and np.array_equal(editor.instances("cells.tif"), known_instances())
    return reply


def count(ids: np.ndarray) -> int:
    return len(np.unique(ids[ids > 0]))


def test_delete_zeroes_exactly_that_object(editor: InstanceEditor) -> None:
    version = loaded(editor)["version"]
    reply = editor.delete("cells.tif", None, [8, 8])
    expected = known_instances()
    expected[expected == 1] = 0
    assert np.array_equal(editor.instances("cells.tif"), expected)
    assert reply["box"] == [[4, 14], [4, 14]] and reply["ids"] == [1] and reply["objects"] == 2
    assert reply["version"] > version and reply["dirty"]


def test_merge_gives_the_union_under_the_smaller_id(editor: InstanceEditor) -> None:
    loaded(editor)
    reply = editor.merge("cells.tif", None, [8, 25], [8, 8])
    expected = known_instances()
    expected[expected == 2] = 1
    assert np.array_equal(editor.instances("cells.tif"), expected)
    assert reply["box"] == [[4, 14], [4, 30]] and reply["objects"] == 2
    with pytest.raises(DeepscopeError, match="both points are on object 1"):
        editor.merge("cells.tif", None, [5, 5], [8, 25])


def test_split_cuts_the_dumbbell_across_its_bar(editor: InstanceEditor) -> None:
    loaded(editor)
    reply = editor.split("cells.tif", None, [[27, 22], [37, 22]], 1)  # off centre: the right part is larger
    after, before = editor.instances("cells.tif"), known_instances()
    assert np.array_equal(after[before != 3], before[before != 3])  # nothing else changed
    assert np.array_equal(after > 0, before > 0)  # the stroke's pixels of the object joined a part
    assert set(np.unique(after[before == 3])) == {3, 4}
    assert after[RIGHT] == 3 and after[LEFT] == 4  # the larger part keeps the id; the new one is max + 1
    assert (after[disk(LEFT, 6, shape=SHAPE)] == 4).all() and (after[disk(RIGHT, 6, shape=SHAPE)] == 3).all()
    assert reply["ids"] == [3, 4] and reply["objects"] == 4
    assert editor.status("cells.tif", None, [32, 12])["at"] == 4


def test_a_stroke_that_does_not_cut_is_refused_and_changes_nothing(editor: InstanceEditor) -> None:
    version = loaded(editor)["version"]
    with pytest.raises(DeepscopeError, match="does not cut object 3 in two"):
        editor.split("cells.tif", None, [[30, 10], [34, 14]], 1)  # inside the left disc only
    with pytest.raises(DeepscopeError, match="crosses no object"):
        editor.split("cells.tif", None, [[44, 2], [44, 60]], 1)
    assert np.array_equal(editor.instances("cells.tif"), known_instances())
    status = editor.status("cells.tif")
    assert status["version"] == version and status["undo"] == 1


def test_undo_and_redo_are_bit_exact(editor: InstanceEditor) -> None:
    loaded(editor)
    states = [editor.instances("cells.tif")]
    for edit in (
        lambda: editor.split("cells.tif", None, [[27, 28], [37, 28]], 1.5),
        lambda: editor.merge("cells.tif", None, [8, 8], [8, 25]),
        lambda: editor.delete("cells.tif", None, list(LEFT)),
    ):
        reply = edit()
        states.append(editor.instances("cells.tif"))
        assert reply["objects"] == count(states[-1])
    for expected in reversed(states[:-1]):
        reply = editor.undo("cells.tif")
        assert np.array_equal(editor.instances("cells.tif"), expected) and reply["objects"] == count(expected)
    for expected in states[1:]:
        reply = editor.redo("cells.tif")
        assert np.array_equal(editor.instances("cells.tif"), expected) and reply["objects"] == count(expected)
    assert editor.redo("cells.tif")["box"] is None
    for _ in range(3):
        editor.undo("cells.tif")
    editor.delete("cells.tif", None, list(RIGHT))  # the boxes kept through undo find the whole dumbbell again
    expected = states[0].copy()
    expected[expected == 3] = 0
    assert np.array_equal(editor.instances("cells.tif"), expected)
    assert editor.status("cells.tif")["redo"] == 0  # a new edit drops what was undone
    editor.undo("cells.tif")
    editor.undo("cells.tif")  # the load from the model is a step too
    assert not editor.instances("cells.tif").any()


def test_saved_mask_equals_the_live_one_in_the_smallest_dtype(editor: InstanceEditor, folder: Path) -> None:
    loaded(editor)
    editor.delete("cells.tif", None, [8, 8])
    editor.flush()
    saved = tifffile.imread(folder / "masks" / "cells.tif")
    assert saved.dtype == np.uint16 and np.array_equal(saved, editor.instances("cells.tif"))
    status = editor.status("cells.tif")
    assert not status["dirty"] and status["exists"] and status["saved"] == "masks/cells.tif"

    large = known_instances()
    large[large == 2] = 70000
    editor.models = FakeModels({("cells.tif", None): large})
    editor.load("cells.tif", None, "model")
    editor.flush()
    saved = tifffile.imread(folder / "masks" / "cells.tif")
    assert saved.dtype == np.uint32 and np.array_equal(saved, large)
    assert not list((folder / "masks").glob(".*"))  # no temporary file left


def test_a_failed_write_leaves_the_old_file_intact(
    editor: InstanceEditor, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded(editor)
    editor.flush()
    path = folder / "masks" / "cells.tif"
    old = path.read_bytes()

    def failing(handle, *args, **kwargs) -> None:
        handle.write(old[: len(old) // 2])  # half a file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(proofread.tifffile, "imwrite", failing)
    editor.delete("cells.tif", None, [8, 8])
    with pytest.raises(DeepscopeError, match="No space left"):
        editor.flush()
    assert path.read_bytes() == old and not list(path.parent.glob(".*"))
    status = editor.status("cells.tif")
    assert status["dirty"] and "No space left" in status["error"]

    monkeypatch.undo()
    editor.flush()  # tries the failed write again
    assert np.array_equal(tifffile.imread(path), editor.instances("cells.tif"))
    assert editor.status("cells.tif")["error"] is None


def test_reopening_loads_the_saved_mask_and_checks_its_shape(folder: Path) -> None:
    with closing(InstanceEditor(ServedFolder(folder), FakeModels({("cells.tif", None): known_instances()}))) as first:
        loaded(first)
        first.merge("cells.tif", None, [8, 8], [8, 25])
    expected = known_instances()
    expected[expected == 2] = 1
    with closing(InstanceEditor(ServedFolder(folder), FakeModels({}))) as second:  # no model: the file is read
        status = second.status("cells.tif")
        assert status["loaded"] and status["objects"] == 2 and not status["dirty"]
        assert np.array_equal(second.instances("cells.tif"), expected)
        assert second.load("cells.tif", None, "saved")["objects"] == 2

    tifffile.imwrite(folder / "masks" / "cells.tif", np.zeros((10, 10), np.uint16))
    with (
        closing(InstanceEditor(ServedFolder(folder), FakeModels({}))) as third,
        pytest.raises(DataError, match=r"masks/cells\.tif: mask of shape \(10, 10\) does not match .*cells\.tif"),
    ):
        third.status("cells.tif")


def test_stack_edits_change_only_their_slice(folder: Path) -> None:
    volume = np.stack([known_instances()] * 3).astype(np.uint16)
    (folder / "masks").mkdir()
    tifffile.imwrite(folder / "masks" / "stack.tif", volume, photometric="minisblack")
    with closing(InstanceEditor(ServedFolder(folder), FakeModels({}))) as editor:
        reply = editor.delete("stack.tif", 1, [8, 8])
        assert reply["box"] == [[1, 2], [4, 14], [4, 14]] and reply["z"] == 1
        reply = editor.split("stack.tif", 1, [[27, 22], [37, 22]], 1)
        assert reply["ids"] == [3, 4]
        editor.flush()
        saved = tifffile.imread(folder / "masks" / "stack.tif")
        assert saved.shape == volume.shape
        assert np.array_equal(saved[[0, 2]], volume[[0, 2]])
        assert np.array_equal(saved[1], editor.instances("stack.tif", 1))
        assert not (saved[1] == 1).any() and saved[1][LEFT] == 4
        assert editor.status("stack.tif", 0)["objects"] == 3 and editor.status("stack.tif", 1)["objects"] == 3
        editor.undo("stack.tif", 0)  # slice 0 has no history of its own
        assert np.array_equal(editor.instances("stack.tif", 0), volume[0])


# --- the HTTP routes ---------------------------------------------------------------------------------------------


def save_known(folder: Path) -> None:
    (folder / "masks").mkdir()
    tifffile.imwrite(folder / "masks" / "cells.tif", known_instances().astype(np.uint16))


@pytest.fixture
def client(folder: Path) -> Iterator[TestClient]:
    save_known(folder)
    with TestClient(create_app(folder)) as test_client:
        yield test_client


def test_routes_edit_draw_and_survive_a_restart(folder: Path) -> None:
    save_known(folder)
    with TestClient(create_app(folder)) as client:
        edit_through_routes(client)
    expected = known_instances()  # shutting the app down wrote the mask
    expected[expected == 3] = 1
    assert np.array_equal(tifffile.imread(folder / "masks" / "cells.tif"), expected)
    with TestClient(create_app(folder)) as again:
        status = again.get("/api/instances/status?image=cells.tif").json()
        assert status["objects"] == 2 and not status["dirty"]
        assert again.get("/api/instances/status?image=cells.tif&y=32&x=44").json()["at"] == 1


def edit_through_routes(client: TestClient) -> None:
    """Delete object 1, draw the outlines, split and undo, load the model's instances and merge 1 and 3."""
    status = client.get("/api/instances/status?image=cells.tif").json()
    assert status["loaded"] and status["objects"] == 3 and status["saved"] == "masks/cells.tif"
    assert client.get("/api/instances/status?image=cells.tif&y=8&x=25").json()["at"] == 2

    reply = client.post("/api/instances/delete?image=cells.tif", json={"point": [8, 8]}).json()
    assert reply["objects"] == 2 and reply["box"] == [[4, 14], [4, 14]]
    tile = rgba(client.get(f"/api/instances/overlay?image=cells.tif&level=0&ty=0&tx=0&v={reply['version']}"))
    assert tile.shape == (*SHAPE, 4)
    assert list(tile[4, 25]) == [*rgb(OUTLINE_COLOUR), 255] and tile[9, 25, 3] == 0  # object 2: its border only
    assert tile[4, 8, 3] == 0  # object 1 is gone
    selected = rgba(client.get("/api/instances/overlay?image=cells.tif&level=0&ty=0&tx=0&selected=2"))
    assert list(selected[9, 25]) == [*rgb(SELECTED_FILL[0]), SELECTED_FILL[1]] and selected[32, 12, 3] == 0

    reply = client.post(
        "/api/instances/split?image=cells.tif", json={"points": [[27, 22], [37, 22]], "radius": 1}
    ).json()
    assert reply["ids"] == [3, 4] and reply["objects"] == 3
    assert client.post("/api/instances/undo?image=cells.tif", json={}).json()["objects"] == 2
    client.app.state.session.instances.models = FakeModels({("cells.tif", None): known_instances()})
    assert client.post("/api/instances/load?image=cells.tif", json={"source": "model"}).json()["objects"] == 3
    assert (
        client.post("/api/instances/merge?image=cells.tif", json={"points": [[8, 8], [32, 44]]}).json()["objects"] == 2
    )


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "fragment"),
    [
        ("post", "delete?image=cells.tif", {"point": [100, 5]}, 400, "outside the 48x64 image"),
        ("post", "delete?image=cells.tif", {"point": [0, 0]}, 400, "is background"),
        ("post", "delete?image=cells.tif", {}, 400, "expected [y, x] pixel indices"),
        ("post", "delete?image=cells.tif", {"point": [1.5, 2]}, 400, "expected an integer"),
        ("post", "merge?image=cells.tif", {"points": [[8, 8]]}, 400, "list of 2 [y, x] points"),
        ("post", "merge?image=cells.tif", {"points": [[8, 8], [9, 9]]}, 400, "both points are on object 1"),
        ("post", "split?image=cells.tif", {"points": "across", "radius": 1}, 400, "'points' must be a list"),
        ("post", "split?image=cells.tif", {"points": [[27, 22], [37, 22]]}, 400, "radius must be a finite number"),
        (
            "post",
            "split?image=cells.tif",
            {"points": [[27, 22], ["a", 22]], "radius": 1},
            400,
            "pairs of finite numbers",
        ),
        ("post", "load?image=cells.tif", {"source": "disk"}, 400, "source must be one of model, saved"),
        ("post", "load?image=cells.tif", {"source": "model"}, 400, "no instances predicted yet"),
        ("post", "delete?image=cells.tif&z=2", {"point": [8, 8]}, 400, "2D image"),
        ("post", "delete?image=stack.tif", {"point": [8, 8]}, 400, "no instances loaded"),
        ("post", "delete?image=../secret.png", {"point": [8, 8]}, 403, "'..' is not allowed"),
        ("post", "undo?image=.deepscope/x.tif", {}, 403, "state folder"),
        ("post", "delete?image=nope.tif", {"point": [8, 8]}, 404, "not an image of the served folder"),
        ("post", "delete", {"point": [8, 8]}, 400, "'image' is missing"),
        ("get", "status?image=cells.tif&y=3", None, 400, "'x' is missing"),
        ("get", "status?image=/etc/passwd", None, 403, "absolute paths"),
        ("get", "overlay?image=cells.tif&level=5&ty=0&tx=0", None, 400, "level 5 is out of range"),
        ("get", "overlay?image=cells.tif&level=0&ty=0&tx=0&selected=x", None, 400, "selected: expected an integer"),
        ("get", "overlay?image=stack.tif&z=1&level=0&ty=0&tx=0", None, 400, "no instances loaded"),
    ],
)
def test_bad_requests_get_one_line_errors(
    client: TestClient, method: str, path: str, body: dict | None, code: int, fragment: str
) -> None:
    client.app.state.session.instances.models = FakeModels({})
    version = client.get("/api/instances/status?image=cells.tif").json()["version"]
    response = (
        client.post(f"/api/instances/{path}", json=body) if method == "post" else client.get(f"/api/instances/{path}")
    )
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert fragment in error and "\n" not in error
    assert client.get("/api/instances/status?image=cells.tif").json()["version"] == version  # nothing changed


def test_a_mask_of_another_shape_is_a_400_naming_both_files(client: TestClient, folder: Path) -> None:
    tifffile.imwrite(folder / "masks" / "stack.tif", np.zeros(SHAPE, np.uint16))
    response = client.get("/api/instances/status?image=stack.tif&z=1")
    assert response.status_code == 400
    assert "masks/stack.tif: mask of shape (48, 64) does not match" in response.json()["error"]
    assert str(folder / "stack.tif") in response.json()["error"]


# --- the page ----------------------------------------------------------------------------------------------------


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[str, InstanceEditor, Path]]:
    """The app on a free loopback port, in a thread, serving cells.png (120 x 180) with a saved mask of 3 squares."""
    folder = tmp_path / "page"
    folder.mkdir()
    image = np.full((120, 180), 40, np.uint8)
    ids = np.zeros((120, 180), np.uint16)
    for number, (y, x) in enumerate([(20, 20), (20, 100), (70, 60)], 1):
        ids[y : y + 30, x : x + 40] = number
        image[y : y + 30, x : x + 40] = 200
    Image.fromarray(image).save(folder / "cells.png")
    (folder / "masks").mkdir()
    tifffile.imwrite(folder / "masks" / "cells.tif", ids)
    app = create_app(folder, hosts=LOOPBACK_NAMES)
    with background_server(app) as url:
        yield url, app.state.session.instances, folder


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="selenium, Chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)",
)
def test_page_deletes_an_object_of_the_saved_mask(page_server: tuple[str, InstanceEditor, Path], browser) -> None:
    url, editor, folder = page_server
    browser.get(url)
    version = "document.body.dataset.instancesVersion"
    wait(browser, "document.body.dataset.image === 'cells.png'", f"{version} !== ''", READY)
    first = browser.execute_script(f"return {version}")
    browser.find_element("id", "instances-load-saved").click()
    wait(browser, f"{version} !== '{first}'", READY)
    loaded_version = browser.execute_script(f"return {version}")
    border, inside = (20.5, 40.5), (35.5, 40.5)  # object 1: a pixel of its outline and one of its interior
    assert pixels(browser, "instances", [border])[0, 3] > 0 and pixels(browser, "instances", [inside])[0, 3] == 0

    browser.find_element("css selector", "input[value=instance-delete]").click()
    paint(browser, [inside])  # a click: pointer down and up at one point
    wait(browser, f"{version} !== '{loaded_version}'", READY)
    assert pixels(browser, "instances", [border])[0, 3] == 0
    assert "2 objects" in browser.find_element("id", "instances-status").text
    editor.flush()
    saved = tifffile.imread(folder / "masks" / "cells.tif")
    assert not (saved == 1).any() and (saved == 2).sum() == (saved == 3).sum() == 30 * 40
    assert browser.execute_script("return document.body.dataset.error") is None
