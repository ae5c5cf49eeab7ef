"""Cluster priors and self-label selections on imbalanced data, through the package's stages.

``digits``: scikit-learn's 1,797 digits (16 px, as the demo) written as class folders of three
profiles, each drawn afresh per seed with the digits in a seeded random order of size:

- ``geometric``: 170 images for the largest class falling geometrically to 17 (ratio 10):
  170, 131, 102, 79, 61, 47, 37, 28, 22, 17 (694 images);
- ``step``: 3 classes of 170 and 7 of 17 (629 images);
- ``balanced``: 70 per class (700 images, about the same number as the others).

Per profile and seed one pretext and mining with the demo config (``data.dataset=folder``, so
SCAN's selection and the evaluation see the whole folder, as ``scanclust cluster`` does) are
shared by every variant: SCAN with each prior (``PRIORS``: uniform, adaptive, adaptive
with a warm-up of half the epochs, and ``overcluster``: 3 x K clusters under the uniform prior,
merged to K at ``scan.merge_resolution=1`` unless ``--set`` says otherwise; ``--priors``
picks), and on each SCAN self-label with each
selection (``selflabel.selection``). ``folder``: the same variants on a finished
``scanclust cluster --preset cpu`` run (SCAN and self-label heads on cached features of its
frozen backbone), reusing its pretext and mining; ``--set seed=S`` draws another SCAN and
self-label on the same pretext. ``cifar``: the CIFAR-10 folders for it. ``summary``: the
tables of several ``--json`` files pooled by profile.

Reported per variant: ACC and NMI (mean ± std over seeds) and the total-variation distance
between the true class sizes and the sizes of the Hungarian-matched clusters (0: the sizes
are right; 1: disjoint), for SCAN's model and for each self-label. Each variant's result is
kept in its run directory (``result.json``), so a rerun only computes what is missing.

    python benchmarks/prior.py digits --out runs/prior/digits --seeds 0 1 2
    python benchmarks/prior.py cifar --out runs/prior/cifar
    python -m scanclust cluster runs/prior/cifar/balanced --out runs/prior/cifar-runs/balanced \\
        --preset cpu --backbone scratch --labels-from-folders seed=0
    python benchmarks/prior.py folder --base runs/prior/cifar-runs/balanced --set seed=1 \\
        --out runs/prior/cifar-variants/balanced-s1 --json runs/prior/balanced-s1.json
    python benchmarks/prior.py summary --inputs runs/prior/*.json --json prior-cifar.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablate import link_stages  # noqa: E402
from benchmarks.common import CLASSES, DEFAULT_ARCHIVE, machine  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.pipeline import STAGE_FUNCTIONS  # noqa: E402
from scanclust.rundir import RunDir, read_json  # noqa: E402

# Every prior key set, so that a base run made under other defaults does not leak into a variant
ADAPTIVE = ["scan.prior=adaptive", "scan.prior_momentum=0.99", "scan.prior_floor=0.2"]
PRIORS = {"uniform": ["scan.prior=uniform", "scan.overcluster=1"],
          "adaptive": ADAPTIVE + ["scan.prior_warmup=0", "scan.overcluster=1"],
          "adaptive_warmup": ADAPTIVE + ["scan.prior_warmup=0.5", "scan.overcluster=1"],
          "overcluster": ["scan.prior=uniform", "scan.overcluster=3",
                          "scan.merge_resolution=1"]}
SELECTIONS = {"threshold": ["selflabel.selection=threshold"],
              "per_cluster": ["selflabel.selection=per_cluster"]}
QUIET = ["progress=false", "evaluate.figures=false", "evaluate.kmeans=false"]


def profile_sizes(profile: str, largest: int = 170, classes: int = 10) -> list[int]:
    """Class sizes, largest first."""
    if profile == "geometric":
        return [round(largest * 10 ** (-r / (classes - 1))) for r in range(classes)]
    if profile == "step":
        return [largest] * 3 + [largest // 10] * (classes - 3)
    return [70] * classes


def digits_folder(folder: Path, profile: str, seed: int) -> list[int]:
    """The profile's digits as PNG class folders; returns the class sizes by digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(10)  # order[r]: the digit with the r-th largest size
    sizes = [0] * 10
    for r, n in enumerate(profile_sizes(profile)):
        digit = int(order[r])
        sizes[digit] = n
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in rng.choice(np.flatnonzero(digits.target == digit), n, replace=False):
            small = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(small).resize((16, 16), Image.BILINEAR).save(folder / str(digit) /
                                                                          f"{i:04d}.png")
    return sizes


