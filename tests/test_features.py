"""Feature sources: the vectorised token gather, the memory budget, and streaming from the file.

Streaming's contract (NOTE [ Streaming tokens ] in headcache/features.py): under
the same batch order, a streamed split gives the same batches, bit for bit, as
the split held in memory, so training reaches the same weights.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig, parse_bytes
from headcache.errors import ConfigError
from headcache.features import CachedFeatures, block_order, gather_tokens
from headcache.pooling import TokenBatch
from headcache.store import CacheReader, CacheWriter
from headcache.train import HeadTask, fit, tasks_for_splits

CPU = torch.device("cpu")
SPLITS = ("train", "valid", "test")
SMALL_BLOCK = 16 * 4 * 40  # about 40 float32 tokens of the tiny backbone: many blocks, batches across them


def _ragged(lengths: list[int], dim: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    sequences = [torch.randn(n, dim, generator=torch.Generator().manual_seed(n)) for n in lengths]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    return torch.cat(sequences), offsets, sequences


class TestGatherTokens:
    def test_each_row_is_its_sequence_then_zero_padding(self):
        tokens, offsets, sequences = _ragged([3, 1, 4, 2])
        rows = torch.tensor([2, 0, 3])
        batch = gather_tokens(tokens, offsets, rows)
        assert batch.hidden.shape == (3, 4, 3) and batch.hidden.dtype == torch.float32
        for b, row in enumerate(rows.tolist()):
            n = len(sequences[row])
            assert torch.equal(batch.hidden[b, :n], sequences[row])
            assert not batch.hidden[b, n:].any()
            assert batch.mask[b].tolist() == [True] * n + [False] * (4 - n)

    def test_repeated_rows_and_a_2d_bank_of_rows(self):
        tokens, offsets, sequences = _ragged([2, 5, 1])
        rows = torch.tensor([[1, 1], [2, 0]])
        batch = gather_tokens(tokens, offsets, rows)
        assert batch.hidden.shape == (2, 2, 5, 3)
        assert torch.equal(batch.hidden[0, 0], batch.hidden[0, 1])
        assert torch.equal(batch.hidden[1, 0, :1], sequences[2]) and batch.mask[1, 0].sum() == 1

    def test_first_and_last_sequence_of_the_matrix(self):
        tokens, offsets, sequences = _ragged([2, 3, 4])
        batch = gather_tokens(tokens, offsets, torch.tensor([0, 2]))
        assert torch.equal(batch.hidden[0, :2], sequences[0]) and torch.equal(batch.hidden[1], sequences[2])

    def test_empty_sequences_and_an_empty_batch(self):
        tokens, offsets, _ = _ragged([0, 2, 0])
        only_empty = gather_tokens(tokens, offsets, torch.tensor([0, 2]))
        assert only_empty.hidden.shape == (2, 0, 3) and only_empty.mask.shape == (2, 0)
        mixed = gather_tokens(tokens, offsets, torch.tensor([0, 1]))
        assert mixed.mask.tolist() == [[False, False], [True, True]] and not mixed.hidden[0].any()
        nothing = gather_tokens(tokens, offsets, torch.tensor([], dtype=torch.int64))
        assert nothing.hidden.shape == (0, 0, 3)

    def test_float16_tokens_come_out_as_float32_values(self):
        tokens, offsets, _ = _ragged([2, 3])
        half = gather_tokens(tokens.half(), offsets, torch.tensor([1]))
        assert half.hidden.dtype == torch.float32
        assert torch.equal(half.hidden[0], tokens[2:5].half().float())


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


class TestBlockOrder:
    def test_every_row_once_with_each_block_contiguous(self):
        bounds = torch.tensor([0, 3, 7, 8, 12])
        rows = torch.tensor([0, 2, 3, 4, 6, 7, 9, 10, 11])
        order = block_order(bounds, rows, torch.Generator().manual_seed(0))
        assert sorted(order.tolist()) == rows.tolist()
        blocks = torch.bucketize(order, bounds[1:], right=True).tolist()
        runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
        assert len(runs) == len(set(runs)) == 4

    def test_the_generator_decides_the_order(self):
        bounds, rows = torch.tensor([0, 50, 100]), torch.arange(100)
        first = block_order(bounds, rows, torch.Generator().manual_seed(1))
        assert torch.equal(first, block_order(bounds, rows, torch.Generator().manual_seed(1)))
        assert not torch.equal(first, block_order(bounds, rows, torch.Generator().manual_seed(2)))


class _SameOrder:
    """An in-memory source that takes its epoch order from a streamed one's blocks."""

    def __init__(self, memory: CachedFeatures, streamed: CachedFeatures):
        self.memory, self.streamed = memory, streamed

    def __getattr__(self, name):
        return getattr(self.memory, name)

    def epoch_order(self, split, rows, generator):
        return block_order(self.streamed._split(split)["stream"].bounds, rows, generator)


