"""Choosing the number of clusters without labels, on the mined features, in seconds.

Each criterion reads K off a curve over the range ``ks``, computed on (at most ``sample``
images of) the L2-normalised mining features and, for most, on their kNN graph, the
neighbour relation SCAN trains on:

- ``louvain`` (default): the highest modularity of Louvain's partition merged down to each K
  (or the spectral one); one cluster fewer wins when it scores within 2 % and has the larger
  eigengap. ``louvain_alone`` without that last step.
- ``spectral``: Newman's modularity of spectral partitions of a 40-neighbour kNN
  graph; the highest wins.
- ``eigengap``: the largest gap between consecutive eigenvalues of that graph's normalised
  Laplacian.
- ``scan_merge``: SCAN heads on the features with the largest K of the range, then the
  clusters whose neighbours lie in each other merged, most agreeing pair first; K is where
  the next merge would join clusters that agree much less than the last one did.
- ``stability``: k-means on pairs of random subsamples; the largest K whose partitions agree.
- ``gap``: Tibshirani's gap statistic, k-means' spread against uniform reference data.
- ``modularity``: Newman's modularity of k-means partitions on the kNN graph; the highest wins.
- ``silhouette``: the mean cosine silhouette of k-means partitions (clustimage's criterion).

How often each finds the true K, and what it costs, is measured in ``benchmarks/choose_k.py``
(results in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scanclust.files import atomic_write
from scanclust.merge import cluster_edges, greedy_merges


@dataclass
class KChoice:
    """The chosen K, and the curve it was read from (for the report and the figure)."""

    k: int
    criterion: str
    ks: list[int]
    scores: list[float]
    sample: int
    rule: str = "the highest wins"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize(features: np.ndarray) -> np.ndarray:
    feats = np.asarray(features, dtype=np.float32)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def knn_graph(features: np.ndarray, k: int) -> np.ndarray:
    """``[N, k]`` indices of each row's k most cosine-similar other rows (exact)."""
    import torch

    from scanclust.knn import knn

    return knn(torch.from_numpy(normalize(features)), k)[0].numpy()


GRAPH_K = 10  # neighbours of the kNN graph of modularity and scan_merge (SCAN mines 20)
SPECTRAL_K = 40  # neighbours of the graph the spectral criteria embed (fixed on separate runs)


@dataclass
class Sample:
    """The normalised features a criterion scores, with what several criteria share: the
    kNN graph (``graph(k)``: each row's k nearest), the spectrum of the wide graph, and
    k-means partitions."""

    feats: np.ndarray
    max_k: int
    seed: int = 0
    restarts: int = 3
    _partitions: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @cached_property
    def neighbors(self) -> np.ndarray:
        return knn_graph(self.feats, min(max(GRAPH_K, SPECTRAL_K), len(self.feats) - 1))

    def graph(self, k: int) -> np.ndarray:
        return self.neighbors[:, :k]  # most similar first, so a narrower graph is a prefix

    @cached_property
    def spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        return laplacian_spectrum(self.graph(SPECTRAL_K), self.max_k + 1, self.seed)

    def kmeans(self, k: int) -> np.ndarray:
        from sklearn.cluster import KMeans

        if k not in self._partitions:
            self._partitions[k] = KMeans(k, n_init=self.restarts,
                                         random_state=self.seed).fit_predict(self.feats)
        return self._partitions[k]


def modularity(labels: np.ndarray, neighbors: np.ndarray) -> float:
    """Newman's modularity of ``labels`` on the directed graph ``i -> neighbors[i, :]``.

    The share of kNN edges that stay inside a cluster minus the share expected if edges ignored
    the clusters (``sum_c out_c * in_c / m^2``). Splitting a real group cuts many edges and
    lowers it; merging two groups raises the expected share more than the observed one.
    A hand-checkable case: two clusters whose rows only point inside their own cluster, of
    equal size, give 1 - (1/2)^2 - (1/2)^2 = 0.5.
    """
    labels = np.asarray(labels)
    n, k = neighbors.shape
    m = n * k
    inside = float((labels[:, None] == labels[neighbors]).sum()) / m
    count = int(labels.max()) + 1
    out_degree = k * np.bincount(labels, minlength=count).astype(np.float64)
    in_degree = np.bincount(labels[neighbors].ravel(), minlength=count).astype(np.float64)
    return inside - float((out_degree * in_degree).sum()) / m ** 2


