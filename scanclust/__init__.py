"""scanclust: SCAN (Semantic Clustering by Adopting Nearest neighbors) for unlabeled images.

Each stage is a function ``stage(config, out, *, overrides=None, resume=False, force=False)``
that reads the previous stage's files in the run directory ``out`` and writes its own; ``run``
chains them and ``cluster`` drives them for a folder of images. The command line calls the same
functions.

Names are imported on first use (PEP 562), so ``import scanclust`` and ``scanclust --help`` do
not pay for torch, scikit-learn and matplotlib.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Clusterer": "scanclust.predict", "load": "scanclust.predict", "predict": "scanclust.predict",
    "Config": "scanclust.config", "ConfigError": "scanclust.config",
    "load_config": "scanclust.config", "UserError": "scanclust.errors",
    "cluster": "scanclust.cluster", "evaluate": "scanclust.evaluate", "mine": "scanclust.mine",
    "pretext": "scanclust.pretext", "report": "scanclust.report", "run": "scanclust.pipeline",
    "scan": "scanclust.scan", "selflabel": "scanclust.selflabel",
}

__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """Keeps ``scanclust.scan`` the function: importing a submodule sets the package attribute
    of the same name to the module, which an eager ``from ... import`` used to overwrite."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f"scanclust.{name}":
            return getattr(value, name)
        return value


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scanclust' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
