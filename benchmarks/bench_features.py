"""Filter-bank feature speed: deepscope (torch, FFT) against scikit-image and plain scipy.ndimage, same filters and scales.

The set is scikit-image's ``multiscale_basic_features``: Gaussian smoothing, gradient magnitude and Hessian eigenvalues
at 7 scales from 0.3 to 10 (28 features in 2D, 35 in 3D), on a 2048x2048 mosaic of ISBI 2012 EM slices and a
256x256x256 volume mirrored out of the PlantSeg nuclei crop. Each method runs in its own process (so peak memory is
its own) on the same 2 cores. The first call of a process pays for paging in fresh memory and setting up (FFT
descriptors, thread pools), so it is reported apart from later calls ("warm": median of calls 2-7 in 2D, of calls 2-3
for deepscope in 3D; the 3D peers take minutes and run once). scikit-image computes its derivatives by finite differences of the smoothed image, scipy and
deepscope by Gaussian-derivative kernels, which is why their values agree with each other and not with scikit-image.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from common import SHARED, command_line, header, write_section

SIGMAS = tuple(float(s) for s in np.logspace(np.log2(0.3), np.log2(10), 7, base=2))  # scikit-image's own scales


def test_image(ndim: int) -> np.ndarray:
    if ndim == 2:
        slices = [np.asarray(Image.open(SHARED / "isbi2012_em" / "images" / f"{i:02d}.png")) for i in range(16)]
        return np.block([[slices[4 * r + c] for c in range(4)] for r in range(4)]).astype(np.float32) / 255
    raw = np.load(SHARED / "plantseg3d" / "nuclei_1135_mini.npz")["raw"].astype(np.float32) / 255
    return np.pad(raw, [(0, 256 - n) for n in raw.shape], mode="reflect")


def deepscope_features(image: np.ndarray, full: bool = False) -> np.ndarray:
    from deepscope.tasks.pixel.features import FeatureSpec, compute_features

    spec = (
        FeatureSpec.default(image.ndim)
        if full
        else FeatureSpec.from_selection(["gaussian", "ggm", "hessian"], SIGMAS, image.ndim)
    )
    return compute_features(image[None], spec, device="cpu")


def skimage_features(image: np.ndarray) -> np.ndarray:
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(image, sigma_min=SIGMAS[0], sigma_max=SIGMAS[-1], num_sigma=len(SIGMAS))


def scipy_features(image: np.ndarray) -> np.ndarray:
    """The same 28/35 maps as deepscope with ``scipy.ndimage.gaussian_filter`` and its derivative orders."""
    from scipy import ndimage

    nd = image.ndim
    unit = [tuple(int(a == b) for b in range(nd)) for a in range(nd)]
    smooth, magnitude, eigen = [], [], []
    for sigma in SIGMAS:

        def g(order: tuple[int, ...]) -> np.ndarray:
            return ndimage.gaussian_filter(image, sigma, order=order, mode="mirror")  # noqa: B023 (called in this iteration)

        smooth.append(g((0,) * nd))
        magnitude.append(np.sqrt(sum(g(u) ** 2 for u in unit)))
        hessian = np.empty(image.shape + (nd, nd), np.float32)
        for a in range(nd):
            for b in range(a, nd):
                hessian[..., a, b] = hessian[..., b, a] = g(tuple(np.add(unit[a], unit[b])))
        eigen += list(np.moveaxis(np.linalg.eigvalsh(hessian)[..., ::-1], -1, 0))
    return np.stack(smooth + magnitude + eigen)  # deepscope's order: filter by filter, then scale


METHODS = {
    "deepscope": deepscope_features,
    "deepscope-full": lambda x: deepscope_features(x, full=True),
    "skimage": skimage_features,
    "scipy": scipy_features,
}


def one(method: str, ndim: int, repeats: int) -> None:
    """Child process: time ``repeats`` calls, print times, feature count and peak RSS as JSON."""
    import torch

    torch.set_num_threads(2)
    image = test_image(ndim)
    times, result = [], None
    for _ in range(repeats):
        result = None  # the previous call's features are freed first, as in a loop over images
        start = time.perf_counter()
        result = METHODS[method](image)
        times.append(time.perf_counter() - start)
    count = result.shape[0] if method != "skimage" else result.shape[-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    check = {}
    if method == "deepscope" and ndim == 2:  # same maps as scipy's kernels, and tiles equal to the whole
        from deepscope.tasks.pixel.features import FeatureSpec, compute_features

        reference = scipy_features(image)
        check["max_abs_diff_vs_scipy"] = float(np.abs(result - reference).max())
        spec = FeatureSpec.from_selection(["gaussian", "ggm", "hessian"], SIGMAS, 2)
        tiled = compute_features(image[None], spec, tile=(512, 512), device="cpu")
        check["max_abs_diff_tiled_512"] = float(np.abs(tiled - result).max())
    print(json.dumps({"times": times, "features": int(count), "peak_gb": peak, **check}))


def measure(method: str, ndim: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", method, "--ndim", str(ndim), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if len(result["times"]) > 1:
        result["warm_s"] = statistics.median(result["times"][1:])
    print(method, ndim, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one")
    parser.add_argument("--ndim", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.ndim, args.repeats)
        return
    rows, checks = [], {}
    for ndim, label in ((2, "2048x2048"), (3, "256x256x256")):
        results = {m: measure(m, ndim, 7 if ndim == 2 else 3 if m.startswith("deepscope") else 1) for m in METHODS}
        cold, warm = results["skimage"]["times"][0], results["skimage"].get("warm_s")
        for method, r in results.items():
            first = r["times"][0]
            warm_cell = "-"
            if "warm_s" in r:
                warm_cell = f"{r['warm_s']:.2f} s" + (f" ({warm / r['warm_s']:.1f}x)" if warm else "")
            rows.append(
                f"| {label} | {method} | {r['features']} | {first:.2f} s ({cold / first:.1f}x) | {warm_cell} | {r['peak_gb']:.2f} GB |"
            )
            checks.update({k: v for k, v in r.items() if k.startswith("max_abs")})
    lines = [
        header(command_line()),
        f"Scales {', '.join(f'{s:.2f}' for s in SIGMAS)} (scikit-image's 7 from 0.3 to 10). deepscope and scipy: Gaussian, "
        "gradient magnitude and Hessian eigenvalues from Gaussian-derivative kernels; scikit-image: the same from finite "
        "differences of the smoothed image. `deepscope-full` is ilastik's whole set (6 filters, 49 features in 2D, 61 in 3D).",
        "",
        "| image | method | features | first call (speed-up vs scikit-image) | warm (speed-up) | peak memory (process) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Checks (2D): max |deepscope - scipy| = {checks['max_abs_diff_vs_scipy']:.1e} on features of an image in [0, 1]; "
        f"512x512 tiles against the whole image: max difference {checks['max_abs_diff_tiled_512']:.1e} (float32 FFT rounding).",
    ]
    write_section("features", "Filter-bank feature speed (CPU, 2 cores)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
