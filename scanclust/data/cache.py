"""The decode cache: a folder's images decoded once into one uint8 array, reused by every stage.

Decoding a JPEG costs more than a training step of a small network on it; a user folder read
afresh every epoch (or once per stage) is decode-bound. Here every readable image is decoded
once, in worker processes, resized so its shorter side is ``size`` and centre-cropped to
``size x size``, and stored as ``[N, size, size, 3]`` uint8 in an ``.npy`` file that the stages
memory-map. With ``data.cache_dir`` set (``scanclust cluster`` puts it in the run directory)
the file outlives the process: a resumed run, a later stage and ``predict`` all skip decoding.
Without it the array lives in memory for the process.

The file name holds a hash of the files' paths, sizes and modification times and of ``size``:
a changed folder gets a new cache, never a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from scanclust.data.decoding import decode_into
from scanclust.files import atomic_path

log = logging.getLogger("scanclust")
FORMAT = 1
_MEMORY: dict[str, tuple[np.ndarray, dict[int, str]]] = {}  # the in-memory cache, last two
_MEMORY_KEEP = 2


def cache_key(paths: list[Path], size: int) -> str:
    """A hash of what decides the decoded pixels: each file's path, size and mtime, and ``size``.

    Paths are hashed as their bytes (``os.fsencode``): a name that is not UTF-8 is held as
    surrogate escapes, which ``str.encode`` refuses."""
    digest = hashlib.sha256(f"{FORMAT}:{size}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            version = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # gone since it was listed: decoding will record why
            version = "missing"
        digest.update(b"\0" + os.fsencode(os.path.abspath(path)) + f"\0{version}".encode())
    return digest.hexdigest()[:20]


def decoded_images(paths: list[Path], size: int, cache_dir: str | Path | None,
                   progress: bool = True, desc: str = "decoding") -> tuple[np.ndarray,
                                                                          dict[int, str]]:
    """``(images, failures)``: the readable files' pixels, in order, as ``[M, size, size, 3]``
    uint8 (read-only memory map, or an in-memory array without ``cache_dir``), and
    ``{index into paths: reason}`` for the files that could not be decoded."""
    key = cache_key(paths, size)
    if cache_dir is None:
        if key not in _MEMORY:
            with tempfile.TemporaryDirectory(prefix="scanclust-decode-") as tmp:
                images, failures = _decode(paths, size, Path(tmp) / "images.npy", progress, desc)
                _MEMORY[key] = (np.array(images), failures)
            while len(_MEMORY) > _MEMORY_KEEP:
                del _MEMORY[next(iter(_MEMORY))]
        return _MEMORY[key]
    array_path = Path(cache_dir) / f"images-{size}px-{key}.npy"
    meta_path = array_path.with_suffix(".json")
    if meta_path.is_file() and array_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") == FORMAT and meta.get("count") == len(paths):
            failures = {int(k): v for k, v in meta["failures"].items()}
            images = np.load(array_path, mmap_mode="c")  # writable view, file never written
            return images[:len(paths) - len(failures)], failures
    # Each process decodes into its own temporary file (processes of one torchrun job may
    # share a cache_dir); a failure or interrupt removes it (it can be as large as the folder).
    with atomic_path(array_path) as tmp:
        images, failures = _decode(paths, size, tmp, progress, desc)
        del images
    meta = {"format": FORMAT, "size": size, "count": len(paths),
            "failures": {str(k): v for k, v in sorted(failures.items())}}
    with atomic_path(meta_path) as tmp:  # written last: its presence marks a complete cache
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return decoded_images(paths, size, cache_dir, progress, desc)


def _decode(paths: list[Path], size: int, target: Path, progress: bool,
            desc: str) -> tuple[np.ndarray, dict[int, str]]:
    """Decode into ``target``, then move the readable images to the front, in order."""
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8,
                                    shape=(len(paths), size, size, 3))
    del out  # the workers open the file themselves
    failures = decode_into(paths, size, target, progress=progress, desc=desc)
    images = np.load(target, mmap_mode="r+")
    if failures:
        good = [i for i in range(len(paths)) if i not in failures]
        for row, source in enumerate(good):
            if row != source:
                images[row] = images[source]
        images.flush()
    return images[:len(paths) - len(failures)], failures
