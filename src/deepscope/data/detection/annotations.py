"""Object-detection annotations read into :class:`DetData`: Pascal VOC XML, COCO JSON, YOLO txt, instance-label images.

Each format is first read into per-image objects that carry class *names* (``_Annotated``); class indices are given
only once every split is read, because VOC names are known only then and ``class_names`` may fix their order. Every
box is then checked against the size of its image, read from the image header (no pixel decoding), so that hundreds
of images load in well under a second.

Boxes that overhang the image by at most 1 px are clipped (annotation tools round); boxes left with zero width or
height are dropped and described in :data:`DROPPED_BOXES`; anything worse is an error naming the file.

COCO files must list exactly the images of their folder: an image on disk the JSON does not list is an error rather
than silently left out, since that usually means the JSON of another split or data set was given.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast, overload
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeXML
import numpy as np
import pycocotools.mask as mask_utils
import yaml
from defusedxml import DefusedXmlException

from deepscope.data.detection.types import DetData, DetItem
from deepscope.data.io.images import is_image_file, probe_image
from deepscope.data.io.splits import SPLITS
from deepscope.data.io.volumes import read_volume
from deepscope.data.segmentation.label_checks import compact_ids
from deepscope.errors import DataError, exception_line, plain, shown

ANNOTATION_FOLDERS = ("Annotations", "annotations", "labels", "masks")  # beside images/, told apart by what they hold
CLASS_LIST_FILES = ("classes.txt", "classes.names", "data.yaml")  # YOLO class lists, looked up in this order
MASK_SUFFIX = "_mask"  # label images may be named <image stem>_mask (Penn-Fudan's PedMasks/)
OUTSIDE_TOLERANCE = 1.0  # pixels a box may overhang its image before it is an error rather than clipped
MASK_CLASS = "object"  # the one class of instance-label images when no class name is given
DROPPED_BOXES: list[str] = []  # why each box of the last load_detection_data call was dropped (zero size once clipped)


@dataclass
class _Annotated:
    """One image's objects as a file states them: class names, not yet indices; boxes not yet checked."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float64 x1, y1, x2, y2, 0-based pixels
    names: list[str]  # class name of each object
    crowd: np.ndarray  # (N,) bool
    refs: list[str]  # where each object is written ("path: object 3", "path:4"), for error messages
    area: np.ndarray | None = None
    masks: Callable[[], np.ndarray] | None = None
    image_id: int | None = None


@dataclass
class _Source:
    """The images one annotation source describes; ``names`` is its fixed class list (None for VOC, whose classes are
    the names its objects use)."""

    path: Path
    items: list[_Annotated]
    names: list[str] | None


# ----------------------------------------------------------------------------------------------------------- files


def _images_in(folder: Path) -> list[Path]:
    """Image files of ``folder`` sorted by name; two with one stem (a.png, a.jpg) would make matching by stem a guess."""
    if not folder.is_dir():
        raise DataError(f"{folder}: images folder not found")
    images = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not images:
        raise DataError(f"{folder}: no images found (PNG, JPEG, TIFF or BMP)")
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise DataError(
                f"{path}: same name as {stems[path.stem].name}; annotations are matched by name, so keep only one"
            )
        stems[path.stem] = path
    return images


def _image_size(path: Path) -> tuple[int, int]:
    height, width, _, _ = probe_image(path)
    return width, height


def _check_size(source: Path, image: Path, stated: tuple[int, ...], actual: tuple[int, int]) -> None:
    if stated != actual:
        raise DataError(f"{source}: states image size {stated[0]}x{stated[1]} but {image} is {actual[0]}x{actual[1]}")


