"""Speed switches change the speed, not the numbers: optimizer kernels, channels_last,
torch.compile, and the faiss mining backend, all on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanclust.config import ConfigError, OptimConfig, load_config
from scanclust.knn import knn, knn_faiss, mine_neighbors
from scanclust.models import ClusterModel, build_backbone, build_cluster_model
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


def _first_step(stage: str, compile_scope: str | bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one training step of ``stage`` (its own body, on a data set on
    the device, as the engine runs it) with ``perf.compile=compile_scope``, from one fixed
    initialisation and one fixed draw of the augmentations."""
    from scanclust.data.datasets import ArrayDataset
    from scanclust.data.pipelines import data_path_for
    from scanclust.engine import Loop
    from scanclust.models import build_contrastive_model
    from scanclust.stages.pretext import contrastive_body
    from scanclust.stages.scan import scan_body
    from scanclust.stages.selflabel import selflabel_body

    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    dataset = ArrayDataset("noise", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8),
                           np.arange(12) % 3, ["a", "b", "c"])
    cfg = load_config("demo", {"perf.compile": compile_scope, "perf.data_path": "device",
                               "model.width": 4, f"{stage}.batch_size": 8})
    data = data_path_for(cfg, cpu, dataset)
    torch.manual_seed(0)
    model = build_contrastive_model(cfg) if stage == "pretext" else build_cluster_model(cfg, 3, 2)
    forward = prepare_model(model, cfg, cpu, train=True)
    if stage == "pretext":
        augment = data.augment(dataset, {"view1": "simclr", "view2": "simclr"})
        body = contrastive_body(forward, augment, 0.1, cpu, False)
    elif stage == "scan":
        neighbors = (np.arange(12)[:, None] + np.arange(1, 6)) % 12
        augment = data.augment(dataset, {"anchor": "strong", "neighbor": "strong"}, neighbors)
        body = scan_body(forward, augment, 5.0, cpu, False)
    else:
        augment = data.augment(dataset, {"weak": "eval", "strong": "strong"})
        body = selflabel_body(forward, augment, 0.0, True, cpu, False)  # every sample trains
    loop = Loop(stage, cfg, None, model, body, data, augment, len(dataset), cpu)
    batch = next(iter(data.batches(augment, 8, shuffle=True, seed=0, train=True)))
    torch.manual_seed(1)
    with torch._inductor.config.patch(fallback_random=True):  # the eager step's random draws
        out = loop.step(batch)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return out["loss"], grads


@pytest.mark.parametrize("stage,scope", [("pretext", "model"), ("pretext", "step"),
                                         ("scan", "step"), ("selflabel", "step")])
def test_compiled_step_matches_eager(stage: str, scope: str) -> None:
    """torch.compile of the model, or of the whole step body (augmentation, forward, loss,
    backward), computes the eager step's loss and gradients."""
    torch._dynamo.reset()
    loss, grads = _first_step(stage, False)
    compiled_loss, compiled_grads = _first_step(stage, scope)
    assert torch.isfinite(loss).all() and float(loss.abs().sum()) > 0  # SCAN: one per head
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-4)
    assert len(compiled_grads) == len(grads) > 0
    for got, want in zip(compiled_grads, grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_compile_setting_is_checked() -> None:
    assert load_config("demo", {"perf.compile": True}).perf.compile is True  # older spelling
    with pytest.raises(ConfigError, match=r"perf.compile.*'graph' is not one of false, model"):
        load_config("demo", {"perf.compile": "graph"})
