"""Training: the defaults table, reproducibility, early stopping, the run directory, and banks over layers."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from headcache.config import TrainConfig
from headcache.errors import ConfigError
from headcache.features import CachedFeatures
from headcache.rundir import head_from_checkpoint
from headcache.stream import EpochSampler
from headcache.train import HeadTask, cosine_lr, fit, layer_view, predict_split, tasks_for_splits, train


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


# ---------------------------------------------------------------------------- unlabelled splits
# NOTE [ Unlabelled items ] in train.py: label -1 in the cache


@pytest.fixture(scope="module")
def unlabelled_cache(tmp_path_factory):
    """A cache (d=8) with labelled train/valid/test, a split 'fresh' with no labels at all and a split
    'mixed' where 3 of 20 items have none."""
    from headcache.pooling import PARAMETER_FREE_POOLS, pool_parameter_free
    from headcache.store import CacheWriter

    rng = np.random.default_rng(1)
    d = 8
    path = tmp_path_factory.mktemp("unlabelled") / "cache.h5"
    attrs = {"backbone_fingerprint": "u" * 64, "spec": "test", "checkpoint_sha256": "0" * 64, "hidden_dim": d,
             "dtype": "float32", "load_report": {}}
    labels = {"train": rng.integers(0, 2, 64), "valid": np.array([0, 1] * 12), "test": np.array([0, 1] * 10),
              "fresh": np.full(20, -1), "mixed": np.array([0, 1] * 10)}
    labels["mixed"][[2, 5, 11]] = -1
    with CacheWriter(path, attrs) as writer:
        for name, y in labels.items():
            split = writer.split(name, len(y), list(PARAMETER_FREE_POOLS))
            tokens = [(rng.standard_normal((int(rng.integers(2, 7)), d)) + max(label, 0)).astype(np.float32)
                      for label in y]
            pooled = {pool: np.stack([pool_parameter_free(pool, torch.from_numpy(t)[None],
                                                          torch.ones(1, len(t), dtype=torch.bool))[0].numpy()
                                      for t in tokens]) for pool in PARAMETER_FREE_POOLS}
            split.write(tokens, y.astype(np.int64), [f"{name}-{i}" for i in range(len(y))], pooled)
            split.finish()
    return path


@pytest.mark.parametrize("role, split, flag, what", [
    ("train_split", "fresh", "--train-split", "split 'fresh' is unlabelled"),
    ("val_split", "fresh", "--val-split", "split 'fresh' is unlabelled"),
    ("train_split", "mixed", "--train-split", "split 'mixed' has 3 unlabelled items (of 20)"),
    ("val_split", "mixed", "--val-split", "split 'mixed' has 3 unlabelled items (of 20)"),
])
def test_train_refuses_an_unlabelled_train_or_val_split_naming_it_and_the_flag(unlabelled_cache, tmp_path, role,
                                                                               split, flag, what):
    from headcache.errors import DataError

    config = TrainConfig(epochs=1, device="cpu", **{role: split})
    with pytest.raises(DataError) as error:
        train(unlabelled_cache, tmp_path / "run", config)
    message = str(error.value)
    assert what in message and flag in message and f"the {role.split('_')[0]} split needs a label" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_sweep_refuses_an_unlabelled_train_split(unlabelled_cache, tmp_path):
    from headcache.errors import DataError
    from headcache.sweep import sweep

    with pytest.raises(DataError, match="split 'fresh' is unlabelled.*--train-split"):
        sweep(unlabelled_cache, tmp_path / "sweep", {"lr": [1e-3, 1e-4]}, base=TrainConfig(epochs=1, device="cpu",
                                                                                            train_split="fresh"))


@pytest.mark.parametrize("splits, what", [(["train", "fresh"], "36"), (["mixed"], "3")])
def test_cv_refuses_unlabelled_splits_naming_them_and_the_flag(unlabelled_cache, tmp_path, splits, what):
    """Checked before the folds are cut (they would count -1 as a class)."""
    from headcache.cv import cross_validate
    from headcache.errors import DataError

    with pytest.raises(DataError) as error:
        cross_validate(unlabelled_cache, tmp_path / "cv", folds=2, splits=splits,
                       base=TrainConfig(epochs=1, device="cpu"))
    message = str(error.value)
    joined = "+".join(splits)
    assert f"split {joined!r} has {'20' if what == '36' else '3'} unlabelled items" in message
    assert "cross-validation needs a label for every item" in message and "--splits" in message
    assert not (tmp_path / "cv").exists()


@pytest.mark.parametrize("test_split", ["fresh", "mixed"])
def test_an_unlabelled_test_split_gets_predictions_and_no_metrics_with_a_warning(unlabelled_cache, tmp_path,
                                                                                 test_split):
    with pytest.warns(UserWarning, match=f"split '{test_split}' has (20|3) unlabelled items .*no test metrics"):
        result = train(unlabelled_cache, tmp_path / "run", TrainConfig(epochs=3, device="cpu", test_split=test_split))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(result.metrics) == {"val"} and "test" not in metrics and metrics["val"]["auroc"] is not None
    rows = list(csv.DictReader(open(result.run_dir / "predictions_test.csv")))
    assert [r["id"] for r in rows] == [f"{test_split}-{i}" for i in range(20)]
    model = head_from_checkpoint(torch.load(result.run_dir / "head_best.pt", weights_only=True))
    source = CachedFeatures(unlabelled_cache, pool="meanq", device=torch.device("cpu"))
    probs = predict_split(model, source, test_split, torch.arange(20))[0].numpy()
    saved = np.array([[float(r["p0"]), float(r["p1"])] for r in rows])
    assert np.abs(probs - saved).max() <= 1e-5


def test_sweep_and_cv_refit_with_an_unlabelled_test_split_predict_it_without_metrics(unlabelled_cache, tmp_path):
    from headcache.cv import cross_validate
    from headcache.sweep import sweep

    base = TrainConfig(epochs=2, device="cpu", test_split="fresh")
    with pytest.warns(UserWarning, match="split 'fresh' has 20 unlabelled items"):
        swept = sweep(unlabelled_cache, tmp_path / "sweep", {"lr": [1e-3, 1e-4]}, base=base)
    assert all(row["test_auroc"] is None and row["val_auroc"] is not None for row in swept.leaderboard)
    for row in swept.leaderboard:
        run_dir = tmp_path / "sweep" / "runs" / row["run"]
        assert "test" not in json.loads((run_dir / "metrics.json").read_text())
        assert len(list(csv.DictReader(open(run_dir / "predictions_test.csv")))) == 20
    with pytest.warns(UserWarning, match="split 'fresh' has 20 unlabelled items"):
        cv = cross_validate(unlabelled_cache, tmp_path / "cv", folds=2, base=base, refit=True)
    [row] = cv.summary
    assert row["refit_test_auroc"] is None and row["test_auroc_mean"] is None and row["val_auroc_mean"] is not None
    refit = tmp_path / "cv" / "refit" / "seed=0"
    assert "test" not in json.loads((refit / "metrics.json").read_text())
    assert [r["id"] for r in csv.DictReader(open(refit / "predictions_test.csv"))] == [f"fresh-{i}" for i in range(20)]


# ---------------------------------------------------------------------------- layers

LAYERED_SPLITS = ("train", "valid", "test")
SCHEMA1 = Path(__file__).with_name("data") / "schema1_tiny.h5"  # written by the first version: one layer, -1


def _layer_configs(pool: str, layers: list[str], seeds: list[int], epochs: int = 4) -> list[TrainConfig]:
    return [TrainConfig(pool=pool, layer=layer, epochs=epochs, patience=epochs, device="cpu", seed=seed)
            for layer, seed in zip(layers, seeds)]


def _fit_bank(cache, configs):
    source = CachedFeatures(cache, pool=configs[0].pool, device=torch.device("cpu"), layer=layer_view(configs))
    return fit(source, tasks_for_splits(configs, source, LAYERED_SPLITS), num_classes=2, hidden_dim=8)


def _assert_identical(a, b):
    """The same head, bit for bit: weights, epochs, history, predictions and metrics."""
    assert (a.best_epoch, a.epochs_run, a.history[-1]["val_loss"]) == (b.best_epoch, b.epochs_run,
                                                                      b.history[-1]["val_loss"])
    for state in ("best_state", "last_state"):
        mine, other = getattr(a, state), getattr(b, state)
        assert set(mine) == set(other) and all(torch.equal(mine[n], other[n]) for n in mine), state
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert all(np.array_equal(a.predictions[role], b.predictions[role]) for role in b.predictions)
    assert a.metrics["test"]["auroc"] == b.metrics["test"]["auroc"]


def test_layer_view_is_the_one_layer_of_the_bank_or_all():
    def view(*layers):
        return layer_view([TrainConfig(layer=layer) for layer in layers])

    assert (view("last"), view("last", "last"), view("3", "3"), view("-1")) == ("last", "last", 3, -1)
    assert view("mix") == view("3", "5") == view("last", "3") == view("3", "mix") == "all"


@pytest.mark.parametrize("pool", ["meanq", "learned"])
@pytest.mark.parametrize("seeds", [[0, 1, 2], [0, 0, 0]], ids=["own orders", "one order"])
def test_a_fixed_layer_head_of_a_layer_sweep_trains_bit_for_bit_as_in_a_one_layer_bank(layered_cache, pool, seeds):
    """A layer sweep is one bank over the (N, L, D) matrix (or every token layer): a head reading layer i
    of it trains exactly what it trains in the same bank (K, seeds) opened on layer i alone, today's path."""
    sweep = _fit_bank(layered_cache, _layer_configs(pool, ["0", "5", "mix"], seeds))
    for k, layer in enumerate(["0", "5"]):
        one_layer = _fit_bank(layered_cache, _layer_configs(pool, [layer] * 3, seeds))
        _assert_identical(sweep[k], one_layer[k])
        assert sweep[k].layer_weights is None and "mix.logits" not in sweep[k].best_state
    if seeds == [0, 1, 2]:  # and, as any head of a bank, what it trains alone to the bank tolerance
        [alone] = _fit_bank(layered_cache, _layer_configs(pool, ["5"], [1]))
        _assert_scored_alike(sweep[1], alone)


