"""One training step, run eagerly or replayed as a CUDA graph.

A step of the three training stages is a few thousand small kernels: each view of a batch is
augmented per sample (crops, jitter, fourteen strong ops with per-sample masks), then a ResNet
forward and backward. Launched one at a time from Python, the host spends longer issuing them
than an H100 spends running them (measured: 566 ms of host time for 87 ms of GPU time over ten
SCAN steps at batch 128). Captured once as a CUDA graph, the whole step (augmentation, forward,
loss, backward) becomes one launch; only the optimizer step, a handful of fused kernels, and
the schedule stay eager, so the learning rate is never baked into the graph.

A ``body(batch) -> stats`` must:

- read only tensors of ``batch`` and state that lives as long as the step (model, data set on
  the device), and compute the loss's gradients (``backward``) without touching the optimizer;
- draw random numbers from the device's default generator (graph replays advance it like eager
  steps do, and the stages reseed it every epoch);
- not synchronise with the host (no ``.item()``, no data-dependent shapes);
- return detached tensors (statistics), which the next step overwrites in graph mode, so the
  caller consumes them (accumulates them on the device) before the next call.

On a CPU, or with ``perf.cuda_graphs=false``, the body simply runs each step: the graph changes
when kernels are launched, not what they compute. So it does with several processes (torchrun):
DistributedDataParallel's gradient all-reduce is not captured.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from scanclust import distributed

Batch = dict[str, torch.Tensor]
log = logging.getLogger("scanclust")


class TrainStep:
    """Call ``body`` on each batch, eagerly or through a CUDA graph captured after ``warmup``
    eager steps (cuDNN autotuning and lazy initialisation happen there, outside the graph).

    Gradients: an eager step starts from ``grad = None`` (backward allocates them); a captured
    graph allocates them once in its private memory and every replay overwrites them, so the
    optimizer, which runs after each call, always sees this step's gradients alone.
    """

    def __init__(self, body: Callable[[Batch], Batch], parameters: Iterable[nn.Parameter],
                 device: torch.device, graph: bool, warmup: int = 3) -> None:
        self.body = body
        self.parameters = [p for p in parameters if p.requires_grad]
        self.use_graph = graph and device.type == "cuda" and not distributed.active()
        self.device = device
        self.warmup = warmup
        self.calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: Batch = {}
        self._outputs: Batch = {}

    @property
    def mode(self) -> str:
        return "cuda_graph" if self._graph is not None else "eager"

    def _clear_grads(self) -> None:
        for p in self.parameters:
            p.grad = None

    def __call__(self, batch: Batch) -> Batch:
        self.calls += 1
        if not self.use_graph:
            self._clear_grads()
            return self.body(batch)
        if self._graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(batch)
        if self._graph is None and not self._capture(batch):
            return self(batch)
        for key, value in batch.items():
            self._inputs[key].copy_(value, non_blocking=True)
        self._graph.replay()
        return self._outputs

    def _eager_on_side_stream(self, batch: Batch) -> Batch:
        # Warm-up before a capture runs on a side stream, as torch.cuda.graph requires.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._clear_grads()
            out = self.body(batch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, batch: Batch) -> bool:
        """Capture the body on static copies of ``batch``; on failure fall back to eager steps
        (logged), since a slower run beats a failed one."""
        self._inputs = {k: v.to(self.device, copy=True) for k, v in batch.items()}
        self._clear_grads()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: DataLoader threads (pinning memory) may use CUDA meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._outputs = self.body(self._inputs)
        except RuntimeError as err:
            log.warning("CUDA graph capture failed (%s); running the training step eagerly",
                        str(err).splitlines()[0])
            self.use_graph = False
            self._inputs, self._outputs = {}, {}
            self._clear_grads()
            return False
        self._graph = graph
        return True
