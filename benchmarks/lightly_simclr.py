"""SimCLR assembled from lightly's own pieces: the peer of ``deepscope train ssl --method simclr`` in bench_ssl_cifar10.py.

Runs inside ``benchmarks/.cache/venv-lightly`` (made by bench_ssl_cifar10.py), which sees the installed torch and
deepscope. What is lightly's: the views (``SimCLRTransform``, per image on PIL images in DataLoader workers, as lightly's
examples do), the projection head (``SimCLRProjectionHead``) and the loss (``NTXentLoss``), with one forward pass per
view as in lightly's SimCLR example. What is held equal to deepscope, so that the table compares the pipelines and not
the settings: the training images and their standardisation (deepscope's ``load_ssl_data`` and ``ssl_stats``: the same
seeded split that ``train ssl`` trains on), the encoder (``build_encoder``), the view parameters, temperature, head widths,
batch size, epochs, optimizer and learning-rate schedule (deepscope's ``build_optimizer``/``build_scheduler`` with the
values the parent passes, which are ``train ssl``'s defaults), the precision (``--amp auto`` as deepscope resolves it)
and the wall budget, counted as deepscope's trainer counts it: from before the data are read. The encoder's last weights
go to OUT/encoder.pt; the parent probes them with deepscope's ``probe_encoder``. The JSON summary (also OUT/summary.json)
is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class PilViews(Dataset):
    """Training images as PIL images through lightly's transform, which returns the two views of one image.

    Per-image PIL work in DataLoader workers is lightly's pipeline, the thing measured, so it is kept as lightly has it."""

    def __init__(self, images: np.ndarray, transform: object) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index]))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, required=True, help="what `deepscope train ssl --data` reads (an .npz, class folders)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, required=True, help="ResNet-18 width (64: the standard network)")
    parser.add_argument("--epochs", type=int, required=True, help="length of the learning-rate schedule")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-minutes", type=float, required=True)
    parser.add_argument(
        "--val-fraction", type=float, required=True, help="share of train/ that deepscope keeps for its kNN monitor"
    )
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--projector", type=int, nargs=2, required=True, metavar=("HIDDEN", "OUT"), help="head widths")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--momentum", type=float, required=True)
    parser.add_argument("--nesterov", type=int, required=True, choices=[0, 1])
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--warmup-fraction", type=float, required=True)
    parser.add_argument(
        "--crop-scale", type=float, required=True, help="smallest area fraction of the random resized crop"
    )
    parser.add_argument("--jitter", type=float, nargs=4, required=True, metavar=("B", "C", "S", "H"))
    parser.add_argument("--jitter-prob", type=float, required=True)
    parser.add_argument("--grey-prob", type=float, required=True)
    parser.add_argument("--flip-prob", type=float, required=True)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse()
    import lightly
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    from deepscope.config import OptimConfig
    from deepscope.data.ssl.dataset import load_ssl_data, ssl_stats
    from deepscope.engine.optim import build_optimizer, build_scheduler
    from deepscope.engine.precision import resolve_precision
    from deepscope.models.ssl import build_encoder

    t_start = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    precision = resolve_precision(args.amp, device)
    data = load_ssl_data(args.data, val_fraction=args.val_fraction, seed=args.seed)
    train = data.splits["train"]
    mean, std = ssl_stats(train, data.kind)
    images = train.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8 for PIL
    brightness, contrast, saturation, hue = args.jitter
    transform = SimCLRTransform(
        input_size=images.shape[1],
        cj_prob=args.jitter_prob,
        cj_strength=1.0,
        cj_bright=brightness,
        cj_contrast=contrast,
        cj_sat=saturation,
        cj_hue=hue,
        min_scale=args.crop_scale,
        random_gray_scale=args.grey_prob,
        gaussian_blur=0.0,
        hf_prob=args.flip_prob,
        normalize={"mean": mean, "std": std},
    )
    loader = DataLoader(
        PilViews(images, transform),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
    )
    encoder = build_encoder("resnet18", tuple(train.images.shape[1:]), width=args.width)
    head = SimCLRProjectionHead(encoder.out_features, *args.projector)
    model = torch.nn.Sequential(encoder, head).to(device, memory_format=torch.channels_last)  # as train ssl runs it
    criterion = NTXentLoss(temperature=args.temperature)
    optim = OptimConfig(
        name=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=bool(args.nesterov),
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_fraction=args.warmup_fraction,
    )
    optimizer = build_optimizer(model, optim)
    scheduler, _ = build_scheduler(optimizer, optim, len(loader) * args.epochs)
    deadline = t_start + 60 * args.max_minutes
    epochs = seen = 0
    loss = torch.zeros(())
    model.train()
    t_loop = time.time()
    while epochs < args.epochs and time.time() < deadline:
        epochs += 1
        for v1, v2 in loader:
            v1, v2 = (v.to(device, non_blocking=True, memory_format=torch.channels_last) for v in (v1, v2))
            with precision.autocast(device):
                loss = criterion(model(v1), model(v2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            seen += len(v1)
            if time.time() > deadline:
                break
        print(f"epoch {epochs}: loss {loss.item():.4f}, {seen / (time.time() - t_loop):.0f} images/s", flush=True)
    loop_s = time.time() - t_loop
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), args.out / "encoder.pt")
    summary = {
        "tool": f"lightly {lightly.__version__}",
        "train_images": len(images),
        "epochs_completed": epochs,
        "epochs_seen": seen / len(images),
        "train_time_s": time.time() - t_start,
        "images_per_s": seen / max(loop_s, 1e-9),
        "final_loss": loss.item(),
        "precision": precision.summary(),
        "num_workers": args.num_workers,
        "threads": torch.get_num_threads(),
        "mean": mean,
        "std": std,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
