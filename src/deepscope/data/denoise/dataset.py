"""Denoising data: noisy images, pairs of noisy acquisitions, or clean images to add noise to; random patches.

Layout of a data folder (optionally inside ``train/``, ``val/``, ``test/``), files matched by name across folders:

- ``noisy/`` only: single noisy images or volumes (Noise2Void);
- ``noisy/`` + ``noisy2/``: two acquisitions of each scene (Noise2Noise);
- ``noisy/`` + ``clean/``: noisy inputs with ground truth (supervised training, or scoring any method);
- ``clean/`` only, or a plain folder of images, with synthetic noise configured: noisy copies are made on the fly.

Images are held in memory as float32 (C, *spatial) arrays in their stored units: denoising sets are small next to
segmentation volumes, and keeping them whole lets patches be cut on the device by index arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deepscope.data.io.splits import SPLITS
from deepscope.data.io.volumes import MAX_COLOURS, files_by_stem, is_volume, read_volume
from deepscope.errors import DataError

ROLES = ("noisy", "noisy2", "clean")


@dataclass
class DenoiseItem:
    """One scene: its images as float32 (C, *spatial) in stored units, by role; ``dtype`` is the stored type."""

    name: str
    images: dict[str, np.ndarray]
    dtype: np.dtype

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(next(iter(self.images.values())).shape[1:])


def guess_ndim(shape: Sequence[int], ndim: int | None) -> int:
    """Spatial dimensions of a stored array: ``ndim`` when given, else 2 for (H, W) and (H, W, C<=4), 3 otherwise."""
    if ndim is not None:
        return ndim
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[-1] <= MAX_COLOURS) else 3


def channels_first(array: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """(C, *spatial) float32 from (H, W) / (H, W, C) in 2D or (D, H, W) / (C, D, H, W) in 3D."""
    if array.ndim == ndim:
        return array.astype(np.float32)[None]
    if array.ndim != ndim + 1:
        layout = "(H, W) or (H, W, C)" if ndim == 2 else "(D, H, W) or (C, D, H, W)"
        raise DataError(f"{name}: expected a {ndim}D image {layout}, got shape {array.shape}")
    return np.ascontiguousarray(np.moveaxis(array, -1, 0) if ndim == 2 else array, dtype=np.float32)


def check_values(image: np.ndarray, name: str) -> None:
    """Refuse what would poison training or scoring: NaN/infinite values and constant images."""
    if not np.isfinite(image).all():
        raise DataError(f"{name}: holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low == high:
        raise DataError(f"{name}: constant image (every value is {low:g}); there is nothing to denoise or normalise")


def read_image(path: Path, key: str | None, ndim: int | None) -> tuple[np.ndarray, np.dtype, tuple[int, ...], int]:
    """(float32 channels-first image, stored dtype, stored shape, spatial ndim) of one checked file."""
    stored = read_volume(path, key)
    if stored.dtype.kind not in "uif":
        raise DataError(f"{path}: images must be numbers, got {stored.dtype}")
    dims = guess_ndim(stored.shape, ndim)
    image = channels_first(stored, dims, str(path))
    check_values(image, str(path))
    return image, stored.dtype, tuple(stored.shape), dims


def _role_files(folder: Path, synthetic: bool) -> dict[str, dict[str, Path]]:
    """Files per role in one split folder; a plain folder of images is noisy data, or clean data when noise is made."""
    roles = {role: files_by_stem(folder / role) for role in ROLES if (folder / role).is_dir()}
    if not roles:
        files = files_by_stem(folder)
        if not files:
            raise DataError(f"{folder}: no images, and no noisy/, noisy2/ or clean/ folders")
        roles = {"clean" if synthetic else "noisy": files}
    for role, files in roles.items():
        if not files:
            raise DataError(f"{folder / role}: folder holds no images")
    first_role, first = next(iter(roles.items()))
    for role, files in roles.items():
        for stem in sorted(set(first) ^ set(files)):
            _where, missing = (first_role, role) if stem in first else (role, first_role)
            path = (first if stem in first else files)[stem]
            raise DataError(f"{path} has no {missing} partner in {folder / missing} (files are matched by name)")
    return roles


def find_denoise_files(root: str | Path, synthetic: bool) -> dict[str, dict[str, dict[str, Path]]]:
    """{split: {role: {name: path}}}; split is "all" when there are no train/val/test folders."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: not found")
    if root.is_file() or root.suffix.lower() == ".zarr":
        if not is_volume(root):
            raise DataError(f"{root}: not an image file (PNG, JPEG, TIFF, NPZ, HDF5 or zarr)")
        return {"all": {"clean" if synthetic else "noisy": {root.stem: root}}}
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        return {"all": _role_files(root, synthetic)}
    return {split: _role_files(root / split, synthetic) for split in splits}


