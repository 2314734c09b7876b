"""headcache: run a frozen backbone once, train classification heads from its cached hidden states.

The public API, one call per thing a user does (the command line calls the same):

>>> import headcache
>>> headcache.extract("demo", "cache/demo/backbone.ckpt", "cache/mine.h5")  # doctest: +SKIP
>>> run = headcache.train("cache/mine.h5", "runs/first", headcache.TrainConfig(pool="learned"))  # doctest: +SKIP
>>> run.metrics["test"]["auroc"], run.metrics["test"]["auroc_ci"]  # doctest: +SKIP

The modules hold the details. The names below are re-exported, so
``headcache.extract`` and ``headcache.train`` are the functions: import from
the modules with ``from headcache.train import fit``, not ``import headcache.train as ...``.
"""

from headcache._version import __version__
from headcache.bench import bench
from headcache.checkpoint import LoadReport, fingerprint, load_checkpoint
from headcache.config import TrainConfig
from headcache.cv import cross_validate
from headcache.errors import CheckpointError, HeadcacheError
from headcache.export import export, predict
from headcache.extract import ExtractConfig, ExtractResult, extract
from headcache.spec import resolve_spec
from headcache.store import CacheReader
from headcache.sweep import sweep
from headcache.train import TrainResult, train

__all__ = [
    "__version__", "CacheReader", "CheckpointError", "ExtractConfig", "ExtractResult", "HeadcacheError", "LoadReport",
    "TrainConfig", "TrainResult", "bench", "cross_validate", "export", "extract", "fingerprint", "load_checkpoint",
    "predict", "resolve_spec", "sweep", "train",
]
