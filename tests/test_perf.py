"""Speed switches change the speed, not the numbers: optimizer kernels, channels_last,
torch.compile, and the faiss mining backend, all on the CPU."""

from __future__ import annotations

import pytest
import torch

from scanclust.config import OptimConfig, load_config
from scanclust.knn import knn, knn_faiss, mine_neighbors
from scanclust.models import ClusterModel, build_backbone
from scanclust.engine import build_optimizer, prepare_model


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_kernels_agree(name: str) -> None:
    results = {}
    for impl in ("loop", "foreach", "fused"):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        optimizer = build_optimizer(model.parameters(), OptimConfig(name=name, lr=0.1), impl)
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(4, 6)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[impl] = model.weight.detach().clone()
    torch.testing.assert_close(results["foreach"], results["loop"])
    torch.testing.assert_close(results["fused"], results["loop"])


def test_channels_last_gives_the_same_outputs() -> None:
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = ClusterModel(build_backbone("resnet_tiny", 8), 4, 2).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        cfg = load_config("demo", {"perf.channels_last": True})
        fast = prepare_model(model, cfg, cpu)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


def test_compiled_model_matches_eager() -> None:
    torch.manual_seed(0)
    model = ClusterModel(build_backbone("resnet_tiny", 4), 3, 1).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
        cfg = load_config("demo", {"perf.compile": True, "perf.channels_last": False})
        compiled = prepare_model(model, cfg, torch.device("cpu"))
        torch.testing.assert_close(compiled(x), reference, atol=1e-5, rtol=1e-4)


def test_faiss_and_matmul_mining_agree() -> None:
    torch.manual_seed(0)
    feats = torch.randn(500, 16)
    a_idx, a_sim = knn(feats, 7, chunk_size=64)
    b_idx, b_sim = knn_faiss(feats, 7)
    assert torch.equal(a_idx, b_idx)
    torch.testing.assert_close(a_sim, b_sim, atol=1e-5, rtol=0)
    cpu = torch.device("cpu")
    for backend in ("auto", "torch", "faiss"):
        assert torch.equal(mine_neighbors(feats, 7, backend, 64, cpu), a_idx)


def test_faiss_drops_self_even_among_duplicates() -> None:
    feats = torch.randn(50, 8)
    feats[10:14] = feats[10]  # four identical rows
    idx, _ = knn_faiss(feats, 3)
    assert not (idx == torch.arange(50)[:, None]).any()
    assert set(idx[10].tolist()) == {11, 12, 13}
