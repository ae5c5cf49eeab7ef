"""The scanclust command line in a child process, SIGKILLed by itself at a chosen point.

For tests/test_faults.py. ``launch(spec, argv)`` runs ``scanclust argv`` in a process forked
from a server that has already imported scanclust (so a child starts in milliseconds, not the
seconds of importing torch), and returns ``(exit code, stderr)``; a SIGKILLed child gives -9.

``spec`` is ``{"stage": S, "event": E, ...}`` with E one of
  write    die in the middle of the ``n``-th file write of stage S (``name``: count only files
           of that name): part of the bytes are on disk, in the temporary file
  replace  die after the ``n``-th file of stage S is written in full, before its rename
  timer    die ``delay`` seconds after stage S begins (at the latest when it ends)
  pause    hold the run directory's lock: write PAUSED to ``ready`` and sleep
  raise    raise ``error`` (oom: CUDA out of memory, enospc: a full disk) as stage S begins
  count    die nowhere; return per-stage write counts, file names and seconds in ``report``
  none     die nowhere
The kill is real (SIGKILL: no cleanup, no atexit); only the choice of the moment is staged,
through the two functions every stage calls to change the run directory (``begin_stage``,
``atomic_write``). ``"signal": "SIGTERM"`` (or another name) sends that signal instead, which
the command line handles: the exit code is then the command's own.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(["scanclust.cli", "scanclust.pipeline", "scanclust.figures",
                                "tests.kill_runner"])


def launch(spec: dict, argv: list[str], limit_bytes: int | None = None,
           timeout: float = 600) -> tuple[int, str]:
    """Run ``scanclust argv`` with ``spec``; ``limit_bytes`` caps every file written (a full
    disk). Returns the exit code (-9 when killed) and what it wrote to stderr."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "stderr.txt"
        child = _SERVER.Process(target=_child, args=(spec, argv, str(log), limit_bytes))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise TimeoutError(f"scanclust {' '.join(argv)} took more than {timeout} s")
        return child.exitcode, log.read_text() if log.exists() else ""


def start(spec: dict, argv: list[str]) -> multiprocessing.process.BaseProcess:
    """Like ``launch``, without waiting (for ``pause``)."""
    child = _SERVER.Process(target=_child, args=(spec, argv, os.devnull, None))
    child.start()
    return child


def _child(spec: dict, argv: list[str], log: str, limit_bytes: int | None) -> None:
    import torch

    torch.set_num_threads(1)  # the same float sums in every process; no spinning threads
    if limit_bytes is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    hooks = _Hooks(spec)
    hooks.install()
    import scanclust.cli

    code = scanclust.cli.main(argv)
    hooks.end_of_stage()
    if spec["event"] == "count":
        Path(spec["report"]).write_text(json.dumps(hooks.report))
    sys.stderr.flush()
    sys.exit(code)


class _Hooks:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.stage: str | None = None
        self.writes = 0
        self.started = 0.0
        self.armed = False
        self.report: dict[str, dict] = {}

    def install(self) -> None:
        """Wrap ``begin_stage`` and ``atomic_write`` wherever a stage module holds them."""
        import scanclust.engine
        import scanclust.rundir
        import scanclust.stages.evaluate  # noqa: F401 - imports every stage
        import scanclust.pipeline  # noqa: F401

        real_begin = scanclust.engine.begin_stage
        self.real_atomic_write = scanclust.rundir.atomic_write
        tracked = self.track(real_begin)
        for name, module in list(sys.modules.items()):
            if name.startswith("scanclust") and module is not None:
                if getattr(module, "begin_stage", None) is real_begin:
                    module.begin_stage = tracked
                if getattr(module, "atomic_write", None) is self.real_atomic_write:
                    module.atomic_write = self.atomic_write

    def die(self) -> None:
        sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, self.spec.get("signal", "SIGKILL")))

    def end_of_stage(self) -> None:
        if self.stage in self.report:
            self.report[self.stage]["seconds"] = time.perf_counter() - self.started
        if self.armed:  # a timer that has not fired dies at the end of its stage
            self.die()

    def track(self, begin_stage):
        spec = self.spec

        def wrapper(stage, *args, **kwargs):
            self.end_of_stage()
            self.stage, self.writes, self.started = stage, 0, time.perf_counter()
            self.report.setdefault(stage, {"writes": 0, "names": [], "seconds": 0.0})
            if stage == spec.get("stage") and spec["event"] == "timer":
                self.armed = True
                timer = threading.Timer(spec["delay"], self.die)
                timer.daemon = True
                timer.start()
            result = begin_stage(stage, *args, **kwargs)
            if stage == spec.get("stage") and spec["event"] == "raise":
                import errno

                import torch

                raise {"oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                       "enospc": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "log.jsonl"),
                       }[spec["error"]]
            if stage == spec.get("stage") and spec["event"] == "pause":
                Path(spec["ready"]).write_text("PAUSED")
                time.sleep(3600)
            return result

        return wrapper

    @contextlib.contextmanager
    def atomic_write(self, path, *args, **kwargs):
        spec = self.spec
        name = os.path.basename(str(path))
        counted = self.stage is not None and spec.get("name") in (None, name)
        if counted:
            self.writes += 1
            self.report[self.stage]["writes"] += 1
            self.report[self.stage]["names"].append(name)
        target = counted and self.stage == spec.get("stage") and self.writes == spec.get("n")
        with self.real_atomic_write(path, *args, **kwargs) as handle:
            if target and spec["event"] == "write":
                yield _PartialHandle(handle, spec.get("fraction", 0.5), self.die)
            else:
                yield handle
            if target and spec["event"] == "replace":
                handle.flush()
                self.die()


class _PartialHandle:
    """Writes part of the first chunk it is given, makes it durable, and dies."""

    def __init__(self, handle, fraction: float, die) -> None:
        self.handle = handle
        self.fraction = fraction
        self.die = die

    def write(self, data) -> int:
        data = bytes(data)
        self.handle.write(data[:max(1, int(len(data) * self.fraction))])
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.die()
        return 0

    def __getattr__(self, name):
        return getattr(self.handle, name)