def by_modularity(data: Sample, ks: list[int]) -> tuple[list[float], int, str]:
    scores = [modularity(data.kmeans(k), data.graph(GRAPH_K)) for k in ks]
    return scores, ks[int(np.argmax(scores))], "the highest wins"


def by_silhouette(data: Sample, ks: list[int]) -> tuple[list[float], int, str]:
    from sklearn.metrics import silhouette_score

    scores = [float(silhouette_score(data.feats, data.kmeans(k), metric="cosine")) for k in ks]
    return scores, ks[int(np.argmax(scores))], "the highest wins"


def laplacian_spectrum(neighbors: np.ndarray, count: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smallest eigenvalues (ascending) and their eigenvectors of
    ``I - D^-1/2 W D^-1/2``, the normalised Laplacian of the symmetrised kNN graph
    (``W_ij = 1`` where i or j is among the other's neighbours)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    n, k = neighbors.shape
    graph = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), neighbors.ravel())),
                          shape=(n, n))
    graph = ((graph + graph.T) > 0).astype(np.float64)
    scale = sp.diags(1.0 / np.sqrt(np.asarray(graph.sum(1)).ravel()))
    adjacency = scale @ graph @ scale
    count = min(count, n - 1)
    if n <= 2000:
        values, vectors = np.linalg.eigh(adjacency.toarray())
        values, vectors = values[::-1][:count], vectors[:, ::-1][:, :count]
    else:  # the largest of the adjacency are the smallest of the Laplacian, and converge fast
        start = np.random.default_rng(seed).standard_normal(n)
        values, vectors = eigsh(adjacency, k=count, which="LA", v0=start)
        order = np.argsort(-values)
        values, vectors = values[order], vectors[:, order]
    return 1.0 - values, vectors


def spectral_labels(vectors: np.ndarray, k: int, seed: int = 0, restarts: int = 3) -> np.ndarray:
    """Spectral clustering (Ng, Jordan & Weiss, 2002): k-means on the rows, scaled to unit
    length, of the first k eigenvectors."""
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=restarts, random_state=seed).fit_predict(normalize(vectors[:, :k]))


def by_spectral(data: Sample, ks: list[int]) -> tuple[list[float], int, str]:
    """Modularity, as ``modularity``, but of spectral partitions on a wider kNN graph (40
    neighbours). k-means on the features cuts a class along its widest extent, not where few
    neighbours cross (on the digits demo's features its K = 10 partition has ARI 0.39-0.42
    with the classes, spectral clustering's 0.53-0.65); with 10 neighbours the graph sees a digit's
    writing styles as communities of their own, with 40 it sees the digits."""
    vectors = data.spectrum[1]
    scores = [modularity(spectral_labels(vectors, k, data.seed, data.restarts),
                         data.graph(SPECTRAL_K)) for k in ks]
    return scores, ks[int(np.argmax(scores))], "the highest wins"


def by_eigengap(data: Sample, ks: list[int]) -> tuple[list[float], int, str]:
    """K clusters that few kNN edges join make a graph close to K disconnected parts, whose
    Laplacian has K eigenvalues near 0 (exactly 0 for K components) before a jump; splitting
    a well-connected group adds no small eigenvalue. So the gap after the K-th smallest
    eigenvalue is largest at the number of weakly joined groups (von Luxburg, "A tutorial on
    spectral clustering", 2007, section 8.3). The graph is the spectral criterion's."""
    values = data.spectrum[0]
    scores = [float(values[k] - values[k - 1]) if k < len(values) else 0.0 for k in ks]
    return scores, ks[int(np.argmax(scores))], "the largest gap wins"


