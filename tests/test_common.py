"""Common checks over the registries (timm's test_models, scikit-learn's parametrize_with_checks).

Every registered pool x head x loss x cache dtype goes through the same
contract: it builds with defaults, gives the shapes it promises, no NaN, a
gradient for every parameter, and the same result from the same seed. Every
setting's constraint generates an invalid value, refused with a message that
names the flag. A component added to a registry is checked here with no new test.
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

from headcache.config import BenchConfig, CVConfig, ExtractConfig, TrainConfig, flag_name
from headcache.errors import ConfigError
from headcache.head import HEADS, HeadModel, get_head
from headcache.losses import LOSSES, LossConstants, get_loss, loss_constants, stack_constants, stacked_loss
from headcache.pooling import PARAMETER_FREE_POOLS, POOL_NAMES, TokenBatch, create_pool
from headcache.store import DTYPES, round_through

POOLS = POOL_NAMES
K, B, T, D, C = 2, 6, 5, 8, 2
LENGTHS = torch.tensor([5, 3, 1, 4, 2, 5])  # ragged, with a one-token sequence
LABELS = torch.tensor([0, 1, 0, 1, 1, 0])


def _run(pool: str, head: str, loss: str, dtype: str, seed: int) -> dict[str, torch.Tensor]:
    """One training step's forward and backward, as train.fit composes them: pool + head bank, stacked loss."""
    hidden = round_through(torch.randn(B, T, D, generator=torch.Generator().manual_seed(123)), dtype).float()
    mask = torch.arange(T) < LENGTHS[:, None]
    init = [torch.Generator().manual_seed(seed + k) for k in range(K)]
    learned = create_pool(pool, num_heads=K, dim=D)
    if learned is not None:
        learned.reset_parameters(init)
    bank = get_head(head)(K, D, C)  # builds with defaults
    bank.reset_parameters(init)
    model = HeadModel(bank, learned).train()
    features = TokenBatch(hidden, mask) if learned is not None else PARAMETER_FREE_POOLS[pool](hidden, mask)
    logits = model(features, [torch.Generator().manual_seed(seed + 100 + k) for k in range(K)])
    constants = [loss_constants(loss, LABELS, C) for _ in range(K)]
    losses = stacked_loss(logits, LABELS, *stack_constants(constants, torch.device("cpu")))
    losses.sum().backward()
    out = {"logits": logits.detach(), "losses": losses.detach()}
    out.update({f"grad.{name}": p.grad for name, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("pool,head,loss,dtype", list(itertools.product(POOLS, HEADS, LOSSES, DTYPES)))
class TestEveryComponent:
    def test_shapes_finite_values_and_a_gradient_for_every_parameter(self, pool, head, loss, dtype):
        out = _run(pool, head, loss, dtype, seed=0)
        assert out["logits"].shape == (K, B, C) and out["losses"].shape == (K,)
        for name, value in out.items():
            assert value is not None, f"{name} got no gradient"
            assert torch.isfinite(value).all(), name
            if name.startswith("grad."):
                assert value.abs().sum() > 0, f"{name} is all zeros"

    def test_same_seed_same_result_and_another_seed_another(self, pool, head, loss, dtype):
        first, again, other = (_run(pool, head, loss, dtype, seed) for seed in (0, 0, 7))
        assert first.keys() == again.keys()
        assert all(torch.equal(first[name], again[name]) for name in first)
        assert not torch.equal(first["logits"], other["logits"])


def test_every_pool_registered_is_a_train_choice():
    pool = next(f for f in dataclasses.fields(TrainConfig) if f.name == "pool")
    assert pool.metadata["constraint"].choices == POOLS


@pytest.mark.parametrize("name", list(HEADS))
def test_head_lookup_gives_the_constructor_and_passes_built_heads_through(name):
    assert get_head(name) is HEADS[name] and get_head(HEADS[name]) is HEADS[name]
    built = HEADS[name](1, D, C)
    assert get_head(built) is built and built.kind == name


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_lookup_gives_the_constructor_and_passes_built_losses_through(name):
    assert get_loss(name) is LOSSES[name]
    built = LossConstants((1.0, 2.0), 0.5, False)
    assert get_loss(built) is built and loss_constants(built, LABELS, C) is built


@pytest.mark.parametrize("lookup,kind,names", [(get_head, "head", HEADS), (get_loss, "loss", LOSSES)])
def test_an_unknown_name_is_refused_listing_the_valid_ones(lookup, kind, names):
    with pytest.raises(ConfigError, match=re.escape(f"--{kind} must be one of {', '.join(names)}; got 'nope'")):
        lookup("nope")


SETTINGS = [(cls, f) for cls in (TrainConfig, ExtractConfig, BenchConfig, CVConfig) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls,setting", SETTINGS, ids=[f"{c.__name__}.{f.name}" for c, f in SETTINGS])
def test_an_invalid_value_of_every_setting_is_refused_naming_its_flag(cls, setting):
    constraint = setting.metadata["constraint"]
    value = constraint.invalid_value()
    with pytest.raises(ConfigError) as refused:
        cls(**{setting.name: value})
    assert str(refused.value) == f"{flag_name(setting.name)} must be {constraint}; got {value!r}"
