"""Neighbour mining: the chunked top-k against brute force, and purity on a hand example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scanclust.knn import knn
from scanclust.stages.mine import neighbor_purity


def _brute_force(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats = F.normalize(features, dim=1)
    sims = feats @ feats.T
    sims.fill_diagonal_(float("-inf"))
    top_sims, top_idx = sims.topk(k, dim=1)
    return top_idx, top_sims


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("k", [1, 5])
def test_knn_equals_brute_force(chunk_size: int, k: int) -> None:
    torch.manual_seed(0)
    features = torch.randn(50, 6)
    indices, sims = knn(features, k, chunk_size=chunk_size)
    expected_idx, expected_sims = _brute_force(features, k)
    assert indices.dtype == torch.int64 and indices.shape == (50, k)
    assert torch.equal(indices, expected_idx)
    torch.testing.assert_close(sims, expected_sims)
    assert not (indices == torch.arange(50)[:, None]).any()


@pytest.mark.parametrize("chunk_size", [1, 2, 100])
def test_knn_duplicates_find_each_other(chunk_size: int) -> None:
    torch.manual_seed(1)
    features = torch.randn(6, 4)
    features[4] = features[1]
    indices, sims = knn(features, 2, chunk_size=chunk_size)
    assert indices[1, 0] == 4 and indices[4, 0] == 1
    assert sims[1, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert not (indices == torch.arange(6)[:, None]).any()


@pytest.mark.parametrize("k", [4, 5])
def test_knn_needs_more_samples_than_k(k: int) -> None:
    with pytest.raises(ValueError, match="neighbours"):
        knn(torch.randn(4, 3), k)


def test_neighbor_purity_hand_example() -> None:
    targets = np.array([0, 0, 1, 1])
    neighbors = np.array([[1, 3],   # same, other
                          [0, 2],   # same, other
                          [3, 1],   # same, other
                          [0, 2]])  # other, same
    # k=1: 3 of 4 first neighbours share the class; k=2: 4 of 8. k=5 is skipped.
    assert neighbor_purity(neighbors, targets, ks=(1, 2, 5)) == {"purity@1": 0.75, "purity@2": 0.5}


def test_a_folder_without_val_root_is_encoded_once(tmp_path, monkeypatch) -> None:
    """Its val split is the train images again: the same features and neighbours, one pass."""
    import scanclust
    import scanclust.stages.mine as mine_module
    from tests.conftest import TINY, write_digit_folder

    calls = []
    real = mine_module.extract_features
    monkeypatch.setattr(mine_module, "extract_features",
                        lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    write_digit_folder(tmp_path / "f", per_class=8, nested=False)
    ov = TINY + ["data.dataset=folder", f"data.root={tmp_path / 'f'}", "model.num_clusters=3",
                 f"data.cache_dir={tmp_path / 'cache'}", "pretext.epochs=1"]
    scanclust.pretext("demo", tmp_path / "run", overrides=ov)
    scanclust.mine("demo", tmp_path / "run", overrides=ov)
    assert calls == ["features train"]
    neighbors = tmp_path / "run" / "neighbors"
    assert np.array_equal(np.load(neighbors / "features_train.npy"),
                          np.load(neighbors / "features_val.npy"))
    assert np.array_equal(np.load(neighbors / "train.npy"), np.load(neighbors / "val.npy"))
