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

Layers: a source has a layer VIEW, which it is built with. One layer id (or
"last") gives exactly the features of a one-layer cache of that layer: pooled
(.., D), or a TokenBatch (.., T, D). "all" keeps a layer axis for a `LayerMix`
(pooling.py): pooled (.., L, D), or a TokenBatch whose hidden is (.., L, T, D).
`source.layers` lists the layer ids of the view, in the order of that axis. A
parameter-free pool reads the layers that were pooled (the cache's `layers`),
the learned pool the layers whose tokens were kept (`token_layers`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from headcache.devices import to_device
from headcache.errors import CacheError, ConfigError
from headcache.pooling import TokenBatch, check_pool_name, head_inputs, is_learnable
from headcache.spec import encode_checked, spec_layers
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


LayerView = int | str  # a layer id, "last" or "all" (NOTE at the top of this module)


def as_layer(value: int | str) -> int | str:
    """A layer id or a word from its text (``--layer 3``, a config's ``layer``): "3" -> 3, "-1" -> -1;
    anything else (an int, "last", "mix", "all") is returned as it is."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return value


def view_layers(view: LayerView, layers: Sequence[int], token_layers: Sequence[int], *, learned: bool,
                where: str = "the cache") -> list[int]:
    """The layer ids of ``view`` over what can be read: ``layers`` (pooled) for a parameter-free pool,
    ``token_layers`` for the learned pool. An id (or its text) -> [id]; "last" -> [the last]; "all" -> all.

    Raises
    ------
    ConfigError
        An id that cannot be read, naming --layer and the ids that can; for the learned pool, also
        the pooled layers it cannot read and how to keep their tokens.
    """
    view = as_layer(view)
    available = list(token_layers if learned else layers)
    if view == "all":
        return available
    if view == "last":
        return available[-1:]
    if not isinstance(view, int) or isinstance(view, bool):
        raise ConfigError(f"--layer {view!r}: a layer view is a layer id, last or all")
    if view in available:
        return [view]
    ids = ", ".join(map(str, available))
    if learned and view in layers:
        raise ConfigError(f"--layer {view}: the learned pool reads per-token states, and {where} keeps them for "
                          f"layer{'s' * (len(available) > 1)} {ids} only (layer {view} was pooled, not kept per "
                          f"token); pick one of {ids}, last or mix, or extract again with --token-layers naming "
                          f"{view}")
    raise ConfigError(f"--layer {view}: {where} has no layer {view}; its layers are {ids} "
                      "(or give --layer last or mix)")


def _layer_axis(batch: TokenBatch, layers: int) -> TokenBatch:
    """A TokenBatch of rows holding every token layer side by side (.., T, Lt * D) -> hidden (.., Lt, T, D)."""
    hidden = batch.hidden
    return TokenBatch(hidden.view(*hidden.shape[:-1], layers, -1).movedim(-2, -3), batch.mask)


class _LayerView:
    """A source's layer view (see the top of this module): ``layers``, the ids it gives in order,
    ``layered``, whether its features keep a layer axis ("all"), and where a head finds its layer."""

    def _set_view(self, layer: LayerView, pooled_layers: Sequence[int], token_layers: Sequence[int], *,
                  learned: bool, where: str) -> None:
        self.pooled_layers, self.token_layers = list(pooled_layers), list(token_layers)
        self._learned, self._where = learned, where
        self.layers = view_layers(layer, self.pooled_layers, self.token_layers, learned=learned, where=where)
        self.layered = as_layer(layer) == "all"

    def position(self, layer: int | str) -> int:
        """Where a head reading ``layer`` (an id, its text, or "last") finds it along the view's layers.

        Raises
        ------
        ConfigError
            The pool cannot read that layer (`view_layers`), or this view does not hold it.
        """
        if as_layer(layer) in ("all", "mix"):
            raise ValueError(f"{layer!r} is not one layer")
        [wanted] = view_layers(layer, self.pooled_layers, self.token_layers, learned=self._learned, where=self._where)
        if wanted not in self.layers:
            raise ConfigError(f"--layer {layer}: this feature source was opened on layer "
                              f"{', '.join(map(str, self.layers))} only; open it with layer=\"all\" (or {wanted})")
        return self.layers.index(wanted)


class CachedFeatures(_LayerView):
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
    layer : int or str, optional
        The layer view (see the top of this module): a layer id (or its text), "last" (default) or "all".

    Raises
    ------
    ConfigError
        ``layer`` names a layer the pool cannot read from this cache (`view_layers`).
    """

    def __init__(self, path: str | Path, *, pool: str, device: torch.device,
                 expected_fingerprint: str | None = None, memory_budget: int | None = None,
                 block_bytes: int | None = None, layer: LayerView = "last"):
        self.path, self.pool, self.device = Path(path), pool, device
        self.tokens_needed = is_learnable(pool)
        self.eval_rows = TOKEN_EVAL_ROWS if self.tokens_needed else EVAL_ROWS
        with CacheReader(self.path, expected_fingerprint=expected_fingerprint) as reader:
            self.hidden_dim = reader.hidden_dim
            self.dtype = reader.dtype
            self.backbone_fingerprint = reader.backbone_fingerprint
            self.num_classes = getattr(reader, "num_classes", None)  # recorded from schema 2 on
            self.splits = tuple(reader.splits)
            self._set_view(layer, reader.layers, reader.token_layers, learned=self.tokens_needed, where="the cache")
            if reader.shard is not None:  # 1/N of every split: training on it would silently use part of the data
                index, count = reader.shard
                raise CacheError(f"{self.path} is part {index} of {count} of a sharded extraction (--shard): it "
                                 f"holds 1/{count} of every split; join the parts into one cache first "
                                 "(headcache merge CACHE.h5, the path without its .part-I-of-N suffix)")
        self._read = "all" if self.layered else self.layers[0]  # the store's layer argument
        self.width = self.hidden_dim * len(self.layers) if self.layered else self.hidden_dim  # of a token row
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
            loaded["pooled"] = torch.from_numpy(np.concatenate([p.pooled(self.pool, layer=self._read)
                                                                for p in parts])).to(self.device)
            return loaded
        shifts = np.cumsum([0] + [p.num_tokens for p in parts])
        offsets = torch.from_numpy(np.concatenate([parts[0].offsets[:1]] + [
            p.offsets[1:] + shift for p, shift in zip(parts, shifts)]))
        itemsize = np.dtype(self.dtype).itemsize
        size = int(shifts[-1]) * self.width * itemsize
        if self.reserved_bytes + size <= self.memory_budget:
            self.reserved_bytes += size
            tokens = [torch.from_numpy(p.tokens(layer=self._read)).to(self.device) for p in parts]
            loaded["tokens"] = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
            loaded["offsets"] = offsets.to(self.device)
            return loaded
        left = max(0, self.memory_budget - self.reserved_bytes)
        block_bytes = self.block_bytes or max(MIN_BLOCK_BYTES, left // (STREAM_SHARE * STREAM_FOOTPRINT))
        self.reserved_bytes += STREAM_FOOTPRINT * block_bytes
        loaded["stream"] = TokenStream(self.path, [(p.name, p.n) for p in parts], offsets, self.width, self.dtype,
                                       max(1, block_bytes // (self.width * itemsize)), self.device, self._read)
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
        """Features of ``rows`` (B,) or (K, B): pooled (..., D) or a TokenBatch (..., T, D); in the "all" view
        pooled (..., L, D) or a TokenBatch (..., L, T, D)."""
        data = self._split(split)
        if split != self._reading:  # a stream holds blocks only while its split is read
            previous = self._loaded.get(self._reading, {}).get("stream")
            if previous is not None:
                previous.release()
            self._reading = split
        if self.tokens_needed:
            if "stream" in data:
                tokens = data["stream"].batch(rows.cpu())
            else:
                tokens = gather_tokens(data["tokens"], data["offsets"], rows.to(self.device))
            return _layer_axis(tokens, len(self.layers)) if self.layered else tokens
        pooled = data["pooled"]
        # index_select: one contiguous gather of whole rows, faster than advanced indexing on CPU
        return pooled.index_select(0, rows.to(self.device).flatten()).view(*rows.shape, *pooled.shape[1:])


class LiveFeatures(_LayerView):
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
    layer : int or str, optional
        The layer view, as for `CachedFeatures`, over the spec's ``layers`` (a spec without them has one
        layer, id -1).
    token_layers : sequence of int, optional
        The layers the learned pool may read (default: all the spec's); give a cache's ``token_layers``
        to read what that cache can.

    Raises
    ------
    ConfigError
        ``layer`` names a layer the pool cannot read (`view_layers`), or ``token_layers`` are not
        layers of the spec.
    """

    def __init__(self, spec: Any, backbone: nn.Module, *, pool: str, dtype: str, device: torch.device,
                 eval_rows: int = 64, layer: LayerView = "last", token_layers: Sequence[int] | None = None):
        self.spec, self.backbone, self.pool, self.dtype, self.device = spec, backbone, pool, dtype, device
        check_pool_name(pool)  # an unknown pool is refused when the source is built, not at its first batch
        self.eval_rows = eval_rows
        ids = spec_layers(spec)
        token_layers = list(ids if token_layers is None else token_layers)
        if not token_layers or any(i not in ids for i in token_layers):
            raise ConfigError(f"token layers {token_layers} are not layers of the spec ({', '.join(map(str, ids))})")
        self._set_view(layer, ids, token_layers, learned=is_learnable(pool), where="the spec")
        positions = [ids.index(i) for i in self.layers]  # along encode's layer axis
        self._positions = positions if self.layered else positions[0]
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
        """Features of ``rows`` (B,) or (K, B), as `CachedFeatures.batch` gives them for the same view."""
        shape = rows.shape
        unique, inverse = torch.unique(rows.flatten().cpu(), return_inverse=True)
        dataset = self._dataset(split)
        inputs = [dataset[int(i)][0] for i in unique]
        batch = to_device(self.spec.collate(inputs), self.device)
        with torch.no_grad():
            # checked as extraction checks it, so a broken encode fails here as it would there
            hidden, mask = encode_checked(self.spec, self.backbone, batch, batch_size=len(unique))
            # rounded and pooled as extraction did for the cache: NOTE [ One seam ] in pooling.py
            features = head_inputs(hidden, mask, pool=self.pool, dtype=self.dtype, layers=self._positions)
            inverse = inverse.to(self.device).view(shape)
            if isinstance(features, TokenBatch):
                return TokenBatch(features.hidden[inverse], features.mask[inverse])
            return features[inverse]
