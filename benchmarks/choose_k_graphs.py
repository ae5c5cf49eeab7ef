"""Louvain's community count on other kNN graphs of the battery's features, and whether an
over-counted partition shows in the conductance of its closest pair of communities.

    python benchmarks/choose_k_graphs.py [--graphs k20 k40 k60 k80 snn40 mutual40 subsample40]
    python benchmarks/choose_k_graphs.py --graphs fixed8 fixed10 fixed12 --no-conductance

Runs on the digits features that ``benchmarks/choose_k.py`` cached in ``.cache/choose_k/``
(the 15 reported runs and the tuning seeds 5-6). Graphs: ``kN``, the symmetrised N-nearest-
neighbour graph the ``louvain`` criterion uses (N = 40 there); ``snnN``, its edges weighted
by the share of neighbours the two ends have in common; ``mutualN``, only the edges both ends
chose; ``subsampleN``, the most frequent count over 5 random 80 % subsamples; ``fixedR``, the
40-neighbour graph at a resolution that grows with the count (``resolution_count``). Then, on the
40-neighbour partition, the largest conductance between two communities (kNN edges between
them over the smaller one's degree): a split class would show as a pair bound much more
tightly than two different classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.choose_k import CACHE  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from scanclust.choose_k import knn_graph, knn_nx_graph, louvain_labels, normalize  # noqa: E402
from scanclust.merge import cluster_edges  # noqa: E402


def weighted_louvain_count(neighbors: np.ndarray, weights: np.ndarray, seed: int = 0) -> int:
    """Louvain communities (best modularity of 3 seeds) of the kNN graph with edge weights."""
    import networkx as nx

    graph = nx.Graph()
    graph.add_nodes_from(range(len(neighbors)))
    for i, row in enumerate(neighbors):
        for j, w in zip(row.tolist(), weights[i].tolist()):
            if w > 0 and w > graph.get_edge_data(i, j, {"weight": 0})["weight"]:
                graph.add_edge(i, j, weight=w)
    runs = [nx.community.louvain_communities(graph, weight="weight", seed=3 * seed + a)
            for a in range(3)]
    return len(max(runs, key=lambda c: nx.community.modularity(graph, c, weight="weight")))


def resolution_count(neighbors: np.ndarray, reference: int, steps: int = 10) -> int:
    """Louvain's count (median of 3 seeds) at the resolution K / ``reference``, K its count at
    the last resolution, from 1 until the count holds: the split of a class then pays the same
    whatever K is, where plain modularity (resolution 1) splits more readily with fewer
    classes (a split is worth the share 1 / (2 K^2) of the null term)."""
    import networkx as nx

    graph = knn_nx_graph(neighbors)

    def count(resolution: float) -> int:
        return int(np.median([len(nx.community.louvain_communities(
            graph, resolution=resolution, seed=s)) for s in range(3)]))

    found = count(1.0)
    for _ in range(steps):
        again = count(found / reference)
        if again == found:
            break
        found = again
    return found


def community_count(feats: np.ndarray, graph: str) -> int:
    kind, k = graph.rstrip("0123456789"), int(graph[len(graph.rstrip("0123456789")):])
    if kind == "fixed":  # fixedR: resolution_count with reference R on the 40-neighbour graph
        return resolution_count(knn_graph(feats, 40), k)
    neighbors = knn_graph(feats, k)
    if kind == "k":
        return int(louvain_labels(neighbors).max()) + 1
    if kind == "subsample":
        rng = np.random.default_rng(0)
        counts = [int(louvain_labels(knn_graph(feats[rng.choice(len(feats), int(0.8 * len(feats)),
                                                                 replace=False)], k), s).max()) + 1
                  for s in range(5)]
        values, times = np.unique(counts, return_counts=True)
        return int(values[np.argmax(times)])
    sets = [set(row.tolist()) for row in neighbors]
    if kind == "snn":
        weights = np.array([[len(sets[i] & sets[j]) / k for j in row]
                            for i, row in enumerate(neighbors.tolist())])
    elif kind == "mutual":
        weights = np.array([[float(i in sets[j]) for j in row]
                            for i, row in enumerate(neighbors.tolist())])
    else:
        raise SystemExit(f"unknown graph {graph!r}")
    return weighted_louvain_count(neighbors, weights)


def closest_pair_conductance(labels: np.ndarray, neighbors: np.ndarray) -> float:
    edges = cluster_edges(labels, neighbors, int(labels.max()) + 1)
    both = edges + edges.T
    degree = both.sum(1)
    np.fill_diagonal(both, 0)
    return float((both / np.minimum.outer(degree, degree)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", nargs="*",
                        default=["k20", "k40", "k60", "k80", "snn40", "mutual40", "subsample40"],
                        help="also fixedR: the resolution K / R, iterated (resolution_count)")
    parser.add_argument("--no-conductance", action="store_true",
                        help="skip the closest pair's conductance of each feature set")
    args = parser.parse_args()
    sets = sorted(CACHE.glob("digits-*.npz"))
    if not sets:
        raise SystemExit(f"no features in {CACHE}: run benchmarks/choose_k.py first")
    data = {p.stem: np.load(p) for p in sets}
    print(json.dumps({"machine": machine()}), flush=True)
    for graph in args.graphs:
        found = [(len(np.unique(d["targets"])), community_count(normalize(d["features"]), graph))
                 for d in data.values()]
        exact = sum(t == c for t, c in found)
        near = sum(abs(t - c) <= 1 for t, c in found)
        reported = [f for f, name in zip(found, data) if not name.endswith(("seed5", "seed6"))]
        print(json.dumps({"graph": graph, "exact": exact, "within_1": near, "runs": len(found),
                          "exact_reported": sum(t == c for t, c in reported),
                          "true_and_found": found}), flush=True)
    for name, d in data.items():
        if args.no_conductance:
            break
        feats, targets = normalize(d["features"]), d["targets"]
        neighbors = knn_graph(feats, 40)
        labels = louvain_labels(neighbors)
        print(json.dumps({"features": name, "classes": len(np.unique(targets)),
                          "communities": int(labels.max()) + 1,
                          "closest_pair_conductance": round(
                              closest_pair_conductance(labels, neighbors), 3)}), flush=True)


if __name__ == "__main__":
    main()
