"""Exact K-nearest-neighbour mining: chunked matmul top-k (torch, any device) against faiss's
flat inner-product index (CPU), on the same features, timed in the same run.

``mine.backend=auto`` takes torch on a GPU and faiss on the CPU when it is installed; this
script is the measurement behind that choice. Features are random unit vectors (exact search
costs the same whatever the values). Prints mean ± std seconds over --repeats and one JSON line.

    python benchmarks/mining.py                      # 50,000 x 128, K = 20, CPU (+ GPU if any)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, sync  # noqa: E402
from scanclust.knn import faiss_available, knn, knn_faiss  # noqa: E402


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    features = torch.nn.functional.normalize(torch.randn(args.n, args.dim), dim=1)
    cpu = torch.device("cpu")
    results = {"torch_cpu": timed(lambda: knn(features, args.k, args.chunk_size, cpu), cpu,
                                  args.repeats)}
    if faiss_available():
        results["faiss_cpu"] = timed(lambda: knn_faiss(features, args.k), cpu, args.repeats)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        knn(features, args.k, args.chunk_size, gpu)  # warm-up: CUDA context, kernels
        results["torch_cuda"] = timed(lambda: knn(features, args.k, args.chunk_size, gpu), gpu,
                                      args.repeats)
    summary = {name: {"mean": statistics.mean(t), "std": statistics.pstdev(t)}
               for name, t in results.items()}
    base = summary["torch_cpu"]["mean"]
    for name, s in summary.items():
        print(f"{name:11s} {s['mean']:8.2f} ± {s['std']:.2f} s   speed vs torch_cpu "
              f"{base / s['mean']:.2f}x")
    print(json.dumps({"benchmark": "mining", **machine(), "n": args.n, "dim": args.dim,
                      "k": args.k, "summary": summary, "runs": results}))


if __name__ == "__main__":
    main()
