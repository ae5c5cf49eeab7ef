"""Exact kNN mining at ImageNet scale: seconds and peak memory of one process's share.

Under torchrun each of W processes holds all N features and searches the neighbours of its
N / W queries (``scanclust.mine.mine_neighbors``). This script does what process 0 does, on
random unit vectors (exact search costs the same whatever the values), and prints the measured
peak device memory next to the bound the code is written to keep:

    gathered features (host)  N x D x 4 bytes
    normalised copy (device)  N x D x 4
    one similarity block      chunk^2 x 4, plus the running top-k of the chunk's queries
    results (host)            N / W x K x 12 (int64 indices, float32 similarities)

    python benchmarks/mining_scale.py                         # 1.28M x 128, K = 20, W = 1
    python benchmarks/mining_scale.py --world 8               # one process of eight
    python benchmarks/mining_scale.py --n 50000 --device cpu  # a CPU-sized run

faiss-gpu, where installed, is timed too (``mine.backend=auto`` takes it on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, sync  # noqa: E402
from scanclust.knn import faiss_gpus, knn, knn_faiss  # noqa: E402

GB = 1e9


def bound_bytes(n: int, dim: int, k: int, chunk: int, world: int) -> dict[str, float]:
    queries = -(-n // world)
    return {"features_host": n * dim * 4, "features_device": n * dim * 4,
            "block": chunk * chunk * 4 + chunk * 2 * k * 12, "results_host": queries * k * 12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--world", type=int, default=1, help="processes sharing the queries")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    features = torch.nn.functional.normalize(torch.randn(args.n, args.dim), dim=1)
    queries = torch.arange(-(-args.n // args.world))  # process 0's shard
    bound = bound_bytes(args.n, args.dim, args.k, args.chunk_size, args.world)
    results: dict[str, dict[str, float]] = {}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    knn(features, args.k, args.chunk_size, device, queries)
    sync(device)
    torch_run = {"seconds": time.perf_counter() - start}
    if device.type == "cuda":
        torch_run["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / GB
    results["torch"] = torch_run
    if device.type == "cuda" and faiss_gpus() > 0:
        start = time.perf_counter()
        knn_faiss(features, args.k, queries, device)
        results["faiss_gpu"] = {"seconds": time.perf_counter() - start}
    peak_host_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB

    print(f"{args.n:,} x {args.dim} features, K = {args.k}, queries of 1 process of "
          f"{args.world} ({len(queries):,}), chunk {args.chunk_size}, on {device}")
    for name, r in results.items():
        peak = f", peak device memory {r['peak_device_gb']:.2f} GB" if "peak_device_gb" in r else ""
        print(f"  {name:9s} {r['seconds']:8.1f} s{peak}")
    print(f"  peak host memory (whole process, incl. torch) {peak_host_gb:.2f} GB")
    print("  bound: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in bound.items()))
    print(json.dumps({"benchmark": "mining_scale", **machine(), "params": vars(args),
                      "results": results, "peak_host_gb": peak_host_gb,
                      "bound_gb": {k: v / GB for k, v in bound.items()}}))


if __name__ == "__main__":
    main()
