"""The SCAN stage's pieces: partner drawing, label-free selection, the step body."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scanclust.checkpoint import FORMAT_VERSION, save_checkpoint
from scanclust.config import ScanConfig, load_config
from scanclust.data.datasets import ArrayDataset
from scanclust.data.pipelines import DevicePath, draw_partners
from scanclust.losses import scan_loss
from scanclust.models import ClusterModel, build_backbone
from scanclust.rundir import RunDir
from scanclust.models.saved import load_cluster_model
from scanclust.stages.scan import (AdaptivePrior, partner_table, scan_body, selection_loss,
                                   with_self)
from scanclust.step import TrainStep

CPU = torch.device("cpu")


def test_partner_is_the_image_itself_once_in_k_plus_one() -> None:
    k, n = 4, 1000
    neighbors = (np.arange(n)[:, None] + np.arange(1, k + 1)) % n
    table = partner_table(neighbors, ScanConfig())  # the released default: neighbours + self
    assert table.shape == (n, k + 1) and (table[:, 0] == np.arange(n)).all()
    torch.manual_seed(0)
    index = torch.arange(n).repeat(20)
    partners = draw_partners(index, torch.from_numpy(table), None)
    assert abs((partners == index).float().mean().item() - 1 / (k + 1)) < 0.01  # sd 0.003
    only = partner_table(neighbors, ScanConfig(partner="neighbors"))
    assert (draw_partners(index, torch.from_numpy(only), None) != index).all()


def test_k_zero_with_self_is_the_anchors_own_augmentation() -> None:
    table = partner_table(np.zeros((5, 0), np.int64), ScanConfig())
    assert (table == np.arange(5)[:, None]).all()


def test_selection_loss_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    logits = probs.log()[None]  # one head
    neighbors = np.array([[1, 2], [0, 2], [0, 1]])
    entropy = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))  # batch mean (0.6, 0.4)
    # released: first neighbour + self, weight 1. Pairs (0,0) (0,1) (1,1) (1,0) (2,2) (2,0).
    sims = [0.82, 0.74, 0.68, 0.74, 0.82, 0.18]
    released = -sum(map(math.log, sims)) / 6 - entropy
    got = selection_loss(logits, neighbors, ScanConfig(selection_neighbors=1))
    assert got.item() == pytest.approx(released, rel=1e-5)
    # the other reading: all neighbours, no self, the training weight 5
    sims = [0.74, 0.18, 0.74, 0.26, 0.18, 0.26]
    training = -sum(map(math.log, sims)) / 6 - 5 * entropy
    other = ScanConfig(selection_entropy_weight=None, selection_neighbors=None,
                       selection_self=False)
    assert selection_loss(logits, neighbors, other).item() == pytest.approx(training, rel=1e-5)
    assert (with_self(neighbors)[:, 0] == [0, 1, 2]).all()


def tiny_set(n: int = 12) -> ArrayDataset:
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return ArrayDataset("tiny", images, np.zeros(n, np.int64), None)


def test_scan_step_gives_the_scan_loss_and_its_gradients() -> None:
    # Eval views and one fixed neighbour make the step deterministic: its loss and gradients
    # must be those of scan_loss on the same two batches, computed in float64 (no oneDNN
    # kernel runs in float64, so the reference is right on any CPU; runtime.channels_last_fault).
    cfg = load_config("demo", {"data.image_size": 8, "progress": False})
    ds = tiny_set()
    path = DevicePath(cfg, CPU)
    neighbors = ((np.arange(12) + 3) % 12)[:, None]
    augment = path.augment(ds, {"anchor": "eval", "neighbor": "eval"}, neighbors)
    torch.manual_seed(0)
    model = ClusterModel(build_backbone("resnet_tiny", 4), 3, num_heads=2).eval()
    reference = copy.deepcopy(model).double()
    step = TrainStep(scan_body(model, augment, 5.0, CPU, False), model.parameters(), CPU, True)
    batch = {"index": torch.arange(6)}
    out = step(batch)
    assert step.mode == "eager"  # a CUDA graph needs CUDA
    grads = [p.grad.clone() for p in model.parameters()]
    views = path.augment(ds, {"x": "eval"})({"index": torch.arange(12)})["x"].double()
    views = views.contiguous()  # NCHW
    total, consistency, entropy = scan_loss(reference(views[:6]), reference(views[3:9]), 5.0)
    total.sum().backward()
    expected = torch.stack([total.sum(), consistency.mean(), entropy.mean()]).float()
    torch.testing.assert_close(out["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (p.grad for p in reference.parameters())):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)
    step(batch)  # a second step starts from fresh gradients, not accumulated ones
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)


def test_a_version_1_stl_run_still_loads(tmp_path: Path) -> None:
    # Before the released STL model, resnet18_stl meant torchvision's stem; such checkpoints
    # carry format version 1 and no keys for the released variants.
    run = RunDir(tmp_path)
    config = load_config("stl10").to_dict()
    del config["scan"]["partner"], config["augment"]["strong"]["cutout_side"]
    model = ClusterModel(build_backbone("resnet18"), 10)
    save_checkpoint(run.checkpoint("scan"), "scan", {
        "model": model.state_dict(), "best": {"model": model.state_dict(), "head": 0},
        "config": config, "num_clusters": 10, "num_heads": 1})
    payload = torch.load(run.checkpoint("scan"), weights_only=True)
    payload["format_version"] = 1
    torch.save(payload, run.checkpoint("scan"))
    loaded, state = load_cluster_model(run, "scan")
    assert loaded.backbone.conv1.kernel_size == (7, 7)
    assert state["config"]["model"]["backbone"] == "resnet18"
    assert state["config"]["scan"]["partner"] == "neighbors"
    assert state["config"]["augment"]["strong"]["cutout_side"] == "fixed"
    assert FORMAT_VERSION == 2


def test_adaptive_prior_follows_the_marginal_above_its_floor() -> None:
    prior = AdaptivePrior(1, 2, momentum=0.9, floor=0.2, device=torch.device("cpu"))
    assert prior.target().tolist() == [[0.5, 0.5]]
    prior.update(torch.tensor([[[30.0, -30.0]] * 8]))  # every sample certain of cluster 0
    # estimate 0.5 + 0.1 * (1 - 0.5) = 0.55; target 0.8 * 0.55 + 0.2 / 2 = 0.54
    assert prior.estimate[0].tolist() == pytest.approx([0.55, 0.45], abs=1e-6)
    assert prior.target()[0].tolist() == pytest.approx([0.54, 0.46], abs=1e-6)
    for _ in range(500):
        prior.update(torch.tensor([[[30.0, -30.0]] * 8]))
    assert prior.target()[0].tolist() == pytest.approx([0.9, 0.1], abs=1e-4)  # floor / K = 0.1


def test_adaptive_prior_is_uniform_during_its_warmup_epochs() -> None:
    prior = AdaptivePrior(1, 2, momentum=0.5, floor=0.2, device=torch.device("cpu"), warmup=2)
    for epoch in (0, 1):
        prior.begin_epoch(epoch)
        prior.update(torch.tensor([[[30.0, -30.0]] * 8]))  # every sample certain of cluster 0
        assert prior.target()[0].tolist() == [0.5, 0.5]
    # the estimate followed all the same: 0.5 -> 0.75 -> 0.875; target 0.8 * 0.875 + 0.1
    prior.begin_epoch(2)
    assert prior.target()[0].tolist() == pytest.approx([0.8, 0.2], abs=1e-6)
