"""Reviewed labels (labels.json): edits, undo, refusals; the names in assignments.csv,
clusters.json, the report and predict; and ``scanclust export`` in its three formats."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scanclust.cli import main
from scanclust.data.images import unescape_name
from scanclust.export import folder_names
from scanclust.labels import (FILE_NAME, Labels, LabelsError, load_labels, read_assignments,
                              report_names, write_outputs)
from scanclust.files import write_json


def copy_run(review_run: Path, tmp_path: Path, folder: bool = False) -> Path:
    """A copy of the run to change; with ``folder`` also of its images (clusters.json then
    names the copy)."""
    run = tmp_path / "run"
    shutil.copytree(review_run, run, symlinks=True)
    if folder:
        summary = json.loads((run / "clusters.json").read_text())
        shutil.copytree(summary["folder"], tmp_path / "photos", symlinks=True)
        summary["folder"] = str(tmp_path / "photos")
        (run / "clusters.json").write_text(json.dumps(summary))
    return run


def save(labels: Labels) -> None:
    """As the review server saves an edit: labels.json, then the files derived from it."""
    write_json(labels.assignments.run / FILE_NAME, labels.to_json())
    write_outputs(labels)


def images_of(a, prefix: str) -> list[str]:
    return [p for p in a.paths if p.startswith(prefix)]


def test_edits_replay_and_undo_is_exact(review_run: Path) -> None:
    a = read_assignments(review_run)
    labels = Labels(a, None)
    sevens = images_of(a, "d7/")
    edits = [{"op": "rename", "cluster": 0, "name": " zeros "},
             {"op": "merge", "cluster": 1, "into": 0},
             {"op": "move", "images": sevens[:3], "to": 3},  # 3 = K: a new cluster
             {"op": "rename", "cluster": 3, "name": "odd sevens"},
             {"op": "exclude", "images": sevens[3:6]},
             {"op": "include", "images": sevens[5:6]}]
    snapshots = []
    for edit in edits:
        labels.apply(edit)
        snapshots.append(json.dumps(labels.to_json()))
    assert [(c["cluster"], c["name"], c["size"], c["excluded"]) for c in labels.clusters()] == \
        [(0, "zeros", 40, 0), (2, "cluster_02", 17, 2), (3, "odd sevens", 3, 0)]
    assert Counter(labels.label(i) for i in range(60)) == \
        {"zeros": 40, "cluster_02": 15, "odd sevens": 3, None: 2}
    assert labels.model_names() == {0: "zeros", 1: "zeros", 2: "cluster_02"}
    assert labels.edits[0]["name"] == "zeros"  # stored as it is used
    for k in range(1, len(edits) + 1):  # undo = replay without the last edits
        assert json.dumps(labels.replayed(labels.edits[:k]).to_json()) == snapshots[k - 1]
    assert labels.replayed([]).to_json()["clusters"] == [
        {"cluster": c, "name": f"cluster_0{c}", "named": False, "size": 20, "excluded": 0}
        for c in range(3)]


def test_merge_passes_the_name_on_and_clearing_a_name(review_run: Path) -> None:
    labels = Labels(read_assignments(review_run), None)
    labels.apply({"op": "rename", "cluster": 1, "name": "ones"})
    labels.apply({"op": "merge", "cluster": 1, "into": 2})  # 2 has no name: it takes "ones"
    labels.apply({"op": "rename", "cluster": 0, "name": "zeros"})
    labels.apply({"op": "rename", "cluster": 0, "name": "  "})  # back to the default
    assert labels.model_names() == {0: "cluster_00", 1: "ones", 2: "ones"}


BAD_EDITS = [
    ({"op": "rename", "cluster": 9, "name": "x"}, "cluster 9 does not exist"),
    ({"op": "rename", "cluster": True, "name": "x"}, "cluster True does not exist"),
    ({"op": "rename", "cluster": 1, "name": "ZEROS"},
     "cluster 0 is already named zeros; merge the two clusters instead"),
    ({"op": "rename", "cluster": 1, "name": "Cluster_02"}, "cluster 2 is already named cluster_02"),
    ({"op": "rename", "cluster": 1, "name": "a\tb"},
     "a name cannot hold tabs, line breaks or other control characters"),
    ({"op": "rename", "cluster": 1, "name": "x" * 101}, "a name has at most 100 characters"),
    ({"op": "rename", "cluster": 1, "name": 5}, "a name is a string"),
    ({"op": "rename", "cluster": 1}, "a rename edit has the keys op, cluster, name"),
    ({"op": "merge", "cluster": 2, "into": 2}, "cannot merge cluster 2 into itself"),
    ({"op": "merge", "cluster": 2, "into": 1},
     "cluster 1 does not exist (merged into cluster 0)"),
    ({"op": "move", "images": ["d0/nope.png"], "to": 0},
     "image 'd0/nope.png' is not in assignments.csv"),
    ({"op": "move", "images": [], "to": 0}, "images must be a non-empty list of paths"),
    ({"op": "move", "images": ["d1/1_02.png"], "to": 4}, "cluster 4 does not exist"),  # next: 3
    ({"op": "exclude", "images": "d1/1_02.png"}, "images must be a non-empty list of paths"),
    ({"op": "split", "cluster": 0}, "an edit is an object whose op is one of rename, merge"),
    ("rename", "an edit is an object whose op is one of"),
]


@pytest.mark.parametrize("edit,message", BAD_EDITS)
def test_bad_edits_are_refused_and_change_nothing(review_run: Path, edit, message: str) -> None:
    labels = Labels(read_assignments(review_run), None)
    labels.apply({"op": "rename", "cluster": 0, "name": "zeros"})
    if "merged into" in message:
        labels.apply({"op": "merge", "cluster": 1, "into": 0})
    before = json.dumps(labels.to_json())
    with pytest.raises(LabelsError) as refused:
        labels.apply(edit)
    assert str(refused.value).startswith(message)
    assert json.dumps(labels.to_json()) == before


def _labels_file(edits: list, **fields) -> bytes:
    data = {"format": "scanclust-labels", "version": 1, "edits": edits, **fields}
    return json.dumps(data).encode()


@pytest.mark.parametrize("content,message", [
    (b"{not json", "is not valid JSON (Expecting property name enclosed in double quotes: "
                   "line 1 column 2 (char 1)); fix it or move it aside (scanclust leaves it "
                   "as it is)"),
    (b'{"format": "caf\xe9"}', "is not valid JSON ('utf-8' codec can't decode byte 0xe9"),
    (b"[]", "is not a scanclust labels file (format 'scanclust-labels' with a list of edits)"),
    (b'{"format": "scanclust-labels", "version": 2, "edits": []}',
     "has format version 2; this scanclust reads version 1"),
    ("cluster9", ", edit 2: cluster 9 does not exist; fix it or move it aside"),
    ("image", ", edit 1: image 'd0/gone.png' is not in assignments.csv; fix it"),
    ("model", "names the clusters of another model: the run's model (selflabel) was redone "
              "or finished since; move it aside to review the new clusters"),
])
def test_a_bad_labels_file_is_refused_and_kept(review_run: Path, tmp_path: Path, capsys,
                                               content, message: str) -> None:
    run = copy_run(review_run, tmp_path)
    content = {"cluster9": _labels_file([{"op": "rename", "cluster": 0, "name": "a"},
                                              {"op": "merge", "cluster": 9, "into": 0}]),
               "image": _labels_file([{"op": "exclude", "images": ["d0/gone.png"]}]),
               "model": _labels_file([], model={"stage": "selflabel", "output": "0" * 64}),
               }.get(content, content)
    (run / "labels.json").write_bytes(content)
    for command in (["review", str(run), "--no-browser"], ["export", str(run), str(tmp_path / "d")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"scanclust: error: {run / 'labels.json'}") and message in err
        assert err.count("\n") == 1
    assert (run / "labels.json").read_bytes() == content
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("case", ["missing", "not a run", "unfinished", "no assignments"])
def test_a_run_that_is_not_ready(review_run: Path, tmp_path: Path, capsys, case: str) -> None:
    run = copy_run(review_run, tmp_path)
    expected = {
        "missing": f"RUN {tmp_path / 'nope'} does not exist",
        "not a run": f"RUN {tmp_path} is not a scanclust run directory (no config.yaml)",
        "unfinished": f"{run} has no finished scan stage, so no clusters yet; finish it with "
                      f"`scanclust cluster FOLDER --out {run} --resume`",
        "no assignments": f"{run} has no assignments.csv; write it with `scanclust report "
                          f"--out {run}` (or run `scanclust cluster FOLDER --out {run}`)"}[case]
    target = {"missing": tmp_path / "nope", "not a run": tmp_path}.get(case, run)
    if case == "unfinished":
        for stage in ("scan", "selflabel"):
            (run / stage / "summary.json").unlink()
    if case == "no assignments":
        (run / "assignments.csv").unlink()
    for command in (["review", str(target), "--no-browser"], ["export", str(target),
                                                              str(tmp_path / "d")]):
        assert main(command) == 2
        assert capsys.readouterr().err == f"scanclust: error: {expected}\n"
    assert not (tmp_path / "nope").exists() and not (tmp_path / "d").exists()


def test_names_in_csv_json_report_and_predict(review_run: Path, tmp_path: Path) -> None:
    from scanclust.results import report

    run = copy_run(review_run, tmp_path)
    a = read_assignments(run)
    labels = load_labels(a)
    for edit in ({"op": "rename", "cluster": 0, "name": "zeros"},
                 {"op": "rename", "cluster": 2, "name": "<b>sevens</b>"},
                 {"op": "merge", "cluster": 1, "into": 0},
                 {"op": "exclude", "images": images_of(a, "d7/")[:1]}):
        labels.apply(edit)
    save(labels)
    table = list(csv.DictReader(open(run / "assignments.csv", encoding="utf-8")))
    assert list(table[0]) == ["path", "cluster", "confidence", "prototype", "label"]
    assert Counter(row["label"] for row in table) == {"zeros": 40, "<b>sevens</b>": 19, "": 1}
    assert Counter(row["cluster"] for row in table) == {"0": 20, "1": 20, "2": 20}  # the model's
    clusters = json.loads((run / "clusters.json").read_text())["clusters"]
    assert [(c["name"], c["merged_into"]) for c in clusters] == \
        [("zeros", None), ("zeros", 0), ("<b>sevens</b>", None)]
    saved = json.loads((run / "labels.json").read_text())
    assert saved["version"] == 1 and saved["model"]["stage"] == "selflabel"
    assert saved["merged"] == {"1": 0} and list(saved["labels"].values()).count(None) == 1

    # the report derives the clusters again from the model, then puts the names back
    report(None, run, overrides=["progress=false"])
    page = (run / "report.html").read_text(encoding="utf-8")
    table = list(csv.DictReader(open(run / "assignments.csv", encoding="utf-8")))
    names = {"0": "zeros", "1": "zeros", "2": "<b>sevens</b>"}
    excluded = images_of(a, "d7/")[0]
    for row in table:
        assert row["label"] == ("" if row["path"] == excluded else names[row["cluster"]])
    for c in {row["cluster"] for row in table}:
        assert f"<h2>Cluster {c}: {names[c].replace('<', '&lt;').replace('>', '&gt;')}</h2>" in page
    assert "<b>sevens" not in page  # escaped

    folder = Path(json.loads((run / "clusters.json").read_text())["folder"])
    assert main(["predict", str(run), str(folder / "d1"), "--csv", str(tmp_path / "p.csv"),
                 "--device", "cpu"]) == 0
    predicted = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(predicted) == 20 and list(predicted[0]) == ["path", "cluster", "confidence", "label"]
    assert all(row["label"] == names[row["cluster"]] for row in predicted)


def test_the_report_without_names_when_labels_do_not_fit(review_run: Path, tmp_path: Path,
                                                         caplog) -> None:
    run = copy_run(review_run, tmp_path)
    (run / "labels.json").write_bytes(_labels_file([{"op": "merge", "cluster": 7,
                                                          "into": 0}]))
    with caplog.at_level(logging.WARNING, logger="scanclust"):
        assert report_names(run) == {}
    assert "report: the reviewed names are not shown: " in caplog.text
    assert "edit 1: cluster 7 does not exist" in caplog.text
    assert "label" not in (run / "assignments.csv").read_text().splitlines()[0]


def test_folder_names_are_safe_and_unique() -> None:
    assert folder_names(["zeros", "a/b", "a_b", "..", ".hidden", "", "Cat", "cat", "x:y?",
                         "A_B"]) == {
        "zeros": "zeros", "A_B": "A_B", "a_b": "a_b-2", "a/b": "a_b-3", "..": "_.",
        ".hidden": "_hidden", "": "unnamed", "Cat": "Cat", "cat": "cat-2", "x:y?": "x_y_"}


def _reviewed(review_run: Path, tmp_path: Path, folder: bool = False) -> Path:
    """Names that need care as folders, one new cluster, two excluded images."""
    run = copy_run(review_run, tmp_path, folder)
    labels = load_labels(read_assignments(run))
    a = labels.assignments
    for edit in ({"op": "rename", "cluster": 0, "name": "zeros"},
                 {"op": "rename", "cluster": 1, "name": "../ones"},
                 {"op": "rename", "cluster": 2, "name": "sevens"},
                 {"op": "exclude", "images": images_of(a, "d7/")[:2]},
                 {"op": "move", "images": images_of(a, "d0/deep/")[:1], "to": 3},
                 {"op": "rename", "cluster": 3, "name": "odd: zero"}):
        labels.apply(edit)
    save(labels)
    return run


EXPECTED = {"_._ones": 20, "odd_ zero": 1, "sevens": 18, "zeros": 19}


@pytest.mark.parametrize("fmt,link", [("folders", None), ("folders", "copy"),
                                      ("imagefolder", "symlink"), ("imagefolder", "copy")])
def test_export_is_an_imagefolder(review_run: Path, tmp_path: Path, capsys, fmt: str,
                                  link: str | None) -> None:
    from torchvision.datasets import ImageFolder

    run = _reviewed(review_run, tmp_path)
    dest = tmp_path / "data"
    assert main(["export", str(run), str(dest), "--format", fmt]
                + (["--link", link] if link else [])) == 0
    assert capsys.readouterr().out == (f"exported 58 images in 4 labels to {dest} ({fmt}, "
                                       f"{link or 'symlink'}); 2 excluded images left out\n")
    data = ImageFolder(str(dest))
    assert data.classes == sorted(EXPECTED)
    assert Counter(data.classes[t] for _, t in data.samples) == EXPECTED
    image, target = data[0]
    assert image.size == (16, 16) and data.classes[target] == "_._ones"
    inside = "d0__deep__0_01.png" if fmt == "imagefolder" else "d0/deep/0_01.png"
    exported = dest / "odd_ zero" / inside
    assert [Path(p) for p, _ in data.samples if "odd_ zero" in p] == [exported]
    assert exported.is_symlink() == (link != "copy")
    folder = Path(json.loads((run / "clusters.json").read_text())["folder"])
    assert exported.read_bytes() == (folder / "d0/deep/0_01.png").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_csv_and_without_a_review(review_run: Path, tmp_path: Path) -> None:
    run = _reviewed(review_run, tmp_path)
    assert main(["export", str(run), str(tmp_path / "labels.csv"), "--format", "csv"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "labels.csv", encoding="utf-8")))
    assert Counter(row["label"] for row in rows) == \
        {"../ones": 20, "odd: zero": 1, "sevens": 18, "zeros": 19}
    assert all(Path(unescape_name(row["path"])).is_absolute() and
               Path(unescape_name(row["path"])).is_file() for row in rows)
    assert any(row["path"].endswith("/d0/<img src=x onerror=alert(1)>.png") for row in rows)

    from torchvision.datasets import ImageFolder

    (run / "labels.json").unlink()  # without a review: the model's clusters
    dest = tmp_path / "plain"
    dest.mkdir()  # an empty folder is taken
    assert main(["export", str(run), str(dest)]) == 0
    data = ImageFolder(str(dest))
    assert data.classes == ["cluster_00", "cluster_01", "cluster_02"]
    assert Counter(t for _, t in data.samples) == {0: 20, 1: 20, 2: 20}


def test_imagefolder_format_converts_what_imagefolder_skips(review_run: Path, tmp_path: Path,
                                                            caplog) -> None:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    run = copy_run(review_run, tmp_path, folder=True)
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (40, 200)]
    frames[0].save(tmp_path / "photos" / "d7" / "anim.gif", save_all=True,
                   append_images=frames[1:])
    with open(run / "assignments.csv", "a", encoding="utf-8") as handle:
        handle.write("d7/anim.gif,2,0.500000,false\n")
    assert main(["export", str(run), str(tmp_path / "flat"), "--format", "imagefolder"]) == 0
    converted = tmp_path / "flat" / "cluster_02" / "d7__anim.gif.png"
    with Image.open(converted) as image:
        assert image.format == "PNG" and image.getpixel((0, 0)) == (40, 40, 40)  # frame 1
    assert len(ImageFolder(str(tmp_path / "flat"))) == 61
    with caplog.at_level(logging.WARNING, logger="scanclust"):
        assert main(["export", str(run), str(tmp_path / "tree")]) == 0
    assert "ImageFolder skips by default (.gif, .jfif, ...): 1" in caplog.text
    assert len(ImageFolder(str(tmp_path / "tree"))) == 60


def test_export_refusals(review_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    run = copy_run(review_run, tmp_path)
    folder = Path(json.loads((run / "clusters.json").read_text())["folder"])
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    (tmp_path / "file.csv").write_text("keep")
    cases = [
        (["export", str(run), str(full)], f"DEST {full} exists and is not empty; choose a new "
                                          f"path or remove it"),
        (["export", str(run), str(tmp_path / "file.csv"), "--format", "csv"],
         f"DEST {tmp_path / 'file.csv'} exists; choose a new path or remove it"),
        (["export", str(run), str(folder / "out")],
         f"DEST {folder / 'out'} is inside the image folder {folder}; a later `scanclust "
         f"cluster` would read the exported images"),
        (["export", str(run), str(tmp_path / "c.csv"), "--format", "csv", "--link", "copy"],
         "--link applies to the folders and imagefolder formats, not csv"),
    ]
    for command, message in cases:
        assert main(command) == 2
        assert capsys.readouterr().err == f"scanclust: error: {message}\n"
    assert (tmp_path / "file.csv").read_text() == "keep" and list(full.iterdir()) == [full / "x"]

    calls, symlink = [], os.symlink

    def failing_symlink(source, target):  # the disk fills up after 10 images
        calls.append(target)
        if len(calls) > 10:
            raise OSError(28, "No space left on device")
        symlink(source, target)

    monkeypatch.setattr("scanclust.export.os.symlink", failing_symlink)
    assert main(["export", str(run), str(tmp_path / "half")]) == 2
    assert capsys.readouterr().err == (f"scanclust: error: cannot export to {tmp_path / 'half'}: "
                                       f"No space left on device; nothing was written there\n")
    assert len(calls) == 11 and not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half")]

    labels = load_labels(read_assignments(run))
    labels.apply({"op": "exclude", "images": list(labels.assignments.paths)})
    save(labels)
    assert main(["export", str(run), str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (f"scanclust: error: nothing to export: all 60 images of "
                                       f"{run} are excluded\n")
