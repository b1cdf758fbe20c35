"""Labels painted in `deepscope serve`: stroke rasterisation, undo/redo, saved label files and crash safety."""

from __future__ import annotations

import errno
import itertools
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepscope.atomic import WriteError
from deepscope.data.scribbles import read_sparse_labels
from deepscope.errors import DataError, DeepscopeError
from deepscope.serve import labels as labels_module
from deepscope.serve.folder import ServedFolder
from deepscope.serve.labels import LabelStore, Stroke


def folder_with(tmp_path: Path, shape: tuple[int, ...] = (64, 64), name: str = "cells.tif") -> ServedFolder:
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / name, rng.integers(0, 255, shape, dtype=np.uint8), photometric="minisblack")
    return ServedFolder(tmp_path)


@pytest.fixture
def store(tmp_path: Path):
    store = LabelStore(folder_with(tmp_path))
    yield store
    store.close()


def test_a_point_is_a_disk_of_known_area() -> None:
    # pixel centres strictly within 4 of the centre: 7 + 2*7 + 2*7 + 2*5 = 45 (a 9x9 square would be 81)
    box, mask = Stroke([(20.0, 20.0)], 4.0, 1).raster((64, 64))
    assert box == (slice(16, 25), slice(16, 25))
    assert mask.sum() == 45 and mask[4].sum() == 7 and mask[1].sum() == 5 and not mask[0].any()
    assert Stroke([(3.0, 7.0)], 0.5, 1).raster((64, 64))[1].sum() == 1


def test_a_horizontal_segment_covers_the_rows_within_the_radius() -> None:
    box, mask = Stroke([(10.0, 5.0), (10.0, 30.0)], 2.5, 2).raster((64, 64))
    full = np.zeros((64, 64), bool)
    full[box] = mask
    rows = np.flatnonzero(full[:, 5:31].any(axis=1))
    assert rows.tolist() == [8, 9, 10, 11, 12]
    assert full[8:13, 5:31].all()
    # the band (5 rows x 26 columns) plus two round caps of 5 + 3 pixels each
    assert full.sum() == 5 * 26 + 2 * 8


def test_strokes_near_the_border_are_clipped_to_the_image() -> None:
    box, mask = Stroke([(-2.0, 62.0)], 3.0, 1).raster((64, 64))
    assert box == (slice(0, 2), slice(59, 64)) and mask.shape == (2, 5)


def test_apply_paints_and_erases(store: LabelStore) -> None:
    box = store.apply("cells.tif", Stroke([(20.0, 20.0)], 4.0, 2))
    labels = store.labels("cells.tif")
    assert box == (slice(16, 25), slice(16, 25))
    assert (labels == 2).sum() == 45 and labels.sum() == 90
    store.apply("cells.tif", Stroke([(20.0, 20.0)], 2.0, 0))  # erase the 9 central pixels
    assert (labels == 2).sum() == 36 and labels[20, 20] == 0


def test_undo_redo_round_trips(store: LabelStore) -> None:
    name = "cells.tif"
    assert store.undo(name) is None and store.redo(name) is None
    states, versions = [store.labels(name).copy()], [store.version(name)]
    for stroke in (Stroke([(10.0, 10.0), (10.0, 40.0)], 3.0, 1), Stroke([(5.0, 20.0), (30.0, 20.0)], 2.0, 2)):
        store.apply(name, stroke)
        states.append(store.labels(name).copy())
        versions.append(store.version(name))
    assert versions[0] < versions[1] < versions[2]
    assert store.undo(name) == (slice(3, 33), slice(18, 23))
    assert np.array_equal(store.labels(name), states[1])
    store.undo(name)
    assert np.array_equal(store.labels(name), states[0]) and store.undo(name) is None
    assert store.redo(name) == (slice(7, 14), slice(7, 44))
    assert np.array_equal(store.labels(name), states[1])
    store.redo(name)
    assert np.array_equal(store.labels(name), states[2]) and store.redo(name) is None
    assert store.version(name) == versions[2] + 4  # two undos and two redos are changes too
    store.undo(name)
    assert store.classes(name).tolist() == [1]  # class 2 undone: the counts follow every change
    store.apply(name, Stroke([(50.0, 50.0)], 1.0, 1))  # a new stroke drops what could be redone
    assert store.redo(name) is None
    store.apply(name, Stroke([(10.0, 0.0), (10.0, 63.0)], 8.0, 0))  # erase the first stroke, not the dot
    assert store.classes(name).tolist() == [1] and store.labels(name)[50, 50] == 1 and not store.labels(name)[:20].any()
    store.apply(name, Stroke([(50.0, 50.0)], 2.0, 0))
    assert store.classes(name).tolist() == [] and not store.labels(name).any()


