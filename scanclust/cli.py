"""Command line: one subcommand per stage, calling the same functions as the Python API.

    scanclust run --config cifar10 --out runs/c10 [section.key=value ...]
    scanclust scan --out runs/c10 --resume
    scanclust demo
    torchrun --nproc_per_node 8 -m scanclust run --config imagenet_50 --out runs/in50

Under torchrun only the main process logs epochs and shows progress; a process group that
``torchrun --max-restarts`` restarted continues from the checkpoints (as with ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from scanclust import distributed
from scanclust.config import ConfigError, builtin_configs, load_config
from scanclust.demo import demo
from scanclust.errors import UserError
from scanclust.pipeline import STAGE_FUNCTIONS, run

STAGE_HELP = {
    "pretext": "train the backbone with SimCLR (or load pretext.weights)",
    "mine": "mine the K nearest neighbours of every image in the pretext features",
    "scan": "train the cluster model with the SCAN loss",
    "selflabel": "fine-tune the cluster model on its confident predictions",
    "evaluate": "write metrics.json and figures for the run's models",
    "run": "all stages in order: pretext, mine, scan, selflabel, evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanclust", description="SCAN clustering of unlabeled images.",
        epilog=f"built-in configs: {', '.join(builtin_configs())}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", help="built-in config name or YAML path "
                       "(default: the run directory's config.yaml)")
        p.add_argument("--out", "-o", help="run directory (default: runs/<config name>)")
        _common(p)
        if name == "run":
            p.add_argument("--seeds", type=int, default=1,
                           help="repeat the run with seeds seed..seed+N-1; report mean ± std")
    p = sub.add_parser("demo", help="the whole pipeline on scikit-learn's digits, offline, CPU")
    p.add_argument("--out", "-o", help="run directory (default: runs/demo, or runs/demo-N if taken)")
    p.add_argument("--seeds", type=int, default=1, help="repeat with N seeds; report mean ± std")
    _common(p)
    p = sub.add_parser("config", help="print a resolved config as YAML")
    p.add_argument("config", help="built-in config name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted stage; keep finished ones")
    p.add_argument("--force", action="store_true",
                   help="redo stages that already have output (old output is renamed aside)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (same as device=...)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or epoch lines")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. scan.epochs=10 data.root=/data")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level if distributed.is_main() else logging.ERROR,
                        format="%(message)s", stream=sys.stderr)
    try:
        return _dispatch(args)
    except (UserError, FileNotFoundError) as err:
        where = f" (process {distributed.rank()})" if distributed.active() else ""
        print(f"scanclust: error{where}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scanclust: interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        cfg = load_config(args.config, args.overrides)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.quiet:
        overrides.append("progress=false")
    if distributed.restart_count() > 0 and not args.resume:
        logging.getLogger("scanclust").warning(
            "restarted by torchrun (restart %d): continuing from the checkpoints, as --resume",
            distributed.restart_count())
        args.resume, args.force = True, False
    if args.command == "demo":
        demo(args.out, seeds=args.seeds, overrides=overrides, resume=args.resume,
             force=args.force)
        return 0
    out = args.out
    if out is None:
        if args.config is None:
            raise ConfigError("give --config, or --out of an existing run directory")
        out = Path("runs") / load_config(args.config, overrides).name
    if args.command == "run":
        run(args.config, out, overrides=overrides, resume=args.resume, force=args.force,
            seeds=args.seeds)
    else:
        STAGE_FUNCTIONS[args.command](args.config, out, overrides=overrides, resume=args.resume,
                                      force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
