"""What a folder run leaves for a person and a program: CSV, JSON, exported folders, one page.

    <run>/assignments.csv   path (relative to the folder), cluster, confidence, prototype
    <run>/clusters.json     per cluster: size, mean confidence, prototype paths
    <run>/skipped.txt       every file that could not be used: path <TAB> reason
    <run>/clusters/<c>/     with --export symlink|copy: one folder per cluster
    <run>/report.html       one self-contained page (thumbnails embedded, no script, works offline)

The final model (self-label if it finished, else SCAN) assigns every readable image. A
cluster's prototypes are the members closest to the mean embedding of its 10 most confident
members (the paper's "prototypical behavior", Fig. 9; the first is the prototype of the figures).

Every file name written (CSV, JSON, skipped.txt, the page) is ``images.escape_name`` of it:
an ordinary name as it is, one holding a tab, newline, backslash or bytes that are not UTF-8
in a lossless escaped form (``images.unescape_name`` reverses it). Exports use the real files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scanclust.clusterer import load
from scanclust.config import Config
from scanclust.data import build_dataset
from scanclust.data.cache import decoded_images
from scanclust.data.datasets import FolderDataset
from scanclust.data.images import escape_name, median_side
from scanclust.data.pipelines import data_path_for
from scanclust.engine import begin_stage, log, predict_logits, prepare_model
from scanclust.errors import UserError
from scanclust.figures import cluster_prototypes
from scanclust.files import atomic_write, read_json, write_json
from scanclust.labels import report_names
from scanclust.models.saved import final_stage
from scanclust.rundir import RunDir, exclusive

STAGE = "report"
PROTOTYPES = 5  # per cluster, listed in clusters.json and shown first in the report
THUMBNAIL = 96  # side of a thumbnail in pixels (smaller images are not enlarged)
MAX_THUMBNAILS = 300  # per cluster in the page; every image is in assignments.csv regardless
LOW_SHARE = 0.05  # the least confident 5 % of all images are flagged
EXPORT_MODES = ("symlink", "copy")


class ReportError(UserError, ValueError):
    """A report that cannot be made from this run (not a folder run, no model)."""


@exclusive
def report(config: Config | str | Path | dict | None = None, out: str | Path = "runs/default",
           *, overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
           force: bool = False, export: str | None = None) -> dict[str, Any]:
    """Assign every image of the run's folder and write the files above; returns a summary.

    It derives everything from the finished stages, so like ``evaluate`` it is always redone.
    """
    if export is not None and export not in EXPORT_MODES:
        raise ReportError(f"--export {export!r} is not one of {', '.join(EXPORT_MODES)}")
    cfg, run, _ = begin_stage(STAGE, config, out, overrides, resume, force, needs="scan")
    started = time.perf_counter()
    if cfg.data.dataset != "folder":
        raise ReportError(f"the report is made for image folders; {run.root} clusters "
                          f"data.dataset={cfg.data.dataset}")
    dataset = build_dataset(cfg.data, "train")
    assert isinstance(dataset, FolderDataset)
    clusterer = load(run.root, device=cfg.device)
    model, device = clusterer.model, clusterer.device
    prepare_model(model, cfg, device)
    logits, feats = predict_logits(model, data_path_for(cfg, device, dataset), dataset,
                                   cfg.evaluate.batch_size, device, cfg.amp, cfg.progress,
                                   "assigning")
    probs = torch.softmax(logits[0].float(), dim=1).numpy()
    feats_np = feats.numpy()
    del model, clusterer

    paths = [escape_name(dataset.relative(i)) for i in range(len(dataset))]
    pred, confidence = probs.argmax(1), probs.max(1)
    prototypes = cluster_prototypes(probs, feats_np, PROTOTYPES)
    is_prototype = np.zeros(len(paths), dtype=bool)
    for members in prototypes.values():
        is_prototype[members] = True
    write_assignments(run.root / "assignments.csv", paths, pred, confidence, is_prototype)
    clusters = cluster_summary(pred, confidence, prototypes, paths, probs.shape[1])
    write_json(run.root / "clusters.json", {
        "num_images": len(paths), "num_clusters": int(probs.shape[1]), "stage": final_stage(run),
        "folder": escape_name(dataset.root), "clusters": clusters})
    skipped = [(escape_name(_relative(p, dataset.root)), escape_name(reason))
               for p, reason in dataset.skipped]
    write_skipped(run.root / "skipped.txt", skipped)
    names = report_names(run.root)  # after a review: its names in the CSV, the JSON, the page
    for row in clusters:
        row["name"] = names.get(row["cluster"])
    if export is not None:
        export_clusters(run.root / "clusters", dataset, pred, export)

    page = render_report(run, cfg, dataset, paths, pred, confidence, prototypes, clusters,
                         skipped)
    with atomic_write(run.root / "report.html") as handle:
        handle.write(page.encode("utf-8"))
    summary = {"seconds": time.perf_counter() - started, "num_images": len(paths),
               "num_skipped": len(skipped), "num_clusters": int(probs.shape[1]),
               "export": export, "report": str(run.root / "report.html")}
    log.info("report: %d images in %d clusters, %d skipped; wrote %s", len(paths),
             probs.shape[1], len(skipped), run.root / "report.html")
    return summary


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def write_assignments(path: Path, paths: list[str], pred: np.ndarray, confidence: np.ndarray,
                      is_prototype: np.ndarray) -> None:
    """One row per image, in folder order; confidence is the max probability (6 decimals).
    ``paths`` are escaped names (``escape_name``)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "cluster", "confidence", "prototype"])
    for i, name in enumerate(paths):
        writer.writerow([name, int(pred[i]), f"{float(confidence[i]):.6f}",
                         "true" if is_prototype[i] else "false"])
    with atomic_write(path) as handle:
        handle.write(text.getvalue().encode("utf-8"))


