"""Stage 2, mine: each image's K nearest other images in the pretext feature space.

Similarities are computed one ``chunk_size x chunk_size`` block at a time, keeping a running
top-K per row, so memory is bounded and never ``N x N`` (1.28M ImageNet images would need
6.5 TB for the full matrix).

Under torchrun each process embeds its shard of the images; the features are gathered in every
process, each finds the neighbours of its shard of the queries, and those are gathered again.
Per process that holds the N x D features twice (the gathered copy and a normalised one on the
device), one block, and the N x K results: for ImageNet's 1.28M x 128 features with K = 20,
0.66 GB + 0.66 GB + 64 MB + 0.3 GB (``benchmarks/mining_scale.py`` measures it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scanclust import distributed
from scanclust.checkpoint import load_checkpoint, load_state
from scanclust.config import Config, ConfigError
from scanclust.data import ImageDataset, build_dataset
from scanclust.data.paths import DataPath, data_path_for, to_device
from scanclust.health import check_finite_array
from scanclust.preflight import check_topk
from scanclust.pretext import build_contrastive_model
from scanclust.rundir import exclusive, write_json
from scanclust.runtime import autocast, channels_last, resolve_device
from scanclust.training import log, prepare_model, progress, begin_stage

STAGE = "mine"
PURITY_KS = (1, 5, 20)


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], data: DataPath,
                     dataset: ImageDataset, batch_size: int, device: torch.device, amp: bool,
                     channels_last: bool, show: bool, desc: str = "features") -> torch.Tensor:
    """``encode`` applied to the eval view of every image, in data set order, float32 on CPU
    (under torchrun each process encodes its shard and all receive every row)."""
    batches = data.views(dataset, {"image": "eval"}, batch_size, shuffle=False, seed=0,
                         train=False, shard=True)
    chunks = []
    for batch in progress(batches, show, desc):
        images = to_device(batch, device, channels_last)["image"]
        with autocast(device, amp):
            chunks.append(encode(images).float().cpu())
    return distributed.gather_rows(torch.cat(chunks), len(dataset))


@torch.no_grad()
def knn(features: torch.Tensor, k: int, chunk_size: int = 4096,
        device: torch.device | str = "cpu",
        queries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine neighbours of every row (or of the rows ``queries``) among the
    other rows.

    Returns ``(indices [Q, k] int64, similarities [Q, k])``, most similar first. Works on
    ``chunk_size x chunk_size`` blocks of the similarity matrix, merging each block's top-k
    into a running top-k, so memory stays bounded whatever N. The row itself is excluded by
    position, not by value, so duplicate images still find each other.
    """
    n = len(features)
    if k >= n:
        raise ValueError(f"cannot find {k} neighbours among {n} samples")
    feats = F.normalize(features.float(), dim=1).to(device)
    query_rows = (torch.arange(n) if queries is None else queries).to(feats.device)
    indices = torch.empty(len(query_rows), k, dtype=torch.long)
    sims = torch.empty(len(query_rows), k)
    for q0 in range(0, len(query_rows), chunk_size):
        positions = query_rows[q0:q0 + chunk_size]
        queries_block = feats[positions]
        rows = torch.arange(len(positions), device=feats.device)
        best_sims = torch.full((len(positions), 0), float("-inf"), device=feats.device)
        best_idx = torch.empty((len(positions), 0), dtype=torch.long, device=feats.device)
        for d0 in range(0, n, chunk_size):
            block = queries_block @ feats[d0:d0 + chunk_size].T
            own = positions - d0  # column of each query's own row inside this block
            inside = (own >= 0) & (own < block.shape[1])
            block[rows[inside], own[inside]] = float("-inf")
            top_sims, top_idx = block.topk(min(k, block.shape[1]), dim=1)
            best_sims = torch.cat([best_sims, top_sims], dim=1)
            best_idx = torch.cat([best_idx, top_idx + d0], dim=1)
            if best_sims.shape[1] > k:
                best_sims, order = best_sims.topk(k, dim=1)
                best_idx = best_idx.gather(1, order)
        best_sims, order = best_sims.topk(k, dim=1)
        indices[q0:q0 + len(positions)] = best_idx.gather(1, order).cpu()
        sims[q0:q0 + len(positions)] = best_sims.cpu()
    return indices, sims


