"""Images per second of the pretext, SCAN and self-label training steps: our variants against a
straightforward implementation, in the same run, on the same device; and what each step costs
the host (operators dispatched, kernel launches) and how busy it keeps the GPU.

    baseline  torchvision PIL transforms in DataLoader workers, fp32, NCHW, default optimizer
    eager     data set on the device, batched per-sample augmentation, bf16 autocast (CUDA),
              channels_last, fused optimizer (CUDA), every kernel launched from Python
    graphs    as eager, with each step (augmentation, forward, loss, backward) replayed as one
              CUDA graph (``perf.cuda_graphs``); the package's default
    graphs-nchw      graphs with NCHW activations (cuDNN's batch norm)
    graphs-compile   graphs around a torch.compile'd model (``perf.compile=model``: inductor
                     fuses batch norm + ReLU and the elementwise ops around the convolutions)
    graphs-compile-nchw   the same with NCHW activations
    graphs-compile-step   graphs around the torch.compile'd step body (``perf.compile=step``:
                     augmentation, forward, loss and backward compiled, then captured)

All run the package's own step bodies and ``train_one_epoch`` loops on the same CIFAR-10 images,
decoded once into memory. Each measurement skips warm-up steps (graph capture, compilation,
cuDNN autotuning), then times ``--steps`` steps; ``--repeats`` alternates the variants and
reports mean and std. ``--profile`` then runs torch.profiler over a few steps of each stage:
aten operators dispatched per step, and those of them that compute (leaf operators other than
views and allocations: what launches a kernel on a GPU), on any device, so the host overhead
can be driven down on a CPU; on CUDA also the launch calls the host makes per step (one graph
launch plus the optimizer with CUDA graphs) and GPU busy = kernel time / wall time. Prints a
``--profile`` also lists the ten kernels (on a CPU: leaf operators) that take the most time,
with their share of the step, for each of ``--profile-variants`` (before and after, side by
side). Beside each throughput figure: the model's FLOP/s (convolutions and matrix products of
one step, forward and backward, counted by ``torch.utils.flop_counter``) and its share of
``--peak-tflops`` (790: an H200's bf16 rate measured on large matrix products). Prints a
table and one JSON line; ``--json`` also writes it to a file.

    python benchmarks/throughput.py --repeats 2 --profile        # GPU: ResNet-18, paper batches
    python benchmarks/throughput.py --quick --profile            # CPU smoke run: tiny net
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (DEFAULT_ARCHIVE, cifar10_jpeg, images_per_second,  # noqa: E402
                               machine, sync, training_steps)
from scanclust.config import Config, load_config  # noqa: E402
from scanclust.runtime import resolve_device  # noqa: E402

# name -> (stage, batch size override)
STEPS = {"pretext": ("pretext", None), "scan": ("scan", None), "scan512": ("scan", 512),
         "selflabel": ("selflabel", None)}
DEVICE_PATH = ["perf.data_path=device", "amp=true", "perf.cudnn_benchmark=true"]
VARIANTS = {
    "baseline": ["perf.data_path=workers", "amp=false", "perf.channels_last=false",
                 "perf.optimizer_impl=auto", "perf.cuda_graphs=false",
                 "perf.cudnn_benchmark=false"],
    "eager": DEVICE_PATH + ["perf.channels_last=true", "perf.cuda_graphs=false"],
    "graphs": DEVICE_PATH + ["perf.channels_last=true", "perf.cuda_graphs=true"],
    "graphs-nchw": DEVICE_PATH + ["perf.channels_last=false", "perf.cuda_graphs=true"],
    "graphs-compile": DEVICE_PATH + ["perf.channels_last=true", "perf.cuda_graphs=true",
                                     "perf.compile=model"],
    "graphs-compile-nchw": DEVICE_PATH + ["perf.channels_last=false", "perf.cuda_graphs=true",
                                          "perf.compile=model"],
    "graphs-compile-step": DEVICE_PATH + ["perf.channels_last=true", "perf.cuda_graphs=true",
                                          "perf.compile=step"],
}
# Leaf operators that only make views or allocate, and so launch no kernel on a GPU.
NO_KERNEL = {f"aten::{n}" for n in (
    "view", "as_strided", "as_strided_", "_reshape_alias", "reshape", "_unsafe_view", "empty",
    "empty_strided", "empty_like", "expand", "unsqueeze", "unsqueeze_", "squeeze", "squeeze_",
    "select", "slice", "narrow", "detach", "detach_", "t", "transpose", "permute", "alias",
    "unbind", "split", "split_with_sizes", "chunk", "lift_fresh", "resolve_conj",
    "resolve_neg", "result_type", "broadcast_tensors", "flatten", "contiguous", "to",
    "_to_copy", "is_nonzero", "_local_scalar_dense", "set_", "resize_")}
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def variant_config(base: list[str], variant: str, step: str, device: torch.device,
                   workers: int) -> Config:
    stage, batch = STEPS[step]
    extra = list(VARIANTS[variant])
    if variant == "baseline":
        extra.append(f"data.num_workers={workers}")
    else:
        extra.append(f"perf.optimizer_impl={'fused' if device.type == 'cuda' else 'auto'}")
    if batch is not None:
        extra.append(f"{stage}.batch_size={batch}")
    return load_config("cifar10", base + extra + [f"device={device}", "progress=false"])


def profile_steps(run, device: torch.device, steps: int) -> dict[str, float]:
    """Operators, launch calls and GPU busy share per step, over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run(steps)
        sync(device)
        wall = time.perf_counter() - start
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    leaves = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    kernels = [e for e in leaves if e.name not in NO_KERNEL]
    launches = [e for e in events if e.name in LAUNCH_CALLS]
    out = {"aten_ops_per_step": len(aten) / steps, "kernel_ops_per_step": len(kernels) / steps,
           "launch_calls_per_step": len(launches) / steps, "wall_ms_per_step": 1e3 * wall / steps}
    if device.type == "cuda":
        timed = [(e.name, e.device_time) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # no kernels: the leaf operators' own time stands in for them
        timed = [(e.name, e.self_cpu_time_total) for e in leaves]
    busy_us = sum(us for _, us in timed)
    if device.type == "cuda":
        out["gpu_ms_per_step"] = busy_us / 1e3 / steps
        out["gpu_busy"] = busy_us / 1e6 / wall
    out["top_kernels"] = top_kernels(timed, steps, busy_us)
    return out


def top_kernels(timed: list[tuple[str, float]], steps: int, total_us: float,
                count: int = 10) -> list[dict]:
    """The ``count`` names with the most time (microseconds summed over ``steps``): ms per step
    and share of all kernel time."""
    by_name: dict[str, float] = {}
    for name, us in timed:
        by_name[name] = by_name.get(name, 0.0) + us
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:count]
    return [{"kernel": name[:120], "ms_per_step": us / 1e3 / steps,
             "share": us / max(total_us, 1e-9)} for name, us in ranked]


