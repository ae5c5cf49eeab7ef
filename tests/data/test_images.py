"""Reading images as they come: formats, modes, orientation, huge files, folder listings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scanclust.data import decoding
from scanclust.data import images as I
from scanclust.data.images import (ImageReadError, decode_square, escape_name, list_images,
                                   open_image, unescape_name)


def _rgb(path: Path, color=(200, 30, 60), size=(8, 6), **save) -> Path:
    Image.new("RGB", size, color).save(path, **save)
    return path


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    # a 16-bit ramp: a plain convert("RGB") clips everything above 255 to white
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    got = np.asarray(open_image(tmp_path / "deep.png"))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert got.shape == (16, 16, 3)
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)
    assert got.mean() < 130  # the ramp's mean is 127.5; a clipped one would be ~254


def test_transparency_becomes_white_and_modes_become_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    got = open_image(tmp_path / "a.png")
    assert got.mode == "RGB" and got.getpixel((0, 0)) == (255, 255, 255)
    assert got.getpixel((1, 1)) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "p.png", transparency=0)
    got = open_image(tmp_path / "p.png")
    assert got.getpixel((0, 0)) == (255, 255, 255) and got.getpixel((2, 2)) == (0, 255, 0)
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    assert open_image(tmp_path / "g.png").getpixel((0, 0)) == (77, 77, 77)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = open_image(tmp_path / "cmyk.jpg").getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta and yellow full: red


@pytest.mark.parametrize("name, save", [("x.webp", {"lossless": True}), ("x.bmp", {}),
                                        ("x.tiff", {}), ("x.TIF", {}), ("x.gif", {})])
def test_formats(tmp_path: Path, name: str, save: dict) -> None:
    path = _rgb(tmp_path / name, color=(255, 0, 0), **save)
    assert open_image(path).getpixel((0, 0)) == (255, 0, 0)


def test_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert open_image(tmp_path / "anim.gif").getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert open_image(tmp_path / "phone.jpg").size == (4, 8)


def test_large_jpeg_decoded_at_reduced_scale(tmp_path: Path) -> None:
    _rgb(tmp_path / "big.jpg", size=(1600, 1200))
    assert open_image(tmp_path / "big.jpg", size=100).size == (200, 150)  # 1/8 scale
    assert open_image(tmp_path / "big.jpg").size == (1600, 1200)
    assert decode_square(tmp_path / "big.jpg", 100).shape == (100, 100, 3)


def test_decompression_bomb_is_a_one_line_reason(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's limit made tiny, so a 100 x 100 file stands in for a 20000 x 20000 one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(I, "MAX_PIXELS", 1000)
    _rgb(tmp_path / "bomb.png", size=(100, 100))
    with pytest.raises(ImageReadError, match=r"100x100 .* safety limit"):
        open_image(tmp_path / "bomb.png", size=8)
    # a JPEG is decoded at 1/8 scale (13 x 13 pixels), under the limit
    _rgb(tmp_path / "big.jpg", size=(100, 100))
    assert open_image(tmp_path / "big.jpg", size=8).size == (13, 13)
    with pytest.raises(ImageReadError, match="safety limit"):
        open_image(tmp_path / "big.jpg")
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is restored after the header read


def test_unreadable_files_have_reasons(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    _rgb(tmp_path / "whole.jpg", size=(64, 64))
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    for name in ("empty.png", "noise.jpg", "cut.jpg"):
        with pytest.raises(ImageReadError) as info:
            open_image(tmp_path / name)
        assert "\n" not in str(info.value) and str(tmp_path) not in str(info.value)


def test_resize_square_centre_crop() -> None:
    image = Image.fromarray(np.tile(np.arange(12, dtype=np.uint8) * 20, (6, 1)))
    out = I.resize_square(image.convert("RGB"), 6)  # 12 x 6 -> already 6 tall: crop the middle
    assert out.shape == (6, 6, 3) and out[0, :, 0].tolist() == [60, 80, 100, 120, 140, 160]


def test_listing_recursive_case_insensitive_and_safe(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _rgb(root / "one.JPG")
    _rgb(root / "a" / "two.png")
    _rgb(root / "a" / "b" / "three.Jpeg")
    _rgb(root / ".hidden" / "no.png")
    _rgb(root / ".dotfile.png")
    (root / "._one.JPG").write_bytes(b"\x00\x05\x16\x07 mac metadata")
    (root / "notes.txt").write_text("hello")
    (root / "pic.heic").write_bytes(b"....ftypheic")
    (root / "logo.SVG").write_text("<svg/>")
    os.symlink(root, root / "a" / "loop")  # a folder link back to the top
    os.symlink(root / "l2.jpg", root / "l1.jpg")
    os.symlink(root / "l1.jpg", root / "l2.jpg")  # a file link loop
    os.symlink(root / "gone.png", root / "dangling.png")
    listing = list_images(root)
    assert [listing.relative(p) for p in listing.paths] == ["a/b/three.Jpeg", "a/two.png",
                                                            "one.JPG"]
    reasons = {p.name: r for p, r in listing.skipped}
    assert set(reasons) == {"._one.JPG", "pic.heic", "logo.SVG", "l1.jpg", "l2.jpg",
                            "dangling.png"}
    assert "AppleDouble" in reasons["._one.JPG"] and "HEIC" in reasons["pic.heic"]
    assert "SVG" in reasons["logo.SVG"] and reasons["l1.jpg"] == "symlink loop"
    assert reasons["dangling.png"] == "broken symlink"
    assert listing.ignored == 2  # notes.txt and .dotfile.png


def test_decode_into_reports_failures_by_index(tmp_path: Path) -> None:
    paths = [_rgb(tmp_path / f"{i}.png", color=(i * 50, 0, 0)) for i in range(3)]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    paths.insert(1, tmp_path / "bad.png")
    target = tmp_path / "out.npy"
    np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(4, 4, 4, 3))
    failures = decoding.decode_into(paths, 4, target, workers=2, progress=False)
    out = np.load(target)
    assert list(failures) == [1] and out[1].max() == 0
    assert [int(out[i, 0, 0, 0]) for i in (0, 2, 3)] == [0, 50, 100]


@pytest.mark.parametrize("raw, written", [
    (b"a\\b\tc\xe9.png", "a\\\\b\\tc\\xe9.png"),  # backslash, tab, a Latin-1 byte
    (b"new\nline\r.png", "new\\nline\\r.png"),
    (b"esc\x1b[31m\x7f.png", "esc\\x1b[31m\\x7f.png"),  # control characters: one byte each
    ("a\u2028b\x85.png".encode(), "a\\xe2\\x80\\xa8b\\xc2\\x85.png"),  # UTF-8 line breaks
    (b"d\xff/\xc3.png", "d\\xff/\\xc3.png"),  # a lone byte, a cut-off UTF-8 sequence
    (b"\\x41.png", "\\\\x41.png"),  # a name that looks like an escape stays itself
    ("naïve été <b>.png".encode(), "naïve été <b>.png"),  # an ordinary name: as it is
])
def test_escape_name_by_hand(raw: bytes, written: str) -> None:
    assert escape_name(raw) == written
    assert escape_name(os.fsdecode(raw)) == written == escape_name(Path(os.fsdecode(raw)))
    assert os.fsencode(unescape_name(written)) == raw
    assert "\t" not in written and len(written.splitlines()) == 1
    written.encode("utf-8")  # always writable as UTF-8


def test_names_that_are_not_utf8_are_listed_and_decoded(tmp_path: Path) -> None:
    for k, name in enumerate([b"caf\xe9.png", b"new\nline.png", b"sub\xff/x.png",
                              b"tab\there.png"]):
        path = Path(os.fsdecode(os.fsencode(tmp_path / "in") + b"/" + name))
        path.parent.mkdir(parents=True, exist_ok=True)
        _rgb(path, color=(k * 50, 0, 0))
    listing = list_images(tmp_path / "in")
    assert [escape_name(listing.relative(p)) for p in listing.paths] == [
        "caf\\xe9.png", "new\\nline.png", "sub\\xff/x.png", "tab\\there.png"]
    assert listing.skipped == []
    target = tmp_path / "out.npy"
    np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(4, 4, 4, 3))
    assert decoding.decode_into(listing.paths, 4, target, workers=2, progress=False) == {}
    assert np.load(target)[:, 0, 0, 0].tolist() == [0, 50, 100, 150]