def cluster_summary(pred: np.ndarray, confidence: np.ndarray, prototypes: dict[int, list[int]],
                    paths: list[str], num_clusters: int) -> list[dict[str, Any]]:
    rows = []
    for c in range(num_clusters):
        members = pred == c
        rows.append({"cluster": c, "size": int(members.sum()),
                     "mean_confidence": float(confidence[members].mean()) if members.any()
                     else None,
                     "prototypes": [paths[i] for i in prototypes.get(c, [])]})
    return rows


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """``name<TAB>reason`` lines; both escaped (``escape_name``), so neither holds a tab or a
    line break and ``line.split("\\t")`` gives the two fields back."""
    lines = [f"{name}\t{reason}\n" for name, reason in skipped]
    with atomic_write(path) as handle:
        handle.write("".join(lines).encode("utf-8"))


def export_clusters(folder: Path, dataset, pred: np.ndarray, mode: str) -> None:
    """``folder/<cluster>/<relative path with / as __>``: links to or copies of the images.

    The folder is rebuilt from scratch, so a re-export never mixes two runs' assignments.
    """
    if folder.exists():
        shutil.rmtree(folder)
    width = len(str(int(pred.max()) if len(pred) else 0))
    for i, cluster in enumerate(pred):
        target_dir = folder / f"{int(cluster):0{width}d}"
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / dataset.relative(i).replace("/", "__")
        source = dataset.paths[i].resolve()
        if mode == "symlink":
            os.symlink(source, target)
        else:
            shutil.copy2(source, target)


# ---------------------------------------------------------------------------------------------
# The page

CSS = """
:root{--fg:#1d2330;--muted:#667085;--line:#e4e7ec;--bg:#f7f8fa;--accent:#2f5fb3;--low:#d92d20}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,
sans-serif;color:var(--fg);background:var(--bg)}header{background:#fff;border-bottom:1px solid
var(--line);padding:18px 28px}h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:0}
.muted{color:var(--muted)}main{padding:12px 28px 40px;max-width:1600px}section{background:#fff;
border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin:14px 0}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}.stat{background:var(--bg);
border:1px solid var(--line);border-radius:8px;padding:6px 12px}.stat b{font-size:16px}
nav{display:flex;flex-wrap:wrap;gap:6px;margin-top:12px}nav a{text-decoration:none;
color:var(--accent);background:#eef3fc;border-radius:14px;padding:3px 10px;font-size:13px}
.charts{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.chart{flex:1 1 340px}
.bars{display:grid;grid-template-columns:max-content 1fr max-content;gap:4px 8px;
align-items:center;font-size:12px}.bars a{color:var(--accent);text-decoration:none}
.bar{height:14px;background:var(--accent);border-radius:3px;min-width:2px}
.figure img{max-width:100%;height:auto}table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid var(--line);padding:3px 10px;text-align:left}
.head{display:flex;justify-content:space-between;align-items:baseline;gap:12px;flex-wrap:wrap}
.grid{display:flex;flex-wrap:wrap;gap:8px;margin-top:10px}
figure.t{margin:0;width:98px;position:relative}figure.t img{width:96px;height:96px;
object-fit:cover;border-radius:6px;border:1px solid var(--line);display:block;background:#ddd}
figure.t figcaption{font-size:10px;color:var(--muted);white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}figure.t .p{position:absolute;top:3px;right:5px;background:rgba(0,0,0,.6);
color:#fff;font-size:10px;border-radius:4px;padding:0 4px}figure.low img{border:2px solid
var(--low)}figure.low .p{background:var(--low)}figure.proto img{border:2px solid var(--accent)}
.protos figure.t{width:130px}.protos figure.t img{width:128px;height:128px}
.legend span{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px}
"""


