"""Choosing K without labels: modularity by hand, and K found on separated groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scanclust.choose_k import knn_graph, modularity, plot_curve, score_partitions


def test_modularity_by_hand() -> None:
    # two clusters of two, every edge inside its cluster: 1 - 2 * (1/2)^2 = 0.5
    neighbors = np.array([[1], [0], [3], [2]])
    assert modularity(np.array([0, 0, 1, 1]), neighbors) == pytest.approx(0.5)
    # one cluster: every edge inside, all expected inside: 0
    assert modularity(np.zeros(4, dtype=int), neighbors) == pytest.approx(0.0)
    # the clusters cut every edge: 0 - 0.5
    assert modularity(np.array([0, 1, 0, 1]), neighbors) == pytest.approx(-0.5)


def test_knn_graph_excludes_self() -> None:
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert knn_graph(feats, 1)[:, 0].tolist() == [1, 0, 3, 2]


@pytest.mark.parametrize("criterion", ["modularity", "silhouette"])
@pytest.mark.parametrize("groups", [3, 6])
def test_finds_the_number_of_separated_groups(criterion: str, groups: int,
                                              tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(groups, 16)) * 4
    feats = np.concatenate([c + rng.normal(size=(60, 16)) for c in centres])
    choice = score_partitions(feats, list(range(2, 11)), criterion, seed=0)
    assert choice.k == groups and choice.ks == list(range(2, 11)) and len(choice.scores) == 9
    plot_curve(choice, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_bounds_the_cost() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 8))
    choice = score_partitions(feats, [2, 3, 600], sample=100)
    assert choice.sample == 100 and choice.ks == [2, 3]  # K >= the sample size is dropped
    with pytest.raises(ValueError, match="criterion"):
        score_partitions(feats, [2], criterion="elbow")
