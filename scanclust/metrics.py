"""Clustering metrics as the paper reports them: matched accuracy, NMI, ARI, AMI and their
spread over runs.

Cluster ids are arbitrary, so accuracy needs a mapping from clusters to classes first: a
one-to-one Hungarian matching when there are as many clusters as classes (or fewer), and a
many-to-one majority vote when overclustering, where a one-to-one matching would leave the
extra clusters counted as wrong. NMI, ARI and AMI are invariant to relabelling and are computed
from the raw ids. Everything returned by ``cluster_metrics`` is plain Python so that it can be
written to JSON as is.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (adjusted_mutual_info_score, adjusted_rand_score,
                             normalized_mutual_info_score)


def _check_labels(name: str, labels: np.ndarray, num_ids: int) -> np.ndarray:
    """Reject what would silently give a wrong score: floats, 2-D arrays, out-of-range ids."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if name == "target" and (labels == -1).any():
        raise ValueError("target contains -1 (unlabeled); evaluate on labelled samples only")
    if labels.size and (labels.min() < 0 or labels.max() >= num_ids):
        raise ValueError(f"{name} ids must lie in [0, {num_ids}), "
                         f"got range [{labels.min()}, {labels.max()}]")
    return labels


def _check_pair(pred: np.ndarray, target: np.ndarray, num_clusters: int,
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred = _check_labels("pred", pred, num_clusters)
    target = _check_labels("target", target, num_classes)
    if len(pred) != len(target):
        raise ValueError(f"pred and target differ in length: {len(pred)} vs {len(target)}")
    return pred, target


def contingency(pred: np.ndarray, target: np.ndarray, num_clusters: int,
                num_classes: int) -> np.ndarray:
    """Counts of (cluster, class) pairs, shape [num_clusters, num_classes]; both mappings use it."""
    pred, target = _check_pair(pred, target, num_clusters, num_classes)
    table = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(table, (pred, target), 1)
    return table


def hungarian_mapping(pred: np.ndarray, target: np.ndarray, num_clusters: int,
                      num_classes: int) -> np.ndarray:
    """One-to-one cluster -> class mapping with the most matched samples; unmatched clusters -> -1."""
    table = contingency(pred, target, num_clusters, num_classes)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = np.full(num_clusters, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_mapping(pred: np.ndarray, target: np.ndarray, num_clusters: int,
                     num_classes: int) -> np.ndarray:
    """Many-to-one mapping for overclustering: each cluster to its most frequent class, empty -> -1."""
    table = contingency(pred, target, num_clusters, num_classes)
    mapping = table.argmax(axis=1)
    mapping[table.sum(axis=1) == 0] = -1
    return mapping


def accuracy(pred: np.ndarray, target: np.ndarray, mapping: np.ndarray) -> float:
    """Share of samples whose mapped cluster equals the true class."""
    pred, target, mapping = np.asarray(pred), np.asarray(target), np.asarray(mapping)
    if len(pred) != len(target):
        raise ValueError(f"pred and target differ in length: {len(pred)} vs {len(target)}")
    return float(np.mean(mapping[pred] == target))


def top5_accuracy(probs: np.ndarray, target: np.ndarray, mapping: np.ndarray) -> float:
    """Share of samples whose class is among the mapped classes of their 5 most probable clusters."""
    probs, target, mapping = np.asarray(probs), np.asarray(target), np.asarray(mapping)
    if probs.ndim != 2 or probs.shape[1] < 5:
        raise ValueError(f"top-5 accuracy needs probs of shape [N, C] with C >= 5, "
                         f"got {probs.shape}")
    if len(probs) != len(target):
        raise ValueError(f"probs and target differ in length: {len(probs)} vs {len(target)}")
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    return float(np.mean((mapping[top5] == target[:, None]).any(axis=1)))


def cluster_metrics(pred: np.ndarray, target: np.ndarray, num_clusters: int, num_classes: int,
                    probs: np.ndarray | None = None) -> dict[str, Any]:
    """All evaluation numbers for one clustering, as JSON-ready Python values.

    ``acc`` uses the Hungarian mapping when num_clusters <= num_classes and the majority mapping
    when overclustering; then ``acc_hungarian`` gives the one-to-one figure as well, because the
    majority figure grows with the number of clusters and is not comparable on its own.
    """
    pred, target = _check_pair(pred, target, num_clusters, num_classes)
    if len(pred) == 0:
        raise ValueError("cannot evaluate an empty clustering (no samples)")
    overclustering = num_clusters > num_classes
    hungarian = hungarian_mapping(pred, target, num_clusters, num_classes)
    mapping = majority_mapping(pred, target, num_clusters, num_classes) if overclustering \
        else hungarian
    result: dict[str, Any] = {
        "acc": accuracy(pred, target, mapping),
        "nmi": float(normalized_mutual_info_score(target, pred)),
        "ari": float(adjusted_rand_score(target, pred)),
        "ami": float(adjusted_mutual_info_score(target, pred)),
    }
    if overclustering:
        result["acc_hungarian"] = accuracy(pred, target, hungarian)
    if probs is not None and num_clusters >= 5:
        probs = np.asarray(probs)
        if probs.shape != (len(pred), num_clusters):
            raise ValueError(f"probs must have shape ({len(pred)}, {num_clusters}), "
                             f"got {probs.shape}")
        result["top5"] = top5_accuracy(probs, target, mapping)
    result["matching"] = "majority" if overclustering else "hungarian"
    result["mapping"] = mapping.tolist()
    result["num_samples"] = len(pred)
    result["cluster_sizes"] = np.bincount(pred, minlength=num_clusters).tolist()
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def mean_std(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and population std of every numeric scalar over runs, so results report their spread.

    Nested dicts (one per method, say) are summarised key by key; lists and strings are skipped.
    ``n`` counts the runs that had the key, so a metric missing from some runs is visible.
    """
    keys = list(dict.fromkeys(key for run in runs for key in run))
    summary: dict[str, Any] = {}
    for key in keys:
        values = [run[key] for run in runs if key in run]
        if all(isinstance(v, dict) for v in values):
            nested = mean_std(values)
            if nested:
                summary[key] = nested
            continue
        numbers = [float(v) for v in values if _is_number(v)]
        if numbers:
            summary[key] = {"mean": float(np.mean(numbers)), "std": float(np.std(numbers)),
                            "n": len(numbers)}
    return summary
