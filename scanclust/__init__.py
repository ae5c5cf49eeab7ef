"""scanclust: SCAN (Semantic Clustering by Adopting Nearest neighbors) for unlabeled images.

Each stage is a function ``stage(config, out, *, overrides=None, resume=False, force=False)``
(its module in ``scanclust/stages/``) that reads the previous stage's files in the run directory
``out`` and writes its own; ``run`` chains them and ``cluster`` drives them for a folder of
images. The command line calls the same functions.

Names are imported on first use (PEP 562), so ``import scanclust`` and ``scanclust --help`` do
not pay for torch, scikit-learn and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Clusterer": "scanclust.clusterer", "load": "scanclust.clusterer",
    "predict": "scanclust.clusterer",
    "Config": "scanclust.config", "ConfigError": "scanclust.config",
    "load_config": "scanclust.config", "UserError": "scanclust.errors",
    "cluster": "scanclust.folder", "report": "scanclust.results", "run": "scanclust.pipeline",
    "pretext": "scanclust.stages.pretext", "mine": "scanclust.stages.mine",
    "scan": "scanclust.stages.scan", "selflabel": "scanclust.stages.selflabel",
    "evaluate": "scanclust.stages.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scanclust' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
