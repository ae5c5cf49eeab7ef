"""Signals: kill -9, Ctrl-C and SIGTERM while images decode or a checkpoint is written.

A killed parent must not leave decode workers behind; Ctrl-C (SIGINT to the whole process
group) and SIGTERM (``kill``, systemd, Slurm, torchrun) end a run with one line and exit codes
130 and 143, remove the temporary files, and ``--resume`` continues. The decode phase is made
long by a folder of 1000x1000 PNGs (four distinct images, hard-linked to 100 names); the
tests find the workers through /proc and poll instead of sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from scanclust.checkpoint import load_checkpoint
from tests.conftest import CLUSTER_TINY, TINY, write_digit_folder
from tests.kill_runner import launch

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
INTERRUPTED = "scanclust: interrupted; continue with --resume\n"
TERMINATED = "scanclust: terminated (SIGTERM); continue with --resume\n"


def big_png(path: Path, k: int = 0) -> Path:
    """A 1000x1000 PNG that takes about 20 ms to decode (noise defeats the compression)."""
    y, x = np.mgrid[0:1000, 0:1000]
    ramp = np.stack([x * 255 // 999, y * 255 // 999, (x + y) * 255 // 1998], -1)
    noise = np.random.default_rng(k).integers(0, 40, ramp.shape)
    pixels = (np.roll(ramp, k, axis=-1) + noise).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, compress_level=1)
    return path


def big_folder(root: Path, count: int = 100, distinct: int = 4) -> Path:
    root.mkdir()
    for k in range(distinct):
        first = big_png(root / f"k{k}_000.png", k)
        for j in range(1, count // distinct):
            os.link(first, root / f"k{k}_{j:03d}.png")
    return root


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread or process ended meanwhile
            pass
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    """Running, not ended (a zombie waits for init to reap it and holds no memory)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def first_row_decoded(target: Path) -> bool:
    """The first image is in the file: the workers are decoding."""
    try:
        return bool(np.load(target, mmap_mode="r")[0].any())
    except (OSError, ValueError, EOFError):  # not created yet, or still empty
        return False


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# --- kill -9: the decode workers die with their parent -------------------------------------------

DECODE = """
import multiprocessing, sys
from pathlib import Path
import numpy as np
import scanclust.data.decoding as images
method, only, png, target, n = sys.argv[1:]
multiprocessing.set_start_method(method)
# with fork the workers inherit these: each way of ending with the parent is tested alone
if only == "prctl":
    images._exit_with_parent = lambda sentinel: None
if only == "sentinel":
    images._set_parent_death_signal = lambda: None
np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(int(n), 64, 64, 3))
images.decode_into([Path(png)] * int(n), 64, Path(target), workers=2, progress=False)
"""


@pytest.mark.parametrize("method, only", [("fork", "prctl"), ("fork", "sentinel"),
                                          ("forkserver", "both")])
