"""One training step in float32 and in bf16 autocast on this CPU, and what ``--amp auto`` picks here.

bf16 autocast is only fast where the processor computes bf16 natively (AVX-512 BF16, AMX); elsewhere PyTorch
emulates it and a step is many times slower than in float32. This measures both for two models the project trains
on CPUs: the denoise task's default U-Net (depth 2, 32 features, batch 64 of 64x64 grey patches, AdamW) and
the CIFAR-10 fast net of ``benchmarks/recipes/fastnet.yaml`` (64-128-256, batch 512 of 32x32 RGB, SGD), both
channels-last as the trainer runs them. Each step is forward, backward and optimizer update on random data; the
figure is the median of the timed steps after one warm-up step, timed until ``--steps`` steps or ``--budget``
seconds per model and precision, whichever comes first (at least one). Rows of other processors already in
RESULTS.md are kept, so a machine with native bf16 and one without can stand side by side.

    python benchmarks/bench_precision.py [--steps 5] [--budget 60]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from common import command_line, cpu_name, header, section_rows, write_section
from deepscope.engine.precision import Precision, cpu_description, resolve_precision
from deepscope.losses.denoise import masked_mse
from deepscope.models import build_model, build_unet

SECTION = "precision"
CPU = torch.device("cpu")


def denoise_unet() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[nn.Module], torch.Tensor]]:
    model = build_unet(1, 1, 2, depth=2, features=32, residual=True).to(memory_format=torch.channels_last)
    x = torch.randn(64, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=2e-3), lambda m: masked_mse(m(x), x)


def fastnet() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[nn.Module], torch.Tensor]]:
    model = build_model("fastnet", (3, 32, 32), 10, widths=(64, 128, 256), stem=32).to(
        memory_format=torch.channels_last
    )
    x = torch.randn(512, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (512,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, optimizer, lambda m: nn.functional.cross_entropy(m(x).float(), y, label_smoothing=0.2)


MODELS = {
    "denoise U-Net, default size (batch 64 of 64x64)": denoise_unet,
    "CIFAR-10 fast net (batch 512 of 32x32)": fastnet,
}


def step_seconds(build: Callable, precision: Precision, steps: int, budget: float) -> float:
    """Median seconds of one training step (after a warm-up step) in ``precision`` on the CPU."""
    torch.manual_seed(0)
    model, optimizer, loss_of = build()
    model.train()
    times: list[float] = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with precision.autocast(CPU):
            loss = loss_of(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
            if sum(times) > budget:
                break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and precision (at most)")
    parser.add_argument("--budget", type=float, default=60, help="seconds of timed steps per model and precision")
    args = parser.parse_args()
    processor = f"{cpu_name()} ({cpu_description()})"
    auto = resolve_precision("auto", CPU)
    rows = []
    for name, build in MODELS.items():
        fp32 = step_seconds(build, resolve_precision("off", CPU), args.steps, args.budget)
        bf16 = step_seconds(build, resolve_precision("bf16", CPU), args.steps, args.budget)
        rows.append(
            f"| {processor} | {name} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f}x | {auto.name} | "
            f"{datetime.date.today().isoformat()} |"
        )
        print(rows[-1], flush=True)
    kept = [row for row in section_rows(SECTION) if not row.startswith(f"| {processor} |")]
    table = [
        "| processor (capability) | model, one training step | float32 s | bf16 s | bf16 / float32 | auto picks | date |",
        "|---|---|---:|---:|---:|---|---|",
        *kept,
        *rows,
    ]
    notes = (
        "Forward, backward and optimizer update on random data, channels-last, on all cores of this machine; median "
        "of the timed steps after one warm-up step. 'auto picks' is what `--amp auto` resolves to on this processor: "
        "bf16 only where the CPU computes bf16 natively (AVX-512 BF16 or AMX), float32 where autocast would emulate it. "
        "Rows of other processors are kept from earlier runs of this script."
    )
    write_section(
        SECTION,
        "Training-step precision on CPU: float32 against bf16 autocast",
        header(command_line()) + "\n" + "\n".join(table) + "\n\n" + notes,
    )


if __name__ == "__main__":
    main()
