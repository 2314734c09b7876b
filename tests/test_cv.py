"""Cross-validation: folds are stratified, disjoint and cover the joined split; all fold heads train as one
bank and each equals its fold trained alone; out-of-fold predictions are complete; mean ± std and the
seeded intervals are reproducible; refit; the `cv` command."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig
from headcache.cv import cross_validate, stratified_folds
from headcache.errors import ConfigError
from headcache.features import CachedFeatures
from headcache.metrics import bootstrap_intervals
from headcache.train import HeadTask, fit

FOLDS = 4
BASE = TrainConfig(epochs=6, patience=3, device="cpu")
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def cv(signal_cache, tmp_path_factory):
    """4-fold cv of 2 lrs x 2 seeds on train+valid, with refit: 16 fold heads in one bank."""
    return cross_validate(signal_cache, tmp_path_factory.mktemp("cv"), folds=FOLDS, base=BASE,
                          grid={"lr": ["1e-3", "3e-3"]}, seeds=(0, 1), refit=True)


@pytest.fixture(scope="module")
def joined(signal_cache):
    source = CachedFeatures(signal_cache, pool="meanq", device=torch.device("cpu"))
    return source.labels("train+valid").numpy(), source.ids("train+valid")


def _read(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


class TestFolds:
    def test_folds_are_scikit_learns_stratified_k_fold(self, joined):
        labels, _ = joined
        fold_of = stratified_folds(labels, FOLDS, seed=3)
        splitter = StratifiedKFold(FOLDS, shuffle=True, random_state=3)
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            assert np.array_equal(np.flatnonzero(fold_of == fold), held_out)
        assert not np.array_equal(fold_of, stratified_folds(labels, FOLDS, seed=4))

    def test_held_out_rows_are_disjoint_cover_the_split_and_are_stratified(self, cv, joined):
        labels, ids = joined
        assert cv.joined == "train+valid"
        for seed in (0, 1):
            held = [[r["id"] for r in _read(cv.out / "runs" / f"lr=1e-3_seed={seed}_fold={f}" / "predictions_val.csv")]
                    for f in range(FOLDS)]
            assert sum(len(h) for h in held) == len(set().union(*held)) == len(ids)  # disjoint, covering
            assert set().union(*held) == set(ids)
            share = labels.mean()
            for fold, fold_ids in enumerate(held):
                config = json.loads((cv.out / "runs" / f"lr=1e-3_seed={seed}_fold={fold}" / "config.json").read_text())
                assert config["cv"]["train_rows"] + config["cv"]["val_rows"] == len(ids)
                positives = labels[[ids.index(i) for i in fold_ids]].sum()
                assert abs(positives - share * len(fold_ids)) <= 1  # stratified: the split's class balance

    def test_all_fold_heads_train_as_one_bank(self, cv):
        assert len(cv.banks) == 1 and len(cv.banks[0]) == 2 * 2 * FOLDS

    def test_a_fold_head_equals_its_fold_trained_alone(self, cv, signal_cache):
        source = CachedFeatures(signal_cache, pool="meanq", device=torch.device("cpu"))
        held_out = cv.fold_of[1] == 2
        config = TrainConfig(**{**BASE.to_dict(), "lr": 3e-3, "seed": 1})
        task = HeadTask(config, ("train+valid", torch.from_numpy(np.flatnonzero(~held_out))),
                        ("train+valid", torch.from_numpy(np.flatnonzero(held_out))))
        [alone] = fit(source, [task], num_classes=2, hidden_dim=source.hidden_dim)
        in_bank = torch.load(cv.out / "runs" / "lr=3e-3_seed=1_fold=2" / "head_last.pt", weights_only=True)["state"]
        assert max(float((alone.last_state[k] - in_bank[k]).abs().max()) for k in in_bank) <= 1e-5


class TestResults:
    def test_oof_has_every_item_once_per_config_and_seed_from_its_fold(self, cv, joined):
        labels, ids = joined
        rows = _read(cv.out / "oof.csv")
        assert list(rows[0]) == ["config", "seed", "id", "fold", "label", "p0", "p1"]
        assert len(rows) == 2 * 2 * len(ids)
        for config in ("lr=1e-3", "lr=3e-3"):
            for seed in (0, 1):
                mine = [r for r in rows if r["config"] == config and int(r["seed"]) == seed]
                assert [r["id"] for r in mine] == ids and [int(r["label"]) for r in mine] == labels.tolist()
                assert [int(r["fold"]) for r in mine] == cv.fold_of[seed].tolist()
                assert all(abs(float(r["p0"]) + float(r["p1"]) - 1) < 1e-5 for r in mine)
                predicted = {r["id"]: r["p1"] for f in range(FOLDS) for r in
                             _read(cv.out / "runs" / f"{config}_seed={seed}_fold={f}" / "predictions_val.csv")}
                assert all(predicted[r["id"]] == r["p1"] for r in mine)  # each fold's best weights

    def test_summary_is_mean_and_std_of_the_folds(self, cv):
        assert len(cv.summary) == 4 and len(cv.folds) == 16
        for row in cv.summary:
            aurocs = [f["val_auroc"] for f in cv.folds if f["config"] == row["config"] and f["seed"] == row["seed"]]
            assert len(aurocs) == FOLDS
            assert row["val_auroc_mean"] == pytest.approx(np.mean(aurocs))
            assert row["val_auroc_std"] == pytest.approx(np.std(aurocs, ddof=1))
            assert row["oof_auroc_ci_low"] <= row["oof_auroc"] <= row["oof_auroc_ci_high"]
        means = [row["val_auroc_mean"] for row in cv.summary]
        assert means == sorted(means, reverse=True)
        assert _read(cv.out / "cv_summary.csv")[0]["config"] == cv.best["config"]
        assert json.loads((cv.out / "best_config.json").read_text())["train"]["seed"] == cv.best["seed"]

    def test_intervals_are_seeded_and_reproducible(self, cv, signal_cache, tmp_path):
        rows = [r for r in _read(cv.out / "oof.csv") if r["config"] == "lr=1e-3" and r["seed"] == "1"]
        probs = np.array([[float(r["p0"]), float(r["p1"])] for r in rows])
        labels = np.array([int(r["label"]) for r in rows])
        expected = bootstrap_intervals(probs, labels, seed=1)
        row = next(r for r in cv.summary if r["config"] == "lr=1e-3" and r["seed"] == 1)
        assert [row["oof_auroc_ci_low"], row["oof_auroc_ci_high"]] == pytest.approx(expected["auroc_ci"], abs=1e-5)
        assert bootstrap_intervals(probs, labels, seed=1) == expected != bootstrap_intervals(probs, labels, seed=2)
        again = cross_validate(signal_cache, tmp_path, folds=FOLDS, base=BASE, grid={"lr": ["1e-3", "3e-3"]},
                               seeds=(0, 1), refit=True)
        assert again.summary == cv.summary and again.folds == cv.folds
        assert (tmp_path / "oof.csv").read_text() == (cv.out / "oof.csv").read_text()

    def test_refit_trains_on_all_folds_for_the_mean_best_epoch_count(self, cv):
        for row in cv.summary:
            run_dir = cv.out / "refit" / f"{row['config']}_seed={row['seed']}"
            assert row["refit_epochs"] == max(1, round(row["best_epoch_mean"] + 1))
            config = json.loads((run_dir / "config.json").read_text())
            assert config["train"]["epochs"] == row["refit_epochs"] and config["splits"][0] == "train+valid"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert set(metrics) >= {"test"} and "val" not in metrics
            assert metrics["test"]["auroc"] == row["refit_test_auroc"]
            assert metrics["best_epoch"] == row["refit_epochs"] - 1
            best = torch.load(run_dir / "head_best.pt", weights_only=True)["state"]
            last = torch.load(run_dir / "head_last.pt", weights_only=True)["state"]
            assert all(torch.equal(best[k], last[k]) for k in best)  # no selection: the last weights


class TestErrors:
    @pytest.mark.parametrize("kwargs,message", [
        ({"folds": 1}, r"--folds must be an int in \[2, inf\); got 1"),
        ({"folds": 500}, "has only .* items, fewer than the folds; lower --folds"),
        ({"splits": ["train", "nope"]}, "no split 'nope'"),
        ({"splits": ["train", "train"]}, "distinct splits"),
        ({"grid": {"val_split": ["test"]}}, "grid key 'val_split' has no meaning here"),
    ])
    def test_bad_settings_are_refused_before_anything_is_written(self, signal_cache, tmp_path, kwargs, message):
        with pytest.raises(ConfigError, match=message):
            cross_validate(signal_cache, tmp_path / "out", **{"base": BASE, **kwargs})
        assert not (tmp_path / "out").exists()


class TestCommand:
    def test_cv_prints_mean_std_and_intervals_and_writes_its_files(self, signal_cache, tmp_path):
        result = runner.invoke(app, ["cv", "--cache", str(signal_cache), "--out", str(tmp_path / "cv"), "--folds", "3",
                                     "--splits", "train,valid", "--epochs", "2", "--device", "cpu", "--refit",
                                     "--grid", "head=mlp,linear", "--quiet"])
        assert result.exit_code == 0, result.output
        assert "3-fold cv on train+valid" in result.output and "±" in result.output
        assert "refit test AUROC" in result.output
        for name in ("cv_summary.csv", "cv_folds.csv", "oof.csv", "cv.png", "best_config.json"):
            assert (tmp_path / "cv" / name).is_file(), name
        assert len(list((tmp_path / "cv" / "runs").iterdir())) == 6
        assert len(list((tmp_path / "cv" / "refit").iterdir())) == 2

    @pytest.mark.parametrize("args,message", [
        (["--folds", "1"], "--folds must be an int in [2, inf); got 1"),
        (["--splits", "train,nope"], "--splits: the cache has no split 'nope'"),
        (["--grid", "colour=red"], "unknown grid key 'colour'"),
    ])
    def test_user_errors_exit_1_with_one_message(self, signal_cache, tmp_path, args, message):
        result = runner.invoke(app, ["cv", "--cache", str(signal_cache), "--out", str(tmp_path / "cv"),
                                     "--device", "cpu", *args])
        assert result.exit_code == 1, result.output
        assert "error:" in result.output and "Traceback" not in result.output
        assert message in " ".join(result.output.split()), result.output


def test_cv_over_layers_and_a_mix_shares_one_bank_and_refits(tmp_path, layered_cache):
    """A layer grid in cv: every fold head of every layer and the mix in one bank; the mix's fold heads and
    its refit keep their learned layer weights, and the refit is scored through its own layers."""
    from headcache.cv import cross_validate

    result = cross_validate(layered_cache, tmp_path / "cv", folds=2, splits=("train", "valid"),
                            base=TrainConfig(epochs=2, device="cpu", hidden=4), grid={"layer": ["0", "5", "mix"]},
                            refit=True)
    assert [len(bank) for bank in result.banks] == [3 * 2]  # 3 layers x 2 folds, one batched computation
    runs = {}
    for metrics in (tmp_path / "cv").rglob("metrics.json"):
        layer = json.loads((metrics.parent / "config.json").read_text())["train"]["layer"]
        runs.setdefault(layer, []).append(json.loads(metrics.read_text()))
    assert sorted(runs) == ["0", "5", "mix"] and len(runs["mix"]) == 3  # 2 folds + the refit
    assert all(sorted(m["layer_weights"]) == ["0", "2", "5"] for m in runs["mix"])
    assert not any("layer_weights" in m for m in runs["0"] + runs["5"])
    assert all(0.0 <= row["refit_test_auroc"] <= 1.0 for row in result.summary)
