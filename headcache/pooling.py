"""Pools over the sequence axis: hidden [B, T, D] + mask [B, T] -> [B, D].

Every pool is mask-aware: whatever sits in padded positions never changes the
result. Parameter-free pools are plain functions; extraction computes them
once and stores them in the cache, so a head trained on them reads only an
(N, D) matrix per epoch. The learnable pool is stacked over K heads so that a
sweep trains K of them as one computation (see head.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from headcache.errors import ConfigError


@dataclass
class TokenBatch:
    """Padded per-token features: hidden (..., T, D) float32, mask (..., T) bool."""

    hidden: Tensor
    mask: Tensor


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(hidden.dtype)
    # Zero the padding first: 0 * inf would otherwise turn into NaN.
    total = (hidden.masked_fill(~mask.unsqueeze(-1), 0.0) * weights.unsqueeze(-1)).sum(-2)
    return total / weights.sum(-1, keepdim=True)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Plain mean over real positions."""
    return _masked_mean(hidden, mask)


def max_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Feature-wise max over real positions."""
    return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=-2)


def last_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The last real position (for causal backbones, the one that has seen everything)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    index = last.clamp(min=0)[..., None, None].expand(*hidden.shape[:-2], 1, hidden.shape[-1])
    return hidden.gather(-2, index).squeeze(-2)


def _mean_query(hidden: Tensor, mask: Tensor, scale: float) -> Tensor:
    query = _masked_mean(hidden, mask)
    clean = hidden.masked_fill(~mask.unsqueeze(-1), 0.0)
    scores = (clean * query.unsqueeze(-2)).sum(-1) * scale
    weights = _masked_softmax(scores, mask)
    return (clean * weights.unsqueeze(-1)).sum(-2)


def meanq_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The seed's pool: q = mean_t h_t, w = softmax_t(h_t . q), pooled = sum_t w_t h_t (no 1/sqrt(D))."""
    return _mean_query(hidden, mask, 1.0)


def meanq_scaled_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The seed's pool with scores scaled by 1/sqrt(D), which keeps large-norm states from
    putting all the weight on one token."""
    return _mean_query(hidden, mask, 1.0 / math.sqrt(hidden.shape[-1]))


PARAMETER_FREE_POOLS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "meanq": meanq_pool,
    "meanq_scaled": meanq_scaled_pool,
    "mean": mean_pool,
    "max": max_pool,
    "last": last_pool,
}


class LearnedQueryPool(nn.Module):
    """K independent learned-query attention pools: w = softmax_t(h_t . q_k / sqrt(D)).

    Parameters
    ----------
    num_heads : int
        K, the number of stacked pools (1 for a single run).
    dim : int
        D, the hidden size.
    """

    def __init__(self, num_heads: int, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_heads, dim))

    def reset_parameters(self, generators: list[torch.Generator]) -> None:
        with torch.no_grad():
            for k, generator in enumerate(generators):
                self.query[k].normal_(0.0, self.query.shape[1] ** -0.5, generator=generator)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden (B, T, D) shared by all heads, or (K, B, T, D) one batch per head -> (K, B, D)."""
        clean = hidden.masked_fill(~mask.unsqueeze(-1), 0.0)
        scale = hidden.shape[-1] ** -0.5
        if hidden.dim() == 3:
            scores = torch.einsum("btd,kd->kbt", clean, self.query) * scale
            weights = _masked_softmax(scores, mask.unsqueeze(0))
            return torch.einsum("kbt,btd->kbd", weights, clean)
        scores = torch.einsum("kbtd,kd->kbt", clean, self.query) * scale
        weights = _masked_softmax(scores, mask)
        return torch.einsum("kbt,kbtd->kbd", weights, clean)


LEARNABLE_POOLS = {"learned": LearnedQueryPool}
POOL_NAMES = tuple(PARAMETER_FREE_POOLS) + tuple(LEARNABLE_POOLS)


def is_learnable(name: str) -> bool:
    """Whether the pool has parameters (and so must read per-token features)."""
    check_pool_name(name)
    return name in LEARNABLE_POOLS


def check_pool_name(name: str) -> None:
    if name not in POOL_NAMES:
        raise ConfigError(f"pool must be one of {', '.join(POOL_NAMES)}; got {name!r}")


def pool_parameter_free(name: str, hidden: Tensor, mask: Tensor) -> Tensor:
    """Apply a parameter-free pool by name, in float32."""
    check_pool_name(name)
    return PARAMETER_FREE_POOLS[name](hidden.float(), mask)
