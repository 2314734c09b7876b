"""Streaming tokens from the file: the gather, the epoch sampler, the stream and its reader.

Streaming's contract (NOTE [ Streaming tokens ] in headcache/stream.py): under
the same batch order, a streamed split gives the same batches, bit for bit, as
the split held in memory, so training reaches the same weights; and the one
epoch sampler that gives `fit` its batches tells the stream every read of the
epoch before its first step.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import headcache.stream as stream_module
from headcache.config import TrainConfig
from headcache.errors import ConfigError
from headcache.features import CachedFeatures
from headcache.pooling import TokenBatch
from headcache.store import CacheReader, CacheWriter
from headcache.stream import EpochSampler, block_order, gather_tokens
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


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


class TestEpochSampler:
    def test_one_shared_order_cut_into_whole_batches(self):
        rows = torch.arange(10, 60)
        sampler = EpochSampler([rows, rows.clone()], _generators(3, 3), batch_size=16, split="train")
        assert len(sampler) == 3  # 50 // 16, the last 2 rows dropped (drop_last)
        batches = sampler.epoch()
        assert batches.shape == (3, 16)
        # torch's RandomSampler(generator=...): one randperm of the rows per epoch, from the head's generator
        expected = rows[torch.randperm(50, generator=torch.Generator().manual_seed(3))]
        assert torch.equal(batches.flatten(), expected[:48])
        assert not torch.equal(sampler.epoch(), batches)  # the next epoch draws again

    def test_heads_with_their_own_orders_get_k_by_b_batches(self):
        rows = [torch.arange(40), torch.arange(0, 80, 2)]
        sampler = EpochSampler(rows, _generators(0, 1), batch_size=8, split="train")
        batches = sampler.epoch()
        assert batches.shape == (5, 2, 8)
        for k in range(2):
            order = rows[k][torch.randperm(40, generator=torch.Generator().manual_seed(k))]
            assert torch.equal(batches[:, k].flatten(), order)

    def test_the_fewest_rows_decide_the_steps(self):
        sampler = EpochSampler([torch.arange(33), torch.arange(70)], _generators(0, 1), batch_size=16, split="x")
        assert len(sampler) == 2 and sampler.epoch().shape == (2, 2, 16)

    @pytest.mark.parametrize("batch_size", [0, -3])
    def test_refuses_a_batch_size_below_one(self, batch_size):
        with pytest.raises(ConfigError, match=f"batch_size must be at least 1, got {batch_size}; set --batch-size"):
            EpochSampler([torch.arange(10)], _generators(0), batch_size=batch_size, split="train")

    def test_refuses_fewer_rows_than_one_batch(self):
        with pytest.raises(ConfigError, match="split 'train' has 7 items, fewer than batch_size 8; lower --batch-size"):
            EpochSampler([torch.arange(20), torch.arange(7)], _generators(0, 1), batch_size=8, split="train")

    def test_refuses_rows_without_their_generators_and_blocks_with_a_stream(self, tiny_cache):
        with pytest.raises(ConfigError, match="one generator per head's rows: got 2 row sets and 1 generators"):
            EpochSampler([torch.arange(20)] * 2, _generators(0), batch_size=4, split="train")
        stream = _streamed(tiny_cache)._split("train")["stream"]
        with pytest.raises(ConfigError, match="blocks or a stream"):
            EpochSampler([torch.arange(20)], _generators(0), batch_size=4, split="train", blocks=stream.bounds,
                         stream=stream)

    def test_fit_refuses_a_train_split_smaller_than_the_batch(self, tiny_cache):
        source = CachedFeatures(tiny_cache, pool="meanq", device=CPU)
        task = HeadTask(TrainConfig(epochs=1, device="cpu"), ("train", torch.arange(5)), ("valid", torch.arange(8)))
        with pytest.raises(ConfigError, match="split 'train' has 5 items, fewer than batch_size 16"):
            fit(source, [task], num_classes=2, hidden_dim=16)

    def test_with_blocks_every_batch_order_keeps_each_block_together(self):
        bounds = torch.tensor([0, 10, 25, 40, 64])
        sampler = EpochSampler([torch.arange(64)], _generators(5), batch_size=4, split="train", blocks=bounds)
        batches = sampler.epoch()
        blocks = torch.bucketize(batches.flatten(), bounds[1:], right=True).tolist()
        runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
        assert len(runs) == len(set(runs))  # each block's rows in one run
        assert sampler.step_blocks(batches) == [list(dict.fromkeys(blocks[i:i + 4])) for i in range(0, 64, 4)]

    def test_a_source_gives_a_streamed_split_a_sampler_that_follows_its_stream(self, tiny_cache):
        streamed = _streamed(tiny_cache)
        memory = CachedFeatures(tiny_cache, pool="learned", device=CPU)
        rows, gens = [torch.arange(56)], _generators(0)
        assert memory.sampler("train", rows, gens, batch_size=16).blocks is None
        sampler = streamed.sampler("train", rows, gens, batch_size=16)
        assert sampler.stream is streamed._split("train")["stream"] and sampler.blocks is sampler.stream.bounds


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

    def sampler(self, split, rows, generators, *, batch_size):
        return EpochSampler(rows, generators, batch_size=batch_size, split=split,
                            blocks=self.streamed._split(split)["stream"].bounds)


def _streamed(cache) -> CachedFeatures:
    """The cache's token splits streamed in blocks of about 40 tokens."""
    return CachedFeatures(cache, pool="learned", device=CPU, memory_budget=1, block_bytes=SMALL_BLOCK)


