"""Pools over the sequence axis: hidden [B, T, D] + mask [B, T] -> [B, D], and the one seam.

Every pool is mask-aware: whatever sits in padded positions never changes the
result. Parameter-free pools are plain functions; extraction computes them
once and stores them in the cache, so a head trained on them reads only an
(N, D) matrix per epoch. The learnable pool is stacked over K heads so that a
sweep trains K of them as one computation (see head.py). `POOLS` is the one
registry of both kinds; `get_pool` and `create_pool` look names up in it.

NOTE [ One seam ]
Hidden states from ``spec.encode`` become what a head reads in one place only:
`head_inputs` (timm's forward_features -> forward_head seam). It

1. rounds the states through the cache's storage dtype (`store.round_through`:
   the cache format owns what storing float16 does to a number; NOTE
   [ Float16 rounding in the live source ] in features.py),
2. turns the mask into bool,
3. gives a parameter-free pool's (N, D) float32 vectors of the rounded states,
   or, for a learnable pool, a TokenBatch of the rounded states with padding
   zeroed.

Extraction calls its sibling `cache_inputs`, which does steps 1 and 2 once and
then computes every parameter-free pool of those same rounded states (what the
cache stores); the live source and the exported model call `head_inputs`. The
cached and the live features are then equal by construction, not by three
copies kept in step, and the equivalence proof (tests/test_equivalence.py)
rests on it. Nothing else in the package pools hidden states.

pooling imports `round_through` from store.py rather than owning a copy: the
rounding is a property of the format, store.py imports no other headcache
module that could lead back here, and the package root loads store anyway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from headcache.errors import ConfigError
from headcache.store import round_through


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


PoolFunction = Callable[[Tensor, Tensor], Tensor]
Pool = PoolFunction | type[nn.Module] | nn.Module  # a pool function, a learnable pool class, or a built one

# The one registry of pools: name -> the function (parameter-free) or the module class (learnable;
# built with (num_heads, dim)). The order is the order every listing of names shows.
POOLS: dict[str, PoolFunction | type[nn.Module]] = {
    "meanq": meanq_pool,
    "meanq_scaled": meanq_scaled_pool,
    "mean": mean_pool,
    "max": max_pool,
    "last": last_pool,
    "learned": LearnedQueryPool,
}
POOL_NAMES = tuple(POOLS)


def _is_module_pool(pool: Pool) -> bool:
    return isinstance(pool, nn.Module) or (isinstance(pool, type) and issubclass(pool, nn.Module))


# A view of POOLS, not a second registry: the pools extraction computes once and stores.
PARAMETER_FREE_POOLS: dict[str, PoolFunction] = {n: p for n, p in POOLS.items() if not _is_module_pool(p)}


def check_pool_name(name: str) -> None:
    """Refuse a name that is not registered, listing the registered ones."""
    if name not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOL_NAMES)}; got {name!r}")


def get_pool(pool: str | Pool) -> Pool:
    """The registered pool of a name; anything else (a function, a module class or a built module) is
    taken to be a pool already and passed through, as timm's get_act_layer does."""
    if not isinstance(pool, str):
        return pool
    check_pool_name(pool)
    return POOLS[pool]


def is_learnable(pool: str | Pool) -> bool:
    """Whether the pool has parameters (and so must read per-token features)."""
    return _is_module_pool(get_pool(pool))


def create_pool(pool: str | Pool, *, num_heads: int, dim: int) -> nn.Module | None:
    """The module a HeadModel runs on token features: a learnable pool built for K = ``num_heads`` heads
    over D = ``dim``, or a built module passed through; None for a parameter-free pool, whose vectors
    come from the cache or `head_inputs` before the head sees them."""
    found = get_pool(pool)
    if isinstance(found, nn.Module):
        return found
    if isinstance(found, type) and issubclass(found, nn.Module):
        return found(num_heads, dim)
    return None


def pool_parameter_free(name: str, hidden: Tensor, mask: Tensor) -> Tensor:
    """Apply a parameter-free pool by name, in float32, to states already rounded as the caller needs
    (what tests and cache-writing scripts use; the package goes through NOTE [ One seam ])."""
    if is_learnable(name):
        raise ConfigError(f"pool {name!r} is learnable: it reads per-token features, not a stored vector; "
                          f"the parameter-free pools are {', '.join(PARAMETER_FREE_POOLS)}")
    return PARAMETER_FREE_POOLS[name](hidden.float(), mask)


def _rounded(hidden: Tensor, mask: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """Steps 1 and 2 of NOTE [ One seam ]: float32 states exact in ``dtype``, and a bool mask."""
    return round_through(hidden, dtype), mask.bool()


def head_inputs(hidden: Tensor, mask: Tensor, *, pool: str | Pool, dtype: str) -> Tensor | TokenBatch:
    """What a head reads, from the backbone's hidden states (NOTE [ One seam ]).

    Parameters
    ----------
    hidden : Tensor (B, T, D)
        ``spec.encode``'s states, any float dtype.
    mask : Tensor (B, T)
        True on real positions.
    pool : str or pool
        A registered pool name (`POOL_NAMES`), or a pool itself (see `get_pool`).
    dtype : {"float16", "float32"}
        The cache's storage dtype, rounded through so live features equal cached ones.

    Returns
    -------
    Tensor (B, D) float32
        For a parameter-free pool: the pooled rounded states.
    TokenBatch
        For a learnable pool: the rounded states with padding zeroed (B, T, D), and the bool mask.

    Example
    -------
    >>> head_inputs(torch.ones(1, 2, 4), torch.tensor([[True, False]]), pool="mean", dtype="float16").shape
    torch.Size([1, 4])
    """
    found = get_pool(pool)
    rounded, mask = _rounded(hidden, mask, dtype)
    if _is_module_pool(found):
        return TokenBatch(rounded.masked_fill(~mask.unsqueeze(-1), 0.0), mask)
    return found(rounded, mask)


def cache_inputs(hidden: Tensor, mask: Tensor, *, dtype: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """What extraction stores, from one rounding (NOTE [ One seam ]): the rounded states (B, T, D) float32
    (exact in ``dtype``), the bool mask (B, T), and every parameter-free pool's (B, D) float32 vectors of
    those states, equal to what `head_inputs` gives for that pool."""
    rounded, mask = _rounded(hidden, mask, dtype)
    return rounded, mask, {name: pool(rounded, mask) for name, pool in PARAMETER_FREE_POOLS.items()}
