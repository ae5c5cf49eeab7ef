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
from scanclust.config import Config, ScanConfig
from scanclust.data import build_dataset
from scanclust.data.cache import decoded_images
from scanclust.data.datasets import FolderDataset
from scanclust.data.images import escape_name, median_side
from scanclust.data.pipelines import data_path_for
from scanclust.engine import begin_stage, log, predict_logits, prepare_model
from scanclust.errors import UserError
from scanclust.figures import cluster_prototypes
from scanclust.files import atomic_write, read_json, write_csv, write_json
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
    del model, clusterer

    paths = [escape_name(dataset.relative(i)) for i in range(len(dataset))]
    pred, confidence = probs.argmax(1), probs.max(1)
    prototypes = cluster_prototypes(probs, feats.numpy(), PROTOTYPES)
    is_prototype = np.isin(np.arange(len(paths)), [i for m in prototypes.values() for i in m])
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
    log.info("report: %d images in %d clusters, %d skipped; wrote %s", len(paths),
             probs.shape[1], len(skipped), run.root / "report.html")
    return {"seconds": time.perf_counter() - started, "num_images": len(paths),
            "num_skipped": len(skipped), "num_clusters": int(probs.shape[1]),
            "export": export, "report": str(run.root / "report.html")}


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def write_assignments(path: Path, paths: list[str], pred: np.ndarray, confidence: np.ndarray,
                      is_prototype: np.ndarray) -> None:
    """One row per image, in folder order; confidence is the max probability (6 decimals).
    ``paths`` are escaped names (``escape_name``)."""
    write_csv(path, [["path", "cluster", "confidence", "prototype"]] + [
        [name, int(pred[i]), f"{float(confidence[i]):.6f}", "true" if is_prototype[i] else "false"]
        for i, name in enumerate(paths)])


def cluster_summary(pred: np.ndarray, confidence: np.ndarray, prototypes: dict[int, list[int]],
                    paths: list[str], num_clusters: int) -> list[dict[str, Any]]:
    return [{"cluster": c, "size": int((pred == c).sum()),
             "mean_confidence": float(confidence[pred == c].mean()) if c in pred else None,
             "prototypes": [paths[i] for i in prototypes.get(c, [])]} for c in range(num_clusters)]


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """``name<TAB>reason`` lines; both escaped (``escape_name``), so neither holds a tab or a
    line break and ``line.split("\\t")`` gives the two fields back."""
    with atomic_write(path) as handle:
        handle.write("".join(f"{name}\t{reason}\n" for name, reason in skipped).encode("utf-8"))


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
        (os.symlink if mode == "symlink" else shutil.copy2)(dataset.paths[i].resolve(), target)


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


def _img_tag(data: bytes, kind: str, alt: str) -> str:
    return (f'<img src="data:image/{kind};base64,{base64.b64encode(data).decode("ascii")}" '
            f'alt="{html.escape(alt, quote=True)}">')


def _figure(thumb: np.ndarray, name: str, confidence: float, css: str) -> str:
    from PIL import Image

    jpeg = io.BytesIO()
    Image.fromarray(thumb).save(jpeg, format="JPEG", quality=85)
    return (f'<figure class="t {css}" title="{html.escape(name, quote=True)} (confidence '
            f'{confidence:.3f})">{_img_tag(jpeg.getvalue(), "jpeg", name)}'
            f'<span class="p">{confidence:.2f}</span>'
            f'<figcaption>{html.escape(Path(name).name)}</figcaption></figure>')


