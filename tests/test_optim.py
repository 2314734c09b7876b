"""The stacked AdamW and per-head clipping are torch's: head k of a bank, trained with its own lr,
weight decay and clip norm, ends where torch.optim.AdamW + clip_grad_norm_ take a lone copy of it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from headcache.head import get_head
from headcache.optim import StackedAdamW, clip_per_head, fused_adamw_works

STEPS = 20
# (lrs, weight decays, clip norms) per head. K = 1: the values the single-run test always used.
# K = 8: heads with their own lr, decay and clip norm (0.05 clips every step, 100 never does), so a
# step that used head 0's value for all would fail the comparison with torch. Against head 0, head 1
# differs only in lr, head 2 only in decay, head 6 only in clip norm; head 7 is head 0 again.
CASES = {
    1: ([1e-2], [1e-3], [0.05]),
    8: ([1e-2, 3e-3, 1e-2, 3e-3, 1e-3, 3e-2, 1e-2, 1e-2],
        [1e-3, 1e-3, 0.0, 0.1, 1e-2, 0.0, 1e-3, 1e-3],
        [0.05, 0.05, 0.05, 0.05, 100.0, 0.05, 100.0, 0.05]),
}


def _schedule(step: int) -> float:
    """A learning-rate factor that changes every step (train changes it every epoch)."""
    return 1.0 - step / (2 * STEPS)


def _train_bank(k: int, fused: bool | None, same_init: bool = False):
    """Train a K-head mlp bank with StackedAdamW + clip_per_head and, beside it, K lone torch copies."""
    lrs, wds, clips = CASES[k]
    bank = get_head("mlp")(k, 6, 2, dropout=[0.0] * k)
    bank.reset_parameters([torch.Generator().manual_seed(1 if same_init else 1 + i) for i in range(k)])
    references = [bank.export(i).train() for i in range(k)]
    torch_opts = [torch.optim.AdamW(r.parameters(), lr=lr, weight_decay=wd) for r, lr, wd in zip(references, lrs, wds)]
    params = list(bank.parameters())
    ours = StackedAdamW(params, torch.tensor(wds), fused=fused)
    generator = torch.Generator().manual_seed(0)
    norms = []
    for step in range(STEPS):
        x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 2, (16,), generator=generator)
        logits = bank.train()(x, [torch.Generator() for _ in range(k)])
        losses = torch.stack([nn.functional.cross_entropy(logits[i], y) for i in range(k)])
        for p in params:
            p.grad = None
        losses.sum().backward()
        ours_norms = clip_per_head(params, torch.tensor(clips))
        ours.step(torch.tensor(lrs) * _schedule(step))
        torch_norms = []
        for reference, opt, lr, clip in zip(references, torch_opts, lrs, clips):
            opt.zero_grad()
            nn.functional.cross_entropy(reference(x), y).backward()
            torch_norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip))
            opt.param_groups[0]["lr"] = lr * _schedule(step)
            opt.step()
        norms.append((ours_norms, torch.stack(torch_norms)))
    return bank, references, ours, norms


@pytest.mark.parametrize("fused", [None, False], ids=["default", "foreach"])
@pytest.mark.parametrize("k", sorted(CASES))
def test_stacked_adamw_and_clipping_match_torch_per_head(k, fused):
    bank, references, ours, norms = _train_bank(k, fused)
    assert ours.fused is (fused is None)  # CPU torch >= 2.4 has the fused kernel: the default takes it
    for ours_norms, torch_norms in norms:
        assert torch.allclose(ours_norms, torch_norms, rtol=1e-5, atol=1e-7)
    for i, reference in enumerate(references):
        exported = bank.export(i).state_dict()
        for name, tensor in reference.state_dict().items():
            if tensor.dtype.is_floating_point:
                assert torch.allclose(exported[name], tensor, atol=2e-6), (i, name)


def test_fused_and_foreach_paths_take_the_same_steps():
    fused_bank, *_ = _train_bank(8, None)
    foreach_bank, *_ = _train_bank(8, False)
    for (name, a), b in zip(fused_bank.state_dict().items(), foreach_bank.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_each_head_gets_its_own_lr_decay_and_clip():
    """From one initialisation and the same batches, heads that differ in one setting end apart (they
    would end equal if the step read one lr, decay or clip norm for all) and identical heads end equal."""
    bank, *_ = _train_bank(8, None, same_init=True)
    w = bank.w_in.detach()
    gap = lambda i, j: float((w[i] - w[j]).abs().max())  # noqa: E731
    assert gap(0, 1) > 1e-3  # lr 1e-2 vs 3e-3
    assert gap(0, 2) > 1e-5  # decay 1e-3 vs 0
    assert gap(0, 6) > 1e-3  # clip 0.05 vs 100
    assert gap(0, 7) < 1e-7


def test_fused_detection_answers_false_where_the_kernel_is_missing():
    assert fused_adamw_works(torch.device("cpu"), torch.float32)
    assert not fused_adamw_works(torch.device("meta"), torch.float32)  # no fused AdamW for the meta device
    params = [nn.Parameter(torch.zeros(2, 3, device="meta"))]
    assert StackedAdamW(params, torch.zeros(2, device="meta")).fused is False
