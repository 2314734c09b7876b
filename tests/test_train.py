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
from headcache.train import HeadTask, cosine_lr, fit, predict_split, train


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


def _task(source, config, val, test=None, train="train"):
    every = lambda split: torch.arange(len(source.labels(split)))  # noqa: E731
    return HeadTask(config, (train, every(train)), (val, every(val)), (test, every(test)) if test else None)


def _assert_scored_alike(in_bank, alone):
    """The same head, trained in a bank and alone: same weights (to 1e-5, as the sweep proof), epochs and
    scores (to 1e-6) on the same roles."""
    assert (in_bank.best_epoch, in_bank.epochs_run) == (alone.best_epoch, alone.epochs_run)
    assert max(float((in_bank.best_state[n] - alone.best_state[n]).abs().max()) for n in alone.best_state) <= 1e-5
    assert set(in_bank.metrics) == set(alone.metrics) == set(in_bank.predictions)
    for role, metrics in alone.metrics.items():
        assert np.abs(in_bank.predictions[role] - alone.predictions[role]).max() <= 1e-6
        for name, value in metrics.items():
            assert np.allclose(np.array(in_bank.metrics[role][name], dtype=float), np.array(value, dtype=float),
                               atol=1e-6, rtol=0, equal_nan=True), (role, name)


@pytest.fixture(scope="module")
def signal_source(signal_cache):
    return CachedFeatures(signal_cache, pool="meanq", device=torch.device("cpu"))


def test_each_head_of_a_bank_is_scored_on_its_own_test_split(signal_source):
    tasks = [_task(signal_source, TrainConfig(epochs=4, patience=4, device="cpu", seed=0), "valid", "test"),
             _task(signal_source, TrainConfig(epochs=4, patience=4, device="cpu", seed=1), "valid", "valid")]
    bank = fit(signal_source, tasks, num_classes=2, hidden_dim=16)
    for task, in_bank in zip(tasks, bank):
        [alone] = fit(signal_source, [task], num_classes=2, hidden_dim=16)
        _assert_scored_alike(in_bank, alone)
    # the second head's "test" is the valid split: its test scores are its val scores, not the test split's
    assert bank[1].metrics["test"]["auroc"] == pytest.approx(bank[1].metrics["val"]["auroc"], abs=1e-12)
    assert bank[0].metrics["test"]["auroc"] != pytest.approx(bank[1].metrics["test"]["auroc"], abs=1e-3)


def test_a_head_without_a_test_split_leaves_the_others_test_scores_as_alone(signal_source):
    with_test = _task(signal_source, TrainConfig(epochs=4, patience=4, device="cpu", seed=0), "valid", "test")
    without = _task(signal_source, TrainConfig(epochs=4, patience=4, device="cpu", seed=1), "valid")
    bank = fit(signal_source, [without, with_test], num_classes=2, hidden_dim=16)
    [alone] = fit(signal_source, [with_test], num_classes=2, hidden_dim=16)
    _assert_scored_alike(bank[1], alone)
    assert set(bank[1].metrics) == {"val", "test"} and set(bank[0].metrics) == set(bank[0].predictions) == {"val"}


def test_heads_of_a_bank_may_monitor_different_val_splits(signal_source):
    """Each head stops early on its own val split, as it would alone."""
    tasks = [_task(signal_source, TrainConfig(epochs=6, patience=2, device="cpu"), val, "test")
             for val in ("valid", "test")]
    bank = fit(signal_source, tasks, num_classes=2, hidden_dim=16)
    for task, in_bank in zip(tasks, bank):
        [alone] = fit(signal_source, [task], num_classes=2, hidden_dim=16)
        _assert_scored_alike(in_bank, alone)
        assert [r["val_auroc"] for r in in_bank.history] == pytest.approx([r["val_auroc"] for r in alone.history],
                                                                          abs=1e-6)
    assert bank[0].history[0]["val_auroc"] != pytest.approx(bank[1].history[0]["val_auroc"], abs=1e-3)


def test_fit_changes_none_of_its_arguments(signal_source):
    tasks = [_task(signal_source, TrainConfig(epochs=2, device="cpu", seed=s), "valid", test)
             for s, test in ((0, "test"), (1, None))]
    before = [(t.config, t.train[0], t.train[1].clone(), t.val[0], t.val[1].clone(),
               None if t.test is None else (t.test[0], t.test[1].clone())) for t in tasks]
    labels = {split: signal_source.labels(split).clone() for split in ("train", "valid", "test")}
    fit(signal_source, tasks, num_classes=2, hidden_dim=16)
    for t, (config, train_split, train_rows, val_split, val_rows, test) in zip(tasks, before):
        assert t.config == config and (t.train[0], t.val[0]) == (train_split, val_split)
        assert torch.equal(t.train[1], train_rows) and torch.equal(t.val[1], val_rows)
        assert (t.test is None) == (test is None) and (test is None or (t.test[0] == test[0]
                                                                         and torch.equal(t.test[1], test[1])))
    assert all(torch.equal(signal_source.labels(split), y) for split, y in labels.items())


def test_a_bank_refuses_heads_on_different_train_splits(tiny_cache):
    """Every step is one batch of one train split for all heads of a bank."""
    source = CachedFeatures(tiny_cache, pool="meanq", device=torch.device("cpu"))
    tasks = [_task(source, TrainConfig(epochs=1, device="cpu"), "valid", train=train) for train in ("train", "test")]
    with pytest.raises(ConfigError, match="share their train split"):
        fit(source, tasks, num_classes=2, hidden_dim=16)
