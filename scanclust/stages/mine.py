"""Stage 2, mine: each image's K nearest other images in the pretext feature space (``knn.py``
searches), and, where labels exist, how often they share its class (purity).

Under torchrun each process embeds its shard of the images; the features are gathered in every
process, each finds the neighbours of its shard of the queries, and those are gathered again.
Per process that holds the N x D features twice (the gathered copy and a normalised one on the
device), one block, and the N x K results: for ImageNet's 1.28M x 128 features with K = 20,
0.66 GB + 0.66 GB + 64 MB + 0.3 GB (``benchmarks/mining_scale.py`` measures it).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scanclust.checkpoint import load_checkpoint, load_state
from scanclust.config import Config
from scanclust.data import ImageDataset, build_dataset
from scanclust.data.pipelines import DataPath, data_path_for
from scanclust import frozen_features
from scanclust.engine import eval_features, infer, log, prepare_model, stage
from scanclust.rundir import RunDir
from scanclust.health import check_finite_array
from scanclust.knn import mine_neighbors
from scanclust.models import build_contrastive_model
from scanclust.preflight import check_topk
from scanclust.files import write_json

STAGE = "mine"
PURITY_KS = (1, 5, 20)


def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], data: DataPath,
                     dataset: ImageDataset, batch_size: int, device: torch.device, amp: bool,
                     show: bool, desc: str = "features") -> torch.Tensor:
    """``encode`` applied to the eval view of every image, in data set order, float32 on CPU."""
    return infer(encode, data, dataset, batch_size, device, amp, show, desc)[0]


def neighbor_purity(neighbors: np.ndarray, targets: np.ndarray,
                    ks: tuple[int, ...] = PURITY_KS) -> dict[str, float]:
    """Share of the first k neighbours with the anchor's class, for each k available."""
    result = {}
    for k in ks:
        if k <= neighbors.shape[1]:
            same = targets[neighbors[:, :k]] == targets[:, None]
            result[f"purity@{k}"] = float(same.mean())
    return result


def _encoder(model: nn.Module, features: str, has_head: bool) -> Callable:
    if features == "head" and has_head:
        return model
    return lambda x: F.normalize(model.backbone(x), dim=1)


@stage(STAGE, needs="pretext")
def mine(cfg: Config, run: RunDir, status: str, device: torch.device) -> dict[str, Any]:
    """Extract features of the train and val splits, mine neighbours, report purity."""
    start = time.perf_counter()
    state = load_checkpoint(run.checkpoint("pretext"), "pretext")
    model = build_contrastive_model(cfg)
    load_state(model, state["model"], run.checkpoint("pretext"))
    prepare_model(model, cfg, device)
    model.eval()
    has_head = state.get("has_head", True)
    encode = _encoder(model, cfg.mine.features, has_head)
    mc = cfg.mine

    summary: dict[str, Any] = {"topk": mc.topk, "features": mc.features}
    done: tuple[list, torch.Tensor] | None = None  # the train split's paths and features
    for split in ("train", "val"):
        dataset = build_dataset(cfg.data, split)
        k = mc.topk
        if k >= len(dataset):
            if split == "train":
                check_topk(cfg, len(dataset))
            k = len(dataset) - 1  # val neighbours only feed the held-out SCAN loss
            if k < 1:
                continue
        paths = getattr(dataset, "paths", None)
        if done is not None and paths is not None and paths == done[0]:
            feats = done[1]  # a folder without data.val_root: val is the train images again
        elif frozen_features.active() and not (mc.features == "head" and has_head):
            feats = F.normalize(eval_features(model.backbone, data_path_for(cfg, device, dataset),
                                              dataset, mc.batch_size, device, cfg.amp,
                                              cfg.progress, f"features {split}"), dim=1)
        else:
            feats = extract_features(encode, data_path_for(cfg, device, dataset), dataset,
                                     mc.batch_size, device, cfg.amp, cfg.progress,
                                     f"features {split}")
        if split == "train":
            done = (paths, feats)
        stored = feats.numpy().astype(np.float16)  # float16 overflows above 65504
        check_finite_array(stored, "the pretext features", STAGE, cfg)
        neighbors = mine_neighbors(feats, k, mc.backend, mc.chunk_size, device).numpy()
        run.save_array(run.neighbors(split), neighbors)
        run.save_array(run.features(split), stored)
        run.save_array(run.stage_dir(STAGE) / f"targets_{split}.npy", dataset.targets)
        if dataset.has_labels:
            purity = neighbor_purity(neighbors, dataset.targets)
            summary[f"purity_{split}"] = purity
            log.info("mine %s: %d images, purity %s", split, len(dataset),
                     ", ".join(f"{k_}={v:.3f}" for k_, v in purity.items()))
    summary["seconds"] = time.perf_counter() - start
    if "purity_train" in summary:
        write_json(run.stage_dir(STAGE) / "purity.json", summary["purity_train"])
    run.log(STAGE, **{k: v for k, v in summary.items() if not isinstance(v, dict)})
    run.finish(STAGE, summary)
    return summary

