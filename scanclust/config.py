"""Typed configuration: one dataclass per section, loaded from YAML with command-line overrides
(``config_files.py``), then checked for ranges and choices (``validate``).

The dataclass defaults are the paper's CIFAR-10 settings; ``configs/cifar10.yaml`` states every
value explicitly so that a reader sees the recipe without reading code, and the other built-in
configs are the changes to it (or to ``imagenet_50``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanclust.config_files import CONFIG_DIR, builtin_configs  # noqa: F401 - re-exported
from scanclust.config_files import (Origin, build, compose, deep_copy, dotted_keys,
                                    parse_overrides, resolve_path, set_dotted)
from scanclust.errors import ConfigError  # noqa: F401 - re-exported: scanclust.ConfigError

DATASETS = ("cifar10", "cifar20", "stl10", "imagenet", "imagenet_50", "imagenet_100",
            "imagenet_200", "folder", "digits")
BACKBONES = ("resnet18_cifar", "resnet18_stl", "resnet18", "resnet50", "resnet_tiny")
SCRATCH_BACKBONES = ("resnet18_cifar", "resnet18_stl", "resnet_tiny")  # no library weights
# any other name is resolved by torchvision or, with the prefix, timm (models/pretrained.py)
_LIBRARY_NAME = re.compile(r"(timm:)?[A-Za-z0-9_][A-Za-z0-9_.\-]*")
STRONG_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "contrast",
              "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
              "posterize")


# Where the paper's text and the authors' released code differ (README, "Choices where the
# sources differ"), the defaults
# follow the code; these values give the text's reading, which is also what checkpoints of
# format 1 (written before these keys existed) ran with.
TEXT_READING: dict[str, Any] = {
    "augment.strong.op_draw": "distinct", "augment.strong.posterize_bits": [4, 8],
    "augment.strong.interpolation": "bilinear", "augment.strong.fill": 128,
    "augment.strong.shear_pivot": "center", "augment.strong.cutout_side": "fixed",
    "scan.partner": "neighbors", "scan.selection_entropy_weight": None,
    "scan.selection_neighbors": None, "scan.selection_self": False,
}


@dataclass
class DataConfig:
    """Where the images come from and how they are read."""

    dataset: str = "cifar10"
    root: str = "./data"
    val_root: str | None = None  # folder data set only: a second folder used as the val split
    download: bool = True
    image_size: int = 32
    resize: int | None = None  # eval view: resize the shorter side to this, then center-crop
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2023, 0.1994, 0.2010])
    num_workers: int = 4
    max_images: int | None = None  # use an evenly spaced subset of each split (smoke tests)
    # folder data set only:
    labels_from_folders: bool = True  # immediate subfolders are classes (for evaluation only)
    cache_dir: str | None = None  # keep decoded images here as .npy files; null: in memory
    strict: bool = False  # an unreadable image stops the run instead of being skipped


@dataclass
class SimCLRAugConfig:
    """SimCLR view: RandomResizedCrop, flip, colour jitter, grayscale."""

    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    jitter_p: float = 0.8
    gray_p: float = 0.2
    # A random affine after the crop, off by default (the paper has none); the demo turns it
    # on because handwriting varies by slant (why and what it gained: configs/demo.yaml).
    rotate: float = 0.0  # largest rotation in degrees, either way, about the centre
    shear: float = 0.0  # largest horizontal shear in degrees, either way, about the centre
    fill: int = 0  # grey level 0..255 of the corners the warp uncovers


@dataclass
class StrongAugConfig:
    """Strong view (paper Table S2): flip, ``num_ops`` random ops of ``ops``, then Cutout.

    Where the table is loose, the defaults follow the authors' released code (README, "Choices
    where the sources differ");
    the other reading stays available under the named values in the comments.
    """

    hflip: bool = True
    num_ops: int = 4
    ops: list[str] = field(default_factory=lambda: list(STRONG_OPS))
    op_draw: str = "replacement"  # replacement (ops drawn independently) | distinct
    # bits kept, inclusive (the paper's table: [4, 8])
    posterize_bits: list[int] = field(default_factory=lambda: [4, 7])
    interpolation: str = "nearest"  # rotate/shear/translate resampling: nearest | bilinear
    fill: int = 0  # grey level of the area a warp uncovers (0 black; 128 mid-gray)
    shear_pivot: str = "corner"  # corner (top-left) | center
    cutout: int = 16  # largest side of the square hole in pixels; 0 turns Cutout off
    cutout_side: str = "uniform"  # uniform (side drawn from 1..cutout per image) | fixed


@dataclass
class AugmentConfig:
    simclr: SimCLRAugConfig = field(default_factory=SimCLRAugConfig)
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)


@dataclass
class ModelConfig:
    backbone: str = "resnet18_cifar"
    width: int = 32  # resnet_tiny only: channels of the first stage
    num_clusters: int | None = None  # None: the number of classes of the data set
    proj_hidden: int = 512
    proj_dim: int = 128


@dataclass
class OptimConfig:
    name: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"  # constant | cosine
    final_lr_factor: float = 1e-3  # cosine ends at lr * final_lr_factor (paper: 0.1^3)


@dataclass
class PretextConfig:
    # simclr | weights (load ``weights``, e.g. MoCo v2 for ImageNet) | pretrained (the
    # library's own weights of a torchvision or timm ``model.backbone``)
    method: str = "simclr"
    weights: str | None = None
    epochs: int = 500
    batch_size: int = 512  # the global batch: split evenly over the processes under torchrun
    temperature: float = 0.1
    sync_batchnorm: bool = True  # several CUDA processes: batch norm over the global batch
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.4, weight_decay=1e-4, momentum=0.9, schedule="cosine",
        final_lr_factor=1e-3))


@dataclass
class MineConfig:
    topk: int = 20
    features: str = "head"  # head (SimCLR projection, L2-normalised) | backbone
    batch_size: int = 512  # images per forward pass when extracting features
    chunk_size: int = 4096  # side of a similarity block: memory is chunk_size^2 floats
    backend: str = "auto"  # auto | torch (chunked matmul, any device) | faiss (CPU, if installed)


@dataclass
class ScanConfig:
    epochs: int = 50
    batch_size: int = 128
    entropy_weight: float = 5.0
    # The cluster prior of the entropy term (README, "Clusters of different sizes"): uniform
    # (the paper: every cluster 1/K of the data) | adaptive (re-estimated from the model's own
    # predictions: an average over steps with decay prior_momentum, mixed with prior_floor of
    # the uniform prior so that no cluster's target falls below prior_floor / K, after the
    # first prior_warmup of the epochs under the uniform prior)
    prior: str = "uniform"
    prior_momentum: float = 0.99
    prior_floor: float = 0.2
    prior_warmup: float = 0.0
    # Train this many times the clusters asked for, then merge them down on the mined kNN graph
    # (``merge.py``): a large class may then be several of SCAN's clusters, a small one its own
    overcluster: int = 1
    # The merge's modularity resolution: 1 is Newman's; below 1 the penalty on joining groups
    # of many kNN edges shrinks, so large classes stay whole (README, "Clusters of different
    # sizes": it helps on clear features and makes giant clusters on weak ones)
    merge_resolution: float = 1.0
    num_heads: int = 1
    num_neighbors: int | None = None  # None: all mined; 0: the anchor's own augmentation
    partner: str = "neighbors_and_self"  # draw among the K neighbours and the image itself | neighbors
    # Label-free model selection: the SCAN loss on the val split with this entropy weight (null:
    # the training weight), over each image's first ``selection_neighbors`` val neighbours (null:
    # as many as training uses) and, with ``selection_self``, the image itself.
    selection_entropy_weight: float | None = 1.0
    selection_neighbors: int | None = 5
    selection_self: bool = True
    update_backbone: bool = True
    augment: str = "strong"  # strong | simclr
    cached_views: int = 0  # frozen backbone only: precompute features of this many augmented views
    sync_batchnorm: bool = True  # several CUDA processes: batch norm over the global batch
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SelfLabelConfig:
    epochs: int = 200
    batch_size: int = 1000
    threshold: float = 0.99
    # threshold (samples above the threshold) | per_cluster (the per_cluster_fraction most
    # confident samples of each cluster in a batch, however low their confidence)
    selection: str = "threshold"
    per_cluster_fraction: float = 0.5
    class_balance: bool = True
    ema: float | None = None  # decay of an exponential moving average of the weights
    update_backbone: bool = True
    augment: str = "strong"  # strong | simclr
    cached_views: int = 0  # frozen backbone only: precompute features of this many augmented views
    plateau_tolerance: float = 0.001  # growth of the confident count below this share of N is a plateau
    patience: int | None = None  # stop after this many epochs on a plateau; None runs all epochs
    sync_batchnorm: bool = True  # several CUDA processes: batch norm over the global batch
    optim: OptimConfig = field(default_factory=OptimConfig)


# Keys added after runs were made without them: their defaults reproduce such a run, so a
# resumed old run compares as made with them (``lineage.compare_configs``).
ADDED_KEYS: dict[str, Any] = {
    **{f"scan.{k}": getattr(ScanConfig(), k) for k in ("prior", "prior_momentum", "prior_floor",
                                                      "prior_warmup", "overcluster",
                                                      "merge_resolution")},
    **{f"selflabel.{k}": getattr(SelfLabelConfig(), k)
       for k in ("selection", "per_cluster_fraction")},
}


@dataclass
class EvaluateConfig:
    batch_size: int = 512
    kmeans: bool = True
    kmeans_restarts: int = 10
    figures: bool = True
    num_low_confidence: int = 32


# perf.compile's values and what each compiles (true is the older spelling of model)
COMPILE_SCOPES = {False: None, "none": None, True: "model", "model": "model", "step": "step"}


@dataclass
class PerfConfig:
    """Speed switches; none changes the method, each is correct on every device."""

    # auto | device (data set on the device, batched augs) | workers | decode (JPEG files
    # read by workers, decoded and augmented on the device; scanclust/data/decode.py)
    data_path: str = "auto"
    device_data_gb: float = 4.0  # auto holds a data set on the device up to this size
    # NHWC activations: faster convolutions with bf16 on GPUs, 1.3-1.7x on CPUs; a CPU whose
    # NHWC weight gradients are wrong runs NCHW regardless (runtime.channels_last)
    channels_last: bool = True
    # torch.compile: false | model (true; inductor fuses batch norm + ReLU and the elementwise
    # ops around the convolutions) | step (the whole training step body: augmentation,
    # forward, loss, backward; inside the CUDA graph when perf.cuda_graphs). Minutes to compile.
    compile: bool | str = False
    optimizer_impl: str = "auto"  # auto | fused | foreach | loop
    cuda_graphs: bool = True  # CUDA only: replay each training step as one captured graph
    cudnn_benchmark: bool = True  # CUDA only: let cuDNN pick convolution kernels by timing


@dataclass
class Config:
    name: str = "cifar10"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # bf16 autocast on CUDA; ignored elsewhere
    progress: bool = True
    # epochs between checkpoints of a training stage (the last is always written)
    checkpoint_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    selflabel: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(source: str | Path | dict | Config | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build a validated Config from a built-in name, a YAML path, a dict or a Config.

    ``overrides`` are ``"section.key=value"`` strings (values parsed as YAML) or a dict of dotted
    keys; they are applied after the file, so a command line always wins.
    """
    files: dict[str, str] = {}
    if isinstance(source, Config):
        data, origin = source.to_dict(), "config object"
    elif isinstance(source, dict):
        data, origin = source, "config dict"
    elif source is None:
        data, origin = {}, "defaults"
    else:
        path = resolve_path(source)
        origin = str(path)
        data, files = compose(path)
    data = deep_copy(data)
    parsed = parse_overrides(overrides)
    where = Origin(origin, set(parsed), dotted_keys(data), files)
    for key, value in parsed.items():
        set_dotted(data, key, value)
    cfg = build(Config, data, prefix="", origin=where)
    try:
        validate(cfg)
    except _InvalidValue as err:
        raise ConfigError(f"config key '{err.key}'{where.clause(err.key)}: {err.message}") from None
    return cfg


