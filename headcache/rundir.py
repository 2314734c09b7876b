"""The run directory format: its one owner.

A run directory holds ``config.json`` (written first: the `RunRecord` of
everything the run used), ``history.csv``, ``head_best.pt``, ``head_last.pt``,
``curves.png``, ``predictions_<role>.csv`` and ``metrics.json``, written last.
Sweeps and cross-validation write one run directory per head in this same
format, plus their tables and plots (also written here). Every file is
written to a temporary name in its folder and renamed into place when
complete (`replaced_atomically`), so no reader ever sees half a file.

NOTE [ Finished run directories ]
A directory is complete only when its last file exists (`Layout.last`:
metrics.json for a run, best_config.json for a sweep or cv). `Output` decides
what a command may do with the directory it is given:
- absent or empty: written in place;
- unfinished (its first file but not its last, and nothing that is not
  ours): the same command replaces it in place, without ``--overwrite``;
- complete, or holding other files: refused without ``--overwrite``; with
  it, a complete directory of ours is rebuilt in a staging sibling and
  swapped in only when the new one is complete, so a failed or interrupted
  ``--overwrite`` leaves the previous run byte-identical, and the new one
  holds nothing of the old (no stale runs of a larger grid). A directory with
  files that are not ours is never deleted: it is refused even then.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fnmatch
import json
import math
import os
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from headcache.config import TrainConfig
from headcache.errors import CheckpointError, HeadcacheError, OutputExistsError, OutputWriteError, RunInterrupted
from headcache.features import view_layers
from headcache.head import HeadModel, get_head
from headcache.pooling import LayerMix, create_pool, is_learnable
from headcache.store import SINGLE_LAYER

try:
    import fcntl
except ImportError:  # not on Windows: no directory locks there (NOTE [ One writer per directory ])
    fcntl = None

if TYPE_CHECKING:  # for type hints only: the loop sits above this module
    from headcache.train import FitResult

RECORD_VERSION = 2  # config.json; version 1 (no "version" key) did not record dtype, classes or dims
HEAD_FORMAT, HEAD_VERSION = "headcache-head", 1
METRIC_KEYS = ("auroc", "auprc")
_TEMP = ".*.tmp-*"  # names of temporary files being written (see `replaced_atomically`)


# ---------------------------------------------------------------------------- files, written whole


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there replaces
    ``path`` in one rename. On failure the temporary file goes and ``path`` is untouched.

    Raises
    ------
    OutputWriteError
        The file could not be written (a full disk, a file size limit, no permission): naming it, with the
        fix. torch.save reports a short write as a RuntimeError, matplotlib and csv as an OSError; every
        file of a run, a prediction and a model is written here, so this is the one place that turns them
        into a message.
    """
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)  # a link stays one: its file is replaced
    temp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # same suffix: writers infer formats
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, path)
    except HeadcacheError:
        raise
    except (OSError, RuntimeError) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).strip().splitlines()
        raise OutputWriteError(f"cannot write {path} ({type(exc).__name__}: {reason[0] if reason else 'no reason'})"
                               "; free space on its disk (or raise the file size limit, ulimit -f) or make its "
                               "folder writable, then run the same command again") from exc
    finally:
        temp.unlink(missing_ok=True)


