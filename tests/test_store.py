"""The HDF5 cache, schema 1: layout, round trips, resume (also after SIGKILL), refusals, summary."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headcache.errors import (
    CacheError,
    ConfigError,
    DataError,
    FingerprintMismatchError,
    OutputExistsError,
    SchemaError,
    SplitIncompleteError,
    SplitMissingError,
)
from headcache.store import MAX_INFERRED_CLASSES, SCHEMA, CacheReader, CacheWriter, data_fingerprint, sequence_bounds

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("data") / "schema1_tiny.h5"
D = 4


def make_attrs(**changes) -> dict:
    attrs = {
        "backbone_fingerprint": "ab" * 32,
        "spec": "demo",
        "checkpoint_sha256": "cd" * 32,
        "hidden_dim": D,
        "dtype": "float32",
        "load_report": {"loaded": 7, "key_map": {}},
    }
    return {**attrs, **changes}


def ragged(lengths, d=D, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, d)).astype(np.float32) for n in lengths]


def rows_of(seqs: list[np.ndarray], start: int = 0) -> dict:
    """The write() arguments for sequences numbered from ``start``."""
    k = len(seqs)
    mean = np.array([s.mean(0) if len(s) else np.zeros(D) for s in seqs], dtype=np.float32).reshape(k, D)
    return {
        "tokens": seqs,
        "labels": np.arange(start, start + k) % 3,
        "ids": [f"id-{i}" for i in range(start, start + k)],
        "pooled": {"mean": mean, "last": np.repeat(np.arange(start, start + k, dtype=np.float32)[:, None], D, axis=1)},
    }


def write_split(writer: CacheWriter, name: str, seqs: list[np.ndarray], blocks: list[int], finish: bool = True):
    """Write ``seqs`` to split ``name`` in blocks of the given sizes (which sum to at most len(seqs))."""
    split = writer.split(name, len(seqs), ["mean", "last"])
    start = split.rows_written
    for size in blocks:
        split.write(**rows_of(seqs[start : start + size], start))
        start += size
    if finish:
        split.finish()
    return split


def contents(path: Path) -> dict:
    """Every attribute, dataset value and dataset layout property in the file, for exact comparison."""
    out = {}

    def visit(name, obj):
        out[name + "@attrs"] = dict(obj.attrs)
        if isinstance(obj, h5py.Dataset):
            values = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
            out[name] = (values.tolist(), str(obj.dtype), obj.shape, obj.maxshape, obj.chunks, obj.fletcher32)

    with h5py.File(path, "r") as f:
        out["/@attrs"] = dict(f.attrs)
        f.visititems(visit)
    return out


def assert_same_contents(a: Path, b: Path) -> None:
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        assert repr(ca[key]) == repr(cb[key]), key  # repr: NaN equals NaN, dtypes must agree


def one_go(path: Path, train: list[np.ndarray], val: list[np.ndarray], dtype: str = "float32") -> None:
    with CacheWriter(path, make_attrs(dtype=dtype)) as writer:
        write_split(writer, "train", train, [len(train)])
        write_split(writer, "val", val, [len(val)])


def stat(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


class TestSequenceBounds:
    OFFSETS = np.array([0, 2, 2, 5], dtype=np.int64)  # lengths 2, 0, 3

    def test_first_sequence(self):
        starts, stops = sequence_bounds(self.OFFSETS, [0])
        assert (starts.tolist(), stops.tolist()) == ([0], [2])

    def test_empty_sequence_has_equal_bounds(self):
        starts, stops = sequence_bounds(self.OFFSETS, [1])
        assert (starts.tolist(), stops.tolist()) == ([2], [2])

    def test_last_sequence_ends_at_the_last_row(self):
        starts, stops = sequence_bounds(self.OFFSETS, [2])
        assert (starts.tolist(), stops.tolist()) == ([2], [5])

    def test_many_rows_keep_their_order(self):
        starts, stops = sequence_bounds(self.OFFSETS, np.array([2, 0, 2]))
        assert (starts.tolist(), stops.tolist()) == ([2, 0, 2], [5, 2, 5])

    def test_no_rows(self):
        starts, stops = sequence_bounds(self.OFFSETS, np.array([], dtype=np.int64))
        assert (starts.shape, stops.shape) == ((0,), (0,))

    @pytest.mark.parametrize("row", [3, -1])
    def test_index_outside_the_split_is_refused(self, row):
        with pytest.raises(CacheError, match="the split has 3 sequences"):
            sequence_bounds(self.OFFSETS, [row])


class TestCreate:
    def test_root_attributes(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            assert writer.resuming is False
        with h5py.File(path, "r") as f:
            assert dict(f.attrs) == {
                "format": "headcache", "schema": 2, "backbone_fingerprint": "ab" * 32, "spec": "demo",
                "checkpoint_sha256": "cd" * 32, "hidden_dim": D, "dtype": "float32", "amp": "none", "num_classes": 2,
                "class_names": '["0", "1"]', "created_by": "headcache 0.1.0",
                "load_report": '{"key_map": {}, "loaded": 7}',
            }

    def test_split_layout(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs(dtype="float16")) as writer:
            writer.split("train", 5, ["mean", "last"])
        with h5py.File(path, "r") as f:
            g = f["train"]
            assert dict(g.attrs) == {"n": 5, "complete": False, "labeled": True, "data_fingerprint": "",
                                     "rows_pending": 0, "rows_written": 0}
            tokens = g["tokens"]
            assert (tokens.dtype, tokens.shape, tokens.maxshape) == (np.float16, (0, D), (None, D))
            assert tokens.chunks == ((1 << 20) // (D * 2), D) and tokens.fletcher32
            assert (g["offsets"].dtype, g["offsets"].shape, g["offsets"].fletcher32) == (np.int64, (6,), True)
            assert (g["labels"].dtype, g["labels"].shape, g["labels"].fletcher32) == (np.int64, (5,), True)
            assert h5py.check_string_dtype(g["ids"].dtype).encoding == "utf-8"
            assert sorted(g["pooled"]) == ["last", "mean"]
            assert (g["pooled/mean"].dtype, g["pooled/mean"].shape) == (np.float32, (5, D))
            assert g["pooled/mean"].fletcher32 and g["pooled/mean"].chunks == (5, D)

    def test_finish_marks_complete_with_the_data_fingerprint(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            split = write_split(writer, "train", ragged([2, 0, 1]), [3])
            assert split.complete and split.rows_written == 3
        offsets, labels = np.array([0, 2, 2, 3]), np.array([0, 1, 2])
        by_hand = hashlib.sha256(offsets.astype("<i8").tobytes() + labels.astype("<i8").tobytes()
                                 + b"".join(len(s).to_bytes(8, "little") + s.encode() for s in ["id-0", "id-1", "id-2"]))
        with h5py.File(path, "r") as f:
            assert f["train"].attrs["data_fingerprint"] == by_hand.hexdigest()
            assert f["train"].attrs["data_fingerprint"] == data_fingerprint(["id-0", "id-1", "id-2"], labels, offsets)

    def test_rows_written_advances_with_each_write(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs()) as writer:
            split = writer.split("train", 5, ["mean", "last"])
            seqs = ragged([1, 2, 3, 0, 1])
            split.write(**rows_of(seqs[:2]))
            assert (split.rows_written, split.complete) == (2, False)
            split.write(**rows_of(seqs[2:], 2))
            assert split.rows_written == 5

    def test_finish_before_every_row_is_refused(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs()) as writer:
            split = write_split(writer, "train", ragged([1, 1, 1]), [2], finish=False)
            with pytest.raises(CacheError, match="split 'train': 2 of 3 sequences are written; cannot finish it"):
                split.finish()

    def test_writing_past_n_is_refused(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs()) as writer:
            split = writer.split("train", 2, ["mean", "last"])
            with pytest.raises(CacheError, match="holds 2 sequences; 0 are written, so 3 more do not fit"):
                split.write(**rows_of(ragged([1, 1, 1])))

    def test_writing_to_a_complete_split_is_refused(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs()) as writer:
            split = write_split(writer, "train", ragged([1]), [1])
            with pytest.raises(CacheError, match="already complete"):
                split.write(**rows_of(ragged([1])))

    def test_split_with_no_sequences(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            writer.split("empty", 0, ["mean"]).finish()
        with CacheReader(path) as reader:
            split = reader.split("empty")
            assert (split.offsets.tolist(), split.ids, split.num_tokens, split.pooled("mean").shape) == ([0], [], 0, (0, D))


class TestWriteValidation:
    @pytest.fixture
    def split(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs(dtype="float16")) as writer:
            yield writer.split("train", 4, ["mean", "last"])

    def test_tokens_of_another_width_name_the_sequence(self, split):
        rows = rows_of(ragged([1, 2]))
        rows["tokens"][1] = np.zeros((2, D + 1))
        with pytest.raises(DataError, match=r"sequence 'id-1': tokens must be \(T, 4\), got \(2, 5\)"):
            split.write(**rows)

    def test_labels_of_another_length(self, split):
        with pytest.raises(DataError, match="labels must be 2 integers"):
            split.write(**{**rows_of(ragged([1, 2])), "labels": np.array([0, 1, 1])})

    def test_float_labels(self, split):
        with pytest.raises(DataError, match="labels must be 2 integers, got float64"):
            split.write(**{**rows_of(ragged([1, 2])), "labels": np.array([0.0, 1.0])})

    def test_ids_of_another_length(self, split):
        with pytest.raises(DataError, match="ids must be 2 strings, got 1"):
            split.write(**{**rows_of(ragged([1, 2])), "ids": ["a"]})

    def test_id_with_nul_is_refused(self, split):
        with pytest.raises(DataError, match="contains a NUL character"):
            split.write(**{**rows_of(ragged([1])), "ids": ["a\0b"]})

    def test_pooled_names_must_match_the_split(self, split):
        rows = rows_of(ragged([1]))
        del rows["pooled"]["last"]
        with pytest.raises(DataError, match=r"pooled must hold \['last', 'mean'\], got \['mean'\]"):
            split.write(**rows)

    def test_pooled_shape(self, split):
        rows = rows_of(ragged([1]))
        rows["pooled"]["mean"] = np.zeros((1, D - 1))
        with pytest.raises(DataError, match=r"pooled 'mean' must be \(1, 4\), got \(1, 3\)"):
            split.write(**rows)

    def test_float16_overflow_names_the_sequence(self, split):
        seqs = ragged([1, 2])
        seqs[1][1, 2] = 70000.0
        with pytest.raises(DataError, match=r"sequence 'id-1': hidden states up to 7e\+04 exceed float16's range \(65504\); extract with --dtype float32"):
            split.write(**rows_of(seqs))
        assert split.rows_written == 0

    def test_invalid_dtype_lists_the_valid_ones(self, tmp_path):
        with pytest.raises(ConfigError, match="dtype must be one of float16, float32, got 'bfloat16'"):
            CacheWriter(tmp_path / "c.h5", make_attrs(dtype="bfloat16"))
        assert not (tmp_path / "c.h5").exists()

    def test_missing_attrs_are_named(self, tmp_path):
        attrs = make_attrs()
        del attrs["spec"]
        with pytest.raises(ConfigError, match=r"cache attrs lack \['spec'\]"):
            CacheWriter(tmp_path / "c.h5", attrs)

    @pytest.mark.parametrize("name", ["", "a/b"])
    def test_invalid_split_name(self, tmp_path, name):
        with CacheWriter(tmp_path / "c.h5", make_attrs()) as writer:
            with pytest.raises(ConfigError, match="split name must be a non-empty string without '/'"):
                writer.split(name, 1, [])


float_rows = st.lists(st.integers(0, 5), min_size=1, max_size=8)


class TestRoundTrip:
    @settings(max_examples=30, deadline=None)
    @given(lengths=float_rows, d=st.integers(1, 5), data=st.data())
    def test_float32_round_trips_bit_exactly(self, lengths, d, data):
        finite = st.floats(width=32, allow_nan=True, allow_infinity=True)
        seqs = [data.draw(st.lists(finite, min_size=n * d, max_size=n * d)) for n in lengths]
        seqs = [np.array(s, dtype=np.float32).reshape(n, d) for s, n in zip(seqs, lengths)]
        ids = data.draw(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")),
                                 min_size=len(seqs), max_size=len(seqs), unique=True))
        labels = np.array(data.draw(st.lists(st.integers(-1, MAX_INFERRED_CLASSES - 1), min_size=len(seqs),
                                             max_size=len(seqs))))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.h5"
            with CacheWriter(path, make_attrs(hidden_dim=d)) as writer:
                split = writer.split("train", len(seqs), ["mean"])
                split.write(seqs, labels, ids, {"mean": np.ones((len(seqs), d))})
                split.finish()
            with CacheReader(path) as reader:
                got = reader.split("train")
                assert got.ids == ids and got.labels.tolist() == labels.tolist()
                assert np.diff(got.offsets).tolist() == lengths
                for i, seq in enumerate(seqs):
                    assert got.sequence(i).dtype == np.float32
                    assert got.sequence(i).view(np.uint32).tolist() == seq.view(np.uint32).tolist()

    @settings(max_examples=30, deadline=None)
    @given(lengths=float_rows, data=st.data())
    def test_float16_equals_numpy_casting(self, lengths, data):
        value = st.floats(-65504, 65504, width=32)
        seqs = [np.array(data.draw(st.lists(value, min_size=n * D, max_size=n * D)), dtype=np.float32).reshape(n, D)
                for n in lengths]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.h5"
            with CacheWriter(path, make_attrs(dtype="float16")) as writer:
                write_split(writer, "train", seqs, [len(seqs)])
            with CacheReader(path) as reader:
                got = reader.split("train")
                for i, seq in enumerate(seqs):
                    assert got.sequence(i).dtype == np.float16
                    assert got.sequence(i).tobytes() == seq.astype(np.float16).tobytes()

    def test_tokens_slices_the_flat_matrix(self, tmp_path):
        seqs = ragged([2, 0, 3])
        path = tmp_path / "c.h5"
        one_go(path, seqs, ragged([1]))
        with CacheReader(path) as reader:
            split = reader.split("train")
            assert np.array_equal(split.tokens(), np.concatenate(seqs))
            assert np.array_equal(split.tokens(1, 4), np.concatenate(seqs)[1:4])
            assert split.tokens(5, 5).shape == (0, D)
            assert split.sequence(1).shape == (0, D)

    def test_pooled_round_trips(self, tmp_path):
        seqs = ragged([2, 1])
        path = tmp_path / "c.h5"
        one_go(path, seqs, ragged([1]))
        with CacheReader(path) as reader:
            pooled = reader.split("train").pooled("mean")
        assert pooled.dtype == np.float32 and np.array_equal(pooled, rows_of(seqs)["pooled"]["mean"])

    def test_reader_attributes_are_plain_values(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([1]), ragged([1]))
        with CacheReader(path) as reader:
            got = (reader.schema, reader.hidden_dim, reader.dtype, reader.backbone_fingerprint, reader.spec,
                   reader.checkpoint_sha256, reader.created_by, reader.load_report, reader.splits)
        assert got == (2, D, "float32", "ab" * 32, "demo", "cd" * 32, "headcache 0.1.0",
                       {"loaded": 7, "key_map": {}}, ["train", "val"])
        assert type(got[1]) is int and type(got[0]) is int

    def test_splits_are_listed_in_creation_order(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            for name in ("train", "val", "test"):
                write_split(writer, name, ragged([1]), [1])
        with CacheReader(path) as reader:
            assert reader.splits == ["train", "val", "test"]


class TestResume:
    @settings(max_examples=25, deadline=None)
    @given(lengths=st.lists(st.integers(0, 4), min_size=1, max_size=12), data=st.data())
    def test_resuming_from_any_row_gives_the_same_file(self, lengths, data):
        seqs = ragged(lengths)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(seqs)), max_size=4)))
        blocks = [b - a for a, b in zip([0] + cuts, cuts + [len(seqs)])]
        interrupt_after = data.draw(st.integers(0, len(blocks)))
        with tempfile.TemporaryDirectory() as tmp:
            reference, resumed = Path(tmp) / "one_go.h5", Path(tmp) / "resumed.h5"
            one_go(reference, seqs, ragged([2]))
            with CacheWriter(resumed, make_attrs()) as writer:
                write_split(writer, "train", seqs, blocks[:interrupt_after], finish=False)
                writer.split("val", 1, ["mean", "last"])
            with CacheWriter(resumed, make_attrs()) as writer:
                assert writer.resuming
                write_split(writer, "train", seqs, blocks[interrupt_after:])
                write_split(writer, "val", ragged([2]), [1])
            assert_same_contents(reference, resumed)

    def test_resume_starts_at_rows_written(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 2, 3]), [2], finish=False)
        with CacheWriter(path, make_attrs()) as writer:
            split = writer.split("train", 3, ["mean", "last"])
            assert (split.rows_written, split.complete) == (2, False)

    def test_a_file_with_no_splits_yet_is_resumed(self, tmp_path):
        path = tmp_path / "c.h5"
        CacheWriter(path, make_attrs()).close()
        with CacheWriter(path, make_attrs()) as writer:
            assert writer.resuming

    def test_another_checkpoint_file_with_the_same_weights_resumes(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 2]), [1], finish=False)
        with CacheWriter(path, make_attrs(checkpoint_sha256="ef" * 32)) as writer:
            assert writer.resuming

    def test_resuming_with_another_n_is_refused(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 2]), [1], finish=False)
        with CacheWriter(path, make_attrs()) as writer:
            with pytest.raises(OutputExistsError, match="split 'train' exists with n=2 .* this extraction has n=3.*--overwrite"):
                writer.split("train", 3, ["mean", "last"])

    def test_resuming_with_other_pooled_names_is_refused(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 2]), [1], finish=False)
        with CacheWriter(path, make_attrs()) as writer:
            with pytest.raises(OutputExistsError, match=r"pooled \['last', 'mean'\].*pooled \['mean'\]"):
                writer.split("train", 2, ["mean"])


# A writer in its own process, killed by SIGKILL at a chosen point of its second block.
KILLED_WRITER = """
import os, signal, sys
import h5py
sys.path.insert(0, {tests!r})
import test_store as t
from headcache.store import CacheWriter, SplitWriter

