"""Applying a denoising model: whole images tile by tile in their own units, scores against clean images, files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.atomic import write_tiff
from deepscope.config import from_dict
from deepscope.data.denoise.dataset import DenoiseItem, find_denoise_files, load_split
from deepscope.data.denoise.noise import NoiseConfig, add_noise, noise_generator
from deepscope.data.io.views import ChannelsFirst
from deepscope.data.io.volumes import HDF5_SUFFIXES, TIFF_SUFFIXES
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference.blockio import Output, open_input
from deepscope.inference.fastest import runtime_of
from deepscope.inference.geometry import tile_and_halo
from deepscope.inference.loading import fastest, load_trained_model
from deepscope.inference.tiling import predict_tiled
from deepscope.metrics.denoise import data_range_for, image_scores, summarize
from deepscope.models import build_unet
from deepscope.tasks.denoise.config import DenoiseConfig, DenoiseInference

ROLE_OF_METHOD = {"n2v": (), "n2n": ("noisy2",), "supervised": ("clean",)}  # what training needs besides noisy inputs


# ---- noise made once per image ----------------------------------------------------------------------------------


def add_fixed_noise(
    items: Sequence[DenoiseItem], noise: NoiseConfig, split: str, pairs: bool, data_range: float | None
) -> None:
    """Give every item made from a clean image its noisy copy (and a second one for ``pairs``), the same in every run."""
    for i, item in enumerate(items):
        clean = torch.from_numpy(item.images["clean"])
        generator = noise_generator(noise, split, i)
        clip = data_range if data_range is not None else clip_range(item.dtype)
        item.images["noisy"] = add_noise(clean, noise, generator, clip).numpy()
        if pairs:
            item.images["noisy2"] = add_noise(clean, noise, generator, clip).numpy()


def clip_range(dtype: np.dtype) -> float | None:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None


def load_denoise_split(cfg: DenoiseConfig, files: dict[str, dict[str, Path]], split: str) -> list[DenoiseItem]:
    """Read one split and, with synthetic noise, make its fixed noisy images."""
    items = load_split(files, cfg.key, cfg.ndim)
    if cfg.noise.synthetic:
        if "noisy" in files:
            raise DataError(
                f"{cfg.data}: holds noisy/ images and noise.kind is {cfg.noise.kind!r}; set noise.kind: none to "
                "train on the noisy images, or keep only clean/ images to add noise to"
            )
        add_fixed_noise(items, cfg.noise, split, cfg.method == "n2n", cfg.data_range)
    elif "noisy" not in files:
        raise DataError(
            f"{cfg.data}: no noisy/ images; add them, or set noise.kind (gaussian, poisson, mixed) to make them from clean/"
        )
    return items


# ---- whole-image prediction -------------------------------------------------------------------------------------


def _per_channel(values: Sequence[float], ndim: int) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(-1, *[1] * ndim)


class Standardized:
    """A (C, *spatial) view whose blocks come back as ``(x - mean) / std`` per channel, refusing NaN or infinite values."""

    def __init__(self, view: Any, mean: Sequence[float], std: Sequence[float], name: str) -> None:
        self.view, self.shape, self.ndim, self.name = view, tuple(view.shape), len(view.shape), name
        self.mean, self.std = _per_channel(mean, self.ndim - 1), _per_channel(std, self.ndim - 1)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        block = np.asarray(self.view[key], np.float32)
        if not np.isfinite(block).all():
            raise DataError(f"{self.name}: holds NaN or infinite values")
        return (block - self.mean[key[0]]) / self.std[key[0]]


class Rescaled(nn.Module):
    """The network's standardised output mapped back to the data's units."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], ndim: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.from_numpy(_per_channel(mean, ndim))[None], persistent=False)
        self.register_buffer("std", torch.from_numpy(_per_channel(std, ndim))[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() * self.std + self.mean


@dataclass
class Denoiser:
    """Everything needed to denoise an image, as saved in a checkpoint."""

    model: nn.Module
    channels: int
    mean: list[float]
    std: list[float]
    tile: tuple[int, ...]
    halo: tuple[int, ...]
    divisor: tuple[int, ...]
    inference: DenoiseInference
    device: torch.device
    batch_size: int = 4

    def __call__(
        self, image: Any, name: str, out: Any = None, progress: Callable[[int, int], None] | None = None
    ) -> Any:
        """The denoised (C, *spatial) float32 image of a (C, *spatial) image or view in data units, into ``out``;
        ``progress`` as in :func:`predict_tiled`."""
        return predict_tiled(
            Rescaled(self.model, self.mean, self.std, len(self.tile)),
            Standardized(image, self.mean, self.std, name),
            self.tile,
            self.halo,
            self.channels,
            out=out,
            blend=self.inference.blend,
            batch_size=self.batch_size,
            device=self.device,
            flip_tta=self.inference.tta,
            rotate_tta=self.inference.tta,
            model_divisor=self.divisor,
            progress=progress,
        )


def score_item(denoiser: Denoiser, item: DenoiseItem, data_range: float | None) -> tuple[dict[str, Any], np.ndarray]:
    """(scores of the denoised and of the noisy image against the clean one, denoised image)."""
    denoised = denoiser(item.images["noisy"], item.name)
    clean = item.images["clean"]
    channel_axis = 0 if clean.shape[0] > 1 else None
    truth = clean if channel_axis is not None else clean[0]
    squeeze = (lambda x: x) if channel_axis is not None else (lambda x: x[0])
    r = data_range_for(truth, item.dtype, data_range, item.name)
    record = image_scores(item.name, truth, squeeze(denoised), r, channel_axis)
    noisy = image_scores(item.name, truth, squeeze(item.images["noisy"]), r, channel_axis)
    record.update(psnr_input=noisy["psnr"], ssim_input=noisy["ssim"])
    return record, denoised


# ---- from a checkpoint -------------------------------------------------------------------------------------------


def _build_from_checkpoint(config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
    return build_unet(info["channels"], info["channels"], info["ndim"], **info["model_settings"])


def load_denoiser(
    path: str | Path,
    device: torch.device,
    tile: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    batch_size: int | None = None,
    blend: str | None = None,
    tta: bool | None = None,
) -> tuple[Denoiser, DenoiseConfig]:
    """A Denoiser from a checkpoint; the arguments given replace the saved inference settings."""
    model, state = load_trained_model(path, "denoise", device, _build_from_checkpoint)
    cfg = from_dict(DenoiseConfig, state["config"], f"{path}: config")
    info = state["task_state"]
    if blend is not None:
        cfg.inference.blend = blend
    if tta is not None:
        cfg.inference.tta = tta
    tile_t, halo_t = tile_and_halo(tile, halo, info["tile"], info["halo"], info["divisor"])
    denoiser = Denoiser(
        fastest(model, path, tuple(info["divisor"])),
        info["channels"],
        info["mean"],
        info["std"],
        tile_t,
        halo_t,
        tuple(info["divisor"]),
        cfg.inference,
        device,
        batch_size or cfg.eval_batch_size,
    )
    return denoiser, cfg


def _write_tiff(path: Path, image: np.ndarray) -> None:
    """A (C, *spatial) result written in the layout ``predict`` writes (see StoredLayout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = StoredLayout(
        np.empty(StoredLayout.stored_shape(image.shape[0], image.shape[1:]), np.float32), image.shape[0], image.ndim - 1
    )
    layout[(slice(None),) * image.ndim] = image
    colour = image.ndim == 3 and image.shape[0] in (3, 4)
    write_tiff(path, layout.array, "prediction", photometric="rgb" if colour else "minisblack")


def evaluate_checkpoint(
    path: str | Path,
    data_path: str | Path,
    split: str,
    device: torch.device,
    save_dir: str | Path | None = None,
    tta: bool | None = None,
    data_range: float | None = None,
) -> dict[str, Any]:
    """PSNR/SSIM of a checkpoint on one split (noise made as in training when it was synthetic); ``save_dir`` receives
    the denoised images as float32 TIFF in the data's units."""
    denoiser, cfg = load_denoiser(path, device, tta=tta)
    cfg.data = str(data_path)
    found = find_denoise_files(data_path, cfg.noise.synthetic)
    files = found.get(split, found.get("all"))
    if files is None:
        raise DataError(f"{data_path}: has no {split} split (found {', '.join(sorted(found))})")
    if "clean" not in files:
        raise DataError(f"{data_path}: no clean/ images in the {split} split to score against")
    items = load_denoise_split(cfg, files, split)
    records = []
    with torch.no_grad():
        for item in items:
            if item.images["noisy"].shape[0] != denoiser.channels:
                raise DataError(
                    f"{item.name}: {item.images['noisy'].shape[0]} channel(s), the model takes {denoiser.channels}"
                )
            record, denoised = score_item(denoiser, item, data_range if data_range is not None else cfg.data_range)
            records.append(record)
            if save_dir:
                _write_tiff(Path(save_dir) / f"{item.name}.tif", denoised)
    return {
        "checkpoint": str(path),
        "data": str(data_path),
        "split": split,
        "tta": cfg.inference.tta,
        **summarize(records),
    }


# ---- files on disk -------------------------------------------------------------------------------------------------


class StoredLayout:
    """(C, *spatial) blocks written into an array in the usual layout: (H, W) or (D, H, W) for one channel,
    (H, W, C) in 2D and (C, D, H, W) in 3D otherwise."""

    def __init__(self, array: Any, channels: int, ndim: int) -> None:
        self.array, self.channels, self.spatial_ndim = array, channels, ndim
        spatial = tuple(array.shape) if channels == 1 else tuple(array.shape[:-1] if ndim == 2 else array.shape[1:])
        self.shape = (channels, *spatial)

    @staticmethod
    def stored_shape(channels: int, spatial: Sequence[int]) -> tuple[int, ...]:
        if channels == 1:
            return tuple(spatial)
        return (*spatial, channels) if len(spatial) == 2 else (channels, *spatial)

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        if self.channels == 1:
            self.array[key[1:]] = value[0]
        elif self.spatial_ndim == 2:
            self.array[key[1:] + (key[0],)] = np.moveaxis(value, 0, -1)
        else:
            self.array[key] = value


def output_path(out: Path, stem: str, single: bool) -> tuple[Path, str]:
    """(file, key): ``out`` itself when it is one TIFF/HDF5/zarr output, else ``out/<stem>.tif``."""
    suffix = out.suffix.lower()
    if suffix in TIFF_SUFFIXES | HDF5_SUFFIXES | {".zarr"}:
        if not single:
            raise DataError(f"{out}: several inputs need an output folder, not one file")
        return out, "" if suffix in TIFF_SUFFIXES else "denoised"
    return out / f"{stem}.tif", ""


def predict_files(
    path: str | Path,
    inputs: Sequence[Path],
    out: str | Path,
    device: torch.device,
    key: str | None = None,
    tile: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    blend: str | None = None,
    tta: bool | None = None,
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Denoise every input block by block into float32 files in the inputs' units, one record per input."""
    denoiser, _ = load_denoiser(path, device, tile, halo, batch_size, blend, tta)
    ndim = len(denoiser.tile)
    records = []
    for source in inputs:
        image = open_input(source, key)
        if len(image.shape) not in (ndim, ndim + 1):
            layout = "(H, W) or (H, W, C)" if ndim == 2 else "(D, H, W) or (C, D, H, W)"
            raise DataError(
                f"{source}: image of shape {tuple(image.shape)} does not fit a {ndim}D model; expected {layout}"
            )
        try:
            view = ChannelsFirst(image, ndim, denoiser.channels)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None
        file, dataset = output_path(Path(out), Path(source).stem, len(inputs) == 1)
        stored = StoredLayout.stored_shape(denoiser.channels, view.shape[1:])
        with (
            Output(
                file, dataset, stored, np.float32, StoredLayout.stored_shape(denoiser.channels, denoiser.tile)
            ) as output,
            torch.no_grad(),
        ):
            denoiser(view, str(source), out=StoredLayout(output.array, denoiser.channels, ndim))
        records.append(
            {
                "input": str(source),
                "denoised": f"{file}" + (f":{dataset}" if dataset else ""),
                "shape": list(view.shape),
                **runtime_of(denoiser.model),
            }
        )
    return records


def check_method_data(cfg: DenoiseConfig, files: dict[str, dict[str, Path]], split: str) -> None:
    """Refuse a training split that lacks what the method learns from."""
    if cfg.noise.synthetic:
        return
    assert cfg.method is not None  # planned (tasks/denoise/plan.py) before the data is checked
    for role in ROLE_OF_METHOD[cfg.method]:
        if role not in files:
            what = "second noisy acquisitions (noisy2/)" if role == "noisy2" else "clean images (clean/)"
            raise DeepscopeError(
                f"{cfg.data}: method {cfg.method} needs {what} in the {split} data, or synthetic noise (noise.kind)"
            )