def model_flops_per_image(stage: str, cfg: Config, dataset, neighbors: np.ndarray,
                          device: torch.device) -> float:
    """FLOP of one training image of ``stage``: one eager step (every view, forward and
    backward) counted by torch's FlopCounterMode, divided by the batch size. Counts the
    convolutions and matrix products, which is what a chip's rated FLOP/s is about."""
    from torch.utils.flop_counter import FlopCounterMode

    eager = load_config(cfg, {"perf.cuda_graphs": False, "perf.compile": False})
    run = training_steps(stage, eager, dataset, neighbors, device)
    counter = FlopCounterMode(display=False)
    with counter:
        run(1)
    return counter.get_total_flops() / getattr(eager, stage).batch_size


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE,
                        help="cifar10-jpeg.tar.gz or its extracted folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, help="timed steps (default 30; 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 8; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the baseline")
    parser.add_argument("--quick", action="store_true",
                        help="CPU run: tiny ResNet (width 16), batches of 64")
    parser.add_argument("--only", choices=list(STEPS), nargs="*", default=list(STEPS))
    parser.add_argument("--variants", choices=list(VARIANTS), nargs="*",
                        default=["baseline", "eager", "graphs", "graphs-nchw"],
                        help="variants to time (none: only --profile / --check)")
    parser.add_argument("--profile", action="store_true",
                        help="profile each step of --profile-variant after the timings")
    parser.add_argument("--profile-variants", nargs="*", default=["graphs"],
                        choices=list(VARIANTS), help="variants to profile, side by side")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="the chip's rate the model FLOP/s are shown against")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--check", action="store_true",
                        help="compare the mean loss of eager and graph steps from one seed")
    parser.add_argument("--json", type=Path, help="also write the JSON record here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    base = []
    if args.quick:
        base = ["model.backbone=resnet_tiny", "model.width=16", "pretext.batch_size=64",
                "scan.batch_size=64", "selflabel.batch_size=64"]
    args.steps = args.steps or (5 if args.quick else 30)
    args.warmup = args.warmup or (4 if args.quick else 8)
    largest = 64 if args.quick else 1000
    limit = largest * (args.steps + args.warmup + args.profile_steps) + largest
    dataset = cifar10_jpeg(args.data, "train", limit=min(limit, 50_000))
    neighbors = np.random.default_rng(0).integers(0, len(dataset), size=(len(dataset), 20))

    results: dict[str, dict] = {}
    record = {"benchmark": "throughput", **machine(), "quick": args.quick,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "images": len(dataset), "variants": {v: VARIANTS[v] for v in args.variants},
              "peak_tflops": args.peak_tflops, "results": results}

    def save() -> None:
        """Written after every measurement, so a run cut off by a time limit keeps its figures."""
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1) + "\n")

    for step in args.only:
        results[step] = {}
        if not args.variants:
            continue
        stage, _ = STEPS[step]
        flops = model_flops_per_image(stage, variant_config(base, "eager", step, device,
                                                            args.workers),
                                      dataset, neighbors, device)
        release(device)
        runs: dict[str, list[float]] = {v: [] for v in args.variants}
        modes: dict[str, str] = {}
        batch = 0
        for _ in range(args.repeats):
            for variant in args.variants:
                cfg = variant_config(base, variant, step, device, args.workers)
                batch = getattr(cfg, stage).batch_size
                run = training_steps(stage, cfg, dataset, neighbors, device)
                runs[variant].append(images_per_second(run, batch, device, args.warmup,
                                                       args.steps))
                modes[variant] = run.step.mode
                del run
                release(device)
        stats: dict[str, dict] = {
            v: {"mean": statistics.mean(r), "std": statistics.pstdev(r) if len(r) > 1 else 0.0,
                "runs": r, "step": modes[v]} for v, r in runs.items()}
        for v in stats:
            stats[v]["model_tflops"] = stats[v]["mean"] * flops / 1e12
            stats[v]["share_of_peak"] = stats[v]["model_tflops"] / args.peak_tflops
            if "baseline" in stats:
                stats[v]["vs_baseline"] = stats[v]["mean"] / stats["baseline"]["mean"]
        results[step] = {"batch_size": batch, "gflop_per_image": flops / 1e9, "variants": stats}
        print(f"{step:10s} batch {batch:4d}, {flops / 1e9:.2f} GFLOP per image", flush=True)
        for v, s in stats.items():
            print(f"    {v:20s} {s['mean']:9.0f} ± {s['std']:6.0f} img/s"
                  + (f" ({s['vs_baseline']:.2f}x)" if "vs_baseline" in s else "")
                  + f"   {s['model_tflops']:7.2f} TFLOP/s = {100 * s['share_of_peak']:.1f} % "
                  f"of {args.peak_tflops:g}   ({s['step']})", flush=True)
        save()

    if args.profile:
        for step in args.only:
            stage, _ = STEPS[step]
            profiles = results[step].setdefault("profiles", {})
            for variant in args.profile_variants:
                cfg = variant_config(base, variant, step, device, args.workers)
                run = training_steps(stage, cfg, dataset, neighbors, device)
                run(args.warmup)
                figures = profile_steps(run, device, args.profile_steps)
                figures["step"] = run.step.mode
                profiles[variant] = figures
                print(f"{step:10s} profile ({variant}, {run.step.mode}): "
                      + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()
                                  if isinstance(v, float)), flush=True)
                for row in figures["top_kernels"]:
                    print(f"    {100 * row['share']:5.1f} %  {row['ms_per_step']:8.3f} ms  "
                          f"{row['kernel'][:90]}", flush=True)
                save()
                del run
                release(device)

    if args.check:
        for step in args.only:
            stage, _ = STEPS[step]
            losses = {}
            for variant in ("eager", "graphs"):
                cfg = variant_config(base, variant, step, device, args.workers)
                run = training_steps(stage, cfg, dataset, neighbors, device)
                run(args.warmup)
                losses[variant] = run(args.steps)["loss"]
                losses[variant + "_step"] = run.step.mode
                del run
                release(device)
            results[step]["check"] = losses
            print(f"{step:10s} mean loss over {args.steps} steps after {args.warmup}: "
                  f"eager {losses['eager']:.5f}, graphs {losses['graphs']:.5f} "
                  f"({losses['graphs_step']})", flush=True)
            save()

    save()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