def size_distance(metrics: dict, true_sizes: list[int]) -> float:
    """Total variation between the class shares and the shares of their matched clusters."""
    matched = np.zeros(len(true_sizes))
    for cluster, (label, size) in enumerate(zip(metrics["mapping"], metrics["cluster_sizes"])):
        if label >= 0:
            matched[label] += size
    truth = np.asarray(true_sizes, dtype=float)
    return float(0.5 * np.abs(matched / matched.sum() - truth / truth.sum()).sum())


def variant(base: Path, target: Path, overrides: list[str], redo: tuple[str, ...],
            true_sizes: list[int], linked: tuple[str, ...]) -> dict:
    """Run ``redo`` then evaluate in ``target`` (linked to ``base``'s ``linked`` stages); the
    cached result when it is there and was made with the same seed, scan and self-label
    settings."""
    if (target / "result.json").is_file():
        wanted = load_config(base / "config.yaml", overrides + QUIET)
        made = load_config(target / "config.yaml")
        if (wanted.seed, wanted.scan, wanted.selflabel) == (made.seed, made.scan, made.selflabel):
            return {**read_json(target / "result.json"),
                    "selflabel_summary": read_json(target / "selflabel" / "summary.json")}
    if target.exists():
        import shutil

        shutil.rmtree(target)
    link_stages(RunDir(base), target, linked)
    cfg = load_config(target / "config.yaml", overrides + QUIET)
    seconds = {}
    for stage in (*redo, "evaluate"):
        started = time.perf_counter()
        STAGE_FUNCTIONS[stage](cfg, target)
        seconds[stage] = round(time.perf_counter() - started, 1)
    stages = read_json(target / "metrics.json")["stages"]
    result = {"overrides": overrides, "seconds": seconds,
              "selflabel_summary": read_json(target / "selflabel" / "summary.json"),
              **{name: {"acc": stages[name]["acc"], "nmi": stages[name]["nmi"],
                        "tv": size_distance(stages[name], true_sizes),
                        "sizes": stages[name]["cluster_sizes"]}
                 for name in ("scan", "selflabel")}}
    (target / "result.json").write_text(json.dumps(result))
    return result


def variants(base: Path, out: Path, extra: list[str], true_sizes: list[int],
             priors: list[str]) -> dict:
    """Each of ``priors``, and on each SCAN every self-label selection."""
    results = {}
    for prior, prior_keys in PRIORS.items():
        if prior not in priors:
            continue
        first = None
        for selection, selection_keys in SELECTIONS.items():
            overrides = prior_keys + selection_keys + extra
            if first is None:
                first = out / f"{prior}-{selection}"
                result = variant(base, first, overrides, ("scan", "selflabel"), true_sizes,
                                 ("pretext", "mine"))
            else:
                result = variant(first, out / f"{prior}-{selection}", overrides, ("selflabel",),
                                 true_sizes, ("pretext", "mine", "scan"))
            results[f"{prior}/{selection}"] = result
    return results


def digits(args: argparse.Namespace) -> dict:
    table: dict = {}
    for profile in args.profiles:
        for seed in args.seeds:
            name = f"{profile}-s{seed}"
            folder, base = args.out / "data" / name, args.out / name / "base"
            sizes = digits_folder(folder, profile, seed) if not folder.is_dir() else \
                [len(list((folder / str(d)).glob("*.png"))) for d in range(10)]
            started = time.perf_counter()
            if not RunDir(base).is_done("mine"):
                cfg = load_config("demo", [
                    f"seed={seed}", "data.dataset=folder", f"data.root={folder.resolve()}",
                    "data.labels_from_folders=true",
                    f"data.cache_dir={(args.out / name / 'cache').resolve()}"] + QUIET)
                for stage in ("pretext", "mine"):
                    STAGE_FUNCTIONS[stage](cfg, base)
            if args.prepare:
                print(f"{name}: pretext and mining {time.perf_counter() - started:.0f} s",
                      flush=True)
                continue
            results = variants(base, args.out / name, args.set, sizes, args.priors)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
            for key, result in results.items():
                table.setdefault(profile, {}).setdefault(key, []).append(result)
    return table


