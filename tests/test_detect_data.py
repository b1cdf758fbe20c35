"""Detection readers: VOC XML, COCO JSON, YOLO txt and instance-label images give known boxes, classes and masks;
bad annotations fail with one line naming the file; Penn-Fudan's three annotation sources agree."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deepscope.data.detection import annotations as detection
from deepscope.data.detection.annotations import coco_ground_truth, load_detection_data
from deepscope.data.io.images import read_image
from deepscope.errors import DataError

# ------------------------------------------------------------------------------------------------- file writers


def write_image(path: Path, width: int = 20, height: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)
    return path


def write_voc(path: Path, objects: list[tuple], size: tuple[int, int] | None = (20, 16)) -> Path:
    """``objects``: (name, xmin, ymin, xmax, ymax[, difficult]) in VOC's 1-based inclusive pixels."""
    parts = ["<annotation><filename>x.png</filename>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, xmin, ymin, xmax, ymax, *difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult[0] if difficult else 0}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts) + "</annotation>")
    return path


def voc_set(folder: Path, objects: dict[str, list[tuple]]) -> Path:
    """``folder/images/<stem>.png`` (20x16) and ``folder/Annotations/<stem>.xml`` per entry."""
    for stem, objs in objects.items():
        write_image(folder / "images" / f"{stem}.png")
        write_voc(folder / "Annotations" / f"{stem}.xml", objs)
    return folder


def write_labels(path: Path, labels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(path)
    return path


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def expected_masks() -> np.ndarray:
    """Three 16x20 masks: a polygon rectangle, an L shape (uncompressed RLE), a blob (compressed RLE)."""
    masks = np.zeros((3, 16, 20), dtype=bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4:10, 6:8] = True
    masks[1, 8:10, 6:12] = True
    masks[2, 12:15, 14:19] = True
    masks[2, 13, 13] = True
    return masks


def coco_set(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Two 20x16 images (ids 11 and 5), categories with ids 7 (dog) and 3 (cat), masks in all three encodings."""
    images = tmp_path / "images"
    for name in ("a.png", "b.png"):
        write_image(images / name)
    masks = expected_masks()
    compressed = mask_utils.encode(np.asfortranarray(masks[2].astype(np.uint8)))
    coco = {
        "images": [{"id": 11, "file_name": "sub/a.png", "width": 20, "height": 16}, {"id": 5, "file_name": "b.png"}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 11,
                "category_id": 7,
                "bbox": [2, 1, 3, 2],
                "area": 6.0,
                "iscrowd": 0,
                "segmentation": [[2, 1, 5, 1, 5, 3, 2, 3]],
            },
            {
                "id": 2,
                "image_id": 11,
                "category_id": 3,
                "bbox": [6, 4, 6, 6],
                "area": 16.0,
                "iscrowd": 1,
                "segmentation": uncompressed_rle(masks[1]),
            },
            {
                "id": 3,
                "image_id": 11,
                "category_id": 7,
                "bbox": [13, 12, 6, 3],
                "area": 16.0,
                "iscrowd": 0,
                "segmentation": {"size": [16, 20], "counts": compressed["counts"].decode()},
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return images, path, coco


def raises(match: str, path: Path | str, **kwargs) -> str:
    """Load with ``kwargs``; the error must be one line that names ``path`` and contains ``match``."""
    with pytest.raises(DataError) as info:
        load_detection_data(**kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and match in message, message
    return message


# ---------------------------------------------------------------------------------------------------------- VOC


def test_voc_boxes_are_converted_from_one_based_inclusive(tmp_path: Path) -> None:
    root = voc_set(tmp_path, {"a": [("dog", 3, 5, 10, 8), ("cat", 1, 1, 20, 16, 1)], "b": []})
    data = load_detection_data(root)
    assert data.class_names == ["cat", "dog"]  # sorted names
    a, b = data.splits["all"]
    assert (a.name, a.width, a.height, a.image_id, b.image_id) == ("a.png", 20, 16, 1, 2)
    np.testing.assert_array_equal(a.boxes, [[2, 4, 10, 8], [0, 0, 20, 16]])
    assert a.boxes.dtype == np.float32 and a.labels.tolist() == [2, 1] and a.crowd.tolist() == [False, True]
    assert a.masks is None and a.area is None
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,) and b.crowd.shape == (0,)
    assert read_image(a.path).shape == (16, 20, 3)


def test_class_names_fix_the_order_and_unknown_names_fail(tmp_path: Path) -> None:
    root = voc_set(tmp_path, {"a": [("dog", 3, 5, 10, 8), ("cat", 1, 1, 4, 4)]})
    data = load_detection_data(root, class_names=["dog", "cat"])
    assert data.class_names == ["dog", "cat"] and data.splits["all"][0].labels.tolist() == [1, 2]
    raises("'cat'", root / "Annotations" / "a.xml", data=root, class_names=["dog", "bird"])


def test_split_folders_keep_ids_unique_and_names_shared(tmp_path: Path) -> None:
    voc_set(tmp_path / "train", {"a": [("dog", 3, 5, 10, 8)], "b": [("cat", 1, 1, 4, 4)]})
    voc_set(tmp_path / "val", {"a": [("bird", 2, 2, 3, 3)]})
    data = load_detection_data(tmp_path)
    assert list(data.splits) == ["train", "val"] and data.class_names == ["bird", "cat", "dog"]
    assert [item.image_id for split in data.splits.values() for item in split] == [1, 2, 3]
    assert data.splits["val"][0].labels.tolist() == [1]


def test_boxes_within_one_pixel_are_clipped_and_empty_ones_dropped(tmp_path: Path) -> None:
    # x2 = 21 is 1 px past the 20 px wide image: clipped; xmin = xmax = 0 is (-1, 0) -> zero width once clipped: dropped
    root = voc_set(tmp_path, {"a": [("dog", 3, 0, 21, 8), ("dog", 0, 2, 0, 5), ("dog", 1, 1, 2, 2)]})
    with pytest.warns(UserWarning, match="1 boxes dropped"):
        item = load_detection_data(root).splits["all"][0]
    np.testing.assert_array_equal(item.boxes, [[2, 0, 20, 8], [0, 0, 2, 2]])
    assert item.labels.tolist() == [1, 1] and len(detection.DROPPED_BOXES) == 1
    assert "a.xml: object 2" in detection.DROPPED_BOXES[0]


@pytest.mark.parametrize(
    ("objects", "match"),
    [
        ([("dog", 3, 5, 10, 8), ("dog", 12, 5, 10, 8)], "object 2 has x2 < x1 (10 < 11)"),
        ([("dog", 3, 10, 10, 8)], "object 1 has y2 < y1 (8 < 9)"),
        ([("dog", 3, 5, 23, 8)], "outside the 20x16 image"),
    ],
)
def test_bad_voc_boxes_fail_naming_the_object(tmp_path: Path, objects: list[tuple], match: str) -> None:
    root = voc_set(tmp_path, {"a": objects})
    raises(match, root / "Annotations" / "a.xml", data=root)


def test_voc_size_must_match_the_image_and_xml_must_parse(tmp_path: Path) -> None:
    root = voc_set(tmp_path, {"a": [("dog", 3, 5, 10, 8)]})
    write_voc(root / "Annotations" / "a.xml", [("dog", 3, 5, 10, 8)], size=(30, 16))
    raises("states image size 30x16", root / "Annotations" / "a.xml", data=root)
    (root / "Annotations" / "a.xml").write_text("<annotation><object></annotation>")
    raises("unparseable XML", root / "Annotations" / "a.xml", data=root)


# --------------------------------------------------------------------------------------------------------- COCO


def test_coco_boxes_classes_flags_and_masks(tmp_path: Path) -> None:
    images, path, _ = coco_set(tmp_path)
    data = load_detection_data(images=images, annotations=path)
    assert data.class_names == ["cat", "dog"]  # ordered by category id: 3, 7
    a, b = data.splits["all"]
    assert (a.image_id, b.image_id) == (11, 5)
    np.testing.assert_array_equal(a.boxes, [[2, 1, 5, 3], [6, 4, 12, 10], [13, 12, 19, 15]])
    assert a.labels.tolist() == [2, 1, 2] and a.crowd.tolist() == [False, True, False]
    assert a.area.tolist() == [6.0, 16.0, 16.0]
    masks = a.masks()
    assert masks.dtype == bool and masks.shape == (3, 16, 20)
    np.testing.assert_array_equal(masks, expected_masks())
    assert b.boxes.shape == (0, 4) and b.masks().shape == (0, 16, 20)


def test_coco_found_beside_images_or_in_annotations_folder(tmp_path: Path) -> None:
    _, path, _ = coco_set(tmp_path)
    assert len(load_detection_data(tmp_path).splits["all"]) == 2
    (tmp_path / "annotations").mkdir()
    path.rename(tmp_path / "annotations" / path.name)
    assert len(load_detection_data(tmp_path).splits["all"][0].boxes) == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c["annotations"][1].update(image_id=99), "annotation 2 has image_id 99"),
        (lambda c: c["annotations"][0].update(category_id=4), "annotation 1 has category_id 4"),
        (lambda c: c["images"][1].update(file_name="missing.png"), "image missing.png (id 5) not found"),
        (lambda c: c["images"].pop(), "b.png; give the matching JSON"),
        (lambda c: c["annotations"][0].update(bbox=[5, 1, -3, 2]), "annotation 1 (image a.png) has x2 < x1"),
    ],
)
def test_inconsistent_coco_fails_naming_the_json(tmp_path: Path, change, match: str) -> None:
    images, path, coco = coco_set(tmp_path)
    change(coco)
    path.write_text(json.dumps(coco))
    raises(match, path, images=images, annotations=path)


def test_unparseable_json_fails_naming_it(tmp_path: Path) -> None:
    images, path, _ = coco_set(tmp_path)
    path.write_text('{"images": [')
    raises("unparseable JSON", path, images=images, annotations=path)


# --------------------------------------------------------------------------------------------------------- YOLO


def yolo_set(tmp_path: Path, lines: str) -> Path:
    write_image(tmp_path / "images" / "a.png", width=20, height=10)
    write_image(tmp_path / "images" / "b.png", width=20, height=10)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(lines)
    return tmp_path


def test_yolo_boxes_are_scaled_from_normalised_centres(tmp_path: Path) -> None:
    root = yolo_set(tmp_path, "1 0.5 0.5 0.5 0.4\n\n0 0.1 0.2 0.2 0.4\n")
    (root / "classes.txt").write_text("car\nbus\n")
    data = load_detection_data(root)
    a, b = data.splits["all"]
    assert data.class_names == ["car", "bus"]
    np.testing.assert_allclose(a.boxes, [[5, 3, 15, 7], [0, 0, 4, 4]], atol=1e-5)
    assert a.labels.tolist() == [2, 1] and b.boxes.shape == (0, 4)  # b.png has no txt file: no objects


def test_yolo_class_list_from_data_yaml_above_split_folders_or_argument(tmp_path: Path) -> None:
    yolo_set(tmp_path / "train", "1 0.5 0.5 0.5 0.4\n")
    (tmp_path / "data.yaml").write_text("names:\n  0: car\n  1: bus\n")
    assert load_detection_data(tmp_path).class_names == ["car", "bus"]
    (tmp_path / "data.yaml").unlink()
    raises("classes.txt", tmp_path / "train" / "labels", data=tmp_path)
    data = load_detection_data(tmp_path, class_names=["van", "tram"])
    assert data.splits["train"][0].labels.tolist() == [2]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ("0 0.5 0.5 0.5 0.4\n0 0.5 0.5 0.5\n", "a.txt:2: expected 5 values"),
        ("0 0.5 1.5 0.5 0.4\n", "a.txt:1: coordinates must be normalised to [0, 1]"),
        ("2 0.5 0.5 0.5 0.4\n", "a.txt:1: class 2 is not in 0..1"),
    ],
)
def test_bad_yolo_lines_fail_naming_file_and_line(tmp_path: Path, lines: str, match: str) -> None:
    root = yolo_set(tmp_path, lines)
    raises(match, root / "labels" / "a.txt", data=root, class_names=["car", "bus"])


def test_yolo_file_without_image_fails(tmp_path: Path) -> None:
    root = yolo_set(tmp_path, "0 0.5 0.5 0.5 0.4\n")
    (root / "labels" / "c.txt").write_text("")
    raises("for c.txt (matched by name)", root / "labels", data=root, class_names=["car"])


# -------------------------------------------------------------------------------------------- instance masks


def test_label_images_give_tight_boxes_and_masks(tmp_path: Path) -> None:
    labels = np.zeros((16, 20), dtype=np.uint8)
    labels[2, 3] = 1  # one pixel: a box 1 px wide and high
    labels[5:9, 10:18] = 7
    write_image(tmp_path / "images" / "a.png")
    write_labels(tmp_path / "masks" / "a_mask.png", labels)
    write_image(tmp_path / "images" / "b.png")
    write_labels(tmp_path / "masks" / "b.png", np.zeros((16, 20)))
    data = load_detection_data(tmp_path)
    a, b = data.splits["all"]
    assert data.class_names == ["object"] and a.labels.tolist() == [1, 1]
    np.testing.assert_array_equal(a.boxes, [[3, 2, 4, 3], [10, 5, 18, 9]])
    assert a.area.tolist() == [1.0, 32.0]
    np.testing.assert_array_equal(a.masks(), np.stack([labels == 1, labels == 7]))
    assert b.boxes.shape == (0, 4) and b.masks().shape == (0, 16, 20)


def test_label_image_of_another_size_fails_naming_both(tmp_path: Path) -> None:
    image = write_image(tmp_path / "images" / "a.png")
    mask = write_labels(tmp_path / "masks" / "a.png", np.ones((16, 21)))
    message = raises("mask is 21x16", mask, data=tmp_path)
    assert str(image) in message


def test_two_annotation_sources_ask_to_choose(tmp_path: Path) -> None:
    root = voc_set(tmp_path, {"a": [("dog", 3, 5, 10, 8)]})
    write_labels(root / "masks" / "a.png", np.ones((16, 20)))
    raises("--images and --annotations", root, data=root)


# ---------------------------------------------------------------------------------------------- coco_ground_truth


def test_coco_ground_truth_is_what_pycocotools_scores_perfectly(tmp_path: Path) -> None:
    images, path, _ = coco_set(tmp_path)
    data = load_detection_data(images=images, annotations=path)
    gt_dict = coco_ground_truth(data.class_names, data.splits["all"], masks=True)
    json.dumps(gt_dict)  # RLE counts are str, so it can be written as JSON
    assert [c["id"] for c in gt_dict["categories"]] == [1, 2]
    assert [a["id"] for a in gt_dict["annotations"]] == [1, 2, 3]
    assert gt_dict["annotations"][1]["bbox"] == [6, 4, 6, 6] and gt_dict["annotations"][1]["iscrowd"] == 1
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        np.testing.assert_array_equal(gt.annToMask(gt.anns[3]), expected_masks()[2])
        detections = [dict(a, score=1.0) for a in gt_dict["annotations"] if not a["iscrowd"]]
        for iou_type in ("bbox", "segm"):
            evaluation = COCOeval(gt, gt.loadRes(detections), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            assert evaluation.stats[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- Penn-Fudan


def test_pennfudan_sources_agree(shared_data: Path) -> None:
    root = shared_data / "pennfudan"
    images = root / "PNGImages"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no box is dropped
        voc, coco, masks = (
            load_detection_data(images=images, annotations=root / name).splits["all"]
            for name in ("Annotations_voc_xml", "annotations_coco.json", "PedMasks")
        )
    assert len(voc) == len(coco) == len(masks) == 130
    assert sum(len(item.boxes) for item in voc) == 308
    differences = []
    for v, c, m in zip(voc, coco, masks):
        assert v.name == c.name == m.name and (v.width, v.height) == (c.width, c.height) == (m.width, m.height)
        assert len(v.boxes) == len(c.boxes) == len(m.boxes), v.name
        np.testing.assert_allclose(v.boxes, c.boxes, atol=1.0, err_msg=v.name)
        differences += np.abs(v.boxes - m.boxes).max(axis=1).tolist() if len(v.boxes) else []
    # the hand-drawn boxes and the masks' tight boxes agree within 1 px for all but 3 of 308 (the README: at most 6 px)
    assert np.mean(np.array(differences) <= 1.0) > 0.98 and max(differences) <= 6.0
    for c, m in zip(coco[:10], masks[:10]):
        np.testing.assert_array_equal(c.masks(), m.masks(), err_msg=c.name)
