"""Many heads from one cache: grid sweeps and stratified cross-validation.

Both turn their settings into a list of heads, group the heads that can share
one bank (equal `bank_key`: same features, same batch size; and the same
splits), and train each group with ONE call of `train.fit`: one forward and
one backward per step for all heads of the group, each head with its own lr,
weight decay, schedule, early stopping, seeds and best weights. A head trained
here is therefore the head that `train` trains with the same config and seed
(the tests hold it to 1e-5). Every head gets a run directory in `train`'s
format, under ``OUT/runs/<run name>/``.

Run names spell the grid values and the seed, e.g. ``lr=1e-3_head=mlp_seed=0``,
with the values as they were given.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from headcache.errors import ConfigError
from headcache.features import CachedFeatures
from headcache.metrics import bootstrap_intervals, classification_metrics
from headcache.spec import resolve_device
from headcache.train import (FitResult, HeadTask, TrainConfig, bank_key, config_from_options, fit, head_checkpoint,
                             head_from_checkpoint, num_classes_of, predict_split, prepare_out_dir, resolve_splits,
                             save_run, write_config)

EpochHook = Callable[[int, dict[str, dict]], None]
GRID_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")
CV_SPLIT_KEYS = ("train_split", "val_split")  # the folds are cut from `splits`; these mean nothing in cv
METRIC_KEYS = ("auroc", "auprc")


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
    seeds = _check_seeds(seeds)
    heads: list[Head] = []
    seen: dict[TrainConfig, str] = {}
    for combination in itertools.product(*(list(values) for values in grid.values())):
        texts = tuple((key, str(value)) for key, value in zip(keys, combination))
        options = dict(zip(keys, combination))
        for seed in seeds:
            config = config_from_options({**options, "seed": seed}, base)
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


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be integers >= 0, at least one; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds} repeat a seed; give each once")
    return seeds


# ---------------------------------------------------------------------------- banks


class _Sources:
    """One feature source per (pool, device, memory budget), opened when first asked for."""

    def __init__(self, cache: str | Path):
        self.cache = cache
        self._open: dict[tuple, CachedFeatures] = {}

    @staticmethod
    def key(config: TrainConfig) -> tuple:
        return config.pool, resolve_device(config.device), config.memory_budget

    def __call__(self, config: TrainConfig) -> CachedFeatures:
        key = self.key(config)
        if key not in self._open:
            self._open[key] = CachedFeatures(self.cache, pool=key[0], device=key[1], memory_budget=key[2])
        return self._open[key]


@dataclass
class _Bank:
    """Heads trained as one batched computation, and the tasks (their rows) they train on."""

    heads: list[str] = field(default_factory=list)
    tasks: list[HeadTask] = field(default_factory=list)


def _train_banks(sources: _Sources, banks: list[_Bank], *, num_classes: int, hidden_dim: int,
                 on_epoch: EpochHook | None) -> dict[str, FitResult]:
    """One `fit` per bank: the results of every head, by name."""
    results: dict[str, FitResult] = {}
    for bank in banks:
        hook = None if on_epoch is None else _named(on_epoch, bank.heads)
        fitted = fit(sources(bank.tasks[0].config), bank.tasks, num_classes=num_classes, hidden_dim=hidden_dim,
                     on_epoch=hook)
        results.update(zip(bank.heads, fitted))
    return results


def _named(on_epoch: EpochHook, names: list[str]) -> Callable[[int, list[dict]], None]:
    """fit's epoch hook (a row per head, empty once stopped) as {run name: row} of the heads still training."""
    def hook(epoch: int, rows: list[dict]) -> None:
        on_epoch(epoch, {name: row for name, row in zip(names, rows) if row})
    return hook


def _group(items: Iterable[tuple[tuple, str, HeadTask]]) -> list[_Bank]:
    """Banks from (key, head name, task) triples: heads with equal keys share one, in order of first appearance."""
    banks: dict[tuple, _Bank] = {}
    for key, name, task in items:
        bank = banks.setdefault(key, _Bank())
        bank.heads.append(name)
        bank.tasks.append(task)
    return list(banks.values())


