"""Limits of the later stages that the data alone decide, checked before pretext trains.

With the paper's recipe pretext trains for hours; a number of clusters larger than the data
set, or a K that leaves no neighbours to choose from, must fail before that, not after.
"""

from __future__ import annotations

from scanclust.config import Config, ConfigError
from scanclust.data import ImageDataset, build_dataset


def clusters_of(cfg: Config, dataset: ImageDataset) -> int:
    """``model.num_clusters``, else the number of classes of ``dataset``."""
    count = cfg.model.num_clusters or dataset.num_classes
    if count is None:
        raise ConfigError("config key 'model.num_clusters': the data set has no labels, so the "
                          "number of clusters must be given")
    return count


def num_clusters(cfg: Config, dataset: ImageDataset) -> int:
    """``clusters_of`` the train split, checked against its size."""
    count = clusters_of(cfg, dataset)
    if count > len(dataset):
        raise ConfigError(f"config key 'model.num_clusters': {count} clusters for only "
                          f"{len(dataset)} images")
    if count * cfg.scan.overcluster > len(dataset):
        raise ConfigError(f"config key 'scan.overcluster': {cfg.scan.overcluster} x {count} "
                          f"clusters to train for only {len(dataset)} images")
    return count


def check_topk(cfg: Config, size: int) -> None:
    if cfg.mine.topk >= size:
        raise ConfigError(f"config key 'mine.topk': {cfg.mine.topk} neighbours need more than "
                          f"{cfg.mine.topk} images, but the train split has {size}")


def preflight(cfg: Config) -> None:
    """Build the train and val splits (a bad folder fails now) and check clusters and K."""
    train = build_dataset(cfg.data, "train")
    build_dataset(cfg.data, "val")
    num_clusters(cfg, train)
    check_topk(cfg, len(train))
