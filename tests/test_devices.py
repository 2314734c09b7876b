"""Every device this machine has (the CPU, and CUDA where present): extraction, cached = live, and a bank of
heads = its heads alone, on that device. Marked ``cuda`` so that `benchmarks/gpu.sh` runs them on a GPU
machine (`pytest -m cuda`); without a GPU they run on the CPU, like the rest of the suite."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TOY

from headcache.config import TrainConfig
from headcache.extract import ExtractConfig, extract
from headcache.features import CachedFeatures, LiveFeatures
from headcache.spec import load_backbone, resolve_spec
from headcache.store import CacheReader
from headcache.train import fit, tasks_for_splits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = 1e-4  # float32 on a GPU: other kernels than the CPU's, and TF32 off by default in matmuls
pytestmark = [pytest.mark.cuda, pytest.mark.parametrize("device", DEVICES)]


@pytest.fixture(scope="module")
def cpu_cache(tmp_path_factory, toy_checkpoint):
    out = tmp_path_factory.mktemp("cpu") / "cache.h5"
    extract(TOY, toy_checkpoint, out, ExtractConfig(dtype="float32", device="cpu", batch_size=8),
            spec_options={"n": "48"})
    return out


def _device_cache(tmp_path, toy_checkpoint, device):
    out = tmp_path / "cache.h5"
    extract(TOY, toy_checkpoint, out, ExtractConfig(dtype="float32", device=device, batch_size=8),
            spec_options={"n": "48"})
    return out


def test_extraction_on_the_device_equals_the_cpu(tmp_path, toy_checkpoint, cpu_cache, device):
    with CacheReader(_device_cache(tmp_path, toy_checkpoint, device)) as a, CacheReader(cpu_cache) as b:
        for name in b.splits:
            assert a.split(name).ids == b.split(name).ids
            np.testing.assert_allclose(a.split(name).tokens(), b.split(name).tokens(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("pool", ["meanq", "learned"])
def test_cached_equals_live_on_the_device(tmp_path, toy_checkpoint, device, pool):
    cache = _device_cache(tmp_path, toy_checkpoint, device)
    spec = resolve_spec(TOY, {"n": "48"})
    backbone, _ = load_backbone(spec, toy_checkpoint)
    target = torch.device(device)
    sources = [CachedFeatures(cache, pool=pool, device=target),
               LiveFeatures(spec, backbone.to(target), pool=pool, dtype="float32", device=target)]
    config = TrainConfig(pool=pool, epochs=3, patience=3, device=device, batch_size=8)
    cached, live = (fit(s, tasks_for_splits([config], s, ("train", "val", "test")), num_classes=2,
                        hidden_dim=8)[0] for s in sources)
    for name in cached.last_state:
        assert float((cached.last_state[name] - live.last_state[name]).abs().max()) <= TOLERANCE


def test_a_bank_equals_its_heads_alone_on_the_device(cpu_cache, device):
    source = CachedFeatures(cpu_cache, pool="meanq", device=torch.device(device))
    configs = [TrainConfig(lr=lr, weight_decay=wd, epochs=3, patience=3, device=device, batch_size=8)
               for lr in (1e-4, 1e-3, 3e-3) for wd in (0.0, 1e-2)]
    splits = ("train", "val", "test")
    bank = fit(source, tasks_for_splits(configs, source, splits), num_classes=2, hidden_dim=8)
    for config, in_bank in zip(configs, bank):
        [alone] = fit(source, tasks_for_splits([config], source, splits), num_classes=2, hidden_dim=8)
        for name in alone.last_state:
            assert float((alone.last_state[name] - in_bank.last_state[name]).abs().max()) <= TOLERANCE
    assert float((bank[0].last_state["bank.w_out"] - bank[-1].last_state["bank.w_out"]).abs().max()) > 1e-3