def refuse_inputs(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an existing ``out`` that is a file the command reads, or lies inside a folder it reads: with
    ``--overwrite`` it would be replaced by the output, and the input lost.

    Parameters
    ----------
    inputs : iterable of (flag, path)
        What the command reads, with the flag that names it (a None path is skipped).

    Raises
    ------
    OutputExistsError
        Naming --out, the flag and the input.
    """
    out = Path(out)
    if not out.exists():
        return
    for flag, source in inputs:
        if source is None or not Path(source).exists():
            continue
        source = Path(source)
        inside = source.is_dir() and out.resolve().is_relative_to(source.resolve())
        if inside or out.samefile(source):
            what = "lies inside the folder" if inside else "is the file"
            raise OutputExistsError(f"--out {out} {what} this command reads ({flag} {source}); choose another name "
                                    "(--overwrite would destroy it)")


def write_json(path: Path, value: Any) -> None:
    with replaced_atomically(path) as temp:
        temp.write_text(json.dumps(_json_safe(value), indent=2, default=str))


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A header and rows (None written as an empty cell)."""
    with replaced_atomically(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------------------- output directories


@dataclass(frozen=True)
class Layout:
    """What one kind of output directory holds (NOTE [ Finished run directories ])."""

    first: str  # written first: a directory holding it (and not `last`) is an unfinished one of ours
    last: str  # written last: the directory is complete only when it exists
    files: tuple[str, ...]  # every name it may hold (fnmatch patterns)
    run_folders: tuple[str, ...] = ()  # folders of run directories (`RUN` layout each)


RUN = Layout("config.json", "metrics.json", ("config.json", "metrics.json", "history.csv", "head_best.pt",
                                            "head_last.pt", "curves.png", "predictions_*.csv"))
SWEEP = Layout("runs", "best_config.json", ("leaderboard.csv", "leaderboard.json", "sweep.png", "best_config.json"),
               ("runs",))
CV = Layout("runs", "best_config.json", ("cv_folds.csv", "cv_folds.json", "cv_summary.csv", "cv_summary.json",
                                         "oof.csv", "cv.png", "best_config.json"), ("runs", "refit"))
RUN_FILES = ("config.json", "metrics.json", "history.csv", "head_best.pt", "head_last.pt", "curves.png")


def foreign_entries(folder: Path, layout: Layout) -> list[Path]:
    """The entries of ``folder`` that ``layout`` does not account for (they are someone else's)."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.name in layout.run_folders and entry.is_dir():
            for run in sorted(entry.iterdir()):
                out += foreign_entries(run, RUN) if run.is_dir() else [run]
        elif not (entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in layout.files + (_TEMP,))):
            out.append(entry)
    return out


def is_complete(folder: Path, layout: Layout = RUN) -> bool:
    return (Path(folder) / layout.last).is_file()


# NOTE [ One writer per directory ]
# Two commands writing one --out at once would each replace the other's files
# (both exit 0; the directory ends with one run's heads beside the other's
# config, or one finished run silently replaced by the other). `Output` holds
# an exclusive flock on the directory while its command writes it, and decides
# what to do with the directory (NOTE [ Finished run directories ]) again once
# it holds the lock; a second writer is refused at once. A file system without
# flock (some network mounts) gives no lock, as HDF5 gives none there either.


def _lock_directory(folder: Path) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive lock (None where locks are not supported).

    Raises
    ------
    OutputExistsError
        Another process holds the lock: it is writing ``folder`` now.
    """
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OutputExistsError(f"--out {folder}: another process is writing this directory now; wait for it "
                                    "to finish, or choose another directory") from None
        return None  # no locks on this file system
    return fd


class Output:
    """The directory a command writes, decided before any work (NOTE [ Finished run directories ]).

    Use as ``with Output(out, RUN, overwrite=...) as folder:`` and write into
    ``folder``: ``out`` itself, or a staging sibling swapped in when the block
    succeeds. An interrupt (SIGINT, or SIGTERM as the CLI turns it) becomes
    `RunInterrupted`, whose message says what was kept. ``out`` given as a
    symbolic link means the directory it points to: the link stays a link.
    While the block runs, the directory is locked (NOTE [ One writer per
    directory ]).

    Raises
    ------
    OutputExistsError
        ``out`` is a file; or it holds a complete run or other files and
        ``overwrite`` is False; or it holds files that are not ours; or
        another process is writing it.
    OutputWriteError
        ``out`` cannot be created (a folder on its path is a file, or not writable).
    """

    def __init__(self, out: str | Path, layout: Layout, *, overwrite: bool):
        out = Path(out)
        # swap the directory, never the link; "." and ".." name their folder (with_name needs a name)
        self.final = out.resolve() if out.is_symlink() or out.name in ("", "..") else out
        if not self.final.name:
            raise OutputExistsError(f"--out {out}: the root folder cannot be a run directory; give a directory in it")
        self.layout, self.overwrite = layout, overwrite
        self.staging = self.final.with_name(f".{self.final.name}.replacing")
        self.previous = self.final.with_name(f".{self.final.name}.replaced")
        self._lock: int | None = None
        self._decide()  # refused before any work; decided again under the lock in __enter__

    def _decide(self) -> None:
        if not self.final.exists() and self.previous.is_dir():  # a swap was cut between its two renames
            os.replace(self.previous, self.final)
        if self.final.exists() and not self.final.is_dir():
            raise OutputExistsError(f"--out {self.final} is a file; give a directory")
        entries = list(self.final.iterdir()) if self.final.is_dir() else []
        foreign = foreign_entries(self.final, self.layout) if entries else []
        if foreign:
            raise OutputExistsError(f"--out {self.final} holds files that headcache did not write "
                                    f"({foreign[0].relative_to(self.final)}); --overwrite replaces only "
                                    "headcache's own directories: choose another directory")
        complete = bool(entries) and is_complete(self.final, self.layout)
        unfinished = bool(entries) and not complete and (self.final / self.layout.first).exists()
        if entries and not unfinished and not self.overwrite:
            what = "holds a complete run" if complete else "already exists and is not empty"
            raise OutputExistsError(f"--out {self.final} {what}; pass --overwrite to replace it, or choose "
                                    "another directory")
        self.staged = complete  # something complete to keep until its successor is
        self.clear = bool(entries) and not complete  # nothing complete: replaced in place
        self.path = self.staging if self.staged else self.final

    def __enter__(self) -> Path:
        try:
            self.final.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(f"--out {self.final}: cannot create this directory ({exc.strerror}: "
                                   f"{exc.filename}); give a path whose folders are directories you can write"
                                   ) from None
        self._lock = _lock_directory(self.final)
        try:
            self._decide()  # again, under the lock: another process may have written it since __init__
            if self.staged:
                if self.staging.exists():  # left by an --overwrite that was killed: never complete, ours by name
                    shutil.rmtree(self.staging)
                self.staging.mkdir()
            elif self.clear:  # an unfinished run of ours: the same command starts it again
                for entry in self.final.iterdir():
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except BaseException:
            self._unlock()
            raise
        return self.path

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is None:
                if self.staged:  # swap: the previous run stays whole until the new one is
                    shutil.rmtree(self.previous, ignore_errors=True)
                    os.replace(self.final, self.previous)
                    os.replace(self.staging, self.final)
                    shutil.rmtree(self.previous)
                return
            if self.staged:
                shutil.rmtree(self.staging, ignore_errors=True)
            if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
                raise RunInterrupted(self.interrupted_message()) from error
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases its lock
            self._lock = None

    def interrupted_message(self) -> str:
        if self.staged:
            return (f"interrupted: {self.final} still holds the previous complete run, unchanged; "
                    "the same command starts again")
        return (f"interrupted: kept {self.final} as an unfinished run (no {self.layout.last}); the same command "
                "starts it again, without --overwrite")


# ---------------------------------------------------------------------------- the record of a run


@dataclass(frozen=True)
class SweepRun:
    """A sweep head: its run name and grid values as given."""

    KEY: ClassVar[str] = "sweep"
    run: str
    grid: dict[str, str]


@dataclass(frozen=True)
class FoldRun:
    """A cv fold head: its fold of the joined ``splits``, cut with ``seed``."""

    KEY: ClassVar[str] = "cv"
    fold: int
    folds: int
    splits: list[str]
    seed: int
    train_rows: int
    val_rows: int


@dataclass(frozen=True)
class RefitRun:
    """A cv refit: every row of the joined split for the folds' mean best epoch count."""

    KEY: ClassVar[str] = "refit"
    epochs: int
    mean_best_epoch: float
    weights: str = "last"
    note: str = "no held-out rows: history's val columns score the training rows"


EXTRAS = (SweepRun, FoldRun, RefitRun)


@dataclass(frozen=True)
class RunRecord:
    """What a run used, as config.json records it; export rebuilds the deployed model from it.

    ``splits`` are (train, val, test) (val None for a refit, test None
    without one). ``dtype`` is the cache's storage dtype: the deployed model
    rounds the backbone's states through it, as the cache did. ``amp`` is the
    cache's mixed precision once the cache records it. ``layers`` and
    ``token_layers`` are the cache's (None in a record written before layers:
    one layer); `head_layers` says which of them a head reads.
    ``loss_constants`` and ``monitor`` are learned and added when the run
    finishes.
    """

    train: TrainConfig
    cache: str
    splits: tuple[str, str | None, str | None]
    backbone_fingerprint: str
    dtype: str
    num_classes: int
    hidden_dim: int
    amp: str | None = None
    layers: list[int] | None = None
    token_layers: list[int] | None = None
    extra: SweepRun | FoldRun | RefitRun | None = None
    loss_constants: dict | None = None
    monitor: str | None = None
    REQUIRED: ClassVar[tuple[str, ...]] = ("cache", "splits", "backbone_fingerprint", "dtype", "num_classes",
                                           "hidden_dim")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"version": RECORD_VERSION, "train": self.train.to_dict()}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("train", "extra")})
        out["splits"] = list(self.splits)
        if self.extra is not None:
            out[self.extra.KEY] = {f.name: getattr(self.extra, f.name) for f in fields(self.extra)}
        return out

    @classmethod
    def from_dict(cls, d: Mapping, *, path: Path) -> "RunRecord":
        """The record of a config.json's contents; fields added or removed since are defaulted or ignored.

        Raises
        ------
        CheckpointError
            A newer format version, or a field the record needs is missing.
        """
        version = d.get("version", 1)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise CheckpointError(f"{path} has run record version {version!r}; this headcache reads up to "
                                  f"{RECORD_VERSION}: upgrade headcache to use this run")
        missing = [key for key in ("train",) + cls.REQUIRED if key not in d]
        if missing:
            raise CheckpointError(f"{path} does not record {', '.join(missing)} (written by an older headcache); "
                                  "rerun the command that wrote this run to record it")
        extra = next((kind(**_known(kind, d[kind.KEY])) for kind in EXTRAS if isinstance(d.get(kind.KEY), dict)),
                     None)
        values = {key: d[key] for key in _names(cls) if key in d and key not in ("train", "extra")}
        return cls(**{**values, "train": train_config_from_dict(d["train"]), "splits": tuple(d["splits"]),
                      "extra": extra})