def by_stability(data: Sample, ks: list[int], pairs: int = 4, share: float = 0.8,
                 level: float = 0.9) -> tuple[list[float], int, str]:
    """A K that matches groups in the data is found again on another sample of it; a K that
    cuts through a group (or splits one arbitrarily) moves the cut from sample to sample. The
    score is the mean adjusted Rand index, on the images two random ``share`` subsamples have
    in common, between k-means partitions of each (Ben-Hur et al., 2002). Since K = 2 is often
    stable too, the largest K that stays above ``level`` wins (the highest, if none does)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    n = len(data.feats)
    rng = np.random.default_rng(data.seed)
    draws = [[np.sort(rng.choice(n, int(share * n), replace=False)) for _ in range(2)]
             for _ in range(pairs)]

    def agreement(k: int, i: int) -> float:
        labels = np.full((2, n), -1)
        for j, rows in enumerate(draws[i]):
            labels[j, rows] = KMeans(k, n_init=1, random_state=data.seed + 2 * i + j
                                     ).fit_predict(data.feats[rows])
        both = (labels >= 0).all(0)
        return adjusted_rand_score(labels[0, both], labels[1, both])

    scores = [float(np.mean([agreement(k, i) for i in range(pairs)])) for k in ks]
    stable = [k for k, s in zip(ks, scores) if s >= level]
    best = max(stable) if stable else ks[int(np.argmax(scores))]
    return scores, best, f"the largest K above {level} wins"


def dispersion(feats: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster sum of squared distances to the cluster means."""
    total = 0.0
    for c in np.unique(labels):
        part = feats[labels == c]
        total += float(((part - part.mean(0)) ** 2).sum())
    return total


def gap_choice(gaps: np.ndarray, spreads: np.ndarray, ks: list[int]) -> int:
    """Tibshirani's rule: the smallest K with ``gap(K) >= gap(K+1) - s(K+1)`` (the last K of
    the curve if none); ``gaps`` and ``spreads`` run over ``ks`` and one more K."""
    return next((k for i, k in enumerate(ks) if gaps[i] >= gaps[i + 1] - spreads[i + 1]), ks[-1])


def by_gap(data: Sample, ks: list[int], references: int = 5) -> tuple[list[float], int, str]:
    """Real groups make k-means' within-cluster spread fall faster with K than it falls on
    structureless data of the same extent. The gap statistic (Tibshirani, Walther & Hastie,
    2001) is the mean log spread of k-means on uniform data in the box of the features'
    principal axes minus the log spread on the features; it stops rising past the number of
    groups, and the first K whose gap is within a standard error of the next one's wins."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(data.seed)
    mean = data.feats.mean(0)
    axes = np.linalg.svd(data.feats - mean, full_matrices=False)[2]
    projected = (data.feats - mean) @ axes.T
    lo, hi = projected.min(0), projected.max(0)
    boxes = [rng.uniform(lo, hi, projected.shape).astype(np.float32) for _ in range(references)]
    tried = ks + [ks[-1] + 1] if ks[-1] + 1 < len(data.feats) else ks + [ks[-1]]
    gaps, spreads = [], []
    for k in tried:
        own = np.log(dispersion(projected, data.kmeans(k)))
        ref = np.log([KMeans(k, n_init=1, random_state=data.seed).fit(box).inertia_
                      for box in boxes])
        gaps.append(float(ref.mean() - own))
        spreads.append(float(ref.std() * np.sqrt(1 + 1 / references)))
    k = gap_choice(np.array(gaps), np.array(spreads), ks)
    return gaps[:len(ks)], k, "the first K within a standard error of the next gap wins"


def scan_labels(data: Sample, clusters: int, heads: int = 5, steps: int = 2000,
                entropy_weight: float = 5.0, batch_size: int = 256) -> np.ndarray:
    """Clusters of the lowest-loss of ``heads`` linear SCAN heads trained on the features (no
    backbone, no augmentation): each image and a random one of its neighbours are pushed into
    the same cluster, the entropy term keeps all ``clusters`` in use. The features are scaled
    to unit variance per dimension on average, so that Adam's steps make confident logits."""
    import torch

    from scanclust.losses import scan_loss

    generator = torch.Generator().manual_seed(data.seed)
    feats = torch.as_tensor(data.feats, dtype=torch.float32) * data.feats.shape[1] ** 0.5
    neighbors = torch.from_numpy(data.graph(GRAPH_K))
    weight = torch.nn.Parameter(0.01 * torch.randn(heads, feats.shape[1], clusters,
                                                   generator=generator))
    bias = torch.nn.Parameter(torch.zeros(heads, 1, clusters))
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small only wait on other threads (7x slower on 2)
    try:
        for _ in range(steps):
            rows = torch.randint(len(feats), (batch_size,), generator=generator)
            partner = neighbors[rows, torch.randint(neighbors.shape[1], (batch_size,),
                                                    generator=generator)]
            loss = scan_loss(feats[rows] @ weight + bias, feats[partner] @ weight + bias,
                             entropy_weight)[0]
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
        with torch.no_grad():
            logits = feats @ weight + bias
            loss = sum(scan_loss(logits, logits[:, neighbors[:, j]], entropy_weight)[0]
                       for j in range(neighbors.shape[1]))
            return logits[int(loss.argmin())].argmax(1).numpy()
    finally:
        torch.set_num_threads(threads)