def _every(source: CachedFeatures, split: str) -> torch.Tensor:
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
          on_epoch: EpochHook | None = None) -> SweepResult:
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
        Write into an ``out`` that holds files.
    on_epoch : callable, optional
        Called after each epoch of each bank with (epoch, {run name: history row}) for the heads
        still training.

    Raises
    ------
    ConfigError
        A grid key or value is invalid (checked before anything trains).

    Example
    -------
    >>> result = sweep("cache/demo/cache.h5", "sweeps/lr", {"lr": ["1e-4", "1e-3"]}, seeds=[0, 1])  # doctest: +SKIP
    >>> result.best["run"], result.best["val_auroc"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    heads = expand_grid(grid, seeds, base)
    sources = _Sources(cache)
    first = sources(heads[0].config)
    splits = {head.name: resolve_splits(head.config, first.splits) for head in heads}
    out = prepare_out_dir(out, overwrite)
    for head in heads:
        run_dir = out / "runs" / head.name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, head.config, cache=str(cache), splits=splits[head.name],
                     fingerprint=first.backbone_fingerprint, sweep={"run": head.name, "grid": dict(head.texts)})
    every_split = {s for names in splits.values() for s in names if s}
    num_classes = num_classes_of(first, sorted(every_split))
    banks = _group(((bank_key(h.config), splits[h.name], _Sources.key(h.config)), h.name,
                    HeadTask(h.config, *_split_rows(first, splits[h.name]))) for h in heads)
    results = _train_banks(sources, banks, num_classes=num_classes, hidden_dim=first.hidden_dim, on_epoch=on_epoch)

    for head in heads:
        _save(out / "runs" / head.name, results[head.name], first, num_classes,
              {role: first.ids(split) for role, split in zip(("val", "test"), splits[head.name][1:]) if split})
    keys = [key for key, _ in heads[0].texts]
    rows = _sorted([{"run": head.name, **dict(head.values), "seed": head.seed,
                     **_result_columns(results[head.name])} for head in heads], "val_auroc")
    _write_table(out / "leaderboard", rows)
    best = next(h for h in heads if h.name == rows[0]["run"])
    _write_json(out / "best_config.json", {"run": best.name, "train": best.config.to_dict(),
                                           **{k: v for k, v in rows[0].items() if k.startswith(("val_", "test_"))}})
    plot_leaderboard(rows, out / "sweep.png", title=f"sweep over {', '.join(keys) or 'seeds'}: "
                     f"{len(rows)} heads, {len(banks)} bank{'s' if len(banks) != 1 else ''}")
    return SweepResult(out, rows, [b.heads for b in banks], results, time.perf_counter() - started)


def _split_rows(source: CachedFeatures, splits: tuple) -> tuple:
    """HeadTask's (train, val, test) arguments: every row of each split."""
    train, val, test = splits
    return (train, _every(source, train)), (val, _every(source, val)), ((test, _every(source, test)) if test else None)


def _save(run_dir: Path, result: FitResult, source: CachedFeatures, num_classes: int, ids: dict) -> None:
    save_run(run_dir, result, hidden_dim=source.hidden_dim, num_classes=num_classes,
             fingerprint=source.backbone_fingerprint, ids=ids)


def _result_columns(result: FitResult) -> dict:
    """best_epoch, epochs_run and, per split and metric, the value and its 95% interval."""
    columns: dict[str, Any] = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    for role in ("val", "test"):
        columns.update(_metric_columns(role, result.metrics.get(role, {})))
    return columns


def _metric_columns(prefix: str, metrics: dict) -> dict:
    columns = {}
    for metric in METRIC_KEYS:
        low, high = metrics.get(f"{metric}_ci") or (None, None)
        columns.update({f"{prefix}_{metric}": _finite(metrics.get(metric)),
                        f"{prefix}_{metric}_ci_low": low, f"{prefix}_{metric}_ci_high": high})
    columns[f"{prefix}_accuracy"] = metrics.get("accuracy")
    return columns


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _sorted(rows: list[dict], key: str) -> list[dict]:
    """Best ``key`` first; rows without a value last, in their order."""
    return sorted(rows, key=lambda row: (row[key] is None, -(row[key] or 0.0)))


