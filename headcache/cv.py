"""Stratified K-fold cross-validation: every fold head of every grid point and seed in as few banks as possible.

The folds come from scikit-learn's StratifiedKFold over the joined splits;
the heads are grouped into banks and trained as in sweep.py, one `train.fit`
call per bank, and each fold head gets a run directory in `train`'s format.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from headcache.config import CVConfig, TrainConfig
from headcache.errors import ConfigError
from headcache.metrics import bootstrap_intervals, classification_metrics
from headcache.rundir import (
    CV,
    METRIC_KEYS,
    FoldRun,
    Output,
    RefitRun,
    best_first,
    head_checkpoint,
    head_from_checkpoint,
    metric_columns,
    plot_leaderboard,
    result_columns,
    save_run,
    write_csv,
    write_json,
    write_record,
    write_table,
)
from headcache.sweep import (
    EpochHook,
    FeatureSources,
    Head,
    check_seeds,
    every_row,
    expand_grid,
    group_banks,
    train_banks,
)
from headcache.train import (
    FitResult,
    HeadTask,
    bank_key,
    layer_view,
    num_classes_of,
    predict_split,
    require_labels,
    resolve_splits,
    run_record,
    unlabelled_count,
)

CV_SPLIT_KEYS = ("train_split", "val_split")  # the folds are cut from `splits`; these mean nothing in cv


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
        As for `sweep`: replace a complete cv directory once the new one is complete.
    on_epoch : callable, optional
        As for `sweep`.

    Raises
    ------
    ConfigError
        Bad folds, splits, grid or seeds (checked before anything trains).
    """
    started = time.perf_counter()
    CVConfig(folds=folds)  # checks it, before anything trains
    configs = expand_grid(grid, seeds, base, refuse=CV_SPLIT_KEYS)
    sources = FeatureSources(cache)
    first = sources(configs[0].config)
    splits = _cv_splits(splits, base, first.splits)
    joined = "+".join(splits)
    labels = first.labels(joined).cpu().numpy()
    require_labels(labels, joined, "--splits", use="cross-validation")  # NOTE [ Unlabelled items ] in train.py
    _check_folds(labels, folds, joined)
    fold_of = {seed: stratified_folds(labels, folds, seed) for seed in check_seeds(seeds)}
    tests = {h.name: _cv_test_split(h.config, first.splits, splits) for h in configs}
    num_classes = num_classes_of(first, [joined] + sorted({t for t in tests.values() if t}))
    output = Output(out, CV, overwrite=overwrite)

    items, records = [], {}
    for head in configs:
        test = tests[head.name]
        for fold in range(folds):
            held_out = fold_of[head.seed] == fold
            name = f"{head.name}_fold={fold}"
            task = HeadTask(head.config, (joined, torch.from_numpy(np.flatnonzero(~held_out))),
                            (joined, torch.from_numpy(np.flatnonzero(held_out))),
                            (test, every_row(first, test)) if test else None)
            records[name] = run_record(first, head.config, (joined, joined, test), num_classes,
                                       FoldRun(fold, folds, splits, head.seed, int((~held_out).sum()),
                                               int(held_out.sum())))
            items.append(((bank_key(head.config), test, FeatureSources.key(head.config)), name, task))
    with output as folder:
        for name, record in records.items():
            (folder / "runs" / name).mkdir(parents=True)
            write_record(folder / "runs" / name, record)
        banks = group_banks(items)
        results = train_banks(sources, banks, num_classes=num_classes, hidden_dim=first.hidden_dim,
                              on_epoch=on_epoch)

        ids = first.ids(joined)
        fold_rows, summary, oof = [], [], []
        for head in configs:
            test = tests[head.name]
            held = [np.flatnonzero(fold_of[head.seed] == fold) for fold in range(folds)]
            fitted = [results[f"{head.name}_fold={fold}"] for fold in range(folds)]
            for fold, (rows, result) in enumerate(zip(held, fitted)):
                name = f"{head.name}_fold={fold}"
                save_run(folder / "runs" / name, result, records[name],
                         ids={"val": [ids[i] for i in rows], **({"test": first.ids(test)} if test else {})})
                fold_rows.append({"run": name, "config": head.label, **dict(head.values),
                                  "seed": head.seed, "fold": fold, **result_columns(result)})
            probs = np.empty((len(labels), num_classes))
            for rows, result in zip(held, fitted):
                probs[rows] = result.predictions["val"]
            oof += [[head.label, head.seed, ids[i], int(fold_of[head.seed][i]), int(labels[i]), *probs[i]]
                    for i in range(len(labels))]
            summary.append({"config": head.label, **dict(head.values), "seed": head.seed, "folds": folds,
                            **_fold_statistics(fitted), **metric_columns("oof", _scored(probs, labels, head.seed))})

        if refit:
            _refit(folder, sources, configs, summary, joined, tests, num_classes, on_epoch)
        summary = best_first(summary, "val_auroc_mean")
        write_table(folder / "cv_folds", fold_rows)
        write_table(folder / "cv_summary", summary)
        _write_oof(folder / "oof.csv", oof, num_classes)
        plot_leaderboard([{**row, "label": f"{row['config']} seed={row['seed']}"} for row in summary],
                         folder / "cv.png", metric="oof_auroc", label="label",
                         title=f"{folds}-fold cv on {joined}: out-of-fold AUROC of {len(summary)} configs")
        best = next(h for h in configs if (h.label, h.seed) == (summary[0]["config"], summary[0]["seed"]))
        write_json(folder / CV.last, {"config": best.label, "seed": best.seed, "train": best.config.to_dict(),
                                      **{k: v for k, v in summary[0].items()
                                         if k.startswith(("val_", "test_", "oof_", "refit_"))}})
    return CVResult(output.final, summary, fold_rows, fold_of, joined, [b.heads for b in banks],
                    time.perf_counter() - started)


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


