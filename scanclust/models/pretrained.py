"""Backbones from model libraries: any torchvision classifier, any timm model (``timm:NAME``).

The architecture is built here without weights, like every backbone, so a run's checkpoints
alone restore it. ``pretrained_state`` fetches the library's pretrained weights through the
library's own mechanism (torchvision: ``torch.hub``'s checkpoint cache; timm: the Hugging Face
hub cache), so a file downloaded once, or placed there by hand on an offline machine, is found
again. Nothing here downloads by other means.

A classifier becomes a backbone by replacing its last ``Linear`` layer with an identity: the
features it returns are what the classifier would have read (pooled ResNet features, the ViT
class token, ...), and ``out_dim`` is that layer's input size.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scanclust.errors import UserError

TIMM_PREFIX = "timm:"
_CLASSIFIER_ATTRS = ("fc", "heads", "head", "classifier")


class PretrainedError(UserError, ValueError):
    """A library model that does not exist, or weights that cannot be had; says what to do."""


def library_name_problem(name: str) -> str | None:
    """Why ``name`` is not a torchvision classification model or an installed timm model, with
    the closest name; None when it is one."""
    if name.startswith(TIMM_PREFIX):
        try:
            timm = _timm()
        except PretrainedError as err:
            return str(err)
        model_name = name[len(TIMM_PREFIX):]
        if timm.is_model(model_name):
            return None
        close = difflib.get_close_matches(model_name, timm.list_models(), n=1)
        return f"timm has no model {model_name!r}" + (f"; did you mean timm:{close[0]}?"
                                                      if close else "")
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name in names:
        return None
    close = difflib.get_close_matches(name, names, n=1)
    return (f"{name!r} is not a built-in backbone (resnet18_cifar, resnet18_stl, resnet_tiny), "
            f"a torchvision classification model or timm:NAME"
            + (f"; did you mean {close[0]}?" if close else ""))


def library_backbone(name: str) -> nn.Module:
    """The named torchvision or timm model, randomly initialised, classifier removed, with
    ``out_dim`` set."""
    problem = library_name_problem(name)
    if problem is not None:
        raise PretrainedError(f"model.backbone={name}: {problem}")
    if name.startswith(TIMM_PREFIX):
        model = _timm().create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=0)
        model.out_dim = int(model.num_features)
        return model
    import torchvision.models as tvm

    return strip_classifier(tvm.get_model(name, weights=None))


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the classifier's last ``Linear`` by an identity and record its input size."""
    for attr in _CLASSIFIER_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            model.out_dim = head.in_features
            return model
        if isinstance(head, nn.Sequential):
            linears = [k for k, m in head.named_children() if isinstance(m, nn.Linear)]
            if linears:
                last = linears[-1]
                model.out_dim = getattr(head, last).in_features
                setattr(head, last, nn.Identity())
                return model
    raise PretrainedError(f"cannot find the classifier layer of {type(model).__name__} "
                          f"(looked for {', '.join(_CLASSIFIER_ATTRS)})")


def pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The library's pretrained weights for backbone ``name`` (ImageNet for torchvision's
    default weights; whatever the timm tag names), keyed like ``library_backbone(name)``."""
    if name.startswith(TIMM_PREFIX):
        return _timm_state(name[len(TIMM_PREFIX):])
    import torchvision.models as tvm

    try:
        weights = tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise PretrainedError(f"model.backbone={name}: torchvision has no pretrained weights "
                              f"for it") from None
    filename = os.path.basename(weights.url)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        reason = str(getattr(err, "reason", err)).splitlines()[0]
        raise PretrainedError(
            f"cannot get the ImageNet weights of {name} ({reason}); without a network, "
            f"download {weights.url} elsewhere and place {filename} in {folder}/") from None


def _timm_state(model_name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights: from the local cache when they are there, else through the
    hub client, unless the hub cannot be reached (then at once: the client retries for about
    a minute before it gives up)."""
    timm = _timm()
    cached = weights_file(TIMM_PREFIX + model_name)
    if cached is None and not hub_reachable():
        raise PretrainedError(
            f"cannot get the pretrained weights of timm:{model_name}: they are not in the "
            f"Hugging Face cache ({hf_cache_dir()}) and huggingface.co cannot be reached; run "
            f"once with a network to fill the cache, or download the model's weights file and "
            f"pass it: --backbone FILE model.backbone=timm:{model_name}")
    overlay = {"pretrained_cfg_overlay": {"file": str(cached)}} if cached is not None else {}
    try:
        model = timm.create_model(model_name, pretrained=True, num_classes=0, **overlay)
    except Exception as err:  # hub client errors have no common base class beyond Exception
        if not isinstance(err, (OSError, RuntimeError, ValueError)) and \
                "huggingface" not in type(err).__module__:
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PretrainedError(
            f"cannot get the pretrained weights of timm:{model_name} ({first[:160]}); run once "
            f"with a network to fill the Hugging Face cache ({hf_cache_dir()}), or download the "
            f"model's weights file and pass it: --backbone FILE "
            f"model.backbone=timm:{model_name}") from None
    return model.state_dict()


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


