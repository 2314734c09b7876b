"""Token blocks streamed from HDF5 under a memory budget, driven by an explicit epoch sampler.

- `EpochSampler` is the order of every training epoch: torch's
  ``RandomSampler(generator=...)`` + ``BatchSampler(drop_last=True)`` for a
  bank of K heads, checked against the batch size when built.
- `TokenStream` reads the token rows of a split that does not fit the memory
  budget from the file, block by block, with a prefetch thread (`_BlockReader`)
  reading into a few reused buffers (`_Buffers`).
- `gather_tokens` pads sequences of a flat token matrix into a batch: the
  in-memory gather, which a stream applies to its blocks.

NOTE [ Streaming tokens ]
A token split larger than what is left of the memory budget stays in the
file. It is cut into blocks of consecutive sequences. Random rows would mean
one small HDF5 read per sequence, so the sampler of such a split draws
block-aware orders (`block_order`): blocks in random order, rows shuffled
within each block. The sampler is built with the split's stream, and every
epoch it draws tells the stream which blocks each of its steps needs
(`TokenStream.expect`), so the stream knows the whole epoch's reads before the
first step: a prefetch thread reads them in that order, at most
PREFETCH_BLOCKS ahead, while the current step trains. A step keeps only the
blocks it uses, so a stream holds STREAM_FOOTPRINT blocks at most, whatever
the file's size, and none while another split is read; its block size is set
so that this footprint takes a third of the budget left, which keeps every
split together within the budget and leaves room for the batches gathered
from the blocks. Blocks are read into the same few reused buffers. Batches are
gathered exactly as from memory: under the same order, streamed and in-memory
features are equal, bit for bit. Requests outside the plan (evaluation reads
rows in order) restart the reader there, reading ahead. A source reading every
token layer (the "all" view) streams rows of Lt * D, the tokens of all its
layers side by side as the file stores them, and its blocks hold that many
fewer tokens for the same bytes.
"""
from __future__ import annotations

import atexit
import collections
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from headcache.errors import ConfigError
from headcache.pooling import TokenBatch
from headcache.store import CacheReader, SplitReader

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


