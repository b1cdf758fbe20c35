"""CAREamics' Noise2Void on the noisy arrays bench_bsd68.py exports; runs inside CAREamics' own virtual environment.

Defaults of ``create_n2v_config`` (its U-Net, 0.2 % masked pixels, flips and rotations, Adam with ReduceLROnPlateau,
float32), except what makes the comparison fair: the same patch size, batch size and number of optimizer steps.
Prediction uses 256 x 256 tiles with CAREamics' default 48-pixel overlap, from the last checkpoint (its N2V default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from careamics import CAREamist
from careamics.config import create_n2v_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arrays")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    data = np.load(args.arrays)
    train = np.stack([data[k] for k in sorted(data.files) if k.startswith("train_noisy_")])
    test_keys = sorted(k for k in data.files if k.startswith("test_noisy_"))
    config = create_n2v_config(
        "bsd68",
        "array",
        "SYX",
        [64, 64],
        args.batch,
        num_epochs=args.steps // args.steps_per_epoch,
        num_steps=args.steps_per_epoch,
    )
    careamist = CAREamist(config, work_dir=args.workdir, enable_progress_bar=False)
    start = time.perf_counter()
    careamist.train(train_data=train)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    predictions, _ = careamist.predict([data[k] for k in test_keys], axes="YX", data_type="array", tile_size=(256, 256))
    predict_s = time.perf_counter() - start
    np.savez(
        args.out,
        **{
            k.replace("noisy", "denoised"): np.asarray(p).reshape(data[k].shape) for k, p in zip(test_keys, predictions)
        },
    )
    Path(args.workdir, "timing.json").write_text(json.dumps({"train_s": train_s, "predict_s": predict_s}))


if __name__ == "__main__":
    main()
