"""Head bank: head k of a bank computes what a lone head computes; export gives plain modules.
(The stacked AdamW and clipping are tested against torch's in test_optim.py.)"""
from __future__ import annotations

import pytest
import torch

from headcache.errors import ConfigError
from headcache.head import get_head


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
