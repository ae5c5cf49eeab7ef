"""Applying a finished run to new images: the Python API's inputs and ``scanclust predict``."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import scanclust
from scanclust.checkpoint import load_checkpoint, save_checkpoint
from scanclust.cli import main
from scanclust.clusterer import PredictError
from scanclust.data import images as I
from scanclust.rundir import RunDirError


def test_inputs_accepted_and_consistent(folder_run: tuple[Path, Path, list[str]]) -> None:
    folder, out, readable = folder_run
    model = scanclust.load(out)
    paths = [folder / name for name in readable[:5]]
    labels, probs = model.predict(paths, batch_size=2)
    assert labels.shape == (5,) and probs.shape == (5, model.model.num_clusters)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # the run's own assignments for the same files
    rows = {r["path"]: int(r["cluster"]) for r in csv.DictReader(open(out / "assignments.csv"))}
    assert labels.tolist() == [rows[name] for name in readable[:5]]
    one = model.predict(str(paths[0]))  # a bare string is one path, not five characters
    assert one[0].tolist() == labels[:1].tolist()
    assert model.predict(p for p in paths)[0].tolist() == labels.tolist()  # a generator
    pixels = np.asarray(Image.open(paths[0]).convert("RGB"))  # H x W x 3 uint8
    assert model.predict(pixels)[0].tolist() == labels[:1].tolist()
    assert model.predict(np.stack([pixels, pixels]))[0].tolist() == labels[[0, 0]].tolist()
    assert model.predict([Image.open(paths[1]), pixels[..., 0]])[0].shape == (2,)
    assert model.predict([])[1].shape == (0, model.model.num_clusters)


@pytest.mark.parametrize("bad", [None, 3, 2.5, {"a": 1}, b"a.png", [Path("a.png"), 7],
                                 np.zeros((4, 4, 3), dtype=np.float32)])
def test_other_inputs_are_type_errors(folder_run: tuple[Path, Path, list[str]], bad) -> None:
    model = scanclust.load(folder_run[1])
    with pytest.raises(TypeError, match="it takes an image path"):
        model.predict(bad)


def test_unreadable_and_huge_files(folder_run: tuple[Path, Path, list[str]], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = scanclust.load(folder_run[1])
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(PredictError, match=f"cannot read image {tmp_path / 'bad.png'}"):
        model.predict([tmp_path / "bad.png"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100 x 100 stands in for 20000^2
    monkeypatch.setattr(I, "MAX_PIXELS", 1000)
    Image.new("RGB", (100, 100)).save(tmp_path / "huge.png")
    with pytest.raises(PredictError, match="safety limit"):
        model.predict(tmp_path / "huge.png")


def test_predict_command(folder_run: tuple[Path, Path, list[str]], tmp_path: Path,
                         capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    folder, out, readable = folder_run
    extra = tmp_path / "new"
    extra.mkdir()
    Image.open(folder / readable[0]).save(extra / "copy.png")
    (extra / "bad.jpg").write_bytes(b"nope")
    csv_path = tmp_path / "p.csv"
    code = main(["predict", str(out), str(folder / readable[1]), str(extra),
                 str(tmp_path / "missing.png"), "--csv", str(csv_path), "--batch-size", "2"])
    assert code == 0
    rows = list(csv.DictReader(open(csv_path)))
    assert [Path(r["path"]).name for r in rows] == [Path(readable[1]).name, "copy.png"]
    warned = caplog.text  # logged to stderr by the command line
    assert "skipped" in warned and "bad.jpg" in warned and "missing.png: does not exist" in warned
    capsys.readouterr()
    assert main(["predict", str(out), str(extra / "copy.png")]) == 0  # CSV on stdout
    printed = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert printed[0] == ["path", "cluster", "confidence"] and len(printed) == 2
    assert main(["predict", str(out), str(extra / "bad.jpg"), "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err


def test_predict_names_that_are_not_utf8(folder_run: tuple[Path, Path, list[str]],
                                         tmp_path: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Files with a Latin-1 name, a tab or a newline are read and written escaped; a CSV is
    replaced only when the new one is complete."""
    import os

    from scanclust.data.images import escape_name

    folder, out, readable = folder_run
    new = Path(os.fsdecode(os.fsencode(tmp_path) + b"/n\xe9w"))
    new.mkdir()
    for name in (b"caf\xe9.png", b"tab\there.png", b"new\nline.png"):
        Image.open(folder / readable[0]).save(os.fsencode(new) + b"/" + name, format="PNG")
    old = tmp_path / "old.csv"
    old.write_text("path,cluster,confidence\nearlier.png,1,0.5\n")
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new CSV cannot be completed
    assert main(["predict", str(out), str(new), "--csv", str(old)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"scanclust: error: cannot write {old}: No space left on device"]
    assert old.read_text() == "path,cluster,confidence\nearlier.png,1,0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n\udce9w", "old.csv"]  # no leftovers
    monkeypatch.setattr(os, "fsync", real_fsync)

    assert main(["predict", str(out), str(new), "--csv", str(old)]) == 0
    text = old.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 4
    prefix = escape_name(new)
    assert prefix.endswith("/n\\xe9w")
    assert [r["path"] for r in csv.DictReader(text.splitlines())] == [
        f"{prefix}/caf\\xe9.png", f"{prefix}/new\\nline.png", f"{prefix}/tab\\there.png"]
    capsys.readouterr()
    assert main(["predict", str(out), os.fsdecode(os.fsencode(new) + b"/caf\xe9.png")]) == 0
    printed = list(csv.reader(io.StringIO(capsys.readouterr().out)))  # stdout: UTF-8 strict
    assert printed[1][0] == f"{prefix}/caf\\xe9.png"


def test_empty_image_is_a_one_line_error(folder_run: tuple[Path, Path, list[str]]) -> None:
    with pytest.raises(PredictError, match=r"^cannot read item 0 \(a numpy array of shape "
                                           r"\(0, 20, 3\)\): empty image \(20x0 pixels\)$"):
        scanclust.predict(folder_run[1], np.zeros((0, 20, 3), np.uint8))
    pixels = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(PredictError, match=r"^cannot read item 1 \(a PIL image of 0x5 pixels\)"):
        scanclust.load(folder_run[1]).predict([pixels, Image.new("RGB", (0, 5))])


def test_a_checkpoint_copied_in_is_refused(folder_run: tuple[Path, Path, list[str]],
                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Same shapes, other weights: as ``evaluate`` and ``report``, predict verifies the stage."""
    folder, out, readable = folder_run
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    checkpoint = run / "selflabel" / "checkpoint.pt"
    state = load_checkpoint(checkpoint, "selflabel")
    key = next(iter(state["model"]))
    state["model"][key] = state["model"][key] + 1
    save_checkpoint(checkpoint, "selflabel", state)
    expected = (f"{run}/selflabel: checkpoint.pt changed after the selflabel stage wrote it "
                f"(replaced by hand, or copied from another run?); redo it with `scanclust "
                f"selflabel --out {run} --force` (its old output is kept aside)")
    with pytest.raises(RunDirError) as err:
        scanclust.load(run)
    assert str(err.value) == expected
    capsys.readouterr()
    assert main(["predict", str(run), str(folder / readable[0])]) == 2
    assert capsys.readouterr().err == f"scanclust: error: {expected}\n"
    assert scanclust.load(out).stage == "selflabel"  # the run it came from still loads
