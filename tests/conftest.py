"""Shared fixtures: a tiny demo data set in the seed's layout, and caches extracted from it.

The tiny backbone (size="tiny": d=16, 2 transformer layers) and a few dozen
ragged patients keep the whole suite in minutes on 2 CPU cores.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from headcache.backbones.demo import write_demo
from headcache.extract import ExtractConfig, extract

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "seqsetvae_fixture"
TINY_PATIENTS = 80
TOY = str(REPO / "tests" / "data" / "toy_spec.py") + ":make_spec"  # a spec written outside the package


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """DemoFiles (data_dir, checkpoint) of a tiny demo: 80 patients, tiny backbone."""
    return write_demo(tmp_path_factory.mktemp("tiny_demo"), patients=TINY_PATIENTS, seed=0, size="tiny")


@pytest.fixture(scope="session")
def tiny_options(tiny_demo) -> dict[str, str]:
    """--spec-opt pairs of the seqsetvae spec for the tiny demo."""
    return {"data": str(tiny_demo.data_dir), "size": "tiny"}


def _extract(tmp_path_factory, tiny_demo, tiny_options, dtype: str) -> Path:
    out = tmp_path_factory.mktemp(f"cache_{dtype}") / "cache.h5"
    extract("seqsetvae", tiny_demo.checkpoint, out, ExtractConfig(dtype=dtype, device="cpu", batch_size=16),
            spec_options=tiny_options)
    return out


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_demo, tiny_options) -> Path:
    """A float32 cache of the tiny demo (read-only: copy it before changing it)."""
    return _extract(tmp_path_factory, tiny_demo, tiny_options, "float32")


@pytest.fixture(scope="session")
def tiny_cache_f16(tmp_path_factory, tiny_demo, tiny_options) -> Path:
    """A float16 cache of the tiny demo (read-only)."""
    return _extract(tmp_path_factory, tiny_demo, tiny_options, "float16")


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """Weights for tests/data/toy_spec.py's backbone, saved as a plain state dict."""
    sys.path.insert(0, str(REPO / "tests" / "data"))
    import toy_spec

    path = tmp_path_factory.mktemp("toy") / "toy.pt"
    torch.save(toy_spec.ToyBackbone().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def signal_cache(tmp_path_factory) -> Path:
    """A float32 cache written with the store directly: d=16, ragged sequences (3..12 tokens), about 30%
    positives whose tokens lean one way, so heads learn for several epochs (train 160, valid 60, test 60).
    Read-only."""
    import numpy as np

    from headcache.pooling import PARAMETER_FREE_POOLS, pool_parameter_free
    from headcache.store import CacheWriter

    rng = np.random.default_rng(0)
    d, direction = 16, rng.standard_normal(16) / 2
    path = tmp_path_factory.mktemp("signal") / "cache.h5"
    attrs = {"backbone_fingerprint": "signal", "spec": "signal", "checkpoint_sha256": "", "hidden_dim": d,
             "dtype": "float32", "load_report": {}}
    with CacheWriter(path, attrs) as writer:
        sizes = {"train": 160, "valid": 60, "test": 60}
        splits = {name: writer.split(name, n, list(PARAMETER_FREE_POOLS)) for name, n in sizes.items()}
        for name, split in splits.items():
            labels = (rng.random(sizes[name]) < 0.3).astype(np.int64)
            tokens = [(rng.standard_normal((int(rng.integers(3, 13)), d)) + y * direction).astype(np.float32)
                      for y in labels]
            pooled = {pool: np.stack([pool_parameter_free(pool, torch.from_numpy(t)[None],
                                                          torch.ones(1, len(t), dtype=torch.bool))[0].numpy()
                                      for t in tokens]) for pool in PARAMETER_FREE_POOLS}
            split.write(tokens, labels, [f"{name}-{i}" for i in range(len(labels))], pooled)
            split.finish()
    return path
