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
3. gives a parameter-free pool's float32 vectors of the rounded states, or,
   for a learnable pool, a TokenBatch of the rounded states with padding
   zeroed; of one layer, or of several, keeping their layer axis.

Extraction calls its sibling `cache_inputs`, which does steps 1 and 2 once and
then computes every parameter-free pool of those same rounded states, every
layer of them (what the cache stores); the live source and the exported model
call `head_inputs`. The cached and the live features are then equal by
construction, not by three copies kept in step, and the equivalence proof
(tests/test_equivalence.py) rests on it. Nothing else in the package pools
hidden states.

Layers: hidden (B, L, T, D) holds L layers of one batch under one mask (B, T).
A parameter-free pool is applied to each layer as if it were alone (the pools
broadcast the mask over the layer axis; tests check the result bit for bit
against pooling the layer by itself), so a layer's stored vector is the one a
one-layer cache of that layer would hold. A layer mix (`LayerMix`) comes
after: parameter-free pools mix the pooled vectors (pool, then mix: for the
mean pool this IS pooling the mixed states, as the mean is linear), the
learned pool mixes the token states before it pools them.

pooling imports `round_through` from store.py rather than owning a copy: the
rounding is a property of the format, store.py imports no other headcache
module that could lead back here, and the package root loads store anyway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

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


