"""A detector's candidates, finished outside it, give its own detections; and they export to ONNX and TorchScript
with free image sizes (the file's candidates equal the network's as sets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deepscope.data.io.images import read_image
from deepscope.export.exportable import Exportable
from deepscope.export.formats import export
from deepscope.export.runtime import load_exported
from deepscope.models.detection import build_detector
from deepscope.models.detection.candidates import CandidateDetector, candidates_of
from deepscope.tasks.detect.export import matched_difference

SMALL = {"backbone": "tiny", "fpn_channels": 16, "max_size": 200, "min_size": [160]}
DETECTORS = {
    "fcos": {**SMALL, "head_convs": 1, "score_thresh": 0.01},
    "fcos-dfl": {**SMALL, "head_convs": 1, "score_thresh": 0.01, "dfl_bins": 8},  # box sides as distributions
    "retinanet": {**SMALL, "score_thresh": 0.001},  # an untrained RetinaNet scores about 0.01 (its prior)
    "centernet": {**SMALL},
}


def real_images(shared_data: Path) -> list[torch.Tensor]:
    """Two Penn-Fudan photographs as [0, 1] tensors, or two random images of other sizes without the data."""
    folder = shared_data / "pennfudan" / "PNGImages"
    if folder.is_dir():
        files = sorted(folder.iterdir())[:2]
        return [torch.from_numpy(read_image(f).astype(np.float32) / 255).permute(2, 0, 1) for f in files]
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 300, 410, generator=generator), torch.rand(3, 260, 190, generator=generator)]


def detections_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The same detections, as sets: an untrained network scores many boxes nearly alike, and a difference of 1e-7
    in how the two paths normalise may order two of them the other way."""
    assert len(ours["boxes"]) == len(theirs["boxes"])

    def rows(found: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([found["boxes"], found["scores"][:, None] * 100, found["labels"][:, None] * 1e6], 1)

    gap = (rows(ours)[:, None] - rows(theirs)[None]).abs().amax(-1)
    assert float(gap.amin(1).max()) < 1e-3 and float(gap.amin(0).max()) < 1e-3


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_candidates_finished_outside_equal_the_detectors_own_detections(name: str, shared_data: Path) -> None:
    torch.manual_seed(0)
    model = build_detector(name.split("-")[0], 2, 3, **DETECTORS[name]).eval()
    candidates, finish = candidates_of(model)
    outside = CandidateDetector(candidates, finish, model.transform).eval()
    images = real_images(shared_data)
    tiles = [images[0][:, :200, :200], images[0][:, 50:250, 100:300]]  # one batch of one size
    with torch.no_grad():
        for ours, theirs in zip(model(images) + model(tiles), outside(images) + outside(tiles)):
            assert len(ours["boxes"]) > 0
            detections_equal(ours, theirs)


def test_rcnns_have_no_dense_candidates() -> None:
    model = build_detector("fasterrcnn", 2, 3, backbone="tiny", fpn_channels=16)
    with pytest.raises(ValueError, match="FCOS, RetinaNet and CenterNet"):
        candidates_of(model)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_fcos_export_takes_images_of_any_size(fmt: str, shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="export tests need onnxruntime (pip install -e '.[test]')")
    torch.manual_seed(0)
    # three pyramid levels, not five: the graph, and so the export's time, is smaller; levels still split the rows;
    # box sides as distributions, as the plan gives FCOS on a CPU budget
    model = build_detector("fcos", 2, 3, **DETECTORS["fcos-dfl"], extra_p6p7=False).eval()
    candidates, finish = candidates_of(model)
    images = real_images(shared_data)
    example = model.transform.resize(images[0])[0]
    ex = Exportable(
        "detect",
        candidates,
        torch.stack([example, example.flip(-1)]),
        (1, 1),
        {"config": {"task": "detect"}, "task_state": {}},
        "test",
        min_side=candidates.min_side(),
        difference=matched_difference(finish.score_threshold),
    )
    out = tmp_path / f"fcos.{fmt}"
    result = export(ex, fmt, out)
    assert result["checked_shapes"][1] == [2, 3, example.shape[1] + 1, example.shape[2] + 1]
    loaded, _ = load_exported(out, torch.device("cpu"))
    eager = CandidateDetector(candidates, finish, model.transform).eval()
    exported = CandidateDetector(loaded, finish, model.transform).eval()
    with torch.no_grad():
        for ours, theirs in zip(eager(images), exported(images)):  # the second image has another size
            detections_equal(ours, theirs)


def test_candidates_are_compared_as_sets_in_chunks():
    """Rows in another order are equal; a moved box or a lost candidate is not; more rows than one chunk."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.rand(1, 700, 4, generator=generator) * 300, torch.rand(1, 700, 1, generator=generator)], -1)
    rows = torch.cat([rows, torch.ones(1, 700, 1)], -1)  # label 1
    difference = matched_difference(0.05)
    assert difference(rows, rows[:, torch.randperm(700, generator=generator)]) == (0.0, 0.0)
    moved = rows.clone()
    best = int(rows[0, :, 4].argmax())
    moved[0, best, 0] += 30.0  # 30 pixels on a box of the best candidate
    assert difference(rows, moved)[0] >= 1.0
    lost = rows.clone()
    lost[0, best, 4] = 0.0  # the best candidate scores nothing in the other runtime
    assert difference(rows, lost)[1] > 0.01