where = {where!r}


def commit(self, rows):  # "before_commit": data flushed, rows_written not yet moved
    os.kill(os.getpid(), signal.SIGKILL)


def setitem(self, key, value, set_item=h5py.Dataset.__setitem__):  # "mid_write": tokens and ids written, nothing flushed
    if self.name.endswith("/pooled/last"):
        os.kill(os.getpid(), signal.SIGKILL)
    set_item(self, key, value)


seqs = t.ragged(t.LENGTHS)
with CacheWriter({path!r}, t.make_attrs(dtype="float16")) as writer:
    split = writer.split("train", len(seqs), ["mean", "last"])
    writer.split("val", 2, ["mean", "last"])
    split.write(**t.rows_of(seqs[:3]))
    if where == "between_writes":  # block 1 committed and flushed
        os.kill(os.getpid(), signal.SIGKILL)
    SplitWriter._commit = commit if where == "before_commit" else SplitWriter._commit
    h5py.Dataset.__setitem__ = setitem if where == "mid_write" else h5py.Dataset.__setitem__
    split.write(**t.rows_of(seqs[3:], 3))
"""
LENGTHS = [3, 0, 5, 2, 4, 1]


class TestKilledWriter:
    @pytest.mark.parametrize("where", ["between_writes", "before_commit", "mid_write"])
    def test_a_sigkilled_writer_leaves_a_file_that_resumes_to_the_same_content(self, tmp_path, where):
        killed = tmp_path / "killed.h5"
        script = KILLED_WRITER.format(tests=str(Path(__file__).parent), where=where, path=str(killed))
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == -signal.SIGKILL, result.stderr
        with CacheReader(killed) as reader:
            assert reader.split("train", require_complete=False).rows_written == 3
        seqs = ragged(LENGTHS)
        with CacheWriter(killed, make_attrs(dtype="float16")) as writer:
            assert writer.resuming
            write_split(writer, "train", seqs, [len(seqs) - 3])
            write_split(writer, "val", ragged([1, 1]), [2])
        reference = tmp_path / "reference.h5"
        one_go(reference, seqs, ragged([1, 1]), dtype="float16")
        assert_same_contents(reference, killed)


class TestReaderRefusals:
    def test_missing_file(self, tmp_path):
        path = tmp_path / "nope.h5"
        with pytest.raises(CacheError, match=f"cache {path} does not exist") as info:
            CacheReader(path)
        assert type(info.value) is CacheError

    def test_text_file_is_not_hdf5(self, tmp_path):
        path = tmp_path / "c.h5"
        path.write_text("id,label\n1,0\n")
        with pytest.raises(SchemaError, match=f"{path} is not an HDF5 file"):
            CacheReader(path)

    def test_hdf5_without_format_is_not_a_cache(self, tmp_path):
        path = tmp_path / "c.h5"
        with h5py.File(path, "w") as f:
            f["x"] = [1, 2]
        with pytest.raises(SchemaError, match="is an HDF5 file but not a headcache cache"):
            CacheReader(path)

    def test_another_schema_names_both_versions_and_the_fix(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([1]), ragged([1]))
        with h5py.File(path, "r+") as f:
            f.attrs["schema"] = 3
        with pytest.raises(SchemaError) as info:
            CacheReader(path)
        message = str(info.value)
        assert "has cache schema 3" in message and f"reads schemas 1, {SCHEMA}" in message
        assert "Re-extract the cache with this version (headcache extract ... --overwrite)" in message

    def test_schema_error_is_a_value_error(self, tmp_path):
        path = tmp_path / "c.h5"
        path.write_text("x")
        with pytest.raises(ValueError):
            CacheReader(path)

    def test_missing_split_lists_the_available_ones(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([1]), ragged([1]))
        with CacheReader(path) as reader:
            with pytest.raises(SplitMissingError) as info:
                reader.split("test")
        assert str(info.value) == f"{path} has no split 'test'; available splits: train, val"
        assert isinstance(info.value, KeyError)

    def test_incomplete_split_names_progress_and_the_fix(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 2, 3, 4, 5]), [2], finish=False)
        with CacheReader(path) as reader:
            with pytest.raises(SplitIncompleteError) as info:
                reader.split("train")
        assert str(info.value) == (
            f"split 'train' of {path} is incomplete (2/5 sequences written): its extraction was interrupted. "
            "Rerun the same headcache extract command to resume it"
        )

    def test_incomplete_split_can_be_read_up_to_rows_written(self, tmp_path):
        path = tmp_path / "c.h5"
        seqs = ragged([1, 2, 3, 4, 5])
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", seqs, [2], finish=False)
        with CacheReader(path) as reader:
            split = reader.split("train", require_complete=False)
            assert (split.n, split.rows_written, split.complete) == (5, 2, False)
            assert (split.offsets.tolist(), split.ids, split.labels.tolist()) == ([0, 1, 3], ["id-0", "id-1"], [0, 1])
            assert split.pooled("last").shape == (2, D)
            assert np.array_equal(split.tokens(), np.concatenate(seqs[:2]))

    def test_fingerprint_mismatch_names_both_and_the_fix(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([1]), ragged([1]))
        with pytest.raises(FingerprintMismatchError) as info:
            CacheReader(path, expected_fingerprint="0123456789ab" + "0" * 52)
        message = str(info.value)
        assert f"{path} was written by backbone abababababab, but this backbone is 0123456789ab" in message
        assert "re-extract the cache with this one (headcache extract ... --overwrite)" in message
        assert isinstance(info.value, ValueError)

    def test_matching_fingerprint_opens(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([1]), ragged([1]))
        with CacheReader(path, expected_fingerprint="ab" * 32) as reader:
            assert reader.split("train").n == 1

    def test_unknown_pooled_name_lists_the_available_ones(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([1]), ragged([1]))
        with CacheReader(path) as reader:
            with pytest.raises(CacheError, match="split 'train' has no pooled 'max'; available: last, mean"):
                reader.split("train").pooled("max")

    def test_token_rows_outside_the_split(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([2]), ragged([1]))
        with CacheReader(path) as reader:
            with pytest.raises(CacheError, match=r"token rows \[1, 3\) are outside \[0, 2\)"):
                reader.split("train").tokens(1, 3)

    def test_sequence_index_outside_the_split(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([2]), ragged([1]))
        with CacheReader(path) as reader:
            with pytest.raises(CacheError, match="the split has 1 sequences"):
                reader.split("train").sequence(1)


class TestWriterRefusals:
    @pytest.fixture
    def complete(self, tmp_path) -> Path:
        path = tmp_path / "c.h5"
        one_go(path, ragged([1, 2]), ragged([1]))
        return path

    def test_a_complete_cache_is_not_extracted_again(self, complete):
        before = stat(complete)
        with pytest.raises(OutputExistsError) as info:
            CacheWriter(complete, make_attrs())
        assert str(info.value) == f"{complete} is already complete (splits train, val); pass --overwrite to extract again"
        assert stat(complete) == before

    @pytest.mark.parametrize("change, shown", [
        ({"backbone_fingerprint": "ef" * 32}, "backbone_fingerprint 'abababababab' in the file, 'efefefefefef' now"),
        ({"amp": "bf16"}, "amp 'none' in the file, 'bf16' now"),
        ({"hidden_dim": 8}, "hidden_dim 4 in the file, 8 now"),
        ({"dtype": "float16"}, "dtype 'float32' in the file, 'float16' now"),
    ])
    def test_another_setting_is_refused_and_the_file_kept(self, tmp_path, change, shown):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 2]), [1], finish=False)
        before = stat(path)
        with pytest.raises(OutputExistsError) as info:
            CacheWriter(path, make_attrs(**change))
        assert str(info.value) == f"{path} exists and was written with another setting ({shown}); pass --overwrite to replace it"
        assert stat(path) == before

    def test_a_text_file_is_refused_and_kept(self, tmp_path):
        path = tmp_path / "c.h5"
        path.write_text("precious notes\n")
        before = stat(path)
        with pytest.raises(OutputExistsError, match="exists and is not a headcache cache \\(not an HDF5 file\\); pass --overwrite"):
            CacheWriter(path, make_attrs())
        assert stat(path) == before

    def test_a_foreign_hdf5_file_is_refused_and_kept(self, tmp_path):
        path = tmp_path / "c.h5"
        with h5py.File(path, "w") as f:
            f["data"] = np.arange(10)
        before = stat(path)
        with pytest.raises(OutputExistsError, match="an HDF5 file without format='headcache'.*--overwrite"):
            CacheWriter(path, make_attrs())
        assert stat(path) == before

    def test_overwrite_replaces_a_complete_cache(self, complete):
        with CacheWriter(complete, make_attrs(spec="other"), overwrite=True) as writer:
            assert writer.resuming is False
        with CacheReader(complete) as reader:
            assert (reader.spec, reader.splits) == ("other", [])

    def test_overwrite_replaces_a_file_that_is_not_a_cache(self, tmp_path):
        path = tmp_path / "c.h5"
        path.write_text("not a cache")
        CacheWriter(path, make_attrs(), overwrite=True).close()
        with CacheReader(path) as reader:
            assert reader.splits == []


class TestSummary:
    def test_summary_values(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([2, 0, 4]), [3])
            write_split(writer, "val", ragged([1, 2, 3, 4]), [2], finish=False)
        with CacheReader(path) as reader:
            summary = reader.summary()
        fingerprint = data_fingerprint(["id-0", "id-1", "id-2"], np.array([0, 1, 2]), np.array([0, 2, 2, 6]))
        assert summary == {
            "path": str(path), "format": "headcache", "schema": 2, "hidden_dim": D, "dtype": "float32",
            "amp": "none", "num_classes": 3, "class_names": ["0", "1", "2"], "backbone_fingerprint": "ab" * 32, "spec": "demo", "checkpoint_sha256": "cd" * 32,
            "created_by": "headcache 0.1.0", "load_report": {"loaded": 7, "key_map": {}},
            "splits": {
                "train": {"n": 3, "complete": True, "labeled": True, "rows_written": 3, "tokens": 6, "data_fingerprint": fingerprint,
                          "pooled": ["last", "mean"], "class_counts": {"0": 1, "1": 1, "2": 1},
                          "lengths": {"min": 0, "mean": 2.0, "max": 4}},
                "val": {"n": 4, "complete": False, "labeled": True, "rows_written": 2, "tokens": 3, "data_fingerprint": None,
                        "pooled": ["last", "mean"], "class_counts": {"0": 1, "1": 1},
                        "lengths": {"min": 1, "mean": 1.5, "max": 2}},
            },
        }
        assert json.loads(json.dumps(summary)) == summary

    def test_summary_of_a_split_with_nothing_written(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            writer.split("train", 3, ["mean"])
        with CacheReader(path) as reader:
            split = reader.summary()["splits"]["train"]
        assert (split["tokens"], split["class_counts"], split["lengths"]) == (0, {}, {"min": None, "mean": None, "max": None})


class TestSchema1File:
    """tests/data/schema1_tiny.h5 was written by the first version (make_schema1_tiny.py); keep reading it."""

    def test_root_attributes(self):
        with CacheReader(TINY) as reader:
            assert (reader.schema, reader.hidden_dim, reader.dtype, reader.spec, reader.created_by) == (
                1, 3, "float16", "demo", "headcache 0.1.0")
            assert reader.backbone_fingerprint == "0123456789abcdef" * 4
            assert reader.checkpoint_sha256 == "fedcba9876543210" * 4
            assert reader.load_report["unexpected"] == ["cls_head.0.weight"]
            assert reader.splits == ["train", "val"]

    def test_complete_split(self):
        with CacheReader(TINY) as reader:
            train = reader.split("train")
            assert (train.n, train.complete, train.rows_written, train.num_tokens) == (3, True, 3, 3)
            assert train.offsets.tolist() == [0, 2, 2, 3]
            assert train.labels.tolist() == [0, 1, 1]
            assert train.ids == ["p-1", "p-2", "pé-3"]
            assert train.tokens().dtype == np.float16
            assert train.tokens().tolist() == [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25], [1.5, 1.75, 2.0]]
            assert train.sequence(1).shape == (0, 3)
            assert train.pooled_names == ["last", "mean"]
            assert train.pooled("mean").tolist() == [[0.375, 0.625, 0.875], [0, 0, 0], [1.5, 1.75, 2.0]]
            assert train.pooled("last").tolist() == [[0.75, 1.0, 1.25], [0, 0, 0], [1.5, 1.75, 2.0]]

    def test_incomplete_split(self):
        with CacheReader(TINY) as reader:
            with pytest.raises(SplitIncompleteError, match=r"\(1/2 sequences written\)"):
                reader.split("val")
            val = reader.split("val", require_complete=False)
            assert (val.ids, val.labels.tolist(), val.tokens().tolist()) == (["v-1"], [0], [[-0.0, -0.25, -0.5]])

    def test_data_fingerprint(self):
        with CacheReader(TINY) as reader:
            summary = reader.summary()
        assert summary["splits"]["train"]["data_fingerprint"] == data_fingerprint(
            ["p-1", "p-2", "pé-3"], np.array([0, 1, 1]), np.array([0, 2, 2, 3]))
        assert summary["splits"]["val"]["data_fingerprint"] is None
