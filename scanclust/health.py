"""Numerical health: a non-finite loss, weight, feature or prediction stops the run; a collapsed
clustering is reported.

A diverged run (learning rate too high, images too small for the network) otherwise carries NaN
through every later stage and ends in metrics that mean nothing, or in a traceback hours later.
The checks cost one host sync per epoch: the epoch's mean loss is already on the host, and all
weights are reduced to one flag on the device first.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from scanclust.config import Config
from scanclust.errors import UserError

log = logging.getLogger("scanclust")

NEAR_EMPTY = 0.1  # a cluster below this share of an even split counts as (nearly) empty
DOMINANT = 0.9  # one cluster above this share of the data is a collapse


class NumericalError(UserError, FloatingPointError):
    """Training diverged: a loss, weight or output is NaN or infinite."""


def likely_causes(stage: str, cfg: Config) -> str:
    """The settings that usually make ``stage`` diverge, with their current values."""
    causes = {
        "pretext": [f"a learning rate too high (pretext.optim.lr={cfg.pretext.optim.lr:g})",
                    f"images too small for the network (data.image_size={cfg.data.image_size})",
                    f"a temperature too low (pretext.temperature={cfg.pretext.temperature:g})"],
        "scan": [f"a learning rate too high (scan.optim.lr={cfg.scan.optim.lr:g})",
                 f"images too small for the network (data.image_size={cfg.data.image_size})"],
        "selflabel": [f"a learning rate too high (selflabel.optim.lr="
                      f"{cfg.selflabel.optim.lr:g})"],
    }.get(stage, [f"a diverged pretext model (pretext.optim.lr={cfg.pretext.optim.lr:g})"])
    return " or ".join(causes)


def check_finite(stats: dict[str, Any], stage: str, epoch: int, cfg: Config,
                 model: nn.Module | None = None) -> None:
    """Stop ``stage`` after ``epoch`` (1-based) if its losses or the model's weights are not
    finite. Called before the epoch's checkpoint is written, so the last good one stays."""
    bad = [k for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad and model is not None:
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            bad = ["model weights"]
    if bad:
        kept = (f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1
                else "no checkpoint was written")
        raise NumericalError(
            f"{stage}: {bad[0]} became NaN or infinite in epoch {epoch}; likely cause: "
            f"{likely_causes(stage, cfg)}; {kept}; fix the setting and redo the stage with "
            f"--force")


def check_finite_array(values: torch.Tensor | np.ndarray, what: str, stage: str,
                       cfg: Config) -> None:
    """Stop if features or predictions hold NaN or infinity (a model that diverged unseen)."""
    finite = torch.isfinite(torch.as_tensor(values))
    if not bool(finite.all()):
        rows = int((~finite.reshape(len(finite), -1).all(1)).sum())
        raise NumericalError(f"{stage}: {what} of {rows} of {len(finite)} images are NaN or "
                             f"infinite; likely cause: {likely_causes(stage, cfg)}")


def collapse_warning(sizes: list[int] | np.ndarray, name: str) -> str | None:
    """A warning when a clustering has an empty or nearly empty cluster, or one cluster holds
    nearly everything: the entropy term failed to spread the data (or the features carry no
    information). ``None`` for a healthy clustering."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if total == 0 or len(sizes) < 2:
        return None
    largest = int(sizes.max())
    if largest > DOMINANT * total:
        problem = f"one cluster holds {largest / total:.0%} of the {total} images"
    else:
        small = int((sizes < NEAR_EMPTY * total / len(sizes)).sum())
        if small == 0:
            return None
        problem = (f"{small} of {len(sizes)} clusters are empty or nearly empty (below "
                   f"{NEAR_EMPTY:.0%} of an even share)")
    message = (f"{name}: {problem}; the clustering collapsed (check the pretext features, "
               f"the learning rates, or the number of clusters)")
    log.warning("warning: %s", message)
    return message
