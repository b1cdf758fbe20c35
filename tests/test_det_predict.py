"""Detection inference against known answers: a fake detector that finds bright squares exactly, so that tiled
prediction can be compared with whole-image prediction and with the squares drawn; the file writers read back."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage
from torch import nn

from deepscope.config import from_dict
from deepscope.errors import DataError, DeepscopeError
from deepscope.tasks.detect import predict
from deepscope.tasks.detect.draw import detection_gallery, draw_detections, plot_pr_curves
from deepscope.tasks.detect.predict import (
    Detector,
    DetInferenceConfig,
    merge_detections,
    predict_items,
    write_coco,
    write_voc_xml,
    write_yolo_txt,
)

SIZE, STEP = 9, 20  # squares of 9 pixels every 20: gaps of 11, so overlaps of 12 or more never cut one
HEIGHT, WIDTH = SIZE + 7 * STEP, SIZE + 11 * STEP  # the last row and column of squares touch the image border
CLASSES = ["dim", "bright"]


class SquareFinder(nn.Module):
    """Each connected component above 0.5 in channel 0 is a detection: class 2 ("bright") if its value exceeds 0.9,
    else class 1, with score 0.9 times its value; its mask is the component. Keeps the shape of every input and the
    number of images of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.calls: list[int] = []

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> list[dict[str, torch.Tensor]]:
        assert not self.training, "detectors are called in eval mode"
        self.calls.append(len(images))
        outputs = []
        for image in images:
            self.shapes.append(tuple(image.shape))
            values = image[0].cpu().numpy()
            components, count = ndimage.label(values > 0.5)
            slices = ndimage.find_objects(components)
            value = torch.tensor([float(values[s].max()) for s in slices], dtype=torch.float32)
            outputs.append(
                {
                    "boxes": torch.tensor(
                        [[x.start, y.start, x.stop, y.stop] for y, x in slices], dtype=torch.float32
                    ).reshape(-1, 4),
                    "scores": 0.9 * value,
                    "labels": torch.where(value > 0.9, 2, 1).long(),
                    "masks": torch.from_numpy(components[None] == np.arange(1, count + 1)[:, None, None]).float()[
                        :, None
                    ],
                }
            )
        return outputs


def squares() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 1) uint8 image of squares on a grid, alternately 255 and 200, and their boxes and labels."""
    image = np.zeros((HEIGHT, WIDTH, 1), np.uint8)
    boxes, labels = [], []
    for i, y in enumerate(range(0, HEIGHT - SIZE + 1, STEP)):
        for j, x in enumerate(range(0, WIDTH - SIZE + 1, STEP)):
            bright = (i + j) % 2 == 0
            image[y : y + SIZE, x : x + SIZE] = 255 if bright else 200
            boxes.append([x, y, x + SIZE, y + SIZE])
            labels.append(2 if bright else 1)
    return image, np.array(boxes, np.float32), np.array(labels)


def by_position(found: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Detections in reading order of their top-left corners (as ``squares`` lists them), so that two predictions of
    the same objects line up."""
    order = np.lexsort((found["boxes"][:, 0], found["boxes"][:, 1]))
    return {k: v[order] for k, v in found.items()}


def detect(
    image: np.ndarray, masks: bool = False, batch_size: int = 4, **settings
) -> tuple[dict[str, np.ndarray], SquareFinder]:
    model = SquareFinder()
    settings = {"max_detections": 1000, **settings}
    return Detector(model, DetInferenceConfig(**settings), torch.device("cpu"), masks=masks, batch_size=batch_size)(
        image
    ), model


def test_whole_image_finds_every_square_once() -> None:
    image, boxes, labels = squares()
    found, model = detect(image)
    found = by_position(found)
    assert model.calls == [1] and model.shapes == [(1, HEIGHT, WIDTH)]
    np.testing.assert_array_equal(found["boxes"], boxes)
    np.testing.assert_array_equal(found["labels"], labels)
    np.testing.assert_allclose(found["scores"], np.where(labels == 2, 0.9, 0.9 * 200 / 255), rtol=1e-6)


@pytest.mark.parametrize(
    "tile, overlap", [((64, 96), 16), ((59, 59), 14), ((40, 70), 12), ((HEIGHT, 80), 24), ((50, 500), 30)]
)
@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_tiled_equals_whole_image(tile: tuple[int, int], overlap: int, merge: str) -> None:
    """Tiles that do ((59, 59): 149 = 59 + 2 * 45) and do not fit the image evenly, one axis untiled, and overlaps
    larger than the squares: every square once, whole, where whole-image prediction puts it."""
    image, boxes, _ = squares()
    whole, _ = detect(image, merge=merge)
    tiled, model = detect(image, tile=list(tile), overlap=overlap, merge=merge)
    whole, tiled = by_position(whole), by_position(tiled)
    assert len(tiled["boxes"]) == len(boxes)
    np.testing.assert_allclose(tiled["boxes"], whole["boxes"], atol=1)
    np.testing.assert_array_equal(tiled["labels"], whole["labels"])
    np.testing.assert_allclose(tiled["scores"], whole["scores"], rtol=1e-6)
    assert len(model.shapes) > 1


