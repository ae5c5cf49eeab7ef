"""The two data paths yield the same batches in shape and meaning; only the speed differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanclust.config import load_config
from scanclust.data.datasets import ArrayDataset
from scanclust.data.pipelines import DevicePath, WorkerPath, data_path_for, fits_on_device, num_batches

CPU = torch.device("cpu")


def tiny_dataset(n: int = 40, size: int = 12) -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArrayDataset("tiny/train", images, np.arange(n) % 4, ["a", "b", "c", "d"])


def config(**extra: object):
    return load_config("demo", {"data.image_size": 12, "data.num_workers": 0, "progress": False,
                                **extra})


@pytest.mark.parametrize(("n", "batch", "train", "expected"), [
    (10, 4, True, (4, 2)),    # the partial last batch is dropped in training
    (10, 4, False, (4, 3)),   # but kept when extracting features
    (3, 8, True, (3, 1)),     # a data set smaller than a batch is one batch
    (8, 4, True, (4, 2)),
])
def test_num_batches(n: int, batch: int, train: bool, expected: tuple[int, int]) -> None:
    assert num_batches(n, batch, train) == expected


@pytest.mark.parametrize("path_cls", [WorkerPath, DevicePath])
def test_views_have_the_same_shape_on_both_paths(path_cls) -> None:
    ds, cfg = tiny_dataset(), config()
    batches = path_cls(cfg, CPU).views(ds, {"a": "simclr", "b": "strong", "c": "eval"}, 16,
                                       shuffle=True, seed=3, train=True)
    items = list(batches)
    assert len(items) == len(batches) == 2
    for item in items:
        assert set(item) == {"a", "b", "c", "index", "label"}
        for view in ("a", "b", "c"):
            assert item[view].shape == (16, 3, 12, 12) and item[view].dtype == torch.float32
        assert torch.equal(item["label"], torch.as_tensor(ds.targets)[item["index"]])
    seen = torch.cat([item["index"] for item in items])
    assert len(set(seen.tolist())) == 32  # a permutation: no sample twice in an epoch


def test_eval_view_is_identical_on_both_paths() -> None:
    ds, cfg = tiny_dataset(), config()
    kwargs = dict(shuffle=False, seed=0, train=False)
    a = torch.cat([b["x"] for b in WorkerPath(cfg, CPU).views(ds, {"x": "eval"}, 16, **kwargs)])
    b = torch.cat([b["x"] for b in DevicePath(cfg, CPU).views(ds, {"x": "eval"}, 16, **kwargs)])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_device_path_is_reproducible_per_seed() -> None:
    ds, cfg = tiny_dataset(), config()

    def first(seed: int) -> torch.Tensor:
        return next(iter(DevicePath(cfg, CPU).views(ds, {"x": "strong"}, 8, shuffle=True,
                                                     seed=seed, train=True)))["x"]

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def pairs(path, ds, neighbors: np.ndarray, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """An epoch of SCAN pairs as the stage makes them: augment(views, neighbors) + batches."""
    augment = path.augment(ds, {"anchor": "strong", "neighbor": "strong"}, neighbors)
    return [augment(b) for b in path.batches(augment, batch_size, shuffle=True, seed=0,
                                             train=True)]


@pytest.mark.parametrize("path_cls", [WorkerPath, DevicePath])
def test_pairs_draw_a_mined_neighbour(path_cls) -> None:
    ds, cfg = tiny_dataset(), config()
    neighbors = np.stack([(np.arange(40) + k) % 40 for k in (1, 2, 3)], axis=1)
    torch.manual_seed(0)
    offsets = []
    for item in pairs(path_cls(cfg, CPU), ds, neighbors, 10):
        offsets += ((item["neighbor_index"] - item["index"]) % 40).tolist()
        assert item["anchor"].shape == item["neighbor"].shape == (10, 3, 12, 12)
    assert set(offsets) == {1, 2, 3}


@pytest.mark.parametrize("path_cls", [WorkerPath, DevicePath])
def test_pairs_with_k_zero_pair_the_anchor_with_itself(path_cls) -> None:
    ds, cfg = tiny_dataset(), config()
    item = pairs(path_cls(cfg, CPU), ds, np.zeros((40, 0), np.int64), 8)[0]
    assert torch.equal(item["neighbor_index"], item["index"])
    assert not torch.equal(item["anchor"], item["neighbor"])  # two different augmentations


def test_device_pairs_show_the_partner_image() -> None:
    # Eval views are deterministic, so each neighbour view must equal its partner's own view.
    ds, cfg = tiny_dataset(), config()
    path = DevicePath(cfg, CPU)
    neighbors = np.stack([(np.arange(40) + 5) % 40], axis=1)
    augment = path.augment(ds, {"anchor": "eval", "neighbor": "eval"}, neighbors)
    item = augment({"index": torch.arange(8)})
    every = path.augment(ds, {"x": "eval"})({"index": torch.arange(40)})["x"]
    assert torch.equal(item["neighbor_index"], torch.arange(8) + 5)
    assert torch.equal(item["neighbor"], every[5:13]) and torch.equal(item["anchor"], every[:8])


def test_device_augment_runs_one_call_per_view_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    # A SCAN pair (or the two SimCLR views) is one augmentation call on twice the batch.
    ds, cfg = tiny_dataset(), config()
    path = DevicePath(cfg, CPU)
    calls: list[tuple[str, int]] = []
    make = path.make
    monkeypatch.setattr(path, "make", lambda kind, x, g: calls.append((kind, len(x))) or
                        make(kind, x, g))
    path.augment(ds, {"view1": "simclr", "view2": "simclr"})({"index": torch.arange(6)})
    assert calls == [("simclr", 12)]
    calls.clear()
    path.augment(ds, {"weak": "eval", "strong": "strong"})({"index": torch.arange(6)})
    assert sorted(calls) == [("eval", 6), ("strong", 6)]


def test_auto_keeps_small_sets_on_the_device() -> None:
    ds = tiny_dataset()
    assert fits_on_device(config(), ds)  # 40 x 3 x 12 x 12 bytes
    assert not fits_on_device(config(**{"perf.device_data_gb": 1e-6}), ds)  # 17,280 > 1,000
    assert isinstance(data_path_for(config(), CPU, ds), DevicePath)
    assert isinstance(data_path_for(config(**{"perf.device_data_gb": 1e-6}), CPU, ds), WorkerPath)
    assert isinstance(data_path_for(config(**{"perf.data_path": "workers"}), CPU, ds), WorkerPath)


def test_worker_views_depend_on_seed_and_image_not_on_workers() -> None:
    # Each sample is seeded from (epoch seed, index): 0 or 2 workers (persistent across the two
    # epochs) give the same batches and views; another epoch gives other views.
    ds = tiny_dataset()

    def two_epochs(workers: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        path = WorkerPath(config(**{"data.num_workers": workers}), CPU)
        augment = path.augment(ds, {"x": "strong"})
        return [[(b["index"], augment(b)["x"]) for b in
                 path.batches(augment, 16, shuffle=True, seed=seed, train=True)]
                for seed in (1, 2)]

    inline, workers = two_epochs(0), two_epochs(2)
    for epoch_a, epoch_b in zip(inline, workers):
        for (index_a, x_a), (index_b, x_b) in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(index_a, index_b) and torch.equal(x_a, x_b)
    assert not torch.equal(inline[0][0][1], inline[1][0][1])
