"""How often each ``--clusters auto`` criterion finds the true number of classes.

    python benchmarks/choose_k.py
        the battery: scikit-learn's digits with all 10 classes and random subsets of 7 and 5
        classes, seeds 0-4 (the subset and the pretext seed follow the seed), each through the
        demo's pretext and mining (a folder of the subset's train images, ``data.dataset=folder``,
        as ``scanclust cluster`` reads it), then every criterion on the same mined features;
        plus CIFAR-10 features in ``benchmarks/data/cifar10-simclr-*.npz`` (arrays ``features``
        and ``targets``) when there are any;
    python benchmarks/choose_k.py --features F.npy --labels L.npy
        the criteria on the features of any run (e.g. RUN/neighbors/features_train.npy with
        RUN/neighbors/targets_train.npy).

Mined features are cached in ``.cache/choose_k/`` (git-ignored; keyed by the demo config), so
a rerun costs only the criteria; ``--features-only`` fills the cache (e.g. ``--seeds 5:7`` for
runs to fix parameters on, kept apart from the reported seeds). One JSON line per (source,
criterion) and a summary per criterion go to standard output and to
``benchmarks/results/choose_k-DEVICE-DATE.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, machine  # noqa: E402
from scanclust.choose_k import (  # noqa: E402
    CRITERIA,
    SPECTRAL_K,
    knn_graph,
    louvain_labels,
    normalize,
    score_partitions,
)

CACHE = REPO / ".cache" / "choose_k"


def digit_classes(count: int, seed: int) -> list[int]:
    """The seed's random subset of ``count`` of the 10 digits (all of them for 10)."""
    rng = np.random.default_rng([count, seed])
    return sorted(int(c) for c in rng.choice(10, count, replace=False))


