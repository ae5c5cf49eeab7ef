"""Shared fixtures: a few hundred real CIFAR-10 JPEGs, and a tiny config for whole runs."""

from __future__ import annotations

import os
import shutil
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

PER_CLASS = {"train": 30, "test": 10}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

# The pipeline at toy scale: 8x8 digits, a tiny ResNet, two epochs per stage. Seconds, not
# minutes, yet every stage, file and code path of a real run is exercised.
TINY = [
    "device=cpu", "amp=false", "progress=false",
    "data.dataset=digits", "data.image_size=8", "data.max_images=200", "data.num_workers=0",
    "model.backbone=resnet_tiny", "model.width=8", "model.proj_hidden=32", "model.proj_dim=16",
    "pretext.epochs=2", "pretext.batch_size=64",
    "mine.topk=5",
    "scan.epochs=2", "scan.batch_size=64",
    "selflabel.epochs=2", "selflabel.batch_size=100", "selflabel.threshold=0.3",
    "evaluate.kmeans_restarts=1", "evaluate.num_low_confidence=8",
]


def pytest_configure(config: pytest.Config) -> None:
    # A test run started in the background by a shell without job control (`cmd &` in a
    # script, some CI runners) begins with SIGINT ignored, and every process a test starts would
    # inherit that: the Ctrl-C tests would see their runs finish instead of stop.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _data_dir() -> Path:
    env = os.environ.get("SCANCLUST_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def cifar_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 train and 10 test images per class, read lazily from the shared archive."""
    archive = _data_dir() / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found; set SCANCLUST_DATA to the folder holding it")
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    counts: Counter = Counter()
    wanted = sum(PER_CLASS.values()) * len(CIFAR10_CLASSES)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or counts[parts[:2]] >= PER_CLASS[parts[0]]:
                continue
            tar.extract(member, out, filter="data")
            counts[parts[:2]] += 1
            if sum(counts.values()) == wanted:
                break
    return out




XSS_NAME = "<img src=x onerror=alert(1)>.png"


def write_digit_folder(root: Path, per_class: int = 20, classes: tuple[int, ...] = (0, 1, 7),
                       nested: bool = True) -> list[str]:
    """scikit-learn digits as 16x16 PNGs under ``root`` (flat or in subfolders), with the odd
    files a real folder has: a broken JPEG, a macOS ``._`` file, an SVG, a text file, and
    names with spaces, accents and HTML. Returns the readable images' relative paths."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    readable = []
    for label in classes:
        picks = np.flatnonzero(digits.target == label)[:per_class]
        for j, i in enumerate(picks):
            image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8))
            name = f"{label}_{j:02d}.png"
            if j == 0:
                name = {0: XSS_NAME, 1: "naïve été.png", 7: "with space.PNG"}.get(label, name)
            folder = root / f"d{label}" / ("deep" if j % 2 else "") if nested else root
            folder.mkdir(parents=True, exist_ok=True)
            image.resize((16, 16)).save(folder / name)
            readable.append((folder / name).relative_to(root).as_posix())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "._0_00.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "notes.txt").write_text("not an image")
    return sorted(readable)


# A folder run at toy scale for the cluster/report/predict tests: seconds on a CPU.
CLUSTER_TINY = ["pretext.epochs=3", "scan.epochs=3", "selflabel.epochs=2", "progress=false",
                "selflabel.threshold=0.3", "evaluate.kmeans_restarts=1", "model.width=8"]


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(folder, run directory, readable relative paths) of one ``scanclust cluster`` run with
    --clusters auto and --export symlink on a nested digits folder with odd files."""
    from scanclust.folder import cluster

    base = tmp_path_factory.mktemp("folder-run")
    folder, out = base / "photos", base / "run"
    readable = write_digit_folder(folder)
    cluster(folder, out, clusters="auto", k_range="2:4", preset="quick", export="symlink",
            overrides=CLUSTER_TINY)
    return folder, out, readable


@pytest.fixture(scope="session")
def review_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-cluster folder run (``write_digit_folder``) whose assignments.csv holds
    the digit classes as clusters: d0 -> 0, d1 -> 1, d7 -> 2, 20 images each. The toy model's
    own clusters mean nothing (it often puts everything in one), and the review and export
    tests need clusters a reader can count. Copy it before changing it."""
    import csv
    import json

    from scanclust.folder import cluster

    base = tmp_path_factory.mktemp("review-run")
    write_digit_folder(base / "photos")
    cluster(base / "photos", base / "run", clusters=3, preset="quick", overrides=CLUSTER_TINY)
    table = list(csv.reader(open(base / "run" / "assignments.csv", encoding="utf-8")))
    for row in table[1:]:
        row[1] = str("017".index(row[0][1]))  # d0/..., d1/..., d7/...
    with open(base / "run" / "assignments.csv", "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(table)
    summary = json.loads((base / "run" / "clusters.json").read_text())
    for entry in summary["clusters"]:
        entry["size"] = 20
    (base / "run" / "clusters.json").write_text(json.dumps(summary))
    return base / "run"


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"]


def chromium_driver(profile: Path, height: int):
    """Debian's headless chromium through selenium, 1280 px wide; a skip where it is missing,
    a failure in CI (``.ci/run`` installs it)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("chromium or chromedriver not installed (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--window-size=1280,{height}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)