def _refit(folder: Path, sources: FeatureSources, configs: list[Head], summary: list[dict], joined: str,
           tests: dict[str, str | None], num_classes: int, on_epoch: EpochHook | None) -> None:
    """Train each (grid point, seed) on all of ``joined`` for its folds' mean best epoch count; score the last
    weights on the test split. Adds refit_* columns to ``summary``'s rows (same order as ``configs``)."""
    first = sources(configs[0].config)
    every = every_row(first, joined)
    items, records = [], {}
    for head, row in zip(configs, summary):
        epochs = max(1, round(row["best_epoch_mean"] + 1))
        config = replace(head.config, epochs=epochs, patience=epochs)  # no early stopping: the folds chose
        row["refit_epochs"] = epochs
        records[head.name] = run_record(first, config, (joined, None, tests[head.name]), num_classes,
                                        RefitRun(epochs, row["best_epoch_mean"]))
        (folder / "refit" / head.name).mkdir(parents=True)
        write_record(folder / "refit" / head.name, records[head.name])
        items.append(((bank_key(config), FeatureSources.key(config)), head.name, HeadTask(config, (joined, every),
                                                                                     (joined, every))))
    banks = group_banks(items)
    results = train_banks(sources, banks, num_classes=num_classes, hidden_dim=first.hidden_dim, on_epoch=on_epoch)
    for head, row in zip(configs, summary):
        result, record, test = results[head.name], records[head.name], tests[head.name]
        source = sources(head.config, layer_view([head.config]))  # the features the refit head reads
        metrics, predictions = {}, {}
        if test:
            checkpoint = head_checkpoint(result, result.last_state, result.epochs_run - 1, record)
            probs = predict_split(head_from_checkpoint(checkpoint).to(source.device), source, test,
                                  every_row(source, test))[0].cpu().numpy()
            y = source.labels(test).cpu().numpy()
            predictions = {"test": probs}  # an unlabelled test split: predictions only (fit has warned)
            metrics = {} if unlabelled_count(y) else {"test": _scored(probs, y, head.seed, test)}
        last = replace(result, best_state=result.last_state, best_epoch=result.epochs_run - 1,
                       best_value=math.nan, metrics=metrics, predictions=predictions)
        save_run(folder / "refit" / head.name, last, record, ids={"test": first.ids(test)} if test else {})
        row.update(metric_columns("refit_test", metrics.get("test", {})))


def _write_oof(path: Path, rows: list[list], num_classes: int) -> None:
    write_csv(path, ["config", "seed", "id", "fold", "label"] + [f"p{c}" for c in range(num_classes)],
               [row[:5] + [f"{p:.6g}" for p in row[5:]] for row in rows])
