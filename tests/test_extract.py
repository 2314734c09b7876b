"""Stage 1: extraction writes every sequence once, in dataset order, resumably, refusing bad data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE, REPO, TOY

from headcache.errors import ConfigError, DataError, NonFiniteError, OutputExistsError
from headcache.extract import ExtractConfig, bucketed_batches, extract
from headcache.pooling import PARAMETER_FREE_POOLS, pool_parameter_free
from headcache.store import CacheReader


def _config(**changes) -> ExtractConfig:
    return ExtractConfig(**{"device": "cpu", "batch_size": 8, "write_block": 4, **changes})


def _contents(path: Path) -> dict:
    with CacheReader(path) as reader:
        return {name: (reader.split(name).tokens(), reader.split(name).offsets, reader.split(name).labels,
                       reader.split(name).ids) for name in reader.splits}


class TestOutput:
    def test_rows_follow_dataset_order_whatever_the_buckets(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(TOY, toy_checkpoint, path, _config(), spec_options={"n": "30"})
        with CacheReader(path) as reader:
            split = reader.split("train")
            assert split.ids == [f"train-{i:04d}" for i in range(30)]
            assert np.diff(split.offsets).tolist() == [1 + (7 * i) % 13 for i in range(30)]

    def test_bucketing_does_not_change_the_tokens(self, tmp_path, toy_checkpoint):
        bucketed, plain = tmp_path / "a.h5", tmp_path / "b.h5"
        # float32: in float16 a 1e-7 difference between batch shapes can flip a rounding (3e-5)
        extract(TOY, toy_checkpoint, bucketed, _config(dtype="float32"), spec_options={"n": "30"})
        extract(TOY, toy_checkpoint, plain, _config(batch_size=1, dtype="float32"), spec_options={"n": "30"})
        for (ta, oa, la, ia), (tb, ob, lb, ib) in zip(_contents(bucketed).values(), _contents(plain).values()):
            assert np.abs(ta - tb).max() <= 1e-5 and np.array_equal(oa, ob) and np.array_equal(la, lb) and ia == ib

    def test_stored_pools_are_the_pools_of_the_stored_tokens(self, tiny_cache_f16):
        with CacheReader(tiny_cache_f16) as reader:
            split = reader.split("train")
            for i in (0, 7, split.n - 1):
                tokens = torch.from_numpy(split.sequence(i).astype(np.float32))[None]
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
                for name in PARAMETER_FREE_POOLS:
                    expected = pool_parameter_free(name, tokens, mask)[0].numpy()
                    assert np.abs(split.pooled(name)[i] - expected).max() <= 1e-5

    def test_bucketed_batches_cover_each_index_once_and_sort_within_windows(self):
        lengths = [5, 1, 9, 3, 7, 2]
        batches = bucketed_batches(range(6), lengths, 2)
        assert sorted(i for b in batches for i in b) == list(range(6))
        assert [lengths[i] for b in batches for i in b] == [9, 7, 5, 3, 2, 1]


class TestResume:
    def test_sigkilled_extraction_resumes_to_the_same_file(self, tmp_path, toy_checkpoint):
        """A process killed part-way (SIGKILL, as by the OOM killer) leaves a cache that a rerun finishes."""
        reference = tmp_path / "reference.h5"
        extract(TOY, toy_checkpoint, reference, _config(), spec_options={"n": "600"})
        interrupted = tmp_path / "interrupted.h5"
        marker = tmp_path / "killed"
        command = [sys.executable, str(REPO / "cli.py"), "extract", "--spec", TOY, "--checkpoint",
                   str(toy_checkpoint), "--out", str(interrupted), "--device", "cpu", "--batch-size", "8",
                   "--spec-opt", "n=600", "--spec-opt", "kill_at=450", "--spec-opt", f"marker={marker}"]
        first = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        assert first.returncode == -9 and marker.exists()
        with CacheReader(interrupted) as reader:
            partial = reader.split("train", require_complete=False)
            assert not partial.complete and 0 < partial.rows_written < 600
        second = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        assert second.returncode == 0, second.stderr
        assert "resumed" in second.stdout
        for (ta, oa, la, ia), (tb, ob, lb, ib) in zip(_contents(interrupted).values(), _contents(reference).values()):
            assert np.array_equal(oa, ob) and np.array_equal(la, lb) and ia == ib
            assert np.abs(ta - tb).max() <= 1e-5


class TestRefusals:
    def test_nan_hidden_state_names_the_sequence_and_keeps_finished_rows(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        with pytest.raises(NonFiniteError, match="sequence 'train-0026'"):
            extract(TOY, toy_checkpoint, path, _config(batch_size=1), spec_options={"n": "30", "nan_at": "26"})
        # items run longest first (buckets), item 26 among the last; every row finished before it and in order is kept
        import toy_spec

        order = [b[0] for b in bucketed_batches(range(30), toy_spec.ToyDataset("train", 30, -1, -1, -1, "").lengths(), 1)]
        finished = set(order[:order.index(26)])
        expected = next(i for i in range(30) if i not in finished)
        with CacheReader(path) as reader:
            partial = reader.split("train", require_complete=False)
            assert partial.rows_written == expected > 0
            assert partial.ids[:expected] == [f"train-{i:04d}" for i in range(expected)]

    def test_empty_sequence_is_refused_by_id(self, tmp_path, toy_checkpoint):
        with pytest.raises(DataError, match="train-0003.*no positions"):
            extract(TOY, toy_checkpoint, tmp_path / "c.h5", _config(), spec_options={"n": "30", "empty_at": "3"})

    def test_unknown_split_lists_the_spec_splits(self, tmp_path, toy_checkpoint):
        with pytest.raises(ConfigError, match="no split 'valid'.*train, val, test"):
            extract(TOY, toy_checkpoint, tmp_path / "c.h5", _config(splits=("valid",)))

    def test_finished_cache_is_not_overwritten_without_overwrite(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(TOY, toy_checkpoint, path, _config(), spec_options={"n": "20"})
        before = path.read_bytes()
        with pytest.raises(OutputExistsError, match="--overwrite"):
            extract(TOY, toy_checkpoint, path, _config(), spec_options={"n": "20"})
        assert path.read_bytes() == before
        extract(TOY, toy_checkpoint, path, _config(overwrite=True), spec_options={"n": "20"})

    def test_amp_without_cuda_is_refused(self, tmp_path, toy_checkpoint):
        with pytest.raises(ConfigError, match="--amp bf16 needs a CUDA device"):
            extract(TOY, toy_checkpoint, tmp_path / "c.h5", _config(amp="bf16"))

    @pytest.mark.parametrize("field,value", [("dtype", "float64"), ("batch_size", 0), ("amp", "fp8")])
    def test_bad_settings_name_the_parameter(self, field, value):
        with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must be .*; got {value!r}"):
            _config(**{field: value})


@pytest.mark.skipif(not FIXTURE.exists(), reason="the shared SeqSetVAE fixture is beside the repo")
def test_real_seqsetvae_checkpoint_extracts_to_the_reference_hidden_states(tmp_path):
    """The original model's checkpoint loads with no key map and the cache holds its h_seq within 1e-4."""
    path = tmp_path / "fixture.h5"
    result = extract("seqsetvae", FIXTURE / "seed_model.ckpt", path, _config(dtype="float32", batch_size=5),
                     spec_options={"data": str(FIXTURE / "data")})
    assert result.load_report.loaded == 117 and result.load_report.key_map == {}
    assert any(k.startswith("cls_head.") for k in result.load_report.unexpected)
    reference = np.load(FIXTURE / "reference_h_seq.npz")
    worst = 0.0
    with CacheReader(path) as reader:
        for split in ("train", "valid", "test"):
            part = reader.split(split)
            ids = [str(i) for i in reference[f"{split}_ids"]]
            assert part.ids == ids
            assert part.labels.tolist() == reference[f"{split}_labels"].tolist()
            assert part.offsets.tolist() == reference[f"{split}_offsets"].tolist()
            worst = max(worst, float(np.abs(part.tokens() - reference[f"{split}_tokens"]).max()))
    assert worst <= 1e-4, f"max abs difference to the original model: {worst:.3g}"
