"""Over-clustering, then merging: SCAN trains ``scan.overcluster`` times the K clusters asked
for, and the clusters are then joined down to K on the mined kNN graph.

Why: the entropy term's uniform prior makes every cluster about N/K images, so a class larger
than that is split and small classes are lumped together; and with few clusters SCAN's heads
often settle in a poor partition. With 3K clusters a large class becomes several clusters, a
small one can have its own, and the merge joins the clusters whose images are each other's
neighbours, whatever sizes that gives (README, "Clusters of different sizes"; measured in
benchmarks/RESULTS.md). The merge is greedy on Newman's modularity of the cluster graph (the
agglomeration of Clauset, Newman and Moore, 2004, started from the clusters instead of single
images): at each step the pair whose union raises the modularity most, or lowers it least,
except that no merged cluster is left nearly empty while a merge can fill it
(``greedy_merges``' floor). The merged model then gives each image the merged cluster of its
most probable trained cluster (``ClusterModel.merge_clusters``), the partition merged here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from scanclust.health import NEAR_EMPTY


def cluster_edges(labels: np.ndarray, neighbors: np.ndarray, count: int) -> np.ndarray:
    """``E[a, b]``: the kNN edges ``i -> neighbors[i, :]`` from cluster ``a`` to cluster ``b``."""
    edges = np.zeros((count, count))
    np.add.at(edges, (np.repeat(labels, neighbors.shape[1]), labels[neighbors].ravel()), 1.0)
    return edges


def greedy_merges(edges: np.ndarray, sizes: np.ndarray | None = None, floor: float = 0.0,
                  target: int = 1, resolution: float = 1.0
                  ) -> Iterator[tuple[float, list[list[int]]]]:
    """The modularity and the groups of clusters, from every cluster alone down to one group,
    merging at each step the pair that keeps the modularity highest
    (``Q = trace(E) / m - resolution * sum_g out_g * in_g / m^2``; ties go to the lowest
    indices).

    ``resolution`` (Reichardt and Bornholdt's gamma) scales the null model's term, the expected
    edges of a group of that degree: Newman's modularity at 1. It is why modularity at a fixed
    count prefers groups of equal degree (joining two groups costs ``out_a * in_b + out_b *
    in_a``, largest for the largest), so below 1 two halves of a large class are joined before
    two small classes are.

    With ``sizes`` (images per cluster), a group under ``floor`` images is not left over at
    ``target`` groups if merging can help it: once the merges left before ``target`` are no
    more than the groups under the floor, each merge must take one of them (the best such
    pair). Why: a cluster of a few images has few kNN edges, so merging it changes the
    modularity little either way, and the agglomeration leaves it apart to the end, as a
    nearly empty merged cluster (measured in benchmarks/RESULTS.md)."""
    edges = np.array(edges, dtype=np.float64)
    groups = [[c] for c in range(len(edges))]
    sizes = None if sizes is None else np.array(sizes, dtype=np.float64)
    m = edges.sum()
    while True:
        out_degree, in_degree = edges.sum(1), edges.sum(0)
        yield (float(np.trace(edges) / m - resolution * (out_degree * in_degree).sum() / m ** 2),
               [list(g) for g in groups])
        if len(edges) == 1:
            return
        gain = (edges + edges.T) / m - resolution * (np.outer(out_degree, in_degree)
                                                     + np.outer(in_degree, out_degree)) / m ** 2
        np.fill_diagonal(gain, -np.inf)
        if sizes is not None:
            small = sizes < floor
            if small.any() and len(edges) - target <= small.sum():
                gain = np.where(small[:, None] | small[None, :], gain, -np.inf)
        a, b = sorted(np.unravel_index(int(np.argmax(gain)), gain.shape))
        if sizes is not None:
            sizes[a] += sizes[b]
            sizes = np.delete(sizes, b)
        edges[a] += edges[b]
        edges[:, a] += edges[:, b]
        edges = np.delete(np.delete(edges, b, 0), b, 1)
        groups[a] += groups.pop(b)


def merge_map(probs: np.ndarray, neighbors: np.ndarray, k: int,
              resolution: float = 1.0) -> np.ndarray:
    """Which of ``k`` merged clusters each of the ``probs.shape[1]`` trained clusters joins.

    ``probs``: the trained head's probabilities ``[N, C]`` of the images whose kNN rows are
    ``neighbors`` ``[N, n]``. The clusters that hold images (their argmax) are merged greedily
    on modularity until ``k`` are left; a cluster no image is assigned to goes where its
    probability mass lies (so that a new image landing in it still gets a merged cluster). If
    fewer than ``k`` clusters hold images, they all stay apart and the others fill the rest.
    No merged cluster is left under ``health.NEAR_EMPTY`` of an even share of the images
    while merging can fill it (``greedy_merges``' floor): the size below which the run would
    warn that the clustering collapsed. ``resolution``: the modularity's (``greedy_merges``).
    """
    count = probs.shape[1]
    labels = probs.argmax(1)
    used = np.flatnonzero(np.bincount(labels, minlength=count))
    mapping = np.full(count, -1, dtype=np.int64)
    if len(used) <= k:
        mapping[used] = np.arange(len(used))
        rest = np.setdiff1d(np.arange(count), used)
        mapping[rest[:k - len(used)]] = np.arange(len(used), k)
    else:
        index = np.full(count, -1, dtype=np.int64)
        index[used] = np.arange(len(used))
        sizes = np.bincount(index[labels], minlength=len(used))
        steps = greedy_merges(cluster_edges(index[labels], neighbors, len(used)), sizes,
                              NEAR_EMPTY * len(labels) / k, k, resolution)
        groups = next(g for _, g in steps if len(g) == k)
        for g, members in enumerate(groups):
            mapping[used[members]] = g
    empty = np.flatnonzero(mapping < 0)
    if len(empty):
        merged = mapping[labels]
        mass = np.stack([probs[merged == g][:, empty].sum(0) for g in range(k)])
        mapping[empty] = mass.argmax(0)
    return mapping
