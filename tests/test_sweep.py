"""Sweeps: a head trained inside a bank is the head `train` trains alone (to 1e-5, and the check is shown
to fail when the head's seed or lr differs); per-head settings really act; the leaderboard, run
directories and plots; the `sweep` command."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig
from headcache.errors import ConfigError
from headcache.rundir import RUN_FILES
from headcache.sweep import expand_grid, sweep
from headcache.train import train

TOLERANCE = 1e-5
GRID = {"lr": ["1e-3", "3e-3"], "weight_decay": ["0", "0.1"]}
SEEDS = (0, 1)
runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that table cells do not wrap


def _state(run_dir, name: str) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / name, weights_only=True)["state"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def _base(pool: str) -> TrainConfig:
    # patience 3 of 10 epochs: heads stop at different epochs, so per-head early stopping is exercised too
    return TrainConfig(pool=pool, epochs=10, patience=3, device="cpu")


@pytest.fixture(scope="module", params=["meanq", "learned"])
def swept(request, signal_cache, tmp_path_factory):
    """(pool, SweepResult) of lr x weight_decay x 2 seeds = 8 mlp heads in one bank."""
    out = tmp_path_factory.mktemp(f"sweep_{request.param}")
    return request.param, sweep(signal_cache, out, GRID, seeds=SEEDS, base=_base(request.param))


class TestEquivalence:
    """NOTE [ Equivalence principle ] for banks: head k of a bank computes what a bank of head k alone does."""

    @pytest.mark.parametrize("run", ["lr=1e-3_weight_decay=0_seed=0", "lr=3e-3_weight_decay=0.1_seed=1"])
    def test_sweep_head_equals_the_standalone_train_run(self, swept, run, signal_cache, tmp_path):
        pool, result = swept
        assert len(result.banks) == 1 and len(result.banks[0]) == 8  # one batched computation
        head = next(h for h in expand_grid(GRID, SEEDS, _base(pool)) if h.name == run)
        alone = train(signal_cache, tmp_path / "alone", head.config)
        in_bank = result.out / "runs" / run
        for name in ("head_best.pt", "head_last.pt"):
            diff = _max_diff(_state(in_bank, name), _state(alone.run_dir, name))
            assert diff <= TOLERANCE, f"{pool} {run} {name}: weights differ by {diff:.3g}"
        metrics = json.loads((in_bank / "metrics.json").read_text())
        assert metrics["best_epoch"] == alone.result.best_epoch and metrics["epochs_run"] == alone.result.epochs_run
        assert metrics["val"]["auroc"] == pytest.approx(alone.metrics["val"]["auroc"], abs=1e-6)

    @pytest.mark.parametrize("change", [{"seed": 1}, {"lr": 3e-3}])
    def test_the_check_fails_for_another_seed_or_lr(self, swept, change, signal_cache, tmp_path):
        """The guard works: a standalone run that differs from the bank head in one setting trains other weights."""
        pool, result = swept
        other = train(signal_cache, tmp_path / "other", TrainConfig(**{**_base(pool).to_dict(), "lr": 1e-3,
                                                                       "weight_decay": 0.0, **change}))
        in_bank = result.out / "runs" / "lr=1e-3_weight_decay=0_seed=0"
        assert _max_diff(_state(in_bank, "head_last.pt"), _state(other.run_dir, "head_last.pt")) > 100 * TOLERANCE

    def test_each_head_gets_its_own_lr_and_weight_decay(self, swept):
        _, result = swept
        last = {run: _state(result.out / "runs" / run, "head_last.pt") for run in result.results}
        assert _max_diff(last["lr=1e-3_weight_decay=0_seed=0"], last["lr=3e-3_weight_decay=0_seed=0"]) > 1e-3
        assert _max_diff(last["lr=1e-3_weight_decay=0_seed=0"], last["lr=1e-3_weight_decay=0.1_seed=0"]) > 1e-4
        assert _max_diff(last["lr=1e-3_weight_decay=0_seed=0"], last["lr=1e-3_weight_decay=0_seed=1"]) > 1e-3


class TestOutputs:
    def test_leaderboard_has_one_sorted_row_per_head(self, swept):
        _, result = swept
        rows = list(csv.DictReader(open(result.out / "leaderboard.csv")))
        assert len(rows) == len(result.leaderboard) == 2 * 2 * len(SEEDS)
        assert {"run", "lr", "weight_decay", "seed", "best_epoch", "val_auroc", "val_auroc_ci_low",
                "val_auroc_ci_high", "val_auprc", "test_auroc", "test_auprc"} <= set(rows[0])
        aurocs = [float(r["val_auroc"]) for r in rows]
        assert aurocs == sorted(aurocs, reverse=True)
        assert {r["run"] for r in rows} == set(result.results)
        assert json.loads((result.out / "leaderboard.json").read_text()) == result.leaderboard
        assert all(float(r["val_auroc_ci_low"]) <= float(r["val_auroc"]) <= float(r["val_auroc_ci_high"]) for r in rows)

    def test_leaderboard_values_are_the_runs_metrics(self, swept):
        _, result = swept
        for row in result.leaderboard:
            metrics = json.loads((result.out / "runs" / row["run"] / "metrics.json").read_text())
            assert row["val_auroc"] == metrics["val"]["auroc"] and row["test_auprc"] == metrics["test"]["auprc"]
            assert [row["val_auroc_ci_low"], row["val_auroc_ci_high"]] == metrics["val"]["auroc_ci"]
            assert row["best_epoch"] == metrics["best_epoch"]

    def test_every_head_has_a_train_run_directory_and_the_sweep_its_files(self, swept):
        _, result = swept
        for run in result.results:
            assert all((result.out / "runs" / run / name).is_file() for name in RUN_FILES)
            config = json.loads((result.out / "runs" / run / "config.json").read_text())
            assert config["sweep"]["run"] == run and config["train"]["seed"] in SEEDS
        assert (result.out / "sweep.png").stat().st_size > 0
        best = json.loads((result.out / "best_config.json").read_text())
        assert best["run"] == result.best["run"] and best["val_auroc"] == result.best["val_auroc"]
        assert TrainConfig(**best["train"]).lr == result.best["lr"]

    def test_heads_that_read_other_features_train_in_other_banks(self, signal_cache, tmp_path):
        result = sweep(signal_cache, tmp_path, {"head": ["mlp", "linear"], "lr": ["1e-3", "2e-3"]},
                       base=TrainConfig(epochs=2, device="cpu"))
        assert sorted(map(sorted, result.banks)) == [
            ["head=linear_lr=1e-3_seed=0", "head=linear_lr=2e-3_seed=0"],
            ["head=mlp_lr=1e-3_seed=0", "head=mlp_lr=2e-3_seed=0"]]


class TestGridErrors:
    """Checked before anything is written."""

    @pytest.mark.parametrize("grid,message", [
        ({"colour": ["red"]}, "unknown grid key 'colour'; valid keys: pool, head, loss, lr, weight_decay"),
        ({"seed": ["1"]}, "--seeds"),
        ({"lr": ["fast"]}, r"--lr must be a float in \(0, inf\); got 'fast'"),
        ({"lr": ["-1"]}, r"--lr must be a float in \(0, inf\); got -1"),
        ({"lr": []}, "grid key 'lr' needs a list of values"),
        ({"lr": ["1e-3", "0.001"]}, "have the same config"),
        ({"weight-decay": ["0"], "weight_decay": ["1"]}, "name one setting twice"),
    ])
    def test_bad_grid_is_refused_naming_the_key(self, signal_cache, tmp_path, grid, message):
        with pytest.raises(ConfigError, match=message):
            sweep(signal_cache, tmp_path / "out", grid)
        assert not (tmp_path / "out").exists()

    def test_bad_seeds_are_refused(self, signal_cache, tmp_path):
        with pytest.raises(ConfigError, match="^--seeds: seeds must be integers >= 0"):
            sweep(signal_cache, tmp_path / "out", {}, seeds=[-1])
        with pytest.raises(ConfigError, match="^--seeds 0,0 repeats a seed"):
            sweep(signal_cache, tmp_path / "out", {}, seeds=[0, 0])

    def test_a_bad_grid_value_names_the_grid_point_and_the_setting(self, signal_cache, tmp_path):
        with pytest.raises(ConfigError, match=r"^--grid lr=-1,head=mlp: --lr must be a float in \(0, inf\)"):
            sweep(signal_cache, tmp_path / "out", {"lr": ["1e-3", "-1"], "head": ["mlp"]})
        assert not (tmp_path / "out").exists()

    def test_names_and_order_follow_the_grid_then_the_seeds(self):
        heads = expand_grid({"lr": ["1e-3", "2e-3"], "head": ["linear"]}, [3, 4], TrainConfig())
        assert [h.name for h in heads] == ["lr=1e-3_head=linear_seed=3", "lr=1e-3_head=linear_seed=4",
                                           "lr=2e-3_head=linear_seed=3", "lr=2e-3_head=linear_seed=4"]
        assert heads[2].config.lr == 2e-3 and heads[2].config.seed == 3 and heads[2].config.head == "linear"


class TestCommand:
    def test_sweep_prints_the_leaderboard_and_writes_every_file(self, signal_cache, tmp_path):
        result = runner.invoke(app, ["sweep", "--cache", str(signal_cache), "--out", str(tmp_path / "s"),
                                     "--grid", "lr=1e-3,2e-3", "--grid", "head=mlp,linear", "--seeds", "0,1",
                                     "--epochs", "2", "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        assert "8 heads, best val AUROC first" in result.output and "2 batched banks" in result.output
        assert "lr=1e-3_head=linear_seed=1" in result.output and "[" in result.output  # names and CIs
        assert len(list(csv.DictReader(open(tmp_path / "s" / "leaderboard.csv")))) == 8
        assert len(list((tmp_path / "s" / "runs").iterdir())) == 8
        config = json.loads((tmp_path / "s" / "runs" / "lr=2e-3_head=mlp_seed=1" / "config.json").read_text())
        assert config["train"]["epochs"] == 2 and config["train"]["lr"] == 2e-3  # train options as defaults

    @pytest.mark.parametrize("args,message", [
        (["--grid", "colour=red"], "unknown grid key 'colour'; valid keys: pool, head"),
        (["--grid", "lr"], "--grid 'lr': expected KEY=V1,V2"),
        (["--grid", "lr=1e-3", "--grid", "lr=2e-3"], "--grid lr is given twice"),
        (["--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers"),
        (["--grid", "epochs=0"], "--epochs must be an int in [1, inf); got 0"),
    ])
    def test_user_errors_exit_1_with_one_message(self, signal_cache, tmp_path, args, message):
        result = runner.invoke(app, ["sweep", "--cache", str(signal_cache), "--out", str(tmp_path / "s"),
                                     "--device", "cpu", *args])
        assert result.exit_code == 1, result.output
        assert "error:" in result.output and "Traceback" not in result.output
        assert message in " ".join(result.output.split()), result.output

    def test_existing_sweep_directory_is_refused_without_overwrite(self, signal_cache, tmp_path):
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "keep.txt").write_text("mine")
        result = runner.invoke(app, ["sweep", "--cache", str(signal_cache), "--out", str(tmp_path / "s"),
                                     "--grid", "lr=1e-3", "--epochs", "1", "--device", "cpu"])
        assert result.exit_code == 1 and "--overwrite" in result.output
        assert (tmp_path / "s" / "keep.txt").read_text() == "mine"