def test_history_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labels_module, "HISTORY", 5)
    store = LabelStore(folder_with(tmp_path))
    for i in range(8):
        store.apply("cells.tif", Stroke([(5.0, 5.0 + 5 * i)], 0.5, 1))
    assert all(store.undo("cells.tif") is not None for _ in range(5))
    assert store.undo("cells.tif") is None
    assert np.flatnonzero(store.labels("cells.tif")[5]).tolist() == [5, 10, 15]
    store.close()


def test_saved_file_is_what_pixel_train_reads(tmp_path: Path) -> None:
    folder = folder_with(tmp_path)
    store = LabelStore(folder)
    store.apply("cells.tif", Stroke([(10.0, 10.0), (40.0, 50.0)], 3.0, 1))
    store.apply("cells.tif", Stroke([(50.0, 5.0)], 2.0, 3))
    store.flush()
    path = folder.labels_path("cells.tif")
    assert path == tmp_path / "labels" / "cells.tif"
    assert np.array_equal(read_sparse_labels(path), store.labels("cells.tif"))
    assert (tmp_path / ".deepscope" / "journal" / "cells.jsonl").stat().st_size == 0  # caught up: emptied
    store.apply("cells.tif", Stroke([(30.0, 30.0)], 60.0, 0))  # erase everything: no empty label file is left
    store.flush()
    assert not path.exists() and list((tmp_path / "labels").iterdir()) == []
    store.close()


def test_a_reopened_store_replays_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path, labels: np.ndarray, seq: int) -> None:
        raise OSError("disk full")

    folder = folder_with(tmp_path)
    first = LabelStore(folder)
    first.apply("cells.tif", Stroke([(10.0, 10.0)], 3.0, 1))
    first.flush()
    monkeypatch.setattr(LabelStore, "_save", staticmethod(fail))  # the label file stays behind the journal
    first.apply("cells.tif", Stroke([(30.0, 30.0), (30.0, 50.0)], 2.0, 2))
    first.undo("cells.tif")
    first.redo("cells.tif")
    with pytest.raises(WriteError, match="disk full"):
        first.close()
    monkeypatch.undo()
    journal = tmp_path / ".deepscope" / "journal" / "cells.jsonl"
    assert len(journal.read_bytes().splitlines()) == 3
    with open(journal, "ab") as handle:
        handle.write(b'{"seq": 5, "box": [[0, 3], [0')  # torn by a kill: never acknowledged
    second = LabelStore(folder)
    assert np.array_equal(second.labels("cells.tif"), first.labels("cells.tif"))
    assert second.version("cells.tif") == first.version("cells.tif") == 4
    second.apply("cells.tif", Stroke([(50.0, 10.0)], 1.0, 3))
    second.close()
    third = LabelStore(folder)
    assert third.labels("cells.tif")[50, 10] == 3 and third.labels("cells.tif")[30, 40] == 2
    assert np.array_equal(read_sparse_labels(folder.labels_path("cells.tif")), third.labels("cells.tif"))
    third.close()


def test_a_full_disk_keeps_the_old_label_file_and_every_stroke(
    tmp_path: Path, full_disk, caplog: pytest.LogCaptureFixture
) -> None:
    """A label file that cannot be written keeps its previous version, the failure is one line (log, API field,
    flush), and once space is back the file catches up with every stroke acknowledged meanwhile."""
    folder = folder_with(tmp_path)
    store = LabelStore(folder)
    first, second, third = (
        Stroke([(y, 10.0), (y, 50.0)], 2.0, label) for y, label in ((10.0, 1), (30.0, 2), (50.0, 1))
    )
    store.apply("cells.tif", first)
    store.flush()
    path, journal = folder.labels_path("cells.tif"), tmp_path / ".deepscope" / "journal" / "cells.jsonl"
    old = path.read_bytes()

    disk = full_disk("cells.tif")
    store.apply("cells.tif", second)  # acknowledged: journalled before the file is written
    with caplog.at_level(logging.WARNING), pytest.raises(WriteError) as failure:
        store.flush()
    message = str(failure.value)
    assert message.startswith(f"{path}: could not write label file (No space left on device)") and "\n" not in message
    assert message.endswith("the previous label file is intact")
    assert store.write_error("cells.tif") == message
    assert [record.getMessage() for record in caplog.records] == [message]  # logged once, in one line
    assert path.read_bytes() == old and not list(path.parent.glob(".*"))  # no half file, no temporary left
    assert len(journal.read_bytes().splitlines()) == 1  # the second stroke waits in the journal
    with pytest.raises(WriteError):
        store.flush()  # tried again, and still failing: never reported as written
    assert disk.failures == 2 and path.read_bytes() == old

    disk.space_back()
    store.apply("cells.tif", third)  # the next change writes the file again
    store.flush()
    assert store.write_error("cells.tif") is None and journal.read_bytes() == b""
    expected = np.zeros((64, 64), np.uint8)
    for stroke in (first, second, third):
        box, mask = stroke.raster(expected.shape)
        expected[box][mask] = stroke.label
    assert np.array_equal(read_sparse_labels(path), expected)
    store.close()


