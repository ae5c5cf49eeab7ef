"""Figure helpers: prototype and low-confidence picks by hand, plots as real PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from scanclust.figures import (cluster_prototypes, low_confidence_indices, plot_confusion,
                               plot_image_grid)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Cluster 0: samples 0, 1, 2 on the x-axis; cluster 1: samples 3, 4, 5 around (10, 11);
# cluster 2 is predicted for nobody.
PROBS = np.array([[0.90, 0.05, 0.05],
                  [0.60, 0.30, 0.10],
                  [0.80, 0.10, 0.10],
                  [0.05, 0.90, 0.05],
                  [0.20, 0.70, 0.10],
                  [0.30, 0.55, 0.15]])
EMBEDDINGS = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0],
                       [10.0, 10.0], [10.0, 12.0], [10.0, 11.2]])


@pytest.mark.parametrize(("top", "expected"), [
    (1, {0: 0, 1: 3}),   # the single most confident member is its own mean
    (2, {0: 1, 1: 5}),   # means (1, 0) and (10, 11): nearest are samples 1 and 5
    (10, {0: 1, 1: 5}),  # fewer members than top: all of them, means (1, 0) and (10, 11.07)
])
def test_cluster_prototypes(top: int, expected: dict[int, int]) -> None:
    found = cluster_prototypes(PROBS, EMBEDDINGS, top=top)
    assert {c: members[0] for c, members in found.items()} == expected


def test_low_confidence_indices_lowest_first() -> None:
    # max probabilities: 0.9, 0.6, 0.8, 0.9, 0.7, 0.55
    assert low_confidence_indices(PROBS, 3).tolist() == [5, 1, 4]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 100
    assert data[:8] == PNG_MAGIC


@pytest.mark.parametrize("size", [3, 25])
def test_plot_confusion_writes_png(tmp_path: Path, size: int) -> None:
    matrix = np.random.default_rng(0).integers(0, 20, size=(size, size))
    matrix[0] = 0  # an empty class row must not divide by zero
    path = tmp_path / "figs" / "confusion.png"
    plot_confusion(matrix, path, class_names=[f"class{i}" for i in range(size)], title="test")
    _assert_png(path)


@pytest.mark.parametrize(("n", "side"), [(0, 8), (3, 8), (12, 32)])
def test_plot_image_grid_writes_png(tmp_path: Path, n: int, side: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    path = tmp_path / "grid" / f"grid{n}.png"
    plot_image_grid(images, [f"#{i}" for i in range(n)], path, title="grid", ncols=5)
    _assert_png(path)


def test_plot_image_grid_caption_count_must_match(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="captions"):
        plot_image_grid(np.zeros((2, 8, 8, 3), np.uint8), ["a"], tmp_path / "x.png")


def test_plots_leave_no_open_figures(tmp_path: Path) -> None:
    plot_confusion(np.eye(2, dtype=int), tmp_path / "c.png")
    plot_image_grid(np.zeros((1, 8, 8, 3), np.uint8), ["a"], tmp_path / "g.png")
    assert plt.get_fignums() == []
