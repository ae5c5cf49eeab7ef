"""Cached-feature mode: SCAN + self-label heads on 50,000 x 512 features, timed.

With a frozen backbone (the paper's ImageNet setting) the stages train linear heads on
features computed once (``scan.cached_views`` / ``selflabel.cached_views``). This times those
head-only loops, the stages' own loops and step bodies on a ``FeaturePath``, with the
ImageNet-50 recipe (10 heads, SGD lr 5.0, batch 512, 100 SCAN epochs; self-label SGD 0.03,
EMA 0.999, 25 epochs) on synthetic features: 10 Gaussian clusters in 512-d, an eval view and
``--views`` augmented views (eval + noise), neighbours mined exactly. Reports seconds per
stage over ``--repeats`` runs (mean ± std) and the accuracy the heads reach.

    python benchmarks/cached_heads.py            # CPU: the budget is 60 s for both stages
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, sync  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.data.pipelines import FeaturePath, feature_store  # noqa: E402
from scanclust.engine import train_one_epoch  # noqa: E402
from scanclust.knn import mine_neighbors  # noqa: E402
from scanclust.metrics import cluster_metrics  # noqa: E402
from scanclust.models import ClusterModel, Heads  # noqa: E402
from scanclust.runtime import derive_seed, resolve_device  # noqa: E402
from scanclust.stages.scan import ScanLoop, heldout_scan_loss, scan_body  # noqa: E402
from scanclust.stages.selflabel import SelfLabelLoop, selflabel_body  # noqa: E402


class Frozen(torch.nn.Module):
    """Stands in for a frozen backbone: the cached features already are its output."""

    out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def synthetic_features(n: int, dim: int, views: int, classes: int,
                       seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    base = centres[labels] + 1.6 * rng.normal(size=(n, dim)).astype(np.float32)
    stack = [base] + [base + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
                      for _ in range(views)]
    return torch.from_numpy(np.stack(stack)), labels


def run_once(features: torch.Tensor, labels: np.ndarray, neighbors: torch.Tensor,
             device: torch.device, scan_epochs: int, selflabel_epochs: int,
             seed: int) -> dict[str, float]:
    cfg = load_config("imagenet_50", ["device=cpu", "model.num_clusters=10",
                                      f"scan.epochs={scan_epochs}",
                                      f"selflabel.epochs={selflabel_epochs}", "progress=false"])
    torch.manual_seed(seed)
    model = ClusterModel(Frozen(), 10, cfg.scan.num_heads).to(device)
    store = feature_store(4.0, features.shape[0] - 1, features.shape[1], features.shape[2], device)
    path = FeaturePath(features.to(*store), torch.from_numpy(labels).to(store[0]), device)
    sc, sl, n = cfg.scan, cfg.selflabel, len(labels)
    views = {"anchor": sc.augment, "neighbor": sc.augment}
    augment = path.augment(None, views, neighbors.numpy())
    loop = ScanLoop("scan", cfg, None, model, scan_body(Heads(model), augment, sc.entropy_weight,
                                                        device, False),
                    path, augment, n, device, val=lambda: None, val_neighbors=None, clusters=10)
    sync(device)
    start = time.perf_counter()
    for epoch in range(scan_epochs):
        batches = path.batches(augment, sc.batch_size, shuffle=True,
                               seed=derive_seed(seed, "scan", epoch), train=True)
        train_one_epoch(loop, batches, "scan")
    with torch.no_grad():
        logits = model.forward_heads(path.features[0].float())
    loss = heldout_scan_loss(logits.cpu(), neighbors.numpy(), sc.entropy_weight)
    best = int(loss.argmin())
    sync(device)
    scan_seconds = time.perf_counter() - start
    scan_acc = cluster_metrics(logits[best].argmax(1).cpu().numpy(), labels, 10, 10)["acc"]

    model.keep_head(best)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(sl.ema), use_buffers=True)
    augment = path.augment(None, {"weak": "eval", "strong": sl.augment})
    loop = SelfLabelLoop("selflabel", cfg, None, model,
                         selflabel_body(Heads(model), augment, sl.threshold, sl.class_balance,
                                        device, False),
                         path, augment, device=device, ema=ema, samples=n)
    start = time.perf_counter()
    for epoch in range(selflabel_epochs):
        batches = path.batches(augment, sl.batch_size, shuffle=True,
                               seed=derive_seed(seed, "selflabel", epoch), train=True)
        train_one_epoch(loop, batches, "selflabel")
    sync(device)
    selflabel_seconds = time.perf_counter() - start
    with torch.no_grad():
        final = ema.module.forward_heads(path.features[0].float())[0].argmax(1).cpu().numpy()
    return {"scan_s": scan_seconds, "selflabel_s": selflabel_seconds,
            "total_s": scan_seconds + selflabel_seconds, "scan_acc": scan_acc,
            "selflabel_acc": cluster_metrics(final, labels, 10, 10)["acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--views", type=int, default=5, help="augmented views cached")
    parser.add_argument("--scan-epochs", type=int, default=100)
    parser.add_argument("--selflabel-epochs", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    features, labels = synthetic_features(args.n, 512, args.views, 10, seed=0)
    start = time.perf_counter()
    neighbors = mine_neighbors(features[0].float(), 20, "auto", 4096, device)
    mine_seconds = time.perf_counter() - start
    runs = [run_once(features, labels, neighbors, device, args.scan_epochs,
                     args.selflabel_epochs, seed) for seed in range(args.repeats)]
    summary = {k: {"mean": statistics.mean(r[k] for r in runs),
                   "std": statistics.pstdev(r[k] for r in runs)} for k in runs[0]}
    for key, value in summary.items():
        print(f"{key:14s} {value['mean']:8.3f} ± {value['std']:.3f}")
    print(json.dumps({"benchmark": "cached_heads", **machine(), "n": args.n, "dim": 512,
                      "views": args.views, "scan_epochs": args.scan_epochs,
                      "selflabel_epochs": args.selflabel_epochs, "mine_s": mine_seconds,
                      "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
