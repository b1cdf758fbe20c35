"""The run report: ``report.html`` with training curves and task-supplied figures and tables.

Pictures are PNG files beside the HTML so the report opens anywhere without a server.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from deepscope.atomic import atomic_write, write_text


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend, imported when a report draws its first figure: matplotlib
    costs a few tenths of a second to import, which no command should pay before its work starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Write a figure as a PNG atomically (a kill never leaves half a picture) and close it."""
    try:
        atomic_write(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=dpi), "picture")
    finally:
        pyplot().close(fig)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (train and validation) and every other validation metric against epochs."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    metric_keys = [k for k in history[-1] if k.startswith("val_") and k != "val_loss"] if history else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if history and "val_loss" in history[-1]:
        axes[0].plot(epochs, [h.get("val_loss", np.nan) for h in history], "o-", label="validation")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0].legend()
    for key in metric_keys:
        axes[1].plot(epochs, [h.get(key, np.nan) for h in history], "o-", label=key[4:])
    axes[1].set(xlabel="epoch", title="validation metrics")
    if metric_keys:
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def display_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalized image as (H, W, 3) in [0, 1]: the first three channels, or the first one as grey."""
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    return np.clip(np.moveaxis(rgb, 0, -1), 0, 1)


def image_grid(images: np.ndarray | Sequence[np.ndarray], captions: list[str], path: Path, columns: int = 8) -> None:
    """Save (N, H, W, C) images in [0, 1] as a captioned grid."""
    plt = pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(
            image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_lines(x: list[float], series: dict[str, list[float]], path: Path, xlabel: str, ylabel: str) -> None:
    """One line per named series against ``x`` (e.g. instance scores against the IoU threshold)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, values in series.items():
        ax.plot(x, values, "o-", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """Confusion matrix as a picture, with counts written in the cells for up to 20 classes."""
    plt = pyplot()
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(names, rotation=90, fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    if len(names) <= 20:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(
                j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > matrix.max() / 2 else "black"
            )
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def table(rows: list[dict[str, Any]]) -> str:
    """An HTML table from a list of dicts sharing keys; floats shown with 4 digits."""
    if not rows:
        return "<p>(none)</p>"
    keys = list(rows[0])

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    run_dir: Path, title: str, metrics: dict[str, Any], history: list[dict[str, Any]], sections: list[tuple[str, str]]
) -> Path:
    """Write ``report.html``: a summary, the curves, then each (heading, HTML) section."""
    if history:
        plot_curves(history, run_dir / "curves.png")
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Summary</h2>",
        table([{"metric": k, "value": v} for k, v in summary.items()]),
    ]
    plan = metrics.get("plan") or {}
    if plan.get("reasons"):
        items = "".join(f"<li>{html.escape(line)}</li>" for line in plan["reasons"])
        parts += ["<h2>Plan: what was measured and chosen</h2>", f"<ul>{items}</ul>"]
    if history:
        parts += ["<h2>Training curves</h2>", '<img src="curves.png" alt="training curves">']
    for heading, body in sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", body]
    parts += [
        "<h2>History</h2>",
        table(history),
        "<h2>Metrics (JSON)</h2>",
        f"<pre>{html.escape(json.dumps(summary, indent=1))}</pre>",
    ]
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path = run_dir / "report.html"
    write_text(path, page, "report")
    return path
