"""One writer per run directory: a POSIX record lock on ``<run>/.lock``.

A process takes the lock (``fcntl.lockf``) before it reads the run's state; a second process is
refused with the holder's PID. The kernel drops the lock of a killed process, so a stale lock
file is simply taken over. (A record lock belongs to the process, not to its forked data-loader
workers, so it ends with the process itself.) A stage function holds the locks it takes until
it returns (``exclusive``), so ``scanclust run`` keeps the run across all its stages.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from scanclust import distributed
from scanclust.files import RunDirError

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked, with a warning
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("scanclust")
LOCK_NAME = ".lock"
# Locks this process holds: resolved root -> (file descriptor, whether we created the root).
_HELD: dict[str, tuple[int, bool]] = {}
# Called when this process holds no lock any more: the end of a call (see ``lineage.py``).
ON_LAST_RELEASE: list[Callable[[], None]] = []


def held() -> bool:
    """Whether this process holds a run directory now (a call is under way)."""
    return bool(_HELD)


def take(root: Path) -> bool:
    """Make this process ``root``'s only writer until ``release`` (or its end); False when it
    already was (or is not the main process). The root is created here, so a missing or
    read-only parent is reported before any work starts."""
    key = str(root.resolve())
    if key in _HELD or not distributed.is_main():
        return False
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create run directory {root}: {err.strerror or err}") from None
    path = root / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            _remove_if_empty(root, created)
            raise RunDirError(f"cannot write to run directory {root}: "
                              f"{err.strerror or err}") from None
        if fcntl is None:
            log.warning("no file locking on this platform: nothing stops a second process "
                        "from writing to %s at the same time", root)
            break
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                # a file system without locks: go on, but say so
                log.warning("cannot lock %s (%s): nothing stops a second writer", path,
                            err.strerror)
                break
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"{root} is in use by process {holder}; wait for it to end or stop it "
                f"(a lock left by a killed process is taken over automatically)") from None
        # the holder may have removed the file between our open and our lock
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = (fd, created)
    return True


def release(root: Path) -> None:
    _release(str(Path(root).resolve()))


def exclusive(fn: Callable) -> Callable:
    """A stage function (or the pipeline) holds the locks it takes (``begin_stage`` takes
    them) until it returns; the outermost such call releases them."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        held = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in [k for k in _HELD if k not in held]:
                _release(key)

    return wrapper


def _release(key: str) -> None:
    entry = _HELD.pop(key, None)
    if entry is None:
        return
    if not _HELD:  # the call is over
        for hook in ON_LAST_RELEASE:
            hook()
    fd, created = entry
    Path(key, LOCK_NAME).unlink(missing_ok=True)  # removed while still held: see ``lock``
    os.close(fd)  # ends the record lock
    _remove_if_empty(Path(key), created)


def _remove_if_empty(root: Path, created: bool) -> None:
    """A refused first call leaves no empty run directory behind."""
    if created:
        with contextlib.suppress(OSError):
            root.rmdir()


def _read_holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its PID right after taking the lock
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "(unknown PID)"

