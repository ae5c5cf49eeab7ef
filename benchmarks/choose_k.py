"""How often ``--clusters auto`` finds the true number of classes.

Two sources of features:

    python benchmarks/choose_k.py --features F.npy --labels L.npy [--seeds 5]
        features of any run (e.g. RUN/neighbors/features_train.npy with
        RUN/neighbors/targets_train.npy): the criteria on them, over several k-means seeds and
        random 90 % subsamples of the images;
    python benchmarks/choose_k.py --digits 5
        the offline demo's pretext + mining for seeds 0..4 (digits, 10 classes), then the
        criteria on each seed's features.

Prints one JSON line per (source, seed, criterion) and a summary: how often the chosen K
equals the true K, and its spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from scanclust.choose_k import CRITERIA, score_partitions  # noqa: E402


def evaluate(features: np.ndarray, labels: np.ndarray, source: str, seeds: int,
             ks: list[int], subsample: float) -> list[dict]:
    true_k = len(np.unique(labels[labels >= 0]))
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(features), int(subsample * len(features)), replace=False))
        for criterion in CRITERIA:
            start = time.perf_counter()
            choice = score_partitions(features[keep], ks, criterion, seed=seed)
            row = {"source": source, "seed": seed, "criterion": criterion, "true_k": true_k,
                   "chosen_k": choice.k, "seconds": round(time.perf_counter() - start, 2),
                   "scores": [round(s, 4) for s in choice.scores]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def digits_features(seed: int, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """The demo's pretext and mining for one seed; its mining features and train labels."""
    from scanclust.stages.mine import mine
    from scanclust.stages.pretext import pretext

    out = work / f"digits-{seed}"
    overrides = [f"seed={seed}", "progress=false"]
    pretext("demo", out, overrides=overrides)
    mine("demo", out, overrides=overrides)
    return (np.load(out / "neighbors" / "features_train.npy"),
            np.load(out / "neighbors" / "targets_train.npy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, help="features .npy [N, D]")
    parser.add_argument("--labels", type=Path, help="labels .npy [N] (-1: unlabelled)")
    parser.add_argument("--digits", type=int, default=0, metavar="SEEDS",
                        help="train the demo's pretext for this many seeds and use its features")
    parser.add_argument("--seeds", type=int, default=5, help="repeats on --features")
    parser.add_argument("--k-range", default="2:20")
    parser.add_argument("--subsample", type=float, default=0.9)
    args = parser.parse_args()
    lo, hi = (int(v) for v in args.k_range.split(":"))
    ks = list(range(lo, hi + 1))
    rows: list[dict] = []
    if args.features is not None:
        if args.labels is None:
            parser.error("--features needs --labels")
        rows += evaluate(np.load(args.features), np.load(args.labels), str(args.features),
                         args.seeds, ks, args.subsample)
    if args.digits:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(args.digits):
                feats, labels = digits_features(seed, Path(tmp))
                rows += evaluate(feats, labels, f"digits seed {seed}", 1, ks, 1.0)
    if not rows:
        parser.error("give --features/--labels or --digits")
    summary = {}
    for criterion in CRITERIA:
        picked = [r for r in rows if r["criterion"] == criterion]
        hits = sum(r["chosen_k"] == r["true_k"] for r in picked)
        summary[criterion] = {"found_true_k": f"{hits}/{len(picked)}",
                              "chosen": [r["chosen_k"] for r in picked],
                              "mean_abs_error": float(np.mean([abs(r["chosen_k"] - r["true_k"])
                                                               for r in picked]))}
    print(json.dumps({"benchmark": "choose_k", **machine(), "k_range": args.k_range,
                      "summary": summary}))


if __name__ == "__main__":
    main()
