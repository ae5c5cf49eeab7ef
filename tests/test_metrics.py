"""Clustering metrics on examples small enough to check by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (adjusted_mutual_info_score, adjusted_rand_score,
                             normalized_mutual_info_score)

from scanclust.metrics import (accuracy, cluster_metrics, contingency, hungarian_mapping,
                               majority_mapping, mean_std, top5_accuracy)


@pytest.mark.parametrize("perm", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 2, 3, 0], [0, 2, 1, 3],
                                  [2, 0, 3, 1]])
def test_permuted_labels_score_one(perm: list[int]) -> None:
    target = np.repeat(np.arange(4), 3)
    pred = np.array(perm)[target]
    result = cluster_metrics(pred, target, 4, 4)
    assert result["acc"] == 1.0
    assert result["nmi"] == pytest.approx(1.0)
    assert result["ari"] == pytest.approx(1.0)
    assert result["ami"] == pytest.approx(1.0)
    # the mapping undoes the permutation
    assert result["mapping"] == np.argsort(perm).tolist()


def test_contingency_counts() -> None:
    table = contingency(np.array([0, 0, 1, 2]), np.array([1, 1, 0, 1]), 3, 2)
    assert table.dtype == np.int64
    assert table.tolist() == [[0, 2], [1, 0], [0, 1]]


def test_hungarian_hand_example() -> None:
    # cluster 2 holds two of class 0; cluster 0 one each of classes 0, 1; cluster 1 one each of
    # classes 1, 2. The best one-to-one matching is 2->0, 0->1, 1->2 with 2 + 1 + 1 = 4 hits.
    target = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([2, 2, 0, 0, 1, 1])
    mapping = hungarian_mapping(pred, target, 3, 3)
    assert mapping.tolist() == [1, 2, 0]
    assert accuracy(pred, target, mapping) == pytest.approx(4 / 6)
    assert cluster_metrics(pred, target, 3, 3)["acc"] == pytest.approx(4 / 6)


def test_hungarian_beats_greedy() -> None:
    # Greedy would give cluster 0 its biggest class (0, 3 hits) and leave cluster 1 with class 1
    # (0 hits): 3. Hungarian maps 0->1 and 1->0 for 2 + 2 = 4 of 7.
    pred = np.array([0, 0, 0, 0, 0, 1, 1])
    target = np.array([0, 0, 0, 1, 1, 0, 0])
    assert hungarian_mapping(pred, target, 2, 2).tolist() == [1, 0]
    assert cluster_metrics(pred, target, 2, 2)["acc"] == pytest.approx(4 / 7)


def test_fewer_clusters_than_classes() -> None:
    # class 2 has no cluster left, so its one sample is wrong: 4 of 5
    pred = np.array([0, 0, 1, 1, 1])
    target = np.array([0, 0, 1, 1, 2])
    result = cluster_metrics(pred, target, 2, 3)
    assert result["matching"] == "hungarian"
    assert result["mapping"] == [0, 1]
    assert result["acc"] == pytest.approx(0.8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_clusters", [10, 15])
def test_nmi_ari_ami_match_sklearn(seed: int, num_clusters: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 10, size=300)
    pred = np.where(rng.random(300) < 0.6, target, rng.integers(0, num_clusters, size=300))
    result = cluster_metrics(pred, target, num_clusters, 10)
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(target, pred))
    assert result["ari"] == pytest.approx(adjusted_rand_score(target, pred))
    assert result["ami"] == pytest.approx(adjusted_mutual_info_score(target, pred))


def test_overclustering_majority_hand_example() -> None:
    # contingency rows (cluster) x cols (class): c0 [2, 1], c1 [2, 0], c2 [0, 3], c3 [0, 2]
    # majority: 0, 0, 1, 1 -> 2 + 2 + 3 + 2 = 9 of 10 right.
    # one-to-one: one cluster per class, at best 2 + 3 = 5 of 10.
    pred = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    target = np.array([0, 0, 1, 0, 0, 1, 1, 1, 1, 1])
    assert majority_mapping(pred, target, 4, 2).tolist() == [0, 0, 1, 1]
    result = cluster_metrics(pred, target, 4, 2)
    assert result["matching"] == "majority"
    assert result["mapping"] == [0, 0, 1, 1]
    assert result["acc"] == pytest.approx(0.9)
    assert result["acc_hungarian"] == pytest.approx(0.5)
    assert result["acc_hungarian"] <= result["acc"]
    assert result["cluster_sizes"] == [3, 2, 3, 2]
    assert result["num_samples"] == 10


def test_majority_empty_cluster_maps_to_minus_one() -> None:
    pred = np.array([0, 1, 1, 3])
    target = np.array([1, 0, 0, 1])
    assert majority_mapping(pred, target, 4, 2).tolist() == [1, 0, -1, 1]
    assert hungarian_mapping(pred, target, 4, 2).tolist().count(-1) == 2


def test_top5_hand_example() -> None:
    falling = [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]  # top 5 clusters: 0..4
    rising = falling[::-1]  # top 5 clusters: 1..5
    probs = np.array([falling, rising, falling])
    target = np.array([4, 0, 5])
    identity = np.arange(6)
    # sample 0: class 4 in {0..4} hit; sample 1: class 0 not in {1..5}; sample 2: 5 not in {0..4}
    assert top5_accuracy(probs, target, identity) == pytest.approx(1 / 3)
    # reversed mapping sends clusters 0..4 to classes 5..1 and clusters 1..5 to classes 4..0
    reverse = identity[::-1].copy()
    assert top5_accuracy(probs, target, reverse) == pytest.approx(1.0)


def test_top5_needs_five_clusters() -> None:
    with pytest.raises(ValueError, match="C >= 5"):
        top5_accuracy(np.full((2, 4), 0.25), np.array([0, 1]), np.arange(4))


def test_cluster_metrics_top5_and_json() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=50)
    target = rng.integers(0, 6, size=50)
    result = cluster_metrics(probs.argmax(1), target, 6, 6, probs=probs)
    assert 0.0 <= result["acc"] <= result["top5"] <= 1.0
    json.dumps(result)
    small = np.full((4, 3), 1 / 3)
    assert "top5" not in cluster_metrics(np.array([0, 1, 2, 0]), np.array([0, 1, 2, 0]), 3, 3,
                                         probs=small)


@pytest.mark.parametrize(("pred", "target", "message"), [
    ([0, 1, 1], [0, 1], "differ in length"),
    ([0, 1, 1], [0, -1, 1], "target contains -1"),
    ([0, 1, 3], [0, 1, 1], r"pred ids must lie in \[0, 3\)"),
    ([0.0, 1.0, 1.0], [0, 1, 1], "integer ids"),
    ([[0, 1, 1]], [0, 1, 1], "1-D"),
])
def test_input_validation(pred: list, target: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_metrics(np.array(pred), np.array(target), 3, 2)


def test_mean_std_two_runs() -> None:
    runs = [{"acc": 0.8, "nmi": 0.5, "num_samples": 10, "matching": "hungarian",
             "mapping": [0, 1]},
            {"acc": 0.6, "nmi": 0.7, "num_samples": 10, "matching": "hungarian",
             "mapping": [1, 0]}]
    summary = mean_std(runs)
    assert set(summary) == {"acc", "nmi", "num_samples"}
    assert summary["acc"]["mean"] == pytest.approx(0.7)
    assert summary["acc"]["std"] == pytest.approx(0.1)
    assert summary["acc"]["n"] == 2
    assert summary["num_samples"] == {"mean": 10.0, "std": 0.0, "n": 2}


def test_mean_std_nested() -> None:
    runs = [{"scan": {"acc": 0.8}, "kmeans": {"acc": 0.4}},
            {"scan": {"acc": 0.6}, "kmeans": {"acc": 0.2}},
            {"scan": {"acc": 0.7}}]
    summary = mean_std(runs)
    assert summary["scan"]["acc"]["mean"] == pytest.approx(0.7)
    assert summary["scan"]["acc"]["std"] == pytest.approx(np.sqrt(0.02 / 3))
    assert summary["kmeans"]["acc"] == pytest.approx({"mean": 0.3, "std": 0.1, "n": 2})