class FullJournal:
    """A journal file on a full disk: half of each entry is written, then ENOSPC."""

    def __init__(self, journal) -> None:
        self.journal = journal

    def __getattr__(self, name: str):
        return getattr(self.journal, name)

    def write(self, data: bytes) -> int:
        self.journal.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_change_that_cannot_be_journalled_is_refused_and_changes_nothing(store: LabelStore) -> None:
    store.apply("cells.tif", Stroke([(10.0, 10.0)], 3.0, 1))
    image = store._images["cells.tif"]
    journal, before, size = image.journal, store.labels("cells.tif").copy(), image.journal_path.stat().st_size
    image.journal = FullJournal(journal)
    with pytest.raises(WriteError, match=r"cells\.jsonl: could not record the change, so it was not made \(No space"):
        store.apply("cells.tif", Stroke([(40.0, 40.0)], 3.0, 2))
    assert np.array_equal(store.labels("cells.tif"), before) and store.version("cells.tif") == 1
    assert image.journal_path.stat().st_size == size  # the torn half entry was cut off
    image.journal = journal  # space is back
    store.apply("cells.tif", Stroke([(40.0, 40.0)], 3.0, 2))
    assert store.version("cells.tif") == 2 and store.labels("cells.tif")[40, 40] == 2


def test_labels_painted_elsewhere_are_read_and_checked(tmp_path: Path) -> None:
    folder = folder_with(tmp_path)
    (tmp_path / "labels").mkdir()
    painted = np.zeros((64, 64), np.uint16)
    painted[3:6, 3:6] = 200
    tifffile.imwrite(tmp_path / "labels" / "cells.tif", painted)
    store = LabelStore(folder)
    assert store.labels("cells.tif").dtype == np.uint8 and store.labels("cells.tif").sum() == 9 * 200
    store.close()
    painted[0, 0] = 300
    tifffile.imwrite(tmp_path / "labels" / "cells.tif", painted)
    with pytest.raises(DataError, match=r"labels/cells.tif: label values 0\.\.300"):
        LabelStore(folder).labels("cells.tif")
    tifffile.imwrite(tmp_path / "labels" / "cells.tif", np.ones((64, 32), np.uint8))
    with pytest.raises(
        DataError, match=r"labels/cells.tif: label image of shape \(64, 32\) does not match .*/cells.tif"
    ):
        LabelStore(folder).labels("cells.tif")


def test_strokes_on_a_3d_stack_paint_one_slice(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, (3, 32, 32), "stack.tif")
    store = LabelStore(folder)
    box = store.apply("stack.tif", Stroke([(10.0, 10.0)], 4.0, 2, z=1))
    labels = store.labels("stack.tif")
    assert box == (slice(1, 2), slice(6, 15), slice(6, 15))
    assert labels.shape == (3, 32, 32) and (labels[1] == 2).sum() == 45 and not labels[[0, 2]].any()
    store.close()
    assert np.array_equal(read_sparse_labels(folder.labels_path("stack.tif")), labels)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"points": [[1, 2]] * 10001}, "1..10000"),
        ({"points": []}, "1..10000"),
        ({"points": [[1, "2"]]}, "pairs of finite numbers"),
        ({"points": [[1, 10**400]]}, "pairs of finite numbers"),
        ({"points": [[1, float("nan")]]}, "pairs of finite numbers"),
        ({"points": [[-9.0, 5.0]]}, "beyond"),
        ({"points": [[5.0, 70.0]]}, "beyond"),
        ({"label": 256}, "label"),
        ({"label": True}, "label"),
        ({"radius": 0.2}, "radius"),
        ({"radius": "3"}, "radius"),
        ({"z": 1}, "slice"),
    ],
)
def test_bad_strokes_are_refused(change: dict, message: str) -> None:
    data = {"points": [[5.0, 5.0], [6.0, 9.5]], "radius": 3, "label": 1, "visible": [0, 64, 0, 64], **change}
    with pytest.raises(DeepscopeError, match=message):
        Stroke.from_json(data, (64, 64))


