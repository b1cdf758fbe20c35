"""Images for self-supervised learning, held in memory, and the batch iterators that make two views of them.

Self-supervised training reads every image many times with heavy augmentation, so the whole set is decoded once
into one (N, C, H, W) tensor and kept on the training device; each step slices a batch and augments it there.
Two kinds of data come in:

- *natural* images (labelled class folders or ``.npz`` arrays, or a plain folder of RGB pictures) stay uint8/uint16
  and are standardised with the data set's channel mean and std, as the classify task does;
- *microscopy* images (an ``images/`` folder as the segment task reads it, grey, 16-bit or multi-channel pictures,
  or any data when ``normalize`` is given) are percentile-normalised per image and channel exactly as the segment
  task normalises its input, so an encoder pretrained here sees what the U-Net it is transferred to will see.

Images of mixed sizes are cut into fixed-size patches: a grid covering each image, or one patch centred on each
object of the matching label image (``masks/``), which puts the cells, not the background, in front of the encoder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from deepscope.data.classification.dataset import ImageSet, array_stats, load_classification, stratified_split
from deepscope.data.epochs import epoch_generator
from deepscope.data.io.images import is_image_file
from deepscope.data.io.splits import SPLITS, split_validation
from deepscope.data.io.views import input_view
from deepscope.data.io.volumes import MAX_COLOURS, files_by_stem, read_volume
from deepscope.data.segmentation.pairs import LABEL_FOLDERS
from deepscope.errors import DataError, DeepscopeError

if TYPE_CHECKING:
    from deepscope.data.ssl.views import TwoViews


DEFAULT_NORMALIZE = (1.0, 99.8)  # the segment task's percentiles
CROPS = ("grid", "objects")
EPS = 1e-6  # as seg_dataset.Normalized: a constant channel becomes 0, not a division by zero
WORKERS = min(8, os.cpu_count() or 1)  # image decoding and percentiles release the GIL; more threads only contend
HALF_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class SSLImages:
    """Images (N, C, H, W) on the CPU with labels (-1: none) and where each came from.

    ``images`` are uint8/uint16 as stored (natural) or float16 already normalised (microscopy); ``images.float() /
    scale`` is the network's input before standardisation.
    """

    images: torch.Tensor
    labels: np.ndarray
    sources: list[str]
    scale: float

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | Sequence[int]) -> SSLImages:
        index = np.asarray(index, dtype=np.int64)
        return SSLImages(
            self.images[torch.from_numpy(index)], self.labels[index], [self.sources[i] for i in index], self.scale
        )

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())


@dataclass
class SSLData:
    """The splits found (``train`` always; ``val`` and ``test`` when present or carved), and what they are."""

    splits: dict[str, SSLImages]
    class_names: list[str]
    kind: str  # "natural" or "microscopy"
    channels: int


def load_ssl_data(
    path: str | Path,
    patch_size: int | None = None,
    crops: str = "grid",
    normalize: Sequence[float] | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_patches: int | None = None,
) -> SSLData:
    """Read an ``.npz``, a class-folder tree, a plain image folder or ``images/`` (+ ``masks/``) folders into memory.

    ``max_patches`` caps each split to a seeded sample of that many images or patches.
    """
    path = Path(path)
    if crops not in CROPS:
        raise DeepscopeError(f"crops={crops!r}: expected one of {', '.join(CROPS)}")
    if patch_size is not None and patch_size < 1:
        raise DeepscopeError(f"patch_size={patch_size}: expected a positive number of pixels")
    if not path.exists():
        raise DataError(f"{path}: not found")
    layout, folders = find_layout(path)
    if layout == "labelled":
        data = load_labelled(path, patch_size, crops, normalize, channels, val_fraction, seed)
    else:
        data = load_unlabelled(path, layout, folders, patch_size, crops, normalize, channels, val_fraction, seed)
    if max_patches is not None:
        data.splits = {name: cap(images, max_patches, seed) for name, images in data.splits.items()}
    return data


def find_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """``"labelled"`` (an .npz or class folders), ``"images"`` (images/ folders) or ``"plain"`` (image files),
    with the folder of each split (the root itself is ``train`` when there are no split folders)."""
    if root.is_file():
        if root.suffix.lower() == ".npz":
            return "labelled", {}
        raise DataError(f"{root}: expected a folder of images or an .npz file")
    folders = {s: root / s for s in SPLITS if (root / s).is_dir()} or {"train": root}
    if all((folder / "images").is_dir() for folder in folders.values()):
        return "images", folders
    if all(any(is_image_file(p) for p in folder.iterdir()) for folder in folders.values()):
        return "plain", folders
    if not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        raise DataError(
            f"{root}: no images found (expected image files, images/ [+ masks/], class subfolders or an .npz file)"
        )
    return "labelled", {}


def load_labelled(
    path: Path,
    patch_size: int | None,
    crops: str,
    normalize: Sequence[float] | None,
    channels: int | None,
    val_fraction: float,
    seed: int,
) -> SSLData:
    """Class folders or ``.npz`` through the classify task's reader; ``patch_size`` resizes (there is nothing to crop around)."""
    if crops == "objects":
        raise DataError(
            f"{path}: crops='objects' needs images/ and masks/ folders; class folders and .npz files have no masks"
        )
    resize = None if patch_size is None else (patch_size, patch_size)
    data = load_classification(path, resize=resize, lazy=False)
    found = dict(data.splits)
    if "all" in found:
        found["train"] = found.pop("all")
    if "val" not in found and val_fraction > 0:
        found["train"], found["val"] = stratified_split(found["train"], val_fraction, seed)
    # lazy=False: every split is read into memory, an ImageSet
    splits = {s: to_tensor(cast(ImageSet, found[s]), path, channels, normalize) for s in SPLITS if s in found}
    kind = "natural" if normalize is None else "microscopy"
    return SSLData(splits, data.class_names, kind, splits["train"].images.shape[1])


