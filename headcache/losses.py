"""Losses, written once in a stacked form: one value per head of a bank.

All three losses are one formula with different constants:

    loss_k = sum_i w_k[y_i] * (1 - p_i)^gamma_k * (-log p_i) / norm_k

- ``focal`` (binary, the seed's): w = (1 - alpha, alpha) with alpha the train
  split's positive ratio clamped to [0.25, 0.7]; gamma 3; norm = batch size.
- ``ce``: w = 1, gamma 0, norm = batch size (plain cross-entropy).
- ``weighted-ce``: w_c = N / (C * N_c) from the train labels, gamma 0,
  norm = sum of the weights (as torch's weighted cross-entropy).

The class weights are learned state (they come from the train labels), so
they are computed in `loss_constants`, not stored in the config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from headcache.errors import ConfigError

LOSS_NAMES = ("focal", "ce", "weighted-ce")
FOCAL_ALPHA_RANGE = (0.25, 0.7)
PROB_EPS = 1e-8


def check_loss_name(name: str, num_classes: int) -> None:
    if name not in LOSS_NAMES:
        raise ConfigError(f"loss must be one of {', '.join(LOSS_NAMES)}; got {name!r}")
    if name == "focal" and num_classes != 2:
        raise ConfigError(
            f"loss 'focal' is for two classes; this cache has {num_classes}: use --loss ce or weighted-ce"
        )


def default_loss(num_classes: int) -> str:
    return "focal" if num_classes == 2 else "ce"


@dataclass(frozen=True)
class LossConstants:
    """The constants of one head's loss (see module docstring)."""

    class_weights: tuple[float, ...]
    gamma: float
    weighted_mean: bool

    def to_dict(self) -> dict:
        return {"class_weights": list(self.class_weights), "gamma": self.gamma,
                "weighted_mean": self.weighted_mean}


def loss_constants(name: str, train_labels: Tensor, num_classes: int, focal_gamma: float = 3.0) -> LossConstants:
    """Derive a loss's constants from the labels it will train on."""
    check_loss_name(name, num_classes)
    counts = torch.bincount(train_labels.cpu(), minlength=num_classes).double()
    if name == "focal":
        alpha = float((counts[1] / counts.sum()).clamp(*FOCAL_ALPHA_RANGE))
        return LossConstants((1.0 - alpha, alpha), float(focal_gamma), False)
    if name == "ce":
        return LossConstants((1.0,) * num_classes, 0.0, False)
    weights = counts.sum() / (num_classes * counts.clamp(min=1))
    return LossConstants(tuple(float(w) for w in weights), 0.0, True)


def stacked_loss(logits: Tensor, labels: Tensor, class_weights: Tensor, gamma: Tensor,
                 weighted_mean: Tensor) -> Tensor:
    """Per-head losses.

    Parameters
    ----------
    logits : Tensor (K, B, C)
    labels : Tensor (B,) shared, or (K, B)
    class_weights : Tensor (K, C)
    gamma : Tensor (K,)
    weighted_mean : Tensor (K,) bool

    Returns
    -------
    Tensor (K,)
    """
    labels = labels.expand(logits.shape[:2])
    log_probs = F.log_softmax(logits.float(), dim=-1)
    log_pt = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    pt = log_pt.exp().clamp(min=PROB_EPS, max=1.0)
    weight = class_weights.gather(1, labels)
    per_item = -weight * (1.0 - pt).pow(gamma.unsqueeze(1)) * log_pt
    norm = torch.where(weighted_mean, weight.sum(1), torch.full_like(gamma, labels.shape[1]))
    return per_item.sum(1) / norm


def stack_constants(constants: list[LossConstants], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The (class_weights, gamma, weighted_mean) tensors of `stacked_loss` for a bank."""
    weights = torch.tensor([c.class_weights for c in constants], dtype=torch.float32, device=device)
    gamma = torch.tensor([c.gamma for c in constants], dtype=torch.float32, device=device)
    weighted = torch.tensor([c.weighted_mean for c in constants], dtype=torch.bool, device=device)
    return weights, gamma, weighted
