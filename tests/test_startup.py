"""Start-up: ``--help`` and a config error answer without importing torch, sklearn, matplotlib."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "matplotlib", "torchvision")
PROBE = """
import sys
from scanclust.cli import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
print(sorted(m for m in {heavy!r} if m in sys.modules), code)
"""


def _probe(argv: list[str]) -> str:
    code = PROBE.format(argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    return result.stdout.strip().splitlines()[-1]


def test_help_and_config_errors_import_nothing_heavy(tmp_path: Path) -> None:
    assert _probe(["--help"]) == "[] 0"
    assert _probe(["cluster", "--help"]) == "[] 0"
    assert _probe(["run", "--config", "demo", "scan.epoch=3"]) == "[] 2"
    assert _probe(["demo", "pretext.lr=1"]) == "[] 2"
    assert _probe(["cluster", str(tmp_path / "missing")]) == "[] 2"


def test_help_is_fast() -> None:
    # the requirement is 1 s; a loaded CI machine gets a generous bound
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "scanclust", "--help"], cwd=ROOT,
                       capture_output=True, check=True, timeout=60)
        best = min(best, time.perf_counter() - start)
    assert best < 3.0