def _names(kind: type) -> list[str]:
    return [f.name for f in fields(kind)]


def head_layers(config: TrainConfig, record: RunRecord) -> list[int]:
    """The layer ids a head reads, in order: its one layer, or every layer its mix weighs (the cache's
    layers for a parameter-free pool, its token layers for the learned pool; `features.view_layers`)."""
    view = "all" if config.layer == "mix" else config.layer
    return view_layers(view, record.layers or [SINGLE_LAYER], record.token_layers or [SINGLE_LAYER],
                       learned=is_learnable(config.pool))


def _known(kind: type, d: Mapping) -> dict:
    """The entries of ``d`` that are fields of ``kind``: ones added later keep their defaults."""
    return {key: value for key, value in d.items() if key in _names(kind)}


def train_config_from_dict(d: Mapping) -> TrainConfig:
    """A TrainConfig from a recorded dict: settings removed since are ignored, ones added since defaulted."""
    return TrainConfig(**_known(TrainConfig, d))


def write_record(folder: Path, record: RunRecord) -> None:
    """config.json: written before the first epoch, and again with the learned constants at the end."""
    write_json(folder / "config.json", record.to_dict())


def read_record(folder: str | Path) -> RunRecord:
    """The RunRecord in ``folder``/config.json.

    Raises
    ------
    CheckpointError
        No config.json, not JSON, a newer version, or a needed field missing.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: --run must name a run directory written by headcache "
                              "train, or one of a sweep's or cv's runs/<run> directories")
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not JSON; rerun the command that wrote this run") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} is not a run record; rerun the command that wrote this run")
    return RunRecord.from_dict(content, path=path)


# ---------------------------------------------------------------------------- a finished run


def save_run(folder: Path, result: FitResult, record: RunRecord, *, ids: dict[str, list[str]] | None = None) -> None:
    """Every file of one finished head, metrics.json last: config.json (now with the learned loss
    constants), history.csv, head_best.pt, head_last.pt, curves.png, and predictions_<role>.csv for each
    evaluated role whose item ids are given."""
    record = replace(record, loss_constants=result.loss.to_dict(), monitor=result.monitor)
    write_record(folder, record)
    columns = list(result.history[0])
    write_csv(folder / "history.csv", columns, [[row[c] for c in columns] for row in result.history])
    for name, state, epoch in (("head_best.pt", result.best_state, result.best_epoch),
                               ("head_last.pt", result.last_state, result.epochs_run - 1)):
        with replaced_atomically(folder / name) as temp:
            torch.save(head_checkpoint(result, state, epoch, record), temp)
    plot_curves(result.history, folder / "curves.png", best_epoch=result.best_epoch)
    for role, probs in result.predictions.items():
        if ids and role in ids:
            write_predictions(folder / f"predictions_{role}.csv", ids[role], probs)
    weights = {}
    if result.layer_weights is not None:
        weights = {"layer_weights": {str(layer): w for layer, w in result.layer_weights.items()}}
        plot_layer_weights(result.layer_weights, folder / "layer_weights.png")
    write_json(folder / "metrics.json", {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                                         "monitor": result.monitor, **weights, **result.metrics})


def write_predictions(path: Path, ids: Sequence[str], probs: np.ndarray, labels: Sequence[Any] | None = None) -> None:
    """``id[, label], p0..pC`` per item (probabilities to six significant digits; a None label is empty)."""
    header = ["id"] + (["label"] if labels is not None else []) + [f"p{c}" for c in range(probs.shape[1])]
    cells = [[item] for item in ids] if labels is None else [[item, label] for item, label in zip(ids, labels)]
    write_csv(path, header, (first + [f"{v:.6g}" for v in row] for first, row in zip(cells, probs.tolist())))


# ---------------------------------------------------------------------------- head files


def head_checkpoint(result: FitResult, state: dict[str, Tensor], epoch: int, record: RunRecord) -> dict:
    """A head file's contents: everything export and predict need, loadable with weights_only=True."""
    return {"format": HEAD_FORMAT, "version": HEAD_VERSION, "config": result.config.to_dict(), "epoch": epoch,
            "monitor": result.monitor, "best_value": result.best_value, "hidden_dim": record.hidden_dim,
            "num_classes": record.num_classes, "backbone_fingerprint": record.backbone_fingerprint,
            "layers": head_layers(result.config, record), "state": state}


