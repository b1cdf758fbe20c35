"""Tiled 2D prediction throughput and peak memory: deepscope's ``predict_tiled`` against MONAI's
``sliding_window_inference`` with the same U-Net, window and overlap, each method in its own process.

Window 256 with overlap 0.25 in MONAI equals deepscope's tile 192 + halo 32 on each side (same window
positions and count). The image is the ISBI 2012 EM slices tiled up to the requested size.
MONAI is a benchmark-only dependency (``pip install monai``).

    python benchmarks/bench_tiling.py [--size 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from common import SHARED, command_line, header, write_section
from deepscope.data.readers import read_image
from deepscope.models.unet import UNet
from deepscope.tiling import predict_tiled

WINDOW, OVERLAP, BATCH = 256, 0.25, 4


def em_image(size: int) -> np.ndarray:
    """(1, size, size) float32 from the shared EM slices, repeated to fill the size, scaled to [0, 1]."""
    folder = SHARED / "isbi2012_em"
    files = sorted(p for p in folder.rglob("*.png") if "label" not in str(p).lower())
    tile = read_image(files[0])[..., 0].astype(np.float32) / 255
    reps = -(-size // tile.shape[0]), -(-size // tile.shape[1])
    return np.tile(tile, reps)[None, :size, :size].copy()


def run_method(method: str, size: int) -> dict:
    torch.manual_seed(0)
    model = UNet(1, 2, dim=2, depth=4, features=32).eval()
    image = em_image(size)
    start = time.perf_counter()
    with torch.no_grad():
        if method == "monai":
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(torch.from_numpy(image)[None], (WINDOW, WINDOW), BATCH, model, overlap=OVERLAP, mode="gaussian")
            checksum = float(out.abs().mean())
        else:
            blend = method.split("_", 1)[1]
            tile, halo = int(WINDOW * (1 - OVERLAP)), int(WINDOW * OVERLAP / 2)
            out = predict_tiled(model, image, tile, halo, out_channels=2, blend=blend, batch_size=BATCH, device=torch.device("cpu"))
            checksum = float(np.abs(out).mean())
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "seconds": seconds, "pixels_per_s": size * size / seconds, "peak_mb": peak_mb, "mean_abs": checksum}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.size)))
        return
    rows = []
    for method in ("monai", "deepscope_gaussian", "deepscope_none"):
        done = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--method", method], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]["pixels_per_s"]
    lines = ["| method | seconds | pixels/s | ratio to MONAI | peak process memory MB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {r['pixels_per_s']:,.0f} | {r['pixels_per_s'] / base:.2f} | {r['peak_mb']:,.0f} |")
    notes = (f"{args.size}x{args.size} image (ISBI 2012 EM slice repeated), deepscope's 2D U-Net (depth 4, 32 features, "
             f"{sum(p.numel() for p in UNet(1, 2, depth=4, features=32).parameters()):,} parameters, random weights), CPU, "
             f"window {WINDOW}, overlap {OVERLAP} (deepscope: tile {int(WINDOW * (1 - OVERLAP))} + halo {int(WINDOW * OVERLAP / 2)}), "
             f"batch {BATCH}, each method in a fresh process (peak = max RSS, including torch itself). MONAI's input and "
             "output live in memory; deepscope reads tiles from any array-like and streams its output. Peer figures on this "
             "machine (peer-baselines.md): MONAI 156k px/s with BasicUNet, torch-em 229k px/s.")
    write_section("tiling_2d", "Tiled 2D prediction against MONAI (CPU)", header(command_line()) + "\n" + "\n".join(lines) + "\n\n" + notes)


if __name__ == "__main__":
    main()