def to_tensor(data: ImageSet, path: Path, channels: int | None, normalize: Sequence[float] | None) -> SSLImages:
    """(N, H, W, C) integers to (N, C, H, W) with one permute+copy; percentile-normalised to float16 when asked."""
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    c = images.shape[1]
    if channels is not None and channels != c:
        if c != 1:
            raise DataError(f"{path}: images have {c} channels but channels={channels}")
        images = images.expand(-1, channels, -1, -1)
    if normalize is None:
        return SSLImages(images.contiguous(), data.labels, data.sources, data.scale)
    low, high = normalize
    return SSLImages(normalize_stack(images, low, high), data.labels, data.sources, 1.0)


def normalize_stack(images: torch.Tensor, low: float, high: float, chunk: int = 4096) -> torch.Tensor:
    """Per-image, per-channel percentile normalisation of (N, C, H, W), vectorised over chunks of images.

    The same ``(x - p_low) / (p_high - p_low + eps)`` as seg_dataset.Normalized, which works one image at a time.
    """
    out = torch.empty(images.shape, dtype=torch.float16)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].numpy().astype(np.float32)
        p_low, p_high = np.percentile(x.reshape(*x.shape[:2], -1), [low, high], axis=2).astype(np.float32)[
            ..., None, None
        ]
        out[start : start + chunk] = to_half((x - p_low) / (p_high - p_low + np.float32(EPS)))
    return out


