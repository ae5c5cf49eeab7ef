"""Reading images as they come: any common format and mode, any size, from any folder tree.

A user's folder is not a benchmark: phone photos carry an EXIF rotation, scans are 16-bit,
logos have transparency, a camera trap writes 20-megapixel JPEGs, a Mac leaves ``._*`` files
beside every image, and somebody's backup has a symlink that points at its own parent. Every
such case is handled here, once, and whatever cannot be read is recorded with its reason
instead of stopping a run three hours in.

This module imports neither torch nor torchvision: decoding runs in worker processes, and a
worker that starts in 0.1 s instead of 2 s matters when a folder has 500 files.
"""

from __future__ import annotations

import errno
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


READABLE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib",
                       ".webp", ".tif", ".tiff", ".gif", ".avif", ".ppm", ".pgm", ".pbm")
# Image formats people keep in photo folders that Pillow cannot decode: listed as skipped
# with a reason, never silently dropped.
UNSUPPORTED_EXTENSIONS = {".heic": "HEIC", ".heif": "HEIF", ".svg": "SVG", ".psd": "PSD",
                          ".jxl": "JPEG XL", ".dng": "raw DNG", ".cr2": "raw CR2",
                          ".cr3": "raw CR3", ".nef": "raw NEF", ".arw": "raw ARW",
                          ".orf": "raw ORF", ".rw2": "raw RW2", ".raf": "raw RAF"}
# Pillow refuses images above 2 x this many pixels as a decompression bomb. JPEGs can be
# decoded at 1/2 .. 1/8 scale (``draft``), so their limit applies to the reduced size.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
BACKGROUND = (255, 255, 255)  # what transparent pixels become: how viewers show them


class ImageReadError(Exception):
    """One file that cannot be used; the message is the reason, without the path."""


@dataclass
class Listing:
    """The images found under a folder, and every file that will not be used, with why."""

    root: Path
    paths: list[Path] = field(default_factory=list)  # sorted by relative path
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: int = 0  # files that are not images at all (.txt, .json, ...)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


# Characters a written name must not hold as they are: the escape character itself, line and
# field breaks (CSV rows, skipped.txt's path<TAB>reason lines, ``str.splitlines`` readers),
# other control characters (a terminal reading the log would obey them) and lone surrogates
# (bytes that are not UTF-8, as ``os.fsdecode`` holds them; no UTF-8 file can store them).
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_name(name: str | bytes | os.PathLike) -> str:
    """A file name as scanclust writes it (CSV, JSON, skipped.txt, the page, log lines):
    lossless, one line, and valid UTF-8 whatever bytes the name holds.

    The rule: a backslash becomes ``\\\\``; tab, newline and carriage return become ``\\t``,
    ``\\n``, ``\\r``; every byte that is not valid UTF-8 becomes ``\\xNN`` (two lowercase hex
    digits), and so does each UTF-8 byte of the other control characters (U+0000..U+001F,
    U+007F..U+009F) and of the line and paragraph separators U+2028, U+2029. Everything else
    is unchanged, so an ordinary name, accents included, is written as it is. ``unescape_name``
    gives the name back: ``caf\\xe9.png`` is the Latin-1 file ``b"caf\\xe9.png"``.
    """
    return _UNSAFE.sub(_escape_char, os.fsdecode(name))


