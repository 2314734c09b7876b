"""Head bank: head k of a bank computes what a lone head computes; export gives plain modules; a layer mix
comes first and its logits go into a learned-mix head's file.
(The stacked AdamW and clipping are tested against torch's in test_optim.py.)"""
from __future__ import annotations

import pytest
import torch

from headcache.errors import ConfigError
from headcache.head import HeadModel, get_head
from headcache.pooling import LayerMix, LearnedQueryPool, TokenBatch


def _bank(kind, k, seeds, dropout=None, d=6, c=2):
    bank = get_head(kind)(k, d, c, dropout=dropout)
    bank.reset_parameters([torch.Generator().manual_seed(s) for s in seeds])
    return bank


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_export_equals_the_bank_in_eval_mode(kind):
    bank = _bank(kind, 2, [1, 2]).eval()
    bank.running_mean.normal_() if kind == "mlp" else None
    x = torch.randn(7, 6)
    logits = bank(x)
    for k in range(2):
        assert torch.allclose(bank.export(k)(x), logits[k], atol=1e-6)


def test_head_k_of_a_bank_trains_like_a_lone_head_including_dropout():
    seeds = [3, 4, 5]
    bank = _bank("mlp", 3, seeds, dropout=[0.1, 0.3, 0.5])
    lone = _bank("mlp", 1, [4], dropout=[0.3])
    x = torch.randn(16, 6)
    together = bank.train()(x, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = lone.train()(x, [torch.Generator().manual_seed(8)])
    assert torch.allclose(together[1], alone[0], atol=1e-6)
    assert torch.allclose(bank.running_mean[1], lone.running_mean[0], atol=1e-6)


def test_initialisation_is_xavier_uniform_with_zero_bias():
    bank = _bank("mlp", 1, [0], d=64)
    bound = (6 / (64 + 32)) ** 0.5
    assert bank.w_in.abs().max() <= bound and bank.w_in.abs().max() > 0.9 * bound
    assert torch.count_nonzero(bank.b_out) == 0 and torch.all(bank.bn_weight == 1)


def test_unknown_head_lists_the_valid_names():
    with pytest.raises(ConfigError, match="mlp, linear"):
        get_head("transformer")


# ---------------------------------------------------------------------------- a layer mix before the heads


def _model(mix_choices, pool: bool, layers: int = 3, d: int = 6, seed: int = 0):
    k = len(mix_choices) if mix_choices is not None else 2
    generators = [torch.Generator().manual_seed(seed + i) for i in range(k)]
    bank = _bank("mlp", k, [seed + i for i in range(k)], d=d)
    learned = LearnedQueryPool(k, d) if pool else None
    if learned is not None:
        learned.reset_parameters(generators)
    mix = LayerMix(k, layers, mix_choices) if mix_choices is not None else None
    return HeadModel(bank, learned, mix).eval()


def test_the_mix_comes_first_then_the_learned_pool_then_the_bank():
    model = _model([2, None], pool=True)
    with torch.no_grad():
        model.mix.logits[1] = torch.tensor([0.3, -1.0, 2.0])
    hidden = torch.randn(5, 3, 4, 6, generator=torch.Generator().manual_seed(3))  # (B, L, T, D)
    mask = torch.tensor([[True] * 4, [True, True, False, False]] * 2 + [[True, False, False, False]])
    mixed = model.mix(TokenBatch(hidden, mask))
    expected = model.bank(model.pool(mixed.hidden, mixed.mask))
    assert torch.equal(model(TokenBatch(hidden, mask)), expected)
    pooled_model = _model([0, None], pool=False)
    pooled = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(pooled_model(pooled), pooled_model.bank(pooled_model.mix(pooled)))


def test_a_head_file_keeps_the_logits_of_a_learned_mix_and_nothing_for_a_fixed_layer():
    model = _model([1, None], pool=True)
    without = _model(None, pool=True)
    with torch.no_grad():
        model.mix.logits[1] = torch.tensor([1.0, 2.0, -3.0])
    fixed, learned = model.head_state(0), model.head_state(1)
    assert set(fixed) == set(without.head_state(0))  # a fixed-layer head's file is a one-layer run's
    assert set(learned) == set(fixed) | {"mix.logits"} and torch.equal(learned["mix.logits"], model.mix.logits[1])
    again = _model([1, None], pool=True, seed=9)
    for k, state in enumerate((fixed, learned)):
        again.load_head_state(k, state)
    hidden = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    x = TokenBatch(hidden, torch.ones(4, 5, dtype=torch.bool))
    assert torch.equal(again(x), model(x)) and torch.equal(again.mix.logits[1], model.mix.logits[1])


def test_a_head_file_written_before_layers_loads_as_before():
    old = _model(None, pool=True)
    state = old.head_state(1)
    assert not any(name.startswith("mix.") for name in state)
    new = _model(None, pool=True, seed=5)
    new.load_head_state(1, state)
    x = TokenBatch(torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(2)), torch.ones(4, 5, dtype=torch.bool))
    assert torch.equal(new(x)[1], old(x)[1])
    reading_a_layer = _model([2, 2], pool=True, seed=5)  # a fixed-layer head takes the same file
    reading_a_layer.load_head_state(1, state)
    layered = TokenBatch(torch.stack([torch.zeros_like(x.hidden)] * 2 + [x.hidden], 1), x.mask)
    assert torch.equal(reading_a_layer(layered)[1], old(x)[1])
