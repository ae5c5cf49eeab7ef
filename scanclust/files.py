"""The run directory's files, written so that no reader ever sees half of one: atomic writes,
strict JSON, content hashes.

Everything is written to a temporary file beside its target and renamed over it (``os.replace``
is atomic), so a killed process leaves the previous file intact; its temporary files are removed
by the next process that takes the run directory's lock (``lock.py``). With several processes
(torchrun) only the main one writes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from scanclust import distributed
from scanclust.errors import UserError

# sha256 of files already hashed, keyed by identity and version, so one call hashes a file once.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


class RunDirError(UserError, RuntimeError):
    """The run directory, or a file in it, is not in the state the requested stage needs."""


def file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


@contextlib.contextmanager
def atomic_write(path: Path, error: type[UserError] = RunDirError,
                 note: str = "") -> Iterator[IO[bytes]]:
    """Write to a temporary file beside ``path``, then rename it over ``path``.

    Readers never see half a file, and a failed write (disk full, read-only folder) leaves the
    previous file as it was and raises ``error``: one line naming the file and the reason.
    """
    path = Path(path)
    if not distributed.is_main():  # the main process writes the same bytes
        yield io.BytesIO()
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open rather than mkstemp: the file gets the usual permissions (umask), not 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise error(f"cannot write {path}: {_reason(err)}{note}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, UserError):
            raise error(f"cannot write {path}: {_reason(err)}{note}") from None
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (a memory map
    written by worker processes), renamed over ``path`` when the block completes and removed
    when it fails or is interrupted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{text} (is the disk full?)"


def finite(data: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers, and strict readers reject them."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Atomic, strict JSON (no NaN), so readers of metrics.json never see half or invalid files."""
    text = json.dumps(finite(data), indent=2, allow_nan=False) + "\n"
    with atomic_write(Path(path)) as handle:
        handle.write(text.encode())


def csv_text(rows: Iterable[list]) -> str:
    """Rows as CSV text (the csv module's quoting and CRLF line ends, as RFC 4180 has them)."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    return text.getvalue()


def write_csv(path: Path, rows: Iterable[list], error: type[UserError] = RunDirError) -> None:
    """The whole table as UTF-8, atomically: readers see the old file or the new one."""
    with atomic_write(Path(path), error) as handle:
        handle.write(csv_text(rows).encode("utf-8"))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise RunDirError(f"{path} is not valid JSON (edited by hand?); redo the stage that "
                          f"wrote it with --force") from None