def folder(args: argparse.Namespace) -> dict:
    cfg = load_config(args.base / "config.yaml")
    from scanclust.data import build_dataset

    targets = build_dataset(cfg.data, "train").targets
    sizes = np.bincount(targets, minlength=targets.max() + 1).tolist()
    results = variants(args.base, args.out, args.set, sizes, args.priors)
    return {Path(cfg.data.root).name: {key: [result] for key, result in results.items()}}


def summary(args: argparse.Namespace) -> dict:
    """The tables of several ``--json`` files of this script, the runs of each profile (a
    folder's name, for ``folder``) pooled: several pretexts, or SCAN seeds on one."""
    table: dict = {}
    for path in args.inputs:
        for profile, rows in read_json(path)["results"].items():
            for key, results in rows.items():
                table.setdefault(profile, {}).setdefault(key, []).extend(results)
    return table


def cifar(args: argparse.Namespace) -> None:
    """A balanced folder (100 per class) and a long-tailed one (200 falling geometrically to
    20) of CIFAR-10 train JPEGs, class subfolders, random hex names."""
    rng = random.Random(7)
    with tarfile.open(args.archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).parts[-3] == "train"]
        by_class = {c: [m for m in members if Path(m.name).parts[-2] == c] for c in CLASSES}
        order = CLASSES[:]
        rng.shuffle(order)
        profiles = {"balanced": {c: 100 for c in CLASSES},
                    "geometric": {c: round(200 * 10 ** (-r / 9)) for r, c in enumerate(order)}}
        for profile, counts in profiles.items():
            for c, n in counts.items():
                (args.out / profile / c).mkdir(parents=True, exist_ok=True)
                for m in rng.sample(by_class[c], n):
                    (args.out / profile / c / f"{rng.getrandbits(48):012x}.jpg").write_bytes(
                        tar.extractfile(m).read())
            print(profile, counts, sum(counts.values()))


def print_table(table: dict) -> None:
    for profile, rows in table.items():
        print(f"\n{profile}")
        print(f"{'prior / self-label':28s} {'model':10s} {'ACC':>13s} {'NMI':>13s} {'size TV':>13s}")
        shown = set()
        for key, results in rows.items():
            prior, _ = key.split("/")
            for stage in ("scan", "selflabel"):
                if stage == "scan" and prior in shown:
                    continue
                shown.add(prior)
                label = f"{prior}" if stage == "scan" else key
                cells = []
                for metric in ("acc", "nmi", "tv"):
                    values = np.array([r[stage][metric] for r in results])
                    cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
                kept = "" if stage == "scan" else "  kept epochs " + ",".join(
                    str(r["selflabel_summary"]["kept_epoch"]) for r in results)
                print(f"{label:28s} {stage:10s} {cells[0]:>13s} {cells[1]:>13s} "
                      f"{cells[2]:>13s}{kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("digits", "folder", "cifar", "summary"))
    parser.add_argument("--out", type=Path, help="digits, folder, cifar: where to write")
    parser.add_argument("--inputs", type=Path, nargs="*", default=[],
                        help="summary: --json files of earlier runs")
    parser.add_argument("--base", type=Path, help="folder: a finished scanclust cluster run")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--profiles", nargs="*", default=["geometric", "step", "balanced"])
    parser.add_argument("--priors", nargs="*", default=list(PRIORS), choices=list(PRIORS))
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                        help="overrides for every variant")
    parser.add_argument("--prepare", action="store_true",
                        help="digits: only the shared pretext and mining of each run")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.out is None and args.mode != "summary":
        parser.error(f"{args.mode} needs --out")
    if args.mode == "cifar":
        cifar(args)
        return
    started = time.perf_counter()
    table = {"digits": digits, "folder": folder, "summary": summary}[args.mode](args)
    print_table(table)
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": table}))


if __name__ == "__main__":
    main()
