"""Exact k-nearest-neighbour search by cosine similarity: chunked matmul on any device, or
faiss's flat index where it is installed.

Similarities are computed one ``chunk_size x chunk_size`` block at a time, keeping a running
top-K per row, so memory is bounded and never ``N x N`` (1.28M ImageNet images would need
6.5 TB for the full matrix).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scanclust import distributed
from scanclust.config import ConfigError


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