def _record_plans(monkeypatch) -> list[tuple[list, list[int]]]:
    """(the stream's blocks, the plan) of every block reader started from here on."""
    plans, original = [], stream_module._BlockReader.__init__

    def init(self, path, blocks, plan, *rest):
        plans.append((blocks, list(plan)))
        original(self, path, blocks, plan, *rest)

    monkeypatch.setattr(stream_module._BlockReader, "__init__", init)
    return plans


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
        streamed = _streamed(cache)
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

    @pytest.mark.parametrize("cache", ["layered_cache", "layered_cache_f16"])
    def test_every_token_layer_streams_bit_for_bit_as_in_memory(self, request, cache):
        """The "all" view: rows of Lt * D read block by block, a layer sweep with a learned mix trained on them."""
        cache = request.getfixturevalue(cache)
        streamed = CachedFeatures(cache, pool="learned", device=CPU, layer="all", memory_budget=1,
                                  block_bytes=3 * 8 * 2 * 30)  # 30 float16 tokens (15 float32) of all 3 layers
        memory = _SameOrder(CachedFeatures(cache, pool="learned", device=CPU, layer="all"), streamed)
        assert streamed.streamed("train") and len(streamed._split("train")["stream"].blocks) > 10
        for rows in (torch.arange(0, 64, 3), torch.tensor([63, 0, 30, 30, 1])):
            a, b = memory.batch("train", rows), streamed.batch("train", rows)
            assert b.hidden.shape[:2] == (len(rows), 3) and torch.equal(a.hidden, b.hidden)
            assert torch.equal(a.mask, b.mask)
        configs = [TrainConfig(pool="learned", layer=layer, epochs=2, patience=2, device="cpu", seed=seed)
                   for layer, seed in (("0", 0), ("5", 1), ("mix", 0))]
        batches = [_recording(memory), _recording(streamed)]
        bank_a = fit(memory, tasks_for_splits(configs, memory, SPLITS), num_classes=2, hidden_dim=8)
        bank_b = fit(streamed, tasks_for_splits(configs, streamed, SPLITS), num_classes=2, hidden_dim=8)
        assert len(batches[0]) == len(batches[1]) > 2 * 4 and batches[0][0][2].dim() == 5  # (K, B, L, T, D)
        assert all(torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(*batches))
        assert all(_max_diff(a.last_state, b.last_state) == 0.0 for a, b in zip(bank_a, bank_b))
        assert bank_a[2].layer_weights == bank_b[2].layer_weights

    def test_rows_in_any_order_match_the_in_memory_gather(self, tiny_cache):
        """Requests outside the planned order (evaluation, random access) are still exact."""
        _, streamed = self._pair(tiny_cache)
        memory = CachedFeatures(tiny_cache, pool="learned", device=CPU)
        for rows in (torch.arange(0, 56, 3), torch.tensor([55, 0, 30, 30, 1]), torch.arange(40, 56)):
            a, b = memory.batch("train", rows), streamed.batch("train", rows)
            assert isinstance(b, TokenBatch)
            assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mask, b.mask)

    def test_a_streamed_epoch_reads_each_planned_block_once(self, tiny_cache, monkeypatch):
        streamed = _streamed(tiny_cache)
        stream = streamed._split("train")["stream"]
        sampler = streamed.sampler("train", [torch.arange(56)], _generators(0), batch_size=16)
        batches = sampler.epoch()
        plans = _record_plans(monkeypatch)
        streamed.batch("train", batches[0])
        [(_, plan)] = plans  # the reader started on the sampler's plan, not on demand
        assert sorted(plan) == sorted(set(plan))  # no block read twice in one epoch of one order
        assert set(plan) == set(torch.bucketize(batches, stream.bounds[1:], right=True).flatten().tolist())

    @pytest.mark.parametrize("seeds", [(0, 0), (0, 1)], ids=["shared order", "two orders"])
    def test_training_reads_each_epoch_from_one_reader_on_the_samplers_plan(self, tiny_cache, monkeypatch, seeds):
        """The sampler tells the stream the epoch's reads: no step of training restarts the reader."""
        streamed = _streamed(tiny_cache)
        plans = _record_plans(monkeypatch)
        expected, original = [], stream_module.TokenStream.expect

        def expect(self, step_blocks):
            original(self, step_blocks)
            expected.append(list(self._expected))

        monkeypatch.setattr(stream_module.TokenStream, "expect", expect)
        tasks = [HeadTask(TrainConfig(pool="learned", epochs=3, patience=3, device="cpu", seed=s),
                          ("train", torch.arange(56)), ("test", torch.arange(12))) for s in seeds]
        fit(streamed, tasks, num_classes=2, hidden_dim=16)
        train_blocks = streamed._split("train")["stream"].blocks
        assert len(expected) == 3 and all(expected)
        assert [plan for blocks, plan in plans if blocks is train_blocks] == expected
        assert any(blocks is not train_blocks for blocks, _ in plans)  # the evaluated split streams too

    def test_a_reader_opens_each_split_once(self, tiny_cache, monkeypatch):
        """Opening a split reads its offsets (and ids and labels, unless read lazily): once per part, not
        once per block."""
        opened, original = [], CacheReader.split

        def split(self, name, *args, **kwargs):
            opened.append(name)
            return original(self, name, *args, **kwargs)

        streamed = _streamed(tiny_cache)
        n = len(streamed.labels("train+valid"))
        stream = streamed._split("train+valid")["stream"]
        monkeypatch.setattr(CacheReader, "split", split)
        batch = streamed.batch("train+valid", torch.arange(n))  # every block of both parts, in order
        assert len(stream.blocks) > 10 and sorted(opened) == ["train", "valid"]
        memory = CachedFeatures(tiny_cache, pool="learned", device=CPU)
        assert torch.equal(batch.hidden, memory.batch("train+valid", torch.arange(n)).hidden)

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
            f"sampler = source.sampler('train', [torch.arange({n})], [torch.Generator().manual_seed(0)], "
            "batch_size=16)\n"
            "source.batch('train', sampler.epoch()[0])\n"
            "sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stderr
