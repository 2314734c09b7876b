"""`headcache bench`: what the cache saves, measured on the user's own model in one process.

Both paths run the one training loop (`train.fit`) with the same head, pool,
seed and batches (NOTE [ Equivalence principle ] in features.py):

- end to end, as the seed trained: the frozen backbone runs inside every
  step (`LiveFeatures`);
- cached: one extraction, then every epoch reads the cache (`CachedFeatures`).

It reports the seconds per epoch of each, the extraction's seconds, the
epoch count from which the cache is ahead (break-even), the projected total
speedup at 10, 50 and 100 epochs, and the equivalence check: the largest
difference between the final head weights of a short run on each path
(CHECK_STEPS steps, same head, seed and batches). Beyond WEIGHT_TOLERANCE,
`bench` raises `EquivalenceError`, because the cached numbers would then time
a different computation.

NOTE [ Why the check run is short ]
The cache holds the backbone's states up to float rounding: the live path
encodes other batch compositions than extraction did, so a few values in a
thousand land on the other side of a float16 rounding step (demo backbone,
4,000 patients: 95% of patients' pooled features bitwise equal, the rest
within 1.8e-4). Training is sensitive to such differences and amplifies them
with every step: after 350 steps the two runs' heads differ by 8% of a
weight (validation AUROC 0.880 against 0.876), as any two runs whose inputs
differ in the last bit would. A tolerance on the weights of the timed runs
would then depend on their length. Over a short run it does not: float
noise stays at or below 2.4e-4 while real breaks show from the first steps.
The timed runs' final weights are compared too and reported, for the record.

Only the splits training reads (train and validation) are extracted and
timed; a test split costs one pass either way.
"""
from __future__ import annotations

import math
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from headcache._version import __version__
from headcache.config import BenchConfig, TrainConfig
from headcache.devices import resolve_device
from headcache.errors import EquivalenceError, OutputExistsError, OutputWriteError
from headcache.extract import ExtractConfig, extract
from headcache.features import CachedFeatures, LiveFeatures
from headcache.pooling import is_learnable
from headcache.rundir import new_figure, save_figure, write_json
from headcache.spec import load_backbone, resolve_spec, spec_splits
from headcache.train import HeadTask, fit, layer_view, num_classes_of, resolve_splits, tasks_for_splits

# Largest |w_cached - w_end_to_end| over the final head weights of the check run that still counts as
# the same training. Measured on the demo backbone at its default size (D = 256), float16 and float32
# caches, meanq and learned pools: check runs on 4,000 patients 8e-6 to 1.1e-4; runs of 1 to 45 steps on
# 200 patients up to 2.4e-4. That is float rounding (NOTE [ Why the check run is short ]) made visible by
# AdamW: its division by sqrt(v) turns last-bit differences of near-zero gradients into steps of up to lr
# (1.4e-4 after the very first step). Real breaks on the same data: a live path that skips the float16
# rounding 3.5e-3 (6.6e-3 on 200 patients), noise of 1e-3 on the features 1.6e-2, another batch order
# 3.7. 1e-3 sits 4x above the noise and 3.5x below the smallest break.
WEIGHT_TOLERANCE = 1e-3
CHECK_STEPS = 25  # steps of the check run (it reads CHECK_STEPS batches and CHECK_VAL_ITEMS validation items)
CHECK_VAL_ITEMS = 256
PROJECTED_EPOCHS = (10, 50, 100)


@dataclass
class BenchResult:
    """What `bench` measured (seconds are wall-clock, per epoch = train steps + validation)."""

    spec: str
    pool: str
    head: str
    device: str
    dtype: str
    epochs: int
    split_sizes: dict[str, int]
    extract_seconds: float
    epochs_end_to_end: list[float]  # seconds of each end-to-end epoch
    epochs_cached: list[float]  # seconds of each cached epoch
    max_abs_weight_diff: float  # final head weights of the check run (the equivalence check)
    max_abs_weight_diff_timed_runs: float  # final head weights of the timed runs (NOTE [ Why the check ... ])
    tolerance: float = WEIGHT_TOLERANCE
    out: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def epoch_seconds_end_to_end(self) -> float:
        """Median seconds of an end-to-end epoch (the median ignores a one-off slow epoch)."""
        return statistics.median(self.epochs_end_to_end)

    @property
    def epoch_seconds_cached(self) -> float:
        """Median seconds of a cached epoch."""
        return statistics.median(self.epochs_cached)

    @property
    def speedup_per_epoch(self) -> float:
        return self.epoch_seconds_end_to_end / self.epoch_seconds_cached

    @property
    def break_even_epochs(self) -> int | None:
        """The fewest epochs for which extraction + cached epochs take no longer than end to end
        (None: a cached epoch is not faster, so the cache never pays off)."""
        saved = self.epoch_seconds_end_to_end - self.epoch_seconds_cached
        return max(1, math.ceil(self.extract_seconds / saved)) if saved > 0 else None

    def total_seconds(self, epochs: int) -> tuple[float, float]:
        """Projected (end-to-end, cached incl. extraction) seconds of ``epochs`` epochs."""
        return epochs * self.epoch_seconds_end_to_end, self.extract_seconds + epochs * self.epoch_seconds_cached

    def speedup_at(self, epochs: int) -> float:
        end_to_end, cached = self.total_seconds(epochs)
        return end_to_end / cached

    def to_dict(self) -> dict[str, Any]:
        """bench.json: flat keys for scripts, then the details."""
        summary = {
            "epoch_seconds_end_to_end": self.epoch_seconds_end_to_end,
            "epoch_seconds_cached": self.epoch_seconds_cached,
            "extract_seconds": self.extract_seconds,
            "speedup_per_epoch": self.speedup_per_epoch,
            "break_even_epochs": self.break_even_epochs,
            **{f"speedup_at_{n}_epochs": self.speedup_at(n) for n in PROJECTED_EPOCHS},
            "max_abs_weight_diff": self.max_abs_weight_diff,
            "tolerance": self.tolerance,
        }
        details = {k: v for k, v in asdict(self).items() if k not in summary and k != "out"}
        return {**summary, **details}


