"""Stage 2: ONE training loop, used by cached runs, end-to-end runs, sweeps and cv.

`fit` trains a bank of K heads (K = 1 for `train`) that read the same kind of
features with the same batch size. Each step is one forward and one backward
for all K heads; every head keeps its own learning rate, weight decay, cosine
schedule, gradient clipping, early stopping, sampler and random generators,
so head k of a bank computes what a bank holding only head k computes. The
features come from a source (features.py); the loop never knows which.

Defaults are the seed's classifier-head fine-tuning (DESIGN.md, "Training
defaults"): AdamW lr 5e-4, weight decay 1e-3; cosine per epoch with T_max =
epochs and eta_min = lr * 1e-3; batch 16, shuffled, drop_last on train;
gradient norm clipped at 0.05; monitor val AUROC with patience 8 and
min_delta 5e-4; keep the best and the last weights.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import numpy.random  # noqa: F401  (not on first use in `fit`: a Ctrl-C during its import is lost, see below)
import torch
from torch import Tensor

from headcache.config import TrainConfig
from headcache.devices import resolve_device
from headcache.errors import ConfigError, DataError
from headcache.features import CachedFeatures, as_layer
from headcache.head import HeadModel, get_head
from headcache.losses import LossConstants, default_loss, loss_constants, stack_constants, stacked_loss
from headcache.metrics import bootstrap_intervals, classification_metrics, fast_auroc, rows_auprc
from headcache.optim import StackedAdamW, clip_per_head
from headcache.pooling import LayerMix, create_pool, is_learnable
from headcache.rundir import RUN, FoldRun, Output, RefitRun, RunRecord, SweepRun, save_run, write_record

VAL_SPLIT_NAMES = ("val", "valid", "validation")
DEFAULT_TEST_SPLIT = TrainConfig().test_split  # used when the cache has it; another name must exist
# The flag that names each role's split, for messages.
SPLIT_FLAGS = {"train": "--train-split", "val": "--val-split"}


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (0-based): CosineAnnealingLR with T_max = epochs,
    eta_min = base_lr * 1e-3, as a pure function (nanoGPT's get_lr)."""
    eta_min = base_lr * 1e-3
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