def test_tiles_never_exceed_the_tile_and_are_batched() -> None:
    image, boxes, _ = squares()
    found, model = detect(image, batch_size=3, tile=[50, 60], overlap=12)
    assert len(found["boxes"]) == len(boxes)
    assert all(c == 1 and h <= 50 and w <= 60 for c, h, w in model.shapes)
    assert max(model.calls) == 3 and sum(model.calls) == len(model.shapes) > 3


def test_image_smaller_than_the_tile_is_one_call() -> None:
    image, boxes, _ = squares()
    found, model = detect(image, tile=[512, 512], overlap=32)
    assert model.calls == [1] and model.shapes == [(1, HEIGHT, WIDTH)] and len(found["boxes"]) == len(boxes)


def test_sixteen_bit_images_are_scaled_by_their_range() -> None:
    image, boxes, _ = squares()
    found, _ = detect(image.astype(np.uint16) * 257, tile=[64, 64], overlap=16)
    np.testing.assert_array_equal(by_position(found)["boxes"], boxes)


def test_score_threshold_and_max_detections() -> None:
    image, _, labels = squares()
    bright, _ = detect(image, score_threshold=0.8)
    assert len(bright["boxes"]) == (labels == 2).sum() and set(bright["labels"]) == {2}
    top, _ = detect(image, tile=[64, 64], overlap=16, max_detections=5, score_threshold=0.0)
    assert len(top["boxes"]) == 5 and np.all(np.diff(top["scores"]) <= 0) and set(top["labels"]) == {2}


def test_tiled_masks_equal_whole_image_masks() -> None:
    image, boxes, _ = squares()
    whole, _ = detect(image, masks=True)
    tiled, _ = detect(image, masks=True, tile=[64, 96], overlap=16)
    whole, tiled = by_position(whole), by_position(tiled)
    assert tiled["masks"].shape == (len(boxes), HEIGHT, WIDTH) and tiled["masks"].dtype == bool
    np.testing.assert_array_equal(tiled["masks"], whole["masks"])
    x1, y1, x2, y2 = boxes[5].astype(int)
    assert tiled["masks"][5].sum() == SIZE * SIZE and tiled["masks"][5, y1:y2, x1:x2].all()


def test_masks_on_too_large_an_image_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predict, "MAX_MASK_PIXELS", 1000)
    with pytest.raises(DeepscopeError, match="too large for full-size masks"):
        detect(np.zeros((40, 40, 1), np.uint8), masks=True)


def test_weighted_box_fusion_known_answer() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=torch.float32)
    scores, labels = torch.tensor([0.9, 0.3, 0.5, 0.4]), torch.tensor([1, 1, 1, 2])
    keep, fused, fused_scores = merge_detections(boxes, scores, labels, 0.5, "wbf")
    assert keep.tolist() == [0, 2, 3]  # the class-2 box is not fused with the class-1 ones
    np.testing.assert_allclose(fused.numpy(), [[0.25, 0.25, 10.25, 10.25], [50, 50, 60, 60], [0, 0, 10, 10]], rtol=1e-6)
    np.testing.assert_allclose(fused_scores.numpy(), [0.6, 0.5, 0.4], rtol=1e-6)
    keep, kept, kept_scores = merge_detections(boxes, scores, labels, 0.5, "nms")
    assert (
        keep.tolist() == [0, 2, 3]
        and kept[0].tolist() == [0, 0, 10, 10]
        and kept_scores.tolist() == pytest.approx([0.9, 0.5, 0.4])
    )


def test_settings_from_yaml_values_and_bad_settings() -> None:
    config = from_dict(DetInferenceConfig, {"tile": [64, 80], "overlap": 8, "merge": "wbf"})
    assert config.tile == [64, 80] and config.merge == "wbf"
    with pytest.raises(DeepscopeError, match="unknown merge 'soft'"):
        from_dict(DetInferenceConfig, {"merge": "soft"})
    with pytest.raises(DeepscopeError, match="larger than the overlap"):
        DetInferenceConfig(tile=[64, 64], overlap=64)


def test_predict_items_names_the_bad_image() -> None:
    detector = Detector(SquareFinder(), DetInferenceConfig(), torch.device("cpu"))
    with pytest.raises(DataError, match=r"^odd\.tif: image must be"):
        predict_items(detector, [("odd.tif", np.zeros((2, 8, 8, 1), np.uint8))])


def records(masks: bool = False) -> list[dict]:
    image, _, _ = squares()
    detector = Detector(SquareFinder(), DetInferenceConfig(max_detections=1000), torch.device("cpu"), masks=masks)
    return predict_items(detector, [("a.png", image), ("b.png", image[:60, :100])])