def bench(spec: str | Any, checkpoint: str | Path, *, epochs: int = 3, out: str | Path | None = None,
          config: TrainConfig = TrainConfig(), spec_options: dict[str, str] | None = None,
          dtype: str = "float16", limit: int | None = None, key_map: dict[str, str] | None = None,
          trust_checkpoint: bool = False, on_stage: Callable[[str], None] = lambda stage: None) -> BenchResult:
    """Time ``epochs`` epochs end to end against extraction + ``epochs`` epochs from the cache.

    Parameters
    ----------
    spec : str or spec object
        As for `extract` (resolved with ``spec_options``).
    checkpoint : path
        The backbone's weights.
    epochs : int
        Epochs timed on each path (the schedule is that of ``epochs`` epochs).
    out : path, optional
        Folder for ``bench.json``, ``bench.png`` and the cache (``cache.h5``);
        without it, nothing is kept.
    config : TrainConfig
        The head both paths train (its ``epochs`` is replaced by ``epochs``;
        early stopping is off so that every epoch is timed).
    dtype : {"float16", "float32"}
        The cache's dtype; the live path rounds through it.
    limit : int, optional
        Use only the first ``limit`` items of each split (a quicker bench;
        times per epoch scale with the items, so the ratios hold).
    key_map, trust_checkpoint :
        As for `extract` (``key_map=None``: the prefix rewrite is detected).
    on_stage : callable, optional
        Called with a line before each stage.

    Raises
    ------
    EquivalenceError
        The check runs' final head weights differ by more than WEIGHT_TOLERANCE.

    Example
    -------
    >>> result = bench("seqsetvae", "demo/backbone.ckpt", spec_options={"data": "demo/data"})  # doctest: +SKIP
    >>> result.speedup_at(50)  # doctest: +SKIP
    """
    BenchConfig(epochs=epochs, limit=limit, dtype=dtype)  # checks them, before anything runs
    spec_text = spec if isinstance(spec, str) else getattr(spec, "name", type(spec).__name__)
    if isinstance(spec, str):
        spec = resolve_spec(spec, spec_options)
    if limit is not None:
        spec = FirstItems(spec, limit)
    config = replace(config, epochs=epochs, patience=epochs + 1)  # patience > epochs: every epoch runs
    device = resolve_device(config.device)
    train_split, val_split, _ = resolve_splits(config, spec_splits(spec))
    splits = (train_split, val_split, None)  # no test: it is one pass either way

    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise OutputExistsError(f"--out {out} is a file; bench writes a folder (bench.json, bench.png, cache.h5): "
                                "give a directory")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out) if out is not None else Path(scratch)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(f"--out {folder}: cannot create this directory ({exc.strerror}: {exc.filename}); "
                                   "give a path whose folders are directories you can write") from None
        cache = folder / "cache.h5"
        on_stage(f"extracting {train_split} and {val_split} (one backbone pass)")
        # the learned pool reads tokens: of every layer when the head reads another than the last
        token_layers = "all" if is_learnable(config.pool) and config.layer != "last" else "last"
        extracted = extract(spec, checkpoint, cache, ExtractConfig(
            splits=(train_split, val_split), dtype=dtype, device=config.device, key_map=key_map,
            trust_checkpoint=trust_checkpoint, overwrite=True, token_layers=token_layers))
        report = extracted.load_report

        on_stage(f"training {epochs} epochs from the cache")
        view = layer_view([config])
        cached = CachedFeatures(cache, pool=config.pool, device=device, expected_fingerprint=report.fingerprint,
                                memory_budget=config.memory_budget, layer=view)
        num_classes = num_classes_of(cached, splits)
        [from_cache] = fit(cached, tasks_for_splits([config], cached, splits), num_classes=num_classes,
                           hidden_dim=cached.hidden_dim)

        on_stage(f"training {epochs} epochs end to end (the backbone in every step)")
        backbone, _ = load_backbone(spec, checkpoint, key_map=key_map, trust=trust_checkpoint)
        live = LiveFeatures(spec, backbone.to(device), pool=config.pool, dtype=dtype, device=device, layer=view,
                            token_layers=cached.token_layers)
        [end_to_end] = fit(live, tasks_for_splits([config], live, splits), num_classes=num_classes,
                           hidden_dim=cached.hidden_dim)

        on_stage(f"equivalence check: {CHECK_STEPS} steps on each path")
        diff = check_run(cached, live, config, splits, num_classes)
    result = BenchResult(
        spec=spec_text, pool=config.pool, head=config.head, device=str(device), dtype=dtype, epochs=epochs,
        split_sizes=extracted.split_sizes, extract_seconds=extracted.seconds,
        epochs_end_to_end=[row["seconds"] for row in end_to_end.history],
        epochs_cached=[row["seconds"] for row in from_cache.history],
        max_abs_weight_diff=diff, max_abs_weight_diff_timed_runs=_max_abs_diff(from_cache.last_state,
                                                                              end_to_end.last_state),
        out=Path(out) if out is not None else None, environment=environment())
    if out is not None:
        write_bench(result, Path(out))
    if not diff <= WEIGHT_TOLERANCE:  # also catches NaN
        raise EquivalenceError(
            f"cached and end-to-end training disagree: after {CHECK_STEPS} steps their head weights differ by "
            f"{diff:.3g} (tolerance {WEIGHT_TOLERANCE:g}), so the cache does not hold what the backbone computes in "
            "training. Check that spec.encode is deterministic and padding-invariant (NOTE [ Padding "
            "invariance ] in headcache/spec.py) and that the backbone has no active dropout")
    return result