# numpy loads numpy.random on first use; a KeyboardInterrupt raised while its compiled modules initialise
# is swallowed there (measured: 1 Ctrl-C in about 10 sent as a run started was lost, and the run went on
# to the end), so train.py imports it up front, before any run directory exists.
def derived_seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for (initialisation, dropout, batch order) from one --seed."""
    init, dropout, order = np.random.SeedSequence(seed).generate_state(3)
    return int(init), int(dropout), int(order)


@dataclass
class HeadTask:
    """What one head trains on: its config and, per role, (split, rows of that split)."""

    config: TrainConfig
    train: tuple[str, Tensor]
    val: tuple[str, Tensor]
    test: tuple[str, Tensor] | None = None


@dataclass
class FitResult:
    """Learned state and record of one head."""

    config: TrainConfig
    loss: LossConstants
    monitor: str
    best_epoch: int
    best_value: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    best_state: dict[str, Tensor] = field(default_factory=dict)
    last_state: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    # a head with a learned layer mix: each layer id's softmax weight in its best state
    layer_weights: dict[int, float] | None = None


def bank_key(config: TrainConfig) -> tuple:
    """Heads with equal keys can share one bank (one batched computation).

    The layer is not part of it: heads reading different layers, or a learned mix, share a bank whose
    source keeps the layer axis (`layer_view`), a layer being a slice of the same features.
    """
    return (config.pool, config.head, config.hidden, config.batch_size, config.device)


def layer_view(configs: Sequence[TrainConfig]) -> int | str:
    """The layer view a bank's feature source must be opened with (``CachedFeatures(layer=...)``): the one
    layer every head reads (an id, or "last"), exactly today's features; else "all" (some head mixes, or
    the heads read different layers), and a `LayerMix` in `fit` gives each head its layer or its mix."""
    wanted = {as_layer(c.layer) for c in configs}
    if len(wanted) == 1 and "mix" not in wanted:
        return wanted.pop()
    return "all"


def _layer_mix(source: Any, configs: Sequence[TrainConfig]) -> LayerMix | None:
    """The bank's LayerMix (None for heads all reading the source's one layer), checked against the source."""
    view = layer_view(configs)
    if source.layered != (view == "all"):
        raise ConfigError(f"the heads read layer view {view!r} but the feature source was opened on "
                          f"{'all layers' if source.layered else 'layer ' + str(source.layers[0])}: open it with "
                          "layer=layer_view(configs)")
    if view != "all":
        source.position(view)  # the source's one layer is the heads'
        return None
    if any(c.layer == "mix" for c in configs) and len(source.layers) < 2:
        what = "token layer" if is_learnable(configs[0].pool) else "layer"
        raise ConfigError(f"--layer mix: the features have one {what} ({source.layers[0]}), so there is nothing to "
                          "mix; extract with a spec that names several layers (the hf spec: --spec-opt layers=...)"
                          + (" and keep their tokens (--token-layers all)" if what == "token layer" else ""))
    choices = [None if c.layer == "mix" else source.position(c.layer) for c in configs]
    return LayerMix(len(configs), len(source.layers), choices)


def fit(source: Any, tasks: Sequence[HeadTask], *, num_classes: int, hidden_dim: int,
        on_epoch: Callable[[int, list[dict]], None] | None = None,
        on_step: Callable[[int, int, Tensor], None] | None = None) -> list[FitResult]:
    """Train K heads as one batched computation; return each head's result.

    Parameters
    ----------
    source : CachedFeatures or LiveFeatures
        Answers ``batch(split, rows)`` and ``labels(split)``; opened on the tasks' `layer_view`.
    tasks : sequence of HeadTask
        All with the same `bank_key`.
    num_classes, hidden_dim : int
        C and D.
    on_epoch : callable, optional
        Called after each epoch with (epoch, the K history rows).
    on_step : callable, optional
        Called after each step with (epoch, step, the K losses, detached).
    """
    configs = [t.config for t in tasks]
    if len({bank_key(c) for c in configs}) != 1:
        raise ConfigError("heads of one bank must share pool, head, hidden, batch_size and device")
    first = configs[0]
    device = resolve_device(first.device)
    k_heads = len(tasks)
    seeds = [derived_seeds(c.seed) for c in configs]

    # -- model: stacked heads (and learned pools), each initialised from its own generator; a layer mix
    # (zero logits: nothing drawn) where the heads read other layers than one
    mix = _layer_mix(source, configs)
    init_generators = [torch.Generator().manual_seed(s[0]) for s in seeds]
    pool = create_pool(first.pool, num_heads=k_heads, dim=hidden_dim)  # None for a parameter-free pool
    bank = get_head(first.head)(k_heads, hidden_dim, num_classes, first.hidden, [c.dropout for c in configs])
    if pool is not None:
        pool.reset_parameters(init_generators)
    bank.reset_parameters(init_generators)
    model = HeadModel(bank, pool, mix).to(device)
    params = [p for p in model.parameters()]
    dropout_generators = [torch.Generator(device).manual_seed(s[1]) for s in seeds]
    order_generators = [torch.Generator().manual_seed(s[2]) for s in seeds]

    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=device)  # noqa: E731
    optimizer = StackedAdamW(params, as_tensor([c.weight_decay for c in configs]))
    max_norm = as_tensor([c.grad_clip for c in configs])

    # -- data: per-head train rows and labels; loss constants come from the train labels
    train_split = tasks[0].train[0]
    # one train split: every step is one batch of it for all heads (each head scores its own val split)
    if any(t.train[0] != train_split for t in tasks):
        raise ConfigError("heads of one bank must share their train split")
    labels = {role: [source.labels(getattr(t, role)[0]) for t in tasks] for role in ("train", "val")}
    for role in ("train", "val"):  # NOTE [ Unlabelled items ]
        for task, split_labels in zip(tasks, labels[role]):
            split, rows = getattr(task, role)
            require_labels(split_labels[rows.to(split_labels.device)], split, SPLIT_FLAGS[role],
                           use=f"the {role} split")
    train_labels = [labels["train"][k][t.train[1].to(device)] for k, t in enumerate(tasks)]
    constants = [loss_constants(c.loss or default_loss(num_classes), y, num_classes, c.focal_gamma)
                 for c, y in zip(configs, train_labels)]
    loss_args = stack_constants(constants, device)
    # the one order of every epoch, checked against the batch size here; a streamed split's sampler
    # keeps its blocks together and plans its reads (NOTE [ Streaming tokens ] in stream.py)
    sampler = source.sampler(train_split, [t.train[1] for t in tasks], order_generators, batch_size=first.batch_size)
    steps = len(sampler)

    # -- early stopping state, per head
    val_labels = [labels["val"][k][t.val[1].to(device)].cpu().numpy() for k, t in enumerate(tasks)]
    monitors = [_choose_monitor(y, t.val[0]) for y, t in zip(val_labels, tasks)]
    best = [-math.inf] * k_heads
    results = [FitResult(c, constants[k], monitors[k], best_epoch=-1, best_value=math.nan, epochs_run=0)
               for k, c in enumerate(configs)]
    active = [True] * k_heads
    waited = [0] * k_heads

    for epoch in range(max(c.epochs for c in configs)):
        started = time.perf_counter()
        lr = as_tensor([cosine_lr(c.lr, epoch, c.epochs) if active[k] else 0.0 for k, c in enumerate(configs)])
        model.train()
        total = torch.zeros(k_heads, device=device)
        for step, rows in enumerate(sampler.epoch()):  # rows (B,) for heads sharing one order, else (K, B)
            batch_labels = labels["train"][0][rows.to(device)]
            logits = model(source.batch(train_split, rows), dropout_generators)
            losses = stacked_loss(logits, batch_labels, *loss_args)
            for p in params:
                p.grad = None
            losses.sum().backward()
            clip_per_head(params, max_norm)
            optimizer.step(lr)
            total += losses.detach()
            if on_step is not None:
                on_step(epoch, step, losses.detach())
        train_loss = (total / steps).tolist()

        val_probs, val_loss = _evaluate_tasks(model, source, tasks, "val", loss_args)
        seconds = time.perf_counter() - started
        rows_out = []
        for k in range(k_heads):
            if not active[k]:
                rows_out.append({})
                continue
            record = _epoch_record(epoch, train_loss[k], val_loss[k], val_probs[k], val_labels[k],
                                   float(lr[k]), seconds)
            results[k].history.append(record)
            results[k].epochs_run = epoch + 1
            value = -record["val_loss"] if monitors[k] == "loss" else record["val_auroc"]
            if value > best[k] + configs[k].min_delta:
                best[k], waited[k] = value, 0
                results[k].best_epoch, results[k].best_value = epoch, record[f"val_{monitors[k]}"]
                results[k].best_state = model.head_state(k)
            else:
                waited[k] += 1
            if waited[k] >= configs[k].patience or epoch + 1 >= configs[k].epochs:
                active[k] = False
                results[k].last_state = model.head_state(k)
            rows_out.append(record)
        if on_epoch is not None:
            on_epoch(epoch, rows_out)
        if not any(active):
            break

    _final_evaluation(model, source, tasks, results, loss_args)
    for k, result in enumerate(results):
        if mix is not None and mix.is_learned(k):
            weights = torch.softmax(result.best_state["mix.logits"], dim=-1).tolist()
            result.layer_weights = dict(zip(source.layers, weights))
    return results


# NOTE [ Unlabelled items ]
# The cache stores label -1 for an item its spec gave no label (new patients, a file
# without a label column). Training and early stopping need every label, so a train
# or val split holding any -1 is refused here, in `fit`, which train, sweep and cv all
# call (cv also calls `require_labels` before cutting its folds, which reads labels
# first). A test split holding any -1 only loses its metrics: its predictions are
# still kept (predictions_test.csv), with a warning, so a run can predict new items.


def unlabelled_count(labels: Tensor | np.ndarray) -> int:
    """How many of ``labels`` are -1 (NOTE [ Unlabelled items ])."""
    return int((labels < 0).sum())


def require_labels(labels: Tensor | np.ndarray, split: str, flag: str, *, use: str) -> None:
    """Refuse ``split`` for ``use`` (e.g. "the train split") when any of its ``labels`` is -1
    (NOTE [ Unlabelled items ]).

    Raises
    ------
    DataError
        Naming the split, how many of its items lack a label and ``flag``, the option that picks another.
    """
    missing = unlabelled_count(labels)
    if missing:
        what = "is unlabelled" if missing == len(labels) else f"has {missing} unlabelled items (of {len(labels)})"
        raise DataError(f"split {split!r} {what}: {use} needs a label for every item; name a labelled split with "
                        f"{flag} (unlabelled items are predicted with export and predict, or given as the test "
                        "split, which then gets predictions without metrics)")


def require_classes(labels: Tensor | np.ndarray, split: str) -> None:
    """Refuse a train split whose labelled items are all of one class: a head trained on it cannot learn to
    tell classes apart, and its metrics would only restate the class balance of the other splits (cv refuses
    the same for its folds). Unlabelled items are `require_labels`'s to refuse.

    Raises
    ------
    DataError
        Naming the split, its one class, and --train-split.
    """
    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 1:
        raise DataError(f"split {split!r} holds one class only (label {int(classes[0])} for all {len(labels)} "
                        "items): a head cannot learn to separate classes from it; name a split that holds two or "
                        "more with --train-split")


def _choose_monitor(val_labels: np.ndarray, split: str) -> str:
    if len(np.unique(val_labels)) < 2:
        warnings.warn(f"split {split} holds one class, so val AUROC is undefined: early stopping "
                      "monitors the val loss instead", UserWarning, stacklevel=3)
        return "loss"
    return "auroc"


def _epoch_record(epoch: int, train_loss: float, val_loss: float, probs: np.ndarray, labels: np.ndarray,
                  lr: float, seconds: float) -> dict:
    binary = probs.shape[1] == 2
    two_classes = len(np.unique(labels)) > 1
    auroc = float(fast_auroc(probs[None], labels)[0]) if two_classes else math.nan
    auprc = float(rows_auprc(probs[None, :, 1], labels[None] == 1)[0]) if binary and two_classes else math.nan
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auroc": auroc,
            "val_auprc": auprc, "val_accuracy": float((probs.argmax(1) == labels).mean()), "lr": lr,
            "seconds": seconds}


@torch.no_grad()
def predict_split(model: HeadModel, source: Any, split: str, rows: Tensor) -> Tensor:
    """Class probabilities (K, N, C) of every head for ``rows`` of ``split``, in eval mode."""
    model.eval()
    chunks = [torch.softmax(model(source.batch(split, rows[i:i + source.eval_rows])), -1)
              for i in range(0, len(rows), source.eval_rows)]
    return torch.cat(chunks, dim=1)


def _heads_by_split(tasks: Sequence[HeadTask], role: str) -> dict[str, list[int]]:
    """The heads that have ``role`` ("val" or "test"), grouped by the split they name for it."""
    groups: dict[str, list[int]] = {}
    for k, task in enumerate(tasks):
        part = getattr(task, role)
        if part is not None:
            groups.setdefault(part[0], []).append(k)
    return groups


def _evaluate_tasks(model: HeadModel, source: Any, tasks: Sequence[HeadTask], role: str,
                    loss_args) -> tuple[list[np.ndarray | None], list[float]]:
    """Probabilities (N_k, C) and loss of each head on its own split and rows of ``role``; None and NaN
    for a head without that role (NaN loss for rows with unlabelled items).

    The bank computes all K heads at once, so each split the heads name is predicted in one pass, over
    all of its rows, and each head keeps its own rows: heads sharing a split cost one pass, and a head's
    numbers never depend on which other heads share its bank.
    """
    probs_out: list[np.ndarray | None] = [None] * len(tasks)
    loss_out: list[float] = [math.nan] * len(tasks)
    weights, gamma, weighted = loss_args
    for split, heads in _heads_by_split(tasks, role).items():
        labels = source.labels(split)
        probs = predict_split(model, source, split, torch.arange(len(labels)))
        for k in heads:
            rows = getattr(tasks[k], role)[1]
            p = probs[k, rows.to(probs.device)]
            y = labels[rows.to(labels.device)]
            probs_out[k] = p.cpu().numpy()
            if unlabelled_count(y):  # an unlabelled test split has no loss (NOTE [ Unlabelled items ])
                continue
            loss = stacked_loss(torch.log(p.clamp(min=1e-12))[None], y, weights[k:k + 1], gamma[k:k + 1],
                                weighted[k:k + 1])
            loss_out[k] = float(loss)
    return probs_out, loss_out


def _final_evaluation(model: HeadModel, source: Any, tasks: Sequence[HeadTask], results: list[FitResult],
                      loss_args) -> None:
    """Put every head at its best weights and score it on its own val (and test, where it has one) split
    with full metrics and CIs, written into its result; a head without a test split gets no test entry
    and leaves the others' untouched."""
    for k, result in enumerate(results):
        if result.best_state:
            model.load_head_state(k, result.best_state)
        else:  # the monitor never improved (e.g. NaN): keep the last weights
            result.best_state = result.last_state
    warned: set[str] = set()
    for role in ("val", "test"):
        probs, _ = _evaluate_tasks(model, source, tasks, role, loss_args)
        for task, result, p in zip(tasks, results, probs):
            if p is None:
                continue
            split, rows = getattr(task, role)
            labels = source.labels(split)
            y = labels[rows.to(labels.device)].cpu().numpy()
            result.predictions[role] = p
            missing = unlabelled_count(y)
            if missing:  # only a test split gets here with -1 labels (NOTE [ Unlabelled items ])
                if split not in warned:
                    warned.add(split)
                    warnings.warn(f"split {split!r} has {missing} unlabelled items (of {len(y)}), so the run has no "
                                  f"{role} metrics; its predictions are written (predictions_{role}.csv)",
                                  UserWarning, stacklevel=3)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already warned when the monitor was chosen
                metrics = classification_metrics(p, y, split=split)
            metrics.update(bootstrap_intervals(p, y, seed=task.config.seed))
            result.metrics[role] = metrics