def render_report(run: RunDir, cfg: Config, dataset, paths: list[str], pred: np.ndarray,
                  confidence: np.ndarray, prototypes: dict[int, list[int]],
                  clusters: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> str:
    """The whole page as one string: every name escaped, every image a data URI, no script
    (the page's security policy forbids scripts outright, so an odd file name cannot run one)."""
    by_confidence = np.argsort(-confidence, kind="stable")
    shown = {c: by_confidence[pred[by_confidence] == c][:MAX_THUMBNAILS] for c in range(len(clusters))}
    low = np.argsort(confidence, kind="stable")[:max(1, round(LOW_SHARE * len(paths)))]
    low_set = set(low.tolist())
    needed = sorted(set(np.concatenate([*shown.values(), low]).tolist())
                    | {i for members in prototypes.values() for i in members})
    needed_paths = [dataset.paths[i] for i in needed]
    side = max(8, min(THUMBNAIL, median_side(needed_paths) or THUMBNAIL))
    decoded, failures = decoded_images(needed_paths, side, None, progress=cfg.progress,
                                       desc="thumbnails")
    # a file that changed since decoding shows the cached pixels instead
    readable = iter(decoded)
    thumbs = {i: np.asarray(dataset.images[i]) if j in failures else next(readable)
              for j, i in enumerate(needed)}

    metrics = read_json(run.metrics_path) if run.metrics_path.is_file() else {}
    stage = final_stage(run)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
             f"img-src data:; style-src 'unsafe-inline'\">"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>scanclust: {html.escape(escape_name(dataset.root.name))}</title>"
             f"<style>{CSS}</style></head><body>",
             _header(run, cfg, dataset, paths, clusters, skipped, metrics, stage), "<main>",
             _charts(run, clusters, len(paths), metrics, stage, prior_setting(cfg.scan)),
             f"<section id='low'><div class='head'><h2>Least confident images</h2>"
             f"<span class='muted'>the {len(low)} images ({LOW_SHARE:.0%}) the model is "
             f"least sure about, flagged in red below; worth a look</span></div>"
             f"<div class='grid'>",
             *(_figure(thumbs[i], f"{paths[i]} (cluster {pred[i]})", confidence[i], "low")
               for i in low),
             "</div></section>"]
    for row in clusters:
        c, size = row["cluster"], row["size"]
        mean = "-" if row["mean_confidence"] is None else f"{row['mean_confidence']:.3f}"
        note = (f"showing the {MAX_THUMBNAILS} most confident of {size}; all are in "
                f"assignments.csv" if size > MAX_THUMBNAILS else "sorted by confidence")
        parts.append(f"<section id='cluster-{c}' class='cluster'><div class='head'>"
                     f"<h2>{_title(row)}</h2><span class='muted'>{size} images, mean confidence "
                     f"{mean}; {note}</span></div>")
        if prototypes.get(c):
            parts += ["<div class='protos grid'>",
                      *(_figure(thumbs[i], paths[i], confidence[i], "proto") for i in prototypes[c]),
                      "</div>"]
        parts += [f"<div class='grid' data-cluster='{c}'>",
                  *(_figure(thumbs[i], paths[i], confidence[i], "low" if int(i) in low_set else "")
                    for i in shown[c]),
                  "</div></section>"]
    parts += [_skipped_section(skipped), "</main></body></html>"]
    return "".join(parts)


def _title(row: dict[str, Any], prefix: str = "Cluster ") -> str:
    """``Cluster 3``, or ``Cluster 3: sevens`` once a review named it (``labels.py``)."""
    name = f": {html.escape(row['name'])}" if row.get("name") else ""
    return f"{prefix}{row['cluster']}{name}"


def _header(run: RunDir, cfg: Config, dataset, paths: list[str], clusters: list[dict],
            skipped: list, metrics: dict, stage: str) -> str:
    labelled = metrics.get("stages", {}).get(stage, {})
    model, note = stage, ""
    if stage == "selflabel" and run.summary("selflabel").get("kept_epoch") == 0:
        model = "scan (self-label kept its weights)"
        note = f"<div class='muted'>{html.escape(kept_scan_note(run.summary('selflabel'), cfg))}</div>"
    stats = [("images", len(paths)), ("clusters", len(clusters)), ("skipped files", len(skipped)),
             ("backbone", cfg.model.backbone), ("model", model)]
    stats += [(key.upper(), f"{labelled[key]:.3f}") for key in ("acc", "nmi", "ari") if key in labelled]
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


def prior_setting(scan: ScanConfig) -> str:
    """The run's cluster prior as the report names it: the keys that change it from uniform,
    and the over-clustering whose merge frees the sizes of the clusters shown."""
    name = scan.prior if scan.prior != "adaptive" else (
        f"adaptive (scan.prior_momentum={scan.prior_momentum:g}, "
        f"scan.prior_floor={scan.prior_floor:g}, scan.prior_warmup={scan.prior_warmup:g})")
    if scan.overcluster > 1:
        name += (f" over scan.overcluster={scan.overcluster} times as many clusters, merged on "
                 f"the kNN graph")
        if scan.merge_resolution != 1:
            name += f" (scan.merge_resolution={scan.merge_resolution:g})"
    return name


def _charts(run: RunDir, clusters: list[dict], total: int, metrics: dict, stage: str, prior: str) -> str:
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
        record = run.root / "choose_k.json"
        choice = read_json(record) if record.is_file() else {}
        parts.append(f"<div class='chart figure'><h2>Choosing K</h2><p class='muted'>"
                     f"{html.escape(str(choice.get('criterion', '')))} of the features' "
                     f"partitions; {html.escape(str(choice.get('rule', 'the highest wins')))} "
                     f"(K = {choice.get('k', '?')})</p>"
                     f"{_img_tag(curve.read_bytes(), 'png', 'criterion curve')}</div>")
    confusion = run.figures / f"{stage}_confusion.png"
    if metrics.get("stages", {}).get(stage, {}).get("acc") is not None and confusion.is_file():
        parts.append(f"<div class='chart figure'><h2>Confusion matrix</h2><p class='muted'>"
                     f"subfolder names against clusters (--labels-from-folders)</p>"
                     f"{_img_tag(confusion.read_bytes(), 'png', 'confusion matrix')}</div>")
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
