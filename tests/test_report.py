"""The report: prototypes by hand, and the page opened in a real headless Chromium."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scanclust.figures import cluster_prototypes
from scanclust.results import MAX_THUMBNAILS, prior_setting
from tests.conftest import XSS_NAME, chromium_driver

def test_prototypes_are_nearest_to_the_confident_core() -> None:
    # cluster 0: members 0-3; the 2 most confident (0, 1) average to [0.5, 0]: 0 and 1 are
    # nearest (distance 0.5), then 2 (1.5); cluster 1 has one member
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.1, 0.9]])
    embeddings = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [5.0, 0.0], [9.0, 9.0]])
    assert cluster_prototypes(probs, embeddings, count=3, top=2) == {0: [0, 1, 2], 1: [4]}


def test_report_in_headless_chromium(folder_run: tuple[Path, Path, list[str]],
                                     tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    _, out, readable = folder_run
    driver = chromium_driver(tmp_path / "profile", 2000)
    try:
        driver.get((out / "report.html").resolve().as_uri())
        assert driver.title.startswith("scanclust")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert  # noqa: B018 - an onerror=alert(1) would have opened one
        assert driver.find_elements(By.CSS_SELECTOR, 'img[src="x"]') == []
        captions = [e.get_attribute("textContent") for e in
                    driver.find_elements(By.CSS_SELECTOR, "figcaption")]
        assert XSS_NAME in captions  # the name is shown as text
        rows = list(csv.DictReader(open(out / "assignments.csv", encoding="utf-8")))
        sizes = Counter(r["cluster"] for r in rows)
        grids = driver.find_elements(By.CSS_SELECTOR, ".grid[data-cluster]")
        shown = {g.get_attribute("data-cluster"): len(g.find_elements(By.CSS_SELECTOR,
                                                                       "figure.t"))
                 for g in grids}
        assert shown == {c: min(n, MAX_THUMBNAILS) for c, n in sizes.items()} | \
            {c: 0 for c in shown if c not in sizes}
        assert sum(shown.values()) == len(readable)
        images = driver.find_elements(By.CSS_SELECTOR, ".grid[data-cluster] img")
        assert all(driver.execute_script("return arguments[0].naturalWidth", im) > 0
                   for im in images[:20])  # thumbnails decode
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()


def test_header_says_when_self_label_kept_the_scan_weights(
        folder_run: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    """Self-label keeps its starting weights (epoch 0) when no sample was confident enough;
    the page then names the model by what it is, SCAN's."""
    import json

    from scanclust.results import report

    run = tmp_path / "run"
    shutil.copytree(folder_run[1], run, symlinks=True)
    summary_path = run / "selflabel" / "summary.json"
    summary = json.loads(summary_path.read_text())
    for kept, shown in ((1, "<b>selflabel</b>"), (0, "<b>scan (self-label kept its weights)</b>")):
        summary_path.write_text(json.dumps({**summary, "kept_epoch": kept}))
        report(None, run, overrides=["progress=false"])
        page = (run / "report.html").read_text(encoding="utf-8")
        assert f"<span class='muted'>model</span> {shown}" in page
    # the reason, by what the summary says happened
    summary_path.write_text(json.dumps({**summary, "kept_epoch": 0, "most_confident": 0,
                                        "selection": "threshold"}))
    report(None, run, overrides=["progress=false"])
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "no image reached the confidence threshold 0.3 in any epoch" in page
    assert "selflabel.selection=per_cluster" in page
    summary_path.write_text(json.dumps({**summary, "kept_epoch": 0, "most_confident": 40,
                                        "selection": "threshold"}))
    report(None, run, overrides=["progress=false"])
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "no epoch raised the number of confident images" in page


def test_cluster_sizes_stand_beside_the_uniform_prior_size(
        folder_run: tuple[Path, Path, list[str]]) -> None:
    import json

    page = (folder_run[1] / "report.html").read_text(encoding="utf-8")
    clusters = json.loads((folder_run[1] / "clusters.json").read_text())
    rows = clusters["clusters"] if isinstance(clusters, dict) else clusters
    total = sum(row["size"] for row in rows)
    even = total / len(rows)
    assert f"({total} / {len(rows)}); this run: scan.prior=" in page
    assert page.count(f"; uniform {even:.0f})</span>") == len(rows)


def test_the_report_names_every_key_of_an_adaptive_prior() -> None:
    from scanclust.config import ScanConfig

    assert prior_setting(ScanConfig()) == "uniform"
    assert prior_setting(ScanConfig(prior="adaptive", prior_warmup=0.5)) == (
        "adaptive (scan.prior_momentum=0.99, scan.prior_floor=0.2, scan.prior_warmup=0.5)")
    assert prior_setting(ScanConfig(overcluster=3)) == (
        "uniform over scan.overcluster=3 times as many clusters, merged on the kNN graph")
    assert prior_setting(ScanConfig(overcluster=3, merge_resolution=0.5)) == (
        "uniform over scan.overcluster=3 times as many clusters, merged on the kNN graph "
        "(scan.merge_resolution=0.5)")
