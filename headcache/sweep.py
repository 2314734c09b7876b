"""Grid sweeps: many heads from one cache, as few batched computations as the grid allows.

This module also holds what cv.py shares with it: the heads of a grid
(`expand_grid`) and banks (`group_banks`, `train_banks`); the tables and plots
of both are rundir.py's. Both turn their settings into a list of heads, group
the heads that can share one bank (equal `bank_key`: same features, same batch
size; and the same splits), and train each group with ONE call of `train.fit`: one forward and
one backward per step for all heads of the group, each head with its own lr,
weight decay, schedule, early stopping, seeds and best weights. A head trained
here is therefore the head that `train` trains with the same config and seed
(the tests hold it to 1e-5). Every head gets a run directory in `train`'s
format, under ``OUT/runs/<run name>/``.

Run names spell the grid values and the seed, e.g. ``lr=1e-3_head=mlp_seed=0``,
with the values as they were given.
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from headcache.config import TrainConfig, config_from_options
from headcache.devices import resolve_device
from headcache.distributed import Ranks
from headcache.errors import ConfigError
from headcache.features import CachedFeatures
from headcache.rundir import (
    SWEEP,
    Output,
    SweepRun,
    best_first,
    plot_layer_curve,
    plot_leaderboard,
    result_columns,
    save_run,
    write_json,
    write_record,
    write_table,
)
from headcache.train import (
    FitResult,
    HeadTask,
    bank_key,
    fit,
    layer_view,
    num_classes_of,
    require_classes,
    resolve_splits,
    run_record,
)

EpochHook = Callable[[int, dict[str, dict]], None]
GRID_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")


# ---------------------------------------------------------------------------- heads from a grid


@dataclass(frozen=True)
class Head:
    """One head to train: its grid values (as given and as parsed), its seed and its config."""

    texts: tuple[tuple[str, str], ...]
    values: tuple[tuple[str, Any], ...]
    seed: int
    config: TrainConfig

    @property
    def label(self) -> str:
        """The grid part of the run name ("base" for an empty grid)."""
        return "_".join(f"{key}={_slug(text)}" for key, text in self.texts) or "base"

    @property
    def name(self) -> str:
        return f"{self.label}_seed={self.seed}" if self.texts else f"seed={self.seed}"


def _slug(text: str) -> str:
    """A value as it can sit in a directory name."""
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


def expand_grid(grid: Mapping[str, Sequence[Any]] | None, seeds: Sequence[int], base: TrainConfig, *,
                refuse: Sequence[str] = ()) -> list[Head]:
    """The heads of a grid: the cartesian product of its values times ``seeds``, in that order.

    Every key and value is checked before anything trains: an unknown key, an
    empty or repeated value list, a bad value or two heads with the same config
    raise ConfigError naming the key.
    """
    grid = dict(grid or {})
    keys = [key.replace("-", "_") for key in grid]
    for key, given in zip(keys, grid):
        if key == "seed":
            raise ConfigError("grid key 'seed': give the seeds with --seeds (seeds=...) instead")
        if key in refuse:
            raise ConfigError(f"grid key {given!r} has no meaning here; leave it out of the grid")
        if key not in GRID_KEYS:
            valid = [k for k in GRID_KEYS if k not in refuse]
            raise ConfigError(f"unknown grid key {given!r}; valid keys: {', '.join(valid)}")
        values = grid[given]
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or not list(values):
            raise ConfigError(f"grid key {given!r} needs a list of values, e.g. --grid {given}=V1,V2")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"grid keys {', '.join(grid)} name one setting twice; give each once")
    seeds = check_seeds(seeds)
    heads: list[Head] = []
    seen: dict[TrainConfig, str] = {}
    for combination in itertools.product(*(list(values) for values in grid.values())):
        texts = tuple((key, str(value)) for key, value in zip(keys, combination))
        options = dict(zip(keys, combination))
        for seed in seeds:
            try:
                config = config_from_options({**options, "seed": seed}, base)
            except ConfigError as exc:  # the flag's own message, and the grid point that gave the value
                point = ",".join(f"{key}={text}" for key, text in texts)
                raise ConfigError(f"--grid {point}: {exc}") from None
            head = Head(texts, tuple((key, getattr(config, key)) for key in keys), seed, config)
            if config in seen:
                raise ConfigError(f"grid heads {seen[config]} and {head.name} have the same config; "
                                  "remove the repeated value")
            seen[config] = head.name
            heads.append(head)
    names = [head.name for head in heads]
    if len(set(names)) != len(names):
        clash = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"two grid values both spell the run name {clash!r}; write them differently")
    return heads


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"--seeds: seeds must be integers >= 0, at least one; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))} repeats a seed; give each once")
    return seeds


# ---------------------------------------------------------------------------- banks


class FeatureSources:
    """One feature source per (pool, device, memory budget, layer view), opened when first asked for.

    The layer view is a bank's (`train.layer_view`): heads reading different layers, or a layer mix,
    share one source that keeps every layer, a layer being a slice of the same on-device matrix.
    """

    def __init__(self, cache: str | Path):
        self.cache = cache
        self._open: dict[tuple, CachedFeatures] = {}

    @staticmethod
    def key(config: TrainConfig) -> tuple:
        return config.pool, resolve_device(config.device), config.memory_budget

    def __call__(self, config: TrainConfig, layer: int | str = "last") -> CachedFeatures:
        key = self.key(config) + (layer,)
        if key not in self._open:
            self._open[key] = CachedFeatures(self.cache, pool=key[0], device=key[1], memory_budget=key[2],
                                             layer=layer)
        return self._open[key]


@dataclass
class Bank:
    """Heads trained as one batched computation, and the tasks (their rows) they train on."""

    heads: list[str] = field(default_factory=list)
    tasks: list[HeadTask] = field(default_factory=list)


def train_banks(sources: FeatureSources, banks: list[Bank], *, num_classes: int, hidden_dim: int,
                on_epoch: EpochHook | None, ranks: Ranks | None = None) -> dict[str, FitResult] | None:
    """One `fit` per bank: the results of every head, by name.

    Under torchrun (``ranks``), each rank trains its share of the banks on its own device and rank 0
    receives every result (the others get None). A bank's computation does not depend on which rank
    runs it, so the results are those of one process on the same kind of device.
    """
    results: dict[str, FitResult] = {}
    for bank in banks if ranks is None else ranks.mine(banks):
        tasks = bank.tasks if ranks is None else [
            replace(task, config=replace(task.config, device=ranks.device(task.config.device))) for task in bank.tasks]
        hook = None if on_epoch is None else _named(on_epoch, bank.heads)
        source = sources(tasks[0].config, layer_view([task.config for task in tasks]))
        fitted = fit(source, tasks, num_classes=num_classes, hidden_dim=hidden_dim, on_epoch=hook)
        for result, task in zip(fitted, bank.tasks):
            result.config = task.config  # the config as asked, not this rank's device
        results.update(zip(bank.heads, fitted))
    return results if ranks is None else ranks.gather(results)


def _named(on_epoch: EpochHook, names: list[str]) -> Callable[[int, list[dict]], None]:
    """fit's epoch hook (a row per head, empty once stopped) as {run name: row} of the heads still training."""
    def hook(epoch: int, rows: list[dict]) -> None:
        on_epoch(epoch, {name: row for name, row in zip(names, rows) if row})
    return hook


