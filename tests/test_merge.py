"""Over-clustering's merge: the cluster graph, the greedy modularity merges, and the merged
model's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanclust.choose_k import modularity
from scanclust.merge import cluster_edges, greedy_merges, merge_map
from scanclust.models import ClusterModel, TinyResNet


def two_groups_of_two() -> tuple[np.ndarray, np.ndarray]:
    """8 images in 4 clusters of 2; each image's 2 neighbours are its cluster mate and one
    image of the partner cluster (0 with 1, 2 with 3): the graph has 2 groups, each split."""
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    neighbors = np.array([[1, 2], [0, 3], [3, 0], [2, 1], [5, 6], [4, 7], [7, 4], [6, 5]])
    return labels, neighbors


def test_cluster_edges_count_the_knn_edges_between_clusters() -> None:
    labels, neighbors = two_groups_of_two()
    edges = cluster_edges(labels, neighbors, 4)
    # cluster 0 = images 0, 1: two edges inside (0->1, 1->0), two to cluster 1 (0->2, 1->3)
    assert edges[0].tolist() == [2, 2, 0, 0] and edges[3].tolist() == [0, 0, 2, 2]
    assert edges.sum() == 16


def test_greedy_merges_join_the_split_groups_and_score_as_modularity() -> None:
    labels, neighbors = two_groups_of_two()
    steps = list(greedy_merges(cluster_edges(labels, neighbors, 4)))
    assert [len(groups) for _, groups in steps] == [4, 3, 2, 1]
    # by hand: 4 clusters, 1/4 of the edges inside each and 1/4 of the degree: 4 (2/16 - 1/16)
    assert steps[0][0] == pytest.approx(0.25)
    assert steps[0][0] == pytest.approx(modularity(labels, neighbors))
    # two groups: every edge inside, half the degree each: 1 - 2 / 4
    assert steps[2][0] == pytest.approx(0.5)
    assert sorted(sorted(g) for g in steps[2][1]) == [[0, 1], [2, 3]]
    assert steps[3][0] == pytest.approx(0.0)


def test_resolution_below_one_joins_the_halves_of_a_large_class() -> None:
    # halves A, B of a large class (100 edges out each, 30 to the other half) and a small
    # class C (20 edges out, 10 to each half); m = 220 edges
    edges = np.array([[60, 30, 10], [30, 60, 10], [10, 10, 0]])
    # gain of a merge: 2 e_ab / m - resolution * 2 out_a out_b / m^2, so
    # A+B: 60/220 - r * 20000/48400, A+C: 20/220 - r * 4000/48400, equal at r = 0.55
    def merged(resolution: float) -> list[list[int]]:
        return next(g for _, g in greedy_merges(edges, resolution=resolution) if len(g) == 2)
    assert merged(1.0) == [[0, 2], [1]]  # Newman's modularity lumps the small class in
    assert merged(0.6) == [[0, 2], [1]]
    assert merged(0.5) == [[0, 1], [2]]  # the large class whole, the small one apart
    # the score is the modularity at that resolution: 3 groups, trace 120 of 220
    first = next(iter(greedy_merges(edges, resolution=0.5)))[0]
    assert first == pytest.approx(120 / 220 - 0.5 * (100**2 + 100**2 + 20**2) / 220**2)
    # the same graph from images: 10 in A, 10 in B, 2 in C, 10 neighbours each
    a, b, c = np.arange(10), np.arange(10, 20), np.array([20, 21])
    neighbors = np.array([np.r_[np.roll(own, -i - 1)[:6], other[:3], c[:1]]
                          for own, other in ((a, b), (b, a)) for i in range(10)]
                         + [np.r_[a[:5], b[:5]]] * 2)
    probs = np.eye(3)[np.repeat([0, 1, 2], [10, 10, 2])]
    assert cluster_edges(probs.argmax(1), neighbors, 3).tolist() == edges.tolist()
    assert merge_map(probs, neighbors, 2).tolist() == [0, 1, 0]
    assert merge_map(probs, neighbors, 2, resolution=0.5).tolist() == [0, 0, 1]


def groups_and_a_stray() -> tuple[np.ndarray, np.ndarray]:
    """102 images: groups A (clusters 0, 1) and B (2, 3) of 50, each image's 4 neighbours
    drawn from its own group, and cluster 4, two images whose neighbours are in A."""
    labels = np.repeat([0, 1, 2, 3, 4], [25, 25, 25, 25, 2])
    rng = np.random.default_rng(0)
    neighbors = np.concatenate([start + rng.integers(0, 50, (50, 4)) for start in (0, 50)]
                               + [np.array([[0, 1, 25, 26], [2, 3, 27, 28]])])
    return labels, neighbors


def test_no_merged_cluster_is_left_nearly_empty_while_merging_can_fill_it() -> None:
    labels, neighbors = groups_and_a_stray()
    edges = cluster_edges(labels, neighbors, 5)
    # plain agglomeration: A and B joined back, the stray's 2 images kept as the third cluster
    plain = next(g for _, g in greedy_merges(edges) if len(g) == 3)
    assert sorted(sorted(g) for g in plain) == [[0, 1], [2, 3], [4]]
    # with the floor (0.1 of an even share, 102 / 3 images: 3.4) the stray joins A, B stays split
    sizes = np.bincount(labels)
    floored = next(g for _, g in greedy_merges(edges, sizes, 3.4, 3) if len(g) == 3)
    assert sorted(sorted(g) for g in floored) == [[0, 1, 4], [2], [3]]
    mapping = merge_map(np.eye(5)[labels], neighbors, 3)
    assert sorted(np.bincount(mapping[labels]).tolist()) == [25, 25, 52]
    # the floor does not change the curve the K criteria read (no sizes given)
    assert [len(g) for _, g in greedy_merges(edges)] == [5, 4, 3, 2, 1]


def test_merge_map_sends_an_empty_cluster_where_its_mass_is() -> None:
    labels, neighbors = two_groups_of_two()
    probs = np.full((8, 5), 0.01)
    probs[np.arange(8), labels] = 0.9
    probs[4:, 4] = 0.05  # cluster 4 holds no image but leans towards images 4-7
    mapping = merge_map(probs, neighbors, 2)
    assert mapping[0] == mapping[1] != mapping[2] == mapping[3] == mapping[4]
    assert sorted(set(mapping.tolist())) == [0, 1]


def test_merge_map_keeps_too_few_used_clusters_apart() -> None:
    probs = np.eye(4)[[0, 0, 1, 1]] * 0.9 + 0.025  # clusters 2 and 3 hold no image
    mapping = merge_map(probs, np.array([[1], [0], [3], [2]]), 3)
    assert mapping[0] != mapping[1] and mapping[2] == 2 and sorted(set(mapping.tolist())) == [0, 1, 2]


def test_a_merged_cluster_has_the_largest_logit_of_its_members() -> None:
    torch.manual_seed(0)
    model = ClusterModel(TinyResNet(4), 6, 2)
    x = torch.randn(5, 3, 8, 8)
    model.eval()
    before = model(x)
    model.keep_head(1)
    model.merge_clusters([0, 1, 0, 2, 1, 0])
    assert model.num_clusters == 3 and model.outputs == 6
    after = model(x)
    assert after.shape == (1, 5, 3)
    expected = torch.stack([before[1][:, [0, 2, 5]].amax(1), before[1][:, [1, 4]].amax(1),
                            before[1][:, 3]], 1)
    assert torch.allclose(after[0], expected, atol=1e-6)
    # so each image lands in the merged cluster of its most probable trained cluster
    mapping = torch.tensor([0, 1, 0, 2, 1, 0])
    assert torch.equal(after[0].argmax(1), mapping[before[1].argmax(1)])
    # and the gradient reaches only each merged cluster's leading member
    model.zero_grad()
    model.heads.weight.requires_grad_(True)
    model(x)[0, :, 2].sum().backward()  # merged cluster 2 is trained cluster 3 alone
    assert model.heads.weight.grad[[3]].abs().sum() > 0
    assert model.heads.weight.grad[[0, 1, 2, 4, 5]].abs().sum() == 0
    assert model.merge_mapping() == [0, 1, 0, 2, 1, 0]
    assert "merge" in model.state_dict()


def test_an_unmerged_model_has_no_merge_in_its_weights() -> None:
    model = ClusterModel(TinyResNet(4), 3, 1)
    assert model.merge_mapping() is None and "merge" not in model.state_dict()
    with pytest.raises(ValueError, match="a merge of 3 clusters"):
        model.merge_clusters([0, 1])
    with pytest.raises(ValueError, match=r"every merged cluster 0..2 a member, got \[0, 2, 2\]"):
        model.merge_clusters([0, 2, 2])
