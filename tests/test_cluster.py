"""``scanclust cluster``: planning from the data, the run on a real-looking folder, resume,
export, and the errors a new user meets first."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import scanclust
from scanclust.cli import main
from scanclust.folder import cluster, fit_overcluster, parse_clusters, parse_k_range, plan
from scanclust.config import ConfigError, load_config
from scanclust.rundir import RunDirError
from tests.conftest import CLUSTER_TINY, write_digit_folder


def test_plan_scales_with_the_data() -> None:
    small = plan("cpu", "scratch", images=3000, side=32)
    assert small["data.image_size"] == 32 and small["model.backbone"] == "resnet_tiny"
    assert small["pretext.epochs"] == 50  # 150,000 samples / 3,000 images
    assert small["scan.cached_views"] == 5 and small["scan.update_backbone"] is False
    assert small["scan.epochs"] == 200 and small["selflabel.epochs"] == 20
    assert small["scan.augment"] == "simclr" and small["selflabel.augment"] == "strong"
    assert small["scan.overcluster"] == 3 and "scan.prior" not in small  # uniform, x3, merged
    photos = plan("cpu", "scratch", images=100_000, side=3000)
    assert photos["data.image_size"] == 32 and photos["pretext.epochs"] == 10  # lower bound
    tiny = plan("cpu", "scratch", images=200, side=12)
    assert tiny["data.image_size"] == 12 and tiny["pretext.epochs"] == 500  # upper bound
    gpu = plan("gpu", "scratch", images=5000, side=96)
    assert gpu["model.backbone"] == "resnet18_stl" and gpu["data.image_size"] == 96
    assert gpu["scan.update_backbone"] is True and gpu["scan.epochs"] == 80
    # fine-tuning lost on balanced digits: 4.0 points over-clustered, 2.5 with the adaptive prior
    assert "scan.prior" not in gpu and "scan.overcluster" not in gpu
    for settings in (small, photos, tiny, gpu):
        load_config(None, settings)  # every plan is a valid config


def test_plan_for_pretrained_backbones(tmp_path: Path) -> None:
    tv = plan("cpu", "resnet50", images=3000, side=400)
    assert tv["pretext.method"] == "pretrained" and tv["model.backbone"] == "resnet50"
    assert tv["data.image_size"] == 224 and tv["scan.update_backbone"] is False
    assert tv["scan.cached_views"] == 1 and tv["selflabel.cached_views"] == 1
    assert tv["mine.batch_size"] == tv["evaluate.batch_size"] == 32  # 2.3x the rate of 512
    # not measured on pretrained features: K clusters under the uniform prior
    assert "scan.prior" not in tv and "scan.overcluster" not in tv
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    local = plan("gpu", str(weights), images=3000, side=400)
    assert local["pretext.method"] == "weights" and local["pretext.weights"] == str(weights)
    for settings in (tv, local):
        load_config(None, settings)


def test_overclustering_is_fitted_to_the_folder(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, {"scan.overcluster": 5})
    # 3,000 images, 10 clusters: 50 trained clusters of 60 images on average, as asked
    assert fit_overcluster(cfg, 5, 3000, 10).scan.overcluster == 5
    # 200 images, 10 clusters: 2 x 10 clusters keep 10 images each
    with caplog.at_level(logging.INFO, logger="scanclust"):
        assert fit_overcluster(cfg, 5, 200, 10).scan.overcluster == 2
    assert "200 images for 10 clusters, so scan.overcluster=2 (instead of 5)" in caplog.text
    assert fit_overcluster(cfg, 5, 60, 10).scan.overcluster == 1  # no over-clustering
    # K chosen later than the first fit (--clusters auto): fitted again from the asked factor
    assert fit_overcluster(fit_overcluster(cfg, 5, 200, 20), 5, 200, 4).scan.overcluster == 5


def test_argument_errors() -> None:
    assert parse_clusters("7") == 7 and parse_clusters("auto") == "auto"
    with pytest.raises(ConfigError, match="--clusters 'many'"):
        parse_clusters("many")
    with pytest.raises(ConfigError, match="at least 2"):
        parse_clusters("1")
    assert parse_k_range("3:5", 1000) == [3, 4, 5]
    assert parse_k_range(None, 1000) == list(range(2, 21))
    assert parse_k_range(None, 60) == [2, 3, 4, 5, 6]  # about 10 images per cluster at most
    with pytest.raises(ConfigError, match="--k-range"):
        parse_k_range("5", 1000)


def test_outputs_of_a_folder_run(folder_run: tuple[Path, Path, list[str]]) -> None:
    folder, out, readable = folder_run
    rows = list(csv.DictReader(open(out / "assignments.csv", encoding="utf-8")))
    assert [r["path"] for r in rows] == readable  # every readable image, once, in order
    assert set(rows[0]) == {"path", "cluster", "confidence", "prototype"}
    choice = json.loads((out / "choose_k.json").read_text())
    assert 2 <= choice["k"] <= 4 and choice["ks"] == [2, 3, 4]
    assert (out / "choose_k.png").is_file()
    clusters = json.loads((out / "clusters.json").read_text())
    assert clusters["num_clusters"] == choice["k"] and clusters["num_images"] == len(readable)
    assert sum(c["size"] for c in clusters["clusters"]) == len(readable)
    for c in clusters["clusters"]:
        members = {r["path"] for r in rows if int(r["cluster"]) == c["cluster"]}
        assert set(c["prototypes"]) <= members and len(c["prototypes"]) == min(5, len(members))
    flagged = {r["path"] for r in rows if r["prototype"] == "true"}
    assert flagged == {p for c in clusters["clusters"] for p in c["prototypes"]}
    _, probs = scanclust.load(out, device="cpu").predict([folder / r["path"] for r in rows[:6]])
    assert [float(r["confidence"]) for r in rows[:6]] == pytest.approx(probs.max(1), abs=2e-6)
    skipped = dict(line.split("\t") for line in
                   (out / "skipped.txt").read_text(encoding="utf-8").splitlines())
    assert set(skipped) == {"broken.jpg", "._0_00.png", "drawing.svg"}
    # --export symlink: a folder per cluster holding a link to every image
    links = sorted((out / "clusters").rglob("*"))
    files = [p for p in links if p.is_symlink()]
    assert len(files) == len(readable)
    assert all(Path(os.readlink(p)).is_relative_to(folder.resolve()) for p in files)
    # the page escapes names: the HTML in a file name stays text
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert "<img src=x" not in page and "script-src" not in page
    assert "default-src 'none'" in page and "Choosing K" in page


def test_resume_keeps_the_trained_stages(folder_run: tuple[Path, Path, list[str]],
                                         tmp_path: Path) -> None:
    folder, out, _ = folder_run
    checkpoint = out / "scan" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    summary = cluster(folder, out, clusters="auto", k_range="2:4", preset="quick",
                      overrides=CLUSTER_TINY, resume=True)
    assert checkpoint.stat().st_mtime_ns == before
    assert summary["num_images"] == 60 and summary["num_skipped"] == 3


def _digit_png(path: Path, index: int) -> None:
    """Another digit's pixels under the same name, written a second later than the last."""
    from PIL import Image
    from sklearn.datasets import load_digits

    old = path.stat().st_mtime_ns
    image = (load_digits().images[index] * 255 / 16).astype("uint8")
    Image.fromarray(image).resize((16, 16)).save(path, format="PNG")
    os.utime(path, ns=(old + 10**9, old + 10**9))


