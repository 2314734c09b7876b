"""The run directory format: its one owner.

A run directory holds ``config.json`` (written first: everything the run
used), ``history.csv``, ``head_best.pt``, ``head_last.pt``, ``curves.png``,
``predictions_<split>.csv`` and ``metrics.json``, written last: a directory
without metrics.json is unfinished. Sweeps and cross-validation write one run
directory per head in this same format, plus their tables and plots (also here).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from headcache.config import TrainConfig
from headcache.errors import OutputExistsError
from headcache.head import HeadModel, get_head
from headcache.pooling import create_pool

if TYPE_CHECKING:  # for type hints only: the loop sits above this module
    from headcache.train import FitResult

RUN_FILES = ("config.json", "metrics.json", "history.csv", "head_best.pt", "head_last.pt", "curves.png")


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create ``out``; refuse one that holds files unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {out} already exists and is not empty; pass --overwrite to replace "
                                "its files, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    return out



def write_config(out: Path, config: TrainConfig, **context: Any) -> None:
    """config.json, written before the first epoch."""
    (out / "config.json").write_text(json.dumps({"train": config.to_dict(), **context}, indent=2, default=str))


def save_run(out: Path, result: FitResult, *, hidden_dim: int, num_classes: int, fingerprint: str,
             ids: dict[str, list[str]] | None = None) -> None:
    """metrics.json, history.csv, head_best.pt, head_last.pt and curves.png of one head, and
    predictions_<role>.csv for each evaluated role whose item ids are given."""
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    config.update({"loss_constants": result.loss.to_dict(), "monitor": result.monitor})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    metrics = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "monitor": result.monitor,
               **result.metrics}
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2))
    with open(out / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.history[0]))
        writer.writeheader()
        writer.writerows(result.history)
    for name, state, epoch in (("head_best.pt", result.best_state, result.best_epoch),
                               ("head_last.pt", result.last_state, result.epochs_run - 1)):
        torch.save(head_checkpoint(result, state, epoch, hidden_dim, num_classes, fingerprint), out / name)
    plot_curves(result.history, out / "curves.png", best_epoch=result.best_epoch)
    for role, probs in result.predictions.items():
        if ids and role in ids:
            write_predictions(out / f"predictions_{role}.csv", ids[role], probs)


def write_predictions(path: Path, ids: Sequence[str], probs: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id"] + [f"p{c}" for c in range(probs.shape[1])])
        for item_id, row in zip(ids, probs):
            writer.writerow([item_id] + [f"{v:.6g}" for v in row])


def head_checkpoint(result: FitResult, state: dict[str, Tensor], epoch: int, hidden_dim: int,
                    num_classes: int, fingerprint: str) -> dict:
    """A head file: everything export and predict need, loadable with weights_only=True."""
    return {"format": "headcache-head", "version": 1, "config": result.config.to_dict(), "epoch": epoch,
            "monitor": result.monitor, "best_value": result.best_value, "hidden_dim": hidden_dim,
            "num_classes": num_classes, "backbone_fingerprint": fingerprint, "state": state}


def head_from_checkpoint(checkpoint: dict) -> nn.Module:
    """Rebuild a trained pool + head (eval mode) from a head file's contents."""
    config = TrainConfig(**checkpoint["config"])
    bank = get_head(config.head)(1, checkpoint["hidden_dim"], checkpoint["num_classes"], config.hidden,
                    [config.dropout])
    pool = create_pool(config.pool, num_heads=1, dim=checkpoint["hidden_dim"])
    model = HeadModel(bank, pool)
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


def plot_curves(history: list[dict], path: Path, *, best_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="val loss")
    ax_metric.plot(epochs, [r["val_auroc"] for r in history], label="val AUROC")
    ax_metric.plot(epochs, [r["val_auprc"] for r in history], label="val AUPRC")
    for ax in (ax_loss, ax_metric):
        if best_epoch >= 0:
            ax.axvline(best_epoch, color="grey", linestyle=":", label="best epoch")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_table(stem: Path, rows: list[dict]) -> None:
    """``stem``.csv and ``stem``.json of the same rows."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    write_json(stem.with_suffix(".json"), rows)


def write_json(path: Path, value: Any) -> None:
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