def test_a_mix_head_reports_the_softmax_of_its_best_logits_per_layer_id(layered_cache):
    [mixed] = _fit_bank(layered_cache, _layer_configs("meanq", ["mix"], [0], epochs=6))
    logits = mixed.best_state["mix.logits"]
    assert logits.shape == (3,) and logits.abs().max() > 1e-3  # learned: no longer the even start
    weights = torch.softmax(logits, 0).tolist()
    assert list(mixed.layer_weights) == [0, 2, 5] and list(mixed.layer_weights.values()) == weights
    assert sum(weights) == pytest.approx(1.0, abs=1e-6)
    assert max(abs(w - 1 / 3) for w in weights) > 1e-4


def test_fit_refuses_a_source_opened_on_another_view_than_its_heads(layered_cache, layered_cache_last_tokens):
    cpu = torch.device("cpu")

    def attempt(cache, layer, configs):
        source = CachedFeatures(cache, pool=configs[0].pool, device=cpu, layer=layer)
        fit(source, tasks_for_splits(configs, source, LAYERED_SPLITS), num_classes=2, hidden_dim=8)

    with pytest.raises(ConfigError, match="the heads read layer view 2 but the feature source was opened on all "
                                          r"layers: open it with layer=layer_view\(configs\)"):
        attempt(layered_cache, "all", _layer_configs("meanq", ["2"], [0]))
    with pytest.raises(ConfigError, match="the heads read layer view 'all' but the feature source was opened on "
                                          "layer 5"):
        attempt(layered_cache, "last", _layer_configs("meanq", ["5", "mix"], [0, 1]))
    with pytest.raises(ConfigError, match="--layer 5: this feature source was opened on layer 2 only"):
        attempt(layered_cache, 2, _layer_configs("meanq", ["5"], [0]))
    with pytest.raises(ConfigError, match="--layer 7: the cache has no layer 7; its layers are 0, 2, 5"):
        attempt(layered_cache, "all", _layer_configs("meanq", ["7", "mix"], [0, 1]))
    with pytest.raises(ConfigError, match=r"--layer mix: the features have one token layer \(5\), so there is "
                                          r"nothing to mix; .*--token-layers all"):
        attempt(layered_cache_last_tokens, "all", _layer_configs("learned", ["mix"], [0]))


