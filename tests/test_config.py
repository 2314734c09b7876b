"""Configuration declared once: the defaults table, the constraint objects, their messages and the text parsing."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re

import pytest

from headcache.bench import bench
from headcache.config import (
    BenchConfig,
    CVConfig,
    ExtractConfig,
    Interval,
    LayerText,
    Options,
    OrNone,
    TrainConfig,
    check_parameter,
    config_from_options,
    config_from_values,
    flag_name,
    parse_text,
)
from headcache.errors import ConfigError
from headcache.extract import ExtractConfig as ExtractConfigOfExtract

CONFIGS = (TrainConfig, ExtractConfig, BenchConfig, CVConfig)


def test_defaults_are_the_seeds():
    c = TrainConfig()
    assert (c.pool, c.head, c.lr, c.weight_decay, c.epochs, c.batch_size, c.patience, c.min_delta, c.grad_clip,
            c.dropout, c.focal_gamma) == ("meanq", "mlp", 5e-4, 1e-3, 50, 16, 8, 5e-4, 0.05, 0.1, 3.0)


@pytest.mark.parametrize("field,value,allowed", [("pool", "attn", "one of meanq"),
                                                 ("epochs", 0, "an int in [1, inf)"),
                                                 ("dropout", 1.0, "in [0, 1)"),
                                                 ("batch_size", 1, "an int in [2, inf)")])
def test_bad_settings_are_refused_naming_parameter_and_allowed_values(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"{flag_name(field)} must be .*{re.escape(allowed)}.*; got"):
        TrainConfig(**{field: value})


def test_text_options_are_converted_by_field():
    config = config_from_options({"lr": "1e-3", "head": "linear", "hidden": "none", "epochs": "7"})
    assert (config.lr, config.head, config.hidden, config.epochs) == (1e-3, "linear", None, 7)
    with pytest.raises(ConfigError, match="unknown train option 'colour'"):
        config_from_options({"colour": "red"})


def test_every_setting_declares_its_constraint_and_help_once():
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert f.metadata["help"].strip(), (cls.__name__, f.name)
            assert f.metadata["constraint"].is_satisfied_by(f.default), (cls.__name__, f.name, f.default)


def test_message_names_the_flag_derived_from_the_field():
    assert flag_name("weight_decay") == "--weight-decay"
    with pytest.raises(ConfigError, match=re.escape("--weight-decay must be a float in [0, inf); got -0.5")):
        TrainConfig(weight_decay=-0.5)
    with pytest.raises(ConfigError, match=re.escape("--lr must be a float in (0, inf); got -1")):
        TrainConfig(lr=-1)


class TestInterval:
    def test_describes_each_kind_of_end(self):
        assert str(Interval(numbers.Real, 0, None, closed="neither")) == "a float in (0, inf)"
        assert str(Interval(numbers.Real, 0, 1, closed="left")) == "a float in [0, 1)"
        assert str(Interval(numbers.Integral, 2, None, closed="left")) == "an int in [2, inf)"
        assert str(Interval(numbers.Integral, None, 5, closed="right")) == "an int in (-inf, 5]"
        assert str(Interval(numbers.Real, 0, 1, closed="both")) == "a float in [0, 1]"

    def test_checks_the_ends_it_describes(self):
        open_low = Interval(numbers.Real, 0, 1, closed="right")
        assert [open_low.is_satisfied_by(v) for v in (0, 1e-12, 0.5, 1, 1.0 + 1e-12)] == [False, True, True, True,
                                                                                         False]
        closed = Interval(numbers.Real, 0, 1, closed="both")
        assert closed.is_satisfied_by(0) and closed.is_satisfied_by(1.0)

    def test_refuses_bools_non_finite_values_and_the_wrong_number_type(self):
        integers = Interval(numbers.Integral, 0, None, closed="left")
        assert not integers.is_satisfied_by(True) and not integers.is_satisfied_by(1.0)
        assert not integers.is_satisfied_by("1") and integers.is_satisfied_by(3)
        reals = Interval(numbers.Real, None, None, closed="neither")
        assert reals.is_satisfied_by(3) and reals.is_satisfied_by(-2.5)
        assert not any(reals.is_satisfied_by(v) for v in (math.nan, math.inf, -math.inf, False))

    def test_its_invalid_value_is_refused(self):
        for constraint in (Interval(numbers.Real, 0, None, closed="neither"),
                           Interval(numbers.Integral, 1, None, closed="left"),
                           Interval(numbers.Integral, None, 5, closed="right"),
                           Interval(numbers.Real, None, 5, closed="neither")):
            assert not constraint.is_satisfied_by(constraint.invalid_value()), constraint


def test_options_and_unset_describe_and_check_themselves():
    losses = OrNone(Options(("focal", "ce")))
    assert str(losses) == "one of focal, ce (or unset)" and losses.choices == ("focal", "ce")
    assert losses.is_satisfied_by(None) and losses.is_satisfied_by("ce") and not losses.is_satisfied_by("CE")
    assert not losses.is_satisfied_by(losses.invalid_value())
    with pytest.raises(ConfigError, match=re.escape("--loss must be one of focal, ce (or unset); got 'mse'")):
        check_parameter("loss", "mse", losses)


class TestTextParsing:
    """Text values read by the field's type (typing.get_type_hints), not a hand-written map."""

    def test_numbers_and_unset(self):
        assert parse_text(TrainConfig, "epochs", "7") == 7 and isinstance(parse_text(TrainConfig, "lr", "1"), float)
        assert parse_text(TrainConfig, "test_split", "none") is None
        assert parse_text(TrainConfig, "test_split", "holdout") == "holdout"
        assert parse_text(TrainConfig, "train_split", "none") == "none"  # a split may not be unset: a name

    def test_memory_budget_reads_sizes(self):
        assert parse_text(TrainConfig, "memory_budget", "4G") == 4 << 30
        assert config_from_options({"memory_budget": "512M"}).memory_budget == 512 << 20
        assert parse_text(TrainConfig, "memory_budget", "none") is None

    def test_tuples_and_flags(self):
        config = config_from_values(ExtractConfig, {"splits": "train, val", "overwrite": "true", "batch_size": "8"})
        assert (config.splits, config.overwrite, config.batch_size) == (("train", "val"), True, 8)

    @pytest.mark.parametrize("name,text,message", [
        ("epochs", "1.5", "--epochs must be an int in [1, inf); got '1.5'"),
        ("lr", "fast", "--lr must be a float in (0, inf); got 'fast'"),
        ("hidden", "wide", "--hidden must be an int in [1, inf) (or unset); got 'wide'"),
    ])
    def test_text_that_does_not_convert_gets_the_settings_message(self, name, text, message):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_options({name: text})

    def test_a_converted_value_is_still_checked(self):
        with pytest.raises(ConfigError, match=re.escape("--lr must be a float in (0, inf); got nan")):
            config_from_options({"lr": "nan"})


