"""Work beyond one process: torchrun ranks (for extraction and sweeps), scheduler shards, and the merge of
parts into one cache. extract.py runs a shard or a rank of an extraction; sweep.py spreads its banks with `Ranks`.

NOTE [ Shards ]
Shard i of n extracts a contiguous slice of every split (`shard_bounds`):
disjoint and covering, sizes differing by at most one, so no item is padded
in twice (as torch's DistributedSampler does to even out ranks). A shard is
an ordinary extraction into its own part file beside ``--out`` (`part_path`),
with the same crash-safe commits, so a killed shard resumes like any cache.
`merge_parts` joins the complete parts *physically*, in shard order, into a
temporary file that is renamed over ``--out``: offsets rebased, every other
row copied as it is. Never an HDF5 virtual dataset: a missing source file
reads as the fill value there, and a missing part must be an error, not zeros.

Under torchrun (WORLD_SIZE > 1), rank r extracts shard r of WORLD_SIZE on
its own GPU (LOCAL_RANK) when there is one; the ranks then agree, over the
process group, that every shard is complete, and rank 0 merges. A rank that
fails tells the others through the same agreement instead of leaving them
waiting at a barrier.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from headcache.errors import CacheError, ConfigError, OutputExistsError
from headcache.store import CacheReader, CacheWriter

MERGE_BLOCK = 4096  # sequences copied per write: large reads, bounded memory
_PART = re.compile(r"\.part-(\d+)-of-(\d+)$")


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``index`` of ``count`` over ``n`` rows (NOTE [ Shards ]).

    The first ``n % count`` shards hold one row more than the others.

    >>> [shard_bounds(10, i, 3) for i in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` as (I, N), with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(match.group(1)), int(match.group(2))


def part_path(out: str | Path, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` of the cache ``out`` is written: beside it."""
    out = Path(out)
    return out.with_name(f"{out.name}.part-{index}-of-{count}")


class ShardSpec:
    """A spec whose datasets are shard ``index`` of ``count`` of the wrapped spec's (every other member is
    the wrapped spec's own). ``name`` is what the unsharded extraction records as the cache's spec."""

    def __init__(self, spec: Any, index: int, count: int, name: str):
        self._spec, self._index, self._count, self.name = spec, index, count, name
        self.shard = (index, count)  # recorded in the part file: it is not a whole cache

    def __getattr__(self, member: str) -> Any:
        return getattr(self._spec, member)

    def dataset(self, split: str) -> "ShardDataset":
        dataset = self._spec.dataset(split)
        start, stop = shard_bounds(len(dataset), self._index, self._count)
        if stop == start:
            raise ConfigError(f"--shard {self._index}/{self._count}: split {split!r} has {len(dataset)} items, "
                              f"fewer than the {self._count} shards; use fewer shards")
        return ShardDataset(dataset, start, stop)


