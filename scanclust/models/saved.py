"""Weights saved in files: the cluster models a run directory holds (SCAN's kept head,
self-label's kept weights, and which of the two is the run's final model), and a foreign
backbone checkpoint (MoCo v2, torchvision, timm) for ``pretext.weights``.

A network is built from the config saved in its checkpoint, not the current one, so a later
change of ``model.*`` cannot mismatch the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from scanclust.checkpoint import CheckpointError, load_checkpoint, load_state, read_tensors
from scanclust.config import load_config
from scanclust.models import ClusterModel, build_cluster_model
from scanclust.rundir import RunDir

CLUSTER_STAGES = ("scan", "selflabel")


def final_stage(run: RunDir) -> str:
    """The stage whose model the run's results come from: self-label if it finished, else
    SCAN (self-label may keep SCAN's weights: then it is still the self-label stage's model)."""
    return "selflabel" if run.is_done("selflabel") else "scan"


def load_cluster_model(run: RunDir, stage: str) -> tuple[ClusterModel, dict[str, Any]]:
    """The kept model of a ``scan`` (reduced to its best head) or ``selflabel`` checkpoint,
    with the checkpoint."""
    state = load_checkpoint(run.checkpoint(stage), stage)
    heads = state["num_heads"] if stage == "scan" else 1
    merge = state.get("merge")  # scan.overcluster: the trained clusters and their merge
    outputs = len(merge) if merge else state["num_clusters"]
    model = build_cluster_model(load_config(state["config"]), outputs, heads)
    if stage == "scan":
        load_state(model, state["best"]["model"], run.checkpoint(stage))
        model.keep_head(state["best"]["head"])
    if merge:
        try:
            model.merge_clusters(merge)
        except ValueError as error:
            raise CheckpointError(f"{run.checkpoint(stage)}: {error}") from None
    if stage != "scan":
        load_state(model, state["best"]["model"], run.checkpoint(stage))
    return model, state


_PREFIXES = ("module.", "encoder_q.", "encoder.", "backbone.", "model.")


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a foreign backbone checkpoint (MoCo v2, torchvision, ...) by stripping key prefixes.

    MoCo stores ``module.encoder_q.conv1.weight``; torchvision ``conv1.weight``. Classifier and
    projection layers are dropped; a backbone key left unfilled is an error naming it, since a
    half-loaded backbone would cluster noise without complaint.
    """
    if not path.is_file():
        raise CheckpointError(f"pretext.weights={path} does not exist")
    if path.suffix == ".safetensors":  # the Hugging Face hub's format (timm models)
        from safetensors.torch import load_file

        try:
            payload = load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read pretext.weights={path}: "
                                  f"{str(err).splitlines()[0]}") from None
    else:
        payload = read_tensors(path, f"pretext.weights={path}",
                               "; is it a PyTorch weights file (.pt, .pth)?")
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    state = {}
    for key, value in payload.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value
    wanted = backbone.state_dict()
    found = {k: v for k, v in state.items() if k in wanted}
    load_state(backbone, found, f"pretext.weights={path}",
               "; are they weights for another backbone than model.backbone?")

