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

__version__ = "0.1.0"

from headcache.bench import bench  # noqa: E402
from headcache.checkpoint import LoadReport, fingerprint, load_checkpoint  # noqa: E402
from headcache.errors import CheckpointError, HeadcacheError  # noqa: E402
from headcache.export import export, predict  # noqa: E402
from headcache.extract import ExtractConfig, ExtractResult, extract  # noqa: E402
from headcache.spec import resolve_spec  # noqa: E402
from headcache.store import CacheReader  # noqa: E402
from headcache.sweep import cross_validate, sweep  # noqa: E402
from headcache.train import TrainConfig, TrainResult, train  # noqa: E402

__all__ = [
    "CacheReader", "CheckpointError", "ExtractConfig", "ExtractResult", "HeadcacheError", "LoadReport",
    "TrainConfig", "TrainResult", "bench", "cross_validate", "export", "extract", "fingerprint", "load_checkpoint",
    "predict", "resolve_spec", "sweep", "train",
]
