"""Feature sources: what the training loop reads. Two of them, one interface.

A source answers "the features of these items of this split" and nothing
else: it never shuffles (batch order comes from the sampler in train.py).

- `CachedFeatures` reads the HDF5 cache. Parameter-free pools were computed
  at extraction, so it hands out rows of an (N, D) matrix held on the device;
  the learnable pool gets per-token features gathered from the flat token
  matrix held on the device when it fits the memory budget, or streamed from
  the file block by block when it does not (NOTE [ Streaming tokens ]).
- `LiveFeatures` runs the frozen backbone on every request, as end-to-end
  training does: spec.dataset -> spec.collate -> spec.encode.

NOTE [ Equivalence principle ]
For a deterministic frozen backbone, training from the cache is the same
computation as training with the backbone in the loop. Both sources give the
same features for the same (split, indices), so the one loop in train.py
produces the same batches, losses and weights from either; the tests prove it.

NOTE [ Float16 rounding in the live source ]
The cache stores tokens in its dtype (float16 by default) and computes the
stored pools from the rounded tokens in float32. The live source rounds the
backbone's output through the same dtype before pooling, so the equivalence
holds for float16 caches too. Both sides do this in one function
(NOTE [ One seam ] in pooling.py).

NOTE [ Streaming tokens ]
A token split larger than what is left of the memory budget stays in the
file. It is cut into blocks of consecutive sequences. Random rows would mean
one small HDF5 read per sequence, so such a split proposes its own epoch
order (`epoch_order`): blocks in random order, rows shuffled within each
block. From the orders of an epoch and the first batch's size, the stream
knows which blocks each step needs, and a prefetch thread reads them in that
order, at most PREFETCH_BLOCKS ahead, while the current step trains. A step
keeps only the blocks it uses, so a stream holds STREAM_FOOTPRINT blocks at
most, whatever the file's size, and none while another split is read; its
block size is set so that this footprint takes a third of the budget left,
which keeps every split together within the budget and leaves room for the
batches gathered from the blocks. Blocks are read into the same few reused
buffers. Batches are gathered exactly as from memory: under the same order,
streamed and in-memory features are equal, bit for bit. Requests outside the
plan (evaluation reads rows in order) restart the reader there, reading ahead.

Split names: "a+b" reads splits a and b concatenated (used by cross-validation).
"""
from __future__ import annotations

import atexit
import collections
import os
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from headcache.devices import to_device
from headcache.pooling import TokenBatch, check_pool_name, head_inputs, is_learnable
from headcache.store import CacheReader

EVAL_ROWS = 256  # items per evaluation chunk of pooled features
TOKEN_EVAL_ROWS = 64  # of token features: (64, T, D) float32 chunks stay a few MB, not tens
MEMORY_SHARE = 0.5  # default budget: this share of the free RAM (or free device memory)
FALLBACK_RAM = 4 << 30  # assumed available RAM where the system does not say
PREFETCH_BLOCKS = 2  # blocks read ahead of the step that needs them
STREAM_FOOTPRINT = 2 + PREFETCH_BLOCKS + 1  # blocks a stream holds: a step's 2, the queue, one being read
STREAM_SHARE = 3  # a stream's footprint is 1 / STREAM_SHARE of the budget left when it opens
MIN_BLOCK_BYTES = 1 << 20  # below this, HDF5 reads get slow (chunks are about 1 MiB)


def gather_tokens(tokens: Tensor, offsets: Tensor, rows: Tensor) -> TokenBatch:
    """Pad the sequences ``rows`` of a flat token matrix into a batch, with one gather.

    tokens (sum T_i, D), offsets (N + 1,), rows (...) -> hidden (..., T_max, D) float32,
    zero at padded positions; T_max is the longest of ``rows`` (0 when all are empty).
    """
    starts, stops = offsets[rows], offsets[rows + 1]
    lengths = stops - starts
    longest = int(lengths.max()) if lengths.numel() else 0  # the one host sync: the batch's shape
    steps = torch.arange(longest, device=tokens.device)
    mask = steps < lengths.unsqueeze(-1)
    positions = torch.where(mask, starts.unsqueeze(-1) + steps, 0)
    # index_select on the flat positions: one contiguous gather, faster than advanced indexing on CPU
    hidden = tokens.index_select(0, positions.flatten()).view(*positions.shape, tokens.shape[-1])
    return TokenBatch(hidden.float().masked_fill_(~mask.unsqueeze(-1), 0.0), mask)


