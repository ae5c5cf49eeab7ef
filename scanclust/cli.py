"""Command line: one subcommand per stage, calling the same functions as the Python API.

    scanclust run --config cifar10 --out runs/c10 [section.key=value ...]
    scanclust scan --out runs/c10 --resume
    scanclust cluster ~/photos --out runs/photos
    scanclust predict runs/photos new/ more.jpg --csv new.csv
    scanclust review runs/photos
    scanclust export runs/photos ~/datasets/photos
    scanclust demo
    torchrun --nproc_per_node 8 -m scanclust run --config imagenet_50 --out runs/in50

torch, scikit-learn and matplotlib are imported only once a command needs them, so ``--help``
and a config error answer at once.

Under torchrun only the main process logs epochs and shows progress; a process group that
``torchrun --max-restarts`` restarted continues from the checkpoints (as with ``--resume``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import yaml

from scanclust import distributed
from scanclust.config import ConfigError, builtin_configs, load_config
from scanclust.errors import UserError

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
        p = _command(sub, name, text)
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
    _cluster_parsers(sub)
    p = sub.add_parser("config", help="print a resolved config as YAML")
    p.add_argument("config", help="built-in config name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def _command(sub: argparse._SubParsersAction, name: str, text: str,
             more: str = "") -> argparse.ArgumentParser:
    """A subcommand whose one-line help opens its longer description."""
    return sub.add_parser(name, help=text, description=text + more)


def _cluster_parsers(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "cluster", "cluster a folder of images: config chosen from the data, "
                 "all stages, a report", (
        ". Writes assignments.csv, clusters.json, skipped.txt and report.html in the run "
        "directory."))
    p.add_argument("folder", metavar="FOLDER", help="folder of images (subfolders included)")
    p.add_argument("--out", "-o", help="run directory (default: runs/<folder name>)")
    p.add_argument("--clusters", "-k", default=None, metavar="K|auto",
                   help="number of clusters, or auto (default: auto; with "
                        "--labels-from-folders the number of subfolders)")
    p.add_argument("--backbone", "-b", default="auto", metavar="NAME",
                   help="auto (a pretrained model when its weights are here or can be "
                        "downloaded, else scratch; the default), scratch (SimCLR on the folder, "
                        "the paper), a torchvision model (resnet50, vit_b_16, ...) with its "
                        "ImageNet weights, timm:NAME, or a weights file")
    p.add_argument("--preset", "-p", default="auto", help="auto, cpu, gpu or quick "
                   "(default: auto = gpu with CUDA, else cpu)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="subfolder names are classes: metrics against them are reported")
    p.add_argument("--export", choices=("symlink", "copy"),
                   help="also write one folder per cluster into RUN/clusters/")
    p.add_argument("--k-range", metavar="LO:HI", help="range for --clusters auto (default 2:20)")
    p.add_argument("--criterion", default="louvain",
                   help="--clusters auto criterion: louvain (default), louvain_alone, spectral, "
                        "eigengap, scan_merge, stability, gap, modularity or silhouette")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image instead of skipping it")
    _common(p)
    p = _command(sub, "predict", "assign new images to the clusters of a finished run", (
        ": prints CSV (path, cluster, confidence) or writes it with --csv; unreadable files "
        "are skipped with a warning and listed on stderr"))
    p.add_argument("run", metavar="RUN", help="run directory with a finished SCAN stage")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS")
    p.add_argument("--csv", help="write the CSV here instead of standard output")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p = _command(sub, "report", "(re)write assignments.csv, clusters.json, skipped.txt and "
                 "report.html of a folder run")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--export", choices=("symlink", "copy"),
                   help="also write one folder per cluster into RUN/clusters/")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (same as device=...)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p = _command(sub, "review", "look at and correct the clusters of a folder run in a local "
                 "web page", (
        ": name, merge, move, exclude, undo; every edit is saved at once to RUN/labels.json "
        "and shows in assignments.csv, clusters.json, the report, predict and export"))
    p.add_argument("run", metavar="RUN", help="run directory of scanclust cluster (or report)")
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--no-browser", action="store_true", help="print the URL only")
    p = _command(sub, "export", "write the labelled data set of a folder run (its reviewed "
                 "names and edits)", (
        "; excluded images are left out, and without a review the clusters are the labels "
        "(cluster_00, ...). folders: DEST/<label>/<path in the folder>; imagefolder: "
        "DEST/<label>/<path with / as __>, every file one torchvision's ImageFolder reads; "
        "csv: DEST is a file of path,label"))
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("dest", metavar="DEST", help="a new (or empty) folder, or the CSV file")
    p.add_argument("--format", default="folders", choices=("folders", "imagefolder", "csv"),
                   help="default: folders")
    p.add_argument("--link", choices=("symlink", "copy"),
                   help="link to the images or copy them (default: symlink)")


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
    parser = build_parser()
    # argparse stops filling positionals at the first option: `cluster FOLDER --out R a.b=1`
    # leaves a.b=1 over. Such leftovers are overrides (or, for predict, more inputs).
    args, extra = parser.parse_known_args(argv)
    rest = "inputs" if args.command == "predict" else "overrides"
    if extra and (any(e.startswith("-") for e in extra) or not hasattr(args, rest)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, rest, list(getattr(args, rest)) + extra)
    _setup_logging(getattr(args, "quiet", False))
    try:
        with _sigterm_raises():
            return _dispatch(args)
    except UserError as err:
        return _fail(str(err))
    except OSError as err:  # the file system's faults: disk full, read-only, permissions
        where = f": {err.filename}" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}"
                     + ("; free some space, then continue with --resume"
                        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""))
    except MemoryError:
        return _fail(OUT_OF_MEMORY)
    except RuntimeError as err:
        torch = sys.modules.get("torch")  # a torch error only if torch was imported
        if torch is not None and isinstance(err, torch.OutOfMemoryError):
            return _fail(OUT_OF_MEMORY)
        raise
    except KeyboardInterrupt:
        print("scanclust: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Terminated:
        print("scanclust: terminated (SIGTERM); continue with --resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        distributed.shutdown()


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt is for SIGINT (and, like it, past ``except
    Exception``): unwinding the stack removes temporary files and releases the run directory."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while the command runs.

    SIGTERM is what ``kill``, systemd, Slurm at the time limit and torchrun send; its default
    action ends the process at once, leaving temporary files behind and saying nothing.
    """
    if threading.current_thread() is not threading.main_thread():  # only it can set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # None: a handler set outside Python, which cannot be put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


