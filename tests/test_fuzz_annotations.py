"""Fuzzed annotation readers: COCO JSON (training data and ``evaluate detect --pred --truth`` files), VOC XML, YOLO
text with its class lists, and instance-label images.

Strategies start from a valid file and mutate it: values replaced by junk (wrong types, NaN, inf, huge and negative
numbers, unicode, long strings, nested junk), keys removed, entries duplicated, boxes outside the image; or the bytes
themselves truncated and overwritten. The contract is ``refused_or_read``'s (see test_fuzz_readers): one clear line
naming the file, or data that passes ``assert_sane``.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pycocotools import mask as mask_utils

from deepscope.data.detection.annotations import load_detection_data
from deepscope.data.detection.types import DetData
from deepscope.errors import DataError
from deepscope.metrics.coco_files import score_coco_files
from test_detect_data import uncompressed_rle, write_image
from test_fuzz_readers import (
    BOMB,
    FUZZ,
    JUNK,
    NASTY_TEXT,
    any_array,
    edit_json,
    encode,
    mutate,
    refused_or_read,
    scratch,
)

WIDTH, HEIGHT = 20, 16


def write_images(folder: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    for name in names:
        write_image(folder / "images" / f"{name}.png", WIDTH, HEIGHT)
    return folder / "images"


def assert_sane(data: DetData) -> None:
    """What training relies on: finite boxes inside the image with width and height, known labels, masks that fit."""
    for items in data.splits.values():
        for item in items:
            boxes = item.boxes
            assert boxes.dtype == np.float32 and np.isfinite(boxes).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert (
                (boxes >= 0).all()
                and (boxes[:, [0, 2]] <= item.width).all()
                and (boxes[:, [1, 3]] <= item.height).all()
            )
            assert ((item.labels >= 1) & (item.labels <= len(data.class_names))).all()
            if item.masks is not None:
                masks = item.masks()  # decoded when training first needs them: the reader must have checked them
                assert masks.dtype == bool and masks.shape == (len(boxes), item.height, item.width)


def load_quietly(**sources: Any) -> DetData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # boxes dropped for zero size are counted in a warning
        data = load_detection_data(**sources)
    assert_sane(data)
    return data


def json_bytes(doc: Any, draw: st.DrawFn) -> bytes:
    """``doc`` after up to four edits, as JSON (NaN and Infinity included), maybe mutated as bytes or replaced by
    random bytes or nesting deeper than any parser recurses."""
    for _ in range(draw(st.integers(0, 4))):
        doc = edit_json(doc, draw)
    kind = draw(st.sampled_from(["json", "json", "json", "bytes", "random", "deep"]))
    if kind == "random":
        return draw(st.binary(max_size=60))
    if kind == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    data = json.dumps(doc).encode()
    return mutate(data, draw) if kind == "bytes" else data


# ------------------------------------------------------------------------------------------------------------ COCO


def coco_segmentation(kind: str, x: float, y: float, w: float, h: float) -> Any:
    if kind == "polygon":
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[int(y) : int(y + h), int(x) : int(x + w)] = 1
    if kind == "counts":
        return uncompressed_rle(mask)
    return {"size": [HEIGHT, WIDTH], "counts": mask_utils.encode(np.asfortranarray(mask))["counts"].decode()}


@st.composite
def coco_document(draw: st.DrawFn) -> dict[str, Any]:
    """A valid COCO file for images a.png and b.png (boxes, maybe masks as polygons or RLE), before any edit."""
    masks = draw(st.sampled_from([None, "polygon", "rle", "counts"]))
    annotations = []
    for i in range(draw(st.integers(0, 4))):
        x, y = draw(st.integers(0, WIDTH - 4)), draw(st.integers(0, HEIGHT - 4))
        w, h = draw(st.integers(1, WIDTH - x)), draw(st.integers(1, HEIGHT - y))
        annotation = {
            "id": i + 1,
            "image_id": draw(st.sampled_from([1, 2])),
            "category_id": draw(st.sampled_from([1, 2])),
            "bbox": [x, y, w, h],
            "area": w * h,
            "iscrowd": 0,
        }
        if masks:
            annotation["segmentation"] = coco_segmentation(masks, x, y, w, h)
        annotations.append(annotation)
    return {
        "images": [
            {"id": i, "file_name": f"{n}.png", "width": WIDTH, "height": HEIGHT} for i, n in ((1, "a"), (2, "b"))
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": annotations,
    }


@FUZZ
@given(coco_document(), st.data())
def test_coco_files_with_junk_fields(doc: dict[str, Any], data: st.DataObject) -> None:
    with scratch() as folder:
        images = write_images(folder)
        path = folder / "instances.json"
        path.write_bytes(json_bytes(doc, data.draw))
        refused_or_read(lambda: load_quietly(images=images, annotations=path), folder, str(path), str(images))


@st.composite
def scored(draw: st.DrawFn) -> tuple[dict[str, Any], Any]:
    """A truth COCO file and predictions of it (a full COCO file or a bare results list), before any edit."""
    truth = draw(coco_document())
    results = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": draw(st.floats(0, 1))}
        for a in truth["annotations"]
    ]
    pred = draw(st.sampled_from([results, {**truth, "annotations": results}]))
    return truth, copy.deepcopy(pred)


@FUZZ
@given(scored(), st.sampled_from(["pred", "truth", "both"]), st.data())
def test_saved_detections_scored_against_junk(
    files: tuple[dict[str, Any], Any], edited: str, data: st.DataObject
) -> None:
    truth, pred = files
    with scratch() as folder:
        pred_path, truth_path = folder / "pred.json", folder / "truth.json"
        pred_path.write_bytes(json_bytes(pred, data.draw) if edited != "truth" else json.dumps(pred).encode())
        truth_path.write_bytes(json_bytes(truth, data.draw) if edited != "pred" else json.dumps(truth).encode())
        result = refused_or_read(
            lambda: score_coco_files(pred_path, truth_path), folder, str(pred_path), str(truth_path)
        )
        assert result is None or all(
            v is None or isinstance(v, (int, float)) for v in result.values() if not isinstance(v, (dict, list))
        )


# ------------------------------------------------------------------------------------------------------------- VOC


DOCTYPES = {  # DTDs a VOC file has no use for; each must be refused without being expanded or followed
    "billion-laughs": '<!DOCTYPE a [<!ENTITY l0 "ha">'
    + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    + "]>",
    "quadratic": '<!DOCTYPE a [<!ENTITY big "' + "x" * 20_000 + '">]>',
    "external": '<!DOCTYPE a [<!ENTITY ext SYSTEM "file:///etc/hostname">]>',
    "parameter": '<!DOCTYPE a [<!ENTITY % p SYSTEM "file:///etc/hostname"> %p;]>',
    "empty": "<!DOCTYPE annotation>",
}
ENTITY_USE = {"billion-laughs": "&l9;", "quadratic": "&big;" * 200, "external": "&ext;", "parameter": "", "empty": ""}


@st.composite
def voc_text(draw: st.DrawFn) -> str:
    """A VOC annotation of a.png (20x16) with fields replaced by junk, elements dropped or repeated, maybe a DTD."""

    def field(tag: str, value: Any) -> str:
        fate = draw(st.sampled_from(["keep"] * 6 + ["junk", "drop", "twice", "nested"]))
        text = escape(draw(st.sampled_from(NASTY_TEXT))) if fate == "junk" else str(value)
        element = f"<{tag}>{text}</{tag}>" if fate != "nested" else f"<{tag}><{tag}>{value}</{tag}></{tag}>"
        return "" if fate == "drop" else element * (2 if fate == "twice" else 1)

    objects = []
    for _ in range(draw(st.integers(0, 3))):
        x1, y1 = draw(st.integers(-3, WIDTH + 3)), draw(st.integers(-3, HEIGHT + 3))
        x2, y2 = draw(st.integers(x1 - 2, WIDTH + 3)), draw(st.integers(y1 - 2, HEIGHT + 3))
        box = "".join(field(tag, v) for tag, v in (("xmin", x1), ("ymin", y1), ("xmax", x2), ("ymax", y2)))
        objects.append(
            f"<object>{field('name', draw(st.sampled_from(['cat', 'dog'])))}{field('difficult', 0)}"
            f"{field('bndbox', '') if not box else f'<bndbox>{box}</bndbox>'}</object>"
        )
    size = f"<size>{field('width', WIDTH)}{field('height', HEIGHT)}</size>"
    doctype = draw(st.sampled_from([None, None, None, *DOCTYPES]))
    use = ENTITY_USE[doctype] if doctype else ""
    if use:
        objects.append(
            f"<object><name>{use}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object>"
        )
    return (DOCTYPES[doctype] if doctype else "") + f"<annotation>{size}{''.join(objects)}</annotation>"


@FUZZ
@given(voc_text(), st.data())
def test_voc_files_with_junk_fields_and_dtds(text: str, data: st.DataObject) -> None:
    with scratch() as folder:
        write_images(folder, ("a",))
        path = folder / "Annotations" / "a.xml"
        path.parent.mkdir()
        path.write_bytes(mutate(text.encode(), data.draw) if data.draw(st.integers(0, 3)) == 0 else text.encode())
        refused_or_read(lambda: load_quietly(data=folder), folder, str(path))


@pytest.mark.parametrize("doctype", sorted(DOCTYPES))
def test_voc_dtds_and_entities_are_refused_naming_the_file(tmp_path: Path, doctype: str) -> None:
    """Refused by defusedxml before any expansion; with xml.etree only expat's own limits (2.4.1 and later) stood between
    a billion laughs and the memory, and the quadratic blowup and an empty DTD were read."""
    write_images(tmp_path, ("a",))
    path = tmp_path / "Annotations" / "a.xml"
    path.parent.mkdir()
    use = ENTITY_USE[doctype] or "cat"
    path.write_text(
        f"{DOCTYPES[doctype]}<annotation><object><name>{use}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>4</xmax><ymax>4</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(DataError, match=rf"^{path}: .*(DTD|entit)"):
        load_detection_data(data=tmp_path)


def test_external_entity_is_not_resolved(tmp_path: Path) -> None:
    """The entity points at a file holding a valid class name: resolving it would load the data with that class."""
    secret = tmp_path / "secret.txt"
    secret.write_text("topsecretclass")
    write_images(tmp_path / "data", ("a",))
    path = tmp_path / "data" / "Annotations" / "a.xml"
    path.parent.mkdir()
    path.write_text(
        f'<!DOCTYPE a [<!ENTITY ext SYSTEM "{secret.as_uri()}">]><annotation><object><name>&ext;</name>'
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(DataError) as refused:
        load_detection_data(data=tmp_path / "data")
    assert str(refused.value).startswith(f"{path}: ") and "topsecretclass" not in str(refused.value)


# ------------------------------------------------------------------------------------------------------------ YOLO


@st.composite
def yolo_lines(draw: st.DrawFn) -> bytes:
    """Rows ``class cx cy w h`` with fields replaced by junk, missing or extra, or the bytes mutated."""
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        fields = [str(draw(st.integers(-1, 3))), *(repr(draw(st.floats(-0.2, 1.2))) for _ in range(4))]
        for _ in range(draw(st.integers(0, 2))):
            edit = draw(st.sampled_from(["junk", "drop", "extra"]))
            if edit == "junk":
                fields[draw(st.integers(0, len(fields) - 1))] = (
                    draw(st.sampled_from(NASTY_TEXT)).replace("\n", "").strip() or "x"
                )
            elif edit == "drop" and fields:
                fields.pop()
            else:
                fields.append("0.5")
        lines.append(" ".join(fields))
    return mutate("\n".join(lines).encode(), draw)


CLASS_LISTS = st.one_of(
    st.builds(
        lambda names: ("classes.txt", "\n".join(names).encode()), st.lists(st.sampled_from(NASTY_TEXT), max_size=4)
    ),
    st.builds(
        lambda names: ("data.yaml", yaml.safe_dump({"names": names}).encode()),
        st.one_of(JUNK, st.lists(st.sampled_from(["cat", "dog", "bird"]), min_size=1, max_size=4)),
    ),
    st.sampled_from(
        [
            ("data.yaml", f"x: {BOMB}\nnames: *i\n".encode()),
            ("data.yaml", f"x: {BOMB}\nnames: {{0: *i}}\n".encode()),
            ("data.yaml", f"x: {BOMB}\nnames: [*i]\n".encode()),
            ("data.yaml", b"names: !!python/object/apply:os.getcwd []"),
            ("data.yaml", b"names: {0: a, x: b}"),
            ("data.yaml", b"names: " + b"[" * 5000 + b"]" * 5000),
            ("classes.txt", b"\xff\xfe cat"),
            ("data.yaml", b"\xc3\x28: x"),
            ("classes.txt", b"\n\n"),
        ]
    ),
    st.builds(lambda data: ("data.yaml", data), st.binary(max_size=30)),
)


@FUZZ
@given(yolo_lines(), CLASS_LISTS)
def test_yolo_files_and_class_lists_with_junk(lines: bytes, class_list: tuple[str, bytes]) -> None:
    with scratch() as folder:
        write_images(folder, ("a",))
        (folder / "labels").mkdir()
        (folder / "labels" / "a.txt").write_bytes(lines)
        name, content = class_list
        (folder / name).write_bytes(content)
        refused_or_read(lambda: load_quietly(data=folder), folder, str(folder))


# --------------------------------------------------------------------------------------------- instance-label images


@FUZZ
@given(
    st.one_of(
        any_array(max_dims=3),
        st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.uint64]).flatmap(
            lambda dtype: hnp.arrays(
                dtype, (HEIGHT, WIDTH), elements=st.sampled_from([0, 0, 1, 2, 7, np.iinfo(dtype).max])
            )
        ),
    ),
    st.sampled_from(["png", "tif", "npz"]),
)
def test_instance_label_images_of_any_dtype_and_ids(labels: np.ndarray, fmt: str) -> None:
    with scratch() as folder:
        write_images(folder, ("a",))
        (folder / "masks").mkdir()
        name = "a.tif" if fmt == "tif" else "a.png"  # NPZ bytes named .png: a label file with the wrong header
        (folder / "masks" / name).write_bytes(encode(labels, fmt))
        data = refused_or_read(lambda: load_quietly(data=folder), folder, str(folder))
        if data is not None:
            item = data.splits["all"][0]
            assert len(item.boxes) == len({int(v) for v in np.unique(labels)} - {0})


def test_json_numbers_beyond_float_are_refused(tmp_path: Path) -> None:
    """JSON has integers of any size; float() of 10**400 raises OverflowError, which the reader did not expect."""
    images = write_images(tmp_path)
    doc = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10**400, 2]}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"^{path}: "):
        load_detection_data(images=images, annotations=path)
