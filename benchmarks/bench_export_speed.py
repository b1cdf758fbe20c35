"""Prediction speed of the same U-Net through PyTorch eager, TorchScript and onnxruntime, tiled by deepscope's
``predict_tiled`` on a 2048x2048 image and a 64x256x256 volume (the ISBI 2012 EM slices, as bench_tiling.py), on
the CPU, each runtime in its own process; every output is compared with eager float32.

The networks are written by ``deepscope.export.formats.export`` (the code behind ``deepscope export``), so the files
timed are the files users get. Eager runs twice: float32, and under ``--amp auto`` (bf16 where the processor has
native bf16, else float32 again). "default" is what ``deepscope predict`` runs a checkpoint with
(``inference/fastest.py``): eager, exporting to onnxruntime in memory during the run when that pays (its export time
is in its seconds).

    python benchmarks/bench_export_speed.py [--dim 2 --size 2048] [--dim 3 --size 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_tiling import em_image
from common import command_line, header, write_section
from deepscope.engine.precision import resolve_precision
from deepscope.export.exportable import Exportable
from deepscope.export.formats import SUFFIXES, export
from deepscope.export.runtime import load_exported
from deepscope.inference.fastest import FastestRuntime, runtime_of
from deepscope.inference.tiling import predict_tiled
from deepscope.models.unet import UNet

BATCH = 4
SETUPS = {  # dim -> (tile, halo, U-Net depth, features): bench_tiling's windows (256, 32x128x128) at overlap 0.25
    2: ((192, 192), (32, 32), 4, 32),
    3: ((24, 96, 96), (4, 16, 16), 3, 16),
}
RUNTIMES = ("eager", "eager_auto", "torchscript", "onnx", "default")


def network(dim: int) -> UNet:
    _, _, depth, features = SETUPS[dim]
    torch.manual_seed(0)
    return UNet(1, 2, dim=dim, depth=depth, features=features).eval()


def run_runtime(runtime: str, dim: int, size: int, folder: Path) -> dict:
    """Tiled prediction through one runtime in this process: seconds, peak memory, the output saved for comparison."""
    tile, halo, _, _ = SETUPS[dim]
    image = em_image(dim, size)
    device = torch.device("cpu")
    model: torch.nn.Module = network(dim)
    precision = resolve_precision("auto" if runtime == "eager_auto" else "off", device)
    if runtime in ("torchscript", "onnx"):
        model, _ = load_exported(folder / f"unet{SUFFIXES[runtime]}", device)
    if runtime == "default":  # what deepscope predict runs a checkpoint with: eager, moving to onnxruntime if it pays
        model = FastestRuntime(model, tuple(2 ** SETUPS[dim][2] for _ in range(dim)), "bench")
    start = time.perf_counter()
    with torch.no_grad(), precision.autocast(device):
        out = predict_tiled(model, image, tile, halo, out_channels=2, batch_size=BATCH, device=device)
    seconds = time.perf_counter() - start
    np.save(folder / f"{runtime}.npy", np.asarray(out, np.float32))
    return {
        "runtime": runtime if runtime != "default" else f"default ({runtime_of(model)['runtime']} at the end)",
        "precision": precision.name,
        "seconds": seconds,
        "pixels_per_s": image[0].size / seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=2, choices=[2, 3])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)  # internal: run one runtime in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runtime:
        print(json.dumps(run_runtime(args.runtime, args.dim, args.size, Path(args.folder))))
        return
    tile, halo, depth, features = SETUPS[args.dim]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        net = network(args.dim)
        example = torch.from_numpy(em_image(args.dim, args.size)[(None, slice(None), *(slice(0, t) for t in tile))])
        exported = Exportable("segment", net, example.float(), tuple(2**depth for _ in tile), {"config": {}}, "bench")
        checks = {fmt: export(exported, fmt, folder / f"unet{SUFFIXES[fmt]}") for fmt in ("torchscript", "onnx")}
        rows = []
        for runtime in RUNTIMES:
            cmd = [sys.executable, __file__, "--dim", str(args.dim), "--size", str(args.size)]
            done = subprocess.run([*cmd, "--runtime", runtime, "--folder", tmp], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["max_diff"] = float(np.abs(np.load(folder / f"{runtime}.npy") - np.load(folder / "eager.npy")).max())
            rows.append(row)
            print(row, flush=True)
    base = rows[0]["pixels_per_s"]
    shape = "x".join(map(str, em_image(args.dim, args.size).shape[1:]))
    lines = [
        "| runtime | precision | seconds | pixels/s | ratio to eager float32 | largest difference from eager float32 | peak process memory MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['precision']} | {r['seconds']:.1f} | {r['pixels_per_s']:,.0f} | "
            f"{r['pixels_per_s'] / base:.2f} | {r['max_diff']:.1e} | {r['peak_mb']:,.0f} |"
        )
    n_params = sum(p.numel() for p in net.parameters())
    notes = (
        f"{shape} image (ISBI 2012 EM slices repeated), deepscope's {args.dim}D U-Net (depth {depth}, {features} "
        f"features, {n_params:,} parameters, random weights), tile {tile} + halo {halo}, batch {BATCH}, CPU, each "
        f"runtime in a fresh process (peak = max RSS, including torch itself). Export check (example tile and one "
        f"multiple larger): TorchScript {checks['torchscript']['max_abs_difference']:.1e}, ONNX (opset "
        f"{checks['onnx']['opset']}) {checks['onnx']['max_abs_difference']:.1e}. Single runs: expect ±20% between runs."
    )
    usual = {2: 2048, 3: 256}[args.dim]  # the issue's sizes keep the plain section name; others get their own
    write_section(
        f"export_speed_{args.dim}d" + ("" if args.size == usual else f"_{args.size}"),
        f"Prediction through eager PyTorch, TorchScript and onnxruntime, {args.dim}D (CPU)",
        header(command_line()) + "\n" + "\n".join(lines) + "\n\n" + notes,
    )


if __name__ == "__main__":
    main()