def default_memory_budget(device: torch.device) -> int:
    """MEMORY_SHARE of the free device memory (CUDA) or of the available RAM (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_SHARE)
    return int(_available_ram() * MEMORY_SHARE)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as handle:  # MemAvailable counts reclaimable page cache, unlike free pages
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS knows only the total
        try:
            return os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):  # no sysconf at all on Windows
            continue
    return FALLBACK_RAM


def block_order(block_bounds: Tensor, rows: Tensor, generator: torch.Generator) -> Tensor:
    """``rows`` in a random order that keeps each block's rows together (NOTE [ Streaming tokens ]).

    block_bounds (n_blocks + 1,): block j holds rows [block_bounds[j], block_bounds[j+1]).
    The blocks come in random order, rows in random order within each block.
    """
    block = torch.bucketize(rows, block_bounds[1:], right=True)
    block_rank = torch.randperm(len(block_bounds) - 1, generator=generator)
    within = torch.randperm(len(rows), generator=generator)
    key = block_rank[block] * len(rows) + within  # sort by (block's rank, random tie-break)
    return rows[torch.argsort(key)]


class CachedFeatures:
    """Features read from a headcache cache, held on ``device`` (or streamed, for tokens).

    Parameters
    ----------
    path : str or Path
        The cache file.
    pool : str
        The pool the heads use; a parameter-free one reads ``pooled/<pool>``,
        ``learned`` reads the tokens.
    device : torch.device
    expected_fingerprint : str, optional
        Refuse a cache written by another backbone.
    memory_budget : int, optional
        Bytes the token matrices may take on ``device``; a split that does not
        fit what is left is streamed from the file (NOTE [ Streaming tokens ]).
        Default: `default_memory_budget`.
    block_bytes : int, optional
        Size of a streamed block (default: from the budget left, see the NOTE).
    """

    def __init__(self, path: str | Path, *, pool: str, device: torch.device,
                 expected_fingerprint: str | None = None, memory_budget: int | None = None,
                 block_bytes: int | None = None):
        self.path, self.pool, self.device = Path(path), pool, device
        self.tokens_needed = is_learnable(pool)
        self.eval_rows = TOKEN_EVAL_ROWS if self.tokens_needed else EVAL_ROWS
        with CacheReader(self.path, expected_fingerprint=expected_fingerprint) as reader:
            self.hidden_dim = reader.hidden_dim
            self.dtype = reader.dtype
            self.backbone_fingerprint = reader.backbone_fingerprint
            self.splits = tuple(reader.splits)
        self.memory_budget = default_memory_budget(device) if memory_budget is None else memory_budget
        self.block_bytes = block_bytes
        self.reserved_bytes = 0  # token bytes held (or reserved by streams) on the device
        self._loaded: dict[str, dict[str, Any]] = {}
        self._reading: str | None = None  # the split batches came from last

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self._loaded:
            with CacheReader(self.path) as reader:
                parts = [reader.split(name) for name in split.split("+")]
                self._loaded[split] = self._load(parts)
        return self._loaded[split]

    def _load(self, parts: list) -> dict[str, Any]:
        loaded = {"labels": torch.from_numpy(np.concatenate([p.labels for p in parts])).to(self.device),
                  "ids": [i for p in parts for i in p.ids]}
        if not self.tokens_needed:
            loaded["pooled"] = torch.from_numpy(np.concatenate([p.pooled(self.pool) for p in parts])).to(self.device)
            return loaded
        shifts = np.cumsum([0] + [p.num_tokens for p in parts])
        offsets = torch.from_numpy(np.concatenate([parts[0].offsets[:1]] + [
            p.offsets[1:] + shift for p, shift in zip(parts, shifts)]))
        itemsize = np.dtype(self.dtype).itemsize
        size = int(shifts[-1]) * self.hidden_dim * itemsize
        if self.reserved_bytes + size <= self.memory_budget:
            self.reserved_bytes += size
            tokens = [torch.from_numpy(p.tokens()).to(self.device) for p in parts]
            loaded["tokens"] = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
            loaded["offsets"] = offsets.to(self.device)
            return loaded
        left = max(0, self.memory_budget - self.reserved_bytes)
        block_bytes = self.block_bytes or max(MIN_BLOCK_BYTES, left // (STREAM_SHARE * STREAM_FOOTPRINT))
        self.reserved_bytes += STREAM_FOOTPRINT * block_bytes
        loaded["stream"] = TokenStream(self.path, [(p.name, p.n) for p in parts], offsets, self.hidden_dim,
                                       self.dtype, max(1, block_bytes // (self.hidden_dim * itemsize)), self.device)
        return loaded

    def streamed(self, split: str) -> bool:
        """Whether ``split``'s tokens are read from the file rather than held in memory."""
        return "stream" in self._split(split)

    def labels(self, split: str) -> Tensor:
        return self._split(split)["labels"]

    def ids(self, split: str) -> list[str]:
        return self._split(split)["ids"]

    def epoch_order(self, split: str, rows: Tensor, generator: torch.Generator) -> Tensor:
        """The order of one epoch over ``rows``: a plain shuffle, or blocks for a streamed split."""
        data = self._split(split)
        if "stream" in data:
            return data["stream"].order(rows, generator)
        return rows[torch.randperm(len(rows), generator=generator)]

    def batch(self, split: str, rows: Tensor) -> Tensor | TokenBatch:
        """Features of ``rows`` (B,) or (K, B): pooled (..., D) or a TokenBatch."""
        data = self._split(split)
        if split != self._reading:  # a stream holds blocks only while its split is read
            previous = self._loaded.get(self._reading, {}).get("stream")
            if previous is not None:
                previous.release()
            self._reading = split
        if "stream" in data:
            return data["stream"].batch(rows.cpu())
        rows = rows.to(self.device)
        if self.tokens_needed:
            return gather_tokens(data["tokens"], data["offsets"], rows)
        # index_select: one contiguous gather of whole rows, faster than advanced indexing on CPU
        return data["pooled"].index_select(0, rows.flatten()).view(*rows.shape, self.hidden_dim)