def to_half(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float16, clamped in place: a nearly constant channel divided by ``eps`` would otherwise become inf (then NaN in training)."""
    return torch.as_tensor(x).clamp_(-HALF_MAX, HALF_MAX).half()


def load_unlabelled(
    root: Path,
    layout: str,
    folders: dict[str, Path],
    patch_size: int | None,
    crops: str,
    normalize: Sequence[float] | None,
    channels: int | None,
    val_fraction: float,
    seed: int,
) -> SSLData:
    """Plain image folders or ``images/`` (+ ``masks/``) folders, whole or cut into patches; labels are all -1."""
    if crops == "objects" and patch_size is None:
        raise DeepscopeError("crops='objects' needs patch_size (the side of the patch cut around each object)")
    if "train" not in folders:
        raise DataError(f"{root}: no train/ folder next to {', '.join(folders)}/")
    files = {s: image_files(folder / "images" if layout == "images" else folder) for s, folder in folders.items()}
    masks = {s: mask_files(folders[s], files[s], layout) for s in files} if crops == "objects" else {}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        raw = {s: list(pool.map(read_2d, paths)) for s, paths in files.items()}
    everything = [im for images in raw.values() for im in images]
    natural = (
        layout == "plain" and normalize is None and all(im.dtype == np.uint8 and im.shape[2] == 3 for im in everything)
    )
    if channels is None:
        channels = max(im.shape[2] for im in everything)
    if patch_size is None:
        check_same_size(raw, files)
    if "val" not in files and val_fraction > 0:
        stores: tuple[dict[str, list[Any]], ...] = (files, raw, masks)  # image paths, images, mask paths
        for store in stores:
            if store:
                store["train"], store["val"] = split_validation(store["train"], val_fraction, seed)
    low_high = None if natural else tuple(normalize or DEFAULT_NORMALIZE)
    splits = {}

    def crop(job: tuple[np.ndarray, Path, Path | None]) -> tuple[torch.Tensor, list[str]]:
        return crop_image(*job, channels, low_high, patch_size, crops)

    for s in (s for s in SPLITS if files.get(s)):
        jobs = zip(raw[s], files[s], masks.get(s, [None] * len(files[s])))
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            cut = list(pool.map(crop, jobs))
        images = torch.cat([patches for patches, _ in cut])
        if not len(images):  # object crops from label images without objects
            if s == "train":
                raise DataError(f"{folders[s]}: no objects found in the label images to crop around")
            continue
        sources = [src for _, names in cut for src in names]
        splits[s] = SSLImages(images, np.full(len(images), -1, np.int64), sources, 255.0 if natural else 1.0)
    return SSLData(splits, [], "natural" if natural else "microscopy", channels)


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise DataError(f"{folder}: no images found (PNG, JPEG, TIFF or BMP)")
    return files


def mask_files(folder: Path, images: list[Path], layout: str) -> list[Path]:
    """The label image of each image, matched by name in ``masks/`` (or ``labels/``) as the segment task pairs them."""
    label_dirs = [folder / name for name in LABEL_FOLDERS if (folder / name).is_dir()] if layout == "images" else []
    if not label_dirs:
        raise DataError(f"{folder}: crops='objects' needs a masks/ (or labels/) folder next to images/")
    by_stem = files_by_stem(label_dirs[0])
    for image in images:
        if image.stem not in by_stem:
            raise DataError(f"{image}: no mask with the same name in {label_dirs[0]}")
    return [by_stem[image.stem] for image in images]


def read_2d(path: Path) -> np.ndarray:
    """An (H, W, C) image as the segment task reads it (RGBA pictures lose alpha, TIFF channels are kept)."""
    image = read_volume(path)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] > MAX_COLOURS:
        raise DataError(f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {image.shape}")
    return image


def check_same_size(raw: dict[str, list[np.ndarray]], files: dict[str, list[Path]]) -> None:
    """Whole images must share one size; the error names the first that differs."""
    first = next(iter(files.values()))[0], next(iter(raw.values()))[0].shape[:2]
    for s, images in raw.items():
        for image, path in zip(images, files[s]):
            if image.shape[:2] != first[1]:
                raise DataError(
                    f"{path}: image size {image.shape[0]}x{image.shape[1]} differs from {first[0]} "
                    f"({first[1][0]}x{first[1][1]}); pass --set patch_size=N to cut fixed-size patches"
                )


def crop_image(
    image: np.ndarray,
    path: Path,
    mask_path: Path | None,
    channels: int,
    low_high: Sequence[float] | None,
    patch_size: int | None,
    crops: str,
) -> tuple[torch.Tensor, list[str]]:
    """One image's patches (k, C, p, p) (or the whole image) and their sources ``file:y,x`` (top-left corner)."""
    if low_high is None:  # natural: RGB uint8 as stored
        if channels != 3:
            raise DataError(f"{path}: image has 3 channels but channels={channels}")
        x = torch.from_numpy(image).permute(2, 0, 1)
    else:
        x = torch.from_numpy(input_view(image, 2, channels, str(path), low_high)[(slice(None),) * 3])
    if patch_size is None:
        patches, sources = x[None], [str(path)]
    else:
        h, w = image.shape[:2]
        if h < patch_size or w < patch_size:
            raise DataError(
                f"{path}: image is {h}x{w}, smaller than the {patch_size}x{patch_size} crop; lower --set patch_size"
            )
        if crops == "grid":
            corners = grid_corners(h, w, patch_size)
        else:
            assert mask_path is not None  # crops="objects": load_unlabelled pairs each image with its mask
            corners = object_corners(mask_path, (h, w), path, patch_size)
        # (H-p+1, W-p+1, C, p, p), a view
        windows = x.unfold(1, patch_size, 1).unfold(2, patch_size, 1).permute(1, 2, 0, 3, 4)
        patches = windows[torch.from_numpy(corners[:, 0]), torch.from_numpy(corners[:, 1])]
        sources = [f"{path}:{top},{left}" for top, left in corners.tolist()]
    return (patches.contiguous() if low_high is None else to_half(patches)), sources


def grid_corners(h: int, w: int, p: int) -> np.ndarray:
    """Top-left corners (k, 2) of a non-overlapping grid covering the image; the last row and column shift inward."""
    ys = np.minimum(np.arange(math.ceil(h / p)) * p, h - p)
    xs = np.minimum(np.arange(math.ceil(w / p)) * p, w - p)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.int64)


