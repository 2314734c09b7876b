"""Feature sources: what the training loop reads. Two of them, one interface.

A source answers "the features of these items of this split" and nothing
else: it never shuffles (batch order comes from the sampler in train.py).

- `CachedFeatures` reads the HDF5 cache. Parameter-free pools were computed
  at extraction, so it hands out rows of an (N, D) matrix held on the device;
  the learnable pool gets per-token features gathered from the flat token
  matrix held on the device when it fits the memory budget, or streamed from
  the file block by block when it does not (NOTE [ Streaming tokens ] in
  stream.py). Each source also builds the epoch sampler of a split
  (`sampler`): a streamed split's keeps the file's blocks together.
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

Split names: "a+b" reads splits a and b concatenated (used by cross-validation).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from headcache.devices import to_device
from headcache.pooling import TokenBatch, check_pool_name, head_inputs, is_learnable
from headcache.store import CacheReader
from headcache.stream import MIN_BLOCK_BYTES, STREAM_FOOTPRINT, STREAM_SHARE, EpochSampler, TokenStream, gather_tokens

EVAL_ROWS = 256  # items per evaluation chunk of pooled features
TOKEN_EVAL_ROWS = 64  # of token features: (64, T, D) float32 chunks stay a few MB, not tens
MEMORY_SHARE = 0.5  # default budget: this share of the free RAM (or free device memory)
FALLBACK_RAM = 4 << 30  # assumed available RAM where the system does not say


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
        fit what is left is streamed from the file (NOTE [ Streaming tokens ] in
        stream.py). Default: `default_memory_budget`.
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
            self.num_classes = getattr(reader, "num_classes", None)  # recorded from schema 2 on
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

    def sampler(self, split: str, rows: Sequence[Tensor], generators: Sequence[torch.Generator], *,
                batch_size: int) -> EpochSampler:
        """The epoch sampler of ``rows`` (one per head) of ``split``; a streamed split's keeps its blocks
        together and plans its stream's reads (NOTE [ Streaming tokens ] in stream.py)."""
        return EpochSampler(rows, generators, batch_size=batch_size, split=split,
                            stream=self._split(split).get("stream"))

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

    def sampler(self, split: str, rows: Sequence[Tensor], generators: Sequence[torch.Generator], *,
                batch_size: int) -> EpochSampler:
        """The epoch sampler of ``rows`` (one per head) of ``split``: a plain shuffle per head."""
        return EpochSampler(rows, generators, batch_size=batch_size, split=split)

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