class _TodaysSchema1Source:
    """What a source read from a schema-1 cache before layers, by hand: rows of the file's (N, D) matrix."""

    eval_rows, layers, layered = 256, [-1], False

    def __init__(self, path, pool: str):
        with h5py.File(path, "r") as f:
            self.pooled = torch.from_numpy(np.asarray(f[f"train/pooled/{pool}"][:]))
            self.train_labels = torch.from_numpy(np.asarray(f["train/labels"][:]))

    def labels(self, split):
        return self.train_labels

    def sampler(self, split, rows, generators, *, batch_size):
        return EpochSampler(rows, generators, batch_size=batch_size, split=split)

    def batch(self, split, rows):
        return self.pooled[rows]

    def position(self, layer):
        assert layer in ("last", -1)
        return 0


def test_a_schema1_cache_trains_as_before_layers():
    config = TrainConfig(pool="mean", epochs=3, patience=3, batch_size=2, device="cpu", val_split="train",
                         test_split=None)
    splits = ("train", "train", None)
    results = []
    for source in (CachedFeatures(SCHEMA1, pool="mean", device=torch.device("cpu")),
                   _TodaysSchema1Source(SCHEMA1, "mean")):
        assert source.layers == [-1]
        results += fit(source, tasks_for_splits([config], source, splits), num_classes=2, hidden_dim=3)
    ours, todays = results
    assert ours.epochs_run == 3 and ours.history[0]["train_loss"] > 0
    for state in ("best_state", "last_state"):
        assert all(torch.equal(getattr(ours, state)[n], getattr(todays, state)[n]) for n in getattr(todays, state))
    assert np.array_equal(ours.predictions["val"], todays.predictions["val"]) and ours.layer_weights is None
    for layer in ("-1", "mix"):
        mixed = TrainConfig(**{**config.to_dict(), "layer": layer})
        source = CachedFeatures(SCHEMA1, pool="mean", device=torch.device("cpu"), layer=layer_view([mixed]))
        if layer == "mix":
            with pytest.raises(ConfigError, match=r"--layer mix: the features have one layer \(-1\)"):
                fit(source, tasks_for_splits([mixed], source, splits), num_classes=2, hidden_dim=3)
        else:
            [same] = fit(source, tasks_for_splits([mixed], source, splits), num_classes=2, hidden_dim=3)
            assert all(torch.equal(same.last_state[n], ours.last_state[n]) for n in ours.last_state)
