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


def assert_user_error(result, *fragments: str) -> None:
    """A CLI result (typer's CliRunner) that is a user error: exit 1, an ``error:`` line, no traceback, and
    every fragment in the output (whitespace folded, so wrapping does not matter)."""
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output, result.output
    flat = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in {result.output!r}"


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


# ---------------------------------------------------------------------------- a spec with layers


class LayeredBackbone(torch.nn.Module):
    """Three layers over ragged sequences of 4 features: an embedding, a GRU over it, a projection of that.
    Causal and per-position, so padding never changes a real position (NOTE [ Padding invariance ])."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = torch.nn.Linear(4, dim)
        self.rnn = torch.nn.GRU(dim, dim, batch_first=True)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedded = torch.tanh(self.embed(x))
        recurrent, _ = self.rnn(embedded)
        return torch.stack([embedded, recurrent, self.out(recurrent) * 2], dim=1)  # (B, 3, T, D)


class LayeredDataset(torch.utils.data.Dataset):
    def __init__(self, split: str, n: int):
        self.split, self.n = split, n
        self.offset = {"train": 0, "valid": 10_000, "test": 20_000}[split]

    def __len__(self) -> int:
        return self.n

    def lengths(self) -> list[int]:
        return [2 + (5 * i) % 11 for i in range(self.n)]

    def __getitem__(self, i: int):
        generator = torch.Generator().manual_seed(self.offset + i)
        label = int(torch.rand((), generator=generator) < 0.4)
        x = torch.randn(self.lengths()[i], 4, generator=generator) + 0.7 * label
        return {"x": x}, label, f"{self.split}-{i:03d}"


class LayeredSpec:
    """A spec whose encode returns hidden [B, 3, T, 8], layer ids 0, 2 and 5 (a spec names its own ids);
    its weights come from `load` (drawn from a fixed seed), so no checkpoint file is needed."""

    name = "layered"
    splits = ("train", "valid", "test")
    num_classes = 2
    layers = [0, 2, 5]
    sizes = {"train": 64, "valid": 32, "test": 32}

    def load(self, checkpoint):
        backbone = LayeredBackbone()
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in backbone.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.6)
        return backbone

    def dataset(self, split: str) -> LayeredDataset:
        return LayeredDataset(split, self.sizes[split])

    def collate(self, inputs: list) -> dict:
        lengths = torch.tensor([len(item["x"]) for item in inputs])
        x = torch.zeros(len(inputs), int(lengths.max()), 4)
        for b, item in enumerate(inputs):
            x[b, :len(item["x"])] = item["x"]
        return {"x": x, "lengths": lengths}

    def encode(self, backbone, batch):
        mask = torch.arange(batch["x"].shape[1]) < batch["lengths"].unsqueeze(1)
        return backbone(batch["x"]), mask


@pytest.fixture(scope="session")
def layered_spec() -> LayeredSpec:
    return LayeredSpec()


@pytest.fixture(scope="session")
def layered_backbone(layered_spec) -> torch.nn.Module:
    """LayeredSpec's backbone, loaded as extraction loads it (frozen, eval mode)."""
    from headcache.spec import load_backbone

    return load_backbone(layered_spec, None)[0]


def _extract_layered(tmp_path_factory, dtype: str, token_layers: str) -> Path:
    out = tmp_path_factory.mktemp(f"layered_{dtype}_{token_layers}") / "cache.h5"
    config = ExtractConfig(dtype=dtype, device="cpu", batch_size=16, token_layers=token_layers)
    extract(LayeredSpec(), None, out, config)
    return out


@pytest.fixture(scope="session")
def layered_cache(tmp_path_factory) -> Path:
    """A float32 cache of LayeredSpec: layers 0, 2, 5 pooled, and the tokens of all three (read-only)."""
    return _extract_layered(tmp_path_factory, "float32", "all")


@pytest.fixture(scope="session")
def layered_cache_f16(tmp_path_factory) -> Path:
    """The float16 cache of LayeredSpec, tokens of all three layers (read-only)."""
    return _extract_layered(tmp_path_factory, "float16", "all")


@pytest.fixture(scope="session")
def layered_cache_last_tokens(tmp_path_factory) -> Path:
    """A float32 cache of LayeredSpec that keeps the tokens of its last layer (5) only (read-only)."""
    return _extract_layered(tmp_path_factory, "float32", "last")
