"""Unpack the shared CIFAR-10 JPEG pack once into a benchmark cache.

Writes ``cifar10.npz`` (x_train, y_train, x_test, y_test as uint8 arrays, class_names) and a
class-folder tree of PNG files (``folders/train/<class>/*.png``, ``folders/test/<class>/*.png``),
both readable by deepscope's generic readers. The product itself has no reader for the pack.

    python benchmarks/prepare_cifar10.py [--shared ../shared/data/cifar10] [--cache benchmarks/.cache/cifar10]
"""

from __future__ import annotations

import argparse
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def decode(pack: np.lib.npyio.NpzFile, split: str) -> np.ndarray:
    buf, off = pack[f"{split}_jpeg"], pack[f"{split}_offsets"]

    def one(i: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(buf[off[i] : off[i + 1]].tobytes())).convert("RGB"))

    with ThreadPoolExecutor(4) as pool:
        return np.stack(list(pool.map(one, range(len(off) - 1), chunksize=512)))


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)

    def save(i: int) -> None:
        Image.fromarray(images[i]).save(root / names[labels[i]] / f"{i:05d}.png", compress_level=1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save, range(len(images)), chunksize=512))


def prepare(shared: Path, cache: Path, tree: bool = True) -> Path:
    target = cache / "cifar10.npz"
    if target.exists() and (not tree or (cache / "folders" / "test").exists()):
        return target
    pack = np.load(shared / "cifar10_jpeg.npz")
    names = [str(n) for n in pack["class_names"]]
    arrays = {"class_names": np.array(names)}
    for split in ("train", "test"):
        arrays[f"x_{split}"] = decode(pack, split)
        arrays[f"y_{split}"] = pack[f"y_{split}"].astype(np.int64)
        if tree:
            write_tree(cache / "folders" / split, arrays[f"x_{split}"], arrays[f"y_{split}"], names)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(target, **arrays)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "cifar10")
    args = parser.parse_args()
    print(prepare(args.shared, args.cache))