def load_split(files: dict[str, dict[str, Path]], key: str | None, ndim: int | None) -> list[DenoiseItem]:
    """Read and check every scene of a split: all roles of a scene must share shape and dimensionality."""
    items = []
    names = sorted(next(iter(files.values())))
    for name in names:
        images, dtypes, first = {}, {}, None
        for role in ROLES:
            if role not in files:
                continue
            path = files[role][name]
            image, dtypes[role], layout, dims = read_image(path, key, ndim)
            if first is None:
                first = (path, image.shape, layout, dims)
            elif image.shape != first[1] or dims != first[3]:
                raise DataError(f"{path}: shape {layout} does not match {first[0]} of shape {first[2]}")
            images[role] = image
        assert first is not None
        items.append(DenoiseItem(name, images, np.dtype(dtypes.get("clean", next(iter(dtypes.values()))))))
    ranks = {len(item.spatial) for item in items}
    if len(ranks) > 1:
        raise DataError(
            f"{', '.join(str(p) for p in next(iter(files.values())).values())}: 2D and 3D images mixed in one data set"
        )
    return items


class PatchBank:
    """Training images on the device, grouped by shape into stacks; a batch of random crops is cut from all roles at
    the same places by index arithmetic (one gather per shape group, no loop over samples)."""

    def __init__(
        self, items: Sequence[DenoiseItem], roles: Sequence[str], patch_shape: Sequence[int], device: torch.device
    ) -> None:
        self.patch = tuple(int(p) for p in patch_shape)
        self.roles, self.device = list(roles), device
        groups: dict[tuple[int, ...], list[DenoiseItem]] = {}
        for item in items:
            if any(p > s for p, s in zip(self.patch, item.spatial)):
                raise DataError(f"{item.name}: image {item.spatial} is smaller than the patch shape {self.patch}")
            groups.setdefault(item.spatial, []).append(item)
        self.shapes = list(groups)
        self.stacks = [
            {r: torch.from_numpy(np.stack([i.images[r] for i in g])).to(device) for r in self.roles}
            for g in groups.values()
        ]
        pixels = torch.tensor([len(g) * float(np.prod(s)) for s, g in groups.items()])
        self.weights = pixels / pixels.sum()

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``batch`` crops per role, (batch, C, *patch); every pixel of the data set is about equally likely."""
        gen_device = generator.device
        group = torch.multinomial(self.weights.to(gen_device), batch, replacement=True, generator=generator).cpu()
        parts: dict[str, list[Tensor]] = {r: [] for r in self.roles}
        for g, (shape, stack) in enumerate(zip(self.shapes, self.stacks)):
            n = int((group == g).sum())
            if n == 0:
                continue
            count = next(iter(stack.values())).shape[0]
            index = torch.randint(count, (n,), generator=generator, device=gen_device).to(self.device)
            corners = [
                torch.randint(s - p + 1, (n,), generator=generator, device=gen_device).to(self.device)
                for s, p in zip(shape, self.patch)
            ]
            k = len(self.patch)
            axes = []
            for a, (c, p) in enumerate(zip(corners, self.patch)):
                view = [n] + [1] * k
                view[1 + a] = p
                axes.append((c[:, None] + torch.arange(p, device=self.device)).view(view))
            at: tuple[Tensor | slice, ...] = (index.view(n, *[1] * k), slice(None), *axes)
            for r in self.roles:
                parts[r].append(stack[r][at].movedim(-1, 1))
        return {r: torch.cat(v) for r, v in parts.items()}