# ---------------------------------------------------------------------------- train from a cache


def resolve_splits(config: TrainConfig, available: Sequence[str]) -> tuple[str, str, str | None]:
    """(train, val, test) split names: val defaults to the cache's val or valid; test is used when present."""
    missing = [s for s in [config.train_split] if s not in available]
    val = config.val_split or next((s for s in VAL_SPLIT_NAMES if s in available), None)
    if val is None:
        raise ConfigError(f"the cache has no validation split (looked for {', '.join(VAL_SPLIT_NAMES)}; "
                          f"it has {', '.join(available)}); name one with --val-split")
    missing += [s for s in [val] if s not in available]
    if missing:
        raise ConfigError(f"the cache has no split {missing[0]!r} (it has {', '.join(available)})")
    test = config.test_split if config.test_split in available else None
    if test is None and config.test_split not in (None, DEFAULT_TEST_SPLIT):  # the default may be absent
        raise ConfigError(f"--test-split {config.test_split}: the cache has no such split (it has "
                          f"{', '.join(available)}); name one of them, or leave --test-split out")
    for flag, role, split in (("--val-split", "validation", val), ("--test-split", "test", test)):
        if split == config.train_split:  # early stopping or test metrics on the rows the head learns from
            raise ConfigError(f"{flag}: the {role} split {split!r} is the train split, so it would score the rows "
                              f"the head trains on; name another split with {flag} (or another --train-split)")
    return config.train_split, val, test


