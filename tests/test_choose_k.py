"""Choosing K without labels: each criterion's pieces by hand, K found on separated groups by
every criterion, and the one-line errors of ``scanclust cluster --clusters auto``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scanclust.choose_k import (CRITERIA, DEFAULT_CRITERION, Sample, gap_choice, knn_graph,
                                laplacian_spectrum, louvain_labels, merge_agreements,
                                merged_modularities, modularity, plot_curve, scan_labels,
                                score_partitions, spectral_labels)
from scanclust.cli import build_parser, main

# three blocks of four nodes, each node's neighbours the other three of its block
CLIQUES = np.array([[j for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i]
                    for i in range(12)])


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


def test_three_blocks_have_three_zero_eigenvalues_and_the_gap_at_three() -> None:
    # the normalised Laplacian of a complete graph on m nodes has eigenvalues 0 and m/(m-1)
    values, vectors = laplacian_spectrum(CLIQUES, 5)
    assert values == pytest.approx([0, 0, 0, 4 / 3, 4 / 3], abs=1e-9)
    assert int(np.argmax(np.diff(values))) + 1 == 3  # the largest gap follows the 3rd value
    labels = spectral_labels(vectors, 3)
    assert [len(set(labels[i:i + 4])) for i in (0, 4, 8)] == [1, 1, 1]
    assert len(set(labels)) == 3
    assert modularity(labels, CLIQUES) == pytest.approx(1 - 3 * (1 / 3) ** 2)


def test_merge_agreements_by_hand() -> None:
    # A = {0, 1}, B = {2, 3}, C = {4, 5}; two neighbours each. Half of A's edges end in B and
    # half of B's in A (0.5); a quarter of C's end in B, none of B's in C (0.25); A and C
    # share none. A and B merge first at 0.5, then C joins them at 0.25.
    neighbors = np.array([[1, 2], [0, 2], [3, 0], [2, 1], [5, 3], [4, 4]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert merge_agreements(labels, neighbors) == {3: 0.5, 2: 0.25}


def test_louvain_finds_the_blocks_and_merging_them_lowers_modularity() -> None:
    labels = louvain_labels(CLIQUES, seed=0)
    assert [len(set(labels[i:i + 4])) for i in (0, 4, 8)] == [1, 1, 1] and len(set(labels)) == 3
    # three blocks of 12 edges each: 1 - 3 (1/3)^2 = 2/3; two of them merged: 1 - (2/3)^2 -
    # (1/3)^2 = 4/9; all in one: 0. Each value equals modularity() of the same partition.
    found = merged_modularities(labels, CLIQUES)
    assert found == pytest.approx({3: 2 / 3, 2: 4 / 9, 1: 0.0})
    assert modularity(np.repeat([0, 0, 1], 4), CLIQUES) == pytest.approx(4 / 9)


@pytest.mark.parametrize(("q3", "gap3", "band", "chosen"), [
    (0.700, 0.30, 0.02, 3),  # 0.700 >= 0.98 * 0.710 = 0.6958, and the larger gap: one fewer
    (0.690, 0.30, 0.02, 4),  # 0.690 < 0.6958: modularity decides
    (0.700, 0.10, 0.02, 4),  # within the band, but the smaller gap (0.10 < 0.20)
    (0.700, 0.30, 0.0, 4),   # louvain_alone
])
def test_louvain_steps_back_one_cluster_only_for_a_near_tie_and_a_larger_gap(
        monkeypatch: pytest.MonkeyPatch, q3: float, gap3: float, band: float,
        chosen: int) -> None:
    """The curves are set by hand: modularity 0.5 / q3 / 0.710 / 0.6 at K = 2..5 (best at 4),
    eigengaps 0.05 / gap3 / 0.20 / 0.01."""
    from scanclust import choose_k

    ks = [2, 3, 4, 5]
    monkeypatch.setattr(choose_k, "louvain_labels", lambda graph, seed: np.zeros(len(graph), int))
    monkeypatch.setattr(choose_k, "merged_modularities", lambda labels, graph: {})
    monkeypatch.setattr(choose_k, "by_spectral", lambda data, ks: ([0.5, q3, 0.710, 0.6], 4, ""))
    monkeypatch.setattr(choose_k, "by_eigengap", lambda data, ks: ([0.05, gap3, 0.20, 0.01], 3, ""))
    data = Sample(np.eye(6, dtype=np.float32), 5)
    scores, k, rule = choose_k.by_louvain(data, ks, band=band)
    assert k == chosen and scores == [0.5, q3, 0.710, 0.6]
    assert ("eigengap" in rule) == (band > 0)


def test_gap_rule_by_hand() -> None:
    # K = 2: 1.0 < 2.0 - 0.1; K = 3: 2.0 >= 2.1 - 0.2, so 3
    assert gap_choice(np.array([1.0, 2.0, 2.1, 2.0]), np.array([0.1, 0.1, 0.2, 0.1]),
                      [2, 3, 4]) == 3
    assert gap_choice(np.array([1.0, 2.0, 3.0]), np.zeros(3), [2, 3]) == 3  # none: the last


def test_scan_heads_keep_far_groups_apart_and_restore_threads() -> None:
    rng = np.random.default_rng(0)
    feats = np.concatenate([c + 0.1 * rng.normal(size=(50, 8)) for c in np.eye(8)[:2] * 4])
    threads = torch.get_num_threads()
    labels = scan_labels(Sample(feats, 2), 2)
    assert torch.get_num_threads() == threads
    assert len(set(labels[:50])) == len(set(labels[50:])) == 1 and labels[0] != labels[50]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("groups", [3, 4])
def test_every_criterion_finds_the_number_of_far_groups(criterion: str, groups: int,
                                                         tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(groups, 16)) * 4
    feats = np.concatenate([c + rng.normal(size=(60, 16)) for c in centres])
    choice = score_partitions(feats, list(range(2, 11)), criterion, seed=0)
    assert choice.k == groups and choice.ks == list(range(2, 11)) and len(choice.scores) == 9
    plot_curve(choice, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert choice.to_dict()["rule"] == choice.rule  # choose_k.json says how K was read


def test_sample_bounds_the_cost() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 8))
    choice = score_partitions(feats, [2, 3, 600], sample=100)
    assert choice.sample == 100 and choice.ks == [2, 3]  # K >= the sample size is dropped
    assert choice.criterion == DEFAULT_CRITERION == "louvain"
    with pytest.raises(ValueError, match="criterion"):
        score_partitions(feats, [2], criterion="elbow")


def test_the_command_line_default_is_the_module_default() -> None:
    args = build_parser().parse_args(["cluster", "folder"])
    assert args.criterion == DEFAULT_CRITERION


@pytest.mark.parametrize(("extra", "message"), [
    (["--criterion", "elbow"], "--criterion 'elbow' is not one of louvain, louvain_alone, spectral, "
                               "eigengap, scan_merge, stability, gap, modularity, silhouette"),
    (["--k-range", "1:5"], "--k-range '1:5': expected LO:HI with 2 <= LO <= HI, e.g. 2:20"),
    (["--k-range", "2:12"], "--k-range 2:12: K = 12 needs more than 12 images to compare "
                            "partitions, but the folder has 6; use at most 2:5"),
])
def test_bad_choices_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         extra: list[str], message: str) -> None:
    folder, out = tmp_path / "six", tmp_path / "run"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    assert main(["cluster", str(folder), "--out", str(out), "--preset", "quick", "-q",
                 *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"scanclust: error: {message}"
    assert not out.exists()


def test_class_splits_names_the_class_the_communities_divide() -> None:
    """The benchmark's reading of communities with the labels: class "a" (6 images) is the
    majority of communities 0 (3 of 3) and 1 (2 of 2), class "b" of community 2 (4 of 5), so
    "a" is split, nothing is unmatched, and the purity is (3 + 2 + 4) / 10."""
    from benchmarks.choose_k import class_splits

    communities = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    found = class_splits(communities, labels, ["a", "b"])
    assert found == {"communities": 3, "purity": 0.9, "unmatched_classes": [],
                     "split_classes": {"a": [{"images": 3, "purity": 1.0},
                                             {"images": 2, "purity": 1.0}]}}
    # with the second community below 15 % of the class, nothing is split
    many = np.concatenate([communities, np.zeros(20, dtype=int)])
    assert class_splits(many, np.concatenate([labels, np.zeros(20, dtype=int)]),
                        ["a", "b"])["split_classes"] == {}