def _write_table(stem: Path, rows: list[dict]) -> None:
    """``stem``.csv and ``stem``.json of the same rows."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    _write_json(stem.with_suffix(".json"), rows)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


def plot_leaderboard(rows: list[dict], path: Path, *, title: str, metric: str = "val_auroc",
                     label: str = "run") -> None:
    """Each row's ``metric`` with its 95% interval, best at the top (rows without a value are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.get(metric) is not None][::-1]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * max(1, len(shown))))
    values = np.array([row[metric] for row in shown], dtype=float)
    low, high = (np.array([row[metric] if row.get(f"{metric}_{end}") is None else row[f"{metric}_{end}"]
                           for row in shown], dtype=float) for end in ("ci_low", "ci_high"))
    positions = np.arange(len(shown))
    ax.errorbar(values, positions, xerr=np.stack([values - low, high - values]), fmt="o", capsize=3)
    ax.set_yticks(positions, [str(row[label]) for row in shown], fontsize=8)
    ax.set_xlabel(f"{metric.replace('_', ' ')} (95% bootstrap interval)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- cross-validation


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. folds - 1) of each item: scikit-learn's StratifiedKFold, shuffled with ``seed``."""
    from sklearn.model_selection import StratifiedKFold  # imported here: see headcache.metrics

    fold_of = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held_out] = fold
    return fold_of


@dataclass
class CVResult:
    """What `cross_validate` returns.

    Attributes
    ----------
    out : Path
    summary : list of dict
        One row per (grid point, seed): mean and std over the folds, out-of-fold
        metrics with 95% intervals, and the refit's test metrics; best mean val AUROC first.
    folds : list of dict
        One row per fold head.
    fold_of : dict of int to ndarray
        Per seed, the fold of each item of the joined split.
    joined : str
        The split the folds are cut from (e.g. "train+valid").
    banks : list of list of str
        Fold heads trained together, one `fit` each.
    seconds : float
    """

    out: Path
    summary: list[dict]
    folds: list[dict]
    fold_of: dict[int, np.ndarray]
    joined: str
    banks: list[list[str]]
    seconds: float

    @property
    def best(self) -> dict:
        return self.summary[0]