def tasks_for_splits(configs: Sequence[TrainConfig], source: Any,
                     splits: tuple[str, str, str | None]) -> list[HeadTask]:
    train, val, test = splits
    every = lambda split: torch.arange(len(source.labels(split)))  # noqa: E731
    return [HeadTask(c, (train, every(train)), (val, every(val)), (test, every(test)) if test else None)
            for c in configs]


def num_classes_of(source: Any, splits: Sequence[str | None]) -> int:
    """C: the cache's recorded num_classes (schema 2), else from the largest label of ``splits`` (at least 2;
    an empty split adds nothing), so a stray label cannot silently widen the head."""
    if getattr(source, "num_classes", None):
        return int(source.num_classes)
    top = max((int(labels.max()) for s in splits if s and len(labels := source.labels(s))), default=0)
    return max(2, top + 1)


@dataclass
class TrainResult:
    """What `train` returns: the run directory and the head's result."""

    run_dir: Path
    result: FitResult
    seconds: float

    @property
    def metrics(self) -> dict[str, dict]:
        return self.result.metrics


def run_record(source: CachedFeatures, config: TrainConfig, splits: Sequence[str | None], num_classes: int,
               extra: SweepRun | FoldRun | RefitRun | None = None) -> RunRecord:
    """The RunRecord of a head trained from ``source``: what train, sweep and cv write to config.json."""
    train_split, val, test = splits
    return RunRecord(config, str(source.path), (train_split, val, test), source.backbone_fingerprint, source.dtype,
                     num_classes, source.hidden_dim, layers=source.pooled_layers, token_layers=source.token_layers,
                     extra=extra)