def group_banks(items: Iterable[tuple[tuple, str, HeadTask]]) -> list[Bank]:
    """Banks from (key, head name, task) triples: heads with equal keys share one, in order of first appearance."""
    banks: dict[tuple, Bank] = {}
    for key, name, task in items:
        bank = banks.setdefault(key, Bank())
        bank.heads.append(name)
        bank.tasks.append(task)
    return list(banks.values())


def every_row(source: CachedFeatures, split: str) -> torch.Tensor:
    return torch.arange(len(source.labels(split)))


# ---------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    """What `sweep` returns.

    Attributes
    ----------
    out : Path
    leaderboard : list of dict
        One row per head, best val AUROC first (heads without one last).
    banks : list of list of str
        Run names trained together, one `fit` (one batched computation) each.
    results : dict of str to FitResult
    seconds : float
    """

    out: Path
    leaderboard: list[dict]
    banks: list[list[str]]
    results: dict[str, FitResult]
    seconds: float

    @property
    def best(self) -> dict:
        return self.leaderboard[0]


def sweep(cache: str | Path, out: str | Path, grid: Mapping[str, Sequence[Any]] | None, *,
          seeds: Sequence[int] = (0,), base: TrainConfig = TrainConfig(), overwrite: bool = False,
          on_epoch: EpochHook | None = None, ranks: Ranks | None = None) -> SweepResult | None:
    """Train every head of a grid, as few batched computations as the grid allows.

    Parameters
    ----------
    cache : str or Path
        The cache file.
    out : str or Path
        Gets ``runs/<run>/`` per head (`train`'s files), ``leaderboard.csv``,
        ``leaderboard.json``, ``sweep.png`` and ``best_config.json``.
    grid : dict of str to list
        TrainConfig field -> values (text, converted as the CLI converts it).
    seeds : sequence of int
        Every grid point is trained once per seed.
    base : TrainConfig
        The settings the grid does not name.
    overwrite : bool
        Replace a complete sweep at ``out`` (only once the new one is complete; an unfinished
        one is replaced without it). See NOTE [ Finished run directories ] in rundir.py.
    on_epoch : callable, optional
        Called after each epoch of each bank with (epoch, {run name: history row}) for the heads
        still training.
    ranks : Ranks, optional
        Under torchrun (`distributed.torchrun_ranks`): the banks are spread over the ranks and rank 0
        writes everything; the other ranks return None.

    Raises
    ------
    ConfigError
        A grid key or value is invalid (checked before anything trains).
    OutputExistsError
        ``out`` holds a complete sweep and ``overwrite`` is False, or files headcache did not write.
    RunInterrupted
        Ctrl-C (or SIGTERM from the CLI): its message says what was kept.

    Example
    -------
    >>> result = sweep("cache/demo/cache.h5", "sweeps/lr", {"lr": ["1e-4", "1e-3"]}, seeds=[0, 1])  # doctest: +SKIP
    >>> result.best["run"], result.best["val_auroc"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    heads = expand_grid(grid, seeds, base)
    sources = FeatureSources(cache)
    first = sources(heads[0].config)
    splits = {head.name: resolve_splits(head.config, first.splits) for head in heads}
    for train_split in sorted({names[0] for names in splits.values()}):
        require_classes(first.labels(train_split), train_split)
    num_classes = num_classes_of(first, sorted({s for names in splits.values() for s in names if s}))
    banks = group_banks(((bank_key(h.config), splits[h.name], FeatureSources.key(h.config)), h.name,
                         HeadTask(h.config, *_split_rows(first, splits[h.name]))) for h in heads)
    if ranks is not None and ranks.rank > 0:  # a helper rank: its results go to rank 0, which writes
        train_banks(sources, banks, num_classes=num_classes, hidden_dim=first.hidden_dim, on_epoch=None,
                    ranks=ranks)
        return None
    output = Output(out, SWEEP, overwrite=overwrite)
    records = {h.name: run_record(first, h.config, splits[h.name], num_classes, SweepRun(h.name, dict(h.texts)))
               for h in heads}
    with output as folder:
        for head in heads:
            (folder / "runs" / head.name).mkdir(parents=True)
            write_record(folder / "runs" / head.name, records[head.name])
        results = train_banks(sources, banks, num_classes=num_classes, hidden_dim=first.hidden_dim,
                              on_epoch=on_epoch, ranks=ranks)
        for head in heads:
            save_run(folder / "runs" / head.name, results[head.name], records[head.name],
                     ids={role: first.ids(split) for role, split in zip(("val", "test"), splits[head.name][1:])
                          if split})
        keys = [key for key, _ in heads[0].texts]
        rows = best_first([{"run": head.name, **dict(head.values), "seed": head.seed,
                            **result_columns(results[head.name])} for head in heads], "val_auroc")
        write_table(folder / "leaderboard", rows)
        plot_leaderboard(rows, folder / "sweep.png", title=f"sweep over {', '.join(keys) or 'seeds'}: "
                         f"{len(rows)} heads, {len(banks)} bank{'s' if len(banks) != 1 else ''}")
        if "layer" in keys:
            plot_layer_curve(rows, folder / "layer_curve.png", title=f"the best head of each layer ({len(rows)} heads)")
        best = next(h for h in heads if h.name == rows[0]["run"])
        write_json(folder / SWEEP.last, {"run": best.name, "train": best.config.to_dict(),
                                         **{k: v for k, v in rows[0].items() if k.startswith(("val_", "test_"))}})
    return SweepResult(output.final, rows, [b.heads for b in banks], results, time.perf_counter() - started)


def _split_rows(source: CachedFeatures, splits: tuple) -> tuple:
    """HeadTask's (train, val, test) arguments: every row of each split."""
    train, val, test = splits
    return ((train, every_row(source, train)), (val, every_row(source, val)),
            ((test, every_row(source, test)) if test else None))
