"""The scanclust command line, SIGKILLed by itself at one chosen point (for tests/test_faults.py).

    python tests/kill_runner.py SPEC scanclust-args...

SPEC is JSON: ``{"stage": S, "event": E, ...}`` with E one of
  write    die in the middle of the ``n``-th file write of stage S (``name``: count only files
           of that name): part of the bytes are on disk, in the temporary file
  replace  die after the ``n``-th file of stage S is written in full, before its rename
  timer    die ``delay`` seconds after stage S begins (at the latest when it ends)
  pause    hold the run directory's lock: print PAUSED and sleep
  count    die nowhere; write per-stage write counts, file names and seconds to ``report``
The kill is real (SIGKILL, no cleanup, no atexit); only the choice of the moment is staged,
through the same functions every stage calls (``begin_stage`` and ``atomic_write``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import threading
import time

import scanclust.checkpoint
import scanclust.cli
import scanclust.figures
import scanclust.rundir

SPEC = json.loads(sys.argv[1])
STAGE_MODULES = [importlib.import_module(f"scanclust.{name}")
                 for name in ("pretext", "mine", "scan", "selflabel", "evaluate")]
state = {"stage": None, "writes": 0, "started": 0.0, "armed": False}
report: dict[str, dict] = {}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def end_of_stage() -> None:
    stage = state["stage"]
    if stage is not None and stage in report:
        report[stage]["seconds"] = time.perf_counter() - state["started"]
    if state["armed"]:  # a timer that has not fired dies at the end of its stage
        die()


def track(begin_stage):
    def wrapper(stage, *args, **kwargs):
        end_of_stage()
        state.update(stage=stage, writes=0, started=time.perf_counter())
        report.setdefault(stage, {"writes": 0, "names": [], "seconds": 0.0})
        if stage == SPEC.get("stage") and SPEC["event"] == "timer":
            state["armed"] = True
            timer = threading.Timer(SPEC["delay"], die)
            timer.daemon = True
            timer.start()
        result = begin_stage(stage, *args, **kwargs)
        if stage == SPEC.get("stage") and SPEC["event"] == "pause":
            print("PAUSED", flush=True)
            time.sleep(3600)
        return result
    return wrapper


class PartialHandle:
    """Writes part of the first chunk it is given, makes it durable, and dies."""

    def __init__(self, handle, fraction: float) -> None:
        self.handle = handle
        self.fraction = fraction

    def write(self, data) -> int:
        data = bytes(data)
        self.handle.write(data[:max(1, int(len(data) * self.fraction))])
        self.handle.flush()
        os.fsync(self.handle.fileno())
        die()
        return 0

    def __getattr__(self, name):
        return getattr(self.handle, name)


real_atomic_write = scanclust.rundir.atomic_write


@contextlib.contextmanager
def staged_atomic_write(path, *args, **kwargs):
    stage = state["stage"]
    name = os.path.basename(str(path))
    counted = stage is not None and SPEC.get("name") in (None, name)
    if counted:
        state["writes"] += 1
        report[stage]["writes"] += 1
        report[stage]["names"].append(name)
    target = counted and stage == SPEC.get("stage") and state["writes"] == SPEC.get("n")
    with real_atomic_write(path, *args, **kwargs) as handle:
        if target and SPEC["event"] == "write":
            yield PartialHandle(handle, SPEC.get("fraction", 0.5))
        else:
            yield handle
        if target and SPEC["event"] == "replace":
            handle.flush()
            die()


for module in STAGE_MODULES:
    module.begin_stage = track(module.begin_stage)
for module in (scanclust.rundir, scanclust.checkpoint, scanclust.figures):
    module.atomic_write = staged_atomic_write

code = scanclust.cli.main(sys.argv[2:])
end_of_stage()
if SPEC["event"] == "count":
    with open(SPEC["report"], "w") as out:
        json.dump(report, out)
sys.exit(code)