def check_run(cached: CachedFeatures, live: LiveFeatures, config: TrainConfig, splits: tuple,
              num_classes: int) -> float:
    """Largest difference between the final head weights of one short run on each source: the first
    CHECK_STEPS batches of the train split, the first CHECK_VAL_ITEMS of validation, one epoch."""
    train_split, val_split, _ = splits

    def first(split: str, n: int) -> torch.Tensor:
        return torch.arange(min(len(cached.labels(split)), n))

    task = HeadTask(replace(config, epochs=1, patience=2), (train_split, first(train_split, CHECK_STEPS *
                    config.batch_size)), (val_split, first(val_split, CHECK_VAL_ITEMS)))
    [a], [b] = (fit(source, [task], num_classes=num_classes, hidden_dim=cached.hidden_dim) for source in (cached, live))
    return _max_abs_diff(a.last_state, b.last_state)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


class FirstItems:
    """A spec whose splits hold only their first ``limit`` items; everything else is the spec's."""

    def __init__(self, spec: Any, limit: int):
        self.spec, self.limit = spec, limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spec, name)

    def dataset(self, split: str) -> "_Prefix":
        return _Prefix(self.spec.dataset(split), self.limit)


class _Prefix(torch.utils.data.Dataset):
    """The first ``limit`` items of a dataset, with its ``lengths`` and ``labels`` cut to match."""

    def __init__(self, dataset: Any, limit: int):
        self.dataset, self.n = dataset, min(limit, len(dataset))
        for name in ("lengths", "labels"):
            known = getattr(dataset, name, None)
            if known is not None:
                setattr(self, name, (lambda known=known: list(known())[:self.n]) if callable(known)
                        else list(known)[:self.n])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]


def environment() -> dict[str, str]:
    """Machine and versions, for the record."""
    info = {"headcache": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_bench(result: BenchResult, out: Path) -> None:
    """bench.json and bench.png in ``out``."""
    write_json(out / "bench.json", result.to_dict())  # whole or not at all, a full disk a named error
    plot_bench(result, out / "bench.png")


def plot_bench(result: BenchResult, path: Path) -> None:
    """Cumulative seconds against epochs for both paths, with the break-even epoch marked."""
    even = result.break_even_epochs
    horizon = max(PROJECTED_EPOCHS[-1], 2 * even if even else 0)
    epochs = list(range(horizon + 1))
    figure, [ax] = new_figure((7, 4.5))
    ax.plot(epochs, [e * result.epoch_seconds_end_to_end for e in epochs], label="end to end (backbone every step)")
    ax.plot(epochs, [result.extract_seconds + e * result.epoch_seconds_cached for e in epochs],
            label="extract once + cached epochs")
    if even is not None:
        ax.axvline(even, color="grey", linestyle=":")
        ax.annotate(f"break-even: {even} epoch{'s' if even > 1 else ''}", (even, result.extract_seconds),
                    xytext=(6, 12), textcoords="offset points")
    ax.set_xlabel("epochs")
    ax.set_ylabel("cumulative seconds")
    ax.set_title(f"{result.spec}, {result.pool} pool: {result.speedup_at(50):.0f}x faster at 50 epochs "
                 f"(measured over {result.epochs})")
    ax.legend()
    save_figure(figure, path)