class _InvalidValue(ConfigError):
    """A value ``validate`` refuses; ``load_config`` adds where the value came from."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key, self.message = key, message


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _InvalidValue(key, message)


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    _require(0 <= cfg.seed < 2**32, "seed", f"{cfg.seed} is outside 0 .. 2**32 - 1")
    _choice(cfg.data.dataset, "data.dataset", DATASETS)
    _require(cfg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    _require(cfg.model.backbone in BACKBONES or _LIBRARY_NAME.fullmatch(cfg.model.backbone)
             is not None, "model.backbone",
             f"{cfg.model.backbone!r} is not one of {', '.join(BACKBONES)}, a torchvision "
             f"model name or timm:NAME")
    if cfg.model.backbone not in BACKBONES:  # only then is a model library imported
        from scanclust.models.pretrained import library_name_problem

        problem = library_name_problem(cfg.model.backbone)
        _require(problem is None, "model.backbone", problem or "")
    _require(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
             "device", f"{cfg.device!r} is not auto, cpu, cuda, cuda:N or mps")
    _require(cfg.data.image_size > 0, "data.image_size", "must be positive")
    _require(len(cfg.data.mean) == 3, "data.mean", "needs three values (RGB)")
    _require(len(cfg.data.std) == 3, "data.std", "needs three values (RGB)")
    _require(all(s > 0 for s in cfg.data.std), "data.std", "must be positive (it divides)")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.data.max_images is None or cfg.data.max_images >= 2, "data.max_images",
             "must be >= 2 or null")
    _require(len(cfg.augment.simclr.crop_scale) == 2
             and 0 < cfg.augment.simclr.crop_scale[0] <= cfg.augment.simclr.crop_scale[1] <= 1,
             "augment.simclr.crop_scale", "needs two values 0 < lo <= hi <= 1")
    _require(len(cfg.augment.simclr.jitter) == 4, "augment.simclr.jitter",
             "needs brightness, contrast, saturation, hue")
    _require(0 <= cfg.augment.simclr.rotate <= 180, "augment.simclr.rotate",
             "must be between 0 and 180 degrees")
    _require(0 <= cfg.augment.simclr.shear < 90, "augment.simclr.shear",
             "must be at least 0 and under 90 degrees")
    _require(0 <= cfg.augment.simclr.fill <= 255, "augment.simclr.fill", "must be 0..255")
    strong = cfg.augment.strong
    for name in strong.ops:
        _choice(name, "augment.strong.ops", STRONG_OPS)
    _choice(strong.op_draw, "augment.strong.op_draw", ("replacement", "distinct"))
    _require(0 <= strong.num_ops and (strong.op_draw == "replacement"
                                      or strong.num_ops <= len(strong.ops)),
             "augment.strong.num_ops", "must be between 0 and the number of ops "
             "(any number >= 0 with op_draw=replacement)")
    _require(len(strong.ops) > 0 or strong.num_ops == 0, "augment.strong.ops",
             "needs at least one op when num_ops > 0")
    _require(len(strong.posterize_bits) == 2 and 1 <= strong.posterize_bits[0]
             <= strong.posterize_bits[1] <= 8, "augment.strong.posterize_bits",
             "needs two values 1 <= lo <= hi <= 8")
    _choice(strong.interpolation, "augment.strong.interpolation", ("nearest", "bilinear"))
    _require(0 <= strong.fill <= 255, "augment.strong.fill", "must be a grey level 0..255")
    _choice(strong.shear_pivot, "augment.strong.shear_pivot", ("corner", "center"))
    _require(strong.cutout >= 0, "augment.strong.cutout", "must be >= 0")
    _choice(strong.cutout_side, "augment.strong.cutout_side", ("uniform", "fixed"))
    _require(cfg.model.num_clusters is None or cfg.model.num_clusters >= 2,
             "model.num_clusters", "needs at least 2 clusters")
    _choice(cfg.pretext.method, "pretext.method", ("simclr", "weights", "pretrained"))
    _require(cfg.pretext.method != "pretrained" or cfg.model.backbone not in SCRATCH_BACKBONES,
             "pretext.method", f"pretrained weights come from torchvision or timm; "
             f"model.backbone={cfg.model.backbone} has none (use e.g. resnet50 or timm:NAME)")
    _require(cfg.pretext.method != "weights" or bool(cfg.pretext.weights), "pretext.weights",
             "pretext.method=weights needs a weights file")
    _require(cfg.pretext.weights is None or cfg.pretext.method == "weights", "pretext.weights",
             "is set, but pretext.method=simclr trains from scratch and would ignore it; set "
             "pretext.method=weights to start from the file, or pretext.weights=null")
    _require(cfg.pretext.temperature > 0, "pretext.temperature", "must be positive")
    _require(cfg.mine.topk >= 1, "mine.topk", "must be >= 1")
    _choice(cfg.mine.features, "mine.features", ("head", "backbone"))
    _require(cfg.mine.chunk_size >= 1, "mine.chunk_size", "must be >= 1")
    _choice(cfg.mine.backend, "mine.backend", ("auto", "torch", "faiss"))
    _require(cfg.scan.num_heads >= 1, "scan.num_heads", "must be >= 1")
    _require(cfg.scan.num_neighbors is None or 0 <= cfg.scan.num_neighbors <= cfg.mine.topk,
             "scan.num_neighbors", f"must be between 0 and mine.topk={cfg.mine.topk}")
    _require(cfg.scan.entropy_weight >= 0, "scan.entropy_weight", "must be >= 0")
    _choice(cfg.scan.prior, "scan.prior", ("uniform", "adaptive"))
    _require(0 <= cfg.scan.prior_momentum < 1, "scan.prior_momentum", "must be in [0, 1)")
    _require(0 <= cfg.scan.prior_floor <= 1, "scan.prior_floor", "must be in [0, 1]")
    _require(0 <= cfg.scan.prior_warmup <= 1, "scan.prior_warmup", "must be in [0, 1]")
    _require(cfg.scan.overcluster >= 1, "scan.overcluster", "must be >= 1")
    _require(0 < cfg.scan.merge_resolution <= 10, "scan.merge_resolution", "must be in (0, 10]")
    _choice(cfg.scan.partner, "scan.partner", ("neighbors_and_self", "neighbors"))
    _require(cfg.scan.selection_entropy_weight is None or cfg.scan.selection_entropy_weight >= 0,
             "scan.selection_entropy_weight", "must be >= 0 or null")
    _require(cfg.scan.selection_neighbors is None or cfg.scan.selection_neighbors >= 0,
             "scan.selection_neighbors", "must be >= 0 or null")
    for stage in ("scan", "selflabel"):
        sc = getattr(cfg, stage)
        _choice(sc.augment, f"{stage}.augment", ("strong", "simclr"))
        _require(sc.cached_views >= 0, f"{stage}.cached_views", "must be >= 0")
        _require(sc.cached_views == 0 or not sc.update_backbone, f"{stage}.cached_views",
                 f"cached features need a frozen backbone ({stage}.update_backbone=false)")
    _require(0 < cfg.selflabel.threshold < 1, "selflabel.threshold", "must be in (0, 1)")
    _choice(cfg.selflabel.selection, "selflabel.selection", ("threshold", "per_cluster"))
    _require(0 < cfg.selflabel.per_cluster_fraction <= 1, "selflabel.per_cluster_fraction",
             "must be in (0, 1]")
    _require(cfg.selflabel.ema is None or 0 < cfg.selflabel.ema < 1, "selflabel.ema",
             "must be in (0, 1) or null")
    _choice(cfg.perf.data_path, "perf.data_path", ("auto", "device", "workers", "decode"))
    _require(cfg.perf.device_data_gb >= 0, "perf.device_data_gb", "must be >= 0")
    _choice(cfg.perf.optimizer_impl, "perf.optimizer_impl", ("auto", "fused", "foreach", "loop"))
    _require(cfg.perf.compile in COMPILE_SCOPES, "perf.compile",
             f"{cfg.perf.compile!r} is not one of false, model, step")
    for stage in ("pretext", "scan", "selflabel"):
        sc = getattr(cfg, stage)
        _require(sc.epochs >= 0, f"{stage}.epochs", "must be >= 0")
        _require(sc.batch_size >= 1, f"{stage}.batch_size", "must be >= 1")
        _choice(sc.optim.name, f"{stage}.optim.name", ("sgd", "adam", "adamw"))
        _choice(sc.optim.schedule, f"{stage}.optim.schedule", ("constant", "cosine"))
        _require(sc.optim.lr > 0, f"{stage}.optim.lr", "must be positive")

