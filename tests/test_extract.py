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


def _toy():
    import toy_spec

    return toy_spec


class _Relabelled(torch.utils.data.Dataset):
    """A toy dataset with some items' labels or ids replaced."""

    def __init__(self, dataset, labels: dict, ids: dict):
        self.dataset, self.labels, self.ids = dataset, labels, ids

    def __len__(self):
        return len(self.dataset)

    def lengths(self):
        return self.dataset.lengths()

    def __getitem__(self, i):
        inputs, label, item_id = self.dataset[i]
        return inputs, self.labels.get(i, label), self.ids.get(i, item_id)


def _spec(n=30, labels=None, ids=None, num_classes=2, huge_at=-1, **options):
    """The toy spec with train labels / ids replaced, its num_classes changed, or item ``huge_at`` of train
    given states beyond float16's range."""
    toy = _toy()

    class Spec(toy.ToySpec):
        def dataset(self, split):
            base = super().dataset(split)
            return _Relabelled(base, labels or {}, ids or {}) if split == "train" else base

        def encode(self, backbone, batch):  # the toy's NaN flag, as a huge value instead
            hidden = backbone(batch["x"], batch["lengths"])
            mask = torch.arange(hidden.shape[1]) < batch["lengths"].unsqueeze(1)
            return torch.where(batch["nan"].view(-1, 1, 1) > 0, hidden * 1e6 + 7e4, hidden), mask

    spec = Spec(*toy.make_spec(n=str(n), nan_at=str(huge_at), **options).options)
    spec.num_classes = num_classes
    return spec


