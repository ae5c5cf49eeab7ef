"""Ablations on one trained pretext: rerun mining, SCAN or self-label with other settings.

The pretext is most of a short run's time; the later stages take seconds to a minute each on a
GPU. So a GPU window trains the pretext once (``cifar10_budget.py``) and then tries several
settings of the later stages from its checkpoint, each in its own run directory under ``--out``
that starts from hard links to the base run's earlier stages. Each variant redoes the stages
from the one its first override names (``mine.*`` redoes mining, SCAN and self-label;
``scan.*`` SCAN and self-label; ``selflabel.*`` self-label only; ``pretext.*`` everything, with
the base run's config otherwise), then evaluates. ``--until mine`` stops after mining, which
with evaluation's k-means compares pretext settings by neighbour purity and k-means ACC alone
(with ``--set pretext.epochs=N`` for a shorter pretext of each). Results are printed and
appended to ``--json`` as one JSON line per variant as soon as it finishes, so a window that
runs out keeps what was done; ``--deadline`` skips a variant that the base run's stage times
say cannot finish in time.

    python benchmarks/ablate.py --base runs/budget --out runs/ablate --deadline 200
    python benchmarks/ablate.py --base runs/budget --out runs/pre --until mine \\
        --only pretext-recipe pretext-t0.2 pretext-t0.5 --set pretext.epochs=60
    python benchmarks/ablate.py --base /tmp/b --out /tmp/a --only mine-backbone   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from scanclust import config  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.pipeline import STAGE_FUNCTIONS  # noqa: E402
from scanclust.rundir import STAGE_DIRS, RunDir, read_json  # noqa: E402

ORDER = ("pretext", "mine", "scan", "selflabel")
# The settings where the paper's text and the released code differ (README): the text's reading
TEXT_READING = [f"{key}={json.dumps(value)}" for key, value in config.TEXT_READING.items()]
VARIANTS: dict[str, list[str]] = {  # in the order a short window should try them
    "scan-frozen-cached": ["scan.update_backbone=false", "scan.cached_views=5",
                           "scan.num_heads=10", "scan.optim.lr=0.001", "scan.epochs=60"],
    "mine-backbone": ["mine.features=backbone"],
    "text-reading": TEXT_READING,
    "scan-lr-1e-4": ["scan.optim.lr=0.0001"],
    "selflabel-ema": ["selflabel.ema=0.999"],
    "scan-1-head": ["scan.num_heads=1"],
    "selflabel-lr-4e-4": ["selflabel.optim.lr=0.0004"],
    "mine-k5": ["mine.topk=5"],
    # the pretext itself, usually with --until mine and a shorter --set pretext.epochs=N
    "pretext-recipe": ["pretext.temperature=0.1"],
    "pretext-t0.2": ["pretext.temperature=0.2"],
    "pretext-t0.5": ["pretext.temperature=0.5"],
    "pretext-wd-5e-4": ["pretext.optim.weight_decay=0.0005"],
    "pretext-batch-1024": ["pretext.batch_size=1024", "pretext.optim.lr=0.8"],
}


def first_stage(overrides: list[str]) -> str:
    """The earliest stage an override touches; augmentations first matter in SCAN."""
    sections = {o.split(".", 1)[0] for o in overrides}
    for stage in ORDER:
        if stage in sections:
            return stage
    return "scan"


def link_stages(base: RunDir, target: Path, stages: tuple[str, ...]) -> None:
    """Hard links (copies across file systems) of the base run's ``stages`` and config."""
    target.mkdir(parents=True)
    shutil.copy2(base.config_path, target / "config.yaml")
    for stage in stages:
        shutil.copytree(base.stage_dir(stage), target / STAGE_DIRS[stage],
                        copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a run with a finished pretext")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                        help="overrides for every variant (e.g. device=cpu)")
    parser.add_argument("--until", choices=ORDER[1:], default="selflabel",
                        help="last stage to run before evaluating")
    parser.add_argument("--deadline", type=float, help="seconds from start; later variants skip")
    parser.add_argument("--json", type=Path, help="append one JSON line per variant here")
    args = parser.parse_args()
    started = time.perf_counter()
    base = RunDir(args.base)
    base_seconds = {s: base.summary(s)["seconds"] for s in ORDER if base.is_done(s)}
    for name in args.only:
        overrides = VARIANTS[name] + args.set + ["progress=false", "evaluate.figures=false"]
        start = first_stage(VARIANTS[name])
        redo = ORDER[ORDER.index(start):ORDER.index(args.until) + 1]
        if not redo:
            print(f"{name}: nothing to redo before --until {args.until}", flush=True)
            continue
        estimate = sum(base_seconds.get(s, 0.0) for s in redo) * 1.2 + 15
        if args.deadline and time.perf_counter() - started + estimate > args.deadline:
            print(f"{name}: skipped, about {estimate:.0f} s would pass the deadline", flush=True)
            continue
        target = args.out / name
        link_stages(base, target, ORDER[:ORDER.index(start)])
        cfg = load_config(target / "config.yaml", overrides)
        seconds = {}
        for stage in (*redo, "evaluate"):
            t = time.perf_counter()
            STAGE_FUNCTIONS[stage](cfg, target)
            seconds[stage] = round(time.perf_counter() - t, 2)
        metrics = read_json(target / "metrics.json")
        record = {"benchmark": "ablation", "variant": name, "overrides": VARIANTS[name],
                  "base": str(args.base), **machine(), "seconds": seconds,
                  "neighbors": metrics["neighbors"],
                  "stages": {k: {m: round(v[m], 4) for m in ("acc", "nmi", "ari")}
                             for k, v in metrics["stages"].items()}}
        line = json.dumps(record)
        print(line, flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