def test_decode_workers_die_with_a_killed_parent(tmp_path: Path, method: str, only: str) -> None:
    png, target = big_png(tmp_path / "big.png"), tmp_path / "images.npy"
    parent = subprocess.Popen([sys.executable, "-c", DECODE, method, only, str(png), str(target),
                               "300"], env=ENV, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        wait_for(lambda: first_row_decoded(target) or parent.poll() is not None, 60, "decoding")
        workers = descendants(parent.pid)  # forkserver and spawn: also a server and a tracker
        assert parent.poll() is None and len(workers) >= 2, workers
        parent.kill()
        parent.wait()
        wait_for(lambda: not any(map(alive, workers)), 5, "end of the orphaned workers")
    finally:
        parent.kill()
        kill_leftovers(workers)


# --- Ctrl-C, SIGTERM and a killed worker during `scanclust cluster`'s decode cache ---------------

def cluster_args(folder: Path, out: Path, *more: str) -> list[str]:
    """``more``: options, and overrides that win over CLUSTER_TINY's."""
    return [sys.executable, "-m", "scanclust", "cluster", str(folder), "--out", str(out),
            "--preset", "quick", "--clusters", "4", "--quiet", *CLUSTER_TINY, *more]


def interrupt_decoding(tmp_path: Path, send: Callable[[subprocess.Popen, list[int]], None],
                       ) -> tuple[int, str, Path, list[int]]:
    """Start `scanclust cluster` in a process group of its own, call ``send(process,
    workers)`` once the decode workers are writing the cache, and return (exit code, stderr,
    run directory, the workers)."""
    folder, out = big_folder(tmp_path / "photos"), tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file: a worker left holding a pipe would hang the test
        process = subprocess.Popen(cluster_args(folder, out), env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=stderr, start_new_session=True)
    workers: list[int] = []
    try:
        def decoding() -> bool:
            partial = list((out / "cache").glob(".images-*.partial"))
            return process.poll() is not None or bool(partial) and first_row_decoded(partial[0])

        wait_for(decoding, 120, "decode cache being written")
        workers = descendants(process.pid)
        assert process.poll() is None and len(workers) >= 2, (workers, log.read_text())
        send(process, workers)
        code = process.wait(60)
        wait_for(lambda: not any(map(alive, workers)), 5, "end of the decode workers")
    finally:
        process.kill()
        kill_leftovers(workers)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    assert not (out / ".lock").exists()
    return code, log.read_text(), out, workers


def test_ctrl_c_while_decoding_is_one_line(tmp_path: Path) -> None:
    # the terminal sends SIGINT to every process of the foreground group: workers included
    code, stderr, _, _ = interrupt_decoding(
        tmp_path, lambda process, workers: os.killpg(process.pid, signal.SIGINT))
    assert (code, stderr) == (130, INTERRUPTED)


def test_sigterm_to_the_group_while_decoding_is_one_line_and_resume_finishes(
        tmp_path: Path) -> None:
    # systemd and Slurm signal every process of the job
    code, stderr, out, _ = interrupt_decoding(
        tmp_path, lambda process, workers: os.killpg(process.pid, signal.SIGTERM))
    assert (code, stderr) == (143, TERMINATED)
    done = subprocess.run(cluster_args(tmp_path / "photos", out, "--resume"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("100 images in 4 clusters (0 files skipped)"), done.stdout
    assert len((out / "assignments.csv").read_text().splitlines()) == 101


def test_sigterm_to_the_process_while_decoding_is_one_line(tmp_path: Path) -> None:
    # `kill PID`: the parent alone; it stops the workers
    code, stderr, _, _ = interrupt_decoding(
        tmp_path, lambda process, workers: process.send_signal(signal.SIGTERM))
    assert (code, stderr) == (143, TERMINATED)


def test_a_killed_decode_worker_is_one_line(tmp_path: Path) -> None:
    # what the out-of-memory killer does: SIGKILL to the largest process, a worker
    code, stderr, _, workers = interrupt_decoding(
        tmp_path, lambda process, workers: os.kill(workers[0], signal.SIGKILL))
    assert (code, stderr) == (2, "scanclust: error: a process decoding images was killed (out "
                                 "of memory, or a signal sent to it); start the command again "
                                 "(with --resume where it has one)\n")


# --- DataLoader workers (data.num_workers > 0) ----------------------------------------------------

@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM"])
def test_dataloader_workers_end_with_the_run(tmp_path: Path, name: str) -> None:
    """SIGKILL to the parent: torch's watchdog ends its workers (it looks every 5 s). SIGTERM
    to the group: the workers exit quietly and the parent's DataLoader raises nothing."""
    folder, out = tmp_path / "digits", tmp_path / "run"
    write_digit_folder(folder)
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            cluster_args(folder, out, "perf.data_path=workers", "data.num_workers=2",
                         "pretext.epochs=100"),
            env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    workers: list[int] = []
    try:
        def training() -> bool:
            path = out / "log.jsonl"
            return process.poll() is not None or path.is_file() and '"pretext"' in path.read_text()

        wait_for(training, 120, "pretext epoch")
        workers = descendants(process.pid)
        assert process.poll() is None and len(workers) == 2, (workers, log.read_text())
        os.killpg(process.pid, getattr(signal, name)) if name == "SIGTERM" else process.kill()
        code = process.wait(60)
        wait_for(lambda: not any(map(alive, workers)), 15, "end of the DataLoader workers")
    finally:
        process.kill()
        kill_leftovers(workers)
    if name == "SIGTERM":  # after the warnings about the folder's unreadable files
        stderr = log.read_text()
        assert code == 143 and "Traceback" not in stderr and stderr.endswith(TERMINATED), stderr


# --- SIGTERM and Ctrl-C inside a checkpoint write -------------------------------------------------

@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_in_a_checkpoint_write_removes_the_temporary_file(tmp_path: Path,
                                                                 name: str) -> None:
    out = tmp_path / "run"
    args = ["pretext", "--config", "demo", "--out", str(out), "--quiet", *TINY]  # 2 epochs
    result = launch({"stage": "pretext", "event": "write", "name": "checkpoint.pt", "n": 2,
                     "signal": name}, args)
    assert result == {"SIGTERM": (143, TERMINATED), "SIGINT": (130, INTERRUPTED)}[name]
    assert sorted(p.name for p in (out / "pretext").iterdir()) == ["checkpoint.pt",
                                                                   "lineage.json"]
    assert load_checkpoint(out / "pretext" / "checkpoint.pt")["epoch"] == 1
    assert not (out / ".lock").exists()
    assert launch({"event": "none"}, [*args, "--resume"])[0] == 0
    assert load_checkpoint(out / "pretext" / "checkpoint.pt")["epoch"] == 2
