"""Decoding many images at once, in worker processes: a whole folder into one array (the
decode cache), or consecutive batches for ``predict``.

The workers end with their parent, however it ends (a SIGKILL included), and leave Ctrl-C and
SIGTERM to it, so an interrupted run prints one line and leaves no process behind. Like
``images.py`` this imports neither torch nor torchvision: a worker starts in 0.1 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from scanclust.data.images import ImageReadError, decode_square
from scanclust.errors import UserError

CHUNK = 64  # images per task: large enough to hide the pool's overhead, small for the bar


def decode_into(paths: list[Path], size: int, target: Path, workers: int | None = None,
                progress: bool = True, desc: str = "decoding") -> dict[int, str]:
    """Decode ``paths`` into the ``.npy`` file ``target`` ([N, size, size, 3] uint8, created
    beforehand), in worker processes that each write their rows; returns {index: reason} of
    the files that could not be read (their rows stay zero).

    Workers write to the memory-mapped file directly, so no pixel crosses a process boundary.
    """
    from tqdm import tqdm

    workers = workers or min(32, os.cpu_count() or 1)
    chunks = [list(range(start, min(start + CHUNK, len(paths))))
              for start in range(0, len(paths), CHUNK)]
    failures: dict[int, str] = {}
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if progress else True,
               leave=False, dynamic_ncols=True)
    with bar:
        if workers == 1 or len(chunks) == 1:
            for rows in chunks:
                failures.update(_decode_chunk(target, [str(paths[i]) for i in rows], rows, size))
                bar.update(len(rows))
            return failures
        with _worker_pool(min(workers, len(chunks))) as pool:
            futures = [pool.submit(_decode_chunk, target, [str(paths[i]) for i in rows], rows,
                                   size) for rows in chunks]
            for future, rows in zip(futures, chunks):
                failures.update(future.result())
                bar.update(len(rows))
    return failures


def _decode_chunk(target: Path, paths: list[str], rows: list[int],
                  size: int) -> dict[int, str]:
    out = np.load(target, mmap_mode="r+")
    failures = {}
    for row, path in zip(rows, paths):
        try:
            out[row] = decode_square(path, size)
        except ImageReadError as err:
            failures[row] = str(err)
    out.flush()
    return failures


def decode_many(paths: Iterable[str | Path], size: int) -> tuple[np.ndarray, dict[int, str]]:
    """A few files (a ``predict`` batch) as [N, size, size, 3] in this process, with failures."""
    arrays, failures = [], {}
    for i, path in enumerate(paths):
        try:
            arrays.append(decode_square(path, size))
        except ImageReadError as err:
            failures[i] = str(err)
            arrays.append(np.zeros((size, size, 3), dtype=np.uint8))
    return (np.stack(arrays) if arrays else np.zeros((0, size, size, 3), dtype=np.uint8)), failures


def iter_decoded(paths: list[str | Path], size: int, batch_size: int,
                 workers: int | None = None) -> Iterable[tuple[np.ndarray, dict[int, str]]]:
    """``decode_many`` over consecutive batches of ``paths``, in order, decoded ahead in worker
    processes when there is more than one batch (``predict`` on a folder)."""
    batches = [list(paths[start:start + batch_size]) for start in range(0, len(paths), batch_size)]
    workers = workers or min(32, os.cpu_count() or 1)
    if len(batches) <= 1 or workers == 1:
        for batch in batches:
            yield decode_many(batch, size)
        return
    with _worker_pool(min(workers, len(batches))) as pool:
        yield from pool.map(decode_many, batches, [size] * len(batches))


# ---------------------------------------------------------------------------------------------
# Worker processes that end with their parent and leave Ctrl-C and SIGTERM to it

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class DecodeWorkerError(UserError):
    """A decode worker process was killed (the out-of-memory killer, a signal sent to it)."""


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool for decoding, stopped at once when the caller stops.

    On any exception in the caller (Ctrl-C, SIGTERM, an error, a generator closed early) the
    queued work is cancelled and the workers are killed: leaving the block would otherwise wait
    for every queued chunk to be decoded, and what the workers were writing is discarded with
    the interrupted decode. The pool is created, used and shut down by the calling thread, so
    the thread that forked the workers outlives them (``PR_SET_PDEATHSIG`` fires when it ends).
    """
    with ProcessPoolExecutor(max_workers=workers, initializer=_start_worker) as pool:
        try:
            yield pool
        except BrokenProcessPool:
            raise DecodeWorkerError(
                "a process decoding images was killed (out of memory, or a signal sent to it); "
                "start the command again (with --resume where it has one)") from None
        except BaseException:
            _kill_workers(pool)
            raise


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the work not started and SIGKILL the workers (``kill_workers`` from Python 3.14
    does the same)."""
    workers = list(pool._processes.values())  # shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.kill()


def _start_worker() -> None:
    """Make a new worker end with the process that started it and leave signals to it.

    A parent killed with SIGKILL (``kill -9``, the out-of-memory killer) runs no cleanup, and
    its workers would go on decoding, each holding its share of the images, until killed by
    hand. Ctrl-C sends SIGINT to the whole process group: the parent stops the pool, and a
    worker must not raise KeyboardInterrupt and print a traceback of its own. SIGTERM ends a
    worker silently (the default action), also where a forked worker inherited the parent's
    Python handler.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _set_parent_death_signal()
    # Both ways, as neither covers every case: the kernel's signal comes even to a worker stuck
    # in C code, but with the forkserver start method (Python 3.14's default on Linux) the
    # parent it watches is the fork server, which stays up as long as its children do; the
    # sentinel pipe closes when the process that started the pool ends, under every start
    # method and OS.
    sentinel = multiprocessing.parent_process().sentinel
    threading.Thread(target=_exit_with_parent, args=(sentinel,), daemon=True).start()


def _set_parent_death_signal() -> None:
    """Have Linux SIGKILL this process when the thread that forked it ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc symbol table, no prctl
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL))


def _exit_with_parent(sentinel: int) -> None:
    """Exit once the parent's end of the sentinel pipe is closed: the parent has ended."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