def _img_tag(array: np.ndarray, alt: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(alt, quote=True)}">'


def _png_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">'


def _figure(thumb: np.ndarray, name: str, confidence: float, css: str) -> str:
    safe = html.escape(name, quote=True)
    return (f'<figure class="t {css}" title="{safe} (confidence {confidence:.3f})">'
            f'{_img_tag(thumb, name)}<span class="p">{confidence:.2f}</span>'
            f'<figcaption>{html.escape(Path(name).name)}</figcaption></figure>')


def render_report(run: RunDir, cfg: Config, dataset, paths: list[str], pred: np.ndarray,
                  confidence: np.ndarray, prototypes: dict[int, list[int]],
                  clusters: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> str:
    """The whole page as one string: every name escaped, every image a data URI, no script
    (the page's security policy forbids scripts outright, so an odd file name cannot run one)."""
    num_clusters = len(clusters)
    order = {c: np.flatnonzero(pred == c)[np.argsort(-confidence[pred == c], kind="stable")]
             for c in range(num_clusters)}
    shown = {c: idx[:MAX_THUMBNAILS] for c, idx in order.items()}
    low_count = max(1, int(round(LOW_SHARE * len(paths))))
    low = np.argsort(confidence, kind="stable")[:low_count]
    low_set = set(low.tolist())
    needed = sorted(set(np.concatenate([*shown.values(), low]).tolist())
                    | {i for members in prototypes.values() for i in members})
    side = _native_side(dataset, needed)
    thumbs_array, failures = decoded_images([dataset.paths[i] for i in needed], side, None,
                                            progress=cfg.progress, desc="thumbnails")
    thumbs: dict[int, np.ndarray] = {}
    k = 0
    for j, i in enumerate(needed):
        if j in failures:  # the file changed since decoding: show the cached pixels instead
            thumbs[i] = np.asarray(dataset.images[i])
        else:
            thumbs[i] = thumbs_array[k]
            k += 1

    metrics = read_json(run.metrics_path) if run.metrics_path.is_file() else {}
    stage = final_stage(run)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
             f"img-src data:; style-src 'unsafe-inline'\">"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>scanclust: {html.escape(escape_name(dataset.root.name))}</title>"
             f"<style>{CSS}</style></head><body>"]
    parts.append(_header(run, cfg, dataset, paths, clusters, skipped, metrics, stage))
    parts.append("<main>")
    parts.append(_charts(run, clusters, len(paths), metrics, stage, cfg.scan.prior))
    parts.append(f"<section id='low'><div class='head'><h2>Least confident images</h2>"
                 f"<span class='muted'>the {len(low)} images ({LOW_SHARE:.0%}) the model is "
                 f"least sure about, flagged in red below; worth a look</span></div>"
                 f"<div class='grid'>")
    for i in low:
        parts.append(_figure(thumbs[i], f"{paths[i]} (cluster {pred[i]})", confidence[i], "low"))
    parts.append("</div></section>")
    for row in clusters:
        c = row["cluster"]
        size = row["size"]
        mean = "-" if row["mean_confidence"] is None else f"{row['mean_confidence']:.3f}"
        note = (f"showing the {MAX_THUMBNAILS} most confident of {size}; all are in "
                f"assignments.csv" if size > MAX_THUMBNAILS else "sorted by confidence")
        parts.append(f"<section id='cluster-{c}' class='cluster'><div class='head'>"
                     f"<h2>{_title(row)}</h2><span class='muted'>{size} images, mean confidence "
                     f"{mean}; {note}</span></div>")
        if prototypes.get(c):
            parts.append("<div class='protos grid'>")
            for i in prototypes[c]:
                parts.append(_figure(thumbs[i], paths[i], confidence[i], "proto"))
            parts.append("</div>")
        parts.append(f"<div class='grid' data-cluster='{c}'>")
        for i in shown[c]:
            css = "low" if int(i) in low_set else ""
            parts.append(_figure(thumbs[i], paths[i], confidence[i], css))
        parts.append("</div></section>")
    parts.append(_skipped_section(skipped))
    parts.append("</main></body></html>")
    return "".join(parts)


def _title(row: dict[str, Any], prefix: str = "Cluster ") -> str:
    """``Cluster 3``, or ``Cluster 3: sevens`` once a review named it (``labels.py``)."""
    name = f": {html.escape(row['name'])}" if row.get("name") else ""
    return f"{prefix}{row['cluster']}{name}"


def _native_side(dataset, needed: list[int]) -> int:
    """The median shorter side of the images shown, up to ``THUMBNAIL``."""
    side = median_side([dataset.paths[i] for i in needed]) or THUMBNAIL
    return max(8, min(THUMBNAIL, side))


