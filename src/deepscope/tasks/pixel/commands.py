"""``deepscope pixel train | predict | scribbles | deep``: shallow pixel classification from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deepscope.errors import DataError
from deepscope.tasks.options import CONFIG, Result, collect_inputs, option, predictions, set_dotted, settings_from

CLASSIFIER_HELP = "classifier.safetensors of a pixel train run, or a deepscope serve project (folder or its yaml)"
KEY = option("--key", help="dataset/array inside HDF5, zarr or NPZ inputs")


def resolve_pixel_config(args: argparse.Namespace) -> Any:
    """Pixel settings: defaults < --config < --set < flags, as for train."""
    from deepscope.config import from_dict
    from deepscope.tasks.pixel.config import PixelConfig

    values = settings_from(args)
    for flag in ("images", "labels", "out", "device", "cache"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.trees is not None:
        set_dotted(values, "forest.trees", args.trees)
    if args.filters or args.scales:
        from deepscope.tasks.pixel.features import FILTERS, SCALES

        values["features"] = {name: list(args.scales or SCALES) for name in (args.filters or FILTERS)}
    if args.no_predict:
        values["predict"] = False
    return from_dict(PixelConfig, values, args.config or "command line")


def train(args: argparse.Namespace) -> Result:
    from deepscope.tasks.pixel.train import train_pixel

    metrics = train_pixel(resolve_pixel_config(args))
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


def classifier_file(given: str) -> Path:
    """The classifier file named on the command line: a ``classifier.safetensors``, or a ``deepscope serve`` project (its
    folder or its project file), whose saved classifier is used."""
    from deepscope.serve.folder import ServedFolder
    from deepscope.serve.project import PROJECT_FILE, Project

    path = Path(given)
    if path.is_dir() or path.name == PROJECT_FILE:
        folder = path if path.is_dir() else path.parent
        if not (folder / PROJECT_FILE).is_file():
            raise DataError(
                f"{folder}: no {PROJECT_FILE} here; give a classifier.safetensors or a folder served by deepscope serve"
            )
        project = Project.load(ServedFolder(folder))
        if project.classifier is None:
            raise DataError(
                f"{folder / PROJECT_FILE}: no classifier saved yet; save one in the page (Classifier: save)"
            )
        return folder / project.classifier
    return path


def predict(args: argparse.Namespace) -> Result:
    from deepscope.engine.distributed import pick_device
    from deepscope.tasks.pixel.predict import InstanceSettings, predict_files

    device = pick_device(args.device)
    files = collect_inputs(args.inputs, volumes=True)
    settings = InstanceSettings(
        args.foreground, args.boundary, args.threshold, args.seeds, args.min_distance, args.min_size
    )
    records = predict_files(
        classifier_file(args.classifier),
        files,
        args.out,
        device,
        key=args.key,
        tile=args.tile,
        instances=settings if args.instances else None,
    )
    return predictions(records, args.out)


def deep(args: argparse.Namespace) -> Result:
    from deepscope.engine.distributed import pick_device
    from deepscope.tasks.pixel.deep import train_unet_from_forest

    device = pick_device(args.device)
    files = collect_inputs(args.inputs, volumes=True)
    classifier = classifier_file(args.classifier)
    settings = settings_from(args)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    settings.setdefault("device", args.device)
    return train_unet_from_forest(classifier, files, args.out, device, settings, args.key, args.min_confidence)


def scribbles(args: argparse.Namespace) -> Result:
    """Sparse labels sampled from dense ground truth files, written as ``<out>/<stem>.tif``."""
    import numpy as np

    from deepscope.atomic import write_tiff
    from deepscope.data.io.volumes import read_volume
    from deepscope.data.scribbles import dense_classes, sample_scribbles

    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labelled = total = 0
    files = collect_inputs(args.truth, volumes=True)
    for path in files:
        classes = dense_classes(read_volume(path, args.key), args.class_values, args.foreground)
        sparse = sample_scribbles(classes, args.fraction, args.length, rng)
        write_tiff(out / f"{path.stem}.tif", sparse, "sparse labels", compression="zlib")
        labelled += int(np.count_nonzero(sparse))
        total += sparse.size
    return {"files": len(files), "labelled_pixels": labelled, "fraction": round(labelled / total, 6), "out": str(out)}


def add_commands(sub: Any) -> None:
    pixel = sub.add_parser(
        "pixel", help="shallow pixel classification: filter features + random forest from sparse labels"
    )
    actions = pixel.add_subparsers(dest="action", required=True)

    fit = actions.add_parser(
        "train", help="fit a forest on the labelled pixels; save classifier, predictions and report"
    )
    fit.add_argument("--images", help="image file or folder (PNG/TIFF/HDF5/zarr/NPZ, 2D or 3D)")
    fit.add_argument("--labels", help="sparse label file or folder (0 unlabelled, 1..K classes), matched by file name")
    fit.add_argument(
        "--out", help="run folder (default runs/pixel-<date-time>); rerun with the same folder to reuse cached features"
    )
    fit.add_argument("--filters", nargs="+", help="features: gaussian log ggm dog structure hessian (default: all)")
    fit.add_argument("--scales", type=float, nargs="+", help="feature scales (default 0.3 0.7 1 1.6 3.5 5 10)")
    fit.add_argument("--trees", type=int, help="random forest size (default 100)")
    fit.add_argument("--cache", help="feature cache folder (default <out>/feature_cache)")
    fit.add_argument(
        "--no-predict", dest="no_predict", action="store_true", help="do not write predictions of the labelled images"
    )
    option("--config", help="YAML file of pixel settings").add_to(fit)
    option("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. forest.class_weight=balanced").add_to(
        fit
    )
    fit.add_argument("--device", help="where features are computed: auto (default), cpu, cuda")
    fit.set_defaults(func=train)

    apply = actions.add_parser("predict", help="probabilities, class maps (and instances) of new images, tile by tile")
    apply.add_argument("classifier", help=CLASSIFIER_HELP)
    apply.add_argument("inputs", nargs="+", help="image files or folders")
    apply.add_argument("--out", required=True, help="folder, .tif, .h5 or .zarr")
    apply.add_argument(
        "--tile", type=int, nargs="+", help="tile size per axis (default: whole image when it fits in memory)"
    )
    apply.add_argument("--instances", action="store_true", help="also write instance labels (seeded watershed)")
    apply.add_argument("--foreground", type=int, nargs="+", help="classes that make objects (default: all but class 1)")
    apply.add_argument("--boundary", type=int, help="class of object boundaries that separates touching objects")
    apply.add_argument("--threshold", type=float, default=0.5, help="foreground probability threshold for instances")
    apply.add_argument(
        "--seeds",
        choices=["components", "maxima"],
        default="components",
        help="instance seeds: components of the foreground, or distance maxima (splits touching round objects)",
    )
    apply.add_argument("--min-distance", dest="min_distance", type=int, default=3, help="between maxima seeds (pixels)")
    apply.add_argument("--min-size", dest="min_size", type=int, default=0, help="drop smaller objects (pixels)")
    KEY.add_to(apply)
    apply.add_argument("--device", default="auto")
    apply.set_defaults(func=predict)

    sample = actions.add_parser("scribbles", help="sample brush-stroke sparse labels from dense ground truth")
    sample.add_argument("truth", nargs="+", help="dense label files or folders")
    sample.add_argument("--out", required=True, help="folder for the sparse label TIFFs")
    sample.add_argument("--fraction", type=float, default=0.001, help="share of pixels to label (default 0.001)")
    sample.add_argument("--length", type=int, default=16, help="stroke length in pixels")
    sample.add_argument("--foreground", action="store_true", help="instance labels: classes 1 background, 2 objects")
    sample.add_argument(
        "--class-values",
        dest="class_values",
        type=int,
        nargs="+",
        help="label values of classes 1..K (default: the values present)",
    )
    KEY.add_to(sample, help="dataset/array inside HDF5, zarr or NPZ files")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=scribbles)

    unet = actions.add_parser("deep", help="label images with a forest, then train a semantic U-Net on those labels")
    unet.add_argument("classifier", help=CLASSIFIER_HELP)
    unet.add_argument("inputs", nargs="+", help="unlabelled image files or folders")
    unet.add_argument(
        "--out", required=True, help="run folder: pseudo/ (images, masks) and unet/ (checkpoints, report)"
    )
    unet.add_argument("--epochs", type=int)
    unet.add_argument(
        "--min-confidence",
        dest="min_confidence",
        type=float,
        default=0.0,
        help="pixels whose top forest probability is lower are ignored in the loss",
    )
    CONFIG.add_to(unet, help="YAML file of segment settings for the U-Net")
    option(
        "--set", action="append", metavar="KEY=VALUE", help="any segment setting, e.g. patch_shape=[128,128]"
    ).add_to(unet)
    KEY.add_to(unet)
    unet.add_argument("--device", default="auto")
    unet.set_defaults(func=deep)
