"""The run directory: stage states, the lock, lineage hashes, config comparison, atomic files."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from scanclust import files, lock
from scanclust.checkpoint import save_checkpoint
from scanclust.config import ConfigError, load_config
from scanclust.rundir import OUTPUTS, RunDir, RunDirError, compare_configs, exclusive, write_json

CFG = load_config("demo").to_dict()
REPO = Path(__file__).resolve().parents[1]


def started(run: RunDir, stage: str, cfg: dict = CFG) -> None:
    status, _ = run.plan(stage, cfg, resume=False, force=True)
    run.start(stage, status, cfg)


def finished(run: RunDir, stage: str, content: bytes = b"output", cfg: dict = CFG) -> None:
    """A stage as its function leaves it: lineage at the start, output, then finish."""
    started(run, stage, cfg)
    (run.stage_dir(stage) / OUTPUTS[stage][0]).write_bytes(content)
    run.finish(stage, {"seconds": 1.0})


# --- states: fresh, done, resume, and the leftovers of a kill ---------------------------------

def test_empty_stage_is_fresh_and_records_its_config(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.plan("pretext", CFG, resume=False, force=False) == ("fresh", [])
    run.start("pretext", "fresh", CFG)
    assert run.lineage("pretext") == {"inputs": {}, "config": CFG}
    assert (run.root / "config.yaml").is_file()


def test_finished_stage_needs_resume_or_force(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    with pytest.raises(RunDirError, match="finished pretext stage; pass --resume"):
        run.plan("pretext", CFG, resume=False, force=False)
    assert run.plan("pretext", CFG, resume=True, force=False) == ("done", [])


def test_unfinished_stage_resumes_only_when_asked(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    started(run, "pretext")
    save_checkpoint(run.checkpoint("pretext"), "pretext", {"epoch": 1})
    with pytest.raises(RunDirError, match="unfinished pretext stage; pass --resume"):
        run.plan("pretext", CFG, resume=False, force=False)
    assert run.plan("pretext", CFG, resume=True, force=False) == ("resume", [])


def test_kill_before_the_first_checkpoint_is_not_a_dead_end(tmp_path: Path) -> None:
    """Only the lineage and a temporary file: nothing to resume, so both calls start afresh."""
    run = RunDir(tmp_path / "run")
    started(run, "pretext")
    tmp = run.stage_dir("pretext") / ".checkpoint.pt.123-abcd.tmp"
    tmp.write_bytes(b"half a checkpoint")
    run.lock()
    assert not tmp.exists()  # removed by the next process to take the lock
    for resume in (False, True):
        assert run.plan("pretext", CFG, resume=resume, force=False)[0] == "fresh"
    run.release()


def test_force_moves_old_output_aside_with_its_log_lines(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext", b"weights")
    run.log("pretext", epoch=1, loss=1.0)
    run.log("mine", seconds=1.0)
    status, _ = run.plan("pretext", CFG, resume=False, force=True)
    run.start("pretext", status, CFG)
    assert sorted(p.name for p in run.stage_dir("pretext").iterdir()) == ["lineage.json"]
    (aside,) = [p for p in run.root.iterdir() if p.name.startswith("pretext.old-")]
    assert (aside / "checkpoint.pt").read_bytes() == b"weights"
    assert [json.loads(x)["stage"] for x in (aside / "log.jsonl").open()] == ["pretext"]
    assert [json.loads(x)["stage"] for x in run.log_path.open()] == ["mine"]


def test_resume_drops_log_lines_after_the_checkpoint_and_torn_lines(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    started(run, "pretext")
    save_checkpoint(run.checkpoint("pretext"), "pretext", {"epoch": 2})
    for epoch in (1, 2, 3):  # epoch 3 was logged, then the process was killed
        run.log("pretext", epoch=epoch)
    with open(run.log_path, "a") as handle:
        handle.write('{"stage": "pret')  # a line torn by the kill
    status, _ = run.plan("pretext", CFG, resume=True, force=False)
    run.start("pretext", status, CFG)
    assert [json.loads(x)["epoch"] for x in run.log_path.open()] == [1, 2]


# --- lineage: a stage built from another input is refused --------------------------------------

def test_stage_built_on_a_redone_input_is_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext", b"pretext v1")
    finished(run, "mine", b"neighbours of v1")
    assert run.plan("mine", CFG, resume=True, force=False)[0] == "done"
    finished(run, "pretext", b"pretext v2")  # pretext --force
    run = RunDir(run.root)
    with pytest.raises(RunDirError, match=r"neighbors was built from another pretext output.*"
                                          r"scanclust mine --out .* --force"):
        run.plan("mine", CFG, resume=True, force=False)
    with pytest.raises(RunDirError, match="another pretext output"):
        run.plan("scan", CFG, resume=True, force=False)  # scan reads mine: refused too
    assert run.plan("mine", CFG, resume=True, force=True)[0] == "fresh"


def test_output_replaced_after_the_stage_is_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    run.checkpoint("pretext").write_bytes(b"a checkpoint from another run")
    with pytest.raises(RunDirError, match="checkpoint.pt changed after the pretext stage"):
        run.plan("mine", CFG, resume=False, force=False)


def test_output_deleted_after_the_stage_is_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    run.checkpoint("pretext").unlink()
    with pytest.raises(RunDirError, match="pretext: checkpoint.pt is missing; redo it with"):
        run.plan("mine", CFG, resume=False, force=False)


def test_summary_edited_into_invalid_json_is_one_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    run.summary_path("pretext").write_text("{not json")
    with pytest.raises(RunDirError, match="summary.json is not valid JSON"):
        run.summary("pretext")


def test_stage_without_lineage_is_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    run.lineage_path("pretext").unlink()
    with pytest.raises(RunDirError, match="lineage.json"):
        run.plan("mine", CFG, resume=False, force=False)


def test_missing_input_names_the_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="run `scanclust mine`"):
        RunDir(tmp_path / "run").plan("scan", CFG, resume=False, force=False)


def test_pipeline_plan_refuses_kept_output_of_a_stage_it_will_redo(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    finished(run, "mine")
    with pytest.raises(RunDirError, match="this call redoes or continues pretext"):
        run.plan("mine", CFG, resume=True, force=False, will_run={"pretext"})


def test_refusal_names_the_earliest_stage_to_redo(tmp_path: Path) -> None:
    """After pretext --force, scan and evaluate advise redoing mine (scan --force would be
    refused itself until mine is redone)."""
    run = RunDir(tmp_path / "run")
    for stage in ("pretext", "mine", "scan", "selflabel"):
        finished(run, stage, f"{stage} v1".encode())
    finished(run, "pretext", b"pretext v2")
    for stage in ("scan", "selflabel", "evaluate"):
        with pytest.raises(RunDirError) as err:
            RunDir(run.root).plan(stage, CFG, resume=True, force=False)
        assert str(err.value) == (
            f"{run.root}/neighbors was built from another pretext output than the one in "
            f"{run.root}/pretext (pretext was redone or replaced since); redo it with "
            f"`scanclust mine --out {run.root} --force` (its old output is kept aside), then the "
            f"stages after it")


def _finished_mine(run: RunDir) -> None:
    started(run, "pretext")
    run.checkpoint("pretext").write_bytes(b"weights")
    run.finish("pretext", {"seconds": 1.0})
    started(run, "mine")
    for name in OUTPUTS["mine"]:
        (run.stage_dir("mine") / name).write_bytes(name.encode())
    run.finish("mine", {"seconds": 1.0})


def test_a_replaced_output_file_is_named_alone(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    _finished_mine(run)
    run.neighbors("train").write_bytes(b"neighbours of another run")
    with pytest.raises(RunDirError) as err:
        run.plan("scan", CFG, resume=False, force=False)
    assert str(err.value) == (
        f"{run.root}/neighbors: train.npy changed after the mine stage wrote it (replaced by "
        f"hand, or copied from another run?); redo it with `scanclust mine --out {run.root} "
        f"--force` (its old output is kept aside), then the stages after it")
    run.features("val").unlink()
    with pytest.raises(RunDirError, match=r"wrote it \(replaced by hand, or copied from another "
                                          r"run\?\); features_val.npy is missing; redo it"):
        RunDir(run.root).plan("scan", CFG, resume=False, force=False)


def test_a_lineage_without_file_hashes_names_every_output_file(tmp_path: Path) -> None:
    """Written before per-file hashes: the message cannot tell which file changed."""
    run = RunDir(tmp_path / "run")
    _finished_mine(run)
    lineage = json.loads(run.lineage_path("mine").read_text())
    del lineage["files"]
    write_json(run.lineage_path("mine"), lineage)
    run.neighbors("train").write_bytes(b"neighbours of another run")
    with pytest.raises(RunDirError, match="neighbors: train.npy, val.npy, features_train.npy, "
                                          "features_val.npy, targets_train.npy, targets_val.npy "
                                          "changed after the mine stage wrote them"):
        run.plan("scan", CFG, resume=False, force=False)


# --- the images a stage read ------------------------------------------------------------------

def _image_folder(folder: Path, count: int = 40) -> dict:
    """``count`` files with image names (nothing decodes them here) and a folder config."""
    (folder / "sub").mkdir(parents=True)
    for i in range(count):
        (folder / ("sub" if i % 2 else "") / f"img_{i:02d}.png").write_bytes(b"v1 %d" % i)
    return _cfg("data.dataset=folder", f"data.root={folder}", "model.num_clusters=3")


def _replace(path: Path, content: bytes) -> None:
    """New bytes and a new modification time, as an editor or a copy leaves them."""
    stat = path.stat()
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_replaced_added_and_removed_images_are_refused_naming_the_first_reader(
        tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    cfg = _image_folder(folder)
    run = RunDir(tmp_path / "run")
    finished(run, "pretext", cfg=cfg)
    finished(run, "mine", cfg=cfg)
    assert run.lineage("pretext")["data"]["data.root"]["files"] == 40
    assert run.plan("scan", cfg, resume=False, force=False) == ("fresh", [])  # unchanged
    for name in ("img_00.png", "sub/img_01.png", "img_02.png", "sub/img_03.png"):
        _replace(folder / name, b"another photo")
    with pytest.raises(RunDirError) as err:
        RunDir(run.root).plan("scan", cfg, resume=False, force=True)
    assert str(err.value) == (
        f"the images under data.root={folder} changed since the pretext stage read them "
        f"(4 files changed, 0 added, 0 removed); redo the run from pretext: `scanclust pretext "
        f"--out {run.root} --force`, then the stages after it")
    (folder / "new.jpg").write_bytes(b"new")
    (folder / "img_10.png").unlink()
    with pytest.raises(RunDirError, match=r"\(4 files changed, 1 added, 1 removed\)"):
        RunDir(run.root).plan("mine", cfg, resume=True, force=False)
    with pytest.raises(RunDirError, match="since the pretext stage read them"):
        RunDir(run.root).plan("pretext", cfg, resume=True, force=False)  # keeping it: refused
    assert run.plan("pretext", cfg, resume=False, force=True) == ("fresh", [])
    run.stage_dir("pretext").joinpath("images-root.npy").unlink()  # counts only, then
    with pytest.raises(RunDirError, match=r"\(40 files then, 40 now\)"):
        RunDir(run.root).plan("mine", cfg, resume=True, force=False)


def test_a_refusal_for_changed_images_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    cfg = _image_folder(folder)
    run = RunDir(tmp_path / "run")
    finished(run, "pretext", cfg=cfg)
    (folder / "new.png").write_bytes(b"new")
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    run.lock()
    with pytest.raises(RunDirError, match="0 files changed, 1 added, 0 removed"):
        run.plan("mine", cfg, resume=False, force=False)
    run.release()
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before


def test_images_are_listed_once_per_call(tmp_path: Path) -> None:
    """While the lock is held the first listing stands; the next call lists the folder again."""
    folder = tmp_path / "photos"
    cfg = _image_folder(folder)
    run = RunDir(tmp_path / "run")
    finished(run, "pretext", cfg=cfg)
    run.lock()
    assert run.plan("mine", cfg, resume=False, force=False) == ("fresh", [])
    (folder / "new.png").write_bytes(b"new")
    assert run.plan("mine", cfg, resume=False, force=False) == ("fresh", [])
    run.release()
    run.lock()
    with pytest.raises(RunDirError, match="1 added"):
        run.plan("mine", cfg, resume=False, force=False)
    run.release()


def test_a_lineage_without_a_fingerprint_compares_nothing(tmp_path: Path) -> None:
    """Run directories written before fingerprints existed keep working, unchecked."""
    folder = tmp_path / "photos"
    cfg = _image_folder(folder)
    run = RunDir(tmp_path / "run")
    finished(run, "pretext", cfg=cfg)
    lineage = json.loads(run.lineage_path("pretext").read_text())
    del lineage["data"]
    write_json(run.lineage_path("pretext"), lineage)
    (folder / "new.png").write_bytes(b"new")
    assert run.plan("mine", cfg, resume=False, force=False) == ("fresh", [])
    assert run.plan("pretext", cfg, resume=True, force=False) == ("done", [])


def test_data_sets_without_files_of_their_own_record_no_fingerprint(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")  # digits
    assert "data" not in run.lineage("pretext")
    assert not list(run.stage_dir("pretext").glob("images-*"))


def test_imagenet_subset_fingerprints_only_its_class_folders(tmp_path: Path) -> None:
    from scanclust.data.sources import _subset_classes

    wnids = _subset_classes("imagenet_50")[0]
    for split in ("train", "val"):
        for wnid in wnids + ["n99999999"]:  # one class outside the subset
            (tmp_path / "in" / split / wnid).mkdir(parents=True)
            (tmp_path / "in" / split / wnid / f"{wnid}_0.JPEG").write_bytes(b"jpeg")
    cfg = _cfg("data.dataset=imagenet_50", f"data.root={tmp_path / 'in'}")
    run = RunDir(tmp_path / "run")
    finished(run, "pretext", cfg=cfg)
    finished(run, "mine", cfg=cfg)
    assert sorted(run.lineage("mine")["data"]) == ["data.root/train", "data.root/val"]
    (tmp_path / "in" / "train" / "n99999999" / "more.JPEG").write_bytes(b"jpeg")
    assert run.plan("scan", cfg, resume=False, force=False) == ("fresh", [])
    _replace(tmp_path / "in" / "val" / wnids[3] / f"{wnids[3]}_0.JPEG", b"other")
    with pytest.raises(RunDirError, match=rf"the images under data.root={tmp_path / 'in'} "
                                          r"\(val/\) changed since the mine stage read them "
                                          r"\(1 file changed, 0 added, 0 removed\); redo the "
                                          r"run from mine"):
        RunDir(run.root).plan("scan", cfg, resume=False, force=False)


def test_config_yaml_keeps_the_epochs_a_kept_stage_ran_with(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    finished(run, "mine")
    finished(run, "scan", cfg=_cfg("scan.epochs=6"))
    more = _cfg("scan.epochs=8", "selflabel.epochs=3")
    status, notes = run.plan("scan", more, resume=True, force=False)
    assert (status, notes) == ("done", ["scan finished with 6 epochs; scan.epochs=8 is not "
                                        "applied (redo the stage with --force to train 8)"])
    run.start("selflabel", "fresh", more)  # applies selflabel.epochs=3, not scan.epochs=8
    written = yaml.safe_load(run.config_path.read_text())
    assert (written["scan"]["epochs"], written["selflabel"]["epochs"]) == (6, 3)
    assert run.plan("scan", written, resume=True, force=False) == ("done", [])
    finished(run, "pretext", b"redone")  # scan is stale now: its value is the user's to set
    run.start("evaluate", "fresh", more)
    assert yaml.safe_load(run.config_path.read_text())["scan"]["epochs"] == 8


# --- the config of a resumed stage --------------------------------------------------------------

def _cfg(*overrides: str) -> dict:
    return load_config("demo", list(overrides)).to_dict()


def test_resume_refuses_keys_that_change_the_result_and_names_them() -> None:
    with pytest.raises(ConfigError, match=r"model.width \(16 -> 8\)"):
        compare_configs("pretext", _cfg(), _cfg("model.width=8"), True, Path("run/pretext"))
    with pytest.raises(ConfigError, match=r"seed \(0 -> 1\)"):
        compare_configs("scan", _cfg(), _cfg("seed=1"), False, Path("run/scan"))


def test_resume_allows_safe_keys_and_other_stages_keys() -> None:
    new = _cfg("device=auto", "progress=false", "amp=true", "perf.channels_last=false",
               "data.num_workers=2", "evaluate.figures=false", "scan.epochs=5", "mine.backend=torch")
    assert compare_configs("pretext", _cfg(), new, True, Path("run/pretext")) == []


def test_moved_data_is_allowed_only_where_a_checksum_proves_it_the_same() -> None:
    assert compare_configs("pretext", _cfg(), _cfg("data.root=/elsewhere"), True, Path("p")) == []
    folder = ("data.dataset=folder", "model.num_clusters=3")
    with pytest.raises(ConfigError, match="data.root"):
        compare_configs("pretext", _cfg(*folder, "data.root=/a"), _cfg(*folder, "data.root=/b"),
                        True, Path("p"))


def test_resume_with_more_epochs_warns_and_fewer_is_refused() -> None:
    (note,) = compare_configs("pretext", _cfg(), _cfg("pretext.epochs=60"), False, Path("p"))
    assert "continues to 60 epochs instead of 50" in note
    (note,) = compare_configs("pretext", _cfg(), _cfg("pretext.epochs=60"), True, Path("p"))
    assert "finished with 50 epochs" in note and "not applied" in note
    with pytest.raises(ConfigError, match=r"pretext.epochs \(50 -> 40\)"):
        compare_configs("pretext", _cfg(), _cfg("pretext.epochs=40"), False, Path("p"))


def test_refused_resume_changes_no_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    finished(run, "pretext")
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError):
        run.plan("pretext", _cfg("model.width=8"), resume=True, force=False)
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before


# --- the lock -------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from scanclust.rundir import RunDir
    RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_writer_is_refused_with_the_holders_pid_and_a_dead_ones_lock_is_taken(
        tmp_path: Path) -> None:
    root = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid}"):
            RunDir(root).lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (root / ".lock").read_text().strip() == str(holder.pid)  # stale: its owner is dead
    run = RunDir(root)
    run.lock()
    fd = lock._HELD[str(root.resolve())][0]  # reading through another descriptor would drop
    assert os.pread(fd, 64, 0).decode().strip() == str(os.getpid())  # a POSIX lock
    run.release()
    assert not (root / ".lock").exists()


def test_lock_is_reentrant_and_released_when_the_outermost_stage_returns(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")

    @exclusive
    def inner() -> None:
        run.lock()

    @exclusive
    def outer() -> None:
        run.lock()
        inner()
        assert (run.root / ".lock").is_file()  # still held after the inner stage

    outer()
    assert not (run.root / ".lock").exists()


def test_refused_first_call_leaves_no_run_directory(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "new")

    @exclusive
    def refused() -> None:
        run.lock()
        raise RunDirError("refused")

    with pytest.raises(RunDirError):
        refused()
    assert not run.root.exists()


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root ignores permissions, but not sysfs)."""
    if os.geteuid() == 0:
        if not Path("/sys/fs").is_dir():
            pytest.skip("needs a non-root user or sysfs")
        return Path("/sys/fs")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_unwritable_output_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="cannot create run directory .*run: "):
        RunDir(_unwritable(tmp_path) / "run").lock()


# --- files --------------------------------------------------------------------------------

def test_json_is_strict_nan_becomes_null(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json(path, {"loss": float("nan"), "rows": [1.0, float("inf")], "ok": 0.5})

    def no_constants(name: str) -> None:
        raise ValueError(f"invalid JSON constant {name}")

    assert json.loads(path.read_text(), parse_constant=no_constants) == {
        "loss": None, "rows": [1.0, None], "ok": 0.5}


def test_failed_write_keeps_the_previous_file_and_says_why(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"acc": 0.5})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(RunDirError, match=f"cannot write {path}: No space left on device"):
        write_json(path, {"acc": 0.9})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
