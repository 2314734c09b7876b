"""The optimizer of a bank of K heads: AdamW with a learning rate and weight decay per head, and
per-head gradient clipping."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class StackedAdamW:
    """AdamW over stacked (K, ...) parameters with a learning rate and weight decay per head.

    The update is torch.optim.AdamW's. torch's fused AdamW kernel (the one
    behind ``AdamW(fused=True)``) takes one lr and weight decay, so it runs once
    for all heads with lr 1 and no decay, writing the Adam step
    -m_hat / (sqrt(v_hat) + eps) into scratch tensors; two broadcast ops then
    apply each head's decay and lr. That is a few passes over the weights
    instead of the dozen a broadcast formula makes, and those passes are what
    bound a CPU bank of many heads (32 mlp heads: 6.2 ms -> 0.6 ms per step).
    """

    def __init__(self, params: list[nn.Parameter], weight_decay: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.weight_decay = weight_decay
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.direction = [torch.zeros_like(p) for p in params]
        self.step_count = torch.zeros((), device=params[0].device)  # the fused kernel reads it as a tensor

    @torch.no_grad()
    def step(self, lr: Tensor) -> None:
        self.step_count += 1
        torch._foreach_zero_(self.direction)
        torch._fused_adamw_(self.direction, [p.grad for p in self.params], self.exp_avg, self.exp_avg_sq, [],
                            [self.step_count] * len(self.params), lr=1.0, beta1=self.beta1, beta2=self.beta2,
                            weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
        decay = 1 - lr * self.weight_decay
        for p, direction in zip(self.params, self.direction):
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.mul_(decay.view(shape)).addcmul_(direction, lr.view(shape))


def clip_per_head(params: list[nn.Parameter], max_norm: Tensor) -> Tensor:
    """Scale each head's gradients so their joint norm is at most max_norm[k] (as clip_grad_norm_)."""
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1)
                                                  for p in params]), dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view((-1,) + (1,) * (p.dim() - 1)))
    return norms
