"""Counting the battery's classes in a UMAP embedding of its features (the issue's candidate
"silhouette in a UMAP embedding"), against the ``louvain`` criterion on the same features.

    pip install umap-learn          # or: pip install -e ".[bench]"
    python benchmarks/choose_k_umap.py [--neighbors 30] [--dims 5]

Runs on the digits features that ``benchmarks/choose_k.py`` cached in ``.cache/choose_k/``
(the 15 reported runs and the tuning seeds 5-6). Each feature set is embedded by UMAP
(cosine metric, ``min_dist`` 0, seed 0, as UMAP's authors advise for clustering), then:
``silhouette``, k-means with K = 2..20 in the embedding and the K of the highest silhouette
there; ``hdbscanM``, the number of clusters HDBSCAN finds in the embedding with a smallest
cluster of M images (scikit-learn's, noise not counted); ``louvain_fuzzy``, Louvain on UMAP's
own weighted graph (its fuzzy simplicial set) of the 40-neighbour graph ``louvain`` uses.
umap-learn is not a dependency of scanclust: no criterion of it won (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.choose_k import CACHE  # noqa: E402
from benchmarks.common import REPO, machine  # noqa: E402
from scanclust.choose_k import SPECTRAL_K, knn_graph, normalize  # noqa: E402

HDBSCAN_SIZES = (10, 25, 50)


def umap_counts(feats: np.ndarray, neighbors: int, dims: int, ks: list[int]) -> dict[str, int]:
    """The count of each UMAP-based rule on one normalised feature set."""
    import networkx as nx
    import umap
    from sklearn.cluster import HDBSCAN, KMeans
    from sklearn.metrics import silhouette_score
    from umap.umap_ import fuzzy_simplicial_set

    embedded = umap.UMAP(n_neighbors=neighbors, n_components=dims, min_dist=0.0,
                         metric="cosine", random_state=0).fit_transform(feats)
    silhouettes = [silhouette_score(embedded, KMeans(k, n_init=3, random_state=0)
                                    .fit_predict(embedded)) for k in ks]
    counts = {"silhouette": ks[int(np.argmax(silhouettes))]}
    for size in HDBSCAN_SIZES:
        found = HDBSCAN(min_cluster_size=size).fit_predict(embedded)
        counts[f"hdbscan{size}"] = len(set(found.tolist()) - {-1})
    # UMAP's graph of the 40 nearest (each point its own nearest, at distance 0)
    nearest = np.concatenate([np.arange(len(feats))[:, None],
                              knn_graph(feats, SPECTRAL_K - 1)], 1)
    distances = 1.0 - np.einsum("nd,nkd->nk", feats, feats[nearest])
    distances[:, 0] = 0.0
    fuzzy = fuzzy_simplicial_set(feats, SPECTRAL_K, 0, "cosine", knn_indices=nearest,
                                 knn_dists=distances.astype(np.float32))[0]
    graph = nx.from_scipy_sparse_array(fuzzy)
    tries = [nx.community.louvain_communities(graph, weight="weight", seed=s) for s in range(3)]
    counts["louvain_fuzzy"] = len(max(tries, key=lambda c: nx.community.modularity(graph, c)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neighbors", type=int, default=30, help="UMAP's n_neighbors")
    parser.add_argument("--dims", type=int, default=5, help="UMAP's n_components")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    info = machine()
    paths = sorted(CACHE.glob("digits-*.npz"))
    if not paths:
        sys.exit(f"no cached features in {CACHE}: run benchmarks/choose_k.py first")
    ks = list(range(2, 21))
    rows, started = [], time.perf_counter()
    for path in paths:
        saved = np.load(path)
        true_k = len(np.unique(saved["targets"]))
        start = time.perf_counter()
        counts = umap_counts(normalize(saved["features"]), args.neighbors, args.dims, ks)
        row = {"source": path.stem, "true_k": true_k, **counts,
               "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {rule: {"exact": f"{sum(r[rule] == r['true_k'] for r in rows)}/{len(rows)}",
                      "within_1": f"{sum(abs(r[rule] - r['true_k']) <= 1 for r in rows)}"
                                  f"/{len(rows)}"}
               for rule in rows[0] if rule not in ("source", "true_k", "seconds")}
    line = {"benchmark": "choose_k_umap", **info, "umap_neighbors": args.neighbors,
            "umap_dims": args.dims, "seconds": round(time.perf_counter() - started, 1),
            "summary": summary}
    print(json.dumps(line))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / f"choose_k_umap-{slug}-{info['date']}.jsonl"
    with open(out, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows + [line])


if __name__ == "__main__":
    main()
