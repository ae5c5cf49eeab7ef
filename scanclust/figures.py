"""Figures for a trained model: confusion matrix, cluster prototypes, low-confidence samples.

Figures are built on ``matplotlib.figure.Figure`` directly rather than through pyplot, so no
global backend or figure registry is touched: the functions work headless, in threads and in
tests, and nothing stays open after they return.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from scanclust.files import atomic_write

DPI = 120
ANNOTATE_MAX = 20  # beyond this many rows or columns the count labels overlap
TICK_LABELS_MAX = 50


def cluster_prototypes(probs: np.ndarray, embeddings: np.ndarray, count: int = 1,
                       top: int = 10) -> dict[int, list[int]]:
    """Per non-empty cluster, the ``count`` members closest to the mean embedding of its
    ``top`` most confident members, closest first (the paper's prototypes, Fig. 9): real
    images that stand for the cluster's core, not its fringe."""
    probs, embeddings = np.asarray(probs), np.asarray(embeddings)
    if len(probs) != len(embeddings):
        raise ValueError(f"probs and embeddings differ in length: "
                         f"{len(probs)} vs {len(embeddings)}")
    pred = probs.argmax(1)
    result: dict[int, list[int]] = {}
    for cluster in np.unique(pred):
        members = np.flatnonzero(pred == cluster)
        confident = members[np.argsort(-probs[members, cluster], kind="stable")[:top]]
        centre = embeddings[confident].mean(axis=0)
        distances = np.linalg.norm(embeddings[members] - centre, axis=1)
        result[int(cluster)] = members[np.argsort(distances, kind="stable")[:count]].tolist()
    return result


def low_confidence_indices(probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n samples with the lowest max probability, lowest first: where SCAN is unsure."""
    return np.argsort(np.asarray(probs).max(axis=1), kind="stable")[:n]


def plot_confusion(matrix: np.ndarray, path: Path, class_names: list[str] | None = None,
                   title: str = "") -> None:
    """Save a confusion matrix (rows true class, columns predicted class) as PNG.

    Colours are row-normalised so that small classes are as readable as large ones; the raw
    counts are written in the cells when the matrix is small enough for them to fit.
    """
    matrix = np.asarray(matrix)
    rows, cols = matrix.shape
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    side = min(max(4.0, 0.45 * max(rows, cols) + 2.0), 20.0)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if max(rows, cols) <= ANNOTATE_MAX:
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    if class_names is not None and max(rows, cols) <= TICK_LABELS_MAX:
        if len(class_names) == rows:
            ax.set_yticks(range(rows), labels=class_names, fontsize=7)
        if len(class_names) == cols:
            ax.set_xticks(range(cols), labels=class_names, fontsize=7, rotation=90)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    _save(fig, path)


def plot_image_grid(images: np.ndarray, captions: list[str], path: Path, title: str = "",
                    ncols: int = 10) -> None:
    """Save images [N, H, W, 3] uint8 in a captioned grid as PNG; N = 0 gives a 'no images' note."""
    images = np.asarray(images)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        fig = Figure(figsize=(4, 1.5))
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
    else:
        ncols = min(ncols, len(images))
        nrows = math.ceil(len(images) / ncols)
        fig = Figure(figsize=(1.3 * ncols, 1.5 * nrows + (0.4 if title else 0.0)))
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes:
            ax.axis("off")
        for ax, image, caption in zip(axes, images, captions):
            # nearest keeps 8x8 digits blocky instead of a smoothed blur
            ax.imshow(image, interpolation="nearest")
            ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    with atomic_write(Path(path)) as handle:
        fig.savefig(handle, dpi=DPI, format="png", bbox_inches="tight")