class EpochSampler:
    """The batches of every training epoch of a bank of K heads, drawn from their own generators.

    Each epoch draws one order per head (``rows[k]`` shuffled by ``generators[k]``,
    as torch's ``RandomSampler(generator=...)``) and cuts it into ``len(self)``
    batches of ``batch_size``, dropping the incomplete last one (``drop_last``).
    Heads with the same rows and the same generator state share one order, and
    their batches are (B,) rows; otherwise (K, B). With ``blocks`` (or a
    ``stream``, which brings its own), the orders keep each block of the file
    together and the stream is told every epoch's reads before its first step
    (NOTE [ Streaming tokens ]). Everything is checked here, when built, not
    when the loop first asks.

    Parameters
    ----------
    rows : sequence of Tensor (N_k,) int64
        Each head's rows of the split.
    generators : sequence of torch.Generator
        Each head's order generator, drawn from once per epoch.
    batch_size : int
    split : str
        The split's name, for the messages.
    blocks : Tensor (n_blocks + 1,), optional
        Block bounds (`TokenStream.bounds`) that the orders keep together.
    stream : TokenStream, optional
        The split's stream: its blocks are kept together, and it is told each epoch's plan.

    Raises
    ------
    ConfigError
        batch_size below 1, fewer rows than one batch, rows and generators of different
        counts, or both ``blocks`` and ``stream``.
    """

    def __init__(self, rows: Sequence[Tensor], generators: Sequence[torch.Generator], *, batch_size: int,
                 split: str, blocks: Tensor | None = None, stream: TokenStream | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}; set --batch-size to 1 or more")
        if not rows or len(rows) != len(generators):
            raise ConfigError(f"an epoch sampler needs one generator per head's rows: got {len(rows)} row sets "
                              f"and {len(generators)} generators")
        if blocks is not None and stream is not None:
            raise ConfigError("give an epoch sampler blocks or a stream (whose bounds are its blocks), not both")
        fewest = min(len(r) for r in rows)
        if fewest < batch_size:
            raise ConfigError(f"split {split!r} has {fewest} items, fewer than batch_size {batch_size}; "
                              "lower --batch-size")
        self.rows, self.generators, self.batch_size, self.split = list(rows), list(generators), batch_size, split
        self.steps = fewest // batch_size
        self.stream = stream
        self.blocks = stream.bounds if stream is not None else blocks
        state = generators[0].get_state()
        self.shared = all(torch.equal(r, rows[0]) for r in rows) and all(
            torch.equal(g.get_state(), state) for g in generators)

    def __len__(self) -> int:
        """Steps per epoch: len(rows) // batch_size (drop_last)."""
        return self.steps

    def epoch(self) -> Tensor:
        """Draw the next epoch: its batches, (steps, B) rows for a shared order, else (steps, K, B).

        A stream learns here which blocks each step will read.
        """
        heads = self.generators[:1] if self.shared else self.generators
        used = self.steps * self.batch_size
        orders = [self._order(rows, generator)[:used].view(self.steps, self.batch_size)
                  for rows, generator in zip(self.rows, heads)]
        batches = orders[0] if self.shared else torch.stack(orders, dim=1)
        if self.stream is not None:
            self.stream.expect(self.step_blocks(batches))
        return batches

    def step_blocks(self, batches: Tensor) -> list[list[int]]:
        """The blocks each step of ``batches`` reads, in order of first use (as `TokenStream.batch` takes them)."""
        if self.blocks is None:
            return []
        block = torch.bucketize(batches, self.blocks[1:], right=True).view(len(batches), -1)
        return [list(dict.fromkeys(step)) for step in block.tolist()]

    def _order(self, rows: Tensor, generator: torch.Generator) -> Tensor:
        if self.blocks is None:
            return rows[torch.randperm(len(rows), generator=generator)]
        return block_order(self.blocks, rows, generator)


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
    width : int
        The width of a token row: D for one layer's tokens, Lt * D for every token layer's
        (`SplitReader.token_width`).
    dtype : str
        The cache dtype (blocks stay in it; batches are float32).
    block_tokens : int
        Tokens per block (a longer sequence gets a block of its own).
    device : torch.device
    layer : int or str, optional
        Which token layers to read (`SplitReader.tokens`'s ``layer``: an id, "last" or "all").
    """

    def __init__(self, path: Path, parts: list[tuple[str, int]], offsets: Tensor, width: int, dtype: str,
                 block_tokens: int, device: torch.device, layer: int | str = "last"):
        self.path, self.offsets, self.width, self.device, self.layer = path, offsets, width, device, layer
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
        self.buffers = _Buffers(widest, width, getattr(torch, dtype), pinned=device.type == "cuda")
        self._expected: list[int] | None = None  # the reads of the epoch the sampler drew last, not yet started
        self._resident: dict[int, tuple[Tensor, Tensor | None]] = {}  # block -> (its rows, its host buffer)
        self._reader: _BlockReader | None = None

    def expect(self, step_blocks: list[list[int]]) -> None:
        """Plan the reads of the epoch whose steps need ``step_blocks`` (from `EpochSampler.epoch`).

        A step keeps only the blocks it uses, so a block is read again only when a step needs it
        and the step before did not. Reading starts with the epoch's first batch.
        """
        plan: list[int] = []
        held: set[int] = set()
        for needed in step_blocks:
            plan += [b for b in needed if b not in held]
            held = set(needed)
        self._expected = plan

    def batch(self, rows: Tensor) -> TokenBatch:
        """rows (B,) or (K, B) on the CPU -> a TokenBatch on the device, equal to the in-memory gather."""
        if self._expected is not None:  # the first batch of a drawn epoch: read its blocks from here on
            self._start(self._expected)
            self._expected = None
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
        hidden = torch.zeros(*rows.shape, longest, self.width, device=self.device)
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

    def _start(self, plan: list[int]) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None
        if plan:
            self._reader = _BlockReader(self.path, self.blocks, plan, self.buffers, self.device, self.layer)

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

    def __init__(self, path: Path, blocks: list[tuple], plan: list[int], buffers: _Buffers, device: torch.device,
                 layer: int | str):
        self.plan, self.position, self.buffers, self.device, self.layer = plan, 0, buffers, device, layer
        self.ready: queue.Queue = queue.Queue(maxsize=PREFETCH_BLOCKS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(path, blocks), daemon=True)
        _LIVE_READERS.add(self)
        self.thread.start()

    def _run(self, path: Path, blocks: list[tuple]) -> None:
        try:
            with CacheReader(path) as reader:
                splits: dict[str, SplitReader] = {}  # each part's reader, opened once for the whole plan
                for b in self.plan:
                    if self.stop.is_set():
                        return
                    name, start, stop = blocks[b][:3]
                    if name not in splits:
                        splits[name] = reader.split(name)
                    buffer = self.buffers.acquire()
                    splits[name].tokens(start, stop, layer=self.layer, out=buffer.numpy())
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
