"""Command line: one subcommand per stage, calling the same functions as the Python API.

    scanclust run --config cifar10 --out runs/c10 [section.key=value ...]
    scanclust scan --out runs/c10 --resume
    scanclust demo
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

import torch
import yaml

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
    _setup_logging(getattr(args, "quiet", False))
    try:
        return _dispatch(args)
    except UserError as err:
        return _fail(str(err))
    except OSError as err:  # the file system's faults: disk full, read-only, permissions
        where = f": {err.filename}" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}"
                     + ("; free some space, then continue with --resume"
                        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""))
    except (MemoryError, torch.OutOfMemoryError):
        return _fail("out of memory; lower the batch sizes (e.g. pretext.batch_size, "
                     "scan.batch_size, evaluate.batch_size), then continue with --resume")
    except KeyboardInterrupt:
        print("scanclust: interrupted; continue with --resume", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"scanclust: error: {message}", file=sys.stderr)
    return 2


def _setup_logging(quiet: bool) -> None:
    """Our messages only: the root logger stays quiet, so libraries' INFO lines (faiss's
    'Could not load library ...' at import) do not read like failures."""
    logger = logging.getLogger("scanclust")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


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