def read_head(path: str | Path) -> dict:
    """A head file's contents, checked to be one.

    Raises
    ------
    CheckpointError
        Missing, unreadable (empty, truncated), not a head file, or a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        hint = "" if is_complete(path.parent) else f" ({path.parent} has no metrics.json: its run did not finish)"
        raise CheckpointError(f"{path} does not exist{hint}: --run must name a finished run directory written by "
                              "headcache train, or one of a sweep's or cv's runs/<run> directories")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for damaged files; each means the same here
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}); it is damaged: rerun the command "
                              "that wrote its run") from None
    check_head(checkpoint, path)
    return checkpoint


def check_head(checkpoint: Any, path: str | Path) -> None:
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != HEAD_FORMAT:
        raise CheckpointError(f"{path} is not a head file written by headcache")
    version = checkpoint.get("version")
    if not isinstance(version, int) or version > HEAD_VERSION:
        raise CheckpointError(f"{path} has head format version {version!r}; this headcache reads up to "
                              f"{HEAD_VERSION}: upgrade headcache to use it")


def head_from_checkpoint(checkpoint: dict, *, path: str | Path = "the head file") -> nn.Module:
    """Rebuild a trained pool + head (eval mode) from a head file's contents.

    The recorded config is read tolerantly (`train_config_from_dict`), so a
    head file stays loadable when TrainConfig gains or loses a setting.
    """
    check_head(checkpoint, path)
    config = train_config_from_dict(checkpoint["config"])
    bank = get_head(config.head)(1, checkpoint["hidden_dim"], checkpoint["num_classes"], config.hidden,
                                 [config.dropout])
    pool = create_pool(config.pool, num_heads=1, dim=checkpoint["hidden_dim"])
    logits = checkpoint["state"].get("mix.logits")  # a learned layer mix (head files since layers)
    mix = None if logits is None else LayerMix(1, len(logits), [None])
    model = HeadModel(bank, pool, mix)
    model.load_head_state(0, checkpoint["state"])
    return model.eval()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------- tables and plots


def write_table(stem: Path, rows: list[dict]) -> None:
    """``stem``.csv and ``stem``.json of the same rows."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_csv(stem.with_suffix(".csv"), columns, [[row.get(c) for c in columns] for row in rows])
    write_json(stem.with_suffix(".json"), rows)


