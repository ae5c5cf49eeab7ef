"""scanclust: SCAN (Semantic Clustering by Adopting Nearest neighbors) for unlabeled images.

Each stage is a function ``stage(config, out, *, overrides=None, resume=False, force=False)``
that reads the previous stage's files in the run directory ``out`` and writes its own; ``run``
chains them. The command line calls the same functions.
"""

from scanclust.config import Config, ConfigError, load_config
from scanclust.errors import UserError
from scanclust.evaluate import evaluate
from scanclust.mine import mine
from scanclust.pipeline import run
from scanclust.predict import Clusterer, load, predict
from scanclust.pretext import pretext
from scanclust.scan import scan
from scanclust.selflabel import selflabel

__version__ = "0.1.0"

__all__ = ["Clusterer", "Config", "ConfigError", "UserError", "evaluate", "load", "load_config",
           "mine", "predict", "pretext", "run", "scan", "selflabel"]
