"""Classification heads, stacked: K independent heads evaluated as one computation.

A single `train` run is a bank of K = 1; a sweep puts K heads into one bank so
each step is one forward and one backward for all of them. Every head owns its
slice of each stacked weight and its own random generator (initialisation and
dropout masks), so head k of a bank computes exactly what a bank holding only
head k computes. `export` turns one slice back into plain `nn` modules for
deployment.

Heads:
- ``mlp`` (the seed's): Linear(D, H) -> BatchNorm1d -> ReLU -> Dropout -> Linear(H, C),
  H = D // 2 by default; Xavier-uniform weights, zero biases. It runs on whole
  batches (the seed ran it one patient at a time, where BatchNorm cannot train).
  The first Linear has no bias: BatchNorm subtracts the batch mean, so that
  bias has no effect on any output and its gradient is pure rounding noise,
  which Adam scales up to full-size steps (measured: 4e-3 of drift in 20
  steps). Without it, runs that compute the same function reach the same weights.
- ``linear``: Linear(D, C).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from headcache.errors import ConfigError
from headcache.pooling import LayerMix, LearnedQueryPool, TokenBatch

BATCHNORM_MOMENTUM = 0.1
BATCHNORM_EPS = 1e-5


class HeadBank(nn.Module):
    """K heads of one kind and width, stored as stacked tensors (the kinds are the subclasses in HEADS).

    Parameters
    ----------
    num_heads : int
        K.
    in_dim : int
        D, the pooled feature size.
    num_classes : int
        C.
    hidden : int, optional
        H for the mlp head (default D // 2; the linear head takes and ignores it, so that every
        constructor in HEADS is called the same way).
    dropout : sequence of float, optional
        Dropout probability per head (mlp only; default 0.1 each).
    """

    kind: str  # its name in HEADS

    def __init__(self, num_heads: int, in_dim: int, num_classes: int):
        super().__init__()
        self.num_heads, self.in_dim, self.num_classes = num_heads, in_dim, num_classes

    def reset_parameters(self, generators: list[torch.Generator]) -> None:
        """Xavier-uniform weights and zero biases, head k drawn from generators[k]."""
        with torch.no_grad():
            for k, generator in enumerate(generators):
                for weight in self._weights():
                    fan_in, fan_out = weight.shape[1], weight.shape[2]
                    bound = math.sqrt(6.0 / (fan_in + fan_out))
                    weight[k].uniform_(-bound, bound, generator=generator)
            for name, param in self.named_parameters():
                if name.startswith("b_"):
                    param.zero_()

    def _weights(self) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """x (B, D) shared by all heads or (K, B, D) -> logits (K, B, C).

        In training mode the mlp head's dropout masks come from ``generators``
        (one per head), never from the global random state.
        """
        raise NotImplementedError

    def export(self, k: int) -> nn.Sequential:
        """Head k as plain modules, in eval mode, for deployment."""
        raise NotImplementedError

    @staticmethod
    def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (B, D) shared or (K, B, D), weight (K, D, H) -> (K, B, H).

        A shared x is expanded (a view, no copy), so both cases are one bmm whose
        per-head products do not depend on K (einsum folds the heads into one
        wider matmul instead, at twice the time for K = 32 on a CPU).
        """
        out = torch.bmm(x.expand(weight.shape[0], -1, -1) if x.dim() == 2 else x, weight)
        return out if bias is None else out + bias.unsqueeze(1)

    def head_state(self, k: int) -> dict[str, Tensor]:
        """Head k's slice of every tensor (a copy), to keep the best weights."""
        return {name: t[k].detach().clone() for name, t in self.state_dict().items()}

    def load_head_state(self, k: int, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor[k].copy_(state[name])


class LinearHeadBank(HeadBank):
    """K heads Linear(D, C)."""

    kind = "linear"

    def __init__(self, num_heads: int, in_dim: int, num_classes: int, hidden: int | None = None,
                 dropout: list[float] | None = None):
        super().__init__(num_heads, in_dim, num_classes)
        self.hidden = 0
        self.w_out = nn.Parameter(torch.zeros(num_heads, in_dim, num_classes))
        self.b_out = nn.Parameter(torch.zeros(num_heads, num_classes))
        self.register_buffer("dropout_p", torch.zeros(num_heads))

    def _weights(self) -> list[Tensor]:
        return [self.w_out]

    def forward(self, x: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        return self._linear(x, self.w_out, self.b_out)

    def export(self, k: int) -> nn.Sequential:
        with torch.no_grad():
            out = nn.Linear(self.in_dim, self.num_classes)
            out.weight.copy_(self.w_out[k].T)
            out.bias.copy_(self.b_out[k])
            return nn.Sequential(out).eval()


class MLPHeadBank(HeadBank):
    """K of the seed's heads: Linear(D, H, no bias) -> BatchNorm1d -> ReLU -> Dropout -> Linear(H, C)."""

    kind = "mlp"

    def __init__(self, num_heads: int, in_dim: int, num_classes: int, hidden: int | None = None,
                 dropout: list[float] | None = None):
        super().__init__(num_heads, in_dim, num_classes)
        k = num_heads
        self.hidden = hidden or in_dim // 2
        h = self.hidden
        self.w_in = nn.Parameter(torch.zeros(k, in_dim, h))
        self.bn_weight = nn.Parameter(torch.ones(k, h))
        self.bn_bias = nn.Parameter(torch.zeros(k, h))
        self.register_buffer("running_mean", torch.zeros(k, h))
        self.register_buffer("running_var", torch.ones(k, h))
        self.w_out = nn.Parameter(torch.zeros(k, h, num_classes))
        self.b_out = nn.Parameter(torch.zeros(k, num_classes))
        p = torch.tensor(dropout if dropout is not None else [0.1] * k, dtype=torch.float32)
        self.register_buffer("dropout_p", p)

    def _weights(self) -> list[Tensor]:
        return [self.w_in, self.w_out]

    def reset_parameters(self, generators: list[torch.Generator]) -> None:
        super().reset_parameters(generators)
        with torch.no_grad():
            self.bn_weight.fill_(1.0)
            self.bn_bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def forward(self, x: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        z = self._linear(x, self.w_in)
        z = self._batch_norm(z)
        z = torch.relu(z)
        if self.training:
            z = z * self._dropout_mask(z, generators)
        return self._linear(z, self.w_out, self.b_out)

    def _batch_norm(self, z: Tensor) -> Tensor:
        if self.training:
            mean = z.mean(dim=1)
            # not z.var(dim=1): its kernel is slow across the middle axis (1.2 ms vs 0.03 ms at K = 32)
            var = (z - mean.unsqueeze(1)).pow(2).mean(dim=1)
            with torch.no_grad():
                n = z.shape[1]
                unbiased = var * (n / max(n - 1, 1))
                self.running_mean.lerp_(mean, BATCHNORM_MOMENTUM)
                self.running_var.lerp_(unbiased, BATCHNORM_MOMENTUM)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.bn_weight * torch.rsqrt(var + BATCHNORM_EPS)
        return (z - mean.unsqueeze(1)) * scale.unsqueeze(1) + self.bn_bias.unsqueeze(1)

    def _dropout_mask(self, z: Tensor, generators: list[torch.Generator] | None) -> Tensor:
        if generators is None or len(generators) != self.num_heads:
            raise ValueError("training the mlp head needs one dropout generator per head")
        keep = (1.0 - self.dropout_p).view(-1, 1, 1)
        # one uniform draw per unit and head, kept where below the head's keep rate: half the generator
        # work of bernoulli_ on a CPU, and no per-head host sync
        uniform = torch.stack([torch.rand(z.shape[1:], device=z.device, generator=g) for g in generators])
        return (uniform < keep) / keep

    def export(self, k: int) -> nn.Sequential:
        with torch.no_grad():
            first = nn.Linear(self.in_dim, self.hidden, bias=False)
            first.weight.copy_(self.w_in[k].T)
            norm = nn.BatchNorm1d(self.hidden, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)
            norm.weight.copy_(self.bn_weight[k])
            norm.bias.copy_(self.bn_bias[k])
            norm.running_mean.copy_(self.running_mean[k])
            norm.running_var.copy_(self.running_var[k])
            out = nn.Linear(self.hidden, self.num_classes)
            out.weight.copy_(self.w_out[k].T)
            out.bias.copy_(self.b_out[k])
            p = float(self.dropout_p[k])
            return nn.Sequential(first, norm, nn.ReLU(), nn.Dropout(p), out).eval()


# Name -> constructor (num_heads, in_dim, num_classes, hidden=None, dropout=None): every head there is.
HEADS: dict[str, type[HeadBank]] = {"mlp": MLPHeadBank, "linear": LinearHeadBank}


def get_head(head: str | type[HeadBank] | HeadBank) -> type[HeadBank] | HeadBank:
    """The constructor of a head by name (``--head``); a HeadBank class or object passes through.

    Raises
    ------
    ConfigError
        An unknown name; the message lists the valid ones.
    """
    if isinstance(head, HeadBank) or (isinstance(head, type) and issubclass(head, HeadBank)):
        return head
    if head not in HEADS:
        raise ConfigError(f"--head must be one of {', '.join(HEADS)}; got {head!r}")
    return HEADS[head]


class HeadModel(nn.Module):
    """A layer mix (if any), a learnable pool (if any), then a bank of heads: what a run trains and a head
    file holds.

    With a `LayerMix`, the features carry a layer axis (pooled (.., L, D), or a TokenBatch (.., L, T, D))
    and the mix picks or mixes each head's layers first; the learned pool then pools the mixed tokens
    (NOTE [ One seam ] in pooling.py).
    """

    def __init__(self, bank: HeadBank, pool: LearnedQueryPool | None, mix: LayerMix | None = None):
        super().__init__()
        self.bank, self.pool, self.mix = bank, pool, mix

    def forward(self, features: Tensor | TokenBatch, generators: list[torch.Generator] | None = None) -> Tensor:
        if self.mix is not None:
            features = self.mix(features)
        if isinstance(features, TokenBatch):
            features = self.pool(features.hidden, features.mask)
        return self.bank(features, generators)

    def head_state(self, k: int) -> dict[str, Tensor]:
        """Head k's tensors (copies, on the CPU): what a head file stores. A learned layer mix adds its
        logits (L,) as ``mix.logits``; a head reading one fixed layer stores what a one-layer run stores."""
        state = {f"bank.{n}": t for n, t in self.bank.head_state(k).items()}
        if self.pool is not None:
            state["pool.query"] = self.pool.query[k].detach().clone()
        if self.mix is not None and self.mix.is_learned(k):
            state["mix.logits"] = self.mix.logits[k].detach().clone()
        return {n: t.cpu() for n, t in state.items()}

    def load_head_state(self, k: int, state: dict[str, Tensor]) -> None:
        """Put head k at ``state`` (from `head_state`, or a head file: one written before layers loads as
        before, having no ``mix.logits``)."""
        self.bank.load_head_state(k, {n[len("bank."):]: t for n, t in state.items() if n.startswith("bank.")})
        with torch.no_grad():
            if self.pool is not None:
                self.pool.query[k].copy_(state["pool.query"])
            if self.mix is not None and self.mix.is_learned(k):
                self.mix.logits[k].copy_(state["mix.logits"])