def result_columns(result: FitResult) -> dict:
    """best_epoch, epochs_run and, per split and metric, the value and its 95% interval."""
    columns: dict[str, Any] = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    for role in ("val", "test"):
        columns.update(metric_columns(role, result.metrics.get(role, {})))
    return columns


def metric_columns(prefix: str, metrics: dict) -> dict:
    columns = {}
    for metric in METRIC_KEYS:
        low, high = metrics.get(f"{metric}_ci") or (None, None)
        columns.update({f"{prefix}_{metric}": _finite(metrics.get(metric)),
                        f"{prefix}_{metric}_ci_low": low, f"{prefix}_{metric}_ci_high": high})
    columns[f"{prefix}_accuracy"] = metrics.get("accuracy")
    return columns


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def best_first(rows: list[dict], key: str) -> list[dict]:
    """Best ``key`` first; rows without a value last, in their order."""
    return sorted(rows, key=lambda row: (row[key] is None, -(row[key] or 0.0)))


def new_figure(size: tuple[float, float], columns: int = 1) -> tuple[Any, list]:
    """A matplotlib Figure on its own Agg canvas, and its axes: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: matplotlib is slow to import
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def save_figure(figure: Any, path: Path) -> None:
    """A figure as ``path`` (PNG), written atomically like every run file."""
    figure.tight_layout()
    with replaced_atomically(path) as temp:
        figure.savefig(temp, dpi=100, format="png")


def plot_curves(history: list[dict], path: Path, *, best_epoch: int) -> None:
    """curves.png: train and val loss, val AUROC and AUPRC per epoch, the best epoch marked."""
    figure, (ax_loss, ax_metric) = new_figure((10, 4), columns=2)
    epochs = [r["epoch"] for r in history]
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="val loss")
    ax_metric.plot(epochs, [r["val_auroc"] for r in history], label="val AUROC")
    ax_metric.plot(epochs, [r["val_auprc"] for r in history], label="val AUPRC")
    for ax in (ax_loss, ax_metric):
        if best_epoch >= 0:
            ax.axvline(best_epoch, color="grey", linestyle=":", label="best epoch")
        ax.set_xlabel("epoch")
        ax.legend()
    save_figure(figure, path)


def plot_layer_weights(weights: Mapping[int, float], path: Path) -> None:
    """layer_weights.png: a learned layer mix's softmax weight of each layer."""
    figure, [ax] = new_figure((max(4, 0.5 * len(weights) + 2), 3))
    ax.bar([str(layer) for layer in weights], list(weights.values()))
    ax.axhline(1 / len(weights), color="grey", linestyle=":", label="even mix (the start)")
    ax.set_xlabel("layer")
    ax.set_ylabel("softmax weight")
    ax.legend()
    save_figure(figure, path)