def test_strokes_from_json() -> None:
    stroke = Stroke.from_json({"points": [[5, 5], [6.5, 9]], "radius": 3, "label": 0, "z": 2}, (4, 64, 64))
    assert stroke == Stroke([(5.0, 5.0), (6.5, 9.0)], 3.0, 0, 2)
    with pytest.raises(DeepscopeError, match="slice"):
        Stroke.from_json({"points": [[5, 5]], "radius": 3, "label": 1, "z": 4}, (4, 64, 64))


# --- kill -9 ---------------------------------------------------------------------------------------------------------

BIG = (2048, 2048)  # large enough that rewriting the label file takes a while, so kills land inside writes


def kill_stroke(i: int) -> Stroke:
    """Stroke ``i`` of the crash test: a disk of its own, so each stroke can be checked separately."""
    row, column = divmod(i, 100)
    return Stroke([(10.0 + 20 * row, 10.0 + 20 * column)], 4.0, 1 + i % 3)


def paint_forever(root: Path, start: int, acknowledgements) -> None:
    """The child: apply strokes start, start+1, ... and report each one once ``apply`` has returned."""
    store = LabelStore(ServedFolder(root))
    for i in range(start, 10000):
        store.apply("big.tif", kill_stroke(i))
        acknowledgements.send(i)


def expected_labels(count: int) -> np.ndarray:
    expected = np.zeros(BIG, np.uint8)
    for i in range(count):
        stroke = kill_stroke(i)
        box, mask = stroke.raster(BIG)
        expected[box][mask] = stroke.label
    return expected


def test_kill_9_loses_no_acknowledged_stroke(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "big.tif", np.zeros(BIG, np.uint8))
    context = multiprocessing.get_context("fork")  # a fresh interpreter would spend seconds importing torch per kill
    saved = tmp_path / "labels" / "big.tif"
    start, kills_in_write = 0, 0
    for kill_after, in_write in [(1, False), (12, False), (40, True), (5, True), (25, False)]:
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=paint_forever, args=(tmp_path, start, sender), daemon=True)
        child.start()
        sender.close()
        acknowledged = []
        while len(acknowledged) < kill_after:
            assert receiver.poll(60), "the child stopped acknowledging strokes"
            acknowledged.append(receiver.recv())
        temporary = saved.parent / f".{saved.name}.tmp-{child.pid}"
        deadline = time.monotonic() + 10
        while in_write and not temporary.exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        kills_in_write += temporary.exists()
        with pytest.raises(EOFError):  # every acknowledgement sent before the kill, then the end of the pipe
            for _ in itertools.count():
                acknowledged.append(receiver.recv())
        assert acknowledged == list(range(start, start + len(acknowledged)))
        done = start + len(acknowledged)  # strokes 0..done-1 were acknowledged; stroke `done` may be in too

        # the file on disk is always a complete label image holding the first strokes, in order
        present = [False] * (done + 1)
        if saved.exists():
            on_disk = read_sparse_labels(saved)
            present = [
                on_disk[10 + 20 * (i // 100), 10 + 20 * (i % 100)] == kill_stroke(i).label for i in range(done + 1)
            ]
            assert np.array_equal(on_disk, expected_labels(sum(present)))
        assert present == sorted(present, reverse=True)

        store = LabelStore(ServedFolder(tmp_path))
        live = store.labels("big.tif")
        start = done + bool(live[10 + 20 * (done // 100), 10 + 20 * (done % 100)])
        assert np.array_equal(live, expected_labels(start))
        store.close()
        assert np.array_equal(read_sparse_labels(saved), live)
    assert kills_in_write >= 1  # the temporary file of an unfinished write was left behind
    assert start >= 83  # every round went on from the strokes the previous one left