def demo_fingerprint() -> str:
    """8 hex digits of the resolved demo config, the settings the cached features depend on."""
    import hashlib

    from scanclust.config import load_config

    text = json.dumps(load_config("demo").to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def digits_features(classes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The demo's pretext and mining on a folder of the digits train images of ``classes``:
    the mined train features and labels (cached under the demo config's fingerprint, so that
    features made with other pretext settings are not reused), and the seconds they took."""
    path = CACHE / f"digits-{'-'.join(map(str, classes))}-seed{seed}-{demo_fingerprint()}.npz"
    if path.is_file():
        saved = np.load(path)
        return saved["features"], saved["targets"], float(saved["seconds"])
    from PIL import Image

    from scanclust.config import load_config
    from scanclust.data.sources import build_dataset
    from scanclust.stages.mine import mine
    from scanclust.stages.pretext import pretext

    start = time.perf_counter()
    digits = build_dataset(load_config("demo").data, "train")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for i, (image, label) in enumerate(zip(digits.images, digits.targets)):
            if label in classes:
                (folder / str(label)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / str(label) / f"{i:04d}.png")
        overrides = [f"seed={seed}", "progress=false", "data.dataset=folder",
                     f"data.root={folder}", f"data.cache_dir={Path(tmp) / 'cache'}"]
        pretext("demo", Path(tmp) / "run", overrides=overrides)
        mine("demo", Path(tmp) / "run", overrides=overrides)
        features = np.load(Path(tmp) / "run" / "neighbors" / "features_train.npy")
        targets = np.load(Path(tmp) / "run" / "neighbors" / "targets_train.npy")
    seconds = time.perf_counter() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=features, targets=targets, seconds=seconds)
    return features, targets, seconds


def evaluate(features: np.ndarray, labels: np.ndarray, source: str, seed: int, ks: list[int],
             criteria: list[str], log) -> list[dict]:
    true_k = len(np.unique(labels[labels >= 0]))
    rows = []
    for criterion in criteria:
        start = time.perf_counter()
        choice = score_partitions(features, ks, criterion, seed=seed)
        row = {"source": source, "seed": seed, "criterion": criterion, "images": len(features),
               "true_k": true_k, "chosen_k": choice.k,
               "seconds": round(time.perf_counter() - start, 2),
               "scores": [round(s, 4) for s in choice.scores]}
        log(row)
        rows.append(row)
    return rows


def class_splits(communities: np.ndarray, labels: np.ndarray, names: list[str],
                 share: float = 0.15) -> dict:
    """What the features' own groups are, read with the labels (an explanation of a count,
    never an input to one): Louvain's communities of the criteria's 40-neighbour graph, their
    purity (the share of images in their community's majority class), and each class that
    is the majority of two or more communities holding at least ``share`` of it, with those
    communities' sizes in the class and purities. A class listed here is split by the
    features themselves: any label-free count of their groups counts it twice."""
    kept = labels >= 0
    communities, labels = communities[kept], labels[kept]
    classes = np.unique(labels)
    table = np.array([[np.sum((communities == c) & (labels == t)) for t in classes]
                      for c in range(int(communities.max()) + 1)])
    table = table[table.sum(1) > 0]
    majority = table.argmax(1)
    split = {}
    for j, t in enumerate(classes):
        parts = [c for c in range(len(table))
                 if majority[c] == j and table[c, j] >= share * table[:, j].sum()]
        if len(parts) > 1:
            split[names[int(t)]] = [{"images": int(table[c, j]),
                                     "purity": round(float(table[c, j] / table[c].sum()), 3)}
                                    for c in parts]
    return {"communities": len(table), "purity": round(float(table.max(1).sum()
                                                               / len(labels)), 3),
            "split_classes": split,
            "unmatched_classes": [names[int(t)] for j, t in enumerate(classes)
                                  if j not in set(majority.tolist())]}


def explain(features: np.ndarray, labels: np.ndarray, names: list[str], source: str,
            seed: int, log) -> None:
    """``class_splits`` of the features' Louvain communities, as one JSON line."""
    feats = normalize(features)
    log({"source": source, "seed": seed, "analysis": "louvain communities",
         **class_splits(louvain_labels(knn_graph(feats, SPECTRAL_K), seed), labels, names)})


def summarise(rows: list[dict], criteria: list[str]) -> dict[str, dict]:
    summary = {}
    for criterion in criteria:
        picked = [r for r in rows if r["criterion"] == criterion]
        errors = np.array([r["chosen_k"] - r["true_k"] for r in picked])
        seconds = np.array([r["seconds"] for r in picked])
        summary[criterion] = {
            "exact": f"{int((errors == 0).sum())}/{len(picked)}",
            "largest_error": int(errors[np.argmax(np.abs(errors))]),
            "mean_abs_error": round(float(np.abs(errors).mean()), 2),
            "seconds": f"{seconds.mean():.2f} +- {seconds.std():.2f}",
            "chosen": [r["chosen_k"] for r in picked], "true": [r["true_k"] for r in picked]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, help="features .npy [N, D] instead of digits")
    parser.add_argument("--labels", type=Path, help="labels .npy [N] (-1: unlabelled)")
    parser.add_argument("--classes", default="10,7,5", help="digits subset sizes")
    parser.add_argument("--seeds", default="0:5", help="digits seeds LO:HI (HI excluded)")
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--k-range", default="2:20")
    parser.add_argument("--features-only", action="store_true",
                        help="make (cache) the digits features, score nothing")
    parser.add_argument("--out", type=Path, help="JSON lines file (default under "
                        "benchmarks/results/)")
    args = parser.parse_args()
    lo, hi = (int(v) for v in args.k_range.split(":"))
    ks = list(range(lo, hi + 1))
    criteria = args.criteria.split(",")
    info = machine()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / f"choose_k-{slug}-{info['date']}.jsonl"
    lines: list[dict] = []

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        lines.append(row)

    started = time.perf_counter()
    rows: list[dict] = []
    if args.features is not None:
        if args.labels is None:
            parser.error("--features needs --labels")
        feats, labels = np.load(args.features), np.load(args.labels)
        rows += evaluate(feats, labels, str(args.features), 0, ks, criteria, log)
        explain(feats, labels, [str(c) for c in range(int(labels.max()) + 1)],
                str(args.features), 0, log)
    else:
        first, last = (int(v) for v in args.seeds.split(":"))
        for count in (int(c) for c in args.classes.split(",")):
            for seed in range(first, last):
                classes = digit_classes(count, seed)
                feats, labels, seconds = digits_features(classes, seed)
                print(f"digits {classes} seed {seed}: {len(feats)} images, features made in "
                      f"{seconds:.0f} s", file=sys.stderr, flush=True)
                if not args.features_only:
                    rows += evaluate(feats, labels, f"digits {classes}", seed, ks, criteria, log)
                    explain(feats, labels, [str(c) for c in classes], f"digits {classes}",
                            seed, log)
        for path in sorted((REPO / "benchmarks" / "data").glob("cifar10-simclr-*.npz")):
            if not args.features_only:
                saved = np.load(path)
                rows += evaluate(saved["features"], saved["targets"], path.name, 0, ks,
                                 criteria, log)
                explain(saved["features"], saved["targets"],
                        [str(c) for c in range(int(saved["targets"].max()) + 1)], path.name, 0,
                        log)
    if rows:
        digits = [r for r in rows if r["source"].startswith("digits")]
        for name, part in (("digits", digits), ("other", [r for r in rows if r not in digits])):
            if part:
                log({"benchmark": "choose_k", "part": name, **info, "k_range": args.k_range,
                     "seconds": round(time.perf_counter() - started, 1),
                     "summary": summarise(part, criteria)})
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
