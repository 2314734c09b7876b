"""Pools: hand-computed values, mask-awareness for any padding, and stacking of the learned pool."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headcache.errors import ConfigError
from headcache.pooling import PARAMETER_FREE_POOLS, LearnedQueryPool, is_learnable, pool_parameter_free

HIDDEN = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # third position is padding
MASK = torch.tensor([[True, True, False]])


def test_mean_max_last_by_hand():
    assert torch.allclose(pool_parameter_free("mean", HIDDEN, MASK), torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(pool_parameter_free("max", HIDDEN, MASK), torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(pool_parameter_free("last", HIDDEN, MASK), torch.tensor([[0.0, 2.0]]))


def test_meanq_is_the_seeds_unscaled_mean_query_attention():
    # q = mean of the two real states = (0.5, 1.0); scores h_t . q, no 1/sqrt(D)
    scores = torch.tensor([1.0 * 0.5, 2.0 * 1.0])
    w = torch.softmax(scores, 0)
    expected = w[0] * HIDDEN[0, 0] + w[1] * HIDDEN[0, 1]
    assert torch.allclose(pool_parameter_free("meanq", HIDDEN, MASK)[0], expected)
    w_scaled = torch.softmax(scores / math.sqrt(2), 0)
    expected_scaled = w_scaled[0] * HIDDEN[0, 0] + w_scaled[1] * HIDDEN[0, 1]
    assert torch.allclose(pool_parameter_free("meanq_scaled", HIDDEN, MASK)[0], expected_scaled)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), fill=st.sampled_from([0.0, 1e4, -1e4, math.inf, math.nan]),
       seed=st.integers(0, 1000))
def test_padding_contents_never_change_any_pool(lengths, fill, seed):
    generator = torch.Generator().manual_seed(seed)
    t = max(lengths) + 2
    hidden = torch.randn(len(lengths), t, 3, generator=generator)
    mask = torch.arange(t) < torch.tensor(lengths).unsqueeze(1)
    dirty = hidden.masked_fill(~mask.unsqueeze(-1), fill)
    for name in PARAMETER_FREE_POOLS:
        clean_out = pool_parameter_free(name, hidden.masked_fill(~mask.unsqueeze(-1), 0.0), mask)
        assert torch.allclose(pool_parameter_free(name, dirty, mask), clean_out, atol=1e-6), name
        alone = torch.stack([pool_parameter_free(name, hidden[b:b + 1, :n], mask[b:b + 1, :n])[0]
                             for b, n in enumerate(lengths)])
        assert torch.allclose(clean_out, alone, atol=1e-5), name
    pool = LearnedQueryPool(2, 3)
    pool.reset_parameters([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert torch.allclose(pool(dirty, mask), pool(hidden, mask), atol=1e-6)


def test_learned_pool_on_shared_and_per_head_batches_agrees():
    pool = LearnedQueryPool(3, 4)
    pool.reset_parameters([torch.Generator().manual_seed(k) for k in range(3)])
    hidden, mask = torch.randn(5, 6, 4), torch.rand(5, 6) > 0.3
    mask[:, 0] = True
    shared = pool(hidden, mask)
    per_head = pool(hidden.expand(3, -1, -1, -1), mask.expand(3, -1, -1))
    assert shared.shape == (3, 5, 4) and torch.allclose(shared, per_head, atol=1e-6)


def test_unknown_pool_lists_the_valid_names():
    with pytest.raises(ConfigError, match="meanq, meanq_scaled, mean, max, last, learned"):
        is_learnable("attention")
