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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from headcache.errors import ConfigError

FOCAL_ALPHA_RANGE = (0.25, 0.7)
PROB_EPS = 1e-8


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


def focal_constants(counts: Tensor, focal_gamma: float) -> LossConstants:
    """The seed's focal loss: positives weighted by their clamped ratio in the train labels."""
    if len(counts) != 2:
        raise ConfigError(f"--loss focal is for two classes; this cache has {len(counts)}: use --loss ce or "
                          "weighted-ce")
    alpha = float((counts[1] / counts.sum()).clamp(*FOCAL_ALPHA_RANGE))
    return LossConstants((1.0 - alpha, alpha), float(focal_gamma), False)


def ce_constants(counts: Tensor, focal_gamma: float) -> LossConstants:
    """Plain cross-entropy (``focal_gamma`` does not apply)."""
    return LossConstants((1.0,) * len(counts), 0.0, False)


def weighted_ce_constants(counts: Tensor, focal_gamma: float) -> LossConstants:
    """Cross-entropy with class weights N / (C * N_c), normalised as torch's weighted cross-entropy."""
    weights = counts.sum() / (len(counts) * counts.clamp(min=1))
    return LossConstants(tuple(float(w) for w in weights), 0.0, True)


# Name -> constructor (class counts of the train labels, focal_gamma) -> LossConstants: every loss there is.
LOSSES: dict[str, Callable[[Tensor, float], LossConstants]] = {
    "focal": focal_constants,
    "ce": ce_constants,
    "weighted-ce": weighted_ce_constants,
}


def get_loss(loss: str | LossConstants | Callable[[Tensor, float], LossConstants]
             ) -> LossConstants | Callable[[Tensor, float], LossConstants]:
    """The constructor of a loss by name (``--loss``); built constants or a constructor pass through.

    Raises
    ------
    ConfigError
        An unknown name; the message lists the valid ones.
    """
    if isinstance(loss, LossConstants) or callable(loss):
        return loss
    if loss not in LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    return LOSSES[loss]


def loss_constants(name: str | LossConstants, train_labels: Tensor, num_classes: int,
                   focal_gamma: float = 3.0) -> LossConstants:
    """Derive a loss's constants from the labels it will train on (built constants are returned as they are)."""
    loss = get_loss(name)
    if isinstance(loss, LossConstants):
        return loss
    return loss(torch.bincount(train_labels.cpu(), minlength=num_classes).double(), focal_gamma)


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