def cross_validate(cache: str | Path, out: str | Path, *, folds: int = 5, splits: Sequence[str] | None = None,
                   base: TrainConfig = TrainConfig(), grid: Mapping[str, Sequence[Any]] | None = None,
                   seeds: Sequence[int] = (0,), refit: bool = False, overwrite: bool = False,
                   on_epoch: EpochHook | None = None) -> CVResult:
    """Stratified K-fold cross-validation over the joined ``splits``, every fold head in as few banks as possible.

    For each seed the items of the joined split (e.g. ``train+valid``) are cut
    into ``folds`` stratified folds (`stratified_folds`); each fold head trains
    on the other folds and is early-stopped and scored on its own fold, so the
    per-fold val metrics choose the epoch on the data they score (mildly
    optimistic); the refit's test metrics are the unbiased number. All fold
    heads of all grid points and seeds that share a `bank_key` train as one
    batched computation. Note: `fit` runs as many steps per epoch as the
    smallest fold's training rows allow, so a fold head may take one step per
    epoch fewer than it would alone.

    Parameters
    ----------
    cache, out : str or Path
        ``out`` gets ``runs/<run>_fold=<f>/`` per fold head, ``cv_folds.csv``,
        ``cv_summary.csv`` (+ .json), ``oof.csv`` (config, seed, id, fold, label,
        p0.. from each fold's best weights), ``cv.png``, ``best_config.json``
        and, with ``refit``, ``refit/<run>/``.
    folds : int
        K >= 2; every class of the joined split needs at least K items.
    splits : sequence of str, optional
        The splits joined and cut into folds (default: the train split and the cache's val split).
    base : TrainConfig
    grid : dict of str to list, optional
        As for `sweep`; each grid point is cross-validated.
    seeds : sequence of int
        Each seed cuts its own folds (random_state=seed) and seeds its heads: repeated K-fold.
    refit : bool
        Also train each (grid point, seed) on every row of the joined split for
        the mean best epoch count of its folds, keep the last weights and score them on the test split.
    overwrite : bool
    on_epoch : callable, optional
        As for `sweep`.

    Raises
    ------
    ConfigError
        Bad folds, splits, grid or seeds (checked before anything trains).
    """
    started = time.perf_counter()
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"The 'folds' parameter must be an integer >= 2. Got {folds!r} instead.")
    configs = expand_grid(grid, seeds, base, refuse=CV_SPLIT_KEYS)
    sources = _Sources(cache)
    first = sources(configs[0].config)
    splits = _cv_splits(splits, base, first.splits)
    joined = "+".join(splits)
    labels = first.labels(joined).cpu().numpy()
    _check_folds(labels, folds, joined)
    fold_of = {seed: stratified_folds(labels, folds, seed) for seed in _check_seeds(seeds)}
    tests = {h.name: _cv_test_split(h.config, first.splits, splits) for h in configs}
    num_classes = num_classes_of(first, [joined] + sorted({t for t in tests.values() if t}))
    out = prepare_out_dir(out, overwrite)

    items = []
    for head in configs:
        test = tests[head.name]
        for fold in range(folds):
            held_out = fold_of[head.seed] == fold
            name = f"{head.name}_fold={fold}"
            task = HeadTask(head.config, (joined, torch.from_numpy(np.flatnonzero(~held_out))),
                            (joined, torch.from_numpy(np.flatnonzero(held_out))),
                            (test, _every(first, test)) if test else None)
            run_dir = out / "runs" / name
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, head.config, cache=str(cache), splits=[joined, joined, test],
                         fingerprint=first.backbone_fingerprint,
                         cv={"fold": fold, "folds": folds, "splits": splits, "seed": head.seed,
                             "train_rows": int((~held_out).sum()), "val_rows": int(held_out.sum())})
            items.append(((bank_key(head.config), test, _Sources.key(head.config)), name, task))
    banks = _group(items)
    results = _train_banks(sources, banks, num_classes=num_classes, hidden_dim=first.hidden_dim, on_epoch=on_epoch)

    ids = first.ids(joined)
    fold_rows, summary, oof = [], [], []
    for head in configs:
        test = tests[head.name]
        held = [np.flatnonzero(fold_of[head.seed] == fold) for fold in range(folds)]
        fitted = [results[f"{head.name}_fold={fold}"] for fold in range(folds)]
        for fold, (rows, result) in enumerate(zip(held, fitted)):
            _save(out / "runs" / f"{head.name}_fold={fold}", result, first, num_classes,
                  {"val": [ids[i] for i in rows], **({"test": first.ids(test)} if test else {})})
            fold_rows.append({"run": f"{head.name}_fold={fold}", "config": head.label, **dict(head.values),
                              "seed": head.seed, "fold": fold, **_result_columns(result)})
        probs = np.empty((len(labels), num_classes))
        for rows, result in zip(held, fitted):
            probs[rows] = result.predictions["val"]
        oof += [[head.label, head.seed, ids[i], int(fold_of[head.seed][i]), int(labels[i]), *probs[i]]
                for i in range(len(labels))]
        summary.append({"config": head.label, **dict(head.values), "seed": head.seed, "folds": folds,
                        **_fold_statistics(fitted), **_metric_columns("oof", _scored(probs, labels, head.seed))})

    if refit:
        _refit(out, cache, sources, configs, summary, joined, tests, num_classes, on_epoch)
    summary = _sorted(summary, "val_auroc_mean")
    _write_table(out / "cv_folds", fold_rows)
    _write_table(out / "cv_summary", summary)
    _write_oof(out / "oof.csv", oof, num_classes)
    best = next(h for h in configs if (h.label, h.seed) == (summary[0]["config"], summary[0]["seed"]))
    _write_json(out / "best_config.json", {"config": best.label, "seed": best.seed, "train": best.config.to_dict(),
                                           **{k: v for k, v in summary[0].items()
                                              if k.startswith(("val_", "test_", "oof_", "refit_"))}})
    plot_leaderboard([{**row, "label": f"{row['config']} seed={row['seed']}"} for row in summary], out / "cv.png",
                     metric="oof_auroc", label="label",
                     title=f"{folds}-fold cv on {joined}: out-of-fold AUROC of {len(summary)} configs")
    return CVResult(out, summary, fold_rows, fold_of, joined, [b.heads for b in banks], time.perf_counter() - started)


def _cv_splits(splits: Sequence[str] | None, base: TrainConfig, available: Sequence[str]) -> list[str]:
    """The splits to join: as given, or the train split and the cache's val split."""
    if splits is None:
        train, val, _ = resolve_splits(base, available)
        return [train, val]
    splits = list(splits)
    if not splits or len(set(splits)) != len(splits):
        raise ConfigError(f"--splits {','.join(splits)!r}: name one or more distinct splits, e.g. --splits train,valid")
    missing = [s for s in splits if s not in available]
    if missing:
        raise ConfigError(f"--splits: the cache has no split {missing[0]!r} (it has {', '.join(available)})")
    return splits


