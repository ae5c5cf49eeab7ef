"""Several processes (gloo on the CPU) against one: the global batch, gathering, mining, and
whole runs under torchrun (a kill, a resume, a restart).

The ``two_processes`` fixture spawns two processes that run the same checks as the test's own
single process, each on its half of every batch, and the tests compare what both sides saved.
Batch norm runs in eval mode in the step checks: SyncBatchNorm, which makes train-mode
statistics global, exists on CUDA only, so on a CPU each process normalises its own share.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import scanclust
from scanclust import distributed
from scanclust.checkpoint import load_checkpoint
from scanclust.config import ConfigError, load_config
from scanclust.data.datasets import ArrayDataset
from scanclust.data.pipelines import DevicePath, WorkerPath
from scanclust.knn import mine_neighbors
from scanclust.stages.mine import extract_features
from scanclust.models import ClusterModel, ContrastiveModel, build_backbone
from scanclust.stages.pretext import contrastive_body
from scanclust.runtime import seed_all
from scanclust.stages.scan import scan_body
from scanclust.stages.selflabel import selflabel_body
from scanclust.step import TrainStep
from scanclust.engine import prepare_model
from tests.conftest import TINY

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
BATCH = 8  # the global batch of the step checks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config():
    return load_config("demo", {"data.image_size": 8, "data.num_workers": 0, "progress": False,
                                "model.width": 8})


def step_views() -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed 'augmentations' of a fixed batch: the same in every process."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(BATCH, 3, 8, 8, generator=g), torch.rand(BATCH, 3, 8, 8, generator=g)


def run_step(model: torch.nn.Module, make_body) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step of this process's share of the batch 0..BATCH-1; returns the mean
    statistics over processes and the (averaged) gradients."""
    forward = prepare_model(model, config(), CPU, train=True)
    model.eval()
    step = TrainStep(make_body(forward), model.parameters(), CPU, graph=False)
    out = step({"index": distributed.local_batch(torch.arange(BATCH))})
    stats = {k: distributed.mean_over_processes(v.float()) for k, v in out.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return stats, grads


def stage_steps() -> dict[str, Any]:
    """Loss and gradients of one step of each stage's body, on fixed views."""
    x1, x2 = step_views()
    results: dict[str, Any] = {}

    torch.manual_seed(1)
    model = ContrastiveModel(build_backbone("resnet_tiny", 8), 32, 16)
    views = lambda b: {"view1": x1[b["index"]], "view2": x2[b["index"]]}  # noqa: E731
    results["pretext"] = run_step(model, lambda f: contrastive_body(f, views, 0.5, CPU, False))

    torch.manual_seed(2)
    model = ClusterModel(build_backbone("resnet_tiny", 8), 4, 2)
    pairs = lambda b: {"anchor": x1[b["index"]],  # noqa: E731
                       "neighbor": x2[(b["index"] + 3) % BATCH]}
    results["scan"] = run_step(model, lambda f: scan_body(f, pairs, 5.0, CPU, False))

    torch.manual_seed(3)
    model = ClusterModel(build_backbone("resnet_tiny", 8), 4, 1).eval()
    with torch.no_grad():  # heads that tell samples 0-3 apart: 5 of 8 pass 0.6, two in class 2
        features = model.backbone(x1)
        centre = features.mean(0)
        weight = features[:4] - centre
        weight = 200 * weight / weight.norm()
        model.heads.weight.copy_(weight)
        model.heads.bias.copy_(-weight @ centre)
    weak_strong = lambda b: {"weak": x1[b["index"]], "strong": x2[b["index"]]}  # noqa: E731
    results["selflabel"] = run_step(
        model, lambda f: selflabel_body(f, weak_strong, 0.6, True, CPU, False))
    return results


def tiny_dataset(n: int = 21) -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return ArrayDataset("tiny/train", images, np.arange(n) % 3, ["a", "b", "c"])


def inference() -> dict[str, Any]:
    """Features and neighbours of an odd-sized set (shards of 11 and 10 + 1 padding), worker-path
    strong views (seeded per sample), and the index batches of a training epoch on both paths."""
    ds, cfg = tiny_dataset(), config()
    torch.manual_seed(4)
    encoder = build_backbone("resnet_tiny", 8).eval()
    feats = extract_features(encoder, DevicePath(cfg, CPU), ds, 4, CPU, False, False)
    out: dict[str, Any] = {"features": feats}
    for backend in ("torch", "faiss"):
        out[backend] = mine_neighbors(feats, 3, backend, 5, CPU)
    views = WorkerPath(cfg, CPU).views(ds, {"x": "strong"}, 4, shuffle=False, seed=3,
                                       train=False, shard=True)
    out["strong"] = distributed.gather_rows(torch.cat([b["x"] for b in views]), len(ds))
    for path in (DevicePath(cfg, CPU), WorkerPath(cfg, CPU)):
        augment = path.augment(ds, {"x": "eval"})
        out[path.name] = [b["index"] for b in path.batches(augment, 8, shuffle=True, seed=5,
                                                            train=True)]
    seed_all(123)
    out["draw"] = torch.rand(3)
    try:
        distributed.on_main(lambda: (_ for _ in ()).throw(ConfigError("only main raised")))
    except ConfigError as err:
        out["error"] = str(err)
    return out


def _spawned(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({"steps": stage_steps(), "inference": inference()},
                   Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_spawned, args=(2, free_port(), str(folder)), nprocs=2)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    return {"steps": stage_steps(), "inference": inference()}


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["pretext", "scan", "selflabel"])
def test_two_half_batches_give_the_full_batch_loss_and_gradients(
        stage: str, two_processes: list[dict[str, Any]], one_process: dict[str, Any]) -> None:
    stats, grads = one_process["steps"][stage]
    for rank in (0, 1):
        got_stats, got_grads = two_processes[rank]["steps"][stage]
        for key, value in stats.items():
            torch.testing.assert_close(got_stats[key], value, atol=1e-5, rtol=0)
        assert got_grads.keys() == grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=0, msg=name)
    if stage == "selflabel":  # the mask and the class weights must have mattered
        assert int(stats["confident"]) == 5