@overload
def _partners(
    images: list[Path], files: list[Path], kind: str, required: Literal[True]
) -> Sequence[tuple[Path, Path]]: ...
@overload
def _partners(
    images: list[Path], files: list[Path], kind: str, required: bool
) -> Sequence[tuple[Path, Path | None]]: ...
def _partners(images: list[Path], files: list[Path], kind: str, required: bool) -> Sequence[tuple[Path, Path | None]]:
    """Each image with its annotation file, matched by stem or stem + ``_mask``; a file without an image is an error,
    and so is an image without a file when ``required`` (otherwise it has no objects)."""
    by_stem = {f.stem: f for f in files}
    pairs, used = [], set()
    for image in images:
        file = by_stem.get(image.stem) or by_stem.get(image.stem + MASK_SUFFIX)
        if file is None and required:
            raise DataError(
                f"{image}: no {kind} file named {image.stem}.* or {image.stem}{MASK_SUFFIX}.* (matched by name)"
            )
        pairs.append((image, file))
        used.add(file)
    unused = [f for f in files if f not in used]
    if unused:
        names = _few(f.name for f in unused)
        raise DataError(f"{unused[0].parent}: no image in {images[0].parent} for {names} (matched by name)")
    return pairs


def _few(names: Iterable[str], limit: int = 3) -> str:
    """Up to ``limit`` names, and how many more: enough to find the culprits without a page-long line."""
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _boxes(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _read_text(path: Path) -> str:
    """A text annotation file (JSON, YOLO rows, a class list) as UTF-8; errors name the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exception_line(exc)})") from None


# ---------------------------------------------------------------------------------------------------------- VOC XML


def _parse_xml(path: Path) -> Element:
    """VOC files come from anywhere: defusedxml refuses any DTD, so no entity is expanded (billion laughs, quadratic
    blowup) and no external file or URL is read. VOC files need no DTD."""
    try:
        return SafeXML.parse(path, forbid_dtd=True).getroot()
    except DefusedXmlException as exc:
        raise DataError(
            f"{path}: XML with a DTD or entities is refused; VOC files need neither ({type(exc).__name__})"
        ) from None
    except SafeXML.ParseError as exc:
        raise DataError(f"{path}: unparseable XML ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exception_line(exc)})") from None


def _voc_text(element: Element, tag: str, where: str) -> str:
    text = element.findtext(tag)
    if text is None or not text.strip():
        raise DataError(f"{where} has no <{tag}>")
    return text.strip()


def _voc_number(element: Element, tag: str, where: str) -> float:
    """A finite number: NaN or inf would pass float() and fail later, as int() of a size or as a box."""
    text = _voc_text(element, tag, where)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{where}: <{tag}> is not a finite number ({shown(text)})")
    return number


def _read_voc_file(image: Path, path: Path) -> _Annotated:
    """VOC corners are 1-based and inclusive: pixel columns xmin..xmax are the 0-based half-open [xmin - 1, xmax)."""
    root = _parse_xml(path)
    width, height = _image_size(image)
    has_size = root.find("size") is not None
    stated = (
        tuple(int(_voc_number(root, f"size/{tag}", str(path))) for tag in ("width", "height")) if has_size else None
    )
    if stated is not None and stated != (0, 0):  # some tools write 0 when they do not know the size
        _check_size(path, image, stated, (width, height))
    objects = voc_objects(root, path)
    crowd = np.array([o.difficult for o in objects], dtype=bool)
    boxes = _boxes([o.box for o in objects])
    return _Annotated(image, width, height, boxes, [o.name for o in objects], crowd, [o.where for o in objects])


@dataclass
class VocObject:
    """One ``<object>`` of a VOC file: its box as 0-based half-open x1 y1 x2 y2, its class name, its difficult flag,
    the ``<score>`` deepscope's predictions add (None in annotations), and where it is, for messages."""

    box: list[float]
    name: str
    difficult: bool
    score: float | None
    where: str


def voc_objects(root: Element, path: Path) -> list[VocObject]:
    """The objects of a parsed VOC file (see :func:`_read_voc_file` for the corner convention)."""
    found = []
    for i, obj in enumerate(root.findall("object"), start=1):
        where = f"{path}: object {i}"
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{where} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_voc_number(box, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        score = _voc_number(obj, "score", where) if obj.find("score") is not None else None
        difficult = obj.findtext("difficult", "0").strip() == "1"
        found.append(
            VocObject([xmin - 1, ymin - 1, xmax, ymax], _voc_text(obj, "name", where), difficult, score, where)
        )
    return found


def read_voc_file(path: Path) -> tuple[str, list[VocObject]]:
    """The image file name a VOC file names (its own stem when it names none) and its objects, without reading the
    image; DataError for a file that is not VOC XML."""
    root = _parse_xml(path)
    if root.tag != "annotation":
        raise DataError(f"{path}: not a VOC annotation (its root element is <{root.tag}>)")
    return (root.findtext("filename") or path.stem).strip(), voc_objects(root, path)


def _read_voc(images: list[Path], folder: Path) -> _Source:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml")
    items = [_read_voc_file(image, xml) for image, xml in _partners(images, files, "VOC XML", required=True)]
    return _Source(folder, items, None)


# -------------------------------------------------------------------------------------------------------- COCO JSON


def read_json(path: Path) -> Any:
    """A JSON file (COCO annotations or results) as UTF-8; every error, deep nesting included, names the file."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: unparseable JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"{path}: unparseable JSON (nested too deeply)") from None


def is_number(value: Any) -> bool:
    """A finite number, not a bool: JSON integers have no bound, and float() of one beyond 1e308 raises OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _coco_id(value: Any) -> int:
    """An id as COCO writes it, an integer (or its digits); 1.5 or true would otherwise become id 1 of another entry.
    Anything else raises TypeError, ValueError or OverflowError, which :func:`_read_coco` reports."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"id {value!r} is not an integer")
    return int(value)


def _string_runs(counts: str) -> np.ndarray | None:
    """The run lengths that a compressed COCO RLE string encodes, or None when it is not one.

    Decoded as pycocotools' ``rleFrString`` (maskApi.c) does: characters from 48 carry 5 bits each, least significant
    first, bit 6 saying another follows and bit 5 of the last the sign; every run after the second is stored as the
    difference to the run two before it.
    """
    codes: np.ndarray = (
        np.frombuffer(counts.encode("ascii"), np.uint8).astype(np.int64) - 48 if counts.isascii() else np.zeros(0)
    )
    if not codes.size or codes.min() < 0 or codes.max() > 63 or codes[-1] & 0x20:
        return None
    ends = np.flatnonzero((codes & 0x20) == 0)  # the last character of each number
    starts = np.concatenate([[0], ends[:-1] + 1])
    digit = np.arange(codes.size) - np.repeat(starts, ends - starts + 1)
    if digit.max() > 6:  # more than 35 bits: no run of an image is that long
        return None
    values = np.add.reduceat((codes & 0x1F) << (5 * digit), starts)
    values -= np.where(codes[ends] & 0x10, 1 << (5 * (digit[ends] + 1)), 0)
    values[1::2], values[2::2] = np.cumsum(values[1::2]), np.cumsum(values[2::2])
    return values


def _checked_polygons(polygons: list, where: str, height: int, width: int) -> None:
    """pycocotools takes a polygon of 4 numbers for a box, other shapes with a bare ``Exception``, and rasterises a NaN
    or huge coordinate until the memory runs out (as fuzzing found); polygons may overhang like boxes, by 1 px."""
    for polygon in polygons:
        if not (
            isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0 and all(map(is_number, polygon))
        ):
            raise DataError(f"{where}: polygons must be lists of at least 3 x, y pairs of finite numbers")
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if (
            xy.min() < -OUTSIDE_TOLERANCE
            or xy[:, 0].max() > width + OUTSIDE_TOLERANCE
            or xy[:, 1].max() > height + OUTSIDE_TOLERANCE
        ):
            raise DataError(f"{where}: a polygon point lies outside the {width}x{height} image by more than 1 px")


def _checked_segmentation(segmentation: Any, where: str, height: int, width: int) -> Any:
    """Refuse what pycocotools would misread or crash on, when the file is read rather than when a mask is first
    needed: bad polygons (:func:`_checked_polygons`), an RLE of another size, and RLE counts that do not add up to
    the image (negative ones raise OverflowError, too few leave the rest of the decoded mask uninitialised memory)."""
    if isinstance(segmentation, list):
        _checked_polygons(segmentation, where, height, width)
        return segmentation
    if not (
        isinstance(segmentation, dict)
        and isinstance(segmentation.get("counts"), (list, str))
        and "size" in segmentation
    ):
        raise DataError(f"{where}: segmentation is neither polygons nor an RLE dict with 'size' and 'counts'")
    size = segmentation["size"]
    if not (isinstance(size, list) and [type(v) for v in size] == [int, int] and size == [height, width]):
        raise DataError(f"{where}: mask size {shown(size)} (h, w) differs from the image's {[height, width]}")
    counts = segmentation["counts"]
    runs = _string_runs(counts) if isinstance(counts, str) else counts if all(type(c) is int for c in counts) else None
    if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
        raise DataError(
            f"{where}: RLE counts are not run lengths adding up to the {height}x{width} pixels of the image"
        )
    return segmentation


def _coco_rle(segmentation: Any, height: int, width: int) -> dict:
    """Polygons (merged into one mask), uncompressed RLE (counts a list) or compressed RLE (counts a string)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _coco_masks(segmentations: list[Any], height: int, width: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        rles = [_coco_rle(s, height, width) for s in segmentations]
        if not rles:
            return np.zeros((0, height, width), dtype=bool)
        return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)

    return load


def _coco_images(coco: dict, path: Path, images: list[Path]) -> dict[int, tuple[Path, dict]]:
    """Image id -> (file on disk, JSON entry), matched by file name (``file_name`` may hold a folder, as Penn-Fudan's)."""
    on_disk = {p.name: p for p in images}
    found: dict[int, tuple[Path, dict]] = {}
    listed: set[str] = set()
    for entry in coco["images"]:
        name, image_id = PurePosixPath(str(entry["file_name"]).replace("\\", "/")).name, _coco_id(entry["id"])
        if name not in on_disk:
            raise DataError(
                f"{path}: image {plain(entry['file_name'])} (id {image_id}) not found in {images[0].parent}"
            )
        if name in listed:
            raise DataError(f"{path}: image {name} is listed twice")
        if image_id in found:
            raise DataError(f"{path}: image id {image_id} is used twice")
        listed.add(name)
        found[image_id] = (on_disk[name], entry)
    unlisted = sorted(set(on_disk) - listed)
    if unlisted:
        folder = images[0].parent
        raise DataError(
            f"{folder}: images not listed in {path}: {_few(unlisted)}; give the matching JSON or remove them"
        )
    return found


def _coco_categories(coco: dict, path: Path) -> dict[int, str]:
    """Category id -> name; a repeated id or name would merge two classes or drop one."""
    categories: dict[int, str] = {}
    for category in coco["categories"]:
        category_id = _coco_id(category["id"])
        if category_id in categories:
            raise DataError(f"{path}: category id {category_id} is used twice")
        categories[category_id] = str(category["name"])
    if len(set(categories.values())) != len(categories):
        raise DataError(f"{path}: two categories share a name; classes are told apart by name")
    return categories


def _read_coco_entries(coco: dict, path: Path, images: list[Path]) -> _Source:
    categories = _coco_categories(coco, path)
    names = [categories[i] for i in sorted(categories)]
    by_id = _coco_images(coco, path, images)
    objects: dict[int, list[dict]] = {i: [] for i in by_id}
    annotations = coco.get("annotations", [])
    for ann in annotations:
        where = f"{path}: annotation {shown(ann.get('id'))}"
        if _coco_id(ann["image_id"]) not in objects:
            raise DataError(f"{where} has image_id {shown(ann['image_id'])}, which is not in 'images'")
        if _coco_id(ann["category_id"]) not in categories:
            raise DataError(f"{where} has category_id {shown(ann['category_id'])}, not in 'categories'")
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise DataError(f"{where} bbox must be [x, y, width, height], got {shown(ann['bbox'])}")
        if "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
            raise DataError(f"{where} area must be a number >= 0, got {shown(ann['area'])}")
        objects[_coco_id(ann["image_id"])].append(ann)
    with_masks = bool(annotations) and all(ann.get("segmentation") for ann in annotations)
    with_area = all("area" in ann for ann in annotations)
    items = []
    for image_id, (image, entry) in sorted(by_id.items(), key=lambda kv: kv[1][0].name):
        width, height = _image_size(image)
        if "width" in entry and "height" in entry:
            _check_size(path, image, (int(entry["width"]), int(entry["height"])), (width, height))
        anns = objects[image_id]
        refs = [f"{path}: annotation {shown(ann.get('id'))} (image {image.name})" for ann in anns]
        boxes = _boxes([[x, y, x + w, y + h] for x, y, w, h in (map(float, ann["bbox"]) for ann in anns)])
        segmentations = (
            [_checked_segmentation(ann["segmentation"], ref, height, width) for ann, ref in zip(anns, refs)]
            if with_masks
            else []
        )
        items.append(
            _Annotated(
                image,
                width,
                height,
                boxes,
                [categories[_coco_id(ann["category_id"])] for ann in anns],
                np.array([bool(ann.get("iscrowd", 0)) for ann in anns], dtype=bool),
                refs,
                area=np.array([float(ann["area"]) for ann in anns]) if with_area else None,
                masks=_coco_masks(segmentations, height, width) if with_masks else None,
                image_id=image_id,
            )
        )
    return _Source(path, items, names)


def _read_coco(images: list[Path], path: Path) -> _Source:
    coco = read_json(path)
    if not (
        isinstance(coco, dict) and isinstance(coco.get("images"), list) and isinstance(coco.get("categories"), list)
    ):
        raise DataError(f"{path}: not a COCO file (needs 'images' and 'categories' lists)")
    for key in ("images", "categories", "annotations"):
        entries = coco.get(key, [])
        if not (isinstance(entries, list) and all(isinstance(entry, dict) for entry in entries)):
            raise DataError(f"{path}: '{key}' must be a list of objects")
    try:
        return _read_coco_entries(coco, path, images)
    except KeyError as exc:
        raise DataError(f"{path}: a COCO entry lacks the key {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int() of inf, float() of 10**400
        raise DataError(f"{path}: malformed COCO entry ({exception_line(exc)})") from None


# ---------------------------------------------------------------------------------------------------------- YOLO txt


def _yaml_names(path: Path) -> list[str]:
    """The class names of a data.yaml. Each must be a single value: YAML aliases can nest a list a billion items deep
    in a few lines, which str() would expand."""
    try:
        names = (yaml.safe_load(_read_text(path)) or {}).get("names")
    except (yaml.YAMLError, AttributeError, RecursionError) as exc:
        raise DataError(f"{path}: unparseable YAML with no 'names' mapping ({type(exc).__name__})") from None
    if isinstance(names, dict) and set(names) == set(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if isinstance(names, list) and all(isinstance(n, (str, int, float)) for n in names):
        return [str(n) for n in names]
    raise DataError(f"{path}: 'names' must be a list of class names or a mapping 0..K-1 -> name, got {shown(names)}")


def _yolo_class_list(folders: list[Path]) -> list[str] | None:
    """The first class list found (YOLO files hold indices only); None when there is none."""
    for folder in folders:
        for file_name in CLASS_LIST_FILES:
            path = folder / file_name
            if path.is_file():
                names = (
                    _yaml_names(path)
                    if path.suffix == ".yaml"
                    else [n.strip() for n in _read_text(path).splitlines() if n.strip()]
                )
                if not names or len(set(names)) != len(names):
                    raise DataError(f"{path}: class names must be distinct and at least one, got {shown(names)}")
                return names
    return None


def _yolo_row(fields: list[str], where: str, classes: int) -> tuple[int, list[float]]:
    if len(fields) != 5:
        raise DataError(f"{where}: expected 5 values 'class cx cy w h', got {len(fields)}")
    try:
        index, values = int(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        raise DataError(f"{where}: not numbers ({shown(' '.join(fields))[1:-1]})") from None
    if not 0 <= index < classes:
        raise DataError(
            f"{where}: class {shown(index)} is not in 0..{classes - 1} (the class list has {classes} names)"
        )
    if not all(0.0 <= v <= 1.0 for v in values):
        raise DataError(f"{where}: coordinates must be normalised to [0, 1], got {shown(' '.join(fields[1:]))[1:-1]}")
    return index, values


def _read_yolo_file(image: Path, path: Path | None, names: list[str]) -> _Annotated:
    """Rows ``class cx cy w h``, normalised by the image size; no file means no objects."""
    width, height = _image_size(image)
    rows, labels, refs = [], [], []
    lines = _read_text(path).splitlines() if path is not None else []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            refs.append(f"{path}:{number}")
            index, (cx, cy, w, h) = _yolo_row(line.split(), refs[-1], len(names))
            rows.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            labels.append(names[index])
    return _Annotated(image, width, height, _boxes(rows), labels, np.zeros(len(rows), dtype=bool), refs)


def _read_yolo(images: list[Path], folder: Path, class_names: list[str] | None, list_folders: list[Path]) -> _Source:
    names = _yolo_class_list(list_folders) or class_names
    if names is None:
        raise DataError(
            f"{folder}: YOLO labels hold class numbers only; put {', '.join(CLASS_LIST_FILES)} beside them or give class names"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".txt" and p.name not in CLASS_LIST_FILES)
    items = [
        _read_yolo_file(image, txt, names) for image, txt in _partners(images, files, "YOLO label", required=False)
    ]
    return _Source(folder, items, names)


# ------------------------------------------------------------------------------------------- instance-label images


def _label_image(path: Path) -> np.ndarray:
    labels = read_volume(path)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: expected a 2D grey label image of integers, got shape {labels.shape} {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"{path}: label images hold ids >= 0 (0 is background), found {labels.min()}")
    return labels


def _read_mask_file(image: Path, path: Path, name: str) -> _Annotated:
    """Each label value > 0 is one object; its box is the bounding slice (``stop`` is exclusive, as x2 is)."""
    width, height = _image_size(image)
    labels = _label_image(path)
    if labels.shape != (height, width):
        raise DataError(
            f"{path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image {image} is {width}x{height}"
        )
    compact, original = compact_ids(labels)
    # imported by the data sets that hold masks, not by every detection command
    from scipy import ndimage

    found = [(i + 1, s) for i, s in enumerate(ndimage.find_objects(compact)) if s is not None]
    index = np.array([i for i, _ in found], dtype=np.intp)
    ids = original[index]
    rows = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for _, s in found]
    area = np.bincount(compact.ravel().astype(np.intp))[index].astype(np.float64) if len(index) else np.zeros(0)
    return _Annotated(
        image,
        width,
        height,
        _boxes(rows),
        [name] * len(ids),
        np.zeros(len(ids), dtype=bool),
        [f"{path}: label {i}" for i in ids],
        area=area,
        masks=lambda: _label_image(path) == ids[:, None, None],
    )


def _read_masks(images: list[Path], folder: Path, class_names: list[str] | None) -> _Source:
    if class_names is not None and len(class_names) != 1:
        raise DataError(
            f"{folder}: instance-label images hold one class, but {len(class_names)} class names were given"
        )
    name = class_names[0] if class_names else MASK_CLASS
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    items = [_read_mask_file(image, mask, name) for image, mask in _partners(images, files, "mask", required=True)]
    return _Source(folder, items, [name])


# ------------------------------------------------------------------------------------------------- finding sources


def _kind_of_folder(folder: Path) -> tuple[str, Path]:
    """("voc" | "coco" | "yolo" | "masks", path to read) for a folder of annotations, told apart by the files it holds."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    kinds = {
        "voc": [p for p in files if p.suffix.lower() == ".xml"],
        "coco": [p for p in files if p.suffix.lower() == ".json"],
        "yolo": [p for p in files if p.suffix.lower() == ".txt" and p.name not in CLASS_LIST_FILES],
        "masks": [p for p in files if is_image_file(p)],
    }
    present = [kind for kind, found in kinds.items() if found]
    if not present:
        raise DataError(f"{folder}: no annotations found (VOC .xml, COCO .json, YOLO .txt or label images)")
    if len(present) > 1:
        raise DataError(f"{folder}: holds several kinds of annotation files ({', '.join(present)}); keep one")
    kind = present[0]
    if kind == "coco":
        if len(kinds["coco"]) > 1:
            raise DataError(f"{folder}: holds {len(kinds['coco'])} JSON files; give the one to use with --annotations")
        return kind, kinds["coco"][0]
    return kind, folder


def _source_in(folder: Path) -> tuple[str, Path]:
    """The one annotation source beside ``folder/images``: an annotation folder or a COCO JSON file."""
    found = [_kind_of_folder(folder / name) for name in ANNOTATION_FOLDERS if (folder / name).is_dir()]
    found += [("coco", p) for p in sorted(folder.glob("*.json"))]
    if not found:
        raise DataError(
            f"{folder}: no annotations beside images/ (Annotations/ with VOC XML, a COCO .json, labels/, masks/)"
        )
    if len(found) > 1:
        listed = ", ".join(f"{p.name} ({kind})" for kind, p in found)
        raise DataError(f"{folder}: several annotation sources ({listed}); choose one with --images and --annotations")
    return found[0]


def _read_source(
    images_dir: Path, kind: str, path: Path, class_names: list[str] | None, list_folders: list[Path]
) -> _Source:
    images = _images_in(images_dir)
    if kind == "voc":
        return _read_voc(images, path)
    if kind == "coco":
        return _read_coco(images, path)
    if kind == "yolo":
        return _read_yolo(images, path, class_names, list_folders)
    return _read_masks(images, path, class_names)


def _sources(
    data: Path | None, images: Path | None, annotations: Path | None, class_names: list[str] | None
) -> dict[str, _Source]:
    """One source per split: split folders of ``data`` (or "all"), or ``images`` with ``annotations``."""
    if data is not None:
        if images is not None or annotations is not None:
            raise DataError("give either a data folder or images and annotations, not both")
        if not data.is_dir():
            raise DataError(f"{data}: data folder not found")
        folders = {split: data / split for split in SPLITS if (data / split).is_dir()} or {"all": data}
        return {
            split: _read_source(
                folder / "images", *_source_in(folder), class_names, list(dict.fromkeys([folder, data]))
            )
            for split, folder in folders.items()
        }
    if images is None or annotations is None:
        raise DataError("give a data folder, or both images and annotations")
    if annotations.is_file():
        if annotations.suffix.lower() != ".json":
            raise DataError(
                f"{annotations}: an annotation file must be COCO JSON; give a folder for VOC, YOLO or masks"
            )
        kind, path = "coco", annotations
    elif annotations.is_dir():
        kind, path = _kind_of_folder(annotations)
    else:
        raise DataError(f"{annotations}: annotations not found")
    return {"all": _read_source(images, kind, path, class_names, [annotations, annotations.parent])}


# ------------------------------------------------------------------------------------------------------ assembling


def _class_names(sources: list[_Source], given: list[str] | None) -> list[str]:
    """``given`` fixes the order; else the fixed lists (COCO, YOLO, masks) must agree; else VOC's names, sorted."""
    fixed = [s for s in sources if s.names is not None]
    if given is not None:
        names = list(given)
        if len(set(names)) != len(names) or not names:
            raise DataError(f"class names must be distinct and not empty, got {names}")
    elif fixed:
        names = cast("list[str]", fixed[0].names)  # ``fixed`` holds the sources with a class list
        for source in fixed[1:]:
            if source.names != names:
                raise DataError(f"{source.path}: classes {source.names} differ from {names} of {fixed[0].path}")
    else:
        names = sorted({name for s in sources for item in s.items for name in item.names})
    known = set(names)
    for source in sources:
        for item in source.items:
            for name, where in zip(item.names, item.refs):
                if name not in known:
                    raise DataError(f"{where}: class {name!r} is not among the class names ({', '.join(names)})")
    return names


def _box_problem(box: list[float], width: int, height: int) -> str | None:
    x1, y1, x2, y2 = box
    if not np.all(np.isfinite(box)):
        return f"has a coordinate that is not a number ({x1}, {y1}, {x2}, {y2})"
    if x2 < x1:
        return f"has x2 < x1 ({x2:g} < {x1:g})"
    if y2 < y1:
        return f"has y2 < y1 ({y2:g} < {y1:g})"
    if min(x1, y1) < -OUTSIDE_TOLERANCE or x2 > width + OUTSIDE_TOLERANCE or y2 > height + OUTSIDE_TOLERANCE:
        return f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image by more than 1 px"
    return None


def _checked_boxes(item: _Annotated) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the image (float32), and which to keep: those with width and height once clipped."""
    for box, where in zip(item.boxes.tolist(), item.refs):
        problem = _box_problem(box, item.width, item.height)
        if problem:
            raise DataError(f"{where} {problem}")
    clipped = np.clip(item.boxes, 0, [item.width, item.height, item.width, item.height]).astype(np.float32)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    DROPPED_BOXES.extend(
        f"{item.refs[i]}: box ({', '.join(f'{v:g}' for v in item.boxes[i])}) has zero width or height inside the image"
        for i in np.flatnonzero(~keep)
    )
    return clipped, keep


def _kept_masks(masks: Callable[[], np.ndarray] | None, keep: np.ndarray) -> Callable[[], np.ndarray] | None:
    if masks is None or keep.all():
        return masks
    return lambda: masks()[keep]


def _det_item(item: _Annotated, label_of: dict[str, int], image_id: int) -> DetItem:
    boxes, keep = _checked_boxes(item)
    return DetItem(
        name=item.image.name,
        path=item.image,
        width=item.width,
        height=item.height,
        boxes=boxes[keep],
        labels=np.array([label_of[n] for n in item.names], dtype=np.int64)[keep],
        crowd=item.crowd[keep],
        masks=_kept_masks(item.masks, keep),
        image_id=image_id,
        area=None if item.area is None else item.area[keep],
    )


def load_detection_data(
    data: str | Path | None = None,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    class_names: list[str] | None = None,
) -> DetData:
    """Read a detection data set: ``data`` (a folder of ``images/`` and one annotation source, maybe in train/, val/,
    test/), or ``images`` and ``annotations`` (a COCO JSON file or a folder of VOC XML, YOLO txt or label images).

    ``image_id`` is the COCO id when read from COCO, else a running number from 1 over all splits. Boxes dropped for
    zero size are described in :data:`DROPPED_BOXES` (and counted in a warning).
    """
    DROPPED_BOXES.clear()
    data_path, images_path, annotations_path = (None if p is None else Path(p) for p in (data, images, annotations))
    sources = _sources(data_path, images_path, annotations_path, class_names)
    names = _class_names(list(sources.values()), class_names)
    label_of = {name: i + 1 for i, name in enumerate(names)}
    splits: dict[str, list[DetItem]] = {}
    running = 0
    for split, source in sources.items():
        splits[split] = []
        for item in source.items:
            running += 1
            splits[split].append(_det_item(item, label_of, running if item.image_id is None else item.image_id))
    if DROPPED_BOXES:
        warnings.warn(
            f"{len(DROPPED_BOXES)} boxes dropped for zero width or height, e.g. {DROPPED_BOXES[0]}", stacklevel=2
        )
    return DetData(names, splits)


def json_rles(masks: np.ndarray) -> list[dict]:
    """(N, H, W) masks as compressed COCO RLEs with ``counts`` as str, so they can be written as JSON."""
    encoded = mask_utils.encode(np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8))) if len(masks) else []
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")} for rle in encoded]


def coco_ground_truth(class_names: list[str], items: Sequence[DetItem], masks: bool = False) -> dict:
    """The objects of ``items`` as a COCO data set for pycocotools: category ids 1..K, annotation ids from 1, boxes as
    [x, y, w, h], crowds as ``iscrowd``, ``area`` the item's own (a COCO file's mask area) or else the box area, as
    COCO does for boxes; with ``masks`` also each object's mask as RLE."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for item in items:
        images.append(
            {"id": int(item.image_id), "file_name": item.name, "width": int(item.width), "height": int(item.height)}
        )
        rles = json_rles(item.masks()) if masks and item.masks is not None else None
        sizes = item.boxes[:, 2:] - item.boxes[:, :2]
        areas = item.area if item.area is not None else sizes[:, 0] * sizes[:, 1]
        for k, (box, size) in enumerate(zip(item.boxes.tolist(), sizes.tolist())):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": int(item.image_id),
                "category_id": int(item.labels[k]),
                "bbox": [box[0], box[1], size[0], size[1]],
                "area": float(areas[k]),
                "iscrowd": int(item.crowd[k]),
            }
            if rles is not None:
                annotation["segmentation"] = rles[k]
            annotations.append(annotation)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "categories": categories, "annotations": annotations}