def knn_faiss(features: torch.Tensor, k: int, queries: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine neighbours with faiss's flat inner-product index: on the GPU of
    ``device`` with a faiss built for GPUs (faiss-gpu), else on the CPU.

    Same contract as ``knn``. faiss returns each row among its own results; it is removed by
    position, and where k + 1 exact duplicates push it out, the last result is dropped instead.
    """
    import faiss

    n = len(features)
    if k >= n:
        raise ValueError(f"cannot find {k} neighbours among {n} samples")
    feats = F.normalize(features.float(), dim=1).numpy()
    index = faiss.IndexFlatIP(feats.shape[1])
    device = torch.device(device)
    if device.type == "cuda" and faiss_gpus() > 0:
        resources = faiss.StandardGpuResources()  # must outlive the search below
        index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
    index.add(feats)
    rows = np.arange(n) if queries is None else queries.numpy()
    sims, idx = index.search(feats[rows], k + 1)
    own = idx == rows[:, None]
    own[~own.any(1), k] = True
    keep = ~own
    return (torch.from_numpy(idx[keep].reshape(len(rows), k)).long(),
            torch.from_numpy(sims[keep].reshape(len(rows), k)))


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpus() -> int:
    """GPUs a GPU build of faiss sees (0 for faiss-cpu or without faiss)."""
    if not faiss_available():
        return 0
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def mine_neighbors(features: torch.Tensor, k: int, backend: str, chunk_size: int,
                   device: torch.device) -> torch.Tensor:
    """Top-k neighbour indices with the configured backend.

    ``auto`` takes faiss where it runs on the device (faiss-gpu on a GPU, faiss on the CPU), the
    chunked matmul otherwise: the faster on each (``benchmarks/mining.py`` times them). Under
    torchrun each process searches for its shard of the queries, and all receive every row.
    """
    if backend == "auto":
        on_device = faiss_gpus() > 0 if device.type == "cuda" else device.type == "cpu"
        backend = "faiss" if on_device and faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise ConfigError("config key 'mine.backend': faiss is not installed "
                          "(pip install 'scanclust[fast]'), use torch or auto")
    queries = distributed.shard_indices(len(features))
    if backend == "faiss":
        found = knn_faiss(features, k, queries, device)[0]
    else:
        found = knn(features, k, chunk_size, device, queries)[0]
    return distributed.gather_rows(found, len(features))


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


@exclusive
def mine(config: Config | str | Path | dict | None = None, out: str | Path = "runs/default", *,
         overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
         force: bool = False) -> dict[str, Any]:
    """Extract features of the train and val splits, mine neighbours, report purity."""
    cfg, run, status = begin_stage(STAGE, config, out, overrides, resume, force, needs="pretext")
    if status == "done":
        return run.summary(STAGE)
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    state = load_checkpoint(run.checkpoint("pretext"), "pretext")
    model = build_contrastive_model(cfg)
    load_state(model, state["model"], run.checkpoint("pretext"))
    prepare_model(model, cfg, device)
    model.eval()
    encode = _encoder(model, cfg.mine.features, state.get("has_head", True))
    mc = cfg.mine

    summary: dict[str, Any] = {"topk": mc.topk, "features": mc.features}
    for split in ("train", "val"):
        dataset = build_dataset(cfg.data, split)
        k = mc.topk
        if k >= len(dataset):
            if split == "train":
                check_topk(cfg, len(dataset))
            k = len(dataset) - 1  # val neighbours only feed the held-out SCAN loss
            if k < 1:
                continue
        feats = extract_features(encode, data_path_for(cfg, device, dataset), dataset,
                                 mc.batch_size, device, cfg.amp, channels_last(cfg, device, False),
                                 cfg.progress, f"features {split}")
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
