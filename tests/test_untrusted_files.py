"""Files from other people never run code: a checkpoint or classifier whose unpickling would create a file is refused,
with one line naming it, by every command that reads one, and by deepscope serve's listing; nothing is written."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fast_args
from deepscope.cli import main
from deepscope.engine.checkpoint import load_checkpoint, save_checkpoint

pytest.importorskip("starlette.testclient")
from starlette.testclient import TestClient

from deepscope.serve.app import create_app


class Planted:
    """Unpickling this calls ``open(marker, "w")``: the file appearing is the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def planted(tmp_path: Path) -> dict[str, Path]:
    """A deepscope-looking checkpoint in both PyTorch formats (zip and plain pickle) and a pickled classifier, each
    carrying the payload; and the marker file the payload would create."""
    marker = tmp_path / "code-ran"
    state = {"model": {"w": torch.zeros(1)}, "config": {"task": "classify", "model": "cnn"}, "payload": Planted(marker)}
    files = {
        "marker": marker,
        "zip": tmp_path / "models" / "best.pt",
        "pickle": tmp_path / "models" / "old.pt",
        "classifier": tmp_path / "classifier.pkl",
    }
    files["zip"].parent.mkdir()
    torch.save(state, files["zip"])
    files["pickle"].write_bytes(pickle.dumps(state))
    files["classifier"].write_bytes(pickle.dumps({"format": "deepscope-pixel-classifier", "forest": Planted(marker)}))
    return files


def refused(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
    return err[0]


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_evaluate_predict_init_from_and_resume_never_run_a_planted_checkpoint(
    planted, class_tree, tmp_path, capsys, kind
):
    evil, marker = planted[kind], planted["marker"]
    image = next((class_tree / "test").rglob("*.png"))
    commands = [
        ["evaluate", str(evil), "--data", str(class_tree)],
        ["predict", str(evil), str(image), "--out", str(tmp_path / "p.csv")],
        fast_args(class_tree, tmp_path / "init", "--epochs", "1", "--init-from", str(evil)),
    ]
    for command in commands:
        assert main(command) == 2
        assert "refused: the file is a pickle that" in refused(capsys, evil)
    run = tmp_path / "resumed"
    assert main(fast_args(class_tree, run, "--epochs", "1")) == 0
    capsys.readouterr()
    (run / "last.pt").write_bytes(evil.read_bytes())  # someone swapped the run's checkpoint
    assert main(["train", "classify", "--out", str(run), "--resume"]) == 2
    assert "refused" in refused(capsys, run / "last.pt")
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists()


def test_pixel_predict_never_runs_a_planted_classifier(planted, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    assert main(["pixel", "predict", str(planted["classifier"]), str(image), "--out", str(tmp_path / "out")]) == 2
    assert "is a pickle, which could run code when opened and is refused" in refused(capsys, planted["classifier"])
    assert not planted["marker"].exists() and not (tmp_path / "out").exists()


def test_serve_lists_checkpoints_without_unpickling_and_refuses_to_open_a_planted_one(planted, tmp_path, class_tree):
    folder = planted["zip"].parent.parent
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "image.png")
    assert main(fast_args(class_tree, folder / "run", "--epochs", "1")) == 0
    with TestClient(create_app(folder)) as client:
        listed = {entry["path"]: entry for entry in client.get("/api/models").json()}
        # its own checkpoints are known from their header; a pickle's task only once it is opened, which is refused
        assert listed["run/best.pt"]["task"] == "classify" and listed["run/best.pt"]["error"] is None
        assert listed["models/best.pt"]["task"] is None and listed["models/old.pt"]["task"] is None
        assert not planted["marker"].exists()
        answer = client.post("/api/models/open", json={"path": "models/best.pt"})
        assert answer.status_code == 400 and "refused" in answer.json()["error"]
    assert not planted["marker"].exists()


def test_checkpoints_are_safetensors_whose_state_round_trips_exactly(tmp_path):
    state = {
        "model": {"w": torch.randn(3, 2), "n": torch.tensor(7)},
        "config": {"task": "classify", "sizes": (1, 2)},
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.ones(2)}},
            "param_groups": [{"betas": (0.9, 0.99), "params": [0]}],
        },
        "rng": {
            "numpy": ("MT19937", np.arange(624, dtype=np.uint32), 3, 0, 0.0),
            "python": (3, tuple(range(625)), None),
        },
        "history": [{"loss": float("nan"), "lr": 0.1 + 0.2}],
        "best": {"value": None},
    }
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    assert path.read_bytes()[8:9] == b"{"  # a JSON header: a safetensors file, not a pickle
    back = load_checkpoint(path)
    assert back["config"] == state["config"] and back["rng"]["python"] == state["rng"]["python"]
    assert back["optimizer"]["state"][0]["momentum_buffer"].equal(torch.ones(2))
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["rng"]["numpy"][1].dtype == np.uint32 and np.array_equal(back["rng"]["numpy"][1], np.arange(624))
    assert back["history"][0]["lr"] == 0.1 + 0.2 and back["history"][0]["loss"] != back["history"][0]["loss"]
    assert all(back["model"][k].equal(v) and back["model"][k].dtype == v.dtype for k, v in state["model"].items())


def test_a_checkpoint_of_an_earlier_version_still_loads(tmp_path):
    """deepscope 0.1 wrote torch.save pickles holding numpy's RNG state: tensors, plain values and numpy arrays only."""
    state = {
        "model": {"w": torch.ones(2)},
        "config": {"task": "classify", "model": "cnn"},
        "rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    torch.save(state, tmp_path / "old.pt")
    back = load_checkpoint(tmp_path / "old.pt", task="classify")
    assert back["model"]["w"].equal(torch.ones(2)) and np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])


def test_a_zip_with_members_outside_its_folder_writes_nothing(tmp_path, class_tree, capsys):
    """The one archive format deepscope reads is PyTorch's zip of an earlier version's checkpoint: it is read in place,
    never extracted, so a member named ../../x cannot land anywhere."""
    evil = tmp_path / "deep" / "er" / "evil.pt"
    evil.parent.mkdir(parents=True)
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"model": {}}))
        archive.writestr("../../escaped.txt", "outside")
        archive.writestr("/tmp/absolute-escape.txt", json.dumps({"x": 1}))
    assert main(["evaluate", str(evil), "--data", str(class_tree)]) == 2
    refused(capsys, evil)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute-escape.txt").exists()
