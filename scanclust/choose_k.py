"""Choosing the number of clusters without labels, on the mined features, in seconds.

For every K of a range, k-means partitions the (L2-normalised) mining features, and a
criterion scores the partition; the K with the best score wins. Two criteria:

- ``modularity`` (default): Newman's modularity of the partition on the directed kNN graph of
  the features, the same neighbour relation SCAN trains on. It is the share of kNN edges that
  stay inside a cluster minus the share expected if edges ignored the clusters
  (``sum_c out_c * in_c / m^2``). Splitting a real group cuts many edges and lowers it;
  merging two groups raises the expected share more than the observed one. So it peaks where
  the clusters are what the neighbours say they are.
- ``silhouette``: the mean silhouette (cosine distance) of the partition, as clustimage uses.

Both are computed on at most ``sample`` images (default 10,000), so a call costs seconds even
for ImageNet-size folders. How often each finds the true K is measured in
``benchmarks/choose_k.py`` (results in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scanclust.files import atomic_write

CRITERIA = ("modularity", "silhouette")


@dataclass
class KChoice:
    """The chosen K, and the curve it was read from (for the report and the figure)."""

    k: int
    criterion: str
    ks: list[int]
    scores: list[float]
    sample: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize(features: np.ndarray) -> np.ndarray:
    feats = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def knn_graph(features: np.ndarray, k: int) -> np.ndarray:
    """``[N, k]`` indices of each row's k most cosine-similar other rows (exact)."""
    import torch

    from scanclust.knn import knn

    return knn(torch.from_numpy(normalize(features)), k)[0].numpy()


def modularity(labels: np.ndarray, neighbors: np.ndarray) -> float:
    """Newman's modularity of ``labels`` on the directed graph ``i -> neighbors[i, :]``.

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


def score_partitions(features: np.ndarray, ks: list[int], criterion: str = "modularity",
                     seed: int = 0, sample: int = 10_000, graph_k: int = 10,
                     restarts: int = 3) -> KChoice:
    """k-means for every K in ``ks`` on (a sample of) ``features``; the criterion's best K."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    feats = normalize(features)
    rng = np.random.default_rng(seed)
    if len(feats) > sample:
        feats = feats[np.sort(rng.choice(len(feats), sample, replace=False))]
    ks = [k for k in ks if 2 <= k < len(feats)]
    if not ks:
        raise ValueError(f"no K to try for {len(feats)} images")
    neighbors = knn_graph(feats, min(graph_k, len(feats) - 1)) if criterion == "modularity" \
        else None
    scores = []
    for k in ks:
        labels = KMeans(k, n_init=restarts, random_state=seed).fit_predict(feats)
        if criterion == "modularity":
            scores.append(modularity(labels, neighbors))
        else:
            scores.append(float(silhouette_score(feats, labels, metric="cosine")))
    best = int(np.argmax(scores))
    return KChoice(k=ks[best], criterion=criterion, ks=ks, scores=[float(s) for s in scores],
                   sample=len(feats))


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
    ax.set_title(f"{choice.criterion} of k-means partitions: K = {choice.k} chosen", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    with atomic_write(Path(path)) as handle:
        fig.savefig(handle, dpi=120, format="png", bbox_inches="tight")