def merge_agreements(labels: np.ndarray, neighbors: np.ndarray) -> dict[int, float]:
    """Merge the two clusters that agree most until one is left: ``{c: agreement}`` of the
    merge that took c clusters to c - 1. The agreement of clusters a and b is the larger of
    the share of a's kNN edges that end in b and the share of b's that end in a."""
    _, labels = np.unique(labels, return_inverse=True)
    edges = cluster_edges(labels, neighbors, int(labels.max()) + 1)
    agreements = {}
    while len(edges) > 1:
        share = edges / edges.sum(1, keepdims=True)
        agree = np.maximum(share, share.T)
        np.fill_diagonal(agree, -1.0)
        a, b = np.unravel_index(int(np.argmax(agree)), agree.shape)
        agreements[len(edges)] = float(agree[a, b])
        edges[a] += edges[b]
        edges[:, a] += edges[:, b]
        edges = np.delete(np.delete(edges, b, 0), b, 1)
    return agreements


def by_scan_merge(data: Sample, ks: list[int]) -> tuple[list[float], int, str]:
    """SCAN with more clusters than there are groups splits groups, into parts whose
    neighbours often lie in each other; parts of different groups share few neighbours.
    Merging the most agreeing pair first joins the parts back into groups, and the first
    merge across groups agrees much less than the merges before it. The score of K is the
    agreement of the merge that made K clusters less that of the merge K would undergo next,
    and the largest drop wins (a ratio would be ruled by merges of clusters that share almost
    no neighbours, where the agreement falls from 0.008 to 0 late in the merging)."""
    agreements = merge_agreements(scan_labels(data, max(ks)), data.graph(GRAPH_K))
    # clusters the heads left empty were merged by SCAN itself: in full agreement
    agreements.update({k: 1.0 for k in range(len(agreements) + 2, max(ks) + 1)})
    scores = [agreements[k + 1] - agreements[k] if k + 1 in agreements and k in agreements
              else 0.0 for k in ks]
    return scores, ks[int(np.argmax(scores))], "the largest drop in agreement wins"


def knn_nx_graph(neighbors: Any) -> Any:
    """The kNN rows ``i -> neighbors[i, :]`` as an undirected networkx graph (an edge either
    end chose, once)."""
    import networkx as nx

    n, k = neighbors.shape
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(zip(np.repeat(np.arange(n), k).tolist(), neighbors.ravel().tolist()))
    return graph


def louvain_labels(neighbors: np.ndarray, seed: int = 0, tries: int = 3) -> np.ndarray:
    """Louvain communities (Blondel et al., 2008, as networkx implements it) of the symmetrised
    kNN graph: of ``tries`` runs from different seeds, the one of the highest modularity (on
    about half of the battery's feature sets one run's count moves with its seed, by 1-2)."""
    import networkx as nx

    n = len(neighbors)
    graph = knn_nx_graph(neighbors)
    best, best_score = np.zeros(n, dtype=np.int64), -np.inf
    for attempt in range(tries):
        labels = np.empty(n, dtype=np.int64)
        communities = nx.community.louvain_communities(graph, seed=seed * tries + attempt)
        for c, members in enumerate(communities):
            labels[list(members)] = c
        score = modularity(labels, neighbors)
        if score > best_score:
            best, best_score = labels, score
    return best


def merged_modularities(labels: np.ndarray, neighbors: np.ndarray) -> dict[int, float]:
    """``{count: modularity}`` of ``labels`` and of every partition that merging its clusters
    makes, the pair whose merge keeps the modularity highest first (``merge.greedy_merges``)."""
    edges = cluster_edges(labels, neighbors, int(labels.max()) + 1)
    return {len(groups): score for score, groups in greedy_merges(edges)}


