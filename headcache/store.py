"""The HDF5 cache, schema 1: a writer and a reader, nothing else.

Layout (DESIGN.md, "Cache format")::

    /                 attrs: format="headcache", schema=1, backbone_fingerprint, spec,
                      checkpoint_sha256, hidden_dim, dtype, created_by, load_report (JSON)
    /<split>/tokens   (sum T_i, D) float16|float32, resizable and chunked by rows, fletcher32
    /<split>/offsets  (N+1,) int64: sequence i is tokens[offsets[i]:offsets[i+1]]
    /<split>/labels   (N,) int64
    /<split>/ids      (N,) utf-8 strings
    /<split>/pooled/<name>  (N, D) float32
    /<split>          attrs: n, complete, data_fingerprint, rows_written

Ragged sequences are stored flat with offsets (no padding on disk); the offset
arithmetic lives in `sequence_bounds` only. Like h5py, the reader caches only
what cannot change after creation (schema, hidden_dim, dtype, fingerprint) and
reads ``complete`` and ``rows_written`` fresh every time.

NOTE [ Crash-safe appends ]
``rows_written`` is the commit point. `SplitWriter.write` writes the token
rows and the per-sequence rows, flushes, and only then sets ``rows_written``
and flushes again; so a process killed anywhere (SIGKILL, the OOM killer)
leaves ``rows_written`` describing data that is fully in the file. What lies
past it may be damaged: a torn write of the token chunk that holds the commit
point leaves that chunk's fletcher32 checksum wrong, and ids past it may point
at variable-length string heap objects that never reached the file. HDF5 reads
both when they are overwritten, so a resumed split is first cut back to the
commit point (`SplitWriter._drop_uncommitted`). Files use HDF5's default
(earliest) format: ``libver="latest"`` would write superblock v3, which marks a
file open for writing and refuses to reopen it after a crash. (Power loss is
another matter: nothing here calls fsync.)

h5py serialises every HDF5 call under one global lock, so a cache file should
be touched by one thread only (the writer thread of extraction, the prefetch
thread of training).

This module imports h5py, numpy and torch tensors (for `round_through`), never models or specs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

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
    OutputExistsError,
    SchemaError,
    SplitIncompleteError,
    SplitMissingError,
)

SCHEMA = 1
FORMAT = "headcache"
DTYPES = ("float16", "float32")
# Root attributes the caller supplies; format, schema and created_by are added here.
WRITER_ATTRS = ("backbone_fingerprint", "spec", "checkpoint_sha256", "hidden_dim", "dtype", "load_report")
# What must match for an existing file to be resumed rather than refused.
IDENTITY_ATTRS = ("backbone_fingerprint", "spec", "hidden_dim", "dtype")
# Token chunks of about 1 MiB: large enough for fast sequential reads, small
# enough that reading one sequence does not checksum much more than it needs.
CHUNK_BYTES = 1 << 20
# ids are chunked (not contiguous) only so a resume can drop chunks past the commit point.
ID_CHUNK = 4096
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def round_through(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """Float32 states rounded through the cache's storage dtype and back: what a reader of a cache of
    that dtype sees. Extraction pools these rounded states, and the live source and the exported model
    round the same way (NOTE [ Float16 rounding in the live source ] in features.py)."""
    return hidden.float().to(getattr(torch, dtype)).float()


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


class CacheWriter:
    """Create a cache file, or resume an interrupted one; context manager.

    Parameters
    ----------
    path : str or Path
        The cache file.
    attrs : dict
        ``backbone_fingerprint``, ``spec``, ``checkpoint_sha256``,
        ``hidden_dim`` (int), ``dtype`` (``"float16"`` or ``"float32"``) and
        ``load_report`` (a dict, stored as JSON).
    overwrite : bool
        Replace an existing file.

    Attributes
    ----------
    resuming : bool
        True when an existing, interrupted cache of the same backbone, spec,
        hidden_dim and dtype was opened to be completed.

    Raises
    ------
    OutputExistsError
        The file exists and is complete, belongs to another backbone / spec /
        setting, or is not a headcache cache (and ``overwrite`` is False). The
        file is left untouched: it is only opened read-only to decide.
    ConfigError
        ``attrs`` lacks a key or has an invalid dtype / hidden_dim.

    Notes
    -----
    Create every split (`split`) before writing data to any of them: then an
    interrupted file always shows an incomplete split and is resumed, while a
    file whose splits are all complete is refused as finished.
    """

    def __init__(self, path: str | Path, attrs: Mapping, *, overwrite: bool = False):
        self.path = Path(path)
        attrs = _check_writer_attrs(attrs)
        self._dtype = np.dtype(attrs["dtype"])
        self._hidden_dim = attrs["hidden_dim"]
        self.resuming = self.path.exists() and not overwrite
        if self.resuming:
            _check_resumable(self.path, attrs)
        self._file = _open(self.path, "r+" if self.resuming else "w")
        if not self.resuming:
            root = self._file.attrs
            root["format"] = FORMAT
            root["schema"] = SCHEMA
            for key in ("backbone_fingerprint", "spec", "checkpoint_sha256", "dtype"):
                root[key] = attrs[key]
            root["hidden_dim"] = attrs["hidden_dim"]
            root["created_by"] = f"headcache {__version__}"
            root["load_report"] = json.dumps(attrs["load_report"], sort_keys=True)
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
        if not isinstance(name, str) or not name or "/" in name or name == ".":
            raise ConfigError(f"split name must be a non-empty string without '/', got {name!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"split {name!r}: n must be a non-negative integer, got {n!r}")
        pooled_names = list(pooled_names)
        if len(set(pooled_names)) != len(pooled_names) or any("/" in p or not p for p in pooled_names):
            raise ConfigError(f"split {name!r}: pooled names must be distinct names without '/', got {pooled_names}")
        if name in self._file and "rows_written" not in self._file[name].attrs:
            del self._file[name]  # a writer killed while creating it; rows_written is set last
        if name in self._file:
            group = self._file[name]
            have_n, have_pooled = int(group.attrs["n"]), sorted(group["pooled"])
            if have_n != n or have_pooled != sorted(pooled_names):
                raise OutputExistsError(
                    f"{self.path}: split {name!r} exists with n={have_n} and pooled {have_pooled}, "
                    f"but this extraction has n={n} and pooled {sorted(pooled_names)}; "
                    "pass --overwrite to extract again"
                )
            writer = SplitWriter(group, self._dtype, self._hidden_dim)
            if not writer.complete:
                writer._drop_uncommitted()
            return writer
        return SplitWriter(self._create_split(name, int(n), pooled_names), self._dtype, self._hidden_dim)

    def _create_split(self, name: str, n: int, pooled_names: list[str]) -> h5py.Group:
        d = self._hidden_dim
        group = self._file.create_group(name)
        chunk_rows = max(1, CHUNK_BYTES // (d * self._dtype.itemsize))
        group.create_dataset(
            "tokens", shape=(0, d), maxshape=(None, d), dtype=self._dtype, chunks=(chunk_rows, d), fletcher32=True
        )
        group.create_dataset("offsets", shape=(n + 1,), dtype=np.int64, fillvalue=0, dcpl=_early_allocation())
        group.create_dataset("labels", shape=(n,), dtype=np.int64, dcpl=_early_allocation())
        group.create_dataset("ids", shape=(0,), maxshape=(None,), chunks=(ID_CHUNK,), dtype=h5py.string_dtype())
        pooled = group.create_group("pooled")
        for pooled_name in pooled_names:
            pooled.create_dataset(pooled_name, shape=(n, d), dtype=np.float32, dcpl=_early_allocation())
        group.attrs["n"] = n
        group.attrs["complete"] = False
        group.attrs["data_fingerprint"] = ""
        group.attrs["rows_written"] = 0
        self._file.flush()
        return group

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SplitWriter:
    """Appends batches of sequences to one split; made by `CacheWriter.split`.

    Attributes
    ----------
    name : str
    n : int
        Sequences the split holds when complete.
    """

    def __init__(self, group: h5py.Group, dtype: np.dtype, hidden_dim: int):
        self._group = group
        self._dtype = dtype
        self._hidden_dim = hidden_dim
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
        tokens : sequence of K ndarray (T_i, D)
            Hidden states; T_i may be 0. Cast to the cache dtype.
        labels : ndarray (K,) of int
        ids : sequence of K str
        pooled : dict of str to ndarray (K, D)
            One entry per pooled name of the split; stored as float32.

        Raises
        ------
        DataError
            Shapes or types that do not fit the split, or values that overflow
            float16 when the cache is float16.
        CacheError
            The split is complete, or K more sequences would exceed ``n``.
        """
        k, d = len(tokens), self._hidden_dim
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
        for seq_id in ids:
            if "\0" in seq_id:  # HDF5 strings end at NUL: the id would come back cut short
                raise DataError(f"split {self.name!r}: id {seq_id!r} contains a NUL character")
        tokens = [np.asarray(t) for t in tokens]
        for t, seq_id in zip(tokens, ids):
            if t.ndim != 2 or t.shape[1] != d:
                raise DataError(f"split {self.name!r}, sequence {seq_id!r}: tokens must be (T, {d}), got {t.shape}")
        want = self._group["pooled"]
        if set(pooled) != set(want):
            raise DataError(f"split {self.name!r}: pooled must hold {sorted(want)}, got {sorted(pooled)}")
        pooled = {name: np.asarray(p, dtype=np.float32) for name, p in pooled.items()}
        for name, p in pooled.items():
            if p.shape != (k, d):
                raise DataError(f"split {self.name!r}: pooled {name!r} must be ({k}, {d}), got {p.shape}")
        if k == 0:
            return

        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        source = np.concatenate(tokens, axis=0)
        with np.errstate(over="ignore"):  # overflow is checked, with the sequence named, below
            block = source.astype(self._dtype)
        if self._dtype == np.float16:
            self._check_float16(source, block, lengths, ids)

        group = self._group
        start = int(group["offsets"][start_row])
        stop = start + int(lengths.sum())
        _ensure_space(Path(group.file.filename), self._block_bytes(start, stop, ids), self.name, k, start_row)
        rows = slice(start_row, start_row + k)
        group["tokens"].resize(stop, axis=0)
        group["tokens"][start:stop] = block
        group["offsets"][start_row + 1 : start_row + k + 1] = start + np.cumsum(lengths)
        group["labels"][rows] = labels.astype(np.int64)
        group["ids"].resize(start_row + k, axis=0)
        group["ids"][rows] = np.array(ids, dtype=object)
        for name, p in pooled.items():
            group["pooled"][name][rows] = p
        # A write barrier: HDF5 may evict metadata (the attribute) before raw
        # data, so the data must be in the file before rows_written changes.
        group.file.flush()
        self._commit(start_row + k)

    def _block_bytes(self, start: int, stop: int, ids: Sequence[str]) -> int:
        """An upper bound of the bytes the file grows by when token rows start:stop and ``ids`` are written.

        Each token or id chunk touched is written whole at a new place (its
        checksum changes); pooled, offsets and labels were allocated when the
        split was created. The heap holds each id with a 16-byte header in
        collections of at least 4 KiB. The chunk index and object headers grow
        with the chunks: 5% and 64 KiB more cover them (measured: a block of 50
        token chunks grows the file by 99.9% of the chunks' bytes alone).
        """
        tokens, id_set = self._group["tokens"], self._group["ids"]

        def chunks(first: int, last: int, rows: int) -> int:
            return (last - 1) // rows - first // rows + 1 if last > first else 0

        token_bytes = chunks(start, stop, tokens.chunks[0]) * tokens.chunks[0] * tokens.dtype.itemsize * tokens.shape[1]
        n = id_set.shape[0]
        id_bytes = chunks(n, n + len(ids), ID_CHUNK) * ID_CHUNK * 16
        heap = sum(len(i.encode("utf-8")) + 16 for i in ids) + 4096
        return int((token_bytes + id_bytes + heap) * 1.05) + (64 << 10)

    def _commit(self, rows_written: int) -> None:
        """The commit point: only now do the new rows count (NOTE [ Crash-safe appends ])."""
        self._group.attrs["rows_written"] = rows_written
        self._group.file.flush()

    def _drop_uncommitted(self) -> None:
        """Cut tokens and ids back to the commit point before resuming (NOTE [ Crash-safe appends ]).

        Each dataset is shrunk to the chunk boundary at or below the commit
        point, which drops every later chunk without reading it, then grown
        back, and the committed rows of the boundary chunk are written again
        (a fresh chunk, a fresh checksum). The committed token rows of that
        chunk are read raw, without the checksum test: a torn rewrite left
        their bytes intact (they were rewritten with the same values), but
        maybe not the checksum, which covers the whole chunk.
        """
        group = self._group
        rows = self.rows_written
        end = int(group["offsets"][rows])
        tokens, ids = group["tokens"], group["ids"]
        token_floor = end - end % tokens.chunks[0]
        kept_tokens = np.empty((0, self._hidden_dim), dtype=tokens.dtype)
        if end > token_floor:
            _, raw = tokens.id.read_direct_chunk((token_floor, 0))
            count = (end - token_floor) * self._hidden_dim
            kept_tokens = np.frombuffer(raw, dtype=tokens.dtype, count=count).reshape(-1, self._hidden_dim)
        id_floor = rows - rows % ids.chunks[0]
        kept_ids = ids[id_floor:rows]  # committed ids point at heap objects in the file
        tokens.resize(token_floor, axis=0)
        ids.resize(id_floor, axis=0)
        tokens.resize(end, axis=0)
        ids.resize(rows, axis=0)
        tokens[token_floor:end] = kept_tokens
        ids[id_floor:rows] = kept_ids
        group.file.flush()

    def _check_float16(self, source: np.ndarray, block: np.ndarray, lengths: np.ndarray, ids: Sequence[str]) -> None:
        """Refuse finite values that become inf in float16, rather than store them silently."""
        overflow = np.isinf(block) & np.isfinite(source)
        if overflow.any():
            row = int(np.argmax(overflow.any(axis=1)))
            seq = int(np.searchsorted(np.cumsum(lengths), row, side="right"))
            raise DataError(
                f"split {self.name!r}, sequence {ids[seq]!r}: hidden states up to "
                f"{float(np.abs(source[row]).max()):.4g} exceed float16's range ({_FLOAT16_MAX:g}); "
                "extract with --dtype float32"
            )

    def finish(self) -> None:
        """Mark the split complete and record its data fingerprint.

        Raises
        ------
        CacheError
            Fewer than ``n`` sequences are written.
        """
        written = self.rows_written
        if written != self.n:
            raise CacheError(f"split {self.name!r}: {written} of {self.n} sequences are written; cannot finish it")
        group = self._group
        group.attrs["data_fingerprint"] = data_fingerprint(
            list(group["ids"].asstr()[()]), group["labels"][()], group["offsets"][()]
        )
        group.attrs["complete"] = True
        group.file.flush()


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

    Parameters
    ----------
    path : str or Path
    expected_fingerprint : str, optional
        The fingerprint of the backbone the cache will be paired with.

    Attributes
    ----------
    path : Path
    schema, hidden_dim : int
    dtype, backbone_fingerprint, spec, checkpoint_sha256, created_by : str
    load_report : dict

    Raises
    ------
    CacheError
        The file does not exist or cannot be opened.
    SchemaError
        Not an HDF5 file, not a headcache cache, or another schema.
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
        root = self._file.attrs
        if root.get("format") != FORMAT:
            raise SchemaError(
                f"{self.path} is an HDF5 file but not a headcache cache (no format='headcache' attribute)"
            )
        self.schema = int(root.get("schema", -1))
        if self.schema != SCHEMA:
            raise SchemaError(
                f"{self.path} has cache schema {self.schema}; headcache {__version__} reads schema "
                f"{SCHEMA}. Re-extract the cache with this version (headcache extract ... --overwrite), or "
                "use a headcache version that reads that schema"
            )
        missing = [key for key in WRITER_ATTRS + ("created_by",) if key not in root]
        if missing:
            raise SchemaError(f"{self.path}: cache lacks root attributes {missing}; re-extract it")
        self.hidden_dim = int(root["hidden_dim"])
        self.dtype = str(root["dtype"])
        self.backbone_fingerprint = str(root["backbone_fingerprint"])
        self.spec = str(root["spec"])
        self.checkpoint_sha256 = str(root["checkpoint_sha256"])
        self.created_by = str(root["created_by"])
        try:
            self.load_report = json.loads(root["load_report"])
        except ValueError:
            raise SchemaError(f"{self.path}: the load_report attribute is not JSON; re-extract the cache") from None
        if expected_fingerprint is not None and expected_fingerprint != self.backbone_fingerprint:
            raise FingerprintMismatchError(
                f"{self.path} was written by backbone {self.backbone_fingerprint[:12]}, but this backbone is "
                f"{expected_fingerprint[:12]}: the cached hidden states belong to other weights. Use the "
                f"checkpoint that wrote the cache (sha256 {self.checkpoint_sha256[:12]}), or re-extract the "
                "cache with this one (headcache extract ... --overwrite)"
            )

    @property
    def splits(self) -> list[str]:
        """Names of the splits in the file, in the order they were created (files track it; see `_open`)."""
        return [name for name, obj in self._file.items() if isinstance(obj, h5py.Group)]

    def split(self, name: str, *, require_complete: bool = True) -> "SplitReader":
        """Open one split.

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
        """
        if name not in self.splits:
            available = ", ".join(self.splits) or "none"
            raise SplitMissingError(f"{self.path} has no split {name!r}; available splits: {available}")
        group = self._file[name]
        if require_complete and not bool(group.attrs["complete"]):
            raise SplitIncompleteError(
                f"split {name!r} of {self.path} is incomplete ({int(group.attrs['rows_written'])}/"
                f"{int(group.attrs['n'])} sequences written): its extraction was interrupted. "
                "Rerun the same headcache extract command to resume it"
            )
        return SplitReader(group, name)

    def summary(self) -> dict:
        """File attributes and per-split statistics, JSON-able (``headcache inspect --json``)."""
        out = {
            "path": str(self.path),
            "format": FORMAT,
            "schema": self.schema,
            "hidden_dim": self.hidden_dim,
            "dtype": self.dtype,
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
            fingerprint = str(split._group.attrs["data_fingerprint"])
            out["splits"][name] = {
                "n": split.n,
                "complete": split.complete,
                "rows_written": split.rows_written,
                "tokens": split.num_tokens,
                "data_fingerprint": fingerprint or None,
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

    Attributes
    ----------
    name : str
    n : int
        Sequences the split holds when complete.
    offsets : ndarray (N+1,) int64
    labels : ndarray (N,) int64
    ids : list of str
    num_tokens : int
    pooled_names : list of str

    For an incomplete split (opened with ``require_complete=False``), N is
    ``rows_written`` at opening: only committed sequences are shown.
    """

    def __init__(self, group: h5py.Group, name: str):
        self._group = group
        self.name = name
        self.n = int(group.attrs["n"])
        rows = int(group.attrs["rows_written"])
        self.offsets = group["offsets"][: rows + 1].astype(np.int64)
        self.labels = group["labels"][:rows].astype(np.int64)
        self.ids = list(group["ids"].asstr()[:rows])
        self.num_tokens = int(self.offsets[-1])
        self.pooled_names = sorted(group["pooled"])

    @property
    def rows_written(self) -> int:
        """Sequences written (read from the file)."""
        return int(self._group.attrs["rows_written"])

    @property
    def complete(self) -> bool:
        """Whether the split's extraction finished (read from the file)."""
        return bool(self._group.attrs["complete"])

    def pooled(self, name: str) -> np.ndarray:
        """The pooled matrix ``name``, (N, D) float32.

        Raises
        ------
        CacheError
            No pooled matrix of that name (the message lists the available ones).
        """
        if name not in self.pooled_names:
            available = ", ".join(self.pooled_names) or "none"
            raise CacheError(f"split {self.name!r} has no pooled {name!r}; available: {available}")
        return self._group["pooled"][name][: len(self.labels)].astype(np.float32)

    def tokens(self, start: int = 0, stop: int | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the flat token matrix, (stop - start, D), in the cache dtype.

        With ``out`` (C-contiguous, the cache dtype, at least stop - start rows of D), the rows are
        read into its first rows and that view is returned: a reader that reuses its buffers
        allocates nothing per read.
        """
        stop = self.num_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.num_tokens:
            raise CacheError(
                f"split {self.name!r}: token rows [{start}, {stop}) are outside [0, {self.num_tokens})"
            )
        if out is None:
            return self._group["tokens"][start:stop]
        if stop > start:  # HDF5 refuses an empty selection
            self._group["tokens"].read_direct(out, np.s_[start:stop], np.s_[0:stop - start])
        return out[: stop - start]

    def sequence(self, i: int) -> np.ndarray:
        """Hidden states of sequence ``i``, (T_i, D), in the cache dtype."""
        starts, stops = sequence_bounds(self.offsets, [i])
        return self.tokens(int(starts[0]), int(stops[0]))


def _open(path: Path, mode: str) -> h5py.File:
    """h5py.File with OSError (locked by another process, permissions, ...) as a named error.

    New files track creation order, so splits list in the order they were written (train, valid, test).
    """
    try:
        return h5py.File(path, mode, track_order=True) if mode == "w" else h5py.File(path, mode)
    except OSError as exc:
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


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


def _early_allocation() -> h5py.h5p.PropDCID:
    """Creation properties that allocate a contiguous dataset's space when it is created.

    HDF5 allocates it at the first write by default; a writer killed while
    flushing that write can leave the dataset pointing past the end of the
    file as recorded, and the file then refuses to open it. Allocated at
    creation, the space is in the file before any data is written.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _check_writer_attrs(attrs: Mapping) -> dict:
    missing = [key for key in WRITER_ATTRS if key not in attrs]
    if missing:
        raise ConfigError(f"cache attrs lack {missing}; a cache needs {list(WRITER_ATTRS)}")
    attrs = dict(attrs)
    if attrs["dtype"] not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {attrs['dtype']!r}")
    dim = attrs["hidden_dim"]
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ConfigError(f"hidden_dim must be a positive integer, got {dim!r}")
    attrs["hidden_dim"] = int(dim)
    return attrs


def _check_resumable(path: Path, attrs: dict) -> None:
    """Decide, reading only, whether an existing file can be resumed; raise if not."""

    def refuse(why: str) -> OutputExistsError:
        return OutputExistsError(f"{path} exists and {why}; pass --overwrite to replace it")

    if not path.is_file():
        raise refuse("is not a file")
    if not h5py.is_hdf5(path):
        raise refuse("is not a headcache cache (not an HDF5 file)")
    with _open(path, "r") as f:
        root = f.attrs
        if root.get("format") != FORMAT:
            raise refuse("is not a headcache cache (an HDF5 file without format='headcache')")
        if int(root.get("schema", -1)) != SCHEMA:
            raise refuse(f"has cache schema {root.get('schema')}, but this version writes schema {SCHEMA}")
        differ = []
        for key in IDENTITY_ATTRS:
            have = root.get(key)
            have = have.item() if isinstance(have, np.generic) else have
            if have != attrs[key]:
                differ.append(f"{key} {_show(key, have)} in the file, {_show(key, attrs[key])} now")
        if differ:
            raise refuse("was written with another setting (" + "; ".join(differ) + ")")
        splits = {name: bool(g.attrs.get("complete", False)) for name, g in f.items() if isinstance(g, h5py.Group)}
        if splits and all(splits.values()):
            raise OutputExistsError(
                f"{path} is already complete (splits {', '.join(sorted(splits))}); "
                "pass --overwrite to extract again"
            )


def _show(key: str, value) -> str:
    return repr(value[:12]) if key == "backbone_fingerprint" and isinstance(value, str) else repr(value)
