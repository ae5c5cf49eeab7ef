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

import scanclust.rundir as rundir
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
    fd = rundir._HELD[str(root.resolve())][0]  # reading through another descriptor would drop
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

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(RunDirError, match=f"cannot write {path}: No space left on device"):
        write_json(path, {"acc": 0.9})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