def _layer_mask(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mask (B, T) of hidden (B, L, T, D) as (B, 1, T): every layer of a sequence has its positions
    (NOTE [ One seam ]); a mask with as many leading axes as hidden is returned as it is."""
    missing = hidden.dim() - 1 - mask.dim()
    return mask.reshape(mask.shape[:-1] + (1,) * missing + mask.shape[-1:]) if missing > 0 else mask


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(hidden.dtype)
    # Zero the padding first: 0 * inf would otherwise turn into NaN.
    total = (hidden.masked_fill(~mask.unsqueeze(-1), 0.0) * weights.unsqueeze(-1)).sum(-2)
    return total / weights.sum(-1, keepdim=True)


# The parameter-free pools take hidden (..., T, D) with mask (..., T), or hidden (B, L, T, D) with the mask
# (B, T) of all its layers, and pool each layer as if it were alone (NOTE [ One seam ]).


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Plain mean over real positions."""
    return _masked_mean(hidden, _layer_mask(hidden, mask))


def max_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Feature-wise max over real positions."""
    return hidden.masked_fill(~_layer_mask(hidden, mask).unsqueeze(-1), float("-inf")).amax(dim=-2)


def last_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The last real position (for causal backbones, the one that has seen everything)."""
    mask = _layer_mask(hidden, mask)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    index = last.clamp(min=0)[..., None, None].expand(*hidden.shape[:-2], 1, hidden.shape[-1])
    return hidden.gather(-2, index).squeeze(-2)


def _mean_query(hidden: Tensor, mask: Tensor, scale: float) -> Tensor:
    mask = _layer_mask(hidden, mask)
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


class LayerMix(nn.Module):
    """Which layer each of K heads reads: a fixed layer, or a learned softmax mix of all L layers (SUPERB).

    A fixed head's features are gathered from its layer by index, so they are bit for bit the features
    a one-layer source of that layer gives (no float one-hot product). A learned head mixes the layers
    with softmax(logits[k]), the logits zero-initialised (an even mix to start with), as s3prl's
    featurizer does. Parameter-free pools are mixed after pooling, the learned pool's tokens before
    (NOTE [ One seam ]).

    Parameters
    ----------
    num_heads : int
        K.
    num_layers : int
        L, the layers of the features (positions 0 .. L - 1 along their layer axis).
    choices : sequence of (int or None)
        Per head: the position of its fixed layer, or None for a learned mix.

    Example
    -------
    >>> mix = LayerMix(2, 3, [1, None])
    >>> mix(torch.ones(4, 3, 8)).shape  # pooled (B, L, D), shared by both heads
    torch.Size([2, 4, 8])
    """

    def __init__(self, num_heads: int, num_layers: int, choices: Sequence[int | None]):
        super().__init__()
        if len(choices) != num_heads:
            raise ValueError(f"LayerMix needs one choice per head: got {len(choices)} for {num_heads} heads")
        if any(c is not None and not 0 <= c < num_layers for c in choices):
            raise ValueError(f"LayerMix choices {list(choices)} must be None or positions in [0, {num_layers})")
        self.num_heads, self.num_layers, self.choices = num_heads, num_layers, list(choices)
        self.fixed = [k for k, c in enumerate(choices) if c is not None]
        self.learned = [k for k, c in enumerate(choices) if c is None]
        # a fixed head has no logits to train: a bank of fixed heads only has no parameter (so no
        # gradient is missing), and in a bank with learned heads the fixed heads' rows stay zero
        self.register_parameter("logits", nn.Parameter(torch.zeros(num_heads, num_layers)) if self.learned else None)
        self.register_buffer("_fixed_heads", torch.tensor(self.fixed, dtype=torch.long), persistent=False)
        self.register_buffer("_fixed_layers", torch.tensor([choices[k] for k in self.fixed], dtype=torch.long),
                             persistent=False)
        self.register_buffer("_learned_heads", torch.tensor(self.learned, dtype=torch.long), persistent=False)
        order = self.fixed + self.learned  # the heads as computed: fixed ones first
        self.register_buffer("_order", torch.tensor([order.index(k) for k in range(num_heads)], dtype=torch.long),
                             persistent=False)
        self._in_order = order == list(range(num_heads))

    def is_learned(self, k: int) -> bool:
        """Whether head k's layer mix is learned (its logits are part of its state)."""
        return self.choices[k] is None

    def weights(self, k: int) -> Tensor:
        """Head k's weight of each layer (L,): its softmax mix, or one-hot at its fixed layer."""
        if self.is_learned(k):
            return torch.softmax(self.logits[k].detach(), dim=-1)
        return torch.nn.functional.one_hot(torch.tensor(self.choices[k]), self.num_layers).float()

    def forward(self, features: Tensor | TokenBatch) -> Tensor | TokenBatch:
        """Pooled (B, L, D) shared by all heads or (K, B, L, D) one batch per head -> (K, B, D); a TokenBatch
        hidden (B, L, T, D) or (K, B, L, T, D) -> (K, B, T, D), the mask as it came."""
        if isinstance(features, TokenBatch):
            return TokenBatch(self._mix(features.hidden, tokens=True), features.mask)
        return self._mix(features, tokens=False)

    def _mix(self, x: Tensor, *, tokens: bool) -> Tensor:
        shared = x.dim() == (4 if tokens else 3)  # no leading head axis
        parts = []
        if self.fixed:  # an index gather: exactly the layer's numbers
            if shared:
                parts.append(x.movedim(1, 0).index_select(0, self._fixed_layers))
            else:
                parts.append(x[self._fixed_heads, :, self._fixed_layers])
        if self.learned:
            weights = torch.softmax(self.logits.index_select(0, self._learned_heads), dim=-1)
            if shared:
                parts.append(torch.einsum("kl,bl...->kb...", weights, x))
            else:
                parts.append(torch.einsum("kl,kbl...->kb...", weights, x.index_select(0, self._learned_heads)))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        # back to the heads' order, unless it is already theirs (fixed heads first): a copy of the whole
        # (K, B, T, D) and a scatter in backward saved (measured: -18% of a learned-pool layer sweep)
        return out if self._in_order else out.index_select(0, self._order)


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


def _select_layers(hidden: Tensor, layers: int | Sequence[int] | None) -> Tensor:
    """hidden (B, T, D) or (B, L, T, D) -> the layer at position ``layers`` (B, T, D), or the positions
    ``layers`` (B, L', T, D); a 3-D hidden is the one layer of a spec that names one (L == 1)."""
    if layers is None:
        if hidden.dim() == 4 and hidden.shape[1] != 1:
            raise ValueError(f"hidden {list(hidden.shape)} holds {hidden.shape[1]} layers: say which (layers=)")
        return hidden.squeeze(1) if hidden.dim() == 4 else hidden
    stacked = hidden if hidden.dim() == 4 else hidden.unsqueeze(1)
    positions = [layers] if isinstance(layers, int) else list(layers)
    if not positions or any(not 0 <= p < stacked.shape[1] for p in positions):
        raise ValueError(f"layer positions {positions} are not all in [0, {stacked.shape[1]}) of hidden "
                         f"{list(hidden.shape)}")
    if isinstance(layers, int):
        return stacked[:, layers]
    return stacked.index_select(1, torch.tensor(positions, device=hidden.device))


def head_inputs(hidden: Tensor, mask: Tensor, *, pool: str | Pool, dtype: str,
                layers: int | Sequence[int] | None = None) -> Tensor | TokenBatch:
    """What a head reads, from the backbone's hidden states (NOTE [ One seam ]).

    Parameters
    ----------
    hidden : Tensor (B, T, D) or (B, L, T, D)
        ``spec.encode``'s states, any float dtype; (B, L, T, D) for a spec with L ``layers``.
    mask : Tensor (B, T)
        True on real positions (of every layer).
    pool : str or pool
        A registered pool name (`POOL_NAMES`), or a pool itself (see `get_pool`).
    dtype : {"float16", "float32"}
        The cache's storage dtype, rounded through so live features equal cached ones.
    layers : int or sequence of int, optional
        Positions along L (a 3-D hidden is one layer, position 0). An int: that layer, features as for a
        one-layer hidden. A sequence: those layers, in that order, with a layer axis kept for a `LayerMix`.
        None (default): hidden must hold one layer.

    Returns
    -------
    Tensor (B, D) or (B, L', D) float32
        For a parameter-free pool: the pooled rounded states (of each layer).
    TokenBatch
        For a learnable pool: the rounded states with padding zeroed, hidden (B, T, D) or (B, L', T, D),
        and the bool mask (B, T).

    Example
    -------
    >>> head_inputs(torch.ones(1, 2, 4), torch.tensor([[True, False]]), pool="mean", dtype="float16").shape
    torch.Size([1, 4])
    >>> head_inputs(torch.ones(1, 3, 2, 4), torch.tensor([[True, False]]), pool="mean", dtype="float16",
    ...             layers=[2, 0]).shape
    torch.Size([1, 2, 4])
    """
    found = get_pool(pool)
    rounded, mask = _rounded(_select_layers(hidden, layers), mask, dtype)
    if _is_module_pool(found):
        return TokenBatch(rounded.masked_fill(~_layer_mask(rounded, mask).unsqueeze(-1), 0.0), mask)
    return found(rounded, mask)


def cache_inputs(hidden: Tensor, mask: Tensor, *, dtype: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """What extraction stores, from one rounding (NOTE [ One seam ]).

    Parameters
    ----------
    hidden : Tensor (B, T, D) or (B, L, T, D)
    mask : Tensor (B, T)
    dtype : {"float16", "float32"}

    Returns
    -------
    rounded : Tensor float32, the shape of ``hidden``
        The states exact in ``dtype`` (extraction keeps the token layers' slices of them).
    mask : Tensor (B, T) bool
    pooled : dict of str to Tensor (B, D), or (B, L, D) for a 4-D hidden, float32
        Every parameter-free pool of those states, every layer pooled: equal to what `head_inputs` gives
        for that pool (and that layer).
    """
    rounded, mask = _rounded(hidden, mask, dtype)
    return rounded, mask, {name: pool(rounded, mask) for name, pool in PARAMETER_FREE_POOLS.items()}
