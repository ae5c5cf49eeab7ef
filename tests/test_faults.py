"""Faults: kill -9 anywhere, two writers at once, a full disk, NaN. The run directory stays right.

The kill matrix runs the command line in a child process and SIGKILLs it at random points of
every stage (``tests/kill_runner.py`` picks the moment: inside a file write, between a write and
its rename, or after a random delay), then continues with ``--resume``. After the last kill the
run must equal an uninterrupted one: the same metrics, neighbours, files and log lines, and no
temporary file, lock or stray folder. ``SCANCLUST_FAULT_SEEDS=N`` runs N random kill sequences
(default 3, one kill per stage each).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import scanclust
import scanclust.stages.evaluate as evaluate_module
import scanclust.stages.mine as mine_module
from scanclust import engine
from scanclust.checkpoint import load_checkpoint
from scanclust.health import NumericalError
from scanclust.rundir import STAGES
from tests.conftest import TINY
from tests.kill_runner import launch, start

FAULT_TINY = TINY + ["pretext.epochs=3", "scan.epochs=3", "selflabel.epochs=3"]
SEEDS = int(os.environ.get("SCANCLUST_FAULT_SEEDS", "3"))



def scanclust_cli(*args: str, limit_bytes: int | None = None) -> tuple[int, str]:
    """The command line in a child process; ``limit_bytes`` caps each file (a full disk)."""
    return launch({"event": "none"}, list(args), limit_bytes)


def one_line(result: tuple[int, str]) -> str:
    """The error: exit code 2 and one line, the last (progress lines may come before it)."""
    code, stderr = result
    lines = stderr.strip().splitlines()
    assert code == 2 and "Traceback" not in stderr, stderr
    assert [x for x in lines if x.startswith("scanclust: error: ")] == lines[-1:], stderr
    return lines[-1]


def snapshot(run: Path) -> dict:
    """What must not depend on kills: results, neighbours, file list, log lines."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("seconds")
    log = [(r["stage"], r.get("epoch")) for r in map(json.loads, (run / "log.jsonl").open())]
    return {"metrics": metrics, "log": log,
            "files": sorted(str(p.relative_to(run)) for p in run.rglob("*")),
            "neighbors": np.load(run / "neighbors" / "train.npy").tolist()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An uninterrupted run, and per stage the number of file writes and the seconds taken."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    report = out.parent / "report.json"
    code, stderr = launch({"event": "count", "report": str(report)},
                          ["run", "--config", "demo", "--out", str(out), *FAULT_TINY])
    assert code == 0, stderr
    return out, json.loads(report.read_text())


def kill_points(report: dict, seed: int) -> list[dict]:
    """One random kill per stage: in a write, before a rename, or after a random delay."""
    rng = random.Random(seed)
    points = []
    for stage in STAGES:
        event = rng.choice(["write", "replace", "timer"])
        if event == "timer":
            points.append({"stage": stage, "event": event,
                           "delay": rng.uniform(0, report[stage]["seconds"])})
        else:
            points.append({"stage": stage, "event": event, "fraction": rng.random(),
                           "n": rng.randint(1, report[stage]["writes"])})
    return points


@pytest.mark.parametrize("seed", range(SEEDS))
def test_kill_anywhere_then_resume_equals_an_uninterrupted_run(
        reference: tuple[Path, dict], tmp_path: Path, seed: int) -> None:
    ref, report = reference
    out = tmp_path / "run"
    args = ["run", "--config", "demo", "--out", str(out), "--resume", *FAULT_TINY]
    for point in kill_points(report, seed):
        code, stderr = launch(point, args)
        assert code == -signal.SIGKILL, (point, stderr)
    code, stderr = launch({"event": "none"}, args)
    assert code == 0, stderr
    assert snapshot(out) == snapshot(ref)


def test_kill_in_the_first_checkpoint_write_is_not_a_dead_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["pretext", "--config", "demo", "--out", str(out), *FAULT_TINY]
    code, _ = launch({"stage": "pretext", "event": "write", "name": "checkpoint.pt", "n": 1}, args)
    assert code == -signal.SIGKILL
    assert [p.name for p in (out / "pretext").glob(".checkpoint.pt.*.tmp")]
    code, stderr = scanclust_cli(*args)  # no --resume or --force needed: nothing to keep
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "pretext").iterdir()) == [
        "checkpoint.pt", "lineage.json", "summary.json"]
    assert not (out / ".lock").exists()


