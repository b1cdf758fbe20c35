"""GPU only: time to 94% CIFAR-10 test accuracy, deepscope's fastest recipe against airbench94.

airbench (``pip install airbench``, benchmark-only) reads ``cifar10/train.pt`` and ``test.pt`` from
its working directory and downloads CIFAR-10 when they are missing; this script writes both from
the shared data first, so nothing is downloaded. Both runs use the same GPU in the same process
order (airbench first, after its own warm-up run), and both times cover training plus the final
test evaluation with the data already on the GPU.

    python benchmarks/bench_gpu_airbench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from common import CACHE, HERE, SHARED, command_line, header, run, write_section
from prepare_cifar10 import prepare


def write_airbench_data(workdir) -> None:
    arrays = np.load(prepare(SHARED / "cifar10", CACHE / "cifar10", tree=False))
    names = [str(n) for n in arrays["class_names"]]
    (workdir / "cifar10").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        torch.save(
            {
                "images": torch.from_numpy(arrays[f"x_{split}"]),
                "labels": torch.from_numpy(arrays[f"y_{split}"]),
                "classes": names,
            },
            workdir / "cifar10" / f"{split}.pt",
        )


def airbench_run() -> tuple[float, float]:
    import airbench

    torch.cuda.synchronize()
    start = time.perf_counter()
    model = airbench.train94(verbose=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    return seconds, float(airbench.evaluate(model, test, tta_level=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    workdir = CACHE / "airbench"
    write_airbench_data(workdir)
    cwd = os.getcwd()
    os.chdir(workdir)
    import airbench

    airbench.warmup94(verbose=False)
    air = [airbench_run() for _ in range(args.runs)]
    os.chdir(cwd)
    data = CACHE / "cifar10" / "cifar10.npz"
    ours = []
    for i in range(args.runs):
        out = CACHE / "runs" / f"gpu_fastnet94_{i}"
        cmd = [
            sys.executable,
            "-m",
            "deepscope",
            "train",
            "classify",
            "--config",
            str(HERE / "recipes" / "gpu_fastnet94.yaml"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            "cuda",
        ]
        run(cmd, out.with_suffix(".log"))
        metrics = json.loads((out / "metrics.json").read_text())
        ours.append((metrics["train_time_s"], metrics["test_accuracy"]))
    a_time, d_time = statistics.median(t for t, _ in air), statistics.median(t for t, _ in ours)
    lines = [
        "| system | median seconds | test accuracies | ratio to airbench94 |",
        "|---|---:|---|---:|",
        f"| airbench94 | {a_time:.1f} | {', '.join(f'{a:.2%}' for _, a in air)} | 1.00 |",
        f"| deepscope `gpu_fastnet94` | {d_time:.1f} | {', '.join(f'{a:.2%}' for _, a in ours)} | {d_time / a_time:.2f} |",
    ]
    notes = (
        "airbench's seconds are wall time around `train94()` (whitening, training, no per-epoch evaluation) plus nothing "
        "else; deepscope's are the engine's `train_time_s`, which also includes per-epoch validation and the final test "
        "evaluation, so the comparison favours airbench. Goal: within 1.5x."
    )
    write_section(
        "gpu_airbench",
        "GPU: time to 94% on CIFAR-10 against airbench94",
        header(command_line()) + "\n" + "\n".join(lines) + "\n\n" + notes,
    )


if __name__ == "__main__":
    main()