class TokenStream:
    """The token rows of one (possibly concatenated) split, read from the file block by block.

    See NOTE [ Streaming tokens ]. Blocks never cross a part of a concatenated
    split. At most 2K + PREFETCH_BLOCKS + 1 blocks are held at once (K: orders
    per step, 1 unless the heads of a bank train in different orders).

    Parameters
    ----------
    path : Path
        The cache file.
    parts : list of (split name, sequences)
        The parts of the split, in order.
    offsets : Tensor (N + 1,) int64
        Token offsets over all parts (part p starts at the row after p - 1's last).
    hidden_dim : int
    dtype : str
        The cache dtype (blocks stay in it; batches are float32).
    block_tokens : int
        Tokens per block (a longer sequence gets a block of its own).
    device : torch.device
    """

    def __init__(self, path: Path, parts: list[tuple[str, int]], offsets: Tensor, hidden_dim: int, dtype: str,
                 block_tokens: int, device: torch.device):
        self.path, self.offsets, self.hidden_dim, self.device = path, offsets, hidden_dim, device
        ends = offsets.numpy()
        bounds, self.blocks, first = [0], [], 0
        for name, n in parts:
            start = first
            while start < first + n:  # greedy: as many whole sequences as fit block_tokens, at least one
                stop = int(np.searchsorted(ends, ends[start] + block_tokens, side="right")) - 1
                stop = min(max(stop, start + 1), first + n)
                # (part, its token rows, first row of the block, first token of the block)
                self.blocks.append((name, int(ends[start] - ends[first]), int(ends[stop] - ends[first]), start,
                                    int(ends[start])))
                bounds.append(stop)
                start = stop
            first += n
        self.bounds = torch.tensor(bounds)
        widest = max((stop - start for _, start, stop, _, _ in self.blocks), default=0)
        self.buffers = _Buffers(widest, hidden_dim, getattr(torch, dtype), pinned=device.type == "cuda")
        self._orders: list[Tensor] = []
        self._resident: dict[int, tuple[Tensor, Tensor | None]] = {}  # block -> (its rows, its host buffer)
        self._reader: _BlockReader | None = None

    def order(self, rows: Tensor, generator: torch.Generator) -> Tensor:
        """A block-aware order of ``rows``; remembered to plan the reads of the epoch."""
        order = block_order(self.bounds, rows, generator)
        self._orders.append(order)
        return order

    def batch(self, rows: Tensor) -> TokenBatch:
        """rows (B,) or (K, B) on the CPU -> a TokenBatch on the device, equal to the in-memory gather."""
        if self._orders:  # the first batch of an epoch: plan its reads from the proposed orders
            self._start(self._plan(rows))
        block = torch.bucketize(rows, self.bounds[1:], right=True)
        needed = list(dict.fromkeys(block.flatten().tolist()))  # in order of first use, as planned
        self._keep(needed)
        for b in needed:
            if b not in self._resident:
                self._resident[b] = self._take(b)
        if len(needed) == 1:  # the common case: the whole batch lies in one block
            return self._gather(needed[0], rows)
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        longest = int(lengths.max()) if lengths.numel() else 0
        hidden = torch.zeros(*rows.shape, longest, self.hidden_dim, device=self.device)
        mask = torch.zeros(*rows.shape, longest, dtype=torch.bool, device=self.device)
        for b in needed:
            where = block == b
            part = self._gather(b, rows[where])
            where = where.to(self.device)
            hidden[where, :part.hidden.shape[-2]] = part.hidden
            mask[where, :part.mask.shape[-1]] = part.mask
        return TokenBatch(hidden, mask)

    def release(self) -> None:
        """Drop the blocks held and their buffers, and stop reading (the next request reads again)."""
        self._start([])
        self._keep([])
        self.buffers.free.clear()

    def _keep(self, blocks: list[int]) -> None:
        """Hold only ``blocks``; the buffers of the others go back to be read into again."""
        for b in [b for b in self._resident if b not in blocks]:
            _, buffer = self._resident.pop(b)
            if buffer is not None:
                self.buffers.release(buffer)

    def _gather(self, b: int, rows: Tensor) -> TokenBatch:
        first_row, first_token = self.blocks[b][3:]
        local = self.offsets[first_row:int(self.bounds[b + 1]) + 1] - first_token
        return gather_tokens(self._resident[b][0], local.to(self.device), (rows - first_row).to(self.device))

    def _plan(self, rows: Tensor) -> list[int]:
        """The blocks the epoch's steps will load, in order: each step keeps only the blocks it uses."""
        orders, self._orders = self._orders, []
        if rows.dim() == 1:  # heads sharing one order: the loop hands out windows of the first
            orders = orders[:1]
        if len(orders) != (1 if rows.dim() == 1 else rows.shape[0]):
            return []  # not the loop's pattern: read on demand
        size = rows.shape[-1]
        blocks = [torch.bucketize(o, self.bounds[1:], right=True).tolist() for o in orders]
        plan: list[int] = []
        held: set[int] = set()
        for start in range(0, min(len(b) for b in blocks) // size * size, size):
            needed = list(dict.fromkeys(x for b in blocks for x in b[start:start + size]))
            plan += [x for x in needed if x not in held]
            held = set(needed)
        return plan

    def _start(self, plan: list[int]) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = _BlockReader(self.path, self.blocks, plan, self.buffers, self.device) if plan else None

    def _take(self, b: int) -> tuple[Tensor, Tensor | None]:
        """Block b from the reader; a request outside its plan restarts it there, reading ahead in order."""
        if self._reader is None or not self._reader.next_is(b):
            self._start(list(range(b, len(self.blocks))))
        return self._reader.take()


class _Buffers:
    """Host buffers a stream reads its blocks into, reused all along.

    A fresh array per block made the allocator's heap creep (measured: +60 MB
    beyond the blocks over one epoch); the same few buffers keep memory flat.
    On CUDA they are pinned (so copies to the GPU run asynchronously), and a
    buffer is read into again only once its copy has finished.
    """

    def __init__(self, rows: int, dim: int, dtype: torch.dtype, pinned: bool):
        self.shape, self.dtype, self.pinned = (rows, dim), dtype, pinned
        self.free: collections.deque = collections.deque()  # (buffer, copy-done event); deque: thread-safe

    def acquire(self) -> Tensor:
        try:
            buffer, copied = self.free.popleft()
        except IndexError:
            return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pinned)
        if copied is not None:
            copied.synchronize()  # the asynchronous copy out of this buffer has finished
        return buffer

    def release(self, buffer: Tensor, copied: Any = None) -> None:
        if len(self.free) < STREAM_FOOTPRINT:
            self.free.append((buffer, copied))