LOUVAIN_BAND = 0.02  # how close (share of the best) one cluster fewer must score to be weighed


def by_louvain(data: Sample, ks: list[int],
               band: float = LOUVAIN_BAND) -> tuple[list[float], int, str]:
    """Modularity, as ``spectral`` (same 40-neighbour graph), of the best partition found for
    each K: Louvain's, which optimises modularity directly and so settles on its own number of
    communities, merged down to each smaller K, or the spectral partition. Louvain finds
    better partitions than spectral clustering followed by k-means, so its count usually wins.

    Then one step back: one cluster fewer wins when it scores within ``band`` of the best and
    has the larger eigengap. Modularity cannot tell a small distinct style of a class (a 1 with
    a base stroke, 45 of 720 images) from a class: on the digits battery merging it away cost
    0.3-1.4 % of the modularity, merging two similar digits of ten 0.8-1.1 %. The eigengap asks
    how well the weakest group is cut off, and such a style keeps a fifth of its edges outside
    (band set on tuning seeds, the same from 0.015 to 0.03; ``benchmarks/RESULTS.md``)."""
    graph = data.graph(SPECTRAL_K)
    found = merged_modularities(louvain_labels(graph, data.seed), graph)
    spectral = by_spectral(data, ks)[0]
    scores = [max(score, found.get(k, -1.0)) for k, score in zip(ks, spectral)]
    best = int(np.argmax(scores))
    rule = "the highest wins"
    if band > 0:
        rule += f"; one fewer within {band:.0%} with a larger eigengap wins instead"
        gaps = by_eigengap(data, ks)[0]
        best -= int(best > 0 and scores[best - 1] >= (1 - band) * scores[best]
                    and gaps[best - 1] > gaps[best])
    return scores, ks[best], rule


def by_louvain_alone(data: Sample, ks: list[int]) -> tuple[list[float], int, str]:
    """``louvain`` without its eigengap step (the default before it, kept for comparison)."""
    return by_louvain(data, ks, band=0.0)


CriterionFn = Callable[[Sample, list[int]], tuple[list[float], int, str]]
SCORERS: dict[str, CriterionFn] = {
    "louvain": by_louvain, "louvain_alone": by_louvain_alone, "spectral": by_spectral,
    "eigengap": by_eigengap, "scan_merge": by_scan_merge,
    "stability": by_stability, "gap": by_gap, "modularity": by_modularity,
    "silhouette": by_silhouette}
CRITERIA = tuple(SCORERS)
DEFAULT_CRITERION = "louvain"


def score_partitions(features: np.ndarray, ks: list[int], criterion: str = DEFAULT_CRITERION,
                     seed: int = 0, sample: int = 10_000, restarts: int = 3) -> KChoice:
    """The criterion's curve over ``ks`` on (a sample of) ``features``, and the K it picks."""
    if criterion not in SCORERS:
        raise ValueError(f"criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    feats = normalize(features)
    if len(feats) > sample:
        feats = feats[np.sort(np.random.default_rng(seed).choice(len(feats), sample, replace=False))]
    ks = [k for k in ks if 2 <= k < len(feats)]
    if not ks:
        raise ValueError(f"no K to try for {len(feats)} images")
    scores, k, rule = SCORERS[criterion](Sample(feats, max(ks), seed, restarts), ks)
    return KChoice(k=int(k), criterion=criterion, ks=ks, scores=[float(s) for s in scores],
                   sample=len(feats), rule=rule)


def plot_curve(choice: KChoice, path: Path) -> None:
    """The criterion against K, the chosen K marked: a PNG for the run and the report."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.0, 3.0))
    ax = fig.add_subplot()
    ax.plot(choice.ks, choice.scores, marker="o", color="#3060a0")
    ax.axvline(choice.k, color="#c03030", linestyle="--", linewidth=1)
    ax.set_xlabel("number of clusters K")
    ax.set_ylabel(choice.criterion)
    ax.set_title(f"{choice.criterion}: K = {choice.k} chosen ({choice.rule})", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    with atomic_write(Path(path)) as handle:
        fig.savefig(handle, dpi=120, format="png", bbox_inches="tight")