HUB_HOST = "huggingface.co"
_REACHABLE: dict[str, bool] = {}


def hub_reachable(host: str = HUB_HOST, timeout: float = 1.5) -> bool:
    """Whether a download from ``host`` can start: for the Hugging Face hub ``HF_HUB_OFFLINE``
    says no; behind a proxy the client's own attempt decides (a direct connection says nothing
    there); else a TCP connection within ``timeout`` seconds (a machine without DNS fails in
    milliseconds)."""
    if host == HUB_HOST:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def weights_source(name: str) -> tuple[str, Path] | None:
    """Where a library backbone's pretrained weights are downloaded from and kept: (URL,
    local file) for torchvision's, None for the others (timm's go through the hub client)."""
    if name.startswith(TIMM_PREFIX):
        return None
    import torchvision.models as tvm

    try:
        url = tvm.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError):
        return None
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def weights_file(name: str) -> Path | None:
    """The local file of a library backbone's pretrained weights, if it is already on this
    machine: torch.hub's checkpoint cache for torchvision (``TORCH_HOME``), the Hugging Face
    cache for timm (``HF_HUB_CACHE`` / ``HF_HOME``; older timm weights by URL in torch.hub's
    cache). Looks at files only, never at the network."""
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        try:
            cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX):], allow_unregistered=False)
        except (RuntimeError, ValueError):
            cfg = None
        if cfg is None:
            return None
        if cfg.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = cfg.hf_hub_id.partition("@")
            for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
                if filename:
                    found = try_to_load_from_cache(repo, filename, revision=revision or None)
                    if isinstance(found, str) and os.path.isfile(found):
                        return Path(found)
        if not cfg.url:
            return None
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
    else:
        source = weights_source(name)
        if source is None:
            return None
        path = source[1]
    return path if path.is_file() else None


def load_pretrained(backbone: nn.Module, name: str) -> None:
    """Fill ``backbone`` (from ``library_backbone`` or ``build_backbone``) with the library's
    pretrained weights; the dropped classifier's tensors are the only ones allowed to differ."""
    state = pretrained_state(name)
    wanted = backbone.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise PretrainedError(f"the pretrained weights of {name} lack {len(missing)} backbone "
                              f"tensors (first: {missing[0]})")
    wrong = [k for k in wanted if state[k].shape != wanted[k].shape]
    if wrong:
        raise PretrainedError(f"the pretrained weights of {name} do not fit: {wrong[0]} is "
                              f"{list(state[wrong[0]].shape)}, expected {list(wanted[wrong[0]].shape)}")
    backbone.load_state_dict({k: state[k] for k in wanted})


def input_settings(name: str) -> dict[str, Any]:
    """Image size, resize and normalisation a pretrained model expects (its library's data
    config), so that its features are the ones it was trained to give."""
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=0)
        cfg = timm.data.resolve_data_config({}, model=model)
        size = int(cfg["input_size"][-1])
        crop_pct = float(cfg.get("crop_pct", 0.875))
        return {"image_size": size, "resize": int(round(size / crop_pct)),
                "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
    import torchvision.models as tvm

    try:
        transforms = tvm.get_model_weights(name).DEFAULT.transforms()
        size = int(transforms.crop_size[0])
        resize = int(transforms.resize_size[0])
    except (ValueError, KeyError, AttributeError, TypeError):
        size, resize = 224, 256
    return {"image_size": size, "resize": resize, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise PretrainedError("timm: backbones need the timm package: "
                              "pip install 'scanclust[timm]'") from None
    return timm

