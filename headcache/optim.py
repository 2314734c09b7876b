"""The optimizer of a bank of K heads: AdamW with a learning rate and weight decay per head, and
per-head gradient clipping. Public torch API only (no ``torch._*`` kernel)."""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def fused_adamw_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` constructs and steps for tensors of this device and dtype.

    Feature-detected as nanoGPT's ``configure_optimizers`` does (the public signature has ``fused``),
    then tried on a one-element tensor: constructing raises for a device without the fused kernel
    and stepping for a dtype it lacks. The exception is the answer, whatever its text says; the
    probe owns its tensor, so a failed step touches no state of the caller.
    """
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    probe = torch.zeros(1, device=device, dtype=dtype)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.AdamW([probe], lr=1.0, weight_decay=0.0, fused=True).step()
    except RuntimeError:  # NotImplementedError is one too
        return False
    return True


class StackedAdamW:
    """AdamW over stacked (K, ...) parameters with a learning rate and weight decay per head.

    The update is torch.optim.AdamW's. AdamW takes one lr and weight decay, so one
    ``torch.optim.AdamW`` with lr 1 and no decay runs over scratch tensors, one per parameter
    (views into one flat buffer, so one op zeroes them all): each scratch starts the step at zero and
    has the parameter's gradient as its ``.grad``, so the step leaves in it the Adam direction
    -m_hat / (sqrt(v_hat) + eps), and the moments live in that optimizer's state. Two broadcast
    ops per parameter then apply each head's decay and lr, as AdamW orders them:
    ``p.mul_(1 - lr_k * wd_k).add_(lr_k * direction)``. The fused kernel (where the device and dtype
    have it; ``foreach`` otherwise) makes that a few passes over the weights instead of the dozen
    a broadcast formula makes, and those passes are what bound a CPU bank of many heads.

    Parameters
    ----------
    params : list of Parameter
        Stacked parameters, head k at index k of dim 0; every one gets a gradient each step.
    weight_decay : Tensor (K,)
        Each head's decoupled weight decay, on the parameters' device.
    betas, eps
        As torch.optim.AdamW's, shared by all heads.
    fused : bool, optional
        None (default): the fused kernel where `fused_adamw_works` says so. False forces the
        ``foreach`` implementation (the same update; tests compare the two).
    """

    def __init__(self, params: list[nn.Parameter], weight_decay: Tensor, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, fused: bool | None = None):
        self.params = params
        self.weight_decay = weight_decay
        first = params[0]  # all on one device with one dtype (one model's): they share one flat buffer
        self.fused = fused_adamw_works(first.device, first.dtype) if fused is None else fused
        self._flat = torch.zeros(sum(p.numel() for p in params), device=first.device, dtype=first.dtype)
        self.direction = [chunk.view_as(p) for chunk, p in zip(self._flat.split([p.numel() for p in params]), params)]
        self._shapes = [(-1,) + (1,) * (p.dim() - 1) for p in params]
        implementation = {"fused": True} if self.fused else {"foreach": True}
        self._adamw = torch.optim.AdamW(self.direction, lr=1.0, betas=betas, eps=eps, weight_decay=0.0,
                                        **implementation)

    @torch.no_grad()
    def step(self, lr: Tensor) -> None:
        """One AdamW step of every head, head k with learning rate lr[k] (a (K,) tensor on the device)."""
        self._flat.zero_()
        for direction, p in zip(self.direction, self.params):
            direction.grad = p.grad
        self._adamw.step()
        decay = 1 - lr * self.weight_decay
        for p, direction, shape in zip(self.params, self.direction, self._shapes):
            p.mul_(decay.view(shape)).addcmul_(direction, lr.view(shape))


def clip_per_head(params: list[nn.Parameter], max_norm: Tensor) -> Tensor:
    """Scale each head's gradients so their joint norm is at most max_norm[k] (as clip_grad_norm_)."""
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1)
                                                  for p in params]), dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view((-1,) + (1,) * (p.dim() - 1)))
    return norms
