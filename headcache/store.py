"""The HDF5 cache, schema 3 (schemas 1 and 2 still read): a writer, a reader and its validation, nothing else.

Layout (DESIGN.md, "Cache format")::

    /                 attrs: format="headcache", schema=3, backbone_fingerprint, spec,
                      checkpoint_sha256, hidden_dim, dtype, amp ("none", "bf16", "fp16"),
                      num_classes, class_names (JSON list), split_names (JSON list),
                      layers (int64: the layer ids pooled), token_layers (int64: the ids
                      whose per-token states are stored), created_by
    /load_report      (bytes,) uint8: the load report, JSON in UTF-8
    /<split>/tokens   (sum T_i, Lt * D) float16|float32, resizable and chunked by rows;
                      columns [j * D, (j + 1) * D) are token layer token_layers[j]
    /<split>/offsets  (N+1,) int64: sequence i is tokens[offsets[i]:offsets[i+1]]
    /<split>/labels   (N,) int64; -1 = unlabelled
    /<split>/id_bytes (bytes,) uint8: the ids in UTF-8, one after another
    /<split>/id_offsets  (N+1,) int64: id i is id_bytes[id_offsets[i]:id_offsets[i+1]]
    /<split>/pooled/<name>  (N, L, D) float32: every cached layer, in ``layers`` order
    /<split>          attrs: n, complete, labeled, data_fingerprint, rows_written, rows_pending

NOTE [ Nothing on the global heap ]
Every dataset carries a fletcher32 checksum, and no value lives in HDF5's
global heap: ids are flat UTF-8 bytes with offsets (as tokens are), text
attributes are fixed-length byte strings, and the load report (of unbounded
size) is a checksummed dataset. Variable-length strings, which schema 2 used
for ids and attributes, cannot be checksummed ("not suitable for filters"),
and one damaged byte of the heap that holds them can make HDF5 itself loop
forever, where no code above it can stop it. Schema 1 lacks ``amp``,
``num_classes``, ``class_names``, ``labeled`` and ``rows_pending``, and its
offsets, labels and pooled matrices are contiguous, unchecksummed datasets;
schemas 1 and 2 hold one layer (id -1), with (N, D) pooled matrices and
(rows, D) tokens, and variable-length ids and attributes.

Ragged sequences are stored flat with offsets (no padding on disk); the offset
arithmetic lives in `sequence_bounds` only. Like h5py, the reader caches only
what cannot change after creation (schema, hidden_dim, dtype, fingerprint) and
reads ``complete`` and ``rows_written`` fresh every time; a `SplitReader`
costs nothing to open and reads offsets, labels and ids when first asked.

NOTE [ Crash-safe appends ]
``rows_written`` is the commit point. `SplitWriter.write` first records the
rows it is about to write as ``rows_pending`` and flushes, then writes the
token rows and the per-sequence rows, flushes, and only then sets
``rows_written`` and flushes again; so a process killed anywhere (SIGKILL, the
OOM killer) leaves ``rows_written`` describing data that is fully in the file.
What lies past it may be damaged: a torn write of a chunk that holds the commit
point leaves that chunk's fletcher32 checksum wrong, and ids past it may point
past the end of the id bytes written. HDF5 reads
both when they are overwritten, so a resumed split is cut back to the commit
point before its first write (`SplitWriter._drop_uncommitted`): the growing datasets (tokens,
id_bytes) are shrunk to the commit point's chunk, and the chunks of the fixed-size
ones (offsets, labels, id_offsets, pooled) between ``rows_written`` and ``rows_pending``
are written afresh. The fixed-size datasets are allocated when created: HDF5
allocates space at the first write by default, and a writer killed while
flushing that write can leave a dataset pointing past the end of the file as
recorded, which the file then refuses to open. Files use HDF5's default
(earliest) format: ``libver="latest"`` would write superblock v3, which marks
a file open for writing and refuses to reopen it after a crash. (Power loss is
another matter: nothing here calls fsync.)

NOTE [ Atomic replacement ]
A cache the user has is never truncated: `CacheWriter` with ``overwrite=True``
writes a temporary file in the same folder and renames it over the old one
(`os.replace`) only when it closes after a successful run. A refused or failed
overwrite leaves the old file byte-identical, and a process reading the old
file keeps reading it (it holds the old inode). Another process *writing* the
old file is detected through HDF5's file lock (writers hold it exclusively,
readers shared) and refused, before the work and again before the rename.

h5py serialises every HDF5 call under one global lock, so a cache file should
be touched by one thread only (the writer thread of extraction, the prefetch
thread of training).

This module imports h5py, numpy and torch tensors (for `round_through`), never models or specs.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch

try:
    import resource  # POSIX: the file size limit (ulimit -f) a write can hit before the disk is full
except ImportError:
    resource = None

from headcache._version import __version__
from headcache.errors import (
    CacheError,
    ConfigError,
    DataError,
    DiskFullError,
    FingerprintMismatchError,
    HeadcacheError,
    OutputExistsError,
    SchemaError,
    SplitIncompleteError,
    SplitMissingError,
)

SCHEMA = 3
READ_SCHEMAS = (1, 2, 3)
FORMAT = "headcache"
DTYPES = ("float16", "float32")
AMPS = ("none", "bf16", "fp16")
# Root attributes the caller must supply; format, schema and created_by are added here.
WRITER_ATTRS = ("backbone_fingerprint", "spec", "checkpoint_sha256", "hidden_dim", "dtype", "load_report")
# Root attributes the caller may supply: amp (None: "none"), and the spec's classes (None: from the labels).
OPTIONAL_ATTRS = ("amp", "num_classes", "class_names", "layers", "token_layers", "shard")
# What must match for an existing file to be resumed rather than refused. Not the spec text: it holds
# the spec options (a data path spelled relative or absolute); the data is compared by content instead.
IDENTITY_ATTRS = ("backbone_fingerprint", "hidden_dim", "dtype", "amp", "layers", "token_layers", "shard")
# Chunks of about 1 MiB: large enough for fast sequential reads, small enough that reading one
# sequence does not checksum much more than it needs.
CHUNK_BYTES = 1 << 20
# Bytes per chunk of id_bytes (growing, like tokens, so a resume can drop chunks past the commit point).
ID_CHUNK = 1 << 16
# The one layer of a spec that names none, and of every schema-1 and schema-2 cache.
SINGLE_LAYER = -1
# Root datasets; a split (a root group) may not take their names.
ROOT_DATASETS = ("load_report",)
MIN_CLASSES = 2
# Without the spec's classes, a label above this is taken for a mistake (an id given as the label, say)
# rather than a task of that many classes: a spec with more classes says so (num_classes).
MAX_INFERRED_CLASSES = 1000
_FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_TEXT_BYTES = 60000  # an attribute lives in its object header, whose messages hold at most 64 KiB
_SKIP_FLETCHER32 = 1  # a chunk filter mask: the first (only) filter, fletcher32, not applied
# What h5py raises on a damaged file: a failed checksum or a broken structure (OSError), or
# attributes and objects that decode to nonsense.
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError, IndexError)


def round_through(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """Float32 states rounded through the cache's storage dtype and back: what a reader of a cache of
    that dtype sees. Extraction pools these rounded states, and the live source and the exported model
    round the same way (NOTE [ Float16 rounding in the live source ] in features.py)."""
    return hidden.float().to(getattr(torch, dtype)).float()


def check_float16_range(hidden: torch.Tensor, mask: torch.Tensor, ids: Sequence[str], split: str) -> None:
    """Refuse float32 states that become inf in float16, before they are rounded.

    Extraction pools and stores states already rounded through float16
    (`round_through`), where an overflow is an inf among infs; so it is checked
    here, on the states the backbone gave.

    Parameters
    ----------
    hidden : Tensor (B, T, D) or (B, L, T, D) float32
    mask : Tensor (B, T) bool
    ids : sequence of B str
    split : str

    Raises
    ------
    DataError
        A real position of a sequence overflows; names the sequence and the fix.
    """
    finite = torch.isfinite(hidden)
    real = mask.unsqueeze(-1) if hidden.dim() == 3 else mask[:, None, :, None]
    overflow = (torch.isinf(hidden.to(torch.float16)) & finite & real).flatten(1).any(1)
    if bool(overflow.any()):
        b = int(overflow.nonzero()[0])
        largest = float(torch.where(finite[b], hidden[b].abs(), 0.0).max())
        raise DataError(_float16_message(split, ids[b], largest))


def _float16_message(split: str, seq_id: str, largest: float) -> str:
    return (f"split {split!r}, sequence {seq_id!r}: hidden states up to {largest:.4g} exceed float16's range "
            f"({_FLOAT16_MAX:g}); extract with --dtype float32")


def sequence_bounds(offsets: np.ndarray, rows: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Token row ranges of sequences: sequence ``rows[j]`` is ``tokens[starts[j]:stops[j]]``.

    The one place for offset arithmetic (like ConcatDataset's cumulative sizes).

    Parameters
    ----------
    offsets : ndarray (N+1,) int64
        A split's offsets (``offsets[0] == 0``, non-decreasing).
    rows : array-like (K,) of int
        Sequence indices in ``[0, N)``.

    Returns
    -------
    starts, stops : ndarray (K,) int64

    Raises
    ------
    CacheError
        An index outside ``[0, N)`` (a negative index would silently wrap).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(offsets) - 1
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise CacheError(f"sequence index out of range: the split has {n} sequences, got {rows.min()}..{rows.max()}")
    return offsets[rows], offsets[rows + 1]


def default_class_names(num_classes: int) -> list[str]:
    """Class names of a cache whose spec names none: the class indices."""
    return [str(c) for c in range(num_classes)]


class CacheWriter:
    """Create a cache file, resume an interrupted one, or replace one; context manager.

    Parameters
    ----------
    path : str or Path
        The cache file.
    attrs : dict
        ``backbone_fingerprint``, ``spec``, ``checkpoint_sha256``,
        ``hidden_dim`` (int), ``dtype`` (``"float16"`` or ``"float32"``) and
        ``load_report`` (a dict, stored as JSON); optionally ``amp`` (None,
        ``"bf16"`` or ``"fp16"``), the spec's ``num_classes`` and
        ``class_names``, its ``layers`` (distinct ints; None: one layer,
        `SINGLE_LAYER`) and the ``token_layers`` whose per-token states are
        stored (some of ``layers``, in their order; None: the last one).
        Without classes, they come from the labels: each finished split
        raises ``num_classes`` to its largest label + 1 (at least 2).
    overwrite : bool
        Replace an existing file (NOTE [ Atomic replacement ]): the new file is
        written beside it and renamed over it when the writer closes.
    splits : sequence of str, optional
        The splits this run will write. A file whose splits are all complete
        is refused as finished; with ``splits``, only when each of these is
        complete (so a new split can be added to a finished cache).

    Attributes
    ----------
    resuming : bool
        True when an existing cache of the same backbone, hidden_dim, dtype and
        amp was opened to be completed or extended.

    Raises
    ------
    OutputExistsError
        The file exists and is complete, belongs to another backbone /
        setting, or is not a headcache cache (and ``overwrite`` is False). The
        file is left untouched: it is only opened read-only to decide.
    CacheError
        Another process has the file open (writing it, or reading it while this
        one would resume it).
    ConfigError
        ``attrs`` lacks a key, has an unknown one, or an invalid value.

    Notes
    -----
    Create every split (`split`) before writing data to any of them: then an
    interrupted file always shows an incomplete split and is resumed. Leaving
    the ``with`` block by an exception abandons a replacement (the old file
    stays); an interrupted new or resumed file stays, to be resumed.
    """

    def __init__(self, path: str | Path, attrs: Mapping, *, overwrite: bool = False,
                 splits: Sequence[str] | None = None):
        self.path = Path(path)
        attrs = _check_writer_attrs(attrs)
        _make_folder(self.path)
        self._dtype = np.dtype(attrs["dtype"])
        self._hidden_dim = attrs["hidden_dim"]
        self._num_classes = attrs["num_classes"]  # the spec's, or None: from the labels
        self._layers, self._token_layers = attrs["layers"], attrs["token_layers"]
        self.resuming = self.path.exists() and not overwrite
        self._replacing = self.path.exists() and overwrite
        if self.resuming:
            _check_resumable(self.path, attrs, splits)
        if self._replacing:
            if not self.path.is_file():
                raise OutputExistsError(f"{self.path} exists and is not a file; choose another --out")
            _refuse_if_written_elsewhere(self.path)
            self._target = self.path.resolve()  # a symbolic link stays one: the file it names is replaced
            _remove_stale_temporaries(self._target)
            fd, temporary = tempfile.mkstemp(dir=self._target.parent, prefix=f".{self._target.name}.", suffix=".tmp")
            os.close(fd)
            shutil.copymode(self.path, temporary)  # the replacement keeps the file's permissions
            self._write_path = Path(temporary)
        else:
            self._write_path = self.path
        try:
            self._file = _open(self._write_path, "r+" if self.resuming else "w")
        except BaseException:
            self._discard_temporary()
            raise
        if not self.resuming:
            root = self._file.attrs
            _set_text(root, "format", FORMAT)
            root["schema"] = SCHEMA
            for key in ("backbone_fingerprint", "spec", "checkpoint_sha256", "dtype", "amp"):
                _set_text(root, key, attrs[key])
            root["hidden_dim"] = attrs["hidden_dim"]
            root["layers"] = np.asarray(self._layers, dtype=np.int64)
            root["token_layers"] = np.asarray(self._token_layers, dtype=np.int64)
            if attrs["shard"] is not None:  # a part of a sharded extraction (distributed.py), not a whole cache
                root["shard"] = np.asarray(attrs["shard"], dtype=np.int64)
            root["num_classes"] = self._num_classes or MIN_CLASSES
            _set_text(root, "class_names", json.dumps(attrs["class_names"] or default_class_names(MIN_CLASSES)))
            _set_text(root, "split_names", "[]")  # a split whose link is damaged must not just vanish from the listing
            _set_text(root, "created_by", f"headcache {__version__}")
            report = np.frombuffer(json.dumps(attrs["load_report"], sort_keys=True).encode("utf-8"), dtype=np.uint8)
            self._file.create_dataset("load_report", data=report, chunks=(min(len(report), CHUNK_BYTES),),
                                      fletcher32=True)
            self._file.flush()

    def split(self, name: str, n: int, pooled_names: Sequence[str]) -> "SplitWriter":
        """Create split ``name`` for ``n`` sequences, or reopen it when resuming.

        Parameters
        ----------
        name : str
            Split name (an HDF5 group name: no ``/``).
        n : int
            Number of sequences the split will hold.
        pooled_names : sequence of str
            Names of the pooled (N, D) float32 matrices written with each batch.

        Raises
        ------
        OutputExistsError
            The split exists with another ``n`` or other pooled names.
        """
        if not isinstance(name, str) or not name or "/" in name or name == "." or name in ROOT_DATASETS:
            raise ConfigError(f"split name must be a non-empty string without '/' and not one of "
                              f"{', '.join(ROOT_DATASETS)}, got {name!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"split {name!r}: n must be a non-negative integer, got {n!r}")
        pooled_names = list(pooled_names)
        if len(set(pooled_names)) != len(pooled_names) or any("/" in p or not p for p in pooled_names):
            raise ConfigError(f"split {name!r}: pooled names must be distinct names without '/', got {pooled_names}")
        if name in self._file and "rows_written" not in self._file[name].attrs:
            del self._file[name]  # a writer killed while creating it; rows_written is set last
            root = self._file.attrs
            _set_text(root, "split_names", json.dumps([s for s in json.loads(root["split_names"]) if s != name]))
        if name in self._file:
            group = self._file[name]
            have_n, have_pooled = int(group.attrs["n"]), sorted(group["pooled"])
            if have_n != n or have_pooled != sorted(pooled_names):
                raise OutputExistsError(
                    f"{self.path}: split {name!r} exists with n={have_n} and pooled {have_pooled}, "
                    f"but this extraction has n={n} and pooled {sorted(pooled_names)}; "
                    "pass --overwrite to extract again"
                )
            return self._split_writer(group)  # what lies past the commit point is dropped at the first write
        return self._split_writer(self._create_split(name, int(n), pooled_names))

    def _split_writer(self, group: h5py.Group) -> "SplitWriter":
        return SplitWriter(group, self._dtype, self._hidden_dim, len(self._layers), len(self._token_layers),
                           self._num_classes, self._record_labels)

    def _record_labels(self, labels: np.ndarray) -> None:
        """A split finished: without the spec's classes, they grow to cover its labels."""
        if self._num_classes is not None or not len(labels):
            return
        root = self._file.attrs
        grown = max(int(root["num_classes"]), int(labels.max()) + 1)
        if grown != int(root["num_classes"]):
            root["num_classes"] = grown
            _set_text(root, "class_names", json.dumps(default_class_names(grown)))

    def _create_split(self, name: str, n: int, pooled_names: list[str]) -> h5py.Group:
        d, width = self._hidden_dim, self._hidden_dim * len(self._token_layers)
        group = self._file.create_group(name)
        token_rows = max(1, CHUNK_BYTES // (width * self._dtype.itemsize))
        group.create_dataset("tokens", shape=(0, width), maxshape=(None, width), dtype=self._dtype,
                             chunks=(token_rows, width), fletcher32=True)
        _create_fixed(group, "offsets", (n + 1,), np.int64)
        _create_fixed(group, "labels", (n,), np.int64)
        _create_fixed(group, "id_offsets", (n + 1,), np.int64)
        group.create_dataset("id_bytes", shape=(0,), maxshape=(None,), chunks=(ID_CHUNK,), dtype=np.uint8,
                             fletcher32=True)
        pooled = group.create_group("pooled")
        for pooled_name in pooled_names:
            _create_fixed(pooled, pooled_name, (n, len(self._layers), d), np.float32)
        group.attrs["n"] = n
        group.attrs["complete"] = False
        group.attrs["labeled"] = True
        _set_text(group.attrs, "data_fingerprint", "")
        group.attrs["rows_pending"] = 0
        group.attrs["rows_written"] = 0  # last: a group without it was never finished being created
        root = self._file.attrs
        _set_text(root, "split_names", json.dumps(json.loads(root["split_names"]) + [name]))
        self._file.flush()
        return group

    def close(self) -> None:
        """Close the file (idempotent); a replacement is renamed into place now (NOTE [ Atomic replacement ]).

        Raises
        ------
        CacheError
            Another process began writing the old file meanwhile: the new one is
            kept under its temporary name, which the message gives.
        """
        self._file.close()
        if self._replacing:
            self._replacing = False
            try:
                _refuse_if_written_elsewhere(self.path)
            except CacheError as exc:
                raise CacheError(f"{exc}; the new cache is kept as {self._write_path}") from None
            os.replace(self._write_path, self._target)

    def abort(self) -> None:
        """Close after a failure: a replacement's temporary file is deleted, the old file stays as it was."""
        self._file.close()
        self._discard_temporary()

    def _discard_temporary(self) -> None:
        if self._replacing:
            self._replacing = False
            self._write_path.unlink(missing_ok=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SplitWriter:
    """Appends batches of sequences to one split; made by `CacheWriter.split`.

    Attributes
    ----------
    name : str
    n : int
        Sequences the split holds when complete.
    """

    def __init__(self, group: h5py.Group, dtype: np.dtype, hidden_dim: int, num_layers: int, num_token_layers: int,
                 num_classes: int | None, on_finish: Callable[[np.ndarray], None]):
        self._group = group
        self._dtype = dtype
        self._hidden_dim = hidden_dim
        self._num_layers, self._num_token_layers = num_layers, num_token_layers
        self._num_classes = num_classes
        self._on_finish = on_finish
        self._seen: dict[str, int] | None = None  # id -> row, of every written row; read when first needed
        # A resumed split is cut back to its commit point before its first write, not when opened:
        # a resume refused after looking (`committed`) leaves the file as it was.
        self._cut = False
        self.name = group.name.lstrip("/")
        self.n = int(group.attrs["n"])

    @property
    def rows_written(self) -> int:
        """Sequences written so far (read from the file: the resume point)."""
        return int(self._group.attrs["rows_written"])

    @property
    def complete(self) -> bool:
        """Whether `finish` has run (read from the file)."""
        return bool(self._group.attrs["complete"])

    def committed(self, rows: Sequence[int]) -> tuple[list[str], np.ndarray]:
        """The ids and labels of written rows ``rows`` (to compare with the data before resuming)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows_written):
            raise CacheError(f"split {self.name!r}: rows {rows.min()}..{rows.max()} are not all written")
        written = self.rows_written
        ids = self._written_ids() if rows.size else []
        # Read raw: the chunk holding the commit point may be torn (NOTE [ Crash-safe appends ]).
        labels = _raw_rows(self._group["labels"], 0, written)
        return [ids[r] for r in rows], labels[rows].astype(np.int64)

    def _written_ids(self) -> list[str]:
        """The committed rows' ids, read raw (the chunk holding the commit point may be torn)."""
        written = self.rows_written
        bounds = _raw_rows(self._group["id_offsets"], 0, written + 1)
        return _cut_ids(_raw_rows(self._group["id_bytes"], 0, int(bounds[-1])).tobytes(), bounds)

    def write(
        self,
        tokens: Sequence[np.ndarray],
        labels: np.ndarray,
        ids: Sequence[str],
        pooled: Mapping[str, np.ndarray],
    ) -> None:
        """Append K sequences at ``rows_written`` (see NOTE [ Crash-safe appends ]).

        Parameters
        ----------
        tokens : sequence of K ndarray (T_i, Lt, D), or (T_i, D) when one token layer
            Hidden states of the token layers; T_i may be 0. Cast to the cache dtype.
        labels : ndarray (K,) of int
            Class indices, or -1 for an unlabelled sequence.
        ids : sequence of K str
            Unique within the split.
        pooled : dict of str to ndarray (K, L, D), or (K, D) when one layer
            One entry per pooled name of the split; stored as float32.

        Raises
        ------
        DataError
            Shapes or types that do not fit the split, a label outside the
            spec's classes, an id already in the split, or values that overflow
            float16 when the cache is float16.
        CacheError
            The split is complete, or K more sequences would exceed ``n``.
        """
        k = len(tokens)
        if self.complete:
            raise CacheError(f"split {self.name!r} is already complete; nothing more can be written to it")
        start_row = self.rows_written
        if start_row + k > self.n:
            raise CacheError(
                f"split {self.name!r} holds {self.n} sequences; {start_row} are written, so {k} more do not fit"
            )
        labels = np.asarray(labels)
        if labels.shape != (k,) or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise DataError(f"split {self.name!r}: labels must be {k} integers, got {labels.dtype} {labels.shape}")
        if len(ids) != k or not all(isinstance(i, str) for i in ids):
            raise DataError(f"split {self.name!r}: ids must be {k} strings, got {len(ids)}")
        self._check_labels(labels.astype(np.int64), ids)
        seen, block = self._seen_ids(), {}
        for row, seq_id in enumerate(ids, start=start_row):
            first = seen.get(seq_id, block.get(seq_id))
            if first is not None:
                raise DataError(f"split {self.name!r}: id {seq_id!r} is given to rows {first} and {row}; ids must "
                                "be unique within a split (predictions are joined back by id): fix the data's ids")
            block[seq_id] = row
        self._write_checked(tokens, labels, ids, pooled, start_row)
        seen.update(block)

    def _write_checked(self, tokens: Sequence[np.ndarray], labels: np.ndarray, ids: Sequence[str],
                       pooled: Mapping[str, np.ndarray], start_row: int) -> None:
        k, d, lt, layers = len(tokens), self._hidden_dim, self._num_token_layers, self._num_layers
        tokens = [np.asarray(t) for t in tokens]
        for j, (t, seq_id) in enumerate(zip(tokens, ids)):
            if t.ndim == 3 and t.shape[1:] == (lt, d):
                tokens[j] = t.reshape(len(t), lt * d)
            elif not (t.ndim == 2 and lt == 1 and t.shape[1] == d):
                want_shape = f"(T, {lt}, {d})" + (f" or (T, {d})" if lt == 1 else "")
                raise DataError(f"split {self.name!r}, sequence {seq_id!r}: tokens must be {want_shape} "
                                f"({lt} token layers), got {t.shape}")
        want = self._group["pooled"]
        if set(pooled) != set(want):
            raise DataError(f"split {self.name!r}: pooled must hold {sorted(want)}, got {sorted(pooled)}")
        pooled = {name: np.asarray(p, dtype=np.float32) for name, p in pooled.items()}
        for name, p in pooled.items():
            if layers == 1 and p.shape == (k, d):
                pooled[name] = p.reshape(k, 1, d)
            elif p.shape != (k, layers, d):
                raise DataError(f"split {self.name!r}: pooled {name!r} must be ({k}, {layers}, {d}), got {p.shape}")
        if k == 0:
            return
        if not self._cut:
            self._drop_uncommitted()
            self._cut = True

        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        source = np.concatenate(tokens, axis=0)
        with np.errstate(over="ignore"):  # overflow is checked, with the sequence named, below
            block = source.astype(self._dtype)
        if self._dtype == np.float16:
            self._check_float16(source, block, lengths, ids)

        group = self._group
        group.attrs["rows_pending"] = start_row + k  # what a resume must rewrite if this block is cut short
        group.file.flush()
        start = int(group["offsets"][start_row])
        stop = start + int(lengths.sum())
        encoded = [seq_id.encode("utf-8") for seq_id in ids]
        id_start = int(group["id_offsets"][start_row])
        id_stop = id_start + sum(map(len, encoded))
        _ensure_space(Path(group.file.filename), self._block_bytes(start, stop, id_start, id_stop), self.name, k,
                      start_row)
        rows = slice(start_row, start_row + k)
        group["tokens"].resize(stop, axis=0)
        group["tokens"][start:stop] = block
        group["offsets"][start_row + 1 : start_row + k + 1] = start + np.cumsum(lengths)
        group["labels"][rows] = labels.astype(np.int64)
        if (labels < 0).any():
            group.attrs["labeled"] = False
        group["id_bytes"].resize(id_stop, axis=0)
        if id_stop > id_start:  # HDF5 refuses an empty selection
            group["id_bytes"][id_start:id_stop] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        group["id_offsets"][start_row + 1 : start_row + k + 1] = id_start + np.cumsum([len(e) for e in encoded])
        for name, p in pooled.items():
            group["pooled"][name][rows] = p
        # A write barrier: HDF5 may evict metadata (the attribute) before raw
        # data, so the data must be in the file before rows_written changes.
        group.file.flush()
        self._commit(start_row + k)

    def _block_bytes(self, start: int, stop: int, id_start: int, id_stop: int) -> int:
        """An upper bound of the bytes the file grows by when token rows start:stop and id bytes
        id_start:id_stop are written.

        Each token or id chunk touched is written whole at a new place (its
        checksum changes); pooled, offsets, labels and id offsets were
        allocated when the split was created. The chunk index and object
        headers grow with the chunks: 5% and 64 KiB more cover them (measured:
        a block of 50 token chunks grows the file by 99.9% of the chunks' bytes alone).
        """
        tokens = self._group["tokens"]

        def chunks(first: int, last: int, rows: int) -> int:
            return (last - 1) // rows - first // rows + 1 if last > first else 0

        token_bytes = chunks(start, stop, tokens.chunks[0]) * tokens.chunks[0] * tokens.dtype.itemsize * tokens.shape[1]
        id_bytes = chunks(id_start, id_stop, ID_CHUNK) * ID_CHUNK
        return int((token_bytes + id_bytes) * 1.05) + (64 << 10)

    def _check_labels(self, labels: np.ndarray, ids: Sequence[str]) -> None:
        top = self._num_classes or MAX_INFERRED_CLASSES
        bad = (labels < -1) | (labels >= top)
        if bad.any():
            j = int(np.argmax(bad))
            whose = "the spec's num_classes" if self._num_classes else "a spec without num_classes"
            raise DataError(f"split {self.name!r}, sequence {ids[j]!r}: label {int(labels[j])} is not a class: "
                            f"labels must be 0..{top - 1} ({whose}), or -1 for unlabelled; fix the label, or "
                            "give the spec's num_classes")

    def _seen_ids(self) -> dict[str, int]:
        if self._seen is None:
            self._seen = {seq_id: row for row, seq_id in enumerate(self._written_ids())}
        return self._seen

    def _commit(self, rows_written: int) -> None:
        """The commit point: only now do the new rows count (NOTE [ Crash-safe appends ])."""
        self._group.attrs["rows_written"] = rows_written
        self._group.file.flush()

    def _drop_uncommitted(self) -> None:
        """Cut every dataset back to the commit point before resuming (NOTE [ Crash-safe appends ]).

        Tokens and id bytes are shrunk to the chunk boundary at or below the commit
        point, which drops every later chunk without reading it, then grown
        back, and the committed rows of the boundary chunk are written again
        (a fresh chunk, a fresh checksum). Offsets, labels and pooled keep
        their size (as do id offsets): each of their chunks that the cut-short block may have
        touched is written whole, its committed rows and fill after them. The
        committed rows of a boundary chunk are read raw, without the checksum
        test: a torn rewrite left their bytes intact (they were rewritten with
        the same values), but maybe not the checksum, which covers the whole
        chunk.
        """
        group = self._group
        rows = self.rows_written
        pending = max(rows, int(group.attrs.get("rows_pending", rows)))
        ends = {name: int(_raw_rows(group[name], rows, rows + 1)[0]) for name in ("offsets", "id_offsets")}
        for name in ("offsets", "id_offsets"):
            _rewrite_chunks(group[name], rows + 1, pending + 1)
        _rewrite_chunks(group["labels"], rows, pending)
        for pooled in group["pooled"].values():
            _rewrite_chunks(pooled, rows, pending)
        for name, end in (("tokens", ends["offsets"]), ("id_bytes", ends["id_offsets"])):
            growing = group[name]
            floor = end - end % growing.chunks[0]
            kept = _raw_rows(growing, floor, end)
            growing.resize(floor, axis=0)
            growing.resize(end, axis=0)
            if end > floor:
                growing[floor:end] = kept
        group.attrs["rows_pending"] = rows
        group.file.flush()

    def _check_float16(self, source: np.ndarray, block: np.ndarray, lengths: np.ndarray, ids: Sequence[str]) -> None:
        """Refuse finite values that become inf in float16, rather than store them silently."""
        overflow = np.isinf(block) & np.isfinite(source)
        if overflow.any():
            row = int(np.argmax(overflow.any(axis=1)))
            seq = int(np.searchsorted(np.cumsum(lengths), row, side="right"))
            raise DataError(_float16_message(self.name, ids[seq], float(np.abs(source[row]).max())))

    def finish(self) -> None:
        """Mark the split complete; record its data fingerprint, whether it is labelled, and its classes.

        Raises
        ------
        CacheError
            Fewer than ``n`` sequences are written.
        """
        written = self.rows_written
        if written != self.n:
            raise CacheError(f"split {self.name!r}: {written} of {self.n} sequences are written; cannot finish it")
        group = self._group
        labels = group["labels"][()]
        _set_text(group.attrs, "data_fingerprint", data_fingerprint(self._written_ids(), labels, group["offsets"][()]))
        group.attrs["labeled"] = bool((labels >= 0).all())
        self._on_finish(labels)
        group.attrs["complete"] = True
        group.file.flush()


def _cut_ids(raw: bytes, bounds: np.ndarray) -> list[str]:
    """Ids from their flat UTF-8 bytes and (N+1,) offsets (NOTE [ Nothing on the global heap ])."""
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _create_fixed(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: type) -> h5py.Dataset:
    """A fixed-size, per-sequence dataset: chunked by rows, checksummed, allocated when created.

    Allocated at creation (see NOTE [ Crash-safe appends ]), its chunks hold the
    fill value and a valid checksum before any row is written. An empty one
    is contiguous: HDF5 refuses a chunk larger than the dataset, and there is
    nothing to checksum.
    """
    if shape[0] == 0:
        return group.create_dataset(name, shape=shape, dtype=dtype)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    # Chunks of even size, each at most CHUNK_BYTES: HDF5 allocates whole chunks, so a split a little
    # longer than one chunk would otherwise carry an almost empty second one (measured: 26% of a
    # layers=all demo cache, whose pooled rows are L times longer).
    rows = max(1, CHUNK_BYTES // row_bytes)
    rows = -(-shape[0] // -(-shape[0] // rows))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=(rows,) + shape[1:], fletcher32=True,
                                fillvalue=0, dcpl=dcpl)


def _raw_rows(dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a dataset chunked by whole rows, read without the checksum test."""
    out = np.empty((max(0, stop - start),) + dataset.shape[1:], dtype=dataset.dtype)
    if dataset.chunks is None:
        if stop > start:
            dataset.read_direct(out, np.s_[start:stop])
        return out
    c = dataset.chunks[0]
    per_chunk = c * int(np.prod(dataset.shape[1:], dtype=np.int64))
    for floor in range(start - start % c, stop, c):
        _, raw = dataset.id.read_direct_chunk((floor,) + (0,) * (dataset.ndim - 1))
        chunk = np.frombuffer(raw, dtype=dataset.dtype, count=per_chunk).reshape((c,) + dataset.shape[1:])
        lo, hi = max(start, floor), min(stop, floor + c)
        out[lo - start:hi - start] = chunk[lo - floor:hi - floor]
    return out


def _rewrite_chunks(dataset: h5py.Dataset, committed: int, pending: int) -> None:
    """Write afresh each chunk holding a row of ``[committed, pending)``: its rows below ``committed``
    (read raw) and fill after them. Written directly, unfiltered (a chunk filter mask): HDF5 would
    read a possibly torn chunk to update part of it; the next write of the chunk checksums it again."""
    if dataset.chunks is None or pending <= committed:
        return
    c = dataset.chunks[0]
    for floor in range(committed - committed % c, min(pending, dataset.shape[0]), c):
        chunk = np.zeros((c,) + dataset.shape[1:], dtype=dataset.dtype)
        kept = _raw_rows(dataset, floor, min(committed, floor + c)) if committed > floor else chunk[:0]
        chunk[: len(kept)] = kept
        dataset.id.write_direct_chunk((floor,) + (0,) * (dataset.ndim - 1), chunk.tobytes(), _SKIP_FLETCHER32)


def data_fingerprint(ids: Sequence[str], labels: np.ndarray, offsets: np.ndarray) -> str:
    """sha256 hex over a split's offsets, labels and ids: which sequences, in which order, with what labels.

    Offsets and labels are hashed as little-endian int64, each id as its
    UTF-8 byte length (8 bytes, little-endian) followed by its bytes.
    """
    digest = hashlib.sha256()
    digest.update(np.asarray(offsets, dtype="<i8").tobytes())
    digest.update(np.asarray(labels, dtype="<i8").tobytes())
    for seq_id in ids:
        raw = seq_id.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


class CacheReader:
    """Open a cache read-only and check it is one this version reads; context manager.

    Opening checks the root attributes (present, typed); `split` checks a
    split's attributes and shapes, and its offsets, labels and ids when they
    are first read. Any failure, and any read of damaged data (a checksum, a
    broken structure), is a CacheError naming the file, split and dataset.

    Parameters
    ----------
    path : str or Path
    expected_fingerprint : str, optional
        The fingerprint of the backbone the cache will be paired with.

    Attributes
    ----------
    path : Path
    schema, hidden_dim, num_classes : int
    dtype, backbone_fingerprint, spec, checkpoint_sha256, created_by : str
    amp : str or None
        ``"none"``, ``"bf16"`` or ``"fp16"``; None for a schema-1 file, which did not record it.
    class_names : list of str
    load_report : dict

    Raises
    ------
    CacheError
        The file does not exist, cannot be opened, or another process is writing it.
    SchemaError
        Not an HDF5 file, not a headcache cache, another schema, or root
        attributes missing or of the wrong type.
    FingerprintMismatchError
        ``expected_fingerprint`` differs from the cache's.
    """

    def __init__(self, path: str | Path, *, expected_fingerprint: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"cache {self.path} does not exist")
        if not self.path.is_file():
            raise CacheError(f"cache {self.path} is not a file")
        if not h5py.is_hdf5(self.path):
            raise SchemaError(f"{self.path} is not an HDF5 file, so not a headcache cache (make one with headcache extract)")
        self._file = _open(self.path, "r")
        try:
            self._read_root(expected_fingerprint)
        except BaseException:
            self._file.close()
            raise

    def _read_root(self, expected_fingerprint: str | None) -> None:
        try:
            root = dict(self._file.attrs)
        except _READ_ERRORS as exc:
            raise SchemaError(f"{self.path}: the root attributes cannot be read ({exc}); the file is damaged: "
                              "re-extract it (headcache extract ... --overwrite)") from None
        if _plain(root.get("format")) != FORMAT:
            raise SchemaError(
                f"{self.path} is an HDF5 file but not a headcache cache (no format='headcache' attribute)"
            )
        schema = root.get("schema")
        if not _is_int(schema) or int(schema) not in READ_SCHEMAS:
            raise SchemaError(
                f"{self.path} has cache schema {_plain(schema)!r}; headcache {__version__} reads schemas "
                f"{', '.join(map(str, READ_SCHEMAS))}. Re-extract the cache with this version (headcache extract "
                "... --overwrite), or use a headcache version that reads that schema"
            )
        self.schema = int(schema)
        needed = tuple(key for key in WRITER_ATTRS if key != "load_report" or self.schema < 3) + ("created_by",) + (
            ("amp", "num_classes", "class_names", "split_names") if self.schema >= 2 else ()) + (
            ("layers", "token_layers") if self.schema >= 3 else ())
        missing = [key for key in needed if key not in root]
        if missing:
            raise SchemaError(f"{self.path}: cache lacks root attributes {missing}; re-extract it "
                              "(headcache extract ... --overwrite)")

        def bad(key: str, expected: str) -> SchemaError:
            return SchemaError(f"{self.path}: root attribute {key!r} is {_plain(root[key])!r}, not {expected}; the "
                               "file is damaged: re-extract it (headcache extract ... --overwrite)")

        root = {key: _plain(value) if key not in ("layers", "token_layers", "shard") else value
                for key, value in root.items()}
        for key in ("backbone_fingerprint", "spec", "checkpoint_sha256", "created_by", "dtype"):
            if not isinstance(root[key], str):
                raise bad(key, "a string")
        if not _is_int(root["hidden_dim"]) or int(root["hidden_dim"]) < 1:
            raise bad("hidden_dim", "a positive integer")
        if _plain(root["dtype"]) not in DTYPES:
            raise bad("dtype", f"one of {', '.join(DTYPES)}")
        self.hidden_dim = int(root["hidden_dim"])
        self.dtype = str(root["dtype"])
        self.backbone_fingerprint = str(root["backbone_fingerprint"])
        self.spec = str(root["spec"])
        self.checkpoint_sha256 = str(root["checkpoint_sha256"])
        self.created_by = str(root["created_by"])
        self.load_report = self._read_load_report(root)
        self.layers, self.token_layers = [SINGLE_LAYER], [SINGLE_LAYER]
        self.shard: tuple[int, int] | None = None  # (index, count) of a part file of a sharded extraction
        if "shard" in root:
            shard = root["shard"]
            if not (isinstance(shard, np.ndarray) and shard.shape == (2,) and shard.dtype == np.dtype("<i8")
                    and 0 <= shard[0] < shard[1]):
                raise bad("shard", "(index, count) with 0 <= index < count")
            self.shard = (int(shard[0]), int(shard[1]))
        if self.schema >= 3:
            self.layers = self._read_layer_ids(root, "layers", bad)
            self.token_layers = self._read_layer_ids(root, "token_layers", bad)
            if [i for i in self.layers if i in self.token_layers] != self.token_layers:
                raise bad("token_layers", f"some of the layers {self.layers}, in their order")
        self.amp: str | None = None
        if self.schema >= 2:
            if _plain(root["amp"]) not in AMPS:
                raise bad("amp", f"one of {', '.join(AMPS)}")
            self.amp = str(root["amp"])
            if not _is_int(root["num_classes"]) or int(root["num_classes"]) < MIN_CLASSES:
                raise bad("num_classes", f"an integer >= {MIN_CLASSES}")
            self.num_classes = int(root["num_classes"])
            try:
                names = json.loads(root["class_names"])
            except (TypeError, ValueError):
                names = None
            if not (isinstance(names, list) and len(names) == self.num_classes
                    and all(isinstance(c, str) for c in names)):
                raise bad("class_names", f"a JSON list of {self.num_classes} strings")
            self.class_names = names
            try:
                self._split_names = json.loads(root["split_names"])
            except (TypeError, ValueError):
                self._split_names = None
            if not (isinstance(self._split_names, list) and all(isinstance(c, str) for c in self._split_names)):
                raise bad("split_names", "a JSON list of strings")
        if expected_fingerprint is not None and expected_fingerprint != self.backbone_fingerprint:
            raise FingerprintMismatchError(
                f"{self.path} was written by backbone {self.backbone_fingerprint[:12]}, but this backbone is "
                f"{expected_fingerprint[:12]}: the cached hidden states belong to other weights. Use the "
                f"checkpoint that wrote the cache (sha256 {self.checkpoint_sha256[:12]}), or re-extract the "
                "cache with this one (headcache extract ... --overwrite)"
            )

    def _read_load_report(self, root: dict) -> dict:
        """The load report: a root attribute up to schema 2, a checksummed dataset from schema 3."""
        where = "the load_report dataset" if self.schema >= 3 else "the load_report attribute"
        text = root.get("load_report")
        if self.schema >= 3:
            try:
                dataset = self._file["load_report"]
                if not isinstance(dataset, h5py.Dataset) or dataset.dtype != np.uint8 or dataset.ndim != 1:
                    raise TypeError("not a 1-D uint8 dataset")
                text = dataset[()].tobytes().decode("utf-8")
            except _READ_ERRORS as exc:
                raise SchemaError(f"{self.path}: {where} cannot be read ({exc}); the file is damaged: re-extract it "
                                  "(headcache extract ... --overwrite)") from None
        try:
            report = json.loads(text)
        except (TypeError, ValueError):
            report = None
        if not isinstance(report, dict):
            raise SchemaError(f"{self.path}: {where} is not a JSON object; the file is damaged: re-extract it "
                              "(headcache extract ... --overwrite)")
        return report

    @staticmethod
    def _read_layer_ids(root: dict, key: str, bad: Callable[[str, str], SchemaError]) -> list[int]:
        value = root[key]
        if not (isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == np.dtype("<i8") and len(value)
                and len(set(value.tolist())) == len(value)):
            raise bad(key, "a non-empty list of distinct int64 layer ids")
        return [int(i) for i in value]

    def layer_position(self, layer: int | str, *, tokens: bool = False) -> int | None:
        """Where layer ``layer`` lies among the cached layers (``tokens``: among the token layers).

        ``layer`` is a layer id, ``"last"`` (the last one) or ``"all"`` (None: every layer, in order).

        Raises
        ------
        ConfigError
            The layer is not cached (the message lists the cached ones).
        """
        ids = self.token_layers if tokens else self.layers
        if layer == "all":
            return None
        if layer == "last":
            return len(ids) - 1
        if _is_int(layer) and int(layer) in ids:
            return ids.index(int(layer))
        kind = "per-token states of layers" if tokens else "layers"
        raise ConfigError(f"{self.path} holds no layer {layer!r}: it caches {kind} "
                          f"{', '.join(map(str, ids))} (choose one of them, `last` or `all`)")

    @cached_property
    def num_classes(self) -> int:
        """Classes of the cache's task (schema 1 did not record them: the labels of its complete splits say)."""
        tops = [int(split.labels.max()) + 1 for split in self._complete_splits() if len(split.labels)]
        return max([MIN_CLASSES] + tops)

    @cached_property
    def class_names(self) -> list[str]:
        """Names of the classes (schema 1: the class indices)."""
        return default_class_names(self.num_classes)

    @cached_property
    def _chunk_layout(self) -> bool:
        """Check, once, that no two chunks of the file's datasets share bytes (raise if they do).

        A damaged chunk address can point at another chunk's bytes, or at a zero-filled one, whose
        fletcher32 is valid (that of zeros is zero): the read would silently give other values.
        """
        spans = []  # (start, stop, split, dataset)

        def collect(split: str, name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    spans.append((info.byte_offset, info.byte_offset + info.size, split, name))

        if self.schema >= 3:
            collect("(root)", "load_report", self._file["load_report"])
        for split in self.splits:
            try:
                self._file[split].visititems(lambda name, obj, split=split: collect(split, name, obj))
            except _READ_ERRORS as exc:
                raise CacheError(f"{self.path}: split {split!r}: its chunk index cannot be read ({exc}); the file "
                                 "is damaged: re-extract that split (or the whole cache with --overwrite)") from None
        spans.sort()
        size = self._file.id.get_filesize()  # the open file's: a replaced path may now name another one
        for (_, stop, *_), (start, end, split, name) in zip([(0, 0, "", "")] + spans, spans):
            if start < stop or end > size:
                raise CacheError(f"{self.path}: split {split!r}, dataset {name!r}: a chunk lies over another or "
                                 "past the end of the file; the file is damaged: re-extract that split (or the whole "
                                 "cache with --overwrite)")
        return True

    def _complete_splits(self) -> list["SplitReader"]:
        splits = [self.split(name, require_complete=False) for name in self.splits]
        return [split for split in splits if split.complete]

    @property
    def splits(self) -> list[str]:
        """Names of the splits in the file, in the order they were created (``split_names``; see `_open`)."""
        try:
            found = [name for name, obj in self._file.items() if isinstance(obj, h5py.Group)]
        except _READ_ERRORS as exc:
            raise CacheError(f"{self.path}: the list of splits cannot be read ({exc}); the file is damaged: "
                             "re-extract it (headcache extract ... --overwrite)") from None
        if self.schema < 2:
            return found  # schema 1 files track creation order
        if sorted(found) != sorted(self._split_names):
            raise CacheError(f"{self.path}: the file holds splits {found}, but records {self._split_names}; the file "
                             "is damaged: re-extract it (headcache extract ... --overwrite)")
        return list(self._split_names)

    def split(self, name: str, *, require_complete: bool = True) -> "SplitReader":
        """Open one split (its attributes and shapes are checked; nothing else is read).

        Parameters
        ----------
        name : str
        require_complete : bool
            Refuse a split whose extraction has not finished. With False, an
            incomplete split shows its first ``rows_written`` sequences.

        Raises
        ------
        SplitMissingError
            No such split (the message lists the available ones).
        SplitIncompleteError
            The split is incomplete and ``require_complete`` is True.
        CacheError
            The split's attributes or shapes are damaged.
        """
        if name not in self.splits:
            available = ", ".join(self.splits) or "none"
            raise SplitMissingError(f"{self.path} has no split {name!r}; available splits: {available}")
        split = SplitReader(self, name)
        if require_complete and not split.complete:
            raise SplitIncompleteError(
                f"split {name!r} of {self.path} is incomplete ({split.rows_written}/{split.n} sequences written): "
                "its extraction was interrupted. Rerun the same headcache extract command to resume it"
            )
        return split

    def summary(self) -> dict:
        """File attributes and per-split statistics, JSON-able (``headcache inspect --json``)."""
        out = {
            "path": str(self.path),
            "format": FORMAT,
            "schema": self.schema,
            "hidden_dim": self.hidden_dim,
            "dtype": self.dtype,
            "amp": self.amp,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "layers": self.layers,
            "token_layers": self.token_layers,
            "shard": None if self.shard is None else list(self.shard),
            "backbone_fingerprint": self.backbone_fingerprint,
            "spec": self.spec,
            "checkpoint_sha256": self.checkpoint_sha256,
            "created_by": self.created_by,
            "load_report": self.load_report,
            "splits": {},
        }
        for name in self.splits:
            split = self.split(name, require_complete=False)
            lengths = np.diff(split.offsets)
            classes, counts = np.unique(split.labels, return_counts=True)
            out["splits"][name] = {
                "n": split.n,
                "complete": split.complete,
                "labeled": split.labeled,
                "rows_written": split.rows_written,
                "tokens": split.num_tokens,
                "data_fingerprint": split.data_fingerprint,
                "pooled": split.pooled_names,
                "class_counts": {str(c): int(k) for c, k in zip(classes.tolist(), counts)},
                "lengths": {
                    "min": int(lengths.min()) if len(lengths) else None,
                    "mean": float(lengths.mean()) if len(lengths) else None,
                    "max": int(lengths.max()) if len(lengths) else None,
                },
            }
        return out

    def close(self) -> None:
        """Close the file (idempotent); split readers made from it stop working."""
        self._file.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SplitReader:
    """One split of an open `CacheReader`; valid while the reader is open.

    Opening it reads its attributes and dataset shapes only (and checks them).
    Offsets, labels and ids are read, checked and kept when first asked (as
    h5py's Dataset caches what cannot change); ``complete`` and ``rows_written``
    are read fresh every time.

    Attributes
    ----------
    name : str
    n : int
        Sequences the split holds when complete.
    offsets : ndarray (N+1,) int64
    labels : ndarray (N,) int64
        -1 marks an unlabelled sequence.
    ids : list of str
    num_tokens : int
    pooled_names : list of str
    labeled : bool
        Every sequence has a label.
    data_fingerprint : str or None
        Set when the split is complete.

    For an incomplete split (opened with ``require_complete=False``), N is
    ``rows_written`` at opening: only committed sequences are shown.
    """

    def __init__(self, reader: CacheReader, name: str):
        self._reader = reader
        self.name = name
        self._path = reader.path
        group = self._group = self._guard("the split's attributes", lambda: reader._file[name])
        attrs = self._guard("the split's attributes", lambda: dict(group.attrs))
        for key in ("n", "complete", "rows_written"):
            if key not in attrs:
                raise self._damaged(f"the split lacks its {key!r} attribute")
        if not _is_int(attrs["n"]) or int(attrs["n"]) < 0:
            raise self._damaged(f"its 'n' attribute is {_plain(attrs['n'])!r}, not a non-negative integer")
        self.n = int(attrs["n"])
        rows = attrs["rows_written"]
        if not _is_int(rows) or not 0 <= int(rows) <= self.n:
            raise self._damaged(f"its 'rows_written' attribute is {_plain(rows)!r}, not an integer in [0, {self.n}]")
        self._rows = int(rows)
        if not isinstance(_plain(attrs["complete"]), (bool, int)):
            raise self._damaged(f"its 'complete' attribute is {_plain(attrs['complete'])!r}, not a boolean")
        if bool(attrs["complete"]) and self._rows != self.n:
            raise self._damaged(f"it is marked complete with {self._rows} of {self.n} sequences written")
        self._attrs = attrs
        self._counted: set[str] = set()  # datasets whose chunks are counted (`_dataset`)
        self._check_shapes()

    def _check_shapes(self) -> None:
        d, n = self._reader.hidden_dim, self.n

        def shape_of(name: str, dtype: str | None = None) -> tuple:
            found = self._guard(name, lambda: self._group.get(name))
            if not isinstance(found, h5py.Dataset):
                raise self._damaged(f"it has no {name!r} dataset")
            # Exact dtypes, byte order included: a damaged type header would otherwise decode to other values.
            have = self._guard(name, lambda: found.dtype)
            if dtype is not None and have != np.dtype(dtype):
                raise self._damaged(f"its {name} are stored as {have.str}, not {np.dtype(dtype).str}", name)
            if dtype is None and h5py.check_string_dtype(have) is None:
                raise self._damaged(f"its {name} are stored as {have}, not strings", name)
            return self._guard(name, lambda: found.shape)

        width = self.token_width("all")
        tokens = shape_of("tokens", "<f2" if self._reader.dtype == "float16" else "<f4")
        if len(tokens) != 2 or tokens[1] != width:
            raise self._damaged(f"its tokens are {tokens}, not (rows, {width}) for hidden_dim {d} and "
                                f"{len(self._reader.token_layers)} token layers")
        fixed = (("offsets", (n + 1,)), ("labels", (n,))) + ((("id_offsets", (n + 1,)),) if self._flat_ids else ())
        for name, want in fixed:
            if shape_of(name, "<i8") != want:
                raise self._damaged(f"its {name} are {shape_of(name, '<i8')}, not {want} for n={n}")
        if self._flat_ids:
            if len(shape_of("id_bytes", "|u1")) != 1:
                raise self._damaged(f"its id_bytes are {shape_of('id_bytes', '|u1')}, not one row of bytes")
        else:
            ids = shape_of("ids")
            if len(ids) != 1 or ids[0] < self._rows:
                raise self._damaged(f"its ids are {ids}, fewer than the {self._rows} sequences written")
        pooled = self._guard("pooled", lambda: self._group.get("pooled"))
        if not isinstance(pooled, h5py.Group):
            raise self._damaged("it has no 'pooled' group")
        want = (n, len(self._reader.layers), d) if self._reader.schema >= 3 else (n, d)
        for pooled_name in self.pooled_names:
            have = shape_of(f"pooled/{pooled_name}", "<f4")
            if have != want:
                raise self._damaged(f"its pooled {pooled_name!r} is {have}, not {want}")

    @property
    def _flat_ids(self) -> bool:
        """Ids as flat UTF-8 bytes with offsets (schema 3), or variable-length strings (NOTE [ Nothing on the
        global heap ])."""
        return self._reader.schema >= 3

    def token_width(self, layer: int | str = "last") -> int:
        """Columns of `tokens` for ``layer``: D for one layer, Lt * D for ``"all"``."""
        position = self._reader.layer_position(layer, tokens=True)
        return self._reader.hidden_dim * (len(self._reader.token_layers) if position is None else 1)

    def _dataset(self, name: str) -> h5py.Dataset:
        """A dataset whose chunks are all in the file (checked once per dataset).

        HDF5 reads a chunk missing from a damaged chunk index as the fill value, with no error and no
        checksum to fail; so the index must list exactly the chunks the dataset's rows need.
        """
        dataset = self._group[name]
        if name not in self._counted:
            self._reader._chunk_layout
            if dataset.chunks is not None:
                c, rows = dataset.chunks[0], dataset.shape[0]
                count, want = self._guard(name, lambda: dataset.id.get_num_chunks()), -(-rows // c)
                if count != want:
                    raise self._damaged(f"its chunk index lists {count} chunks where {want} belong", name)
                infos = self._guard(name, lambda: [dataset.id.get_chunk_info(i) for i in range(count)])
                if sorted(info.chunk_offset[0] for info in infos) != list(range(0, rows, c)):
                    raise self._damaged("its chunk index places chunks outside its rows", name)
                # A finished split's chunks are all checksummed (a resume writes a few unfiltered ones,
                # NOTE [ Crash-safe appends ], which the rest of the extraction rewrites): a chunk marked
                # to skip its checksum is a damaged index entry.
                if bool(self._attrs["complete"]) and dataset.fletcher32 and any(i.filter_mask for i in infos):
                    raise self._damaged("a chunk of it is marked to skip its checksum", name)
            self._counted.add(name)
        return dataset

    def _damaged(self, what: str, dataset: str | None = None) -> CacheError:
        where = f"split {self.name!r}" + (f", dataset {dataset!r}" if dataset else "")
        return CacheError(f"{self._path}: {where}: {what}; the file is damaged: re-extract that split "
                          f"(headcache extract ... --splits {self.name} into a new --out, or the whole cache with "
                          "--overwrite)")

    def _guard(self, dataset: str, read: Callable[[], Any]) -> Any:
        """Run one read; a damaged file's error (checksum, structure) becomes a CacheError naming the dataset."""
        try:
            return read()
        except _READ_ERRORS as exc:
            raise self._damaged(f"reading it failed ({exc})", dataset) from None

    @property
    def rows_written(self) -> int:
        """Sequences written (read from the file)."""
        return int(self._guard("the split's attributes", lambda: self._group.attrs["rows_written"]))

    @property
    def complete(self) -> bool:
        """Whether the split's extraction finished (read from the file)."""
        return bool(self._guard("the split's attributes", lambda: self._group.attrs["complete"]))

    @cached_property
    def labeled(self) -> bool:
        if "labeled" in self._attrs:
            return bool(self._attrs["labeled"])
        return bool((self.labels >= 0).all())

    @cached_property
    def data_fingerprint(self) -> str | None:
        fingerprint = _plain(self._attrs.get("data_fingerprint", ""))
        return fingerprint if isinstance(fingerprint, str) and fingerprint else None

    @cached_property
    def pooled_names(self) -> list[str]:
        return self._guard("pooled", lambda: sorted(self._group["pooled"]))

    @cached_property
    def num_tokens(self) -> int:
        """Token rows of the committed sequences (one offset read; all offsets are checked when read)."""
        if "offsets" in self.__dict__:
            return int(self.offsets[-1])
        end = int(self._guard("offsets", lambda: self._dataset("offsets")[self._rows]))
        rows = self._guard("tokens", lambda: self._group["tokens"].shape[0])
        if not 0 <= end <= rows:
            raise self._damaged(f"offsets end at token row {end}, outside the {rows} token rows", "offsets")
        return end

    @cached_property
    def offsets(self) -> np.ndarray:
        offsets = self._guard("offsets", lambda: self._dataset("offsets")[: self._rows + 1].astype(np.int64))
        rows = self._guard("tokens", lambda: self._group["tokens"].shape[0])
        if offsets[0] != 0:
            raise self._damaged(f"offsets start at {offsets[0]}, not 0", "offsets")
        steps = np.diff(offsets)
        if (steps < 0).any():
            i = int(np.argmax(steps < 0))
            raise self._damaged(f"offsets decrease at sequence {i} ({offsets[i]} then {offsets[i + 1]})", "offsets")
        if offsets[-1] > rows:
            raise self._damaged(f"offsets end at token row {offsets[-1]}, past the {rows} token rows", "offsets")
        return offsets

    @cached_property
    def labels(self) -> np.ndarray:
        labels = self._guard("labels", lambda: self._dataset("labels")[: self._rows].astype(np.int64))
        # Schema 1 has no unlabelled sequences and derives its classes from the labels; an unfinished
        # split's labels may still raise num_classes when it finishes (when no spec gave them).
        lowest = -1 if self._reader.schema >= 2 else 0
        top = self._reader.num_classes if self._reader.schema >= 2 and bool(self._attrs["complete"]) else None
        bad = (labels < lowest) | (labels >= top) if top is not None else labels < lowest
        if bad.any():
            i = int(np.argmax(bad))
            allowed = f"[{lowest}, {top})" if top is not None else f"{lowest} or more"
            raise self._damaged(f"sequence {i} has label {labels[i]}, outside {allowed}", "labels")
        return labels

    @cached_property
    def ids(self) -> list[str]:
        ids = self._flat_id_list() if self._flat_ids else self._guard(
            "ids", lambda: [str(i) for i in self._group["ids"].asstr()[: self._rows]])
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            twice = next(i for i in ids if i in seen or seen.add(i))
            raise self._damaged(f"id {twice!r} appears more than once", "ids")
        # The data fingerprint recorded when the split was finished (an sha256 over ids, labels and
        # offsets, small next to the tokens) covers schema 2's unchecksummed variable-length ids, and
        # catches a chunk address moved onto other valid bytes (zeros pass fletcher32) in all schemas.
        if bool(self._attrs["complete"]) and self.data_fingerprint is not None:
            if data_fingerprint(ids, self.labels, self.offsets) != self.data_fingerprint:
                raise self._damaged("its ids, labels or offsets differ from the data fingerprint recorded when it "
                                    "was finished", "ids")
        return ids

    def _flat_id_list(self) -> list[str]:
        bounds = self._guard("id_offsets", lambda: self._dataset("id_offsets")[: self._rows + 1].astype(np.int64))
        size = self._guard("id_bytes", lambda: self._group["id_bytes"].shape[0])
        if bounds[0] != 0 or (np.diff(bounds) < 0).any() or bounds[-1] > size:
            raise self._damaged(f"its id offsets are not increasing from 0 within the {size} id bytes", "id_offsets")
        end = int(bounds[-1])
        raw = self._guard("id_bytes", lambda: self._dataset("id_bytes")[:end].tobytes() if end else b"")
        try:
            return _cut_ids(raw, bounds)
        except UnicodeDecodeError as exc:
            raise self._damaged(f"an id is not UTF-8 ({exc})", "id_bytes") from None

    def pooled(self, name: str, layer: int | str = "last") -> np.ndarray:
        """The pooled matrix ``name`` of one cached layer, (N, D) float32, or of ``"all"``, (N, L, D).

        ``layer`` is a layer id of the cache, ``"last"`` or ``"all"`` (`CacheReader.layer_position`).

        Raises
        ------
        CacheError
            No pooled matrix of that name (the message lists the available ones), or it is damaged.
        ConfigError
            The layer is not cached.
        """
        if name not in self.pooled_names:
            available = ", ".join(self.pooled_names) or "none"
            raise CacheError(f"split {self.name!r} has no pooled {name!r}; available: {available}")
        position = self._reader.layer_position(layer)
        dataset = self._dataset(f"pooled/{name}")
        if dataset.ndim == 2:  # schemas 1 and 2: one layer
            matrix = self._guard(f"pooled/{name}", lambda: dataset[: self._rows])
            return matrix[:, None, :] if position is None else matrix
        where = np.s_[: self._rows] if position is None else np.s_[: self._rows, position]
        return self._guard(f"pooled/{name}", lambda: dataset[where])

    def tokens(self, start: int = 0, stop: int | None = None, *, layer: int | str = "last",
               out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the flat token matrix of one token layer, (stop - start, D), or of
        ``"all"``, (stop - start, Lt * D) (``reshape(-1, Lt, D)`` gives the layer axis); in the cache dtype.

        With ``out`` (C-contiguous, the cache dtype, at least stop - start rows of `token_width`), the
        rows are read into its first rows and that view is returned: a reader that reuses its buffers
        allocates nothing per read.
        """
        stop = self.num_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.num_tokens:
            raise CacheError(
                f"split {self.name!r}: token rows [{start}, {stop}) are outside [0, {self.num_tokens})"
            )
        position = self._reader.layer_position(layer, tokens=True)
        d = self._reader.hidden_dim
        columns = slice(None) if position is None or len(self._reader.token_layers) == 1 else \
            slice(position * d, (position + 1) * d)
        dataset = self._dataset("tokens")
        if out is None:
            return self._guard("tokens", lambda: dataset[start:stop, columns])
        if stop > start:  # HDF5 refuses an empty selection
            self._guard("tokens", lambda: dataset.read_direct(out, np.s_[start:stop, columns], np.s_[0:stop - start]))
        return out[: stop - start]

    def sequence(self, i: int, layer: int | str = "last") -> np.ndarray:
        """Hidden states of sequence ``i`` in one token layer, (T_i, D), in the cache dtype."""
        starts, stops = sequence_bounds(self.offsets, [i])
        return self.tokens(int(starts[0]), int(stops[0]), layer=layer)


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a readable cache whose every split is complete (an interrupted extraction's is not)."""
    try:
        with CacheReader(path) as reader:
            return all(reader.split(name, require_complete=False).complete for name in reader.splits)
    except HeadcacheError:
        return False


def verify(path: str | Path) -> dict[str, list[str]]:
    """Read every dataset of every split and check it (``headcache inspect --verify``).

    Checks what opening checks, plus every checksum (tokens chunk by chunk,
    so memory stays small), the validation of offsets, labels and ids, and a
    complete split's data fingerprint (over ids, labels and offsets; schema 2's
    variable-length ids have no checksum of their own; `SplitReader.ids` checks it).

    Returns
    -------
    dict of str to list of str
        Per split, the problems found (an empty list: the split is intact).

    Raises
    ------
    CacheError
        The file cannot be opened as a cache at all (its root is damaged).
    """
    problems: dict[str, list[str]] = {}
    with CacheReader(path) as reader:
        for name in reader.splits:
            problems[name] = found = []
            try:
                split = reader.split(name, require_complete=False)
                split.ids  # reads and checks offsets and labels too (and the data fingerprint)
                for pooled_name in split.pooled_names:
                    split.pooled(pooled_name, "all")
                tokens = split._group["tokens"]
                step = tokens.chunks[0] if tokens.chunks else max(1, CHUNK_BYTES // max(1, tokens.dtype.itemsize))
                for start in range(0, split.num_tokens, step):
                    split.tokens(start, min(split.num_tokens, start + step), layer="all")
            except CacheError as exc:
                found.append(str(exc))
    return problems


def _open(path: Path, mode: str) -> h5py.File:
    """h5py.File with OSError (locked by another process, damaged, permissions, ...) as a named error.

    Schema 2 files keep the order of their splits in the ``split_names`` attribute, not through HDF5's
    creation-order tracking (schema 1's): tracking moves a file's attributes into HDF5's dense storage
    (a fractal heap and B-trees), where damaged bytes can make HDF5 loop forever instead of failing.
    """
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES) and "lock" in str(exc):
            doing = "reading or writing it" if mode != "r" else "writing it"
            raise CacheError(f"another process has {path} open ({doing}); wait for it to finish, or write to "
                             "another file (--out)") from None
        if mode == "r" and h5py.is_hdf5(path):
            raise CacheError(f"cannot open {path}: {exc}. The file is damaged or truncated: re-extract it "
                             "(headcache extract ... --overwrite)") from None
        # HDF5 reports a file shorter than its own recorded end only in its message text.
        fix = "; the file is cut short (a copy or a disk that stopped part-way): re-extract it with headcache " \
              "extract ... --overwrite" if "truncated file" in str(exc) else ""
        raise CacheError(f"cannot open {path} (mode {mode!r}): {exc}{fix}") from exc


def _ensure_space(path: Path, needed: int, split: str, k: int, committed: int) -> None:
    """Refuse a block that may not fit on the disk or under the process's file size limit, before writing it.

    HDF5 cannot recover from a failed write: the dataset handle's close
    fails in h5py's dealloc ("Exception ignored ... Can't decrement id ref
    count") and the next flush of the file crashes the process (SIGSEGV).
    So no block is handed to HDF5 unless there is room for its upper bound.
    The committed rows stay in the file, so the same command resumes after them.
    """
    size = path.stat().st_size
    room = shutil.disk_usage(path.parent).free
    where, fix = "free on the disk", "free space"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    if limit >= 0 and limit != getattr(resource, "RLIM_INFINITY", -1) and limit - size < room:
        room, where = max(0, limit - size), "left under this process's file size limit"
        fix = "raise the limit (ulimit -f)"
    if needed > room:
        raise DiskFullError(
            f"{path}: not enough space for the next {k} sequences of split {split!r}: they need up to "
            f"{_mib(needed)}, {_mib(room)} is {where}; the {committed} sequences written before are kept: {fix} "
            "and run the same command again to resume"
        )


def _make_folder(path: Path) -> None:
    """The folder a new cache goes into, made when missing; a file where a folder must be is refused."""
    blocking = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputExistsError(f"cannot write {path}: {blocking} is a file, not a folder; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of replacements of ``path`` that no process writes any more (NOTE [ Atomic
    replacement ]): a replacement killed by SIGKILL leaves its ``.NAME.*.tmp`` behind, of the cache's size.

    A live writer holds HDF5's exclusive lock on its temporary, so one that opens read-only is abandoned.
    Without HDF5's file locking (``HDF5_USE_FILE_LOCKING=FALSE``) a live writer cannot be told apart, so
    nothing is deleted.
    """
    if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() in ("FALSE", "0"):
        return
    for temporary in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            with h5py.File(temporary, "r"):
                pass
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES) and "lock" in str(exc):
                continue  # another replacement is writing it now
            # not an HDF5 file: killed before HDF5 wrote its header, or cut short
        temporary.unlink(missing_ok=True)


def _refuse_if_written_elsewhere(path: Path) -> None:
    """Raise if another process is writing ``path`` (HDF5's lock: writers hold it exclusively)."""
    if h5py.is_hdf5(path):
        with _open(path, "r"):
            pass


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a Python value (text decoded, numpy scalars unwrapped, arrays as lists), safe to
    compare; text that is not UTF-8 stays bytes (which no check accepts)."""
    if isinstance(value, bytes):  # a fixed-length text attribute (np.bytes_ is a bytes)
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    return value.item() if isinstance(value, np.generic) else value.tolist() if isinstance(value, np.ndarray) else value


def _set_text(attrs: h5py.AttributeManager, key: str, text: str) -> None:
    """A text attribute as a fixed-length UTF-8 byte string (NOTE [ Nothing on the global heap ])."""
    raw = text.encode("utf-8")
    if len(raw) > MAX_TEXT_BYTES:
        raise ConfigError(f"cache attribute {key!r} would be {len(raw)} bytes; HDF5 holds at most {MAX_TEXT_BYTES} "
                          "in an attribute (too many classes, or class names too long?)")
    attrs[key] = np.array(raw, dtype=f"S{max(1, len(raw))}")


def _check_layer_ids(key: str, value: Any) -> list[int]:
    ids = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if not ids or not all(_is_int(i) for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"the spec's {key} must be a non-empty list of distinct integers, got {value!r}")
    return [int(i) for i in ids]


def _check_writer_attrs(attrs: Mapping) -> dict:
    missing = [key for key in WRITER_ATTRS if key not in attrs]
    if missing:
        raise ConfigError(f"cache attrs lack {missing}; a cache needs {list(WRITER_ATTRS)}")
    unknown = sorted(set(attrs) - set(WRITER_ATTRS) - set(OPTIONAL_ATTRS))
    if unknown:
        raise ConfigError(f"cache attrs {unknown} are unknown; a cache takes {list(WRITER_ATTRS + OPTIONAL_ATTRS)}")
    attrs = {key: None for key in OPTIONAL_ATTRS} | dict(attrs)
    if attrs["dtype"] not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {attrs['dtype']!r}")
    dim = attrs["hidden_dim"]
    if not _is_int(dim) or dim < 1:
        raise ConfigError(f"hidden_dim must be a positive integer, got {dim!r}")
    attrs["hidden_dim"] = int(dim)
    attrs["amp"] = "none" if attrs["amp"] is None else attrs["amp"]
    if attrs["amp"] not in AMPS:
        raise ConfigError(f"amp must be one of {', '.join(AMPS[1:])} (or None), got {attrs['amp']!r}")
    num_classes, names = attrs["num_classes"], attrs["class_names"]
    if names is not None:
        names = [str(c) for c in names]
        num_classes = len(names) if num_classes is None else num_classes
        if len(names) != num_classes:
            raise ConfigError(f"the spec's class_names {names} are {len(names)}, but its num_classes is {num_classes}")
        attrs["class_names"] = names
    if num_classes is not None and (not _is_int(num_classes) or num_classes < MIN_CLASSES):
        raise ConfigError(f"the spec's num_classes must be an integer >= {MIN_CLASSES}, got {num_classes!r}")
    if num_classes is not None and names is None:
        attrs["class_names"] = default_class_names(int(num_classes))
    attrs["num_classes"] = None if num_classes is None else int(num_classes)
    layers = [SINGLE_LAYER] if attrs["layers"] is None else _check_layer_ids("layers", attrs["layers"])
    token_layers = layers[-1:] if attrs["token_layers"] is None else _check_layer_ids("token_layers",
                                                                                      attrs["token_layers"])
    outside = [i for i in token_layers if i not in layers]
    if outside:
        raise ConfigError(f"token layers {outside} are not among the cached layers {layers}; --token-layers takes "
                          "`last`, `all` or some of the spec's layers")
    attrs["layers"], attrs["token_layers"] = layers, sorted(token_layers, key=layers.index)
    shard = attrs["shard"]
    if shard is not None:
        if not (isinstance(shard, (list, tuple)) and len(shard) == 2 and all(_is_int(i) for i in shard)
                and 0 <= shard[0] < shard[1]):
            raise ConfigError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
        attrs["shard"] = [int(shard[0]), int(shard[1])]
    return attrs


def _check_resumable(path: Path, attrs: dict, splits: Sequence[str] | None) -> None:
    """Decide, reading only, whether an existing file can be resumed; raise if not."""

    def refuse(why: str) -> OutputExistsError:
        return OutputExistsError(f"{path} exists and {why}; pass --overwrite to replace it")

    if not path.is_file():
        raise refuse("is not a file")
    if not h5py.is_hdf5(path):
        raise refuse("is not a headcache cache (not an HDF5 file)")
    with _open(path, "r") as f:
        try:
            root = dict(f.attrs)
            have_splits = {name: bool(g.attrs.get("complete", False)) for name, g in f.items()
                           if isinstance(g, h5py.Group)}
        except _READ_ERRORS as exc:
            raise refuse(f"cannot be read as a cache ({exc})") from None
        if _plain(root.get("format")) != FORMAT:
            raise refuse("is not a headcache cache (an HDF5 file without format='headcache')")
        if _plain(root.get("schema")) != SCHEMA:
            raise refuse(f"has cache schema {_plain(root.get('schema'))}, but this version writes schema {SCHEMA}")
        differ = []
        for key in IDENTITY_ATTRS:
            have = _plain(root.get(key))
            if have != attrs[key]:
                differ.append(f"{key} {_show(key, have)} in the file, {_show(key, attrs[key])} now")
        given = attrs["num_classes"]
        if given is not None and _plain(root.get("num_classes")) != given:
            differ.append(f"num_classes {_plain(root.get('num_classes'))!r} in the file, {given!r} now")
        if differ:
            raise refuse("was written with another setting (" + "; ".join(differ) + ")")
        wanted = list(splits) if splits is not None else list(have_splits)
        if wanted and all(have_splits.get(name, False) for name in wanted):
            raise OutputExistsError(
                f"{path} is already complete (splits {', '.join(sorted(wanted))}); "
                "pass --overwrite to extract again"
            )


def _show(key: str, value) -> str:
    return repr(value[:12]) if key == "backbone_fingerprint" and isinstance(value, str) else repr(value)
