"""Whole runs at toy scale: the CLI end to end, resume after a kill, and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import scanclust
import scanclust.stages.pretext as pretext_module
import scanclust.stages.scan as scan_module
import scanclust.stages.selflabel as selflabel_module
from scanclust import engine
from scanclust.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scanclust.config import ConfigError, load_config
from scanclust.data import build_dataset
from scanclust.metrics import cluster_metrics
from scanclust.models.saved import load_cluster_model
from scanclust.rundir import RunDir, RunDirError
from tests.conftest import TINY
from tests.kill_runner import launch

# ``scanclust.scan`` is the stage function; the modules hold the training loops to interrupt.


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scanclust", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def quick_cli(*args: str) -> subprocess.CompletedProcess:
    """The command line in a child forked from a process that has imported scanclust already:
    the same code path as ``cli`` without the seconds of importing torch."""
    code, stderr = launch({"event": "none"}, list(args))
    return subprocess.CompletedProcess(args, code, "", stderr)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run through the command line, shared by the checks below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = cli("run", "--config", "demo", "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    (out.parent / "stderr.txt").write_text(result.stderr)
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_cli_run_writes_metrics_in_the_documented_format(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["dataset"] == "digits" and metrics["num_clusters"] == 10
    assert set(metrics["stages"]) == {"kmeans", "scan", "selflabel"}
    for row in metrics["stages"].values():
        assert row["num_samples"] == 200
    # the self-label row is what the final model's predictions on the val split score
    cfg = load_config(finished_run / "config.yaml")
    val = build_dataset(cfg.data, "val")
    pred, _ = scanclust.load(finished_run, device="cpu").predict(val.images)
    again = cluster_metrics(pred, val.targets, 10, 10)
    for key in ("acc", "nmi", "ari", "ami"):
        assert metrics["stages"]["selflabel"][key] == pytest.approx(again[key], abs=1e-6), key
    assert set(metrics["neighbors"]) == {"purity@1", "purity@5"}  # topk=5 in the tiny run
    assert set(metrics["seconds"]) == {"pretext", "mine", "scan", "selflabel", "evaluate"}


def test_cli_run_writes_every_file_of_the_run_directory(finished_run: Path) -> None:
    for name in ("config.yaml", "log.jsonl", "neighbors/train.npy", "neighbors/val.npy",
                 "neighbors/purity.json", "figures/selflabel_confusion.png",
                 "figures/scan_prototypes.png", "figures/selflabel_low_confidence.png"):
        assert (finished_run / name).is_file(), name
    neighbors = np.load(finished_run / "neighbors/train.npy")
    assert neighbors.shape == (200, 5)
    assert not (neighbors == np.arange(200)[:, None]).any()  # nobody is their own neighbour
    stages = [json.loads(line)["stage"] for line in (finished_run / "log.jsonl").open()]
    assert stages.count("pretext") == 2 and stages.count("scan") == 2
    for stage in ("pretext", "scan", "selflabel"):
        state = load_checkpoint(finished_run / stage / "checkpoint.pt", stage)
        assert state["epoch"] == 2 and "optimizer" in state and "rng" in state


def test_predict_agrees_with_evaluation(finished_run: Path) -> None:
    clusterer = scanclust.load(finished_run, device="cpu")
    assert clusterer.stage == "selflabel"
    val = build_dataset(clusterer.config.data, "val")
    labels, probs = clusterer.predict([val.load(i) for i in range(len(val))])
    metrics = json.loads((finished_run / "metrics.json").read_text())
    sizes = np.bincount(labels, minlength=10).tolist()
    assert sizes == metrics["stages"]["selflabel"]["cluster_sizes"]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_rerun_without_resume_refuses_and_keeps_results(finished_run: Path) -> None:
    files = [finished_run / "pretext" / "checkpoint.pt", finished_run / "config.yaml"]
    before = [digest(f) for f in files]
    result = cli("run", "--config", "demo", "--out", str(finished_run), *TINY, "pretext.epochs=5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--resume" in result.stderr
    assert [digest(f) for f in files] == before


def test_resume_of_a_finished_run_changes_nothing(finished_run: Path) -> None:
    before = digest(finished_run / "selflabel" / "checkpoint.pt")
    result = cli("run", "--config", "demo", "--out", str(finished_run), "--resume", *TINY)
    assert result.returncode == 0, result.stderr
    assert digest(finished_run / "selflabel" / "checkpoint.pt") == before
    assert "selflabel: already done" in result.stderr
    assert "finished in" not in result.stderr.replace("evaluate finished in", "")


def test_output_has_no_library_noise(finished_run: Path) -> None:
    """faiss logs 'Could not load library ... ModuleNotFoundError' at import; not ours to show."""
    stderr = (finished_run.parent / "stderr.txt").read_text()
    assert "mine finished in" in stderr
    assert "faiss" not in stderr and "ModuleNotFoundError" not in stderr


def test_json_files_are_strict_when_a_value_is_not_finite(tmp_path: Path) -> None:
    """Zero SCAN epochs leave the best held-out loss at infinity; JSON has no such number."""
    out = tmp_path / "run"
    ov = TINY + ["pretext.epochs=1", "scan.epochs=0"]
    for stage in (scanclust.pretext, scanclust.mine, scanclust.scan):
        stage("demo", out, overrides=ov)

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    summary = json.loads((out / "scan" / "summary.json").read_text(), parse_constant=no_constants)
    assert summary["best_loss"] is None


class Killed(Exception):
    """Stands in for SIGKILL: the stage stops between epochs, after a checkpoint."""


def kill_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    real = engine.train_one_epoch
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", wrapped)


def test_killed_then_resumed_run_equals_uninterrupted(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ov = TINY + ["pretext.epochs=3", "scan.epochs=3", "selflabel.epochs=3"]
    straight = tmp_path / "straight"
    for stage in (scanclust.pretext, scanclust.mine, scanclust.scan, scanclust.selflabel):
        stage("demo", straight, overrides=ov)

    resumed = tmp_path / "resumed"
    for module, stage in ((pretext_module, scanclust.pretext), (None, scanclust.mine),
                          (scan_module, scanclust.scan), (selflabel_module, scanclust.selflabel)):
        if module is not None:
            with monkeypatch.context() as m:
                kill_at_epoch(m, 2)
                with pytest.raises(Killed):
                    stage("demo", resumed, overrides=ov)
            assert load_checkpoint(resumed / module.STAGE / "checkpoint.pt")["epoch"] == 1
            with pytest.raises(RunDirError, match="unfinished"):
                stage("demo", resumed, overrides=ov)
        stage("demo", resumed, overrides=ov, resume=module is not None)

    for stage in ("pretext", "scan", "selflabel"):
        a = load_checkpoint(straight / stage / "checkpoint.pt")
        b = load_checkpoint(resumed / stage / "checkpoint.pt")
        assert a["epoch"] == b["epoch"] == 3
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), f"{stage}: {key} differs after resume"
    assert np.array_equal(np.load(straight / "neighbors/train.npy"),
                          np.load(resumed / "neighbors/train.npy"))


def test_adaptive_prior_and_per_cluster_selection_resume_identically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the prior's estimate lives in the scan checkpoint, its warm-up (1 of 3 epochs) follows the
    # resumed epoch; per-cluster self-label trains at a threshold (0.999) no sample of this tiny
    # model reaches
    ov = TINY + ["pretext.epochs=1", "scan.epochs=3", "selflabel.epochs=3", "scan.prior=adaptive",
                 "scan.prior_warmup=0.34", "selflabel.selection=per_cluster",
                 "selflabel.threshold=0.999"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out in (straight, resumed):
        scanclust.pretext("demo", out, overrides=ov)
        scanclust.mine("demo", out, overrides=ov)
    for stage in (scanclust.scan, scanclust.selflabel):
        stage("demo", straight, overrides=ov)
        with monkeypatch.context() as m:
            kill_at_epoch(m, 2)
            with pytest.raises(Killed):
                stage("demo", resumed, overrides=ov)
        stage("demo", resumed, overrides=ov, resume=True)
    a = load_checkpoint(straight / "scan" / "checkpoint.pt")
    b = load_checkpoint(resumed / "scan" / "checkpoint.pt")
    assert a["prior"].shape[-1] == 10 and torch.equal(a["prior"], b["prior"])  # [heads, K]
    assert torch.allclose(a["prior"].sum(-1), torch.ones(len(a["prior"])), atol=1e-5)
    for stage in ("scan", "selflabel"):
        a = load_checkpoint(straight / stage / "checkpoint.pt")["model"]
        b = load_checkpoint(resumed / stage / "checkpoint.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    summary = json.loads((straight / "selflabel" / "summary.json").read_text())
    assert summary["selection"] == "per_cluster" and summary["confident"] == 0
    assert summary["kept_epoch"] >= 1  # it trained, where the threshold would keep SCAN's weights


def test_overclustered_scan_merges_to_k_and_resumes_identically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 x 10 clusters trained, merged to 10 on the kNN graph; the merge is in both checkpoints,
    # self-label trains through it, and evaluation and predict see 10 clusters
    ov = TINY + ["pretext.epochs=1", "scan.epochs=3", "selflabel.epochs=2", "scan.overcluster=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out in (straight, resumed):
        scanclust.pretext("demo", out, overrides=ov)
        scanclust.mine("demo", out, overrides=ov)
    scanclust.scan("demo", straight, overrides=ov)
    with monkeypatch.context() as m:
        kill_at_epoch(m, 2)
        with pytest.raises(Killed):
            scanclust.scan("demo", resumed, overrides=ov)
    scanclust.scan("demo", resumed, overrides=ov, resume=True)
    summary = json.loads((straight / "scan" / "summary.json").read_text())
    assert summary["num_clusters"] == 10 and summary["trained_clusters"] == 30
    assert len(summary["merge"]) == 30 and sorted(set(summary["merge"])) == list(range(10))
    assert sum(summary["trained_sizes"]) == 200
    a = load_checkpoint(straight / "scan" / "checkpoint.pt")
    b = load_checkpoint(resumed / "scan" / "checkpoint.pt")
    assert a["merge"] == b["merge"] == summary["merge"]
    assert a["best"]["model"]["heads.weight"].shape[0] == 30 * a["num_heads"]
    metrics = scanclust.run("demo", straight, overrides=ov, resume=True)
    for stage in ("scan", "selflabel"):
        assert len(metrics["stages"][stage]["cluster_sizes"]) == 10, stage
    assert load_checkpoint(straight / "selflabel" / "checkpoint.pt")["merge"] == a["merge"]
    dataset = build_dataset(load_config("demo", ov).data, "val")
    labels, probs = scanclust.predict(straight, [dataset.load(i) for i in range(4)], device="cpu")
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # a merge that leaves a merged cluster without a member is refused, naming the file
    path = straight / "selflabel" / "checkpoint.pt"
    state = load_checkpoint(path)
    save_checkpoint(path, "selflabel", {**state, "merge": [0] * 20 + list(range(2, 12))})
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: a merge must give every merged "
                                                        "cluster 0..11 a member")):
        load_cluster_model(RunDir(straight), "selflabel")


def test_worker_data_path_runs_every_stage(tmp_path: Path) -> None:
    ov = TINY + ["perf.data_path=workers", "pretext.epochs=1", "scan.epochs=1",
                 "selflabel.epochs=1"]
    metrics = scanclust.run("demo", tmp_path / "run", overrides=ov)
    for stage in ("pretext", "scan", "selflabel"):
        summary = json.loads((tmp_path / "run" / stage / "summary.json").read_text())
        assert summary["data_path"] == "workers"
    assert metrics["stages"]["selflabel"]["num_samples"] == 200


def test_force_keeps_the_old_output_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    scanclust.pretext("demo", out, overrides=TINY + ["pretext.epochs=1"])
    scanclust.pretext("demo", out, overrides=TINY + ["pretext.epochs=1"], force=True)
    aside = [p for p in tmp_path.joinpath("run").iterdir() if p.name.startswith("pretext.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint.pt").is_file()


def test_k_zero_trains_on_the_anchor_itself(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ov = TINY + ["scan.num_neighbors=0", "pretext.epochs=1", "scan.epochs=1"]
    scanclust.pretext("demo", out, overrides=ov)
    scanclust.mine("demo", out, overrides=ov)
    summary = scanclust.scan("demo", out, overrides=ov)
    assert summary["best_epoch"] == 1 and np.isfinite(summary["best_loss"])


def test_several_heads_keep_the_lowest_loss_head(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ov = TINY + ["scan.num_heads=3", "pretext.epochs=1", "scan.epochs=2"]
    scanclust.pretext("demo", out, overrides=ov)
    scanclust.mine("demo", out, overrides=ov)
    summary = scanclust.scan("demo", out, overrides=ov)
    history = load_checkpoint(out / "scan" / "checkpoint.pt")["history"]
    losses = np.array(history)  # [epochs, heads]
    epoch, head = np.unravel_index(losses.argmin(), losses.shape)
    assert (summary["best_epoch"], summary["best_head"]) == (epoch + 1, head)
    assert summary["best_loss"] == pytest.approx(losses.min())


def test_seeds_report_mean_and_std(tmp_path: Path) -> None:
    ov = TINY + ["pretext.epochs=1", "scan.epochs=1", "selflabel.epochs=1"]
    summary = scanclust.run("demo", tmp_path / "seeds", overrides=ov, seeds=2)
    acc = summary["mean_std"]["stages"]["scan"]["acc"]
    accs = [json.loads((tmp_path / "seeds" / f"seed_{i}" / "metrics.json").read_text())
            ["stages"]["scan"]["acc"] for i in range(2)]
    assert acc["n"] == 2 and acc["mean"] == pytest.approx(np.mean(accs))
    assert acc["std"] == pytest.approx(np.std(accs))
    assert summary["seeds"] == [0, 1]


def test_image_folder_pipeline_on_real_jpegs(cifar_jpeg: Path, tmp_path: Path) -> None:
    ov = [o for o in TINY if not o.startswith(("data.dataset", "data.image_size", "data.max"))]
    ov += ["data.dataset=folder", f"data.root={cifar_jpeg / 'train'}",
           f"data.val_root={cifar_jpeg / 'test'}", "data.image_size=32",
           "data.mean=[0.49, 0.48, 0.45]", "data.std=[0.25, 0.24, 0.26]"]
    metrics = scanclust.run("demo", tmp_path / "folder", overrides=ov)
    assert metrics["dataset"] == "folder" and metrics["num_clusters"] == 10
    assert metrics["stages"]["selflabel"]["num_samples"] == 100
    run = tmp_path / "folder" / "neighbors"
    targets, first = np.load(run / "targets_train.npy"), np.load(run / "train.npy")[:, 0]
    assert metrics["neighbors"]["purity@1"] == pytest.approx((targets[first] == targets).mean())


# --- bad input: one line naming the problem, exit code 2, nothing lost ---------------------

def test_unknown_config_key_names_it() -> None:
    result = cli("pretext", "--config", "demo", "--out", "unused", "scan.epochz=3")
    assert result.returncode == 2
    assert "scan.epochz" in result.stderr and "scan.epochs" in result.stderr
    assert "in the overrides" in result.stderr and "demo.yaml" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_missing_dataset_root_names_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("pretext", "--config", "cifar10", "--out", str(tmp_path / "run"),
                 f"data.root={empty}", "data.download=false", "device=cpu")
    assert result.returncode == 2
    assert f"data.root={empty}" in result.stderr and "CIFAR-10" in result.stderr


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    result = cli("run", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_topk_larger_than_the_data_is_an_error_and_pretext_survives(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ov = TINY + ["data.max_images=12", "pretext.epochs=1", "pretext.batch_size=6"]
    scanclust.pretext("demo", out, overrides=ov)
    before = digest(out / "pretext" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="mine.topk"):
        scanclust.mine("demo", out, overrides=ov + ["mine.topk=20"])
    assert digest(out / "pretext" / "checkpoint.pt") == before


def test_more_clusters_than_images_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ov = TINY + ["data.max_images=30", "pretext.epochs=1"]
    scanclust.pretext("demo", out, overrides=ov)
    scanclust.mine("demo", out, overrides=ov)
    with pytest.raises(ConfigError, match="model.num_clusters"):
        scanclust.scan("demo", out, overrides=ov + ["model.num_clusters=40"])


def test_checkpoint_of_another_stage_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ov = TINY + ["pretext.epochs=1", "scan.epochs=1"]
    for stage in (scanclust.pretext, scanclust.mine, scanclust.scan):
        stage("demo", out, overrides=ov)
    (out / "pretext" / "checkpoint.pt").write_bytes((out / "scan" / "checkpoint.pt").read_bytes())
    with pytest.raises(RunDirError, match="checkpoint.pt changed after the pretext stage wrote it"):
        scanclust.mine("demo", out, overrides=ov, force=True)
    assert (out / "scan" / "checkpoint.pt").is_file()


def test_stage_without_its_input_says_what_to_run(tmp_path: Path) -> None:
    result = cli("scan", "--config", "demo", "--out", str(tmp_path / "run"), *TINY)
    assert result.returncode == 2 and "scanclust mine" in result.stderr


def test_demo_meets_its_promise(tmp_path: Path) -> None:
    """The README's first command: offline, CPU, <= 180 s, ACC >= 0.88, SCAN above k-means."""
    started = time.perf_counter()
    result = cli("demo", "--out", str(tmp_path / "demo"), "--quiet", cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "kmeans" in result.stdout and "selflabel" in result.stdout
    stages = json.loads((tmp_path / "demo" / "metrics.json").read_text())["stages"]
    assert stages["selflabel"]["acc"] >= 0.88
    assert stages["scan"]["acc"] > stages["kmeans"]["acc"]
    assert (tmp_path / "demo" / "figures" / "selflabel_confusion.png").is_file()
    assert seconds <= 180, f"demo took {seconds:.0f} s"


# --- a run directory that cannot be left wrong ---------------------------------------------

def test_redone_pretext_makes_later_stages_refuse_until_redone(finished_run: Path,
                                                               tmp_path: Path) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    before = digest(run / "metrics.json")
    scanclust.pretext("demo", run, overrides=TINY, force=True)
    with pytest.raises(RunDirError, match=r"neighbors was built from another pretext output.*"
                                          r"scanclust mine --out .* --force"):
        scanclust.run("demo", run, overrides=TINY, resume=True)
    assert digest(run / "metrics.json") == before  # refused before any stage ran
    scanclust.mine("demo", run, overrides=TINY, force=True)
    with pytest.raises(RunDirError, match="scan was built from another pretext output"):
        scanclust.evaluate("demo", run, overrides=TINY)


def test_after_a_redone_pretext_every_reader_names_mine(finished_run: Path,
                                                       tmp_path: Path) -> None:
    """Not scan: ``scan --force`` would itself be refused until mine is redone."""
    run = copy_run(finished_run, tmp_path / "run")
    scanclust.pretext("demo", run, overrides=TINY, force=True)
    expected = (f"{run}/neighbors was built from another pretext output than the one in "
                f"{run}/pretext (pretext was redone or replaced since); redo it with `scanclust "
                f"mine --out {run} --force` (its old output is kept aside), then the stages "
                f"after it")
    for call in (lambda: scanclust.evaluate("demo", run, overrides=TINY),
                 lambda: scanclust.scan("demo", run, overrides=TINY, force=True),
                 lambda: scanclust.load(run)):  # predict: the final model is built on it
        with pytest.raises(RunDirError) as err:
            call()
        assert str(err.value) == expected


def test_evaluate_refuses_a_checkpoint_of_another_run(finished_run: Path, tmp_path: Path) -> None:
    """Same shapes, another seed: only the lineage tells the checkpoints apart."""
    ours = copy_run(finished_run, tmp_path / "ours")
    other = copy_run(finished_run, tmp_path / "other")
    scanclust.scan("demo", other, overrides=TINY + ["seed=1"], force=True)
    shutil.copy(other / "scan" / "checkpoint.pt", ours / "scan" / "checkpoint.pt")
    before = digest(ours / "metrics.json")
    with pytest.raises(RunDirError, match="checkpoint.pt changed after the scan stage wrote it"):
        scanclust.evaluate("demo", ours, overrides=TINY)
    assert digest(ours / "metrics.json") == before


def test_refused_resume_keeps_config_yaml_and_later_resumes_work(finished_run: Path,
                                                                 tmp_path: Path) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    before = digest(run / "config.yaml")
    result = quick_cli("run", "--out", str(run), "--resume", "model.width=16")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "model.width (8 -> 16)" in result.stderr and "--force" in result.stderr
    assert digest(run / "config.yaml") == before
    result = quick_cli("run", "--out", str(run), "--resume")
    assert result.returncode == 0, result.stderr


def test_resume_with_other_epoch_counts(finished_run: Path, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"scan.epochs \(2 -> 1\)"):
        scanclust.run("demo", run, overrides=TINY + ["scan.epochs=1"], resume=True)
    with caplog.at_level(logging.WARNING, logger="scanclust"):
        scanclust.run("demo", run, overrides=TINY + ["scan.epochs=3"], resume=True)
    assert "scan finished with 2 epochs; scan.epochs=3 is not applied" in caplog.text
    assert load_checkpoint(run / "scan" / "checkpoint.pt")["epoch"] == 2
    config = run / "config.yaml"
    assert yaml.safe_load(config.read_text())["scan"]["epochs"] == 2  # as the kept stage ran
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scanclust"):
        scanclust.run(None, run, resume=True)  # from config.yaml: nothing to warn about
    assert "not applied" not in caplog.text
    scanclust.selflabel(None, run, overrides=["scan.epochs=3"], force=True)
    assert yaml.safe_load(config.read_text())["scan"]["epochs"] == 2


def test_more_epochs_continue_an_unfinished_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_at_epoch(m, 2)
        with pytest.raises(Killed):
            scanclust.pretext("demo", out, overrides=TINY)
    with caplog.at_level(logging.WARNING, logger="scanclust"):
        scanclust.pretext("demo", out, overrides=TINY + ["pretext.epochs=3"], resume=True)
    assert "pretext continues to 3 epochs instead of 2" in caplog.text
    assert load_checkpoint(out / "pretext" / "checkpoint.pt")["epoch"] == 3


def _unfinished_pretext(finished_run: Path, to: Path) -> Path:
    run = copy_run(finished_run, to)
    for stage in ("neighbors", "scan", "selflabel"):
        shutil.rmtree(run / stage)
    (run / "pretext" / "summary.json").unlink()
    return run


def test_wrong_shape_tensor_in_a_checkpoint_is_one_line(finished_run: Path,
                                                        tmp_path: Path) -> None:
    run = _unfinished_pretext(finished_run, tmp_path / "run")
    state = load_checkpoint(run / "pretext" / "checkpoint.pt")
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)
    torch.save(state, run / "pretext" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint.pt has {key} of shape \\[3, 3\\]"):
        scanclust.pretext("demo", run, overrides=TINY, resume=True)


def test_truncated_checkpoint_on_resume_is_one_line(finished_run: Path, tmp_path: Path) -> None:
    run = _unfinished_pretext(finished_run, tmp_path / "run")
    path = run / "pretext" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:5000])
    result = quick_cli("pretext", "--out", str(run), "--resume")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "is truncated or corrupt" in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "0"], "--seeds 0: needs at least 1 seed"),
    (["seed=-1"], "config key 'seed' in the overrides: -1 is outside"),
    (["pretext.weights=x.pth"],
     "pretext.weights' in the overrides: is set, but pretext.method=simclr"),
    (["scan.prior=zipf"], "scan.prior' in the overrides: 'zipf' is not one of uniform, adaptive"),
    (["scan.prior_warmup=1.5"], "scan.prior_warmup' in the overrides: must be in [0, 1]"),
    (["scan.overcluster=0"], "scan.overcluster' in the overrides: must be >= 1"),
    (["scan.merge_resolution=0"], "scan.merge_resolution' in the overrides: must be in (0, 10]"),
    (["scan.overcluster=25"], "config key 'scan.overcluster': 25 x 10 clusters to train for only "
                              "200 images"),
    (["selflabel.selection=top"],
     "selflabel.selection' in the overrides: 'top' is not one of threshold, per_cluster"),
])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = quick_cli("run", "--config", "demo", "--out", str(tmp_path / "run"), *TINY, *args)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()


def test_resnet18_weights_into_the_cifar_backbone_is_one_line(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    result = quick_cli("pretext", "--config", "cifar10", "--out", str(tmp_path / "run"), "device=cpu",
                 "pretext.method=weights", f"pretext.weights={weights}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "conv1.weight of shape [64, 3, 7, 7] where the model needs [64, 3, 3, 3]" in result.stderr