@pytest.mark.distributed
def test_mining_from_two_processes_equals_one(two_processes: list[dict[str, Any]],
                                              one_process: dict[str, Any]) -> None:
    single = one_process["inference"]
    for result in two_processes:
        got = result["inference"]
        assert got["features"].shape == single["features"].shape == (21, 32)
        torch.testing.assert_close(got["features"], single["features"], atol=1e-6, rtol=0)
        for backend in ("torch", "faiss"):
            assert torch.equal(got[backend], single[backend]), backend
        assert torch.equal(got["strong"], single["strong"])  # per-sample seeds: same views


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["device", "workers"])
def test_each_process_takes_its_half_of_every_global_batch(
        path: str, two_processes: list[dict[str, Any]], one_process: dict[str, Any]) -> None:
    single = one_process["inference"][path]
    halves = [p["inference"][path] for p in two_processes]
    assert len(single) == len(halves[0]) == len(halves[1]) == 21 // 8
    for step, batch in enumerate(single):
        a, b = halves[0][step], halves[1][step]
        assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
        if path == "device":  # the same order: rank 0 the first half, rank 1 the second
            assert torch.equal(torch.cat([a, b]), batch)
        else:  # DistributedSampler interleaves the same permutation
            assert set(torch.cat([a, b]).tolist()) == set(batch.tolist())


@pytest.mark.distributed
def test_processes_draw_their_own_reproducible_augmentations(
        two_processes: list[dict[str, Any]], one_process: dict[str, Any]) -> None:
    draws = [p["inference"]["draw"] for p in two_processes]
    assert torch.equal(draws[0], one_process["inference"]["draw"])  # rank 0 keeps the seed
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.distributed
def test_an_error_of_the_main_process_stops_every_process(
        two_processes: list[dict[str, Any]]) -> None:
    assert [p["inference"]["error"] for p in two_processes] == ["only main raised"] * 2


def test_single_process_helpers_pass_through() -> None:
    x = torch.arange(6.0).view(3, 2)
    assert not distributed.active() and distributed.world_size() == 1
    assert distributed.gather(x) is x and distributed.reduce_sum(x) is x
    assert torch.equal(distributed.gather_rows(x, 3), x)
    assert torch.equal(distributed.local_batch(torch.arange(5)), torch.arange(5))
    assert torch.equal(distributed.shard_indices(4), torch.arange(4))
    assert distributed.on_main(lambda: 7) == 7