OUT_OF_MEMORY = ("out of memory; lower the batch sizes (e.g. pretext.batch_size, scan.batch_size, "
                 "evaluate.batch_size), then continue with --resume")


def _fail(message: str) -> int:
    where = f" (process {distributed.rank()})" if distributed.active() else ""
    print(f"scanclust: error{where}: {message}", file=sys.stderr)
    return 2


class _Stderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a line is logged, not as it was
    when the first command set logging up (``main`` called again with stderr redirected, or
    after the first stream was closed, would otherwise print a logging traceback)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    """Our messages only: the root logger stays quiet, so libraries' INFO lines (faiss's
    'Could not load library ...' at import) do not read like failures."""
    logger = logging.getLogger("scanclust")
    # under torchrun the other processes speak only of errors (the main one logs the run)
    logger.setLevel(logging.ERROR if not distributed.is_main() else
                    logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        cfg = load_config(args.config, args.overrides)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.command == "predict":
        from scanclust.clusterer import predict_command

        return predict_command(args.run, args.inputs, csv_path=args.csv, device=args.device,
                               batch_size=args.batch_size, strict=args.strict)
    if args.command == "review":
        from scanclust.review import review_command

        return review_command(args.run, port=args.port, browser=not args.no_browser)
    if args.command == "export":
        from scanclust.export import export

        done = export(args.run, args.dest, args.format, args.link)
        how = "" if args.format == "csv" else f", {args.link or 'symlink'}"
        print(f"exported {done['images']} images in {done['labels']} labels to {args.dest} "
              f"({args.format}{how}); {done['excluded']} excluded images left out"
              + (f"; {done['converted']} written as PNG for ImageFolder" if done["converted"] else ""))
        if done["skipped_by_imagefolder"]:
            logging.getLogger("scanclust").warning(
                "images whose extension torchvision's ImageFolder skips by default (.gif, .jfif, "
                "...): %d; --format imagefolder writes them as PNG", done["skipped_by_imagefolder"])
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
    if args.command == "cluster":
        from scanclust.folder import cluster

        summary = cluster(args.folder, args.out, clusters=args.clusters,
                          backbone=args.backbone, preset=args.preset,
                          labels_from_folders=args.labels_from_folders, strict=args.strict,
                          export=args.export, k_range=args.k_range, criterion=args.criterion,
                          overrides=overrides, resume=args.resume, force=args.force)
        from scanclust.data.images import escape_name

        print(f"{summary['num_images']} images in {summary['num_clusters']} clusters "
              f"({summary['num_skipped']} files skipped) in {summary['total_seconds']:.0f} s; "
              f"open {escape_name(summary['report'])}")
        return 0
    if args.command == "report":
        load_config(Path(args.out) / "config.yaml", overrides)  # config errors before torch
        from scanclust.results import report

        report(None, args.out, overrides=overrides, export=args.export)
        return 0
    if args.command == "demo":
        load_config("demo", overrides)  # config errors before torch is imported
        from scanclust.demo import demo

        demo(args.out, seeds=args.seeds, overrides=overrides, resume=args.resume,
             force=args.force)
        return 0
    out = args.out
    if out is None:
        if args.config is None:
            raise ConfigError("give --config, or --out of an existing run directory")
        out = Path("runs") / load_config(args.config, overrides).name
    config_file = args.config if args.config is not None else Path(out) / "config.yaml"
    if args.config is not None or Path(config_file).is_file():
        load_config(config_file, overrides)  # config errors before torch is imported
    from scanclust.pipeline import STAGE_FUNCTIONS, run

    if args.command == "run":
        run(args.config, out, overrides=overrides, resume=args.resume, force=args.force,
            seeds=args.seeds)
    else:
        STAGE_FUNCTIONS[args.command](args.config, out, overrides=overrides, resume=args.resume,
                                      force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