def _escape_char(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    try:  # a surrogate escape gives back its one byte, any other character its UTF-8 bytes
        data = char.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no POSIX file name decodes to
        data = char.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{byte:02x}" for byte in data)


def unescape_name(text: str) -> str:
    """The name ``escape_name`` wrote, as ``os.fsdecode`` gives it: ``Path(unescape_name(s))``
    opens the file, and ``os.fsencode`` of it is the name's bytes.

    The written escapes are a subset of Python's ``unicode_escape`` codec, which reads bytes as
    Latin-1, so each byte (``\\xNN`` or raw UTF-8) comes out as one code point below 256.
    """
    raw = text.encode("utf-8", "surrogateescape").decode("unicode_escape").encode("latin-1")
    return os.fsdecode(raw)


def extension_kind(name: str) -> str:
    """``image``, ``unsupported`` or ``other`` from a file name, case-insensitively."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in READABLE_EXTENSIONS:
        return "image"
    return "unsupported" if suffix in UNSUPPORTED_EXTENSIONS else "other"


def list_images(root: str | Path) -> Listing:
    """Every image file below ``root``, recursively, sorted by relative path.

    Symlinked folders are followed once: a folder already visited (same device and inode)
    is not entered again, so a link to a parent cannot loop. Hidden folders and files
    (``.git``, ``.DS_Store``) are passed over; macOS ``._*`` files, files with an image
    format Pillow cannot read, broken symlinks and symlink loops are recorded as skipped.
    """
    root = Path(root)
    listing = Listing(root)
    try:
        visited = {_identity(os.stat(root))}
    except OSError as err:
        raise ImageReadError(_reason(err)) from None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                identity = _identity(os.stat(full))
            except OSError as err:
                listing.skipped.append((Path(full), _reason(err)))
                continue
            if identity in visited:  # a link back into the tree: entering it again would loop
                continue
            visited.add(identity)
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            _add_file(listing, Path(dirpath) / name)
    listing.paths.sort(key=listing.relative)
    listing.skipped.sort(key=lambda item: str(item[0]))
    return listing


def median_side(paths: list[Path], sample: int = 200) -> int | None:
    """The median shorter side of up to ``sample`` evenly spaced files, read from their
    headers only (no decoding); None when none can be read."""
    sides = []
    for path in paths[::max(1, len(paths) // sample)][:sample]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return int(np.median(sides)) if sides else None


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _add_file(listing: Listing, path: Path) -> None:
    name = path.name
    kind = extension_kind(name)
    if name.startswith("._") and extension_kind(name[2:]) != "other":
        listing.skipped.append((path, "macOS metadata file (AppleDouble), not an image"))
    elif name.startswith(".") or kind == "other":
        listing.ignored += 1
    elif kind == "unsupported":
        fmt = UNSUPPORTED_EXTENSIONS[os.path.splitext(name)[1].lower()]
        listing.skipped.append((path, f"{fmt} images cannot be read by Pillow; convert to JPEG "
                                      f"or PNG"))
    else:
        try:
            os.stat(path)
        except OSError as err:
            listing.skipped.append((path, _reason(err)))
            return
        listing.paths.append(path)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(err, FileNotFoundError):
        name = getattr(err, "filename", None)
        return "broken symlink" if name and os.path.islink(name) else "no such file"
    if isinstance(err, PermissionError):
        return "permission denied"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.replace(str(getattr(err, "filename", "") or "\0"), "").strip(" :'") or text


def open_image(path: str | Path, size: int | None = None) -> Image.Image:
    """An RGB image, upright, with its shorter side at least ``size`` when given.

    - EXIF orientation is applied (phone photos are stored sideways);
    - 16-bit and 32-bit grayscale is scaled to 8 bits (a plain convert clips it to white);
    - transparency becomes a white background; palette, CMYK, 1-bit become RGB;
    - an animated GIF or WebP gives its first frame;
    - a large JPEG is decoded at 1/2 .. 1/8 scale when ``size`` allows (``draft``), so a
      40-megapixel photo costs the memory of a 1-megapixel one.

    Raises ``ImageReadError`` with a one-line reason for any file that cannot be used.
    """
    try:
        with _open(path) as image:
            _draft(image, size)
            image.seek(0)
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError,
            MemoryError) as err:
        raise ImageReadError(_decode_reason(err)) from None


def _open(path: str | Path) -> Image.Image:
    with warnings.catch_warnings():
        # sizes between the warning and the error limit are decoded with draft/reduce here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            pass
        image = _open_unbounded(path)
    if image.format != "JPEG":
        width, height = image.size
        image.close()
        raise ImageReadError(f"image is {width}x{height} ({width * height / 1e6:.0f} Mpx), above "
                             f"Pillow's {2 * MAX_PIXELS / 1e6:.0f} Mpx safety limit for "
                             f"{image.format or 'this format'} files; downscale it first")
    return image


def _open_unbounded(path: str | Path) -> Image.Image:
    """Open past Pillow's pixel limit to read the header; the caller bounds what is decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _draft(image: Image.Image, size: int | None) -> None:
    """Let a JPEG decode at a reduced scale that keeps the shorter side >= ``size``; refuse
    one that would still exceed Pillow's pixel limit (only JPEGs get here past it)."""
    width, height = image.size
    if size is not None and image.format == "JPEG" and size < min(width, height):
        scale = size / min(width, height)
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    if image.size[0] * image.size[1] > 2 * MAX_PIXELS:
        raise ImageReadError(f"JPEG of {width}x{height} ({width * height / 1e6:.0f} Mpx) is "
                             f"above Pillow's {2 * MAX_PIXELS / 1e6:.0f} Mpx safety limit at the "
                             f"scale needed; downscale it first")


def _decode_reason(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can identify (corrupt, empty or another format)"
    if isinstance(err, MemoryError):
        return "out of memory while decoding"
    return _reason(err)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, scaling high bit depths and flattening transparency."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in ("PA", "LA", "La", "RGBA",
                                                                "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Gray values of a high-bit-depth mode on the 0..255 scale.

    16-bit modes divide by 257 (65535 -> 255). Pillow's 32-bit ``I`` mode also carries 16-bit
    PNGs and TIFFs: values up to 65535 are read as 16-bit, larger ones scaled by their maximum.
    Float images are taken as 0..1 when they stay in it, else scaled by their maximum.
    """
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and top <= 65535):
        scale = 255.0 / 65535.0
    elif mode == "F" and top <= 1.0:
        scale = 255.0
    else:
        scale = 255.0 / top if top > 0 else 1.0
    return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (antialiased), then the centre ``size x size``: HWC uint8.

    Pillow first reduces by whole factors (``reducing_gap``), which bounds the cost of
    shrinking a huge image, then resamples the rest bilinearly. An image without pixels (a
    side of 0, which only an array or a PIL image made in memory can have) is an
    ``ImageReadError``.
    """
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageReadError(f"empty image ({width}x{height} pixels)")
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_square(path: str | Path, size: int) -> np.ndarray:
    """One file as an ``[size, size, 3]`` uint8 array (see ``open_image``, ``resize_square``)."""
    return resize_square(open_image(path, size), size)