def train(cache: str | Path, out: str | Path, config: TrainConfig = TrainConfig(), *,
          overwrite: bool = False, on_epoch: Callable[[int, list[dict]], None] | None = None) -> TrainResult:
    """Train one head from a cache and write its run directory.

    An unfinished run directory at ``out`` (no metrics.json) is replaced
    without ``overwrite``; a complete one only with it, and only when the new
    run completes (NOTE [ Finished run directories ] in rundir.py).

    Raises
    ------
    OutputExistsError
        ``out`` holds a complete run and ``overwrite`` is False, or files headcache did not write.
    RunInterrupted
        Ctrl-C (or SIGTERM from the CLI): its message says what was kept.

    Example
    -------
    >>> result = train("cache/demo/cache.h5", "runs/meanq", TrainConfig(epochs=20))  # doctest: +SKIP
    >>> result.metrics["test"]["auroc"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    source = CachedFeatures(cache, pool=config.pool, device=resolve_device(config.device),
                            memory_budget=config.memory_budget, layer=layer_view([config]))
    splits = resolve_splits(config, source.splits)
    sizes = {split: len(source.labels(split)) for split in splits if split}  # in order: the train split's errors first
    require_classes(source.labels(splits[0]), splits[0])
    if splits[2] is not None and sizes[splits[2]] == 0:  # nothing to score or predict
        warnings.warn(f"split {splits[2]!r} has no sequences: the run has no test metrics", UserWarning, stacklevel=2)
        splits = (splits[0], splits[1], None)
    output = Output(out, RUN, overwrite=overwrite)
    num_classes = num_classes_of(source, splits)
    record = run_record(source, config, splits, num_classes)
    with output as folder:
        write_record(folder, record)
        [result] = fit(source, tasks_for_splits([config], source, splits), num_classes=num_classes,
                       hidden_dim=source.hidden_dim, on_epoch=on_epoch)
        save_run(folder, result, record,
                 ids={role: source.ids(split) for role, split in zip(("val", "test"), splits[1:]) if split})
    return TrainResult(output.final, result, time.perf_counter() - started)
