"""Feature sources: what the training loop reads. Two of them, one interface.

A source answers "the features of these items of this split" and nothing
else: it never shuffles (batch order comes from the sampler in train.py).

- `CachedFeatures` reads the HDF5 cache. Parameter-free pools were computed
  at extraction, so it hands out rows of an (N, D) matrix held on the device;
  the learnable pool gets per-token features gathered from the flat token
  matrix held on the device.
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
holds for float16 caches too.

Split names: "a+b" reads splits a and b concatenated (used by cross-validation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from headcache.pooling import is_learnable, pool_parameter_free
from headcache.spec import to_device
from headcache.store import CacheReader

EVAL_ROWS = 256  # items per evaluation chunk


@dataclass
class TokenBatch:
    """Padded per-token features: hidden (..., T, D) float32, mask (..., T) bool."""

    hidden: Tensor
    mask: Tensor


def round_through(hidden: Tensor, dtype: str) -> Tensor:
    """Round float32 states through the cache dtype and back (see NOTE [ Float16 rounding ... ])."""
    return hidden.to(getattr(torch, dtype)).float()


def gather_tokens(tokens: Tensor, offsets: Tensor, rows: Tensor) -> TokenBatch:
    """Pad the sequences ``rows`` of a flat token matrix into a batch, with one gather.

    tokens (sum T_i, D), offsets (N + 1,), rows (...) -> hidden (..., T_max, D) float32.
    """
    starts, stops = offsets[rows], offsets[rows + 1]
    lengths = stops - starts
    steps = torch.arange(int(lengths.max()), device=tokens.device)
    mask = steps < lengths.unsqueeze(-1)
    positions = torch.where(mask, starts.unsqueeze(-1) + steps, 0)
    hidden = tokens[positions].float().masked_fill(~mask.unsqueeze(-1), 0.0)
    return TokenBatch(hidden, mask)


class CachedFeatures:
    """Features read from a headcache cache, held on ``device``.

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
    """

    eval_rows = EVAL_ROWS

    def __init__(self, path: str | Path, *, pool: str, device: torch.device,
                 expected_fingerprint: str | None = None):
        self.path, self.pool, self.device = Path(path), pool, device
        self.tokens_needed = is_learnable(pool)
        with CacheReader(self.path, expected_fingerprint=expected_fingerprint) as reader:
            self.hidden_dim = reader.hidden_dim
            self.dtype = reader.dtype
            self.backbone_fingerprint = reader.backbone_fingerprint
            self.splits = tuple(reader.splits)
        self._loaded: dict[str, dict[str, Any]] = {}

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self._loaded:
            parts = [self._read(name) for name in split.split("+")]
            self._loaded[split] = parts[0] if len(parts) == 1 else _concat(parts)
        return self._loaded[split]

    def _read(self, name: str) -> dict[str, Any]:
        with CacheReader(self.path) as reader:
            part = reader.split(name)
            loaded = {"labels": torch.from_numpy(part.labels).to(self.device), "ids": list(part.ids)}
            if self.tokens_needed:
                loaded["tokens"] = torch.from_numpy(part.tokens()).to(self.device)
                loaded["offsets"] = torch.from_numpy(part.offsets).to(self.device)
            else:
                loaded["pooled"] = torch.from_numpy(part.pooled(self.pool)).to(self.device)
        return loaded

    def labels(self, split: str) -> Tensor:
        return self._split(split)["labels"]

    def ids(self, split: str) -> list[str]:
        return self._split(split)["ids"]

    def batch(self, split: str, rows: Tensor) -> Tensor | TokenBatch:
        """Features of ``rows`` (B,) or (K, B): pooled (..., D) or a TokenBatch."""
        data = self._split(split)
        rows = rows.to(self.device)
        if self.tokens_needed:
            return gather_tokens(data["tokens"], data["offsets"], rows)
        return data["pooled"][rows]


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    joined = {"labels": torch.cat([p["labels"] for p in parts]), "ids": sum((p["ids"] for p in parts), [])}
    if "pooled" in parts[0]:
        joined["pooled"] = torch.cat([p["pooled"] for p in parts])
    else:
        shifts = np.cumsum([0] + [int(p["offsets"][-1]) for p in parts[:-1]])
        joined["tokens"] = torch.cat([p["tokens"] for p in parts])
        joined["offsets"] = torch.cat([parts[0]["offsets"][:1]] + [
            p["offsets"][1:] + int(shift) for p, shift in zip(parts, shifts)])
    return joined


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
        self.tokens_needed = is_learnable(pool)
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
            values = known() if callable(known) else [dataset[i][1] for i in range(len(dataset))]
            self._labels[split] = torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)
        return self._labels[split]

    def ids(self, split: str) -> list[str]:
        dataset = self._dataset(split)
        return [dataset[i][2] for i in range(len(dataset))]

    def batch(self, split: str, rows: Tensor) -> Tensor | TokenBatch:
        shape = rows.shape
        unique, inverse = torch.unique(rows.flatten().cpu(), return_inverse=True)
        dataset = self._dataset(split)
        inputs = [dataset[int(i)][0] for i in unique]
        batch = to_device(self.spec.collate(inputs), self.device)
        with torch.no_grad():
            hidden, mask = self.spec.encode(self.backbone, batch)
            hidden = round_through(hidden.float(), self.dtype)
            mask = mask.bool()
            inverse = inverse.to(self.device).view(shape)
            if self.tokens_needed:
                return TokenBatch(hidden.masked_fill(~mask.unsqueeze(-1), 0.0)[inverse], mask[inverse])
            return pool_parameter_free(self.pool, hidden, mask)[inverse]