def test_a_changed_folder_is_refused_and_an_unchanged_one_resumes(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture
                                                                  ) -> None:
    folder, out = tmp_path / "photos", tmp_path / "run"
    write_digit_folder(folder, nested=False)
    cluster(folder, out, clusters=3, preset="quick", overrides=CLUSTER_TINY)
    refused = (f"the images in FOLDER {folder.resolve()} changed since the pretext stage of "
               f"{out} read them ({{}}); run again with --force to redo every stage (the old "
               f"output is kept aside), or into a new --out")
    extra, gone = folder / "extra.png", folder / "1_05.png"
    extra.write_bytes(gone.read_bytes())
    with pytest.raises(RunDirError) as err:
        cluster(folder, out, clusters=3, preset="quick", overrides=CLUSTER_TINY, resume=True)
    assert str(err.value) == refused.format("0 files changed, 1 added, 0 removed")
    kept, stat = gone.read_bytes(), gone.stat()
    extra.unlink()
    gone.unlink()
    with pytest.raises(RunDirError) as err:
        cluster(folder, out, clusters=3, preset="quick", overrides=CLUSTER_TINY, resume=True)
    assert str(err.value) == refused.format("0 files changed, 0 added, 1 removed")

    gone.write_bytes(kept)  # the folder as it was: the stages are kept
    os.utime(gone, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    checkpoint = out / "selflabel" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    cluster(folder, out, clusters=3, preset="quick", overrides=CLUSTER_TINY, resume=True)
    assert checkpoint.stat().st_mtime_ns == before

    for i, name in enumerate(("0_03.png", "0_04.png", "1_03.png", "7_04.png")):
        _digit_png(folder / name, 100 + i)  # same count, same names, other pixels
    scan_before = (out / "scan" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["scan", "--out", str(out), "--force"]) == 2
    assert capsys.readouterr().err == (
        f"scanclust: error: the images under data.root={folder.resolve()} changed since the "
        f"pretext stage read them (4 files changed, 0 added, 0 removed); redo the run from "
        f"pretext: `scanclust pretext --out {out} --force`, then the stages after it\n")
    assert (out / "scan" / "checkpoint.pt").read_bytes() == scan_before
    assert not list(out.glob("scan.old-*"))
    with pytest.raises(RunDirError, match=r"\(4 files changed, 0 added, 0 removed\)"):
        cluster(folder, out, clusters=3, preset="quick", overrides=CLUSTER_TINY, resume=True)


def test_labelled_run_reports_metrics_and_confusion(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    write_digit_folder(folder, per_class=12, nested=True)
    for odd in ("broken.jpg", "._0_00.png", "drawing.svg", "notes.txt"):
        (folder / odd).unlink()  # loose files next to class folders are refused
    cluster(folder, tmp_path / "run", preset="quick", labels_from_folders=True,
            overrides=CLUSTER_TINY)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_clusters"] == 3 and "acc" in metrics["stages"]["selflabel"]
    assert "Confusion matrix" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def test_command_line_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["cluster", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "contains no images" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_digit_folder(tmp_path / "f", per_class=2, nested=False)
    assert main(["cluster", str(tmp_path / "f"), "--out", str(tmp_path / "f" / "run")]) == 2
    assert "inside FOLDER" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "f"), "--preset", "laptop"]) == 2
    assert "--preset 'laptop'" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "f"), "--out", str(tmp_path / "r2"),
                 "scan.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "scan.epochs" in err and len(err.strip().splitlines()) == 1


