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
from headcache.store import (
    MAX_INFERRED_CLASSES,
    SCHEMA,
    CacheReader,
    CacheWriter,
    data_fingerprint,
    sequence_bounds,
    verify,
)

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

    def visit(name, obj):  # attributes by name: HDF5 lists a rewritten attribute last, which says nothing of content
        out[name + "@attrs"] = dict(sorted(obj.attrs.items()))
        if isinstance(obj, h5py.Dataset):
            values = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
            out[name] = (values.tolist(), str(obj.dtype), obj.shape, obj.maxshape, obj.chunks, obj.fletcher32)

    with h5py.File(path, "r") as f:
        out["/@attrs"] = dict(sorted(f.attrs.items()))
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
            attrs = dict(f.attrs)
            layers = {key: attrs.pop(key).tolist() for key in ("layers", "token_layers")}
            # text is fixed-length UTF-8 bytes: nothing on HDF5's global heap (NOTE [ Nothing on the global heap ])
            assert all(not h5py.check_string_dtype(f.attrs.get_id(key).dtype) or
                       h5py.check_string_dtype(f.attrs.get_id(key).dtype).length is not None for key in f.attrs)
            assert {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()} == {
                "format": "headcache", "schema": 3, "backbone_fingerprint": "ab" * 32, "spec": "demo",
                "checkpoint_sha256": "cd" * 32, "hidden_dim": D, "dtype": "float32", "amp": "none", "num_classes": 2,
                "class_names": '["0", "1"]', "split_names": "[]", "created_by": "headcache 0.1.0",
            }
            assert layers == {"layers": [-1], "token_layers": [-1]}
            report = f["load_report"]
            assert report.fletcher32 and report[()].tobytes() == b'{"key_map": {}, "loaded": 7}'

    def test_layers_and_token_layers_are_recorded(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs(layers=[0, 3, 6], token_layers=[6, 0])) as writer:
            writer.split("train", 2, ["mean"])
        with CacheReader(path) as reader:
            assert (reader.layers, reader.token_layers) == ([0, 3, 6], [0, 6])  # in the order of layers
            split = reader.split("train", require_complete=False)
            assert split.token_width("all") == 2 * D and split.token_width(6) == D
            assert reader.summary()["layers"] == [0, 3, 6] and reader.summary()["token_layers"] == [0, 6]
        with h5py.File(path, "r") as f:
            assert f["train/tokens"].shape == (0, 2 * D) and f["train/pooled/mean"].shape == (2, 3, D)

    @pytest.mark.parametrize("layers, token_layers, match", [
        ([0, 0], None, "distinct integers"), ([], None, "non-empty"), ([0, 1], [2], r"token layers \[2\] are not"),
        (["a"], None, "distinct integers")])
    def test_bad_layers_are_refused(self, tmp_path, layers, token_layers, match):
        with pytest.raises(ConfigError, match=match):
            CacheWriter(tmp_path / "c.h5", make_attrs(layers=layers, token_layers=token_layers))

    def test_split_layout(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs(dtype="float16")) as writer:
            writer.split("train", 5, ["mean", "last"])
        with h5py.File(path, "r") as f:
            g = f["train"]
            assert dict(g.attrs) == {"n": 5, "complete": False, "labeled": True, "data_fingerprint": b"",
                                     "rows_pending": 0, "rows_written": 0}
            tokens = g["tokens"]
            assert (tokens.dtype, tokens.shape, tokens.maxshape) == (np.float16, (0, D), (None, D))
            assert tokens.chunks == ((1 << 20) // (D * 2), D) and tokens.fletcher32
            assert (g["offsets"].dtype, g["offsets"].shape, g["offsets"].fletcher32) == (np.int64, (6,), True)
            assert (g["labels"].dtype, g["labels"].shape, g["labels"].fletcher32) == (np.int64, (5,), True)
            assert (g["id_bytes"].dtype, g["id_bytes"].shape, g["id_bytes"].fletcher32) == (np.uint8, (0,), True)
            assert (g["id_offsets"].dtype, g["id_offsets"].shape, g["id_offsets"].fletcher32) == (np.int64, (6,), True)
            assert sorted(g["pooled"]) == ["last", "mean"]
            assert (g["pooled/mean"].dtype, g["pooled/mean"].shape) == (np.float32, (5, 1, D))
            assert g["pooled/mean"].fletcher32 and g["pooled/mean"].chunks == (5, 1, D)

    def test_finish_marks_complete_with_the_data_fingerprint(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            split = write_split(writer, "train", ragged([2, 0, 1]), [3])
            assert split.complete and split.rows_written == 3
        offsets, labels = np.array([0, 2, 2, 3]), np.array([0, 1, 2])
        by_hand = hashlib.sha256(offsets.astype("<i8").tobytes() + labels.astype("<i8").tobytes()
                                 + b"".join(len(s).to_bytes(8, "little") + s.encode() for s in ["id-0", "id-1", "id-2"]))
        with h5py.File(path, "r") as f:
            assert f["train"].attrs["data_fingerprint"].decode() == by_hand.hexdigest()
            assert f["train"].attrs["data_fingerprint"].decode() == data_fingerprint(["id-0", "id-1", "id-2"], labels,
                                                                                     offsets)

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
        with pytest.raises(DataError, match=r"sequence 'id-1': tokens must be \(T, 1, 4\) or \(T, 4\) \(1 token "
                                            r"layers\), got \(2, 5\)"):
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

    def test_ids_keep_every_character(self, split):
        # flat UTF-8 bytes keep what HDF5 strings would cut (they end at NUL)
        ids = ["a\0b", "é 中"]
        split.write(**{**rows_of(ragged([1, 1])), "ids": ids})
        assert split.committed([0, 1])[0] == ids

    def test_pooled_names_must_match_the_split(self, split):
        rows = rows_of(ragged([1]))
        del rows["pooled"]["last"]
        with pytest.raises(DataError, match=r"pooled must hold \['last', 'mean'\], got \['mean'\]"):
            split.write(**rows)

    def test_pooled_shape(self, split):
        rows = rows_of(ragged([1]))
        rows["pooled"]["mean"] = np.zeros((1, D - 1))
        with pytest.raises(DataError, match=r"pooled 'mean' must be \(1, 1, 4\), got \(1, 3\)"):
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
        assert got == (3, D, "float32", "ab" * 32, "demo", "cd" * 32, "headcache 0.1.0",
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
            f.attrs["schema"] = 4
        with pytest.raises(SchemaError) as info:
            CacheReader(path)
        message = str(info.value)
        assert "has cache schema 4" in message and f"reads schemas 1, 2, {SCHEMA}" in message
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
            "path": str(path), "format": "headcache", "schema": 3, "hidden_dim": D, "dtype": "float32",
            "amp": "none", "num_classes": 3, "class_names": ["0", "1", "2"], "layers": [-1], "token_layers": [-1], "shard": None,
            "backbone_fingerprint": "ab" * 32, "spec": "demo", "checkpoint_sha256": "cd" * 32,
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


def flip_chunk_byte(path: Path, dataset: str, chunk: int = 0) -> None:
    """Flip one byte in the middle of a dataset's stored chunk, as a bad disk would."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
        where = info.byte_offset + info.size // 2
    with open(path, "r+b") as handle:
        handle.seek(where)
        byte = handle.read(1)
        handle.seek(where)
        handle.write(bytes([byte[0] ^ 0xFF]))


HOLD = "import sys, time, h5py\nf = h5py.File(sys.argv[1], sys.argv[2])\nprint('open', flush=True)\ntime.sleep(60)\n"


class _Holder:
    """Another process holding a file open, for reading ('r') or writing ('r+')."""

    def __init__(self, path: Path, mode: str):
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "open"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


class TestAtomicReplacement:
    @pytest.fixture
    def complete(self, tmp_path) -> Path:
        path = tmp_path / "c.h5"
        one_go(path, ragged([1, 2]), ragged([1]))
        return path

    def test_a_failed_overwrite_leaves_the_old_file_byte_identical_and_no_temporary(self, complete):
        before = stat(complete)
        with pytest.raises(DataError):
            with CacheWriter(complete, make_attrs(spec="other"), overwrite=True) as writer:
                split = writer.split("train", 2, ["mean", "last"])
                split.write(**{**rows_of(ragged([1, 1])), "ids": ["same", "same"]})
        assert stat(complete) == before
        assert sorted(p.name for p in complete.parent.iterdir()) == ["c.h5"]

    def test_a_process_reading_the_old_file_keeps_reading_it(self, complete):
        with CacheReader(complete) as old:
            train = old.split("train")
            with CacheWriter(complete, make_attrs(spec="other"), overwrite=True) as writer:
                write_split(writer, "train", ragged([5], seed=1), [1])
            assert train.ids == ["id-0", "id-1"] and np.array_equal(train.tokens(), np.concatenate(ragged([1, 2])))
        with CacheReader(complete) as new:
            assert (new.spec, new.split("train").n, new.splits) == ("other", 1, ["train"])

    def test_overwrite_while_another_process_reads_replaces_the_file(self, complete):
        with _Holder(complete, "r"):
            with CacheWriter(complete, make_attrs(spec="other"), overwrite=True):
                pass
        with CacheReader(complete) as reader:
            assert reader.spec == "other"

    def test_overwrite_while_another_process_writes_is_refused_and_the_file_kept(self, complete):
        with _Holder(complete, "r+"):
            before = stat(complete)
            with pytest.raises(CacheError) as info:
                CacheWriter(complete, make_attrs(), overwrite=True)
            assert stat(complete) == before
        assert str(info.value).startswith(f"another process has {complete} open (writing it); wait for it to finish")
        assert sorted(p.name for p in complete.parent.iterdir()) == ["c.h5"]

    def test_resuming_while_another_process_reads_says_so(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 2]), [1], finish=False)
        with _Holder(path, "r"):
            with pytest.raises(CacheError, match=r"another process has .*c\.h5 open \(reading or writing it\)"):
                CacheWriter(path, make_attrs())

    def test_the_replacement_keeps_the_file_permissions(self, complete):
        complete.chmod(0o640)
        CacheWriter(complete, make_attrs(), overwrite=True).close()
        assert complete.stat().st_mode & 0o777 == 0o640


class TestChecksums:
    @pytest.fixture
    def cache(self, tmp_path) -> Path:
        path = tmp_path / "c.h5"
        one_go(path, ragged([2, 3, 1]), ragged([2, 2]))
        return path

    @pytest.mark.parametrize("dataset, read", [
        ("train/pooled/mean", lambda split: split.pooled("mean")),
        ("train/labels", lambda split: split.labels),
        ("train/offsets", lambda split: split.offsets),
        ("train/tokens", lambda split: split.tokens()),
        ("train/id_bytes", lambda split: split.ids),
        ("train/id_offsets", lambda split: split.ids),
    ])
    def test_a_flipped_byte_is_an_error_naming_file_split_dataset_and_fix(self, cache, dataset, read):
        flip_chunk_byte(cache, dataset)
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError) as info:
                read(reader.split("train"))
        message = str(info.value)
        name = dataset.split("/", 1)[1]
        assert message.startswith(f"{cache}: split 'train', dataset '{name}': reading it failed")
        assert "the file is damaged: re-extract that split" in message

    def test_every_dataset_is_checksummed(self, cache):
        found = {}
        with h5py.File(cache, "r") as f:
            f.visititems(lambda name, obj: found.update({name: obj.fletcher32}) if isinstance(obj, h5py.Dataset)
                         else None)
        assert set(found) >= {"load_report", "train/tokens", "train/offsets", "train/labels", "train/id_bytes",
                              "train/id_offsets", "train/pooled/mean", "train/pooled/last"}
        assert all(found.values()), found

    def test_a_changed_id_is_caught_by_the_data_fingerprint(self, cache):
        with h5py.File(cache, "r+") as f:
            f["train/id_bytes"][7] = ord("9")  # id-1 -> id-9, rewritten with a valid checksum
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match="dataset 'ids': its ids, labels or offsets differ from the data "
                                                 "fingerprint"):
                reader.split("train").ids

    def test_verify_names_the_damaged_split_only(self, cache):
        flip_chunk_byte(cache, "val/pooled/last")
        problems = verify(cache)
        assert problems["train"] == [] and len(problems["val"]) == 1
        assert "split 'val', dataset 'pooled/last'" in problems["val"][0]

    def test_verify_reads_tokens_chunk_by_chunk(self, tmp_path, monkeypatch):
        import headcache.store as store

        monkeypatch.setattr(store, "CHUNK_BYTES", 2 * D * 4)  # 2 token rows a chunk
        path = tmp_path / "c.h5"
        one_go(path, ragged([3, 3]), ragged([1]))
        flip_chunk_byte(path, "train/tokens", chunk=2)
        assert "dataset 'tokens'" in verify(path)["train"][0]

    def test_inspect_verify_exits_1_and_names_the_split(self, cache):
        from typer.testing import CliRunner

        from headcache.cli import app

        runner = CliRunner(env={"COLUMNS": "200"})
        intact = runner.invoke(app, ["inspect", str(cache), "--verify"])
        assert intact.exit_code == 0 and intact.output.split() == ["train:", "ok", "val:", "ok"]
        flip_chunk_byte(cache, "train/labels")
        damaged = runner.invoke(app, ["inspect", str(cache), "--verify"])
        assert damaged.exit_code == 1
        assert "train: DAMAGED" in damaged.output and "val: ok" in damaged.output
        assert "damaged split(s) train" in damaged.output and "Traceback" not in damaged.output


def edit(path: Path, name: str, key: str, value=None, delete: bool = False) -> None:
    with h5py.File(path, "r+") as f:
        attrs = f[name].attrs if name != "/" else f.attrs
        if delete:
            del attrs[key]
        else:
            attrs[key] = value


class TestValidationOnOpen:
    @pytest.fixture
    def cache(self, tmp_path) -> Path:
        path = tmp_path / "c.h5"
        one_go(path, ragged([2, 3, 1]), ragged([2, 2]))
        return path

    @pytest.mark.parametrize("key, value, shown", [
        ("schema", "2", "has cache schema '2'"),
        ("hidden_dim", -4, "root attribute 'hidden_dim' is -4, not a positive integer"),
        ("hidden_dim", 5, "split 'train': its tokens are (6, 4), not (rows, 5) for hidden_dim 5"),
        ("dtype", "float64", "root attribute 'dtype' is 'float64', not one of float16, float32"),
        ("amp", "fp8", "root attribute 'amp' is 'fp8', not one of none, bf16, fp16"),
        ("num_classes", 1, "root attribute 'num_classes' is 1, not an integer >= 2"),
        ("class_names", '["a"]', "root attribute 'class_names' is '[\"a\"]', not a JSON list of 3 strings"),
    ])
    def test_damaged_root_attributes_are_named(self, cache, key, value, shown):
        edit(cache, "/", key, value)
        with pytest.raises(CacheError) as info:
            with CacheReader(cache) as reader:
                reader.split("train")
        assert shown in str(info.value) and str(cache) in str(info.value)

    def test_a_missing_root_attribute_is_named(self, cache):
        edit(cache, "/", "num_classes", delete=True)
        with pytest.raises(SchemaError, match=r"cache lacks root attributes \['num_classes'\]; re-extract it"):
            CacheReader(cache)

    @pytest.mark.parametrize("key", ["n", "complete", "rows_written"])
    def test_a_missing_split_attribute_is_named(self, cache, key):
        edit(cache, "train", key, delete=True)
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match=f"split 'train': the split lacks its '{key}' attribute; the file "
                                                 "is damaged: re-extract that split"):
                reader.split("train")

    def test_rows_written_past_n_is_refused(self, cache):
        edit(cache, "train", "rows_written", 9)
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match=r"'rows_written' attribute is 9, not an integer in \[0, 3\]"):
                reader.split("train")

    def _rewrite(self, path: Path, dataset: str, values) -> None:
        with h5py.File(path, "r+") as f:
            f[dataset][...] = values

    def test_offsets_that_decrease_are_refused(self, cache):
        self._rewrite(cache, "train/offsets", [0, 2, 1, 6])
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match=r"dataset 'offsets': offsets decrease at sequence 1 \(2 then 1\)"):
                reader.split("train").offsets

    def test_offsets_past_the_token_rows_are_refused(self, cache):
        self._rewrite(cache, "train/offsets", [0, 2, 5, 2 ** 40])
        with CacheReader(cache) as reader:
            split = reader.split("train")
            with pytest.raises(CacheError, match="offsets end at token row 1099511627776, outside the 6 token rows"):
                split.num_tokens
            with pytest.raises(CacheError, match="offsets end at token row 1099511627776, past the 6 token rows"):
                split.offsets

    def test_offsets_not_starting_at_zero_are_refused(self, cache):
        self._rewrite(cache, "train/offsets", [1, 2, 5, 6])
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match="offsets start at 1, not 0"):
                reader.split("train").offsets

    @pytest.mark.parametrize("labels, shown", [([0, -3, 1], "sequence 1 has label -3"),
                                               ([0, 1, 3], "sequence 2 has label 3")])
    def test_labels_outside_the_classes_are_refused(self, cache, labels, shown):
        self._rewrite(cache, "train/labels", labels)
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match=shown + r", outside \[-1, 3\)"):
                reader.split("train").labels

    def test_duplicate_ids_in_a_file_are_refused(self, cache):
        with h5py.File(cache, "r+") as f:
            f["train/id_bytes"][11] = ord("0")  # id-2 -> id-0
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match="dataset 'ids': id 'id-0' appears more than once"):
                reader.split("train").ids

    def test_a_datatype_other_than_the_format_is_refused(self, cache):
        with h5py.File(cache, "r+") as f:
            values = f["train/labels"][()]
            del f["train/labels"]
            f["train/labels"] = values.astype(">i8")
        with CacheReader(cache) as reader:
            with pytest.raises(CacheError, match="its labels are stored as >i8, not <i8"):
                reader.split("train")


class TestLazyReader:
    def test_opening_a_split_reads_no_per_sequence_data(self, tmp_path, monkeypatch):
        path = tmp_path / "c.h5"
        one_go(path, ragged([2, 3, 1]), ragged([2]))
        reads = []
        real = h5py.Dataset.__getitem__
        monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key: reads.append(self.name) or real(self, key))
        with CacheReader(path) as reader:
            assert reads == ["/load_report"]  # the root's, once
            split = reader.split("train")
            assert (split.n, split.pooled_names) == (3, ["last", "mean"]) and reads == ["/load_report"]
            assert split.labels.tolist() == [0, 1, 2] and reads == ["/load_report", "/train/labels"]
            split.labels
            assert reads == ["/load_report", "/train/labels"]  # kept, not read again

    def test_complete_and_rows_written_are_read_fresh(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            split = writer.split("train", 2, ["mean", "last"])
            reader = CacheReader(path)  # in-process: h5py shares the open file
            seen = reader.split("train", require_complete=False)
            split.write(**rows_of(ragged([1, 1])))
            split.finish()
            assert (seen.rows_written, seen.complete) == (2, True)
            reader.close()


class TestClassesAndAmp:
    def test_the_spec_classes_are_recorded(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs(num_classes=2, class_names=["alive", "dead"], amp="bf16")) as writer:
            write_split(writer, "train", ragged([1]), [1])
        with CacheReader(path) as reader:
            assert (reader.num_classes, reader.class_names, reader.amp) == (2, ["alive", "dead"], "bf16")

    def test_without_spec_classes_they_come_from_every_finished_split(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 1]), [2])  # labels 0, 1
            with CacheReader(path) as reader:
                assert (reader.num_classes, reader.class_names) == (2, ["0", "1"])  # at least 2
            write_split(writer, "test", ragged([1, 1, 1, 1]), [4])  # labels 0, 1, 2, 0
        with CacheReader(path) as reader:
            assert (reader.num_classes, reader.class_names, reader.amp) == (3, ["0", "1", "2"], "none")

    def test_a_label_beyond_the_spec_classes_is_refused_naming_the_sequence(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs(num_classes=2)) as writer:
            split = writer.split("train", 3, ["mean", "last"])
            with pytest.raises(DataError, match="split 'train', sequence 'id-2': label 2 is not a class: labels must "
                                                r"be 0\.\.1 \(the spec's num_classes\)"):
                split.write(**rows_of(ragged([1, 1, 1])))
            assert split.rows_written == 0

    def test_unlabelled_sequences_mark_the_split(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            split = writer.split("test", 2, ["mean", "last"])
            split.write(**{**rows_of(ragged([1, 1])), "labels": np.array([-1, -1])})
            split.finish()
        with CacheReader(path) as reader:
            test = reader.split("test")
            assert (test.labels.tolist(), test.labeled, reader.summary()["splits"]["test"]["labeled"]) == (
                [-1, -1], False, False)

    def test_schema1_file_reads_without_amp_and_with_classes_from_its_labels(self):
        with CacheReader(TINY) as reader:
            assert (reader.amp, reader.num_classes, reader.class_names) == (None, 2, ["0", "1"])
            assert reader.split("train").labeled


class TestDuplicateIds:
    def test_an_id_twice_in_one_block_is_refused_by_name(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs()) as writer:
            split = writer.split("train", 3, ["mean", "last"])
            with pytest.raises(DataError, match="split 'train': id 'b' is given to rows 1 and 2; ids must be unique"):
                split.write(**{**rows_of(ragged([1, 1, 1])), "ids": ["a", "b", "b"]})
            assert split.rows_written == 0

    def test_an_id_already_written_before_a_resume_is_refused(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            write_split(writer, "train", ragged([1, 1, 1]), [2], finish=False)
        with CacheWriter(path, make_attrs()) as writer:
            split = writer.split("train", 3, ["mean", "last"])
            with pytest.raises(DataError, match="id 'id-0' is given to rows 0 and 2"):
                split.write(**{**rows_of(ragged([1]), 2), "ids": ["id-0"]})


class TestAddingSplits:
    def test_a_new_split_can_be_added_to_a_finished_cache(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs(), splits=["train"]) as writer:
            write_split(writer, "train", ragged([1, 2]), [2])
        with CacheWriter(path, make_attrs(), splits=["train", "test"]) as writer:
            assert writer.resuming
            write_split(writer, "test", ragged([3]), [1])
        with CacheReader(path) as reader:
            assert reader.splits == ["train", "test"] and reader.split("test").n == 1

    def test_the_same_splits_of_a_finished_cache_are_refused(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs(), splits=["train"]) as writer:
            write_split(writer, "train", ragged([1, 2]), [2])
        with pytest.raises(OutputExistsError, match=r"is already complete \(splits train\)"):
            CacheWriter(path, make_attrs(), splits=["train"])

    def test_the_spec_text_is_not_part_of_the_identity(self, tmp_path):
        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs(spec='toy {"data": "/abs/data"}')) as writer:
            write_split(writer, "train", ragged([1, 2]), [1], finish=False)
        with CacheWriter(path, make_attrs(spec='toy {"data": "data"}')) as writer:
            assert writer.resuming


class TestEmptySplits:
    def test_inspect_shows_a_split_with_nothing_written(self, tmp_path):
        from typer.testing import CliRunner

        from headcache.cli import app

        path = tmp_path / "c.h5"
        with CacheWriter(path, make_attrs()) as writer:
            writer.split("train", 3, ["mean"])
            writer.split("empty", 0, ["mean"]).finish()
        result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["inspect", str(path)])
        assert result.exit_code == 0, result.output
        rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
        assert rows["train"].split("│")[-2].strip() == "-" and rows["empty"].split("│")[-2].strip() == "-"
        with CacheReader(path) as reader:
            empty = reader.split("empty")
            assert (empty.labels.shape, empty.ids, empty.num_tokens, reader.num_classes) == ((0,), [], 0, 2)
            assert verify(path) == {"train": [], "empty": []}


def _read_everything(path: Path) -> dict:
    """Everything a trainer reads from a cache (complete splits), and what inspect and verify report."""
    out = {}
    with CacheReader(path) as reader:
        out["root"] = (reader.hidden_dim, reader.dtype, reader.num_classes, reader.splits, reader.layers,
                       reader.token_layers, reader.load_report)
        for name in reader.splits:
            split = reader.split(name)
            out[name] = (split.offsets.tolist(), split.labels.tolist(), split.ids, split.tokens(layer="all").tolist(),
                         {p: split.pooled(p, "all").tolist() for p in split.pooled_names})
        reader.summary()
    verify(path)
    return out


_FUZZ_ATTRS = [("/", "schema"), ("/", "hidden_dim"), ("/", "dtype"), ("/", "num_classes"), ("/", "class_names"),
               ("/", "amp"), ("/", "format"), ("/", "layers"), ("/", "token_layers"), ("train", "n"), ("train", "rows_written"),
               ("train", "complete"), ("val", "n"), ("val", "data_fingerprint")]
_FUZZ_VALUES = st.one_of(st.integers(-3, 10), st.text(max_size=6), st.floats(allow_nan=True), st.booleans(),
                         st.just(np.array([1, 2])), st.none())


class TestReaderFuzz:
    """Random byte damage, truncation and attribute edits never give a traceback or a silent wrong result:
    every read either gives the intact file's values or raises a HeadcacheError.

    Derandomized, so a run is reproducible. Damage may land anywhere: the file holds no HDF5 global heap
    (NOTE [ Nothing on the global heap ] in store.py), whose damage could make HDF5 itself loop forever."""

    @pytest.fixture(scope="class")
    def intact(self, tmp_path_factory) -> tuple[bytes, dict]:
        import headcache.store as store

        path = tmp_path_factory.mktemp("fuzz") / "c.h5"
        chunk, store.CHUNK_BYTES = store.CHUNK_BYTES, 2 * D * 4  # small chunks: damage lands in many of them
        try:
            one_go(path, ragged([2, 0, 3, 1]), ragged([2, 1]))
        finally:
            store.CHUNK_BYTES = chunk
        return path.read_bytes(), _read_everything(path)

    def _check(self, path: Path, expected: dict) -> None:
        from headcache.errors import HeadcacheError

        try:
            got = _read_everything(path)
        except HeadcacheError:
            return
        assert repr(got) == repr(expected)  # no error: then exactly the intact values

    def test_the_file_has_no_global_heap(self, intact):
        assert b"GCOL" not in intact[0]  # the signature of an HDF5 global heap collection

    @settings(max_examples=50, deadline=None, derandomize=True)
    @given(data=st.data())
    def test_byte_damage(self, intact, data):
        raw, expected = intact
        damaged = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            damaged[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.h5"
            path.write_bytes(bytes(damaged))
            self._check(path, expected)

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(data=st.data())
    def test_truncation(self, intact, data):
        raw, expected = intact
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.h5"
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
            self._check(path, expected)

    @settings(max_examples=50, deadline=None, derandomize=True)
    @given(where=st.sampled_from(_FUZZ_ATTRS), value=_FUZZ_VALUES, delete=st.booleans())
    def test_attribute_edits(self, intact, where, value, delete):
        raw, expected = intact
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.h5"
            path.write_bytes(raw)
            with h5py.File(path, "r+") as f:
                attrs = f.attrs if where[0] == "/" else f[where[0]].attrs
                if delete:
                    del attrs[where[1]]
                elif value is not None:
                    attrs[where[1]] = value
            changed_metadata = not delete and value is not None and where[1] in ("num_classes", "class_names")
            if changed_metadata:  # a valid class count is the file's to state: only the data must stay intact
                expected = {**expected, "root": None}
                from headcache.errors import HeadcacheError

                try:
                    got = _read_everything(path)
                except HeadcacheError:
                    return
                assert repr({**got, "root": None}) == repr(expected)
            else:
                self._check(path, expected)


def layered(lengths, layers=3, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, layers, D)).astype(np.float32) for n in lengths]


def layered_rows(seqs: list[np.ndarray], start: int, token_positions: list[int]) -> dict:
    """write() arguments for (T, L, D) sequences: tokens of the token layers, every layer's mean pooled."""
    k = len(seqs)
    return {
        "tokens": [s[:, token_positions] for s in seqs],
        "labels": np.arange(start, start + k) % 2,
        "ids": [f"seq {i}" for i in range(start, start + k)],
        "pooled": {"mean": np.stack([s.mean(0) for s in seqs]).astype(np.float32)},
    }


class TestLayers:
    LAYERS, TOKEN_LAYERS = [0, 2, 4], [0, 4]  # token layers at positions 0 and 2

    def write(self, path: Path, seqs: list[np.ndarray], blocks: list[int]) -> None:
        with CacheWriter(path, make_attrs(layers=self.LAYERS, token_layers=self.TOKEN_LAYERS)) as writer:
            split = writer.split("train", len(seqs), ["mean"])
            start = split.rows_written
            for size in blocks:
                split.write(**layered_rows(seqs[start:start + size], start, [0, 2]))
                start += size
            if start == len(seqs):
                split.finish()

    def test_every_layer_reads_back(self, tmp_path):
        seqs, path = layered([2, 1, 3]), tmp_path / "c.h5"
        self.write(path, seqs, [3])
        flat = np.concatenate(seqs)
        with CacheReader(path) as reader:
            split = reader.split("train")
            assert np.array_equal(split.pooled("mean", "all"), layered_rows(seqs, 0, [0, 2])["pooled"]["mean"])
            for position, layer in enumerate(self.LAYERS):
                assert np.array_equal(split.pooled("mean", layer), split.pooled("mean", "all")[:, position])
            assert np.array_equal(split.pooled("mean"), split.pooled("mean", 4))  # "last"
            assert np.array_equal(split.tokens(layer=0), flat[:, 0]) and np.array_equal(split.tokens(), flat[:, 2])
            assert np.array_equal(split.tokens(layer="all").reshape(-1, 2, D), flat[:, [0, 2]])
            out = np.zeros((8, D), dtype=np.float32)
            assert np.array_equal(split.tokens(1, 4, layer=0, out=out), flat[1:4, 0])
            assert np.array_equal(split.sequence(2, layer=4), seqs[2][:, 2])
            assert split.ids == ["seq 0", "seq 1", "seq 2"]
            with pytest.raises(ConfigError, match=r"holds no layer 2: it caches per-token states of layers 0, 4"):
                split.tokens(layer=2)
            with pytest.raises(ConfigError, match=r"holds no layer 7: it caches layers 0, 2, 4"):
                split.pooled("mean", 7)

    def test_a_resumed_layered_split_equals_one_written_at_once(self, tmp_path):
        seqs = layered([2, 1, 3, 1])
        self.write(tmp_path / "once.h5", seqs, [4])
        self.write(tmp_path / "twice.h5", seqs, [1])
        self.write(tmp_path / "twice.h5", seqs, [3])  # resumes at row 1
        assert_same_contents(tmp_path / "once.h5", tmp_path / "twice.h5")

    def test_a_single_layer_cache_reads_as_one_layer(self, tmp_path):
        path = tmp_path / "c.h5"
        one_go(path, ragged([2, 1]), ragged([1]))
        with CacheReader(path) as reader:
            split = reader.split("train")
            assert (reader.layers, reader.token_layers) == ([-1], [-1])
            assert split.pooled("mean", "all").shape == (2, 1, D)
            assert np.array_equal(split.pooled("mean", -1), split.pooled("mean"))

    def test_schema_1_reads_as_one_layer(self):
        with CacheReader(Path(__file__).parent / "data" / "schema1_tiny.h5") as reader:
            split = reader.split(reader.splits[0])
            assert (reader.schema, reader.layers, reader.token_layers) == (1, [-1], [-1])
            name = split.pooled_names[0]
            assert np.array_equal(split.pooled(name, "all")[:, 0], split.pooled(name))
            assert np.array_equal(split.tokens(layer="all"), split.tokens())

    def test_tokens_of_the_wrong_layer_count_are_refused(self, tmp_path):
        with CacheWriter(tmp_path / "c.h5", make_attrs(layers=self.LAYERS, token_layers=self.TOKEN_LAYERS)) as writer:
            split = writer.split("train", 1, ["mean"])
            rows = layered_rows(layered([2]), 0, [0])  # one token layer where two are stored
            with pytest.raises(DataError, match=r"tokens must be \(T, 2, 4\) \(2 token layers\), got \(2, 1, 4\)"):
                split.write(**rows)


class TestOutputFolder:
    def test_a_missing_folder_is_made(self, tmp_path):
        path = tmp_path / "new" / "deeper" / "c.h5"
        CacheWriter(path, make_attrs()).close()
        with CacheReader(path) as reader:
            assert reader.splits == []

    def test_a_file_where_the_folder_must_be_is_named(self, tmp_path):
        (tmp_path / "afile").write_text("mine")
        with pytest.raises(OutputExistsError, match=r"afile is a file, not a folder; choose another --out"):
            CacheWriter(tmp_path / "afile" / "sub" / "c.h5", make_attrs())
        assert (tmp_path / "afile").read_text() == "mine"
