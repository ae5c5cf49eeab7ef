"""Device choice, mixed precision and random state: the parts of a run that are not the method."""

from __future__ import annotations

import contextlib
import random
import zlib
from typing import Any

import numpy as np
import torch

from scanclust import distributed
from scanclust.config import Config, ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error.
    Under torchrun with several processes, ``cuda`` means this process's ``cuda:LOCAL_RANK``."""
    return distributed.local_device(_device(name))


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name} but no CUDA device is available; "
                          "use device=cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"config key 'device': {name} but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
                          f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"config key 'device': {name} but MPS is not available; "
                          "use device=cpu or auto")
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); full precision elsewhere.

    The cache of cast weights is off: CUDA graph capture requires it, and each step casts the
    weights once anyway (the views of a step share one forward pass).
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 31-bit seed for (seed, stage, epoch, ...), the same in every process."""
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return zlib.crc32(key) & 0x7FFFFFFF


def process_seed(seed: int) -> int:
    """``seed`` for the main process, a seed derived from it and the rank for the others: the
    processes of one run draw different augmentations, each reproducibly."""
    return seed if distributed.rank() == 0 else derive_seed(seed, "rank", distributed.rank())


def seed_all(seed: int) -> None:
    """Seed every generator a stage draws from (``process_seed``: per process).

    Stages reseed at the start of every epoch from (seed, stage, epoch), so a resumed run draws
    the same augmentations and batches as an uninterrupted one.
    """
    seed = process_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors and plain lists, so a checkpoint loads with ``weights_only=True``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    random.setstate((state["python"]["version"], tuple(state["python"]["state"]),
                     state["python"]["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def channels_last_fault() -> float:
    """Largest relative error of the weight gradient of a channels-last (NHWC) 1x1 stride-2
    convolution on this CPU, against the same gradient in float64 (which oneDNN does not
    compute), over a few small shapes; about 1e-7 where the kernels are right.

    On some CPUs (an AVX2-only AMD EPYC with torch 2.14; reproducible on any x86-64 CPU with
    ``ONEDNN_MAX_CPU_ISA=AVX2``) oneDNN's NHWC kernel for this layer gets the weight gradient
    wrong at small channel counts, erratically: a relative error of 0.2-0.8 on some of these
    shapes and not others, where NCHW gives 1e-7. The forward pass is right, so nothing fails;
    training silently follows a wrong gradient. The sixteen shapes take about 20 ms; the
    batches are even, since odd ones crash the process on other CPUs (``channels_last``).
    """
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in (6, 12):
        for channels in (3, 4, 8, 16):
            for side in (8, 16):
                x = torch.randn(batch, channels, side, side, generator=generator)
                weight = torch.randn(2 * channels, channels, 1, 1, generator=generator)
                grad_out = torch.randn(batch, 2 * channels, side // 2, side // 2,
                                       generator=generator)
                reference = _weight_grad(x.double(), weight.double(), grad_out.double())
                nhwc = _weight_grad(x.contiguous(memory_format=torch.channels_last),
                                    weight.contiguous(memory_format=torch.channels_last),
                                    grad_out)
                worst = max(worst, float((nhwc - reference).norm() / reference.norm()))
    return worst


def _weight_grad(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    weight = weight.clone().requires_grad_(True)
    torch.nn.functional.conv2d(x, weight, stride=2).backward(grad_out)
    return weight.grad.double()


def channels_last(cfg: Config, device: torch.device, training: bool) -> bool:
    """Whether to run NHWC activations (``perf.channels_last``) on ``device``.

    On a GPU, as the setting says. On a CPU only for inference (mining, cached features,
    evaluation, prediction): oneDNN's NHWC backward pass of a 1x1 stride-2 convolution (the
    ResNet downsample) is wrong on some CPUs (``channels_last_fault``) and writes out of
    bounds at odd batch sizes on others (heap corruption, a crash), while its forward pass is
    right everywhere it was checked. So CPU training runs NCHW, which costs 1.3-1.7x in
    training speed there (``benchmarks/cpu_layout.py``), and CPU inference keeps NHWC's
    1.3-1.7x.
    """
    return cfg.perf.channels_last and (device.type != "cpu" or not training)