def test_concurrent_runs_are_refused_and_a_killed_holders_lock_is_taken_over(
        reference: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--config", "demo", "--out", str(out), *FAULT_TINY]
    ready = tmp_path / "ready"
    holder = start({"stage": "pretext", "event": "pause", "ready": str(ready)}, args)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and holder.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        for flag in ("--resume", "--force"):
            line = one_line(scanclust_cli(*args, flag))
            assert f"is in use by process {holder.pid}" in line
    finally:
        holder.kill()
        holder.join()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # left by the killed holder
    code, stderr = scanclust_cli(*args, "--resume")
    assert code == 0, stderr
    assert snapshot(out) == snapshot(reference[0])


def test_full_disk_during_a_checkpoint_is_one_line_and_resumable(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["pretext", "--config", "demo", "--out", str(out), *FAULT_TINY]
    line = one_line(scanclust_cli(*args, limit_bytes=100_000))  # a checkpoint is about 300 kB
    assert f"cannot write {out / 'pretext' / 'checkpoint.pt'}: File too large" in line
    assert not list(out.rglob("*.tmp"))
    code, stderr = scanclust_cli(*args, "--resume")
    assert code == 0, stderr


def test_full_disk_during_evaluate_keeps_the_old_metrics(reference: tuple[Path, dict],
                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    before = (run / "metrics.json").read_bytes()
    line = one_line(scanclust_cli("evaluate", "--out", str(run), limit_bytes=20_000))
    assert "cannot write" in line and "File too large" in line
    assert (run / "metrics.json").read_bytes() == before
    assert not list(run.rglob("*.tmp")) and not (run / ".lock").exists()


@pytest.mark.parametrize("error, expected", [
    ("oom", "out of memory; lower the batch sizes"),
    ("enospc", "No space left on device: log.jsonl; free some space, then continue with --resume"),
])
def test_memory_and_disk_errors_anywhere_are_one_line(tmp_path: Path, error: str,
                                                      expected: str) -> None:
    args = ["pretext", "--config", "demo", "--out", str(tmp_path / "run"), *TINY]
    line = one_line(launch({"stage": "pretext", "event": "raise", "error": error}, args))
    assert expected in line
    assert not (tmp_path / "run" / ".lock").exists()


def test_unwritable_output_directory_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permissions, but not into sysfs
        parent = Path("/sys/fs")
        if not parent.is_dir():
            pytest.skip("needs a non-root user or sysfs")
    else:
        parent = tmp_path / "readonly"
        parent.mkdir()
        parent.chmod(0o555)
    line = one_line(scanclust_cli("run", "--config", "demo", "--out", str(parent / "run"), *TINY))
    assert f"cannot create run directory {parent / 'run'}" in line


# --- NaN: stop at the first non-finite epoch, keep the last good checkpoint ---------------------

def test_divergent_pretext_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(NumericalError) as err:
        scanclust.pretext("demo", out, overrides=FAULT_TINY + ["pretext.optim.name=sgd",
                                                               "pretext.optim.lr=1e6"])
    message = str(err.value)
    assert message.startswith("pretext: ") and "pretext.optim.lr=1e+06" in message
    epoch = int(message.split(" in epoch ")[1].split(";")[0])
    if epoch > 1:
        state = load_checkpoint(out / "pretext" / "checkpoint.pt")
        assert state["epoch"] == epoch - 1
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "pretext" / "summary.json").exists()


def test_nan_injected_in_epoch_2_keeps_epoch_1(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.train_one_epoch
    calls = {"n": 0}

    def poisoned(loop, *args, **kwargs):
        stats = real(loop, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(loop.model.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(engine, "train_one_epoch", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NumericalError, match="pretext: model weights became NaN or infinite in "
                                             "epoch 2; .* the checkpoint of epoch 1 is kept"):
        scanclust.pretext("demo", out, overrides=FAULT_TINY)
    assert load_checkpoint(out / "pretext" / "checkpoint.pt")["epoch"] == 1


# The self-label threshold below 1/K makes every sample confident, so the loss has a gradient
# however the tiny SCAN step ended (no confident sample means no update to blow up).
@pytest.mark.parametrize("override, stage", [("scan.optim.lr=1e30", "scan"),
                                             ("selflabel.optim.lr=1e30", "selflabel")])
def test_huge_learning_rate_is_caught_in_its_stage(tmp_path: Path, override: str,
                                                   stage: str) -> None:
    with pytest.raises(NumericalError, match=f"^{stage}: .* in epoch 1; likely cause: a learning "
                                             f"rate too high \\({stage}.optim.lr=1e\\+30\\)"):
        scanclust.run("demo", tmp_path / "run",
                      overrides=TINY + [override, "selflabel.threshold=0.05"])
    assert not (tmp_path / "run" / stage / "summary.json").exists()


def test_nan_features_stop_mining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    scanclust.pretext("demo", out, overrides=TINY)
    real = mine_module.extract_features

    def nan_features(*args, **kwargs):
        feats = real(*args, **kwargs)
        feats[:3] = float("nan")
        return feats

    monkeypatch.setattr(mine_module, "extract_features", nan_features)
    with pytest.raises(NumericalError, match="mine: the pretext features of 3 of 200 images"):
        scanclust.mine("demo", out, overrides=TINY)
    assert not (out / "neighbors" / "summary.json").exists()


def test_nan_predictions_stop_evaluation(reference: tuple[Path, dict], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    before = (run / "metrics.json").read_bytes()
    real = evaluate_module.predict_logits

    def nan_logits(*args, **kwargs):
        logits, feats = real(*args, **kwargs)
        logits[:, 5] = float("nan")
        return logits, feats

    monkeypatch.setattr(evaluate_module, "predict_logits", nan_logits)
    with pytest.raises(NumericalError, match="scan: the predictions of 1 of 200 images"):
        scanclust.evaluate("demo", run, overrides=FAULT_TINY)
    assert (run / "metrics.json").read_bytes() == before


def test_collapsed_clustering_is_reported_in_metrics(tmp_path: Path) -> None:
    """Adam at lr 1e6 does not give NaN: it ruins the features, and self-label puts nearly every
    image in one or two clusters. That is a result to flag, not to hide."""
    metrics = scanclust.run("demo", tmp_path / "run", overrides=TINY + [
        "pretext.optim.name=adam", "pretext.optim.lr=1e6"])
    sizes = metrics["stages"]["selflabel"]["cluster_sizes"]
    empty = sum(size < 0.1 * sum(sizes) / len(sizes) for size in sizes)
    assert max(sizes) > 0.9 * sum(sizes) or empty >= len(sizes) // 2, sizes
    flagged = [w for w in metrics["warnings"] if w.startswith("selflabel (on the val split): ")]
    assert flagged and all("the clustering collapsed" in w for w in flagged), metrics["warnings"]
