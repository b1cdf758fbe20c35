"""Image restoration scores: PSNR and SSIM against the clean image, with the data range stated.

PSNR = 10 log10(R^2 / MSE) per image, averaged over images (as the BSD68 tables do), computed by scikit-image in
float64. SSIM is scikit-image's with Wang et al.'s settings (Gaussian window, sigma 1.5, population covariances),
which is what published SSIM tables use. R is the data range: the dtype's range for integer ground truth (255 for
8-bit), a given value, or for float ground truth without one the image's own max - min (as CAREamics does).
scikit-image's metrics are imported on first use: they load scipy.stats, over a second of every command's start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepscope.data.io.volumes import MAX_COLOURS, match_by_stem, read_volume
from deepscope.errors import DataError


def data_range_for(truth: np.ndarray, dtype: np.dtype, given: float | None, name: str) -> float:
    """The PSNR/SSIM data range for ``truth`` stored as ``dtype``; a given range that cannot fit the data is refused."""
    low, high = float(np.min(truth)), float(np.max(truth))
    if given is not None:
        if given <= 0:
            raise DataError(f"data range must be positive, got {given:g}")
        if np.issubdtype(dtype, np.integer) and given > np.iinfo(dtype).max - np.iinfo(dtype).min:
            raise DataError(
                f"{name}: data range {given:g} does not match its dtype {dtype} (values span at most {np.iinfo(dtype).max - np.iinfo(dtype).min})"
            )
        if high - low > given * (1 + 1e-6):
            raise DataError(
                f"{name}: values span {low:g}..{high:g}, wider than the data range {given:g}; is the range for another scale?"
            )
        return float(given)
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max - np.iinfo(dtype).min)
    if high == low:
        raise DataError(f"{name}: constant float image; give the data range (--data-range) to score it")
    return high - low


def psnr(truth: np.ndarray, pred: np.ndarray, data_range: float) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    return float(
        peak_signal_noise_ratio(np.asarray(truth, np.float64), np.asarray(pred, np.float64), data_range=data_range)
    )


def ssim(truth: np.ndarray, pred: np.ndarray, data_range: float, channel_axis: int | None = None) -> float:
    """Mean SSIM of a 2D image or 3D volume; ``channel_axis`` averages it over channels."""
    from skimage.metrics import structural_similarity

    truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
    spatial = [s for i, s in enumerate(truth.shape) if channel_axis is None or i != channel_axis % truth.ndim]
    smallest = min(spatial)
    if smallest < 3:
        raise DataError(f"SSIM needs images of at least 3 pixels per axis, got shape {truth.shape}")
    window = None if smallest >= 11 else smallest - (1 - smallest % 2)  # the Gaussian window, shrunk for thin stacks
    return float(
        structural_similarity(
            truth,
            pred,
            data_range=data_range,
            channel_axis=channel_axis,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            win_size=window,
        )
    )


def image_scores(
    name: str, truth: np.ndarray, pred: np.ndarray, data_range: float, channel_axis: int | None = None
) -> dict[str, Any]:
    if truth.shape != pred.shape:
        raise DataError(f"{name}: prediction shape {pred.shape} does not match the clean image {truth.shape}")
    if not np.isfinite(pred).all():
        raise DataError(f"{name}: prediction holds NaN or infinite values")
    return {
        "name": name,
        "psnr": psnr(truth, pred, data_range),
        "ssim": ssim(truth, pred, data_range, channel_axis),
        "data_range": data_range,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over images of every numeric score, plus the per-image records."""
    keys = [k for k, v in records[0].items() if isinstance(v, float) and k != "data_range"] if records else []
    means = {k: float(np.mean([r[k] for r in records])) for k in keys}
    ranges = sorted({r["data_range"] for r in records})
    return {
        **means,
        "data_range": ranges[0] if len(ranges) == 1 else "per image",
        "images": len(records),
        "per_image": records,
    }


def evaluate_image_folders(
    pred_dir: str | Path, truth_dir: str | Path, data_range: float | None = None
) -> dict[str, Any]:
    """PSNR/SSIM of saved results against clean images matched by file name (no model needed)."""
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found")
    records = []
    for truth_path, pred_path in match_by_stem(truth_dir, pred_dir, "clean", "prediction"):
        truth, pred = read_volume(truth_path), read_volume(pred_path)
        if pred.shape != truth.shape and pred.squeeze().shape == truth.squeeze().shape:
            pred = pred.reshape(truth.shape)
        if not np.isfinite(truth.astype(np.float64)).all():
            raise DataError(f"{truth_path}: holds NaN or infinite values")
        channel_axis = -1 if truth.ndim == 3 and truth.shape[-1] <= MAX_COLOURS else None
        r = data_range_for(truth, truth.dtype, data_range, str(truth_path))
        records.append(image_scores(truth_path.stem, truth, pred.astype(np.float64), r, channel_axis))
    return {"pred": str(pred_dir), "truth": str(truth_dir), **summarize(records)}
