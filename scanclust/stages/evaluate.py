"""Stage 5, evaluate: metrics and figures on the val split for every model the run has.

Three rows, as in the paper's Table 1: k-means on the pretext features (the baseline), the
SCAN model, and the self-labelled model. Labels are used here only, never for training or
model selection.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.cluster import KMeans, MiniBatchKMeans

from scanclust import distributed
from scanclust.config import Config
from scanclust.data import ImageDataset, build_dataset
from scanclust.data.images import escape_name
from scanclust.data.pipelines import data_path_for
from scanclust.engine import begin_stage, log, predict_logits, prepare_model
from scanclust.figures import (cluster_prototypes, low_confidence_indices, plot_confusion,
                               plot_image_grid)
from scanclust.health import check_finite_array, collapse_warning
from scanclust.metrics import cluster_metrics
from scanclust.models import ClusterModel
from scanclust.files import write_json
from scanclust.rundir import STAGES, RunDir, exclusive
from scanclust.models.saved import CLUSTER_STAGES, load_cluster_model
from scanclust.preflight import clusters_of
from scanclust.runtime import resolve_device

STAGE = "evaluate"
MINIBATCH_KMEANS_ABOVE = 200_000  # full k-means on ImageNet-size features takes hours
THUMBNAIL = 64


def kmeans_baseline(train_features: np.ndarray, val_features: np.ndarray, clusters: int,
                    restarts: int, seed: int) -> np.ndarray:
    """Fit k-means on the train features, assign the val features (the paper's baseline)."""
    train = train_features.astype(np.float32)
    if len(train) > MINIBATCH_KMEANS_ABOVE:
        km = MiniBatchKMeans(clusters, n_init=restarts, random_state=seed, batch_size=4096)
    else:
        km = KMeans(clusters, n_init=restarts, random_state=seed)
    km.fit(train)
    return km.predict(val_features.astype(np.float32))


def evaluate_model(model: ClusterModel, dataset: ImageDataset, cfg: Config, device: torch.device,
                   num_clusters: int, name: str = "evaluate"
                   ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of one cluster model on a split; also returns its probabilities and embeddings."""
    prepare_model(model, cfg, device)
    logits, feats = predict_logits(model, data_path_for(cfg, device, dataset), dataset,
                                   cfg.evaluate.batch_size, device, cfg.amp, cfg.progress,
                                   "evaluate")
    probs = torch.softmax(logits[0], dim=1).numpy()
    check_finite_array(probs, "the predictions", name, cfg)
    pred = probs.argmax(1)
    metrics = label_metrics(pred, dataset, num_clusters, probs)
    metrics["mean_confidence"] = float(probs.max(1).mean())
    return metrics, probs, feats.numpy()


def label_metrics(pred: np.ndarray, dataset: ImageDataset, num_clusters: int,
                  probs: np.ndarray | None = None) -> dict[str, Any]:
    """Cluster metrics against the labelled samples; cluster sizes only when there are none."""
    labelled = dataset.targets >= 0
    if not labelled.any():
        sizes = np.bincount(pred, minlength=num_clusters)
        return {"num_samples": int(len(pred)), "cluster_sizes": sizes.tolist()}
    return cluster_metrics(pred[labelled], dataset.targets[labelled], num_clusters,
                           dataset.num_classes,
                           probs[labelled] if probs is not None else None)


def write_figures(name: str, metrics: dict[str, Any], probs: np.ndarray, feats: np.ndarray,
                  dataset: ImageDataset, folder: Path, count: int) -> None:
    """Confusion matrix, one prototype per cluster, and the least confident samples."""
    pred = probs.argmax(1)
    confidence = probs.max(1)
    labelled = dataset.targets >= 0
    if "mapping" in metrics and labelled.any():
        classes = dataset.num_classes
        mapped = np.asarray(metrics["mapping"])[pred[labelled]]
        matrix = np.zeros((classes, classes), dtype=np.int64)
        valid = mapped >= 0
        np.add.at(matrix, (dataset.targets[labelled][valid], mapped[valid]), 1)
        # class names are subfolder names: any bytes, which no font can draw as they are
        names = [escape_name(c) for c in dataset.classes] if dataset.classes else None
        plot_confusion(matrix, folder / f"{name}_confusion.png", names,
                       f"{name}: ACC {metrics['acc']:.3f}")
    prototypes = {c: members[0] for c, members in cluster_prototypes(probs, feats).items()}
    plot_image_grid(_thumbnails(dataset, list(prototypes.values())),
                    [f"cluster {c}" for c in prototypes], folder / f"{name}_prototypes.png",
                    f"{name}: prototype of each cluster")
    low = low_confidence_indices(probs, count)
    plot_image_grid(_thumbnails(dataset, low.tolist()),
                    [f"c{pred[i]} p={confidence[i]:.2f}" for i in low],
                    folder / f"{name}_low_confidence.png", f"{name}: least confident samples")


def _thumbnails(dataset: ImageDataset, indices: list[int]) -> np.ndarray:
    if not indices:
        return np.zeros((0, THUMBNAIL, THUMBNAIL, 3), dtype=np.uint8)
    images = []
    for i in indices:
        image = dataset.load(i)
        if max(image.size) > THUMBNAIL:
            image = image.resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR)
        images.append(np.asarray(image.convert("RGB")))
    side = max(max(im.shape[0], im.shape[1]) for im in images)
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side))) for im in images])


@exclusive
def evaluate(config: Config | str | Path | dict | None = None, out: str | Path = "runs/default",
             *, overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
             force: bool = False) -> dict[str, Any]:
    """Write ``metrics.json`` and the figures for every finished stage of the run.

    Evaluation derives everything from the stages' outputs, so it is always recomputed;
    ``resume`` and ``force`` change nothing here and are accepted for a uniform signature.
    """
    cfg, run, _ = begin_stage(STAGE, config, out, overrides, resume, force, needs="mine")
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    val_set = build_dataset(cfg.data, "val")
    num_clusters = _num_clusters(run, cfg, val_set)
    # Predicting is the part every process shares (each its shard of the val split); k-means,
    # figures and the report are the main process's alone.
    evaluated = {}
    for name in CLUSTER_STAGES:
        if run.is_done(name):
            model, _ = load_cluster_model(run, name)
            evaluated[name] = evaluate_model(model, val_set, cfg, device, num_clusters, name)
    return distributed.on_main(lambda: _report(cfg, run, val_set, num_clusters, evaluated, start))


def _report(cfg: Config, run: RunDir, val_set: ImageDataset, num_clusters: int,
            evaluated: dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray]],
            start: float) -> dict[str, Any]:
    """The k-means baseline, the figures and ``metrics.json``."""
    metrics: dict[str, Any] = {"dataset": cfg.data.dataset, "num_clusters": num_clusters,
                               "stages": {}, "neighbors": {}, "seconds": {}}
    mine_summary = run.summary("mine")
    metrics["neighbors"] = mine_summary.get("purity_train", {})
    if "purity_val" in mine_summary:
        metrics["neighbors_val"] = mine_summary["purity_val"]

    if cfg.evaluate.kmeans and run.features("train").is_file() and run.features("val").is_file():
        pred = kmeans_baseline(np.load(run.features("train")), np.load(run.features("val")),
                               num_clusters, cfg.evaluate.kmeans_restarts, cfg.seed)
        metrics["stages"]["kmeans"] = label_metrics(pred, val_set, num_clusters)
    for name, (stage_metrics, probs, feats) in evaluated.items():
        metrics["stages"][name] = stage_metrics
        sizes = np.bincount(probs.argmax(1), minlength=num_clusters)
        warning = collapse_warning(sizes, f"{name} (on the val split)")
        if warning:
            metrics.setdefault("warnings", []).append(warning)
        if cfg.evaluate.figures:
            write_figures(name, stage_metrics, probs, feats, val_set, run.figures,
                          cfg.evaluate.num_low_confidence)
    for stage in STAGES[:-1]:
        if run.is_done(stage):
            metrics["seconds"][stage] = round(run.summary(stage)["seconds"], 2)
    metrics["seconds"][STAGE] = round(time.perf_counter() - start, 2)
    write_json(run.metrics_path, metrics)
    log.info("evaluate: wrote %s\n%s", run.metrics_path, format_table(metrics))
    return metrics


def _num_clusters(run: RunDir, cfg: Config, dataset: ImageDataset) -> int:
    return int(run.summary("scan")["num_clusters"]) if run.is_done("scan") \
        else clusters_of(cfg, dataset)


def format_table(metrics: dict[str, Any]) -> str:
    """The run's results as a small text table: one row per stage, then seconds per stage."""
    lines = [f"{'':10s} {'ACC':>7s} {'NMI':>7s} {'ARI':>7s}"]
    for name in ("kmeans", "scan", "selflabel"):
        row = metrics["stages"].get(name)
        if row is None:
            continue
        cells = " ".join(f"{row[k]:7.4f}" if k in row else f"{'-':>7s}" for k in ("acc", "nmi", "ari"))
        lines.append(f"{name:10s} {cells}")
    seconds = metrics.get("seconds", {})
    if seconds:
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return "\n".join(lines)
