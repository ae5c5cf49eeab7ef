"""``scanclust cluster FOLDER``: from a folder of images to browsable clusters, no YAML.

The command looks at the folder (how many images, how large) and the device, writes a config
from a preset, and runs the same stage functions as ``scanclust run`` into the same kind of run
directory (so ``--resume``, ``--force`` and ``section.key=value`` overrides work as there),
then writes the report (``report.py``). With ``--clusters auto`` the number of clusters is
chosen after mining, on the mined features (``choose_k.py``).

Presets (measured figures in ``benchmarks/RESULTS.md``):

- ``cpu``: a laptop. From scratch: a tiny ResNet at up to 32 px, a SimCLR schedule of about
  150,000 augmented pairs, then SCAN and self-label heads on cached features of the frozen
  backbone (5 augmented views).
- ``gpu``: ResNet-18 at up to 96 px and about 4x the schedule.
- ``quick``: a smoke test of a folder in seconds (results are not meaningful).
- ``auto`` (default): ``gpu`` when CUDA is present, else ``cpu``.

With a pretrained backbone (``--backbone resnet50``, ``timm:NAME``, or a weights file) there
is no pretext training: the backbone is frozen, mining uses its features, and SCAN and
self-label train heads on cached features of a few augmented views (``cached_views``).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from scanclust import distributed
from scanclust.config import Config, ConfigError, load_config
from scanclust.data.images import ImageReadError, list_images, median_side
from scanclust.errors import UserError
from scanclust.files import RunDirError, read_json, write_json
from scanclust.rundir import STAGE_DIRS, RunDir, exclusive

log = logging.getLogger("scanclust")

PRESETS = ("auto", "cpu", "gpu", "quick")
DEFAULT_K_MAX = 20
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# Per preset: the largest image side trained on from scratch, the scratch backbone, and the
# number of training samples per stage (epochs = samples / images, within the bounds).
SCRATCH = {
    "cpu": {"max_side": 32, "backbone": "resnet_tiny", "width": 16, "pretext": 150_000,
            "scan": 60_000, "selflabel": 30_000, "batch": 256},
    "gpu": {"max_side": 96, "backbone": "resnet18", "width": 32, "pretext": 2_000_000,
            "scan": 400_000, "selflabel": 200_000, "batch": 512},
    "quick": {"max_side": 16, "backbone": "resnet_tiny", "width": 8, "pretext": 2,
              "scan": 2, "selflabel": 1, "batch": 64},
}
EPOCH_BOUNDS = {"pretext": (10, 500), "scan": (5, 100), "selflabel": (3, 50)}
CACHED_VIEWS = {"cpu": 1, "gpu": 10, "quick": 1}  # augmented views a pretrained run caches
# ``--backbone auto``'s pretrained model: see ``choose_backbone`` and the README (quality per
# CPU second, measured in benchmarks/RESULTS.md).
AUTO_BACKBONE = "regnet_y_800mf"
OVERCLUSTER_MIN_IMAGES = 10  # per cluster SCAN trains, on average (``fit_overcluster``)


def plan(preset: str, backbone: str, images: int, side: int) -> dict[str, Any]:
    """The config (dotted keys) for ``images`` images of median shorter side ``side``.

    From scratch, the image size is the data's own up to the preset's maximum (a 32 px CIFAR
    image is not enlarged; a 4000 px photo is trained on at 32 px on a CPU) and the epochs
    follow a sample budget, so a larger folder gets fewer, longer epochs in about the same time.
    """
    quick = preset == "quick"
    recipe = SCRATCH[preset]
    s = {"name": "cluster", "amp": preset != "cpu", "progress": True,
         "data.dataset": "folder", "data.download": False, "data.val_root": None,
         "data.max_images": None, "data.num_workers": 0 if preset != "gpu" else 8,
         "data.mean": IMAGENET_MEAN, "data.std": IMAGENET_STD,
         "mine.topk": 20, "mine.features": "backbone",
         "scan.optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "constant"},
         "selflabel.augment": "strong",
         "selflabel.optim": {"name": "adam", "lr": 1e-4, "weight_decay": 1e-4, "schedule": "constant"},
         "evaluate.kmeans_restarts": 3, "evaluate.figures": True}
    if backbone == "scratch":
        size = max(8, min(side or recipe["max_side"], recipe["max_side"]))
        name = recipe["backbone"]
        if name == "resnet18":
            name = "resnet18_cifar" if size <= 64 else "resnet18_stl"
        batch = recipe["batch"]
        s.update({
            "data.image_size": size, "data.resize": None,
            "augment.strong.cutout": max(1, size // 2),
            "model.backbone": name, "model.width": recipe["width"],
            "pretext.method": "simclr", "pretext.weights": None,
            "pretext.batch_size": batch, "pretext.temperature": 0.1,
            "pretext.optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4,
                              "schedule": "cosine", "final_lr_factor": 1e-3},
            "scan.batch_size": batch, "scan.num_heads": 5, "scan.num_neighbors": 10,
            "scan.update_backbone": True, "scan.cached_views": 0, "scan.augment": "strong",
            "selflabel.batch_size": 2 * batch, "selflabel.update_backbone": True,
            "selflabel.cached_views": 0,
        })
        s.update({f"{stage}.epochs": recipe[stage] if quick
                  else min(max(math.ceil(recipe[stage] / max(images, 1)), low), high)
                  for stage, (low, high) in EPOCH_BOUNDS.items()})
        if preset == "cpu":
            # Measured on 3,000 CIFAR-10 JPEGs (benchmarks/RESULTS.md): SCAN heads on cached
            # features of the frozen SimCLR backbone beat fine-tuning the whole network
            # (Hungarian ACC 0.263 vs 0.244) at a fraction of the time on a CPU. An epoch of
            # heads on cached features costs milliseconds, and 200 epochs beat 50 (majority
            # ACC 0.306 vs 0.271, 4.7 s); 500 gave no more (0.310). Over three pretext seeds
            # the cached views as SimCLR views beat strong views (ACC 0.300 vs 0.282, Hungarian
            # 0.270 vs 0.258); 20 neighbours or 10 views instead of 10 / 5 did not help.
            # Three times the clusters, merged on the kNN graph (``merge.py``): against K
            # clusters, on CIFAR-10 JPEG folders +3.5 ACC long-tailed, +0.6 and -0.8 balanced,
            # with no nearly empty cluster; on digits +7.3 to +11.0 in all three profiles. 2 and
            # 5 times did worse on CIFAR-10, and it beat the adaptive prior (+1.9 / -0.3 on
            # CIFAR-10), with or without it (README, "Clusters of different sizes").
            s.update({"scan.update_backbone": False, "scan.cached_views": 5, "scan.epochs": 200,
                      "scan.augment": "simclr", "scan.overcluster": 3,
                      "selflabel.update_backbone": False, "selflabel.cached_views": 5,
                      "selflabel.epochs": 20})
        return s
    views = CACHED_VIEWS[preset]
    if preset == "cpu":
        # inference batches of 32: at 224 px a batch of 512 runs regnet_y_800mf at 24 img/s on
        # 2 cores, one of 32 at 54 (benchmarks/RESULTS.md); the results are the same
        s.update({"mine.batch_size": 32, "evaluate.batch_size": 32})
    s.update({
        "pretext.epochs": 0,
        "scan.epochs": 2 if quick else 100, "scan.batch_size": 256, "scan.num_heads": 10,
        "scan.num_neighbors": None, "scan.update_backbone": False, "scan.cached_views": views,
        "scan.augment": "simclr",
        "selflabel.epochs": 1 if quick else 25, "selflabel.batch_size": 256,
        "selflabel.update_backbone": False, "selflabel.cached_views": views,
    })
    path = Path(backbone)
    if path.is_file() or path.suffix in (".pt", ".pth", ".tar", ".bin", ".safetensors"):
        # a local weights file: the architecture is model.backbone (resnet50 unless overridden)
        s.update({"pretext.method": "weights", "pretext.weights": str(path.resolve()),
                  "model.backbone": "resnet50", "data.image_size": 224, "data.resize": 256})
        return s
    from scanclust.models.pretrained import input_settings

    s.update({"pretext.method": "pretrained", "pretext.weights": None, "model.backbone": backbone})
    s.update({f"data.{k}": v for k, v in input_settings(backbone).items()})
    return s


def choose_backbone(out: Path, resume: bool) -> tuple[str, int, str]:
    """``--backbone auto``: a pretrained model when its weights are on this machine or can be
    downloaded now, else the scratch recipe; with the line (level, text) that says which and
    how to get the other, logged by the caller once the settings are known to be valid (a
    config error stays the only line).

    A resumed run keeps the choice it was made with (the weights may have arrived since).
    Looking costs no more than a file check and one connection attempt (milliseconds without
    a network, at most 1.5 s where DNS answers slowly)."""
    from urllib.parse import urlparse

    from scanclust.models.pretrained import hub_reachable, weights_file, weights_source

    recorded = out / "config.yaml"
    if resume and recorded.is_file():
        cfg = load_config(recorded)
        chosen = {"simclr": "scratch", "weights": cfg.pretext.weights}.get(
            cfg.pretext.method, cfg.model.backbone)
        return str(chosen), logging.INFO, f"cluster: --backbone auto: {chosen}, as this run was made"
    url, local = weights_source(AUTO_BACKBONE)
    if weights_file(AUTO_BACKBONE) is not None:
        return AUTO_BACKBONE, logging.INFO, (
            f"cluster: --backbone auto: {AUTO_BACKBONE} with its ImageNet weights ({local}); "
            f"--backbone scratch trains on the folder alone instead")
    if hub_reachable(urlparse(url).hostname or ""):
        return AUTO_BACKBONE, logging.INFO, (
            f"cluster: --backbone auto: {AUTO_BACKBONE} with its ImageNet weights, downloaded "
            f"once into {local.parent}; --backbone scratch trains on the folder alone instead")
    return "scratch", logging.WARNING, (
        f"cluster: --backbone auto: no pretrained weights on this machine and no network, so "
        f"the model is trained from scratch on the folder (natural photos then sort mostly by "
        f"colour); for clusters by content place {local.name} (from {url}) in {local.parent}, "
        f"or pass --backbone NAME")


def resolve_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    if preset != "auto":
        return preset
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def parse_clusters(value: str | int | None) -> int | str | None:
    """``--clusters``: a number of at least 2, ``auto``, or None (auto, or the number of
    subfolders with --labels-from-folders)."""
    if value is None or value == "auto":
        return value
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--clusters {value!r} is neither a number nor auto") from None
    if k < 2:
        raise ConfigError(f"--clusters {k}: needs at least 2 clusters")
    return k


def parse_k_range(value: str | None, images: int) -> list[int]:
    """``LO:HI`` (inclusive); the default 2:20 is capped at an average of 10 images a cluster.
    k-means needs more images than clusters to score a partition, so HI is at most
    ``images - 1``; a range left empty by that is refused in the folder's terms."""
    if value is None:
        ks = list(range(2, min(max(3, min(DEFAULT_K_MAX, images // 10)), images - 1) + 1))
        if not ks:
            raise ConfigError(f"--clusters auto compares K = 2 and more, which needs at least "
                              f"3 images, but the folder has {images}; give --clusters 2")
        return ks
    lo, sep, hi = str(value).partition(":")
    try:
        ks = list(range(int(lo), int(hi) + 1)) if sep else []
    except ValueError:
        ks = []
    if not ks or ks[0] < 2:
        raise ConfigError(f"--k-range {value!r}: expected LO:HI with 2 <= LO <= HI, e.g. 2:20")
    if ks[-1] >= images:
        raise ConfigError(f"--k-range {value}: K = {ks[-1]} needs more than {ks[-1]} images to "
                          f"compare partitions, but the folder has {images}"
                          + (f"; use at most {ks[0]}:{images - 1}" if ks[0] < images - 1 else ""))
    return ks


def fit_to_folder(cfg: Config, images: int, clusters: int | str | None) -> Config:
    """The preset's settings fitted to a folder of ``images`` readable images (each change
    logged), or a one-line refusal in the command's own terms: fewer neighbours than the
    preset mines when there are not that many other images, and no more clusters than
    images."""
    if images < 2:
        raise ConfigError(f"FOLDER has {images} readable image; clustering needs at least 2")
    if isinstance(clusters, int) and clusters > images:
        raise ConfigError(f"--clusters {clusters}: the folder has only {images} readable images")
    fitted: dict[str, Any] = {}
    if cfg.mine.topk >= images:
        fitted["mine.topk"] = images - 1
    topk = fitted.get("mine.topk", cfg.mine.topk)
    if cfg.scan.num_neighbors is not None and cfg.scan.num_neighbors > topk:
        fitted["scan.num_neighbors"] = topk
    if fitted:
        log.info("cluster: %d images, so %s", images, ", ".join(
            f"{key}={value} (instead of {attrgetter(key)(cfg)})" for key, value in fitted.items()))
        cfg = load_config(cfg, fitted)
    return cfg


def fit_overcluster(cfg: Config, wanted: int, images: int, k: int) -> Config:
    """``scan.overcluster`` lowered from ``wanted`` until each of the clusters SCAN trains
    holds ``OVERCLUSTER_MIN_IMAGES`` images on average (logged): a cluster of a few images
    is noise that the merge cannot place."""
    fitted = max(1, min(wanted, images // (k * OVERCLUSTER_MIN_IMAGES)))
    if fitted == cfg.scan.overcluster:
        return cfg
    if fitted < wanted:
        log.info("cluster: %d images for %d clusters, so scan.overcluster=%d (instead of %d), "
                 "at least %d images per trained cluster", images, k, fitted, wanted,
                 OVERCLUSTER_MIN_IMAGES)
    return load_config(cfg, {"scan.overcluster": fitted})


def cluster(folder: str | Path, out: str | Path | None = None, *,
            clusters: int | str | None = None, backbone: str = "auto",
            preset: str = "auto", labels_from_folders: bool = False, strict: bool = False,
            export: str | None = None, k_range: str | None = None,
            criterion: str = "louvain",
            overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
            force: bool = False) -> dict[str, Any]:
    """Cluster the images of ``folder`` into ``out``; returns the report summary."""
    started = time.perf_counter()
    if distributed.launched():
        raise ConfigError("scanclust cluster runs in one process; for several GPUs train with "
                          "`torchrun ... -m scanclust run --config FILE --out RUN` (data.dataset="
                          "folder, data.root=FOLDER), then write the report with `scanclust "
                          "report --out RUN`")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"FOLDER {folder} is not a folder" if folder.exists()
                          else f"FOLDER {folder} does not exist")
    out = Path(out) if out is not None else Path("runs") / (folder.resolve().name or "folder")
    if out.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"--out {out} is inside FOLDER {folder}; its exported copies would be "
                          f"clustered next time: choose a run directory outside it")
    clusters = parse_clusters(clusters)
    from scanclust.choose_k import CRITERIA  # after the checks that need no torch
    from scanclust.results import EXPORT_MODES

    if export is not None and export not in EXPORT_MODES:
        raise ConfigError(f"--export {export!r} is not one of {', '.join(EXPORT_MODES)}")
    if criterion not in CRITERIA:
        raise ConfigError(f"--criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    preset = resolve_preset(preset)
    said = None
    if backbone == "auto" and preset == "quick":
        backbone = "scratch"
    elif backbone == "auto":
        backbone, *said = choose_backbone(out, resume)
    try:
        paths = list_images(folder).paths
    except ImageReadError as err:
        raise ConfigError(f"FOLDER {folder}: {err}") from None
    if not paths:
        raise ConfigError(f"FOLDER {folder} contains no images (nor do its subfolders)")
    side = median_side(paths) or 0  # from the headers of up to 200 of them
    settings = plan(preset, backbone, len(paths), side)
    settings.update({"data.root": str(folder.resolve()),
                     "data.labels_from_folders": labels_from_folders, "data.strict": strict,
                     "data.cache_dir": str((out / "cache").resolve()),
                     "model.num_clusters": clusters if isinstance(clusters, int) else None})
    if preset == "cpu":
        settings["device"] = "cpu"
    cfg = load_config(load_config(None, settings), overrides)
    if said:
        log.log(*said)
    return _cluster_into(cfg, folder, out, preset, side, clusters, k_range, criterion, export,
                         resume, force, started)


@exclusive
def _cluster_into(cfg: Config, folder: Path, out: Path, preset: str, side: int,
                  clusters: int | str | None, k_range: str | None, criterion: str,
                  export: str | None, resume: bool, force: bool, started: float) -> dict[str, Any]:
    """Take the run directory, decode the folder once (into ``RUN/cache``, which every stage
    then reads), fit the settings to the images that could be read, and run. A call refused
    before any stage began leaves no run directory behind when it made it."""
    from scanclust.data import build_dataset

    run = RunDir(out)
    created = not out.exists()
    run.lock()
    try:
        change = run.data_change(set(STAGE_DIRS), cfg.to_dict()) if not force else None
        if change is not None:
            stage, _, what = change
            raise RunDirError(f"the images in FOLDER {cfg.data.root} changed since the {stage} "
                              f"stage of {out} read them ({what}); run again with --force to "
                              f"redo every stage (the old output is kept aside), or into a new "
                              f"--out")
        dataset = build_dataset(cfg.data, "train")
        images = len(dataset)
        cfg = fit_to_folder(cfg, images, clusters)
        auto = clusters == "auto" or (clusters is None and not cfg.data.labels_from_folders)
        ks = parse_k_range(k_range, images) if auto else []
        log.info("cluster: %d images (median side %d px) in %s; preset %s, backbone %s at %d px; "
                 "epochs pretext %d, scan %d, selflabel %d; run directory %s", images, side,
                 folder, preset, cfg.model.backbone, cfg.data.image_size, cfg.pretext.epochs,
                 cfg.scan.epochs, cfg.selflabel.epochs, out)
        return run_cluster(cfg, out, clusters=clusters, ks=ks, criterion=criterion,
                           export=export, resume=resume, force=force, started=started,
                           images=images, classes=dataset.num_classes)
    except UserError:
        if created and not any(run.stage_dir(stage).exists() for stage in STAGE_DIRS):
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_cluster(cfg: Config, out: Path, *, clusters: int | str | None, ks: list[int],
                criterion: str, export: str | None, resume: bool, force: bool,
                started: float, images: int, classes: int | None) -> dict[str, Any]:
    """The stages through ``scanclust run``'s loop (``pipeline.run_stages``), K chosen
    between mine and SCAN when asked, then the report."""
    from scanclust import frozen_features
    from scanclust.pipeline import run_stages
    from scanclust.results import report

    overcluster = cfg.scan.overcluster

    def for_k(cfg: Config, k: int) -> Config:
        cfg = load_config(cfg, {"model.num_clusters": k}) if ks else cfg
        return fit_overcluster(cfg, overcluster, images, k)

    choose = None
    if ks:
        saved = chosen_earlier(out, ks, criterion) if not force else None
        # Without an earlier choice the largest K stands in for the number of clusters until
        # mining has run, so the checks made before pretext trains hold for every choice.
        cfg = for_k(cfg, saved or ks[-1])
        if saved is None:
            def choose(cfg: Config) -> Config:
                return for_k(cfg, choose_clusters(cfg, out, ks, criterion))
    elif cfg.model.num_clusters or classes:
        cfg = for_k(cfg, cfg.model.num_clusters or classes)

    with frozen_features.remembering():  # the frozen backbone's eval features, computed once
        run_stages(cfg, out, resume, force, before_scan=choose)
        summary = report(cfg, out, export=export)
    summary["total_seconds"] = time.perf_counter() - started
    log.info("cluster: done in %.1f s; open %s", summary["total_seconds"],
             Path(out) / "report.html")
    return summary


def chosen_earlier(out: Path, ks: list[int], criterion: str) -> int | None:
    """The K an earlier call chose over the same range with the same criterion, if any: a
    resumed run keeps it."""
    record = RunDir(out).root / "choose_k.json"
    if record.is_file():
        saved = read_json(record)
        if saved.get("ks") == ks and saved.get("criterion") == criterion:
            log.info("cluster: K = %d (chosen earlier, %s)", saved["k"], record)
            return int(saved["k"])
    return None


def choose_clusters(cfg: Config, out: Path, ks: list[int], criterion: str) -> int:
    """K from the mined train features, recorded in ``choose_k.json`` with its curve."""
    from scanclust.choose_k import plot_curve, score_partitions

    run = RunDir(out)
    t = time.perf_counter()
    choice = score_partitions(np.load(run.features("train")), ks, criterion, seed=cfg.seed)
    write_json(run.root / "choose_k.json", choice.to_dict())
    plot_curve(choice, run.root / "choose_k.png")
    log.info("cluster: K = %d by %s over K = %d..%d (%.1f s; curve in %s)", choice.k,
             criterion, ks[0], ks[-1], time.perf_counter() - t, run.root / "choose_k.png")
    return choice.k