def _recording(source) -> list[tuple]:
    seen, original = [], source.batch

    def batch(split, rows):
        features = original(split, rows)
        seen.append((split, rows.clone(), features.hidden.clone(), features.mask.clone()))
        return features

    source.batch = batch
    return seen


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


class TestStreaming:
    def _pair(self, cache):
        streamed = CachedFeatures(cache, pool="learned", device=CPU, memory_budget=1, block_bytes=SMALL_BLOCK)
        memory = CachedFeatures(cache, pool="learned", device=CPU)
        assert streamed.streamed("train") and len(streamed._split("train")["stream"].blocks) > 10
        return _SameOrder(memory, streamed), streamed

    @pytest.mark.parametrize("cache", ["tiny_cache", "tiny_cache_f16"])
    def test_streamed_training_equals_in_memory_under_the_same_order(self, request, cache):
        memory, streamed = self._pair(request.getfixturevalue(cache))
        config = TrainConfig(pool="learned", epochs=3, patience=3, device="cpu")
        batches = [_recording(memory), _recording(streamed)]
        [a] = fit(memory, tasks_for_splits([config], memory, SPLITS), num_classes=2, hidden_dim=16)
        [b] = fit(streamed, tasks_for_splits([config], streamed, SPLITS), num_classes=2, hidden_dim=16)
        assert len(batches[0]) == len(batches[1]) > 3 * 3
        for (split_a, rows_a, hidden_a, mask_a), (split_b, rows_b, hidden_b, mask_b) in zip(*batches):
            assert split_a == split_b and torch.equal(rows_a, rows_b)
            assert torch.equal(hidden_a, hidden_b) and torch.equal(mask_a, mask_b)
        assert _max_diff(a.last_state, b.last_state) == 0.0

    def test_a_bank_in_two_orders_over_a_joined_split(self, tiny_cache):
        """Heads with other seeds and rows (as cross-validation makes them) read (K, B) batches."""
        memory, streamed = self._pair(tiny_cache)
        results = []
        for source in (memory, streamed):
            n = len(source.labels("train+valid"))
            tasks = [HeadTask(TrainConfig(pool="learned", epochs=2, device="cpu", seed=k),
                              ("train+valid", torch.arange(k, n, 1 + k)), ("test", torch.arange(12)))
                     for k in range(2)]
            seen = _recording(source)
            results.append((fit(source, tasks, num_classes=2, hidden_dim=16), seen))
        (bank_a, seen_a), (bank_b, seen_b) = results
        assert seen_a[0][1].shape == (2, 16)
        assert all(torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(seen_a, seen_b))
        assert all(_max_diff(a.last_state, b.last_state) == 0.0 for a, b in zip(bank_a, bank_b))

    def test_rows_in_any_order_match_the_in_memory_gather(self, tiny_cache):
        """Requests outside the planned order (evaluation, random access) are still exact."""
        _, streamed = self._pair(tiny_cache)
        memory = CachedFeatures(tiny_cache, pool="learned", device=CPU)
        for rows in (torch.arange(0, 56, 3), torch.tensor([55, 0, 30, 30, 1]), torch.arange(40, 56)):
            a, b = memory.batch("train", rows), streamed.batch("train", rows)
            assert isinstance(b, TokenBatch)
            assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mask, b.mask)

    def test_a_streamed_epoch_reads_each_planned_block_once(self, tiny_cache):
        _, streamed = self._pair(tiny_cache)
        stream = streamed._split("train")["stream"]
        order = streamed.epoch_order("train", torch.arange(56), torch.Generator().manual_seed(0))
        plan = stream._plan(order[:16])
        assert sorted(plan) == sorted(set(plan))  # no block read twice in one epoch of one order
        used = set(torch.bucketize(order[:len(order) // 16 * 16], stream.bounds[1:], right=True).tolist())
        assert set(plan) == used

    def test_a_process_that_stops_while_the_reader_runs_exits(self, tmp_path):
        """Python's exit stops the prefetch thread first: one frozen inside an HDF5 call would keep
        h5py's lock and the exit would wait for it forever (this cache's 20,000 ids keep the reader
        in HDF5 long enough to show it)."""
        path, n = tmp_path / "many.h5", 20_000
        attrs = {"backbone_fingerprint": "x", "spec": "x", "checkpoint_sha256": "x", "hidden_dim": 4,
                 "dtype": "float32", "load_report": {}}
        with CacheWriter(path, attrs) as writer:
            split = writer.split("train", n, [])
            split.write([np.ones((2, 4), np.float32)] * n, np.zeros(n, np.int64), [f"id-{i}" for i in range(n)], {})
            split.finish()
        script = (
            "import sys, torch\n"
            "from headcache.features import CachedFeatures\n"
            f"source = CachedFeatures({str(path)!r}, pool='learned', device=torch.device('cpu'), memory_budget=1,\n"
            "                        block_bytes=64)\n"
            f"order = source.epoch_order('train', torch.arange({n}), torch.Generator().manual_seed(0))\n"
            "source.batch('train', order[:16])\n"
            "sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stderr
