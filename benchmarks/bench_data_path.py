"""Training images/s of the in-memory device loader against a plain DataLoader + torchvision transforms.

Same model, batch size, augmentation (reflect-pad crop, flip, cutout) and precision for both;
only the data path differs. Measured in one process, one after the other.

    python benchmarks/bench_data_path.py [--steps 30] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import CACHE, SHARED, command_line, header, write_section
from deepscope.data.classification.augment import AugmentConfig
from deepscope.data.classification.dataset import ImageSet, channel_stats, load_classification
from deepscope.data.classification.loaders import BatchSpec, DeviceLoader, torch_loader
from deepscope.engine.precision import resolve_precision
from deepscope.models import build_model
from prepare_cifar10 import prepare

AUTO = resolve_precision("auto", torch.device("cpu"))  # what the trainer would run in here
MODELS = {"logreg": {}, "mlp": {}, "cnn": {}, "fastnet": {"widths": [32, 64, 128], "stem": 24}}


def images_per_second(model: torch.nn.Module, loader, steps: int, warmup: int = 3) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    done, start = 0, 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        with AUTO.autocast(torch.device("cpu")):
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            done += len(y)
        if i == warmup + steps - 1:
            break
    return done / (time.perf_counter() - start)


def loader_only(loader, steps: int, warmup: int = 3) -> float:
    """Images/s a loader produces with no model attached."""
    done, start = 0, 0.0
    for i, (_, y) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            done += len(y)
        if i == warmup + steps - 1:
            break
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    arrays = np.load(prepare(SHARED / "cifar10", CACHE / "cifar10", tree=True))
    start = time.perf_counter()
    tree = load_classification(CACHE / "cifar10" / "folders")
    read_s = time.perf_counter() - start
    n_files = sum(len(s) for s in tree.splits.values())
    same = sorted(map(bytes, tree.splits["test"].images)) == sorted(map(bytes, arrays["x_test"]))
    print(
        f"folder reader: {n_files} PNG files in {read_s:.1f} s, test images identical to the arrays: {same}", flush=True
    )
    data = ImageSet(arrays["x_train"], arrays["y_train"], [""] * len(arrays["y_train"]))
    mean, std = channel_stats(data)
    augment = AugmentConfig(crop_padding=4, flip=True, cutout=8)
    spec = BatchSpec(args.batch_size, mean, std, shuffle=True, augment=augment)
    cpu = torch.device("cpu")
    alone = {
        "memory": loader_only(DeviceLoader(data, spec, cpu), 100),
        "dataloader_w0": loader_only(torch_loader(data, spec), 100),
        "dataloader_w2": loader_only(torch_loader(data, spec, num_workers=2), 100),
    }
    print("loader alone", {k: round(v) for k, v in alone.items()}, flush=True)
    streamed = load_classification(CACHE / "cifar10" / "folders", lazy=True).splits["train"]
    stream_rate = {w: loader_only(torch_loader(streamed, spec, num_workers=w), 40) for w in (0, 2)}
    print("streaming PNG files", {k: round(v) for k, v in stream_rate.items()}, flush=True)
    rows = [("(loader alone, no model)", alone)]
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, (3, 32, 32), 10, **kwargs).to(memory_format=torch.channels_last)
        figures = {"memory": images_per_second(model, DeviceLoader(data, spec, cpu), args.steps)}
        for workers in (0, 2):
            figures[f"dataloader_w{workers}"] = images_per_second(
                model, torch_loader(data, spec, num_workers=workers), args.steps
            )
        rows.append((name, figures))
        print(name, {k: round(v) for k, v in figures.items()}, flush=True)
    lines = [
        "| model | in-memory images/s | DataLoader, 0 workers | ratio | DataLoader, 2 workers | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, f in rows:
        lines.append(
            f"| {name} | {f['memory']:,.0f} | {f['dataloader_w0']:,.0f} | {f['memory'] / f['dataloader_w0']:.1f}x | "
            f"{f['dataloader_w2']:,.0f} | {f['memory'] / f['dataloader_w2']:.1f}x |"
        )
    notes = (
        f"Folder reader at scale: `load_classification` read the class-folder tree of {n_files:,} CIFAR-10 PNG files "
        f"(train/ and test/) in {read_s:.1f} s ({n_files / read_s:,.0f} files/s); the decoded test images are "
        f"{'identical to' if same else 'NOT identical to'} the cached arrays. Streaming the training PNG files from disk "
        f"(`--loader dataloader`, for folders larger than memory) delivered {stream_rate[0]:,.0f} images/s with 0 workers "
        f"and {stream_rate[2]:,.0f} images/s with 2 workers, same augmentation.\n\n"
        f"CIFAR-10 training set, batch {args.batch_size}, {args.steps} timed steps after 3 warm-up steps, SGD, "
        f"{AUTO.name} (`--amp auto` on this CPU), "
        "channels-last. Augmentation: reflect-pad-4 random crop, horizontal flip, 8x8 cutout, per image in both paths "
        "(batched tensor ops in deepscope's device loader; torchvision.transforms.v2 per sample in the DataLoader). "
        "Single run on a shared machine: figures move by ±20% between runs. The first row times the loaders with no model (100 batches). With a model, the ratio falls as the model's own "
        "compute grows: on 2 CPU cores a conv net's forward/backward takes most of each step, so the data path "
        "matters most for small models here, and on a GPU, where the model step is fast and a CPU-side loader starves it."
    )
    write_section(
        "data_path",
        "Data-path speed: in-memory loader against DataLoader",
        header(command_line()) + "\n" + "\n".join(lines) + "\n\n" + notes,
    )


if __name__ == "__main__":
    main()