def test_batch_size_must_split_evenly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    distributed.check_batch_size(96, "scan.batch_size")
    with pytest.raises(ConfigError, match="scan.batch_size.*100.*3 processes"):
        distributed.check_batch_size(100, "scan.batch_size")


def test_shards_cover_the_data_set_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 samples over 2 processes: [0, 1, 2] and [3, 4, 0]; gathering keeps the first 5 rows.
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shards = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(distributed.shard_indices(5).tolist())
    assert shards == [[0, 1, 2], [3, 4, 0]]


def test_launched_processes_take_their_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 2)
    assert distributed.local_device(CPU) == CPU
    with pytest.raises(ConfigError, match="cuda:1 names one GPU for 4 processes"):
        distributed.local_device(torch.device("cuda", 1))


# --- whole runs under torchrun ----------------------------------------------------------------

def torchrun(*args: str, restarts: int = 0, kill: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m scanclust ARGS``; with ``kill`` the entry
    point is tests/ddp_kill.py, which SIGKILLs one process mid-epoch (its docstring says how)."""
    entry = [str(REPO / "tests" / "ddp_kill.py")] if kill else ["-m", "scanclust"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(kill or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "--max-restarts", str(restarts), *entry, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``scanclust run --config demo`` (tiny) on two processes: the run directory and stderr."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    result = torchrun("run", "--config", "demo", "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stderr


@pytest.mark.distributed
def test_torchrun_demo_pipeline_writes_one_run_directory(demo_run: tuple[Path, str]) -> None:
    out, stderr = demo_run
    assert [p.name for p in out.parent.iterdir()] == ["run"]
    for folder in ("pretext", "neighbors", "scan", "selflabel"):
        assert json.loads((out / folder / "summary.json").read_text())["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"kmeans", "scan", "selflabel"}
    assert metrics["stages"]["selflabel"]["num_samples"] == 200
    stages = [json.loads(line)["stage"] for line in (out / "log.jsonl").open()]
    assert stages.count("pretext") == 2 and stages.count("scan") == 2  # one writer, not two
    assert not list(out.rglob("*.tmp"))
    assert stderr.count("pretext epoch 1/2") == 1  # only the main process logs


KILLED = re.compile(r"exitcode\s*:\s*-9\b")  # torchrun's report of a process ended by SIGKILL


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_checkpoint(a), load_checkpoint(b)
    return first["epoch"] == second["epoch"] and all(
        torch.equal(value, second["model"][key]) for key, value in first["model"].items())


@pytest.mark.distributed
def test_kill_resume_and_restart_under_torchrun_equal_an_uninterrupted_run(
        demo_run: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The uninterrupted run: the demo pipeline's pretext, same config, same two processes.
    straight = demo_run[0] / "pretext" / "checkpoint.pt"
    args = ["pretext", "--config", "demo", *TINY]
    kill = {"KILL_STAGE": "pretext", "KILL_EPOCH": "2", "KILL_RANK": "1"}
    killed, restarted = tmp_path / "killed", tmp_path / "restarted"

    # kill -9 of process 1 in epoch 2 stops the whole job; epoch 1's checkpoint is there
    result = torchrun(*args, "--out", str(killed), kill=kill)
    assert result.returncode != 0 and KILLED.search(result.stderr)
    assert load_checkpoint(killed / "pretext" / "checkpoint.pt")["epoch"] == 1
    assert not (killed / "pretext" / "summary.json").exists()
    other_size = tmp_path / "other_size"
    shutil.copytree(killed, other_size)

    result = torchrun(*args, "--out", str(killed), "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming at epoch 1/2" in result.stderr
    assert same_weights(straight, killed / "pretext" / "checkpoint.pt")

    # torchrun --max-restarts restarts both processes, which continue from the checkpoint
    result = torchrun(*args, "--out", str(restarted), restarts=1, kill=kill)
    assert result.returncode == 0, result.stderr[-4000:]
    assert KILLED.search(result.stderr) and "restarted by torchrun" in result.stderr
    assert same_weights(straight, restarted / "pretext" / "checkpoint.pt")

    # another number of processes may resume, with a warning
    with caplog.at_level(logging.WARNING, logger="scanclust"):
        summary = scanclust.pretext("demo", other_size, overrides=TINY, resume=True)
    assert summary["world_size"] == 1 and summary["epochs"] == 2
    assert "written by 2 process(es), this run has 1" in caplog.text