class _BlockReader:
    """Reads the blocks of a plan in a background thread, at most PREFETCH_BLOCKS ahead.

    Only this thread touches the file while it runs (h5py serialises HDF5 calls under one lock).
    A reader still running when Python exits is stopped first (`_stop_readers`): a daemon thread
    frozen inside an HDF5 call would keep h5py's lock, and the exit would wait for it forever.
    """

    def __init__(self, path: Path, blocks: list[tuple], plan: list[int], buffers: _Buffers, device: torch.device):
        self.plan, self.position, self.buffers, self.device = plan, 0, buffers, device
        self.ready: queue.Queue = queue.Queue(maxsize=PREFETCH_BLOCKS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(path, blocks), daemon=True)
        _LIVE_READERS.add(self)
        self.thread.start()

    def _run(self, path: Path, blocks: list[tuple]) -> None:
        try:
            with CacheReader(path) as reader:
                splits: dict[str, Any] = {}
                for b in self.plan:
                    if self.stop.is_set():
                        return
                    name, start, stop = blocks[b][:3]
                    split = splits.setdefault(name, reader.split(name))
                    buffer = self.buffers.acquire()
                    split.tokens(start, stop, out=buffer.numpy())
                    self.ready.put((buffer, stop - start))
        except BaseException as exc:  # handed to the training thread by take()
            self.ready.put(exc)

    def next_is(self, b: int) -> bool:
        return self.position < len(self.plan) and self.plan[self.position] == b

    def take(self) -> tuple[Tensor, Tensor | None]:
        """The next block: (its rows on the device, the host buffer to release when done with them)."""
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        self.position += 1
        buffer, rows = item
        if self.device.type != "cuda":
            return buffer[:rows], buffer
        block = buffer[:rows].to(self.device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.buffers.release(buffer, copied)
        return block, None

    def close(self) -> None:
        """Stop reading; a put blocked on the full queue is released by draining it."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                item = self.ready.get(timeout=0.01)
            except queue.Empty:
                continue
            if isinstance(item, tuple):
                self.buffers.release(item[0])
        self.thread.join()
        _LIVE_READERS.discard(self)


_LIVE_READERS: weakref.WeakSet = weakref.WeakSet()  # readers whose thread may still run


@atexit.register
def _stop_readers() -> None:
    for reader in list(_LIVE_READERS):
        reader.close()


class LiveFeatures:
    """Features computed by the frozen backbone on every request (end-to-end training).

    Parameters
    ----------
    spec : object
        The spec (see headcache.spec).
    backbone : nn.Module
        The loaded, frozen backbone, already on ``device``.
    pool : str
        As for `CachedFeatures`.
    dtype : {"float16", "float32"}
        The cache dtype to round through (NOTE [ Float16 rounding in the live source ]).
    device : torch.device
    """

    def __init__(self, spec: Any, backbone: nn.Module, *, pool: str, dtype: str, device: torch.device,
                 eval_rows: int = 64):
        self.spec, self.backbone, self.pool, self.dtype, self.device = spec, backbone, pool, dtype, device
        check_pool_name(pool)  # an unknown pool is refused when the source is built, not at its first batch
        self.eval_rows = eval_rows
        self._datasets: dict[str, Any] = {}
        self._labels: dict[str, Tensor] = {}

    def _dataset(self, split: str):
        if split not in self._datasets:
            self._datasets[split] = self.spec.dataset(split)
        return self._datasets[split]

    def labels(self, split: str) -> Tensor:
        if split not in self._labels:
            dataset = self._dataset(split)
            known = getattr(dataset, "labels", None)
            if callable(known):
                known = known()
            # a dataset that lists its labels spares reading every item once
            values = known if isinstance(known, Sequence) else [dataset[i][1] for i in range(len(dataset))]
            self._labels[split] = torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)
        return self._labels[split]

    def batch(self, split: str, rows: Tensor) -> Tensor | TokenBatch:
        shape = rows.shape
        unique, inverse = torch.unique(rows.flatten().cpu(), return_inverse=True)
        dataset = self._dataset(split)
        inputs = [dataset[int(i)][0] for i in unique]
        batch = to_device(self.spec.collate(inputs), self.device)
        with torch.no_grad():
            hidden, mask = self.spec.encode(self.backbone, batch)
            # rounded and pooled as extraction did for the cache: NOTE [ One seam ] in pooling.py
            features = head_inputs(hidden, mask, pool=self.pool, dtype=self.dtype)
            inverse = inverse.to(self.device).view(shape)
            if isinstance(features, TokenBatch):
                return TokenBatch(features.hidden[inverse], features.mask[inverse])
            return features[inverse]
