"""Losses: focal by hand (the seed's formula), ce and weighted-ce equal to torch's."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from headcache.errors import ConfigError
from headcache.losses import loss_constants, stack_constants, stacked_loss

LOGITS = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 1.5], [0.0, 3.0]])
LABELS = torch.tensor([0, 1, 1, 0])


def _one(name, train_labels, **kw):
    constants = loss_constants(name, train_labels, 2, **kw)
    return stacked_loss(LOGITS[None], LABELS, *stack_constants([constants], torch.device("cpu")))[0], constants


def test_focal_alpha_is_the_clamped_positive_ratio():
    assert loss_constants("focal", torch.tensor([0] * 9 + [1]), 2).class_weights == pytest.approx((0.75, 0.25))
    assert loss_constants("focal", torch.tensor([0, 1, 1, 1]), 2).class_weights == pytest.approx((0.3, 0.7))
    assert loss_constants("focal", torch.tensor([0, 0, 1, 1]), 2).class_weights == pytest.approx((0.5, 0.5))


def test_focal_by_hand():
    loss, constants = _one("focal", torch.tensor([0, 1, 1, 1]))  # alpha 0.7 for positives
    expected = 0.0
    for logits, y in zip(LOGITS, LABELS.tolist()):
        p = torch.softmax(logits, 0)[y].item()
        alpha = 0.7 if y == 1 else 0.3
        expected += -alpha * (1 - p) ** 3 * math.log(p)
    assert loss.item() == pytest.approx(expected / 4, rel=1e-6)


def test_ce_and_weighted_ce_equal_torch():
    ce, _ = _one("ce", torch.tensor([0, 1]))
    assert ce.item() == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), rel=1e-6)
    train = torch.tensor([0, 0, 0, 1])
    weighted, constants = _one("weighted-ce", train)
    assert constants.class_weights == pytest.approx((4 / 6, 4 / 2))
    reference = F.cross_entropy(LOGITS, LABELS, weight=torch.tensor(constants.class_weights))
    assert weighted.item() == pytest.approx(reference.item(), rel=1e-6)


def test_heads_of_a_stack_get_their_own_loss():
    a = loss_constants("focal", torch.tensor([0, 1]), 2)
    b = loss_constants("ce", torch.tensor([0, 1]), 2)
    logits = torch.stack([LOGITS, LOGITS * 2])
    both = stacked_loss(logits, LABELS, *stack_constants([a, b], torch.device("cpu")))
    assert both[1].item() == pytest.approx(F.cross_entropy(LOGITS * 2, LABELS).item(), rel=1e-6)
    assert both[0].item() == pytest.approx(_one("focal", torch.tensor([0, 1]))[0].item(), rel=1e-6)


def test_focal_on_many_classes_is_refused_with_the_alternatives():
    with pytest.raises(ConfigError, match="--loss ce or weighted-ce"):
        loss_constants("focal", torch.tensor([0, 1, 2]), 3)