class ShardDataset(torch.utils.data.Dataset):
    """Items ``[start, stop)`` of a dataset, renumbered from 0; ``lengths()`` too, when the dataset has it."""

    def __init__(self, dataset: Any, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop
        if callable(getattr(dataset, "lengths", None)):
            self.lengths = lambda: list(dataset.lengths())[start:stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.dataset[self.start + i]


def spec_text(spec: str | Any, spec_options: dict[str, str] | None) -> str:
    """The cache's spec attribute as an unsharded `extract` writes it."""
    text = spec if isinstance(spec, str) else getattr(spec, "name", type(spec).__name__)
    return text + (" " + json.dumps(spec_options, sort_keys=True) if spec_options else "")


# ---------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    """What `merge_parts` returns."""

    path: Path
    parts: list[Path]
    split_sizes: dict[str, int]
    seconds: float


def find_parts(out: str | Path) -> list[Path]:
    """The part files of ``out``, in shard order; refuses a missing part or parts of different shard counts."""
    out = Path(out)
    found: dict[int, set[int]] = {}
    for path in out.parent.glob(f"{glob_escape(out.name)}.part-*-of-*"):
        match = _PART.search(path.name)
        if match and path.name == part_path(out, int(match.group(1)), int(match.group(2))).name:
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if not found:
        raise CacheError(f"no part files of {out} (expected {out.name}.part-I-of-N beside it, written by "
                         "headcache extract --shard I/N)")
    if len(found) > 1:
        listing = ", ".join(f"{len(v)} of {n}" for n, v in sorted(found.items()))
        raise CacheError(f"{out}: part files of different shard counts lie beside it ({listing}); remove the "
                         "parts of the extraction you do not want")
    [(count, indexes)] = found.items()
    missing = [part_path(out, i, count) for i in range(count) if i not in indexes]
    if missing:
        raise CacheError(f"{out}: {len(missing)} of {count} parts are missing: {', '.join(map(str, missing))}; run "
                         f"headcache extract ... --shard I/{count} for each, then merge")
    return [part_path(out, i, count) for i in range(count)]


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def merge_parts(out: str | Path, *, keep_parts: bool = False, overwrite: bool = False) -> MergeResult:
    """Join the complete parts of ``out`` into one cache at ``out`` (NOTE [ Shards ]).

    Parameters
    ----------
    out : str or Path
        The cache to write; its parts are ``OUT.part-I-of-N`` beside it.
    keep_parts : bool
        Leave the part files in place (they are removed once the merged file is in place).
    overwrite : bool
        Replace an existing ``out``.

    Raises
    ------
    CacheError
        A part is missing, incomplete, damaged, or written by another backbone or setting.
    OutputExistsError
        ``out`` exists and ``overwrite`` is False.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it with the merged parts")
    parts = find_parts(out)
    readers = [CacheReader(path) for path in parts]
    try:
        attrs, splits = _check_parts(parts, readers)
        temporary = out.with_name(f".{out.name}.merging")
        sizes = {}
        with CacheWriter(temporary, attrs, overwrite=True) as writer:
            for name in splits:
                pieces = [reader.split(name) for reader in readers]
                total = sum(piece.n for piece in pieces)
                sizes[name] = total
                target = writer.split(name, total, pieces[0].pooled_names)
                for piece in pieces:
                    _copy(piece, target)
                target.finish()
    finally:
        for reader in readers:
            reader.close()
    os.replace(temporary, out)
    if not keep_parts:
        for path in parts:
            path.unlink()
    return MergeResult(out, parts, sizes, time.perf_counter() - started)


def _check_parts(parts: list[Path], readers: list[CacheReader]) -> tuple[dict, list[str]]:
    """The root attributes and splits the parts share; refuse parts that do not belong together."""
    first = readers[0]
    identity = ("backbone_fingerprint", "spec", "checkpoint_sha256", "hidden_dim", "dtype", "layers", "token_layers")
    for path, reader in zip(parts[1:], readers[1:]):
        differ = [key for key in identity if getattr(reader, key) != getattr(first, key)]
        if differ or reader.splits != first.splits:
            what = ", ".join(differ) if differ else f"splits {reader.splits} vs {first.splits}"
            raise CacheError(f"{path} does not belong with {parts[0]} (they differ in {what}): it was written by "
                             "another extraction; extract that shard again with the same command as the others")
    count = len(parts)
    for name in first.splits:
        pieces = [reader.split(name, require_complete=False) for reader in readers]
        for path, piece in zip(parts, pieces):
            if not piece.complete:
                raise CacheError(f"{path}: split {name!r} is incomplete ({piece.rows_written}/{piece.n}); rerun "
                                 "that shard's extract command to finish it, then merge")
        total = sum(piece.n for piece in pieces)
        for i, (path, piece) in enumerate(zip(parts, pieces)):
            start, stop = shard_bounds(total, i, count)
            if piece.n != stop - start:
                raise CacheError(f"{path}: split {name!r} holds {piece.n} sequences, but shard {i} of {count} of "
                                 f"{total} holds {stop - start}: the parts come from different data")
    attrs = {"backbone_fingerprint": first.backbone_fingerprint, "spec": first.spec,
             "checkpoint_sha256": first.checkpoint_sha256, "hidden_dim": first.hidden_dim, "dtype": first.dtype,
             "load_report": first.load_report, "layers": first.layers, "token_layers": first.token_layers,
             **{key: getattr(first, key) for key in ("amp", "num_classes", "class_names") if hasattr(first, key)}}
    return attrs, first.splits


def _copy(piece: Any, target: Any) -> None:
    """Append every sequence of one part's split to the merged split, MERGE_BLOCK sequences per write."""
    offsets = piece.offsets
    pooled_all = {name: piece.pooled(name, "all") for name in piece.pooled_names}
    for start in range(0, piece.n, MERGE_BLOCK):
        stop = min(start + MERGE_BLOCK, piece.n)
        tokens = piece.tokens(int(offsets[start]), int(offsets[stop]), layer="all")
        tokens = tokens.reshape(len(tokens), -1, piece.token_width("last"))  # (rows, Lt, D)
        cuts = (offsets[start + 1:stop] - offsets[start]).tolist()
        pooled = {name: matrix[start:stop] for name, matrix in pooled_all.items()}
        target.write(np.split(tokens, cuts), piece.labels[start:stop], piece.ids[start:stop], pooled)


# ---------------------------------------------------------------------------- torchrun


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Ranks:
    """The processes of a torchrun job, as work is spread over them: rank r takes items r, r + world, ...
    (`mine`), runs on its own GPU where there is one (`device`), and rank 0 collects (`gather`)."""

    rank: int
    world: int
    local_rank: int

    def mine(self, items: list) -> list:
        return items[self.rank::self.world]

    def device(self, config_device: str) -> str:
        return rank_device(config_device, self.local_rank)

    def gather(self, results: dict) -> dict | None:
        """The union of every rank's ``results`` on rank 0 (None on the others), sent as pickled objects."""
        import torch.distributed as dist

        gathered: list | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        return None if gathered is None else {key: value for part in gathered for key, value in part.items()}


@contextlib.contextmanager
def torchrun_ranks() -> Iterator[Ranks | None]:
    """The job's Ranks under torchrun (a gloo group: only small objects travel), else None."""
    world = torchrun_world()
    if world is None:
        yield None
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        yield Ranks(*world)
        # every rank's last messages delivered before any tears the group down: a rank that destroyed it
        # while rank 0 still received its results died in gloo ("terminate called without an active
        # exception", SIGABRT; seen once, in the two-rank sweep test)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_device(config_device: str, local_rank: int) -> str:
    """One GPU per rank: ``auto`` (or ``cuda``) becomes cuda:LOCAL_RANK where there is CUDA."""
    if config_device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return config_device


def agree(step: Callable[[], Any], rank: int, what: str) -> Any:
    """Run ``step`` on every rank; all ranks learn whether all succeeded (instead of a barrier that a failed
    rank never reaches). The failed rank raises its own error; the others a CacheError naming it."""
    import torch.distributed as dist

    try:
        result, error = step(), None
    except BaseException as exc:  # reported to the other ranks, then raised here
        result, error = None, exc
    failed = torch.tensor([-1 if error is None else rank])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed) >= 0:
        raise CacheError(f"the {what} failed on rank {int(failed)} (its message says why); rerun the same "
                         "torchrun command: every shard resumes where it stopped")
    return result
