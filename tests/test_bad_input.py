"""Bad input: every case ends in one clear line naming the file and the problem (exit status 2)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fast_args
from deepscope.atomic import WriteError
from deepscope.cli import main
from deepscope.demo.data import write_nuclei
from deepscope.engine.checkpoint import load_checkpoint, save_checkpoint
from test_segment_bad_input import small_run


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def train(data, tmp_path, *extra) -> int:
    return main(fast_args(data, tmp_path / "run", *extra))


def test_missing_folder(tmp_path, capsys):
    assert train(tmp_path / "nowhere", tmp_path) == 2
    assert "nowhere: folder not found" in error_line(capsys)


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train(tmp_path / "empty", tmp_path) == 2
    assert "empty: no class subfolders found" in error_line(capsys)


def test_class_folder_without_images(class_tree, tmp_path, capsys):
    (class_tree / "train" / "delta").mkdir()
    (class_tree / "train" / "delta" / "notes.txt").write_text("no images here")
    assert train(class_tree, tmp_path) == 2
    assert "delta: class folder holds no images" in error_line(capsys)


def test_corrupt_image(class_tree, tmp_path, capsys):
    (class_tree / "train" / "beta" / "0042.png").write_bytes(b"garbage")
    assert train(class_tree, tmp_path) == 2
    line = error_line(capsys)
    assert "0042.png: corrupt or unreadable image" in line


def test_mixed_sizes_without_resize(class_tree, tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(class_tree / "train" / "gamma" / "big.png")
    assert train(class_tree, tmp_path) == 2
    assert "big.png: image size 20x20 differs" in error_line(capsys)
    assert train(class_tree, tmp_path, "--resize", "12", "12", "--epochs", "1") == 0


def test_only_one_class(class_tree, tmp_path, capsys):
    for name in ["beta", "gamma"]:
        shutil.rmtree(class_tree / "train" / name)
    shutil.rmtree(class_tree / "test")
    assert train(class_tree, tmp_path) == 2
    assert "only one class (alpha)" in error_line(capsys)


def test_npz_labels_out_of_range(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    x = np.zeros((10, 4, 4), np.uint8)
    np.savez(path, x_train=x, y_train=np.array([0, 1] * 4 + [2, 7]), class_names=np.array(["a", "b", "c"]))
    assert train(path, tmp_path) == 2
    assert "y_train[9] = 7 is out of range for 3 classes" in error_line(capsys)


def test_npz_wrong_dtype_and_missing_arrays(tmp_path, capsys):
    path = tmp_path / "float.npz"
    np.savez(path, x_train=np.zeros((4, 4, 4), np.float32), y_train=np.array([0, 1, 0, 1]))
    assert train(path, tmp_path) == 2
    assert "x_train has dtype float32" in error_line(capsys)
    np.savez(path, images=np.zeros((4, 4, 4), np.uint8))
    assert train(path, tmp_path) == 2
    assert "missing arrays x_train and/or y_train" in error_line(capsys)


def test_checkpoint_from_another_model_or_task(class_tree, tmp_path, capsys):
    assert train(class_tree, tmp_path, "--epochs", "1") == 0
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "classify", "--out", str(out), "--resume", "--model", "mlp"]) == 2
    assert "checkpoint holds model 'cnn', not 'mlp'" in error_line(capsys)

    state = load_checkpoint(out / "best.pt")
    state["config"]["task"] = "segment"
    save_checkpoint(state, tmp_path / "other_task.pt")
    assert main(["evaluate", str(tmp_path / "other_task.pt"), "--data", str(class_tree)]) == 2
    assert "other_task.pt" in error_line(capsys)

    state = load_checkpoint(out / "best.pt")
    state["model"] = {k: v[:1] if v.ndim else v for k, v in state["model"].items()}
    save_checkpoint(state, tmp_path / "shrunk.pt")
    assert main(["evaluate", str(tmp_path / "shrunk.pt"), "--data", str(class_tree)]) == 2
    assert "shrunk.pt: weights do not fit the model" in error_line(capsys)

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(tmp_path / "junk.pt"), "--data", str(class_tree)]) == 2
    assert "junk.pt: not a readable checkpoint" in error_line(capsys)


def test_existing_run_is_not_overwritten(class_tree, tmp_path, capsys):
    assert train(class_tree, tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train(class_tree, tmp_path, "--epochs", "1") == 2
    assert "already holds a run (last.pt); pass --resume" in error_line(capsys)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(class_tree, tmp_path, capsys, monkeypatch):
    assert train(class_tree, tmp_path, "--epochs", "1") == 0
    out = tmp_path / "run"
    good = load_checkpoint(out / "last.pt")
    capsys.readouterr()

    from deepscope.tasks.classify.task import ClassifyTask

    original = ClassifyTask.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(ClassifyTask, "loss", poisoned)
    assert main(["train", "classify", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    line = error_line(capsys)
    assert "non-finite loss at epoch 2, step 3" in line and "last good checkpoint" in line
    kept = load_checkpoint(out / "last.pt")
    assert kept["epoch"] == good["epoch"] == 0
    for key in good["model"]:
        assert torch.equal(kept["model"][key], good["model"][key])


def test_full_disk_keeps_previous_checkpoint(tmp_path, full_disk):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    disk = full_disk("*.pt")
    with pytest.raises(WriteError, match=r"\(No space left on device\); the previous checkpoint is intact"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert disk.failures == 1
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_during_training_is_a_clear_error(class_tree, tmp_path, capsys, full_disk):
    full_disk("*.pt")
    assert train(class_tree, tmp_path, "--epochs", "1") == 2
    assert "best.pt: could not write checkpoint (No space left on device); no earlier checkpoint existed" in error_line(
        capsys
    )


def test_bad_predict_inputs(class_tree, tmp_path, capsys):
    assert train(class_tree, tmp_path, "--epochs", "1") == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "best.pt")
    Image.new("RGB", (30, 30)).save(tmp_path / "large.png")
    assert main(["predict", ckpt, str(tmp_path / "large.png"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "large.png: images are 30x30 but the model expects 12x12" in error_line(capsys)
    assert main(["predict", ckpt, str(tmp_path / "missing.png"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "missing.png: file not found" in error_line(capsys)


def test_evaluate_with_wrong_classes(class_tree, tmp_path, capsys):
    assert train(class_tree, tmp_path, "--epochs", "1") == 0
    capsys.readouterr()
    shutil.rmtree(class_tree / "test" / "gamma")
    assert main(["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(class_tree / "test")]) == 2
    assert "differ from the checkpoint's" in error_line(capsys)


def test_segment_folder_with_masks_and_labels_trains_and_evaluates_with_a_choice(tmp_path, capsys):
    """deepscope serve keeps painted class labels in labels/ and proofread instance masks in masks/ of one folder."""
    data = write_nuclei(tmp_path / "data", train=4, test=1, size=32)
    for split in ("train", "test"):
        shutil.copytree(data / split / "masks", data / split / "labels")
    assert main(small_run(data, tmp_path / "run")) == 2
    assert (
        "train: both masks/ and labels/ found; choose the label folder with --labels masks or --labels labels"
        in error_line(capsys)
    )
    assert main(small_run(data, tmp_path / "run", "--labels", "masks")) == 0
    best = str(tmp_path / "run" / "best.pt")
    assert main(["evaluate", best, "--data", str(data), "--device", "cpu"]) == 0  # the label folder trained on
    capsys.readouterr()
    assert main(["evaluate", best, "--data", str(data), "--device", "cpu", "--labels", "proofread"]) == 2
    assert "data/train: no proofread/ folder next to images/ (the label folder chosen with --labels)" in error_line(
        capsys
    )