def plot_layer_curve(rows: list[dict], path: Path, *, title: str) -> None:
    """layer_curve.png: val and test AUROC (95% intervals) of the best run of each layer, and of the mix."""
    by_layer: dict[str, dict] = {}
    for row in rows:  # rows come best first: the first of a layer is its best
        if row.get("val_auroc") is not None:
            by_layer.setdefault(str(row["layer"]), row)
    ids = sorted(int(name) for name in by_layer if name.lstrip("-").isdigit())
    names = [str(i) for i in ids] + [name for name in ("last", "mix") if name in by_layer]
    figure, [ax] = new_figure((max(5, 0.6 * len(names) + 2), 3.5))
    positions = np.arange(len(names))
    for offset, role in ((-0.1, "val"), (0.1, "test")):
        metric = f"{role}_auroc"
        have = [i for i, name in enumerate(names) if by_layer[name].get(metric) is not None]
        values = np.array([by_layer[names[i]][metric] for i in have], dtype=float)
        low, high = (np.array([by_layer[names[i]].get(f"{metric}_{end}", by_layer[names[i]][metric])
                               for i in have], dtype=float) for end in ("ci_low", "ci_high"))
        ax.errorbar(positions[have] + offset, values, yerr=np.stack([values - low, high - values]), fmt="o",
                    capsize=3, label=f"{role} AUROC")
    ax.set_xticks(positions, names)
    ax.set_xlabel("layer")
    ax.set_ylabel("AUROC (95% bootstrap interval)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(figure, path)


def plot_leaderboard(rows: list[dict], path: Path, *, title: str, metric: str = "val_auroc",
                     label: str = "run") -> None:
    """Each row's ``metric`` with its 95% interval, best at the top (rows without a value are left out)."""
    shown = [row for row in rows if row.get(metric) is not None][::-1]
    figure, [ax] = new_figure((8, 1.5 + 0.28 * max(1, len(shown))))
    values = np.array([row[metric] for row in shown], dtype=float)
    low, high = (np.array([row[metric] if row.get(f"{metric}_{end}") is None else row[f"{metric}_{end}"]
                           for row in shown], dtype=float) for end in ("ci_low", "ci_high"))
    positions = np.arange(len(shown))
    ax.errorbar(values, positions, xerr=np.stack([values - low, high - values]), fmt="o", capsize=3)
    ax.set_yticks(positions, [str(row[label]) for row in shown], fontsize=8)
    ax.set_xlabel(f"{metric.replace('_', ' ')} (95% bootstrap interval)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save_figure(figure, path)
