"""Cached-feature mode: features computed once, heads trained on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import scanclust
from scanclust.data.pipelines import FeaturePath, feature_store
from scanclust.engine import cache_features
from scanclust.config import load_config
from scanclust.data.datasets import ArrayDataset
from scanclust.data.pipelines import DevicePath
from scanclust.data.transforms import eval_transform
from scanclust.models import build_backbone
from tests.conftest import TINY

CPU = torch.device("cpu")


def test_cache_holds_the_eval_view_then_augmented_views() -> None:
    rng = np.random.default_rng(0)
    ds = ArrayDataset("t/train", rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
                      np.zeros(10, np.int64), ["a"])
    cfg = load_config("demo", {"data.image_size": 8, "progress": False})
    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny", 4).eval()
    feats = cache_features(backbone, DevicePath(cfg, CPU), ds, "strong", 2, 4, CPU, False, 0,
                           (CPU, torch.float32), False)
    assert feats.shape == (3, 10, 16)
    transform = eval_transform(8, cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        direct = backbone(torch.stack([transform(ds.load(i)) for i in range(10)]))
    torch.testing.assert_close(feats[0], direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats[1], feats[0]) and not torch.allclose(feats[1], feats[2])


def test_feature_batches_pick_cached_views() -> None:
    # feature value = 100 * view + sample, so every drawn row says where it came from
    views, n = 3, 20
    feats = (100 * torch.arange(views + 1)[:, None, None] + torch.arange(n)[None, :, None])
    path = FeaturePath(feats.float().expand(-1, -1, 2).contiguous(), torch.zeros(n), CPU)
    neighbors = torch.stack([(torch.arange(n) + 1) % n, (torch.arange(n) + 2) % n], dim=1)
    pairs = path.augment(None, {"anchor": "strong", "neighbor": "strong"}, neighbors.numpy())
    for item in map(pairs, path.batches(pairs, 5, shuffle=True, seed=0, train=True)):
        anchor_view, anchor_id = item["anchor"][:, 0].div(100).floor(), item["anchor"][:, 0] % 100
        assert torch.equal(anchor_id, item["index"].float())
        assert ((anchor_view >= 1) & (anchor_view <= views)).all()  # never the eval view
        offset = (item["neighbor"][:, 0] % 100 - item["index"]) % n
        assert set(offset.tolist()) <= {1, 2}
    weak_strong = path.augment(None, {"weak": "eval", "strong": "strong"})
    for item in map(weak_strong, path.batches(weak_strong, 5, shuffle=True, seed=0, train=True)):
        assert torch.equal(item["weak"][:, 0], item["index"].float())  # view 0, the eval view
        assert (item["strong"][:, 0] >= 100).all()


def test_feature_store_placement() -> None:
    gpu = torch.device("cuda")
    assert feature_store(1.0, 10, 1000, 512, gpu) == (gpu, torch.float16)  # 11 MB fits
    assert feature_store(1e-3, 10, 1000, 512, gpu) == (CPU, torch.float16)
    assert feature_store(1.0, 10, 1000, 512, CPU) == (CPU, torch.float32)
    assert feature_store(0.02, 10, 1000, 512, CPU) == (CPU, torch.float16)  # 22.5 MB > 20 MB


def test_frozen_backbone_pipeline_trains_heads_on_cached_features(tmp_path: Path) -> None:
    ov = TINY + ["scan.update_backbone=false", "scan.cached_views=2",
                 "selflabel.update_backbone=false", "selflabel.cached_views=2"]
    out = tmp_path / "run"
    metrics = scanclust.run("demo", out, overrides=ov)
    assert json.loads((out / "scan" / "summary.json").read_text())["data_path"] == "cached"
    assert json.loads((out / "selflabel" / "summary.json").read_text())["data_path"] == "cached"
    pretext = torch.load(out / "pretext" / "checkpoint.pt", weights_only=True)["model"]
    final = torch.load(out / "selflabel" / "checkpoint.pt", weights_only=True)["best"]["model"]
    for key, value in final.items():
        if key.startswith("backbone."):
            assert torch.equal(value, pretext[key]), f"{key} changed: the backbone was frozen"
    assert 0 <= metrics["stages"]["selflabel"]["acc"] <= 1
