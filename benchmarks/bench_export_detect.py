"""Detection through eager PyTorch, TorchScript and onnxruntime: the same trained detector scored on the same test
images, each runtime in its own process, timed from loading the model to the last image's detections.

The files are written by ``deepscope export`` (the candidates of ``models/detection/candidates.py``; NMS stays in
deepscope, as for the checkpoint). By default the detector is the newcomer benchmark's 30-minute Penn-Fudan run
(``bench_newcomer.py --rows detect-30``) and its held-out split of 30 images.

    python benchmarks/bench_export_detect.py [--checkpoint RUN/best.pt --data DATA]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import command_line, header, write_section

HERE = Path(__file__).resolve().parent
DEFAULT_RUN = HERE / ".cache" / "newcomer" / "runs" / "detect-30" / "best.pt"
DEFAULT_DATA = HERE / ".cache" / "pennfudan_split"
RUNTIMES = ("checkpoint", "torchscript", "onnx")


def score(model: str, data: str) -> dict:
    """COCO scores of one model file on the test split, and the seconds from loading it to the last detection."""
    from deepscope.tasks.detect.apply import evaluate_checkpoint

    start = time.perf_counter()
    result = evaluate_checkpoint(model, data, "test", torch.device("cpu"))
    return {"seconds": time.perf_counter() - start, **{k: result[k] for k in ("images", "map", "map_50", "map_75")}}


def shown(path: str) -> str:
    """A path relative to the repository when it lies inside it (the tables are read on other machines)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(HERE.parent)) if resolved.is_relative_to(HERE.parent) else path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(DEFAULT_RUN))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--score", help=argparse.SUPPRESS)  # internal: score one model file in this process
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score(args.score, args.data)))
        return
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"{args.checkpoint}: no detector; run bench_newcomer.py --rows detect-30 or give --checkpoint")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"checkpoint": args.checkpoint}
        for fmt in ("torchscript", "onnx"):
            files[fmt] = str(Path(tmp) / f"detector.{fmt}")
            start = time.perf_counter()
            done = subprocess.run(
                ["deepscope", "export", args.checkpoint, "--format", fmt, "--out", files[fmt]],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            print(f"{fmt} export {time.perf_counter() - start:.1f} s", flush=True)
        for runtime in RUNTIMES:
            cmd = [sys.executable, __file__, "--data", args.data, "--score", files[runtime]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            rows.append({"runtime": runtime, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    base = rows[0]["seconds"]
    lines = [
        "| runtime | images | seconds | ratio to eager | mAP | mAP@0.5 | mAP@0.75 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['images']} | {r['seconds']:.1f} | {base / r['seconds']:.2f} | {r['map']:.4f} | "
            f"{r['map_50']:.4f} | {r['map_75']:.4f} |"
        )
    notes = (
        f"Detector {shown(args.checkpoint)}, test split of {shown(args.data)}; CPU, float32 in every runtime (the checkpoint's "
        "evaluation runs float32), each runtime in a fresh process, timed from loading the model to the last image's "
        "detections (the metric's own time included). Single runs: expect ±20% between runs."
    )
    write_section(
        "export_speed_detect",
        "Detection through eager PyTorch, TorchScript and onnxruntime (CPU)",
        header(command_line()) + "\n" + "\n".join(lines) + "\n\n" + notes,
    )


if __name__ == "__main__":
    main()