def _header(run: RunDir, cfg: Config, dataset, paths: list[str], clusters: list[dict],
            skipped: list, metrics: dict, stage: str) -> str:
    labelled = metrics.get("stages", {}).get(stage, {})
    model = stage
    note = ""
    if stage == "selflabel" and run.summary("selflabel").get("kept_epoch") == 0:
        model = "scan (self-label kept its weights)"
        note = f"<div class='muted'>{html.escape(kept_scan_note(run.summary('selflabel'), cfg))}</div>"
    stats = [("images", len(paths)), ("clusters", len(clusters)), ("skipped files", len(skipped)),
             ("backbone", cfg.model.backbone), ("model", model)]
    for key in ("acc", "nmi", "ari"):
        if key in labelled:
            stats.append((key.upper(), f"{labelled[key]:.3f}"))
    cells = "".join(f"<div class='stat'><span class='muted'>{html.escape(name)}</span> "
                    f"<b>{html.escape(str(value))}</b></div>" for name, value in stats)
    nav = "".join(f"<a href='#cluster-{row['cluster']}'>{_title(row, '')} "
                  f"<span class='muted'>({row['size']})</span></a>" for row in clusters)
    extra = "<a href='#skipped'>skipped files</a>" if skipped else ""
    return (f"<header><h1>Clusters of {html.escape(escape_name(dataset.root))}</h1>"
            f"<div class='muted'>scanclust run {html.escape(escape_name(run.root))}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}; every image with its cluster and confidence "
            f"is in assignments.csv</div><div class='stats'>{cells}</div>{note}"
            f"<nav><a href='#low'>least confident</a>{nav}{extra}</nav></header>")


def kept_scan_note(summary: dict[str, Any], cfg: Config) -> str:
    """Why self-label kept SCAN's weights, in one line, with what to try."""
    sl = cfg.selflabel
    if summary.get("selection", "threshold") == "threshold" and \
            summary.get("most_confident", summary.get("confident", 0)) == 0:
        return (f"Self-label kept SCAN's weights: no image reached the confidence threshold "
                f"{sl.threshold} in any epoch, so it had nothing to train on; "
                f"selflabel.selection=per_cluster trains on each cluster's most confident images.")
    return (f"Self-label kept SCAN's weights: no epoch raised the number of confident images "
            f"(of the mean confidence, with per_cluster) by more than "
            f"selflabel.plateau_tolerance={sl.plateau_tolerance} of the data.")


def _charts(run: RunDir, clusters: list[dict], total: int, metrics: dict, stage: str,
            prior: str = "uniform") -> str:
    biggest = max((row["size"] for row in clusters), default=1) or 1
    even = total / max(len(clusters), 1)
    bars = "".join(
        f"<a href='#cluster-{row['cluster']}'>{_title(row, 'cluster ')}</a>"
        f"<div class='bar' style='width:{100 * row['size'] / biggest:.1f}%'></div>"
        f"<span>{row['size']} ({100 * row['size'] / max(total, 1):.1f} %; uniform "
        f"{even:.0f})</span>"
        for row in clusters)
    parts = [f"<section><div class='charts'><div class='chart'><h2>Cluster sizes</h2>"
             f"<p class='muted'>beside each, the size the uniform prior pulls every cluster "
             f"towards ({total} / {len(clusters)}); this run: scan.prior={html.escape(prior)}</p>"
             f"<div class='bars' style='margin-top:10px'>{bars}</div></div>"]
    curve = run.root / "choose_k.png"
    if curve.is_file():
        choice = read_json(run.root / "choose_k.json") if (run.root / "choose_k.json").is_file() \
            else {}
        parts.append(f"<div class='chart figure'><h2>Choosing K</h2><p class='muted'>"
                     f"{html.escape(str(choice.get('criterion', '')))} of the features' "
                     f"partitions; {html.escape(str(choice.get('rule', 'the highest wins')))} "
                     f"(K = {choice.get('k', '?')})</p>"
                     f"{_png_tag(curve, 'criterion curve')}</div>")
    confusion = run.figures / f"{stage}_confusion.png"
    if metrics.get("stages", {}).get(stage, {}).get("acc") is not None and confusion.is_file():
        parts.append(f"<div class='chart figure'><h2>Confusion matrix</h2><p class='muted'>"
                     f"subfolder names against clusters (--labels-from-folders)</p>"
                     f"{_png_tag(confusion, 'confusion matrix')}</div>")
    parts.append("</div></section>")
    return "".join(parts)


def _skipped_section(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(reason)}</td></tr>"
                   for name, reason in skipped)
    return (f"<section id='skipped'><div class='head'><h2>Skipped files</h2><span class='muted'>"
            f"{len(skipped)} files could not be used (also in skipped.txt)</span></div>"
            f"<table><tr><th>file</th><th>reason</th></tr>{rows}</table></section>")