def object_corners(mask_path: Path, shape: tuple[int, int], image_path: Path, p: int) -> np.ndarray:
    """Top-left corners (k, 2) of patches centred on each object's centre of mass (pixel ``p // 2`` of the patch),
    shifted inward at the borders."""
    from scipy import ndimage

    mask = read_volume(mask_path)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(
            f"{mask_path}: expected a 2D integer label image, got shape {mask.shape} and dtype {mask.dtype}"
        )
    if mask.shape != shape:
        raise DataError(
            f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image {image_path} is {shape[0]}x{shape[1]}"
        )
    ids = np.unique(mask)
    ids = ids[ids != 0]
    if not len(ids):
        return np.zeros((0, 2), np.int64)
    centres = np.asarray(ndimage.center_of_mass(np.ones(shape, np.float32), mask, ids), dtype=np.float64).reshape(-1, 2)
    corners = np.floor(centres + 0.5).astype(np.int64) - p // 2
    return np.clip(corners, 0, [shape[0] - p, shape[1] - p])


def seeded_sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most ``limit`` of ``n`` items (all of them when ``n <= limit``)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def cap(images: SSLImages, limit: int, seed: int) -> SSLImages:
    """A seeded sample of at most ``limit`` images, in their original order."""
    return images if len(images) <= limit else images.subset(seeded_sample(len(images), limit, seed))


def ssl_stats(data: SSLImages, kind: str) -> tuple[list[float], list[float]]:
    """Standardisation per channel: the data set's mean and std on [0, 1] for natural images; 0 and 1 for microscopy,
    whose percentile normalisation already standardises and is exactly what the segment task feeds its U-Net."""
    c = data.images.shape[1]
    if kind == "microscopy":
        return [0.0] * c, [1.0] * c
    return array_stats(data.images.permute(0, 2, 3, 1).numpy())


