"""CIFAR-10 with the paper's own schedule, end to end and timed: ``scanclust run --config
cifar10`` (500 SimCLR epochs, 50 SCAN epochs, 200 self-label epochs) on the JPEG folders,
everything included (decoding, training, mining, k-means, evaluation), with test-split ACC /
NMI / ARI beside the paper's (Table 3: 87.6 / 78.7 / 75.8, best of ten runs 88.3).

The run resumes where it stopped, so a schedule longer than one call of a lent GPU continues
in the next call with the same ``--out`` (the stages resume from their last epoch checkpoint);
the record adds up the wall time of the calls. It is written after every stage (to
``--out``/paper.json and ``--json``), and right after mining the mining features of the train
and test splits go to ``--features`` (``benchmarks/data/cifar10-simclr-<epochs>ep.npz``), so a
call cut short keeps what was done.

    python benchmarks/cifar10_paper.py --data data/cifar10-jpeg.tar.gz --out /tmp/paper  # GPU
    python benchmarks/cifar10_paper.py --quick --out /tmp/paper-quick                   # CPU smoke
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cifar10_budget import (QUICK, RUN, folder_overrides,  # noqa: E402
                                       pipeline_arguments, prepare_data)
from benchmarks.common import REPO, export_features, machine  # noqa: E402
from scanclust.config import Config, load_config  # noqa: E402
from scanclust.files import read_json, write_json  # noqa: E402
from scanclust.pipeline import run_stages  # noqa: E402
from scanclust.rundir import RunDir  # noqa: E402

PAPER = {"acc": 0.876, "nmi": 0.787, "ari": 0.758, "best_acc": 0.883}  # Table 3, CIFAR-10
QUICK_EPOCHS = ["pretext.epochs=2", "scan.epochs=2", "selflabel.epochs=2",
                "evaluate.kmeans_restarts=1"]


def main() -> None:
    parser = pipeline_arguments(__doc__, "cifar10", "runs/cifar10-paper",
                                "the .npz of mining features (default benchmarks/data/"
                                "cifar10-simclr-<epochs>ep.npz; with --quick under --out)",
                                "CPU smoke run: tiny ResNet on 2,000 images, 2 epochs a stage")
    args = parser.parse_args()
    started = time.perf_counter()
    root = prepare_data(args.data, Path("/tmp") / "scanclust-data")
    overrides = (RUN + (QUICK + QUICK_EPOCHS if args.quick else []) + args.set
                 + folder_overrides(root, args.device))
    cfg = load_config(args.config, overrides)
    epochs = {s: getattr(cfg, s).epochs for s in ("pretext", "scan", "selflabel")}
    features = args.features or (
        (args.out if args.quick else REPO / "benchmarks" / "data")
        / f"cifar10-simclr-{epochs['pretext']}ep.npz")
    if (args.out / "metrics.json").exists():  # finished in an earlier call: nothing to add
        print((args.out / "paper.json").read_text(), flush=True)
        return
    timing = args.out / "paper-calls.json"
    calls = read_json(timing)["calls"] if timing.exists() else []
    record = {"benchmark": "cifar10_paper", **machine(), "config": args.config, "epochs": epochs,
              "paper": PAPER, "overrides": overrides}

    def save(**fields) -> None:
        """The record so far (also the time of the calls before this one)."""
        now = round(time.perf_counter() - started, 1)
        record.update(fields, calls=calls + [now], wall_s=round(sum(calls) + now, 1))
        stages = {}
        for name in ("pretext", "mine", "scan", "selflabel"):
            summary = RunDir(args.out).summary_path(name)
            if summary.exists():
                stages[name] = {k: v for k, v in read_json(summary).items()
                                if k in ("seconds", "epochs", "step", "purity_train")}
        record["stages_done"] = stages
        write_json(args.out / "paper.json", record)
        write_json(timing, {"calls": calls + [now]})
        if args.json:
            write_json(args.json, record)

    def after_mine(cfg: Config) -> Config:
        about = {"made_by": "benchmarks/cifar10_paper.py", "config": args.config,
                 "pretext_epochs": epochs["pretext"], "features": cfg.mine.features,
                 "split_of_test_features": "test", **machine()}
        save(features=export_features(args.out, features, about))
        print(f"mining features written to {features}", flush=True)
        return cfg

    args.out.mkdir(parents=True, exist_ok=True)
    save()
    try:
        run_stages(cfg, args.out, resume=True, force=False, before_scan=after_mine)
    except KeyboardInterrupt:  # a time limit (SIGINT): keep this call's time for the next
        save(stopped=True)
        raise SystemExit(130) from None
    metrics = read_json(args.out / "metrics.json")
    save(neighbors=metrics["neighbors"],
         stages={k: {m: round(v[m], 4) for m in ("acc", "nmi", "ari")}
                 for k, v in metrics["stages"].items()})
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