class TestExtractConfig:
    def test_lives_in_config_and_is_re_exported_by_extract(self):
        assert ExtractConfigOfExtract is ExtractConfig

    def test_key_map_not_given_is_none_so_it_is_detected(self):
        assert ExtractConfig().key_map is None
        assert ExtractConfig(key_map={}).key_map == {}  # given, even empty: exactly that map

    @pytest.mark.parametrize("field,value,message", [
        ("write_block", 0, "--write-block must be an int in [1, inf); got 0"),
        ("splits", (), "--splits must be a non-empty list of distinct names (or unset); got ()"),
        ("key_map", {"model.": 1}, "--key-map must be a dict of str prefixes to str replacements (or unset)"),
        ("overwrite", "yes", "--overwrite must be true or false; got 'yes'"),
    ])
    def test_bad_settings_name_the_flag(self, field, value, message):
        with pytest.raises(ConfigError, match=re.escape(message)):
            ExtractConfig(**{field: value})


class TestBenchAndCV:
    @pytest.mark.parametrize("kwargs,message", [
        ({"epochs": 0}, "--epochs must be an int in [1, inf); got 0"),
        ({"limit": 0}, "--limit must be an int in [1, inf) (or unset); got 0"),
        ({"dtype": "float64"}, "--dtype must be one of float16, float32; got 'float64'"),
    ])
    def test_bench_checks_its_options_before_anything_runs(self, tmp_path, kwargs, message):
        # the spec and checkpoint do not exist: the options are refused first
        with pytest.raises(ConfigError, match=re.escape(message)):
            bench("no_such_spec", tmp_path / "absent.pt", out=tmp_path / "bench", **kwargs)
        assert not (tmp_path / "bench").exists()

    def test_folds(self):
        assert CVConfig().folds == 5
        with pytest.raises(ConfigError, match=re.escape("--folds must be an int in [2, inf); got 1")):
            CVConfig(folds=1)


class TestLayer:
    """``--layer``: last (the default: what every run read before layers), mix, or a layer id as text."""

    def test_default_words_and_ids(self):
        assert TrainConfig().layer == "last"
        for text in ("last", "mix", "0", "3", "-1", "12"):
            assert TrainConfig(layer=text).layer == text
        assert LayerText().is_satisfied_by("7") and not LayerText().is_satisfied_by(LayerText().invalid_value())

    @pytest.mark.parametrize("value", ["first", "3.5", "", " 3", "all", "1,2", 3, None])
    def test_anything_else_is_refused_naming_the_flag(self, value):
        message = f"--layer must be last, mix or a layer id (an integer as text, e.g. 3); got {value!r}"
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig(layer=value)

    def test_text_from_a_grid_or_the_command_line_stays_text(self):
        assert parse_text(TrainConfig, "layer", "-1") == "-1"
        assert [config_from_options({"layer": v}).layer for v in ("0", "6", "mix")] == ["0", "6", "mix"]