def _pngs(folder: Path, count: int, broken: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(broken):
        (folder / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    return folder


def test_a_small_folder_gets_settings_that_fit_it(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    folder, out = _pngs(tmp_path / "five", 5), tmp_path / "run"
    with caplog.at_level("INFO", logger="scanclust"):
        summary = cluster(folder, out, clusters=2, preset="quick", overrides=CLUSTER_TINY)
    assert summary["num_images"] == 5 and summary["num_clusters"] == 2
    saved = load_config(out / "config.yaml")
    assert saved.mine.topk == 4 and saved.scan.num_neighbors == 4  # the preset's 20 and 10
    assert "5 images, so mine.topk=4 (instead of 20), scan.num_neighbors=4 (instead of 10)" \
        in caplog.text
    assert parse_k_range(None, 5) == [2, 3] and parse_k_range(None, 3) == [2]


@pytest.mark.parametrize(("count", "broken", "clusters", "message"), [
    (1, 0, None, "FOLDER has 1 readable image; clustering needs at least 2"),
    (1, 2, 2, "FOLDER has 1 readable image; clustering needs at least 2"),  # 2 unreadable
    (2, 0, "auto", "--clusters auto compares K = 2 and more, which needs at least 3 images, "
                   "but the folder has 2; give --clusters 2"),
    (5, 0, 7, "--clusters 7: the folder has only 5 readable images"),
])
def test_a_folder_too_small_is_refused_in_the_commands_terms_and_leaves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture, count: int, broken: int,
        clusters: int | str | None, message: str) -> None:
    folder, out = _pngs(tmp_path / "few", count, broken), tmp_path / "run"
    args = ["cluster", str(folder), "--out", str(out), "--preset", "quick", "-q"]
    if clusters is not None:
        args += ["--clusters", str(clusters)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"scanclust: error: {message}"
    assert not out.exists()  # no run directory, no decode cache
    with pytest.raises(ConfigError, match="use at most 2:4"):
        parse_k_range("2:9", 5)


def test_names_that_are_not_utf8_or_hold_tabs_and_newlines(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A Latin-1 folder, class folder and file, names with a tab, a newline and a backslash:
    every image is read, every output names it in the escaped form (``escape_name``) that
    leads back to the file, and the exported copies carry the real names."""
    from scanclust.data.images import escape_name, unescape_name

    def odd(path: Path, name: bytes) -> Path:
        return Path(os.fsdecode(os.fsencode(path) + name))

    folder, out = odd(tmp_path, b"/ph\xf6tos"), odd(tmp_path, b"/r\xfcn")
    write_digit_folder(folder, per_class=20, nested=True)
    for loose in ("broken.jpg", "._0_00.png", "drawing.svg", "notes.txt"):
        (folder / loose).unlink()  # class folders only (--labels-from-folders)
    for old, new in ((b"/d0/0_02.png", b"/d0/caf\xe9.png"), (b"/d1/1_02.png", b"/d1/tab\there.png"),
                     (b"/d7/7_02.png", b"/d7/new\nline.png"),
                     (b"/d1/1_04.png", b"/d1/back\\slash.png"), (b"/d7", b"/d\xe97")):
        os.rename(odd(folder, old), odd(folder, new))
    odd(folder, b"/d0/bad\t\n\xe9.jpg").write_bytes(b"not an image")
    assert main(["cluster", str(folder), "--out", str(out), "--preset", "quick",
                 "--labels-from-folders", "--export", "copy", *CLUSTER_TINY]) == 0
    assert capsys.readouterr().out.endswith("open " + escape_name(out) + "/report.html\n")

    text = (out / "assignments.csv").read_text(encoding="utf-8")  # strict UTF-8
    assert len(text.splitlines()) == 61  # a header and 60 images: no name breaks a line
    paths = [r["path"] for r in csv.DictReader(text.splitlines())]
    assert {"d0/caf\\xe9.png", "d1/tab\\there.png", "d\\xe97/new\\nline.png",
            "d1/back\\\\slash.png"} <= set(paths)
    assert all((folder / unescape_name(p)).is_file() for p in paths) and len(set(paths)) == 60
    lines = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t") for line in lines] == [
        ["d0/bad\\t\\n\\xe9.jpg", "not an image Pillow can identify (corrupt, empty or another "
                                  "format)"]]
    clusters = json.loads((out / "clusters.json").read_text(encoding="utf-8"))
    assert clusters["folder"] == escape_name(folder) and clusters["folder"].endswith("ph\\xf6tos")
    assert {p for c in clusters["clusters"] for p in c["prototypes"]} <= set(paths)
    assert load_config(out / "config.yaml").data.root == str(folder)  # the real name, kept
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_clusters"] == 3 and "acc" in metrics["stages"]["selflabel"]

    page = (out / "report.html").read_text(encoding="utf-8")
    for caption in ("caf\\xe9.png", "tab\\there.png", "new\\nline.png", "back\\\\slash.png"):
        assert f"<figcaption>{caption}</figcaption>" in page
    assert 'title="d\\xe97/new\\nline.png (confidence ' in page
    assert f"<h1>Clusters of {escape_name(folder)}</h1>" in page
    assert "<td>d0/bad\\t\\n\\xe9.jpg</td>" in page
    # --export copy: the real files under their real names
    copies = {os.fsencode(p.name) for p in (out / "clusters").rglob("*") if p.is_file()}
    assert len(copies) == 60
    assert {b"d0__caf\xe9.png", b"d1__tab\there.png", b"d\xe97__new\nline.png"} <= copies


def test_backbone_auto_finds_cached_weights_or_falls_back(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import scanclust.models.pretrained as pretrained
    from scanclust.folder import AUTO_BACKBONE, choose_backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "_REACHABLE", {})
    started = time.perf_counter()
    chosen, level, line = choose_backbone(tmp_path / "run", resume=False)  # offline, no file
    assert time.perf_counter() - started < 2
    url, local = pretrained.weights_source(AUTO_BACKBONE)
    assert chosen == "scratch" and level == logging.WARNING
    assert f"place {local.name} (from {url}) in {local.parent}" in line
    local.parent.mkdir(parents=True)
    local.write_bytes(b"")  # as a download leaves it (the check looks at the file only)
    assert choose_backbone(tmp_path / "run", resume=False)[:2] == (AUTO_BACKBONE, logging.INFO)
    local.unlink()
    monkeypatch.setattr(pretrained, "hub_reachable", lambda host, timeout=1.5: True)
    chosen, _, line = choose_backbone(tmp_path / "run", resume=False)  # downloadable
    assert chosen == AUTO_BACKBONE and "downloaded once into" in line
    # a resumed run keeps what it was made with
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_config("demo").to_dict()))
    assert choose_backbone(run, resume=True)[0] == "scratch"