def _cv_test_split(config: TrainConfig, available: Sequence[str], joined: Sequence[str]) -> str | None:
    """The config's test split when the cache has it and it is not among the cv splits."""
    test = config.test_split
    return test if test in available and test not in joined else None


def _check_folds(labels: np.ndarray, folds: int, joined: str) -> None:
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ConfigError(f"{joined} holds one class only; cross-validation needs two or more")
    if counts.min() < folds:
        raise ConfigError(f"--folds {folds}: class {classes[counts.argmin()]} of {joined} has only "
                          f"{counts.min()} items, fewer than the folds; lower --folds")


def _fold_statistics(fitted: list[FitResult]) -> dict:
    """Mean and standard deviation (ddof 1) over the folds of each split's metrics, and the mean best epoch."""
    columns: dict[str, Any] = {"best_epoch_mean": float(np.mean([r.best_epoch for r in fitted]))}
    for role in ("val", "test"):
        for metric in METRIC_KEYS:
            values = [r.metrics.get(role, {}).get(metric) for r in fitted]
            ok = all(v is not None and math.isfinite(v) for v in values)
            columns[f"{role}_{metric}_mean"] = float(np.mean(values)) if ok else None
            columns[f"{role}_{metric}_std"] = float(np.std(values, ddof=1)) if ok else None
    return columns


def _scored(probs: np.ndarray, labels: np.ndarray, seed: int, split: str = "out-of-fold") -> dict:
    """classification_metrics with seeded 95% bootstrap intervals."""
    return {**classification_metrics(probs, labels, split=split), **bootstrap_intervals(probs, labels, seed=seed)}


def _refit(out: Path, cache: str | Path, sources: _Sources, configs: list[Head], summary: list[dict], joined: str,
           tests: dict[str, str | None], num_classes: int, on_epoch: EpochHook | None) -> None:
    """Train each (grid point, seed) on all of ``joined`` for its folds' mean best epoch count; score the last
    weights on the test split. Adds refit_* columns to ``summary``'s rows (same order as ``configs``)."""
    first = sources(configs[0].config)
    every = _every(first, joined)
    items = []
    for head, row in zip(configs, summary):
        epochs = max(1, round(row["best_epoch_mean"] + 1))
        config = replace(head.config, epochs=epochs, patience=epochs)  # no early stopping: the folds chose
        row["refit_epochs"] = epochs
        run_dir = out / "refit" / head.name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config, cache=str(cache), splits=[joined, None, tests[head.name]],
                     fingerprint=first.backbone_fingerprint,
                     refit={"epochs": epochs, "mean_best_epoch": row["best_epoch_mean"], "weights": "last",
                            "note": "no held-out rows: history's val columns score the training rows"})
        items.append(((bank_key(config), _Sources.key(config)), head.name, HeadTask(config, (joined, every),
                                                                                     (joined, every))))
    banks = _group(items)
    results = _train_banks(sources, banks, num_classes=num_classes, hidden_dim=first.hidden_dim, on_epoch=on_epoch)
    for head, row in zip(configs, summary):
        result = results[head.name]
        test = tests[head.name]
        source = sources(head.config)
        checkpoint = head_checkpoint(result, result.last_state, result.epochs_run - 1, first.hidden_dim,
                                     num_classes, first.backbone_fingerprint)
        metrics, predictions = {}, {}
        if test:
            probs = predict_split(head_from_checkpoint(checkpoint).to(source.device), source, test,
                                  _every(source, test))[0].cpu().numpy()
            y = source.labels(test).cpu().numpy()
            metrics, predictions = {"test": _scored(probs, y, head.seed, test)}, {"test": probs}
        last = replace(result, best_state=result.last_state, best_epoch=result.epochs_run - 1,
                       best_value=math.nan, metrics=metrics, predictions=predictions)
        _save(out / "refit" / head.name, last, first, num_classes, {"test": first.ids(test)} if test else {})
        row.update(_metric_columns("refit_test", metrics.get("test", {})))


def _write_oof(path: Path, rows: list[list], num_classes: int) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["config", "seed", "id", "fold", "label"] + [f"p{c}" for c in range(num_classes)])
        writer.writerows(row[:5] + [f"{p:.6g}" for p in row[5:]] for row in rows)
