"""Several processes, one run: the process group torchrun describes, and the collectives.

``torchrun --nproc_per_node N -m scanclust ...`` starts N copies of one command and tells each
its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Everything that knows about ranks lives in this module. In a single process
every helper is a pass-through, so the stages run the same code with and without torchrun.

What keeps a run the same at any number of processes W:

- The config's batch size is the global batch. Every process draws the same epoch order, takes
  the same global batch at each step and keeps its W-th share of it (``local_batch``); the
  worker path gets the same split from ``DistributedSampler``.
- The losses that look across a batch see the global batch: NT-Xent's negatives (``gather``,
  with gradient), SCAN's cluster marginal (``sum_with_grad``), self-label's confidence counts
  and class weights (``reduce_sum``). DistributedDataParallel averages gradients over the
  processes, and each loss is written so that this average is the gradient of the global batch.
- Inference (features, predictions) runs on equal contiguous shards of a data set
  (``shard_indices``); ``gather_rows`` puts the rows back in data-set order in every process.
- Only the main process (rank 0) writes the run directory: the writing functions of
  ``rundir.py`` and ``checkpoint.py`` ask ``is_main``, and ``on_main`` runs a piece of work there
  alone while the others wait and then receive its result.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import sys
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from scanclust.config import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("scanclust")
T = TypeVar("T")

# The main process alone may work for a long time while the others wait in a collective:
# k-means on ImageNet features in ``evaluate``, or writing a checkpoint to a slow disk. A dead
# process is noticed by torchrun at once; this bound only ends a job that hangs.
TIMEOUT = datetime.timedelta(hours=2)

# torch.distributed.nn.functional (collectives with autograd) is the public API across the
# torch versions this package supports; newer releases announce a private successor.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                        category=FutureWarning)


def _dist() -> ModuleType:
    """torch.distributed, imported on first use: the command line imports this module before it
    knows whether the command needs torch at all (``scanclust --help`` must not wait for it)."""
    import torch.distributed

    return torch.distributed


def _group() -> ModuleType | None:
    """torch.distributed once this process has joined a process group, else None (no group can
    exist before torch is imported, so this never imports it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process belongs to a process group of more than one process."""
    group = _group()
    return group is not None and group.get_world_size() > 1


def world_size() -> int:
    group = _group()
    return group.get_world_size() if group is not None else 1


def rank() -> int:
    """This process's position in the group (0 without one)."""
    group = _group()
    return group.get_rank() if group is not None else 0


def is_main() -> bool:
    """Whether this process writes files. Before the group exists the launcher's ``RANK`` tells,
    so that nothing is written twice even by code that runs before the first stage."""
    group = _group()
    return (group.get_rank() if group is not None else int(os.environ.get("RANK", "0"))) == 0


def restart_count() -> int:
    """How often ``torchrun --max-restarts`` has restarted this job's processes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when a launcher started several."""
    if device.type == "cpu" or not launched():
        return device
    import torch

    if device.type != "cuda":
        raise ConfigError(f"config key 'device': {device} cannot be shared by "
                          f"{os.environ['WORLD_SIZE']} processes; use cuda or cpu")
    if device.index is not None:
        raise ConfigError(f"config key 'device': {device} names one GPU for "
                          f"{os.environ['WORLD_SIZE']} processes; use device=cuda (each process "
                          "takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> None:
    """Join the process group the launcher describes, once per process: NCCL between GPUs,
    gloo between CPU processes. Nothing happens in a single process or when a group exists."""
    if not launched() or _group() is not None:
        return
    import torch

    dist = _dist()
    store, own_rank, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    # torchrun keeps its key-value store across ``--max-restarts``: without a prefix per
    # attempt, the restarted processes would find the dead ones' addresses and fail to connect.
    store = dist.PrefixStore(f"scanclust/attempt_{restart_count()}", store)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=own_rank,
                            world_size=size, timeout=TIMEOUT, **({"device_id": device} if cuda else {}))
    log.info("process %d of %d on %s", rank(), world_size(), device)


def shutdown() -> None:
    group = _group()
    if group is not None:
        group.destroy_process_group()


def barrier() -> None:
    if active():
        _dist().barrier()


def on_main(work: Callable[[], T]) -> T:
    """Run ``work`` in the main process only and hand its result, or its error, to every process.

    The others first wait until every process has arrived (so nobody still reads a file that
    ``work`` replaces), then until the main process is done (so they read only what it wrote).
    """
    if not active():
        return work()
    dist = _dist()
    dist.barrier()
    box: list[Any] = [None]
    error: Exception | None = None
    if is_main():
        try:
            box[0] = ("done", work())
        except Exception as err:  # every process raises it, so the job stops as one
            error = err
            box[0] = ("error", err if _picklable(err) else RuntimeError(f"process 0: {err}"))
    dist.broadcast_object_list(box, src=0)
    outcome, value = box[0]
    if outcome == "error":
        raise error or value
    return value


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def check_batch_size(batch_size: int, key: str) -> None:
    """The global batch must split evenly, or the processes' losses would weigh samples unevenly."""
    if batch_size % world_size():
        raise ConfigError(f"config key '{key}': the global batch of {batch_size} does not split "
                          f"evenly over {world_size()} processes")


def local_batch(batch: torch.Tensor) -> torch.Tensor:
    """This process's share of a global batch of sample indices: the rank-th of W equal slices
    (a batch of a data set smaller than the batch size loses its remainder of < W samples)."""
    size = len(batch) // world_size()
    return batch[rank() * size:(rank() + 1) * size] if active() else batch


def shard_indices(n: int) -> torch.Tensor:
    """This process's contiguous share of ``0..n-1`` for inference: ``ceil(n / W)`` indices in
    every process, the last shard wrapping round to the start so that all are equally long."""
    import torch

    size = -(-n // world_size())
    return torch.arange(rank() * size, (rank() + 1) * size) % n


def _comm_device() -> torch.device:
    """NCCL moves only GPU tensors; gloo moves CPU tensors."""
    import torch

    nccl = _dist().get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every process's shard (``shard_indices``) of per-sample rows, reassembled in data-set
    order and without the padding, in every process, on ``x``'s device."""
    if not active():
        return x[:n]
    import torch

    dist = _dist()
    # One output tensor for all processes' rows (no list of W tensors to concatenate): named
    # all_gather_single since torch 2.12, all_gather_into_tensor before.
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    local = x.to(_comm_device()).contiguous()
    out = torch.empty((world_size() * len(local), *local.shape[1:]), dtype=local.dtype,
                      device=local.device)
    all_gather_single(out, local)
    return out[:n].to(x.device)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated along dim 0 in rank order, differentiable: the
    gradient of each process's loss reaches the process that computed the rows."""
    if not active():
        return x
    import torch.distributed.nn.functional

    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over processes, differentiable (its gradient is summed back too)."""
    if not active():
        return x
    import torch.distributed.nn.functional

    return torch.distributed.nn.functional.all_reduce(x)


def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over processes, as a new tensor without gradient."""
    if not active():
        return x
    total = x.detach().clone()
    _dist().all_reduce(total)
    return total


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over processes (an epoch's mean loss: equal shards weigh equally)."""
    return reduce_sum(x) / world_size() if active() else x


_warned: set[str] = set()


def wrap(module: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """The module as one process of several trains it: under DistributedDataParallel, which
    averages gradients during backward, with SyncBatchNorm (global batch statistics) when asked
    and on CUDA. Returns ``module`` itself in a single process."""
    if not active():
        return module
    from torch import nn

    if sync_batchnorm and device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    elif sync_batchnorm and "sync_batchnorm" not in _warned:
        _warned.add("sync_batchnorm")
        log.warning("sync_batchnorm needs CUDA; on %s each process normalises with the "
                    "statistics of its own share of the batch", device.type)
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def check_resume(state: dict[str, Any], stage: str) -> None:
    """Resuming with another number of processes is allowed, with a warning: the global batch
    and schedule are unchanged, but the augmentations each process draws are not."""
    saved = int(state.get("world_size", 1))
    if saved != world_size():
        log.warning("%s: the checkpoint was written by %d process(es), this run has "
                    "%d; training continues with the same global batch, but the result will "
                    "not equal an uninterrupted run", stage, saved, world_size())
