"""Training: the defaults table, reproducibility, early stopping and the run directory."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from headcache.config import TrainConfig
from headcache.errors import ConfigError
from headcache.features import CachedFeatures
from headcache.rundir import head_from_checkpoint
from headcache.train import cosine_lr, predict_split, train


def test_cosine_schedule_equals_torch_with_the_seeds_intended_settings():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=5e-4 * 1e-3)
    for epoch in range(50):
        assert cosine_lr(5e-4, epoch, 50) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-9)
        optimizer.step()
        scheduler.step()


@pytest.fixture(scope="module")
def run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(tiny_cache, out, TrainConfig(epochs=6, patience=6, device="cpu"), overwrite=True)


def test_run_directory_holds_every_file_with_real_contents(run):
    out = run.run_dir
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 5e-4 and config["splits"] == ["train", "valid", "test"]
    assert config["loss_constants"]["gamma"] == 3.0
    history = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in history] == list(range(6))
    assert {"train_loss", "val_loss", "val_auroc", "val_auprc", "lr", "seconds"} <= set(history[0])
    assert float(history[0]["lr"]) == pytest.approx(5e-4) and float(history[5]["lr"]) == pytest.approx(cosine_lr(5e-4, 5, 6))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == run.result.best_epoch and 0 <= metrics["best_epoch"] < 6
    assert set(metrics["val"]) >= {"auroc", "auroc_ci", "auprc", "auprc_ci", "accuracy", "f1", "balanced_accuracy"}
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best_row = history[metrics["best_epoch"]]
    assert float(best_row["val_auroc"]) == pytest.approx(metrics["val"]["auroc"], abs=1e-6)


def test_head_best_reproduces_the_reported_val_metrics(run, tiny_cache):
    checkpoint = torch.load(run.run_dir / "head_best.pt", weights_only=True)
    assert checkpoint["epoch"] == run.result.best_epoch and checkpoint["config"]["pool"] == "meanq"
    model = head_from_checkpoint(checkpoint)
    source = CachedFeatures(tiny_cache, pool="meanq", device=torch.device("cpu"))
    probs = predict_split(model, source, "valid", torch.arange(len(source.labels("valid"))))[0].numpy()
    saved = np.loadtxt(run.run_dir / "predictions_val.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    assert np.abs(probs - saved).max() < 1e-5


def test_same_seed_same_weights_other_seed_other_weights(tiny_cache, tmp_path):
    config = TrainConfig(epochs=2, device="cpu")
    a = train(tiny_cache, tmp_path / "a", config).result.last_state
    b = train(tiny_cache, tmp_path / "b", config).result.last_state
    c = train(tiny_cache, tmp_path / "c", TrainConfig(epochs=2, device="cpu", seed=1)).result.last_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_early_stopping_stops_after_patience_epochs_without_gain(tiny_cache, tmp_path):
    result = train(tiny_cache, tmp_path / "r", TrainConfig(epochs=40, patience=2, lr=1e-6, device="cpu")).result
    assert result.epochs_run == result.best_epoch + 3 < 40


def test_a_bank_refuses_heads_scored_on_different_val_splits(tiny_cache):
    from headcache.train import HeadTask, fit

    source = CachedFeatures(tiny_cache, pool="meanq", device=torch.device("cpu"))
    every = lambda split: torch.arange(len(source.labels(split)))  # noqa: E731
    config = TrainConfig(epochs=1, device="cpu")
    tasks = [HeadTask(config, ("train", every("train")), (val, every(val))) for val in ("valid", "test")]
    with pytest.raises(ConfigError, match="share their val split"):
        fit(source, tasks, num_classes=2, hidden_dim=16)
