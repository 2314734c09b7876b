"""The command line as a user drives it: every command, and every user error as one clear message.

Each error: exit code 1, a message naming the file or field and the fix, no
traceback (unless --debug), and nothing already written damaged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import shutil
from pathlib import Path
from typing import Optional

import click
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import typer
from conftest import TOY, assert_user_error
from typer.testing import CliRunner

from headcache.cli import app, config_options
from headcache.config import BenchConfig, Interval, Options, OrNone, TrainConfig, flag_name, setting
from headcache.pooling import POOL_NAMES
from headcache.store import CacheReader, CacheWriter

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that table cells do not wrap


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _extract_args(spec, checkpoint, out, *extra):
    return ["extract", "--spec", spec, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", *extra]


class TestUserSpec:
    def test_spec_file_outside_the_package_extracts_and_trains(self, tmp_path, toy_checkpoint):
        cache, run_dir = tmp_path / "toy.h5", tmp_path / "run"
        result = run(*_extract_args(TOY, toy_checkpoint, cache, "--spec-opt", "n=64", "--dtype", "float32"))
        assert result.exit_code == 0, result.output
        with CacheReader(cache) as reader:
            assert reader.splits == ["train", "val", "test"] and reader.hidden_dim == 8
            assert reader.split("val").n == 64
        result = run("train", "--cache", cache, "--out", run_dir, "--epochs", "3", "--device", "cpu",
                     "--hidden", "4", "--quiet")
        assert result.exit_code == 0, result.output
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert set(metrics) >= {"best_epoch", "val", "test"}
        assert 0.0 <= metrics["test"]["auroc"] <= 1.0 and len(metrics["test"]["auroc_ci"]) == 2

    def test_missing_spec_file_is_named(self, tmp_path, toy_checkpoint):
        result = run(*_extract_args("nowhere/spec.py:make_spec", toy_checkpoint, tmp_path / "c.h5"))
        assert_user_error(result, "nowhere/spec.py does not exist")

    def test_unimportable_module_is_named(self, tmp_path, toy_checkpoint):
        result = run(*_extract_args("no_such_pkg.specs:make_spec", toy_checkpoint, tmp_path / "c.h5"))
        assert_user_error(result, "cannot import module 'no_such_pkg.specs'")

    def test_bare_unknown_name_shows_both_spellings(self, tmp_path, toy_checkpoint):
        result = run(*_extract_args("mymodel", toy_checkpoint, tmp_path / "c.h5"))
        assert_user_error(result, "not a built-in spec", "package.module:function", "path/to/file.py:function")

    def test_unknown_spec_option_lists_accepted_ones(self, tmp_path, toy_checkpoint):
        result = run(*_extract_args(TOY, toy_checkpoint, tmp_path / "c.h5", "--spec-opt", "colour=red"))
        assert_user_error(result, "colour", "n, kill_at, nan_at, empty_at, marker")

    def test_debug_shows_the_traceback(self, tmp_path, toy_checkpoint):
        result = runner.invoke(app, ["--debug", *map(str, _extract_args("mymodel", toy_checkpoint, tmp_path / "c.h5"))])
        assert result.exit_code != 0 and result.exception is not None
        assert type(result.exception).__name__ == "SpecError"


class TestCheckpointErrors:
    def test_missing_checkpoint(self, tmp_path):
        result = run(*_extract_args(TOY, tmp_path / "absent.pt", tmp_path / "c.h5"))
        assert_user_error(result, "absent.pt")

    def test_not_a_checkpoint(self, tmp_path):
        bogus = tmp_path / "notes.pt"
        bogus.write_text("these are not weights")
        assert_user_error(run(*_extract_args(TOY, bogus, tmp_path / "c.h5")), "notes.pt", "not a PyTorch checkpoint")

    def test_full_unpickling_needs_trust(self, tmp_path, toy_checkpoint):
        pickled = tmp_path / "pickled.ckpt"
        torch.save({"state_dict": torch.load(toy_checkpoint), "args": argparse.Namespace(lr=1)}, pickled)
        assert_user_error(run(*_extract_args(TOY, pickled, tmp_path / "c.h5")), "--trust-checkpoint")
        trusted = run(*_extract_args(TOY, pickled, tmp_path / "c.h5", "--trust-checkpoint", "--spec-opt", "n=8"))
        assert trusted.exit_code == 0, trusted.output

    def test_missing_backbone_keys_are_listed(self, tmp_path, toy_checkpoint):
        state = torch.load(toy_checkpoint)
        del state["rnn.weight_hh_l0"]
        partial = tmp_path / "partial.pt"
        torch.save(state, partial)
        assert_user_error(run(*_extract_args(TOY, partial, tmp_path / "c.h5")), "rnn.weight_hh_l0", "--key-map")

    def test_shape_mismatch_names_key_and_shapes(self, tmp_path, toy_checkpoint):
        state = torch.load(toy_checkpoint)
        state["proj.weight"] = torch.zeros(8, 5)
        wrong = tmp_path / "wrong.pt"
        torch.save(state, wrong)
        assert_user_error(run(*_extract_args(TOY, wrong, tmp_path / "c.h5")), "proj.weight", "[8, 5]", "[8, 4]")


class TestOutputErrors:
    def test_existing_cache_is_refused_and_kept(self, tmp_path, toy_checkpoint):
        cache = tmp_path / "c.h5"
        assert run(*_extract_args(TOY, toy_checkpoint, cache, "--spec-opt", "n=8")).exit_code == 0
        before = cache.read_bytes()
        assert_user_error(run(*_extract_args(TOY, toy_checkpoint, cache, "--spec-opt", "n=8")), "--overwrite")
        assert cache.read_bytes() == before

    def test_unfinished_cache_of_another_backbone_is_refused(self, tmp_path, toy_checkpoint):
        cache = tmp_path / "c.h5"
        failed = run(*_extract_args(TOY, toy_checkpoint, cache, "--spec-opt", "n=20", "--spec-opt", "nan_at=5"))
        assert_user_error(failed, "NaN or Inf", "train-0005")
        other = tmp_path / "other.pt"
        torch.save({k: v + 1 for k, v in torch.load(toy_checkpoint).items()}, other)
        before = cache.read_bytes()
        assert_user_error(run(*_extract_args(TOY, other, cache, "--spec-opt", "n=20")), "backbone", "--overwrite")
        assert cache.read_bytes() == before

    def test_existing_run_directory_is_refused(self, tmp_path, tiny_cache):
        out = tmp_path / "run"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        result = run("train", "--cache", tiny_cache, "--out", out, "--epochs", "1", "--device", "cpu")
        assert_user_error(result, str(out), "--overwrite")
        assert (out / "notes.txt").read_text() == "mine"


class TestCacheErrors:
    def _train(self, cache, tmp_path):
        return run("train", "--cache", cache, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu")

    def test_not_hdf5(self, tmp_path):
        text = tmp_path / "c.h5"
        text.write_text("hello")
        assert_user_error(self._train(text, tmp_path), "c.h5", "not an HDF5 file")

    def test_not_headcache(self, tmp_path):
        other = tmp_path / "other.h5"
        with h5py.File(other, "w") as f:
            f["x"] = np.zeros(3)
        assert_user_error(self._train(other, tmp_path), "other.h5", "not a headcache cache")

    def test_wrong_schema(self, tmp_path, tiny_cache):
        future = tmp_path / "future.h5"
        shutil.copy(tiny_cache, future)
        with h5py.File(future, "r+") as f:
            f.attrs["schema"] = 4
        assert_user_error(self._train(future, tmp_path), "future.h5", "schema 4")

    def test_split_missing(self, tmp_path, tiny_cache):
        result = run("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--val-split", "holdout",
                     "--device", "cpu")
        assert_user_error(result, "holdout", "it has train, valid, test")

    def test_split_incomplete(self, tmp_path, toy_checkpoint):
        cache = tmp_path / "c.h5"
        run(*_extract_args(TOY, toy_checkpoint, cache, "--spec-opt", "n=20", "--spec-opt", "nan_at=9"))
        assert_user_error(self._train(cache, tmp_path), "split 'train'", "incomplete", "Rerun the same headcache extract")

    def test_inspect_refuses_a_text_file(self, tmp_path):
        text = tmp_path / "c.h5"
        text.write_text("hello")
        assert_user_error(run("inspect", text), "not an HDF5 file")


class TestDataErrors:
    @pytest.fixture
    def data(self, tmp_path, tiny_demo) -> Path:
        copy = tmp_path / "data"
        shutil.copytree(tiny_demo.data_dir, copy)
        return copy

    def _extract(self, data, tiny_demo, tmp_path):
        return run(*_extract_args("seqsetvae", tiny_demo.checkpoint, tmp_path / "c.h5", "--spec-opt", f"data={data}",
                                  "--spec-opt", "size=tiny"))

    def test_missing_label_names_patient_and_oc_csv(self, data, tiny_demo, tmp_path):
        first = sorted((data / "patient_ehr" / "train").glob("*.parquet"))[0]
        stem = first.name[: -len(".parquet")]
        lines = (data / "oc.csv").read_text().splitlines()
        kept = [line for line in lines if not line.startswith(str(int(float(stem))) + ",")]
        assert len(kept) == len(lines) - 1
        (data / "oc.csv").write_text("\n".join(kept) + "\n")
        assert_user_error(self._extract(data, tiny_demo, tmp_path), first.name, "oc.csv")

    def test_patient_without_events_is_named(self, data, tiny_demo, tmp_path):
        first = sorted((data / "patient_ehr" / "train").glob("*.parquet"))[0]
        table = pq.read_table(first)
        pq.write_table(table.slice(0, 0), first)
        assert_user_error(self._extract(data, tiny_demo, tmp_path), first.name)


class TestTrainOutput:
    def test_single_class_split_reports_undefined_auroc(self, tmp_path):
        cache = tmp_path / "one_class.h5"
        _write_cache(cache, {"train": [0, 1] * 20, "val": [0] * 10, "test": [0, 1] * 5})
        result = run("train", "--cache", cache, "--out", tmp_path / "run", "--epochs", "2", "--device", "cpu", "--quiet")
        assert result.exit_code == 0, result.output
        assert "undefined (one class)" in result.output and "val loss instead" in " ".join(result.output.split())
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["val"]["auroc"] is None and metrics["val"]["auroc_ci"] is None
        assert metrics["monitor"] == "loss" and metrics["test"]["auroc"] is not None

    def test_bad_setting_names_the_parameter(self, tmp_path, tiny_cache):
        result = run("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--lr", "-1")
        assert_user_error(result, "--lr must be a float in (0, inf); got -1")

    def test_inspect_json_reports_the_cache(self, tiny_cache):
        result = run("inspect", tiny_cache, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output)
        assert summary["hidden_dim"] == 16 and summary["dtype"] == "float32"
        assert set(summary["splits"]) == {"train", "valid", "test"}
        assert sum(s["n"] for s in summary["splits"].values()) == 80


def test_demo_writes_everything_a_user_goes_on_with(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--patients", "60", "--epochs", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    demo = tmp_path / "demo"
    assert (demo / "backbone.ckpt").is_file() and (demo / "cache.h5").is_file()
    assert sorted(p.name for p in (demo / "data" / "patient_ehr").iterdir()) == ["test", "train", "valid"]
    for name in ("config.json", "metrics.json", "history.csv", "head_best.pt", "head_last.pt", "curves.png"):
        assert (demo / "run" / name).is_file(), name
    with CacheReader(demo / "cache.h5") as reader:
        assert sum(reader.split(s).n for s in reader.splits) == 60 and reader.hidden_dim == 256


def _write_cache(path: Path, labels: dict[str, list[int]], dim: int = 4) -> None:
    """A small cache written straight through the store: random tokens, the given labels."""
    rng = np.random.default_rng(0)
    attrs = {"backbone_fingerprint": "f" * 64, "spec": "test", "checkpoint_sha256": "0" * 64, "hidden_dim": dim,
             "dtype": "float32", "load_report": {}}
    with CacheWriter(path, attrs) as writer:
        splits = {name: writer.split(name, len(y), ["meanq"]) for name, y in labels.items()}
        for name, y in labels.items():
            tokens = [rng.normal(size=(3, dim)).astype(np.float32) + label for label in y]
            pooled = {"meanq": np.stack([t.mean(0) for t in tokens])}
            splits[name].write(tokens, np.array(y), [f"{name}{i}" for i in range(len(y))], pooled)
            splits[name].finish()


class TestOptionsFromConfigs:
    """The options of train, sweep, cv, bench and extract come from the config dataclasses and the registries."""

    @staticmethod
    def _params(command: str) -> dict[str, click.Parameter]:
        return {param.opts[0]: param for param in typer.main.get_command(app).commands[command].params}

    def test_every_train_setting_is_a_train_flag_with_the_configs_default(self):
        params = self._params("train")
        for f in dataclasses.fields(TrainConfig):
            assert params[flag_name(f.name)].default == f.default, f.name

    @pytest.mark.parametrize("command", ["sweep", "cv"])
    def test_sweep_and_cv_options_default_to_not_given(self, command):
        params = self._params(command)
        given = [f.name for f in dataclasses.fields(TrainConfig) if flag_name(f.name) in params]
        assert {"pool", "lr", "min_delta", "grad_clip", "focal_gamma", "memory_budget"} <= set(given)
        assert all(params[flag_name(name)].default is None for name in given)

    def test_bench_takes_the_head_settings_and_its_own(self):
        params = self._params("bench")
        assert params["--epochs"].default == BenchConfig().epochs and params["--limit"].default is None
        assert params["--lr"].default == TrainConfig().lr and "--patience" not in params

    @pytest.mark.parametrize("command", ["train", "sweep", "cv", "bench"])
    def test_pool_choices_shown_are_the_pool_registry(self, command):
        shown = "|".join(POOL_NAMES)
        assert shown in run(command, "--help").output

    def test_an_unknown_pool_is_refused_listing_the_registry(self, tmp_path, tiny_cache):
        result = run("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--pool", "attn")
        assert result.exit_code == 2 and "Invalid value for '--pool'" in result.output
        assert "meanq_scaled" in result.output and not (tmp_path / "run").exists()

    def test_the_flags_train_lacked_reach_the_run_config(self, tmp_path, tiny_cache):
        result = run("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu",
                     "--min-delta", "0.01", "--grad-clip", "0.5", "--focal-gamma", "2", "--train-split", "train",
                     "--test-split", "none", "--memory-budget", "64M", "--quiet")
        assert result.exit_code == 0, result.output
        config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
        assert (config["min_delta"], config["grad_clip"], config["focal_gamma"], config["test_split"],
                config["memory_budget"]) == (0.01, 0.5, 2.0, None, 64 << 20)

    def test_the_builder_adds_one_option_per_setting_and_passes_what_was_given(self):
        @dataclasses.dataclass(frozen=True)
        class Toy:
            rate: float = setting(0.5, Interval(numbers.Real, 0, None, closed="neither"), "A rate.")
            kind: str = setting("a", Options(("a", "b")), "A kind.")
            width: Optional[int] = setting(None, OrNone(Interval(numbers.Integral, 1, None, closed="left")), "W.")

        seen = []
        toy = typer.Typer()

        @toy.command()
        @config_options(Toy, into="given")
        def go(name: str = typer.Option("x"), given: dict = None) -> None:
            seen.append((name, given))

        @toy.command()
        @config_options(Toy, into="given", unset=True, exclude=("width",))
        def later(given: dict = None) -> None:
            seen.append(given)

        assert CliRunner().invoke(toy, ["go", "--rate", "2", "--kind", "b"]).exit_code == 0
        assert CliRunner().invoke(toy, ["later", "--kind", "a"]).exit_code == 0
        assert seen == [("x", {"rate": 2.0, "kind": "b", "width": None}), {"kind": "a"}]
        refused = CliRunner().invoke(toy, ["go", "--kind", "c"])
        assert refused.exit_code == 2 and "'c' is not one of 'a', 'b'" in refused.output
        assert "--width" not in CliRunner().invoke(toy, ["later", "--help"]).output