@pytest.mark.parametrize("kind", ["bbox", "segm"])
def test_coco_file_loads_as_dataset_and_as_results(tmp_path: Path, kind: str) -> None:
    """Detections written as COCO score AP 1 against themselves in pycocotools, boxes and (RLE) masks."""
    path = write_coco(tmp_path / "out" / "detections.json", records(masks=kind == "segm"), CLASSES)
    truth = COCO(str(path))
    assert sorted(img["file_name"] for img in truth.dataset["images"]) == ["a.png", "b.png"]
    assert [c["name"] for c in truth.loadCats(truth.getCatIds())] == CLASSES
    assert len(truth.getAnnIds()) == 96 + 15
    if kind == "segm":
        assert truth.annToMask(truth.loadAnns([1])[0]).sum() == SIZE * SIZE
    results = truth.loadRes(json.loads(path.read_text())["annotations"])
    evaluation = COCOeval(truth, results, kind)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)
    assert not list(path.parent.glob("*.tmp"))


def test_voc_files_round_trip(tmp_path: Path) -> None:
    written = records()
    write_voc_xml(tmp_path, written, CLASSES)
    for record in written:
        root = ET.parse(tmp_path / f"{Path(record['file_name']).stem}.xml").getroot()
        assert root.findtext("filename") == record["file_name"] and root.findtext("size/width") == str(record["width"])
        objects = root.findall("object")
        boxes = [[float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects]
        np.testing.assert_allclose(np.array(boxes) - [1, 1, 0, 0], record["detections"]["boxes"], atol=0.01)
        assert [o.findtext("name") for o in objects] == [CLASSES[i - 1] for i in record["detections"]["labels"]]


@pytest.mark.parametrize("scores", [True, False])
def test_yolo_files_round_trip(tmp_path: Path, scores: bool) -> None:
    written = records()
    write_yolo_txt(tmp_path, written, scores=scores)
    for record in written:
        rows = np.loadtxt(tmp_path / f"{Path(record['file_name']).stem}.txt", ndmin=2)
        assert rows.shape[1] == (6 if scores else 5)
        cx, cy, w, h = (rows[:, 1:5] * [record["width"], record["height"], record["width"], record["height"]]).T
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        np.testing.assert_allclose(boxes, record["detections"]["boxes"], atol=0.01)
        np.testing.assert_array_equal(rows[:, 0] + 1, record["detections"]["labels"])
        if scores:
            np.testing.assert_allclose(rows[:, 5], record["detections"]["scores"], atol=1e-4)


def coloured_pixels(path: Path, colour: str) -> int:
    """Pixels of a PNG that are clearly green or magenta (anti-aliased lines are darker than the pure colour)."""
    r, g, b = np.moveaxis(np.asarray(Image.open(path).convert("RGB")).astype(int), -1, 0)
    found = (np.minimum(r, b) > 100) & (g < 80) if colour == "magenta" else (g > 100) & (np.maximum(r, b) < 80)
    return int(found.sum())


def test_drawings_show_truth_and_predictions(tmp_path: Path) -> None:
    image = np.zeros((120, 160, 1), np.uint8)
    truth = {"boxes": np.array([[10, 10, 60, 60]], np.float32), "labels": np.array([1])}
    pred = {
        "boxes": np.array([[80, 40, 150, 110], [0, 0, 5, 5]], np.float32),
        "scores": np.array([0.8, 0.1], np.float32),
        "labels": np.array([2, 1]),
    }
    draw_detections(image, truth, pred, CLASSES, tmp_path / "one.png", score_threshold=0.3)
    assert (
        coloured_pixels(tmp_path / "one.png", "green") > 200 and coloured_pixels(tmp_path / "one.png", "magenta") > 200
    )
    draw_detections(
        image, None, {k: v[1:] for k, v in pred.items()}, CLASSES, tmp_path / "none.png", score_threshold=0.3
    )
    assert coloured_pixels(tmp_path / "none.png", "magenta") == 0  # below the threshold: not drawn


def test_gallery_of_large_images_stays_small(tmp_path: Path) -> None:
    big = np.random.default_rng(0).integers(0, 4000, (3000, 2000, 1), dtype=np.uint16)
    pred = {
        "boxes": np.array([[100, 100, 900, 700]], np.float32),
        "scores": np.array([0.9]),
        "labels": np.array([1]),
        "masks": np.zeros((1, 3000, 2000), bool),
    }
    items = [(f"{i}.tif", big, None, pred, f"image {i}") for i in range(5)]
    detection_gallery(items, tmp_path / "gallery.png", CLASSES)
    width, height = Image.open(tmp_path / "gallery.png").size
    assert width <= 1100 and height <= 600 and (tmp_path / "gallery.png").stat().st_size < 2_000_000


def test_pr_curves_are_drawn(tmp_path: Path) -> None:
    recall = np.linspace(0, 1, 101)
    curves = {"dim": (recall, 1 - recall**2), "bright": (recall, np.where(recall < 0.8, 0.95, -1.0))}
    plot_pr_curves(curves, tmp_path / "pr.png")
    plot_pr_curves(curves, tmp_path / "pr_given.png", f1_points={"dim": (0.5, 0.75), "bright": (0.79, 0.95)})
    assert Image.open(tmp_path / "pr.png").size[0] > 300 and (tmp_path / "pr_given.png").is_file()