class Standardize:
    """Images on ``device`` (uint16 widened to int32: few kernels take uint16) and ``(x / scale - mean) / std``."""

    def __init__(
        self, images: torch.Tensor, scale: float, mean: Sequence[float], std: Sequence[float], device: torch.device
    ) -> None:
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise DeepscopeError(
                f"mean/std have {len(mean)}/{len(std)} values but the images have {images.shape[1]} channels"
            )
        self.images = (images.int() if images.dtype == torch.uint16 else images).to(device)
        self.scale = scale
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def batch(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Images ``index`` as float on [0, 1] (natural) or as normalised (microscopy), not yet standardised."""
        return self.images[index].float().div_(self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SSLTrainBatches:
    """(view 1, view 2, labels) per step for this process, standardised, on ``device``.

    The order is a seeded permutation per epoch and the views' random parameters are drawn for the global batch and
    sliced to this rank's share (as :class:`deepscope.data.classification.loaders.DeviceLoader` does), so ranks agree and a resumed
    run replays the same batches. The incomplete last batch is dropped.
    """

    def __init__(
        self,
        data: SSLImages,
        views: TwoViews,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        channels_last: bool = False,
    ) -> None:
        if batch_size % world:
            raise DeepscopeError(f"batch size {batch_size} must be divisible by the number of processes ({world})")
        if batch_size // world < 2:
            raise DeepscopeError(
                "contrastive learning needs at least 2 images per process per batch; raise --batch-size"
            )
        if len(data) < batch_size:
            raise DeepscopeError(
                f"{len(data)} training images are fewer than one batch of {batch_size}; lower --batch-size"
            )
        self.data = Standardize(data.images, data.scale, mean, std, device)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.views, self.batch_size, self.device = views, batch_size, device
        self.seed, self.rank, self.world, self.channels_last = seed, rank, world, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        order = torch.randperm(len(self.labels), generator=epoch_generator(self.seed, self.epoch, torch.device("cpu")))
        order = order.to(self.device)
        generator = epoch_generator(self.seed + 1, self.epoch, self.device)
        share = bs // self.world
        rows = slice(self.rank * share, (self.rank + 1) * share)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for b in range(len(self)):
            index = order[b * bs : (b + 1) * bs][rows]
            v1, v2 = self.views(self.data.batch(index), generator, bs, rows)
            yield (
                self.data(v1).contiguous(memory_format=fmt),
                self.data(v2).contiguous(memory_format=fmt),
                self.labels[index],
            )


class SSLEvalBatches:
    """(images, labels) of this process's contiguous shard, standardised, unaugmented, for probes and embeddings.

    ``size``: the training views' (H, W); larger images are centre-cropped to it so the encoder sees the scale it
    learnt, smaller ones are an error (upsampling would change the scale silently).
    """

    def __init__(
        self,
        data: SSLImages,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        size: tuple[int, int] | None = None,
    ) -> None:
        lo, hi = len(data) * rank // world, len(data) * (rank + 1) // world
        images = centre_crop(data.images[lo:hi], size)
        self.data = Standardize(images, data.scale, mean, std, device)
        self.labels = torch.from_numpy(data.labels[lo:hi]).to(device)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not change between epochs."""

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            rows = slice(start, start + self.batch_size)
            yield self.data(self.data.batch(rows)), self.labels[rows]


def centre_crop(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    h, w = images.shape[-2:]
    if size is None or (h, w) == tuple(size):
        return images
    sh, sw = size
    if h < sh or w < sw:
        raise DataError(
            f"images are {h}x{w}, smaller than the {sh}x{sw} views the encoder was trained on; use larger images or patches"
        )
    top, left = (h - sh) // 2, (w - sw) // 2
    return images[..., top : top + sh, left : left + sw]
