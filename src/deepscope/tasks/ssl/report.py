"""Pictures and report of a self-supervised run: probe table, t-SNE embedding map, nearest-neighbour grid."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from deepscope.engine.report import image_grid, pyplot, save_figure, table, write_report
from deepscope.tasks.ssl.probe import stratified_indices

PCA_DIMS = 50  # t-SNE on the leading principal components: the usual denoising step, and much faster on wide features
# t-SNE for a picture, not a publication: 500 iterations and a coarser Barnes-Hut approximation (angle 0.8, the top of
# the range scikit-learn documents) take under half the default's CPU time (about 6 s for 2000 points on one core)


def embedding_map(
    features: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, max_points: int = 2000, seed: int = 0
) -> None:
    """t-SNE of a seeded, class-stratified sample of at most ``max_points`` features, coloured by class (unlabelled: grey)."""
    plt = pyplot()
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    keep = stratified_indices(labels, max_points, seed) if len(labels) > max_points else np.arange(len(labels))
    x, y = np.asarray(features[keep], dtype=np.float32), labels[keep]
    if x.shape[1] > PCA_DIMS and len(x) > PCA_DIMS:
        x = PCA(PCA_DIMS, random_state=seed).fit_transform(x)
    perplexity = min(30.0, max(1.0, (len(x) - 1) / 3))
    # one thread: t-SNE's per-iteration OpenMP barriers stall for seconds on a busy machine
    with threadpool_limits(1, user_api="openmp"):
        xy = TSNE(2, perplexity=perplexity, init="pca", max_iter=500, angle=0.8, random_state=seed).fit_transform(x)
    classes = [int(c) for c in np.unique(y) if c >= 0]
    n = len(class_names)
    palette = (
        plt.colormaps["tab10" if n <= 10 else "tab20"].colors
        if n <= 20
        else plt.colormaps["turbo"](np.linspace(0, 1, n))
    )
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if (y < 0).any():
        ax.scatter(*xy[y < 0].T, s=4, c="0.7", label="unlabelled")
    for c in classes:
        ax.scatter(*xy[y == c].T, s=4, color=palette[c], label=class_names[c])
    ax.set(xticks=[], yticks=[], title=f"t-SNE of {len(x)} images")
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def nearest(
    features: np.ndarray, bank_features: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities (each (q, k), most similar first) of the ``k`` bank features nearest each query.

    ``exclude[i]`` is a bank index that query i may not return (the query itself when the bank is the same set).
    """
    q = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    b = bank_features / np.linalg.norm(bank_features, axis=1, keepdims=True).clip(1e-12)
    sims = (q @ b.T).astype(np.float32)
    if exclude is not None:
        sims[np.arange(len(q)), exclude] = -np.inf
    k = min(k, len(b) - (exclude is not None))
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, axis=1)


def _as_float_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) uint8 or float images as (N, H, W, C) floats in [0, 1]."""
    images = images[..., None] if images.ndim == 3 else images
    return images.astype(np.float32) / 255 if images.dtype == np.uint8 else np.clip(images.astype(np.float32), 0, 1)


def neighbour_grid(
    images: np.ndarray,
    features: np.ndarray,
    bank_images: np.ndarray,
    bank_features: np.ndarray,
    path: Path,
    queries: int = 8,
    neighbours: int = 7,
    seed: int = 0,
    same_set: bool = False,
) -> None:
    """One row per seeded random query image: the query, then its nearest bank images by cosine similarity of features.

    With ``same_set`` the bank is the query set itself, and a query is not shown as its own neighbour.
    """
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), min(queries, len(images)), replace=False))
    idx, sims = nearest(features[chosen], bank_features, neighbours, exclude=chosen if same_set else None)
    query_images, bank_images = _as_float_images(images[chosen]), _as_float_images(bank_images[idx.ravel()])
    columns = 1 + idx.shape[1]
    panels = np.concatenate([query_images[:, None], bank_images.reshape(*idx.shape, *bank_images.shape[1:])], axis=1)
    captions = [caption for row in sims for caption in ["query", *(f"{s:.2f}" for s in row)]]
    image_grid(panels.reshape(-1, *panels.shape[2:]), captions, path, columns=columns)


def write_ssl_report(
    run_dir: Path,
    title: str,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    probe_table: list[dict[str, Any]],
    pictures: dict[str, str],
) -> Path:
    """``report.html`` of an SSL run: probe table, embedding map and neighbours (files named in ``pictures``), curves."""
    sections = []
    if probe_table:
        note = (
            "Test accuracy of classifiers on the frozen encoder features (the pre-projection output; the projection "
            "head is discarded, as in SimCLR and VICReg). Linear p%: a logistic regression trained on a seeded, "
            "class-stratified p% of the labelled training images. kNN: a similarity-weighted vote of the nearest "
            "labelled training images (cosine similarity, weights exp(similarity / T))."
        )
        sections.append(("Linear and kNN probes", f"<p>{html.escape(note)}</p>" + table(probe_table)))
    if "embedding" in pictures:
        note = "t-SNE of the frozen features of a class-stratified sample of test images, coloured by class (grey: no label)."
        sections.append(
            (
                "Embedding map",
                f"<p>{html.escape(note)}</p><img src='{html.escape(pictures['embedding'])}' alt='embedding map'>",
            )
        )
    if "neighbours" in pictures:
        note = "Each row: a query image, then its nearest training images by cosine similarity of the frozen features (shown above each)."
        sections.append(
            (
                "Nearest neighbours",
                f"<p>{html.escape(note)}</p><img src='{html.escape(pictures['neighbours'])}' alt='nearest neighbours'>",
            )
        )
    return write_report(run_dir, title, metrics, history, sections)
