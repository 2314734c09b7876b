"""Pools: hand-computed values, mask-awareness for any padding, stacking of the learned pool, the registry,
and the one seam from hidden states to head inputs (NOTE [ One seam ])."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headcache.errors import ConfigError
from headcache.pooling import (
    PARAMETER_FREE_POOLS,
    POOL_NAMES,
    POOLS,
    LayerMix,
    LearnedQueryPool,
    TokenBatch,
    cache_inputs,
    create_pool,
    get_pool,
    head_inputs,
    is_learnable,
    mean_pool,
    meanq_pool,
    pool_parameter_free,
)

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


# -------------------------------------------------------------------------- registry


def test_registry_holds_every_pool_and_the_stored_ones_are_its_parameter_free_view():
    assert POOL_NAMES == ("meanq", "meanq_scaled", "mean", "max", "last", "learned")
    assert get_pool("mean") is mean_pool and get_pool("learned") is LearnedQueryPool
    assert PARAMETER_FREE_POOLS == {name: POOLS[name] for name in POOL_NAMES if name != "learned"}
    assert [is_learnable(name) for name in POOL_NAMES] == [False] * 5 + [True]


def test_lookup_passes_a_built_pool_through_and_lists_names_for_an_unknown_one():
    def mine(hidden, mask):
        return hidden.sum(-2)

    built = LearnedQueryPool(2, 3)
    assert get_pool(mine) is mine and get_pool(built) is built
    assert create_pool(built, num_heads=5, dim=7) is built
    with pytest.raises(ConfigError, match=r"pool must be one of meanq, .*learned; got 'attention'"):
        get_pool("attention")
    with pytest.raises(ConfigError, match="got 'attention'"):
        create_pool("attention", num_heads=1, dim=4)


def test_create_pool_builds_the_learnable_pool_for_k_heads_and_nothing_for_a_stored_one():
    pool = create_pool("learned", num_heads=3, dim=4)
    assert isinstance(pool, LearnedQueryPool) and pool.query.shape == (3, 4)
    assert all(create_pool(name, num_heads=3, dim=4) is None for name in PARAMETER_FREE_POOLS)


def test_a_learnable_pool_has_no_stored_vector():
    with pytest.raises(ConfigError, match="pool 'learned' is learnable.*meanq, meanq_scaled, mean, max, last"):
        pool_parameter_free("learned", HIDDEN, MASK)


# -------------------------------------------------------------------------- the seam (NOTE [ One seam ])

# 1 + 2**-12 lies between two float16 values: rounding through float16 moves it to 1.0
UNROUNDED = torch.tensor([[[1.0 + 2 ** -12, 3.0], [2.0, 1.0 + 3 * 2 ** -12], [math.nan, math.inf]]])
MASK_INT = torch.tensor([[1, 1, 0]])  # spec.encode may return any mask dtype


def test_head_inputs_pools_the_states_rounded_through_the_cache_dtype():
    half = UNROUNDED.half().float()
    expected = torch.tensor([[(half[0, 0, 0] + 2.0) / 2, (3.0 + half[0, 1, 1]) / 2]])
    rounded = head_inputs(UNROUNDED, MASK_INT, pool="mean", dtype="float16")
    assert rounded.dtype == torch.float32 and torch.equal(rounded, expected)
    unrounded = head_inputs(UNROUNDED, MASK_INT, pool="mean", dtype="float32")
    assert torch.equal(unrounded, torch.tensor([[(1.0 + 2 ** -12 + 2.0) / 2, (3.0 + 1.0 + 3 * 2 ** -12) / 2]]))
    assert not torch.equal(rounded, unrounded)
    assert torch.equal(head_inputs(UNROUNDED.half(), MASK_INT, pool="mean", dtype="float16"), expected)


def test_head_inputs_gives_a_learnable_pool_the_rounded_tokens_with_padding_zeroed():
    tokens = head_inputs(UNROUNDED, MASK_INT, pool="learned", dtype="float16")
    assert isinstance(tokens, TokenBatch)
    assert tokens.mask.dtype == torch.bool and tokens.mask.tolist() == [[True, True, False]]
    expected = UNROUNDED.half().float()
    expected[0, 2] = 0.0  # the NaN / Inf padding is gone, so no pool can see it
    assert tokens.hidden.dtype == torch.float32 and torch.equal(tokens.hidden, expected)


def test_head_inputs_calls_a_pool_function_passed_in():
    summed = head_inputs(UNROUNDED[:, :2], MASK_INT[:, :2], pool=lambda h, m: h.sum(-2), dtype="float16")
    assert torch.equal(summed, UNROUNDED[:, :2].half().float().sum(-2))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_what_extraction_stores_is_what_head_inputs_gives_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 5, generator=generator) * 3
    mask = torch.arange(7) < torch.tensor([[7], [3], [1], [5]])
    rounded, bool_mask, pooled = cache_inputs(hidden, mask.int(), dtype=dtype)
    assert torch.equal(rounded, hidden.to(getattr(torch, dtype)).float()) and torch.equal(bool_mask, mask)
    assert list(pooled) == list(PARAMETER_FREE_POOLS)
    for name, vectors in pooled.items():
        assert vectors.shape == (4, 5) and torch.equal(vectors, head_inputs(hidden, mask, pool=name, dtype=dtype))
    stored = rounded.masked_fill(~mask.unsqueeze(-1), 0.0)  # what a cached token split hands the learned pool
    assert torch.equal(head_inputs(hidden, mask, pool="learned", dtype=dtype).hidden, stored)


def test_nothing_else_in_the_package_rounds_or_pools_hidden_states():
    """NOTE [ One seam ]: extraction, the live source and export reach hidden states through pooling.py only."""
    package = Path(__file__).resolve().parents[1] / "headcache"
    callers = {path.name for path in package.rglob("*.py") for word in ("round_through(", "pool_parameter_free(")
               if word in path.read_text() and path.name not in ("pooling.py", "store.py")}
    assert callers == set()
    assert all(word in (package / name).read_text() for name, word in
               [("extract.py", "cache_inputs("), ("features.py", "head_inputs("), ("export.py", "head_inputs(")])


# -------------------------------------------------------------------------- layers (NOTE [ One seam ])


def _layered(b: int, layers: int, t: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, layers, t, d, generator=generator) * 3
    lengths = torch.randint(1, t + 1, (b,), generator=generator)
    lengths[0] = t  # one sequence without padding, the others ragged
    return hidden, torch.arange(t) < lengths[:, None]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("shape", [(4, 3, 7, 5), (16, 13, 50, 64), (2, 2, 1, 3)])
def test_every_layer_is_pooled_as_if_it_were_alone_bit_for_bit(dtype, shape):
    """A layer's stored vector is what a one-layer cache of that layer stores: extraction pools (B, L, T, D)
    at once, and the live source pools one layer (a view) or the layers it keeps."""
    hidden, mask = _layered(*shape)
    rounded, bool_mask, pooled = cache_inputs(hidden, mask.int(), dtype=dtype)
    assert torch.equal(rounded, hidden.to(getattr(torch, dtype)).float()) and torch.equal(bool_mask, mask)
    for name, vectors in pooled.items():
        assert vectors.shape == (shape[0], shape[1], shape[3]), name
        for layer in range(shape[1]):
            alone = cache_inputs(hidden[:, layer].clone(), mask, dtype=dtype)[2][name]
            assert torch.equal(vectors[:, layer], alone), (name, layer)
            assert torch.equal(head_inputs(hidden, mask, pool=name, dtype=dtype, layers=layer), alone), (name, layer)
        kept = head_inputs(hidden, mask, pool=name, dtype=dtype, layers=[2 % shape[1], 0])
        assert torch.equal(kept, vectors[:, [2 % shape[1], 0]]), name


def test_the_learned_pool_gets_the_kept_layers_tokens_rounded_with_padding_zeroed_in_each():
    hidden, mask = _layered(3, 4, 6, 5)
    hidden = hidden.masked_fill(~mask[:, None, :, None], math.nan)  # padding the backbone filled with anything
    tokens = head_inputs(hidden, mask, pool="learned", dtype="float16", layers=[3, 1])
    assert isinstance(tokens, TokenBatch) and tokens.hidden.shape == (3, 2, 6, 5) and torch.equal(tokens.mask, mask)
    for position, layer in enumerate([3, 1]):
        alone = head_inputs(hidden[:, layer], mask, pool="learned", dtype="float16")
        assert torch.equal(tokens.hidden[:, position], alone.hidden)
    assert tokens.hidden.isfinite().all() and not tokens.hidden.masked_select(~mask[:, None, :, None]).any()
    one = head_inputs(hidden, mask, pool="learned", dtype="float16", layers=2)
    assert torch.equal(one.hidden, head_inputs(hidden[:, 2], mask, pool="learned", dtype="float16").hidden)


def test_a_three_dimensional_hidden_is_one_layer_and_other_positions_are_refused():
    hidden, mask = _layered(2, 1, 4, 3)
    flat = hidden[:, 0]
    for pool in ("meanq", "learned"):
        today = head_inputs(flat, mask, pool=pool, dtype="float16")
        for layers in (0, None):
            again = head_inputs(flat, mask, pool=pool, dtype="float16", layers=layers)
            assert torch.equal(getattr(again, "hidden", again), getattr(today, "hidden", today))
        with_axis = head_inputs(flat, mask, pool=pool, dtype="float16", layers=[0])
        assert torch.equal(getattr(with_axis, "hidden", with_axis).squeeze(1), getattr(today, "hidden", today))
        one_layer = head_inputs(hidden, mask, pool=pool, dtype="float16")  # (B, 1, T, D) without layers: its one
        assert torch.equal(getattr(one_layer, "hidden", one_layer), getattr(today, "hidden", today))
    with pytest.raises(ValueError, match=r"layer positions \[1\] are not all in \[0, 1\)"):
        head_inputs(flat, mask, pool="mean", dtype="float16", layers=1)
    with pytest.raises(ValueError, match="holds 3 layers: say which"):
        head_inputs(torch.zeros(2, 3, 4, 3), mask, pool="mean", dtype="float16")


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), fill=st.sampled_from([1e4, math.inf, math.nan]),
       seed=st.integers(0, 1000))
def test_padding_contents_never_change_any_layers_pool(lengths, fill, seed):
    t = max(lengths) + 1
    hidden = torch.randn(len(lengths), 3, t, 4, generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(t) < torch.tensor(lengths).unsqueeze(1)
    dirty = hidden.masked_fill(~mask[:, None, :, None], fill)
    for name in PARAMETER_FREE_POOLS:
        clean = pool_parameter_free(name, hidden, mask)
        assert torch.equal(pool_parameter_free(name, dirty, mask), clean), name


# -------------------------------------------------------------------------- LayerMix

B, L, T, D = 5, 3, 6, 4


def _features(seed: int = 0, per_head: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    lead = (per_head,) if per_head else ()
    pooled = torch.randn(*lead, B, L, D, generator=generator)
    tokens = torch.randn(*lead, B, L, T, D, generator=generator)
    return pooled, tokens


@pytest.mark.parametrize("per_head", [None, 4])
def test_a_fixed_head_reads_exactly_its_layers_numbers(per_head):
    pooled, tokens = _features(per_head=per_head)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) > 0.3
    mix = LayerMix(4, L, [2, 0, 2, 1])
    assert mix.logits is None and list(mix.parameters()) == []  # nothing to train, so no missing gradient
    out, out_tokens = mix(pooled), mix(TokenBatch(tokens, mask))
    assert out.shape == (4, B, D) and out_tokens.hidden.shape == (4, B, T, D) and out_tokens.mask is mask
    for k, layer in enumerate([2, 0, 2, 1]):
        own = (lambda x: x[k]) if per_head else (lambda x: x)
        assert torch.equal(out[k], own(pooled)[:, layer])
        assert torch.equal(out_tokens.hidden[k], own(tokens)[:, layer])
        assert torch.equal(mix.weights(k), torch.eye(L)[layer])


@pytest.mark.parametrize("per_head", [None, 3])
def test_a_learned_head_mixes_by_the_softmax_of_its_logits_starting_even(per_head):
    pooled, tokens = _features(per_head=per_head)
    mix = LayerMix(3, L, [None, 1, None])
    assert mix.logits.shape == (3, L) and not mix.logits.any()  # zero-initialised, as s3prl's featurizer
    own = (lambda x, k: x[k]) if per_head else (lambda x, k: x)
    assert torch.allclose(mix(pooled)[0], own(pooled, 0).mean(1), atol=1e-6)  # an even mix to start with
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([[0.5, -1.0, 2.0], [9.0, 9.0, 9.0], [0.0, 3.0, -2.0]]))
    out, out_tokens = mix(pooled), mix(TokenBatch(tokens, torch.ones(B, T, dtype=torch.bool)))
    for k in (0, 2):
        w = torch.softmax(mix.logits[k].detach(), 0)
        assert torch.allclose(mix.weights(k), w) and float(mix.weights(k).sum()) == pytest.approx(1.0)
        by_hand = sum(w[layer] * own(pooled, k)[:, layer] for layer in range(L))
        assert torch.allclose(out[k], by_hand, atol=1e-6)
        by_hand_tokens = sum(w[layer] * own(tokens, k)[:, layer] for layer in range(L))
        assert torch.allclose(out_tokens.hidden[k], by_hand_tokens, atol=1e-6)
    assert torch.equal(out[1], own(pooled, 1)[:, 1])  # the fixed head between them: its layer, exactly
    assert torch.equal(mix.weights(1), torch.eye(L)[1])  # and its logits row plays no part


def test_only_the_learned_heads_logits_get_a_gradient():
    pooled, _ = _features()
    mix = LayerMix(3, L, [None, 1, None])
    (mix(pooled) * torch.randn(3, B, D, generator=torch.Generator().manual_seed(2))).sum().backward()
    assert mix.logits.grad[0].abs().sum() > 0 and mix.logits.grad[2].abs().sum() > 0
    assert not mix.logits.grad[1].any()


def test_for_the_mean_pool_mixing_pooled_vectors_is_pooling_the_mixed_tokens():
    """Why parameter-free pools mix after pooling (DESIGN "Layers"): the mean is linear, so the SUPERB mix of
    the pooled vectors equals the pool of the mixed states, and the (N, L, D) matrix is all a mix needs. The
    attention pools are not linear: for them the two orders differ (the learned pool mixes tokens first)."""
    hidden, mask = _layered(6, L, 9, D, seed=3)
    mix = LayerMix(2, L, [None, None])
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([[1.5, -0.5, 0.2], [-2.0, 0.0, 1.0]]))
    with torch.no_grad():
        mixed_tokens = mix(TokenBatch(hidden, mask)).hidden  # (K, B, T, D)
        for pool in ("mean", "meanq"):
            pool_then_mix = mix(head_inputs(hidden, mask, pool=pool, dtype="float32", layers=list(range(L))))
            mix_then_pool = PARAMETER_FREE_POOLS[pool](mixed_tokens, mask.expand(2, -1, -1))
            gap = float((pool_then_mix - mix_then_pool).abs().max())
            assert gap <= 1e-6 if pool == "mean" else gap > 1e-2, (pool, gap)
            assert pool_then_mix.abs().max() > 0.1  # the vectors are not near zero, so the gap is a real one
    assert not torch.allclose(meanq_pool(hidden, mask)[:, 0], mean_pool(hidden, mask)[:, 0], atol=1e-2)


def test_layer_mix_refuses_choices_that_do_not_fit():
    with pytest.raises(ValueError, match="one choice per head: got 2 for 3 heads"):
        LayerMix(3, L, [0, None])
    with pytest.raises(ValueError, match=r"must be None or positions in \[0, 3\)"):
        LayerMix(2, L, [3, None])
