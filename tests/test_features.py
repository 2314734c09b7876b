"""Feature sources: the memory budget that decides which token splits stream (tests/test_stream.py
tests the streaming itself), and the layer views of both sources."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig, parse_bytes
from headcache.errors import ConfigError, SpecError
from headcache.features import CachedFeatures, LiveFeatures
from headcache.pooling import TokenBatch
from headcache.spec import load_backbone
from headcache.store import CacheReader

SCHEMA1 = Path(__file__).with_name("data") / "schema1_tiny.h5"

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


# ---------------------------------------------------------------------------- layer views

ROWS = torch.tensor([[3, 1, 7, 20], [0, 63, 5, 5]])  # a (K, B) bank of rows, one repeated


class TestCachedLayerViews:
    @pytest.mark.parametrize("pool", ["meanq", "max"])
    def test_one_layer_is_exactly_that_layers_stored_vectors(self, layered_cache, pool):
        with CacheReader(layered_cache) as reader:
            stored = {layer: torch.from_numpy(reader.split("train").pooled(pool, layer)) for layer in (0, 2, 5)}
        for layer, text in ((0, "0"), (2, 2), (5, "last")):
            source = CachedFeatures(layered_cache, pool=pool, device=CPU, layer=text)
            assert source.layers == [layer] and not source.layered
            batch = source.batch("train", ROWS)
            assert batch.shape == (2, 4, 8) and torch.equal(batch, stored[layer][ROWS])
        assert CachedFeatures(layered_cache, pool=pool, device=CPU).layers == [5]  # the default view: last

    def test_all_keeps_the_layer_axis_in_the_caches_order(self, layered_cache):
        every = CachedFeatures(layered_cache, pool="meanq", device=CPU, layer="all")
        assert every.layers == [0, 2, 5] and every.layered
        batch = every.batch("train", ROWS)
        assert batch.shape == (2, 4, 3, 8)
        for position, layer in enumerate([0, 2, 5]):
            one = CachedFeatures(layered_cache, pool="meanq", device=CPU, layer=layer)
            assert torch.equal(batch[:, :, position], one.batch("train", ROWS))

    def test_the_learned_pool_reads_each_token_layers_columns(self, layered_cache):
        every = CachedFeatures(layered_cache, pool="learned", device=CPU, layer="all")
        assert every.layers == [0, 2, 5] and not every.streamed("train")
        tokens = every.batch("train", ROWS)
        assert isinstance(tokens, TokenBatch) and tokens.hidden.shape[:3] == (2, 4, 3)
        with CacheReader(layered_cache) as reader:
            split = reader.split("train")
            for position, layer in enumerate([0, 2, 5]):
                one = CachedFeatures(layered_cache, pool="learned", device=CPU, layer=layer).batch("train", ROWS)
                assert torch.equal(tokens.hidden[:, :, position], one.hidden) and torch.equal(tokens.mask, one.mask)
                row = int(ROWS[0, 2])  # its stored tokens, by hand
                start, stop = split.offsets[row], split.offsets[row + 1]
                expected = torch.from_numpy(split.tokens(start, stop, layer=layer)).float()
                assert torch.equal(tokens.hidden[0, 2, position, :stop - start], expected)

    def test_all_token_layers_count_against_the_memory_budget(self, layered_cache):
        with CacheReader(layered_cache) as reader:
            one_layer = reader.split("train").num_tokens * reader.hidden_dim * 4
        assert not CachedFeatures(layered_cache, pool="learned", device=CPU, layer=5,
                                  memory_budget=one_layer).streamed("train")
        every = CachedFeatures(layered_cache, pool="learned", device=CPU, layer="all", memory_budget=3 * one_layer - 1)
        assert every.streamed("train")  # three layers' tokens do not fit 3x one layer's bytes less one

    def test_a_layer_the_cache_lacks_is_refused_naming_the_flag_and_the_cached_ids(self, layered_cache,
                                                                                   layered_cache_last_tokens):
        with pytest.raises(ConfigError, match=r"--layer 3: the cache has no layer 3; its layers are 0, 2, 5 "
                                              r"\(or give --layer last or mix\)"):
            CachedFeatures(layered_cache, pool="meanq", device=CPU, layer="3")
        with pytest.raises(ConfigError, match=r"--layer 2: the learned pool reads per-token states, and the cache "
                                              r"keeps them for layer 5 only .*--token-layers naming 2"):
            CachedFeatures(layered_cache_last_tokens, pool="learned", device=CPU, layer=2)
        assert CachedFeatures(layered_cache_last_tokens, pool="meanq", device=CPU, layer=2).layers == [2]
        assert CachedFeatures(layered_cache_last_tokens, pool="learned", device=CPU, layer="all").layers == [5]
        with pytest.raises(ConfigError, match="--layer 'mix': a layer view is a layer id, last or all"):
            CachedFeatures(layered_cache, pool="meanq", device=CPU, layer="mix")

    def test_a_schema1_cache_is_one_layer_id_minus_one_read_as_before(self):
        with h5py.File(SCHEMA1, "r") as f:
            raw = torch.from_numpy(np.asarray(f["train/pooled/mean"][:]))
        for view in ("last", "-1", -1):
            source = CachedFeatures(SCHEMA1, pool="mean", device=CPU, layer=view)
            assert source.layers == [-1] and torch.equal(source.batch("train", torch.tensor([2, 0, 1])), raw[[2, 0, 1]])
        every = CachedFeatures(SCHEMA1, pool="mean", device=CPU, layer="all")
        assert torch.equal(every.batch("train", torch.tensor([2, 0])), raw[[2, 0]].unsqueeze(1))
        with pytest.raises(ConfigError, match="--layer 0: the cache has no layer 0; its layers are -1"):
            CachedFeatures(SCHEMA1, pool="mean", device=CPU, layer=0)

    def test_position_says_where_a_head_finds_its_layer(self, layered_cache):
        every = CachedFeatures(layered_cache, pool="meanq", device=CPU, layer="all")
        assert [every.position(layer) for layer in ("0", 2, "5", "last")] == [0, 1, 2, 2]
        one = CachedFeatures(layered_cache, pool="meanq", device=CPU, layer=2)
        assert one.position("2") == 0
        with pytest.raises(ConfigError, match=r'--layer last: this feature source was opened on layer 2 only; '
                                              r'open it with layer="all" \(or 5\)'):
            one.position("last")
        with pytest.raises(ConfigError, match="--layer 7: the cache has no layer 7"):
            every.position(7)


class TestLiveLayerViews:
    @pytest.fixture
    def backbone(self, layered_backbone):
        return layered_backbone

    def _live(self, spec, backbone, pool, layer, **options):
        return LiveFeatures(spec, backbone, pool=pool, dtype="float16", device=CPU, layer=layer, **options)

    @pytest.mark.parametrize("pool", ["meanq", "learned"])
    def test_the_views_over_the_specs_layers_are_those_of_the_cache(self, layered_spec, backbone, pool):
        every = self._live(layered_spec, backbone, pool, "all")
        assert every.layers == [0, 2, 5] and every.layered
        features = every.batch("train", ROWS)
        for position, (layer, text) in enumerate([(0, "0"), (2, 2), (5, "last")]):
            one = self._live(layered_spec, backbone, pool, text)
            assert one.layers == [layer] and not one.layered
            alone = one.batch("train", ROWS)
            if pool == "learned":
                assert torch.equal(features.hidden[:, :, position], alone.hidden)
                assert torch.equal(features.mask, alone.mask)
            else:
                assert torch.equal(features[:, :, position], alone)

    def test_a_spec_without_layers_has_one_layer_id_minus_one(self, tiny_options, tiny_demo):
        from headcache.spec import resolve_spec

        spec = resolve_spec("seqsetvae", tiny_options)
        backbone, _ = load_backbone(spec, tiny_demo.checkpoint)
        today = LiveFeatures(spec, backbone, pool="meanq", dtype="float16", device=CPU)
        rows = torch.tensor([4, 0, 9])
        for view in ("-1", "all"):
            source = LiveFeatures(spec, backbone, pool="meanq", dtype="float16", device=CPU, layer=view)
            assert source.layers == [-1]
            batch = source.batch("train", rows)
            assert torch.equal(batch.squeeze(1) if view == "all" else batch, today.batch("train", rows))
        with pytest.raises(ConfigError, match="--layer 3: the spec has no layer 3; its layers are -1"):
            LiveFeatures(spec, backbone, pool="meanq", dtype="float16", device=CPU, layer=3)

    def test_token_layers_limit_what_the_learned_pool_reads_as_a_cache_does(self, layered_spec, backbone):
        kept = self._live(layered_spec, backbone, "learned", "all", token_layers=[2, 5])
        assert kept.layers == [2, 5] and kept.batch("train", ROWS).hidden.shape[:3] == (2, 4, 2)
        assert self._live(layered_spec, backbone, "meanq", "all", token_layers=[5]).layers == [0, 2, 5]
        with pytest.raises(ConfigError, match="--layer 0: the learned pool .* the spec keeps them for layer 5 only"):
            self._live(layered_spec, backbone, "learned", 0, token_layers=[5])
        with pytest.raises(ConfigError, match=r"token layers \[4\] are not layers of the spec \(0, 2, 5\)"):
            self._live(layered_spec, backbone, "learned", "all", token_layers=[4])

    def test_what_encode_returns_is_checked_as_extraction_checks_it(self, layered_spec, backbone):
        class DropsALayer(type(layered_spec)):
            def encode(self, backbone, batch):
                hidden, mask = super().encode(backbone, batch)
                return hidden[:, :2], mask

        class Raises(type(layered_spec)):
            def encode(self, backbone, batch):
                raise RuntimeError("out of cheese")

        live = self._live(DropsALayer(), backbone, "meanq", "all")
        with pytest.raises(SpecError, match=r"spec.encode returned hidden \[4, 2, \d+, 8\] float32 .*"
                                            r"\[B, 3, T, D\] \(one per spec.layers\)"):
            live.batch("train", torch.tensor([0, 1, 2, 3]))
        with pytest.raises(SpecError, match="spec.encode .* raised RuntimeError: out of cheese"):
            self._live(Raises(), backbone, "meanq", "all").batch("train", torch.tensor([0, 1]))