class TestFloat16Range:
    def test_states_beyond_float16_are_refused_before_rounding_and_nothing_is_complete(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        with pytest.raises(DataError, match=r"split 'train', sequence 'train-0005': hidden states up to \d\.\d+e\+0[56] "
                                            r"exceed float16's range \(65504\); extract with --dtype float32"):
            extract(_spec(huge_at=5), toy_checkpoint, path, _config(dtype="float16"))
        with CacheReader(path) as reader:
            assert not reader.split("train", require_complete=False).complete

    def test_float32_keeps_them(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(_spec(huge_at=5), toy_checkpoint, path, _config(dtype="float32", splits=("train",)))
        with CacheReader(path) as reader:
            assert float(np.abs(reader.split("train").sequence(5)).max()) > 65504


class TestLabels:
    @pytest.mark.parametrize("label, shown", [
        (0.5, "has label 0.5, not a whole number"),
        ("1", r"has label '1' \(str\); a label must be an integer class index"),
        (True, r"has label True \(bool\)"),
        (2, r"has label 2; labels must be 0\.\.1 \(the spec's num_classes\)"),
        (-1, "has label -1; labels must be 0..1"),
        (torch.tensor([0, 1]), "has label tensor"),
    ])
    def test_a_label_that_is_no_class_is_refused_naming_item_and_split(self, tmp_path, toy_checkpoint, label, shown):
        with pytest.raises(DataError, match="sequence 'train-0007' of split 'train' " + shown):
            extract(_spec(labels={7: label}), toy_checkpoint, tmp_path / "c.h5", _config())

    def test_whole_number_labels_of_any_type_are_stored_as_integers(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(_spec(labels={0: 1.0, 1: np.int32(1), 2: torch.tensor(1)}), toy_checkpoint, path, _config())
        with CacheReader(path) as reader:
            assert reader.split("train").labels[:3].tolist() == [1, 1, 1]

    def test_unlabelled_items_are_stored_as_minus_one_and_the_split_marked(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(_spec(labels={i: None for i in range(30)}), toy_checkpoint, path, _config())
        with CacheReader(path) as reader:
            train, val = reader.split("train"), reader.split("val")
            assert (set(train.labels.tolist()), train.labeled, val.labeled) == ({-1}, False, True)

    def test_the_spec_classes_are_recorded(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        spec = _spec()
        spec.class_names = ["low", "high"]
        extract(spec, toy_checkpoint, path, _config())
        with CacheReader(path) as reader:
            assert (reader.num_classes, reader.class_names, reader.amp) == (2, ["low", "high"], "none")

    def test_without_spec_classes_they_come_from_the_labels_of_every_split(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(_spec(labels={3: 4}, num_classes=None), toy_checkpoint, path, _config())
        with CacheReader(path) as reader:
            assert (reader.num_classes, reader.class_names) == (5, ["0", "1", "2", "3", "4"])


class TestIds:
    def test_a_duplicate_id_is_refused_by_name(self, tmp_path, toy_checkpoint):
        with pytest.raises(DataError, match="split 'train': id 'train-0003' is given to rows 3 and 17; ids must be "
                                            "unique"):
            extract(_spec(ids={17: "train-0003"}), toy_checkpoint, tmp_path / "c.h5", _config())


class TestResumeIdentity:
    def _interrupted(self, path: Path, toy_checkpoint) -> None:
        with pytest.raises(NonFiniteError):
            extract(TOY, toy_checkpoint, path, _config(batch_size=1), spec_options={"n": "30", "nan_at": "26"})

    def test_the_same_data_given_another_way_resumes_to_the_same_cache(self, tmp_path, toy_checkpoint, monkeypatch):
        interrupted, reference = tmp_path / "interrupted.h5", tmp_path / "reference.h5"
        self._interrupted(interrupted, toy_checkpoint)
        monkeypatch.chdir(REPO)  # the spec by a relative path, its options spelled otherwise
        result = extract("tests/data/toy_spec.py:make_spec", toy_checkpoint, interrupted, _config(batch_size=1),
                         spec_options={"n": "30", "marker": "/nonexistent/other"})
        assert result.resumed
        extract(TOY, toy_checkpoint, reference, _config(batch_size=1), spec_options={"n": "30"})
        for (ta, oa, la, ia), (tb, ob, lb, ib) in zip(_contents(interrupted).values(), _contents(reference).values()):
            assert np.array_equal(oa, ob) and np.array_equal(la, lb) and ia == ib and np.array_equal(ta, tb)

    @pytest.mark.parametrize("change", [{"ids": {0: "someone-else"}}, {"labels": {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}}])
    def test_changed_data_of_the_same_size_is_refused_and_the_file_kept(self, tmp_path, toy_checkpoint, change):
        path = tmp_path / "c.h5"
        self._interrupted(path, toy_checkpoint)
        before = path.read_bytes()
        with pytest.raises(OutputExistsError, match=r"split 'train' was extracted from other data: its row \d+ is "
                                                    r"id .* in the data now\. Extract the changed data into another "
                                                    "--out, or pass --overwrite"):
            extract(_spec(**change), toy_checkpoint, path, _config(batch_size=1))
        assert path.read_bytes() == before

    def test_a_split_can_be_added_to_a_finished_cache(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(TOY, toy_checkpoint, path, _config(splits=("train",)), spec_options={"n": "20"})
        train_before = _contents(path)["train"]
        result = extract(TOY, toy_checkpoint, path, _config(splits=("train", "test")), spec_options={"n": "20"})
        assert result.resumed and result.written == 20
        after = _contents(path)
        assert list(after) == ["train", "test"] and after["test"][3] == [f"test-{i:04d}" for i in range(20)]
        assert all(np.array_equal(a, b) for a, b in zip(after["train"][:3], train_before[:3]))


class TestAtomicOverwrite:
    def test_a_failed_overwrite_leaves_the_old_cache_byte_identical(self, tmp_path, toy_checkpoint):
        path = tmp_path / "c.h5"
        extract(TOY, toy_checkpoint, path, _config(), spec_options={"n": "20"})
        before = path.read_bytes()
        with pytest.raises(NonFiniteError):
            extract(TOY, toy_checkpoint, path, _config(overwrite=True), spec_options={"n": "20", "nan_at": "9"})
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
