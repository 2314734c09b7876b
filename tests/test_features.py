"""Feature sources: the memory budget that decides which token splits stream (tests/test_stream.py
tests the streaming itself)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig, parse_bytes
from headcache.errors import ConfigError
from headcache.features import CachedFeatures
from headcache.store import CacheReader

CPU = torch.device("cpu")


class TestMemoryBudget:
    @pytest.mark.parametrize("text, expected", [("1024", 1024), ("2K", 2048), ("1.5G", 3 << 29), ("512MB", 512 << 20),
                                                 ("4GiB", 4 << 30), (7, 7)])
    def test_parse_bytes_reads_units_as_powers_of_1024(self, text, expected):
        assert parse_bytes(text) == expected

    @pytest.mark.parametrize("text", ["lots", "-1G", "0", "3X"])
    def test_parse_bytes_refuses_what_is_not_a_size(self, text):
        with pytest.raises(ConfigError, match="--memory-budget"):
            parse_bytes(text)

    def test_a_split_that_fits_stays_in_memory_and_one_that_does_not_streams(self, tiny_cache):
        with CacheReader(tiny_cache) as reader:
            train_bytes = reader.split("train").num_tokens * reader.hidden_dim * 4
        source = CachedFeatures(tiny_cache, pool="learned", device=CPU, memory_budget=train_bytes)
        assert not source.streamed("train")  # exactly the budget
        assert source.streamed("valid")  # nothing left
        assert not CachedFeatures(tiny_cache, pool="learned", device=CPU).streamed("train")  # default budget

    def test_pooled_features_never_stream(self, tiny_cache):
        source = CachedFeatures(tiny_cache, pool="meanq", device=CPU, memory_budget=1)
        assert not source.streamed("train")
        assert source.batch("train", torch.tensor([[0, 1], [2, 3]])).shape == (2, 2, 16)

    def test_train_command_takes_a_budget_with_units(self, tiny_cache, tmp_path):
        run = CliRunner().invoke(app, ["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "run"),
                                       "--pool", "learned", "--epochs", "1", "--device", "cpu", "--quiet",
                                       "--memory-budget", "4K"])
        assert run.exit_code == 0, run.output
        assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["memory_budget"] == 4096
        bad = CliRunner().invoke(app, ["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "bad"),
                                       "--memory-budget", "lots"])
        assert bad.exit_code == 1 and "--memory-budget 'lots'" in bad.output

    def test_train_config_carries_the_budget(self):
        assert TrainConfig(memory_budget=1 << 30).memory_budget == 1 << 30
        with pytest.raises(ConfigError, match="--memory-budget must be an int in"):
            TrainConfig(memory_budget=0)
