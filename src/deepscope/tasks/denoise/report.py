"""Report pieces of the denoise task: side-by-side crops (noisy | denoised | clean) and the PSNR/SSIM table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepscope.data.denoise.dataset import DenoiseItem
from deepscope.engine.report import image_grid, table
from deepscope.tasks.denoise.predict import Denoiser, score_item

SHOWN = 4  # images shown in the report
CROP = 128  # side of the crops shown


def _crop_2d(image: np.ndarray) -> np.ndarray:
    """A centred CROP x CROP crop of a (C, *spatial) image (the middle plane of a volume), as (h, w, C<=3)."""
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2]
    h, w = image.shape[1:]
    top, left = max(0, (h - CROP) // 2), max(0, (w - CROP) // 2)
    crop = image[: 3 if image.shape[0] >= 3 else 1, top : top + CROP, left : left + CROP]
    return np.moveaxis(crop, 0, -1)


def save_crops(denoiser: Denoiser, items: list[DenoiseItem], data_range: float | None, path: Path) -> None:
    """Crops of up to SHOWN images, one row each: noisy, denoised and, where known, clean, with PSNR in the captions.

    All crops of a row share the clean (else noisy) crop's 1st..99th percentile display range, so they compare fairly.
    """
    images, captions = [], []
    for item in items[:SHOWN]:
        if "clean" in item.images:
            record, denoised = score_item(denoiser, item, data_range)
            names = [f"noisy {record['psnr_input']:.2f} dB", f"denoised {record['psnr']:.2f} dB", "clean"]
            row = [item.images["noisy"], denoised, item.images["clean"]]
        else:
            names, row = ["noisy", "denoised"], [item.images["noisy"], denoiser(item.images["noisy"], item.name)]
        crops = [_crop_2d(np.asarray(x)) for x in row]
        low, high = np.percentile(crops[-1] if len(row) == 3 else crops[0], [1, 99])
        for crop, name in zip(crops, names):
            images.append(np.clip((crop - low) / max(high - low, 1e-6), 0, 1))
            captions.append(f"{item.name}: {name}")
    if images:
        width = max(c.shape[1] for c in images)
        height = max(c.shape[0] for c in images)
        padded = [np.pad(c, ((0, height - c.shape[0]), (0, width - c.shape[1]), (0, 0))) for c in images]
        image_grid(np.stack(padded), captions, path, columns=3)


def report_sections(final: dict[str, Any], split: str, shown: str | None, run_dir: Path) -> list[tuple[str, str]]:
    sections = []
    if final.get("per_image"):
        rows = [
            {
                "image": r["name"],
                "psnr": r["psnr"],
                "ssim": r["ssim"],
                "psnr_noisy": r["psnr_input"],
                "ssim_noisy": r["ssim_input"],
            }
            for r in final["per_image"]
        ]
        head = (
            f"<p>Mean over {final['images']} images: PSNR {final['psnr']:.2f} dB (noisy {final['psnr_input']:.2f} dB), "
            f"SSIM {final['ssim']:.4f} (noisy {final['ssim_input']:.4f}); data range {final['data_range']}.</p>"
        )
        sections.append((f"PSNR and SSIM ({split} images)", head + table(rows)))
    if (run_dir / "crops.png").exists():
        sections.append(
            (
                f"Crops ({shown} images)",
                "<p>noisy | denoised | clean (where known)</p><img src='crops.png' alt='crops'>",
            )
        )
    return sections
