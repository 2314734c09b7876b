"""Key maps on every entry point (issue 10 item 1): no --key-map -> detected; --key-map given -> exactly that.

Each entry point is tried as a user reaches it, through the CLI and through the
Python API (headcache.extract, headcache.bench, headcache.export), with the
checkpoint layouts people have: a Lightning module that keeps the backbone as
``self.model`` (next to a decoder and a mask token), a DDP ``module.`` state
dict, a torch.compile ``_orig_mod.`` one, and a .safetensors file.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import TOY
from typer.testing import CliRunner

import headcache
from headcache.cli import app
from headcache.config import ExtractConfig, TrainConfig
from headcache.errors import CheckpointError
from headcache.store import CacheReader

runner = CliRunner(env={"COLUMNS": "200"})
OPTIONS = {"n": "16"}
CONFIG = ExtractConfig(device="cpu", dtype="float32", batch_size=8)
EXTRAS = {"decoder.w": torch.ones(3, 2), "mask_token": torch.zeros(4)}  # not backbone: reported, ignored
LAYOUTS = {  # name -> (file name, expected map)
    "lightning": ("model.ckpt", {"model.": ""}),
    "ddp": ("ddp.pt", {"module.": ""}),
    "compiled": ("compiled.pt", {"_orig_mod.": ""}),
    "safetensors": ("model.safetensors", {"model.": ""}),
}


def _write(layout: str, state: dict[str, torch.Tensor], folder) -> object:
    name, key_map = LAYOUTS[layout]
    [(prefix, _)] = key_map.items()
    prefixed = {prefix + key: tensor for key, tensor in state.items()}
    if layout in ("lightning", "safetensors"):
        prefixed.update({prefix + key: tensor for key, tensor in EXTRAS.items()})
    path = folder / name
    if layout == "lightning":
        torch.save({"state_dict": prefixed, "epoch": 3, "global_step": 30}, path)
    elif layout == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in prefixed.items()}, str(path))
    else:
        torch.save(prefixed, path)
    return path


@pytest.fixture(scope="module")
def plain(toy_checkpoint, tmp_path_factory):
    """The cache, its tokens and a trained run from the toy checkpoint as it is (no prefix)."""
    folder = tmp_path_factory.mktemp("plain")
    result = headcache.extract(TOY, toy_checkpoint, folder / "plain.h5", CONFIG, spec_options=OPTIONS)
    assert result.load_report.key_map == {}
    run = headcache.train(folder / "plain.h5", folder / "run", TrainConfig(epochs=1, batch_size=4, device="cpu"))
    return {"report": result.load_report, "tokens": _tokens(folder / "plain.h5"), "run": run.run_dir}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, toy_checkpoint, tmp_path_factory):
    path = _write(request.param, torch.load(toy_checkpoint), tmp_path_factory.mktemp(request.param))
    return request.param, path, LAYOUTS[request.param][1]


def _tokens(cache) -> dict[str, np.ndarray]:
    with CacheReader(cache) as reader:
        return {split: reader.split(split).tokens() for split in reader.splits}


def _expected_unexpected(name: str, key_map: dict[str, str]) -> list[str]:
    [(prefix, _)] = key_map.items()
    return sorted(prefix + key for key in EXTRAS) if name in ("lightning", "safetensors") else []


class TestPythonAPI:
    def test_extract_detects_the_map_and_writes_the_plain_checkpoints_cache(self, layout, plain, tmp_path):
        name, path, key_map = layout
        result = headcache.extract(TOY, path, tmp_path / "c.h5", CONFIG, spec_options=OPTIONS)
        report = result.load_report
        assert report.key_map == key_map and report.unexpected == _expected_unexpected(name, key_map)
        assert report.fingerprint == plain["report"].fingerprint
        assert f"prefix map: {next(iter(key_map))!r} -> ''" in report.summary()
        with CacheReader(tmp_path / "c.h5") as reader:
            assert reader.load_report["key_map"] == key_map  # the cache records which map was chosen
        tokens = _tokens(tmp_path / "c.h5")
        assert all(np.array_equal(tokens[s], plain["tokens"][s]) for s in plain["tokens"])

    def test_a_given_map_is_used_exactly(self, layout, tmp_path):
        name, path, key_map = layout
        with pytest.raises(CheckpointError, match="missing"):  # {} given: keys as they are, no detection
            headcache.extract(TOY, path, tmp_path / "none.h5", ExtractConfig(device="cpu", key_map={}),
                              spec_options=OPTIONS)
        result = headcache.extract(TOY, path, tmp_path / "c.h5", ExtractConfig(device="cpu", key_map=dict(key_map)),
                                   spec_options=OPTIONS)
        assert result.load_report.key_map == key_map

    def test_bench_detects_the_map(self, layout, plain, tmp_path):
        name, path, key_map = layout
        result = headcache.bench(TOY, path, epochs=1, out=tmp_path, spec_options=OPTIONS,
                                 config=TrainConfig(batch_size=4, device="cpu"))
        assert result.max_abs_weight_diff <= result.tolerance and result.split_sizes == {"train": 16, "val": 16}
        with CacheReader(tmp_path / "cache.h5") as reader:
            assert reader.load_report["key_map"] == key_map
            assert reader.backbone_fingerprint == plain["report"].fingerprint

    def test_export_detects_the_map(self, layout, plain, tmp_path, toy_checkpoint):
        name, path, key_map = layout
        result = headcache.export(TOY, path, plain["run"], tmp_path / "model.pt", spec_options=OPTIONS)
        assert result.backbone_fingerprint == plain["report"].fingerprint
        saved = torch.load(tmp_path / "model.pt", weights_only=True)["backbone_state"]
        original = torch.load(toy_checkpoint)
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def _cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


class TestCommandLine:
    def test_extract_detects_the_map_and_prints_it(self, layout, plain, tmp_path):
        name, path, key_map = layout
        result = _cli("extract", "--spec", TOY, "--checkpoint", path, "--out", tmp_path / "c.h5", "--device", "cpu",
                      "--dtype", "float32", "--spec-opt", "n=16")
        assert result.exit_code == 0, result.output
        assert f"prefix map: {next(iter(key_map))!r} -> ''" in result.output
        with CacheReader(tmp_path / "c.h5") as reader:
            assert reader.load_report["key_map"] == key_map
        tokens = _tokens(tmp_path / "c.h5")
        assert all(np.array_equal(tokens[s], plain["tokens"][s]) for s in plain["tokens"])

    def test_extract_uses_a_given_map_exactly(self, layout, tmp_path):
        name, path, key_map = layout
        [(prefix, _)] = key_map.items()
        wrong = _cli("extract", "--spec", TOY, "--checkpoint", path, "--out", tmp_path / "w.h5", "--device", "cpu",
                     "--spec-opt", "n=16", "--key-map", "unrelated.=")
        assert wrong.exit_code == 1 and "missing" in wrong.output and "Traceback" not in wrong.output
        assert not (tmp_path / "w.h5").exists()
        given = _cli("extract", "--spec", TOY, "--checkpoint", path, "--out", tmp_path / "c.h5", "--device", "cpu",
                     "--spec-opt", "n=16", "--key-map", f"{prefix}=")
        assert given.exit_code == 0, given.output
        with CacheReader(tmp_path / "c.h5") as reader:
            assert reader.load_report["key_map"] == key_map

    def test_bench_detects_the_map(self, layout, tmp_path):
        name, path, key_map = layout
        result = _cli("bench", "--spec", TOY, "--checkpoint", path, "--out", tmp_path / "b", "--device", "cpu",
                      "--spec-opt", "n=16", "--epochs", "1", "--batch-size", "4")
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "b" / "bench.json").read_text())["max_abs_weight_diff"] <= 1e-3
        with CacheReader(tmp_path / "b" / "cache.h5") as reader:
            assert reader.load_report["key_map"] == key_map

    def test_export_detects_the_map(self, layout, plain, tmp_path):
        name, path, key_map = layout
        result = _cli("export", "--spec", TOY, "--checkpoint", path, "--run", plain["run"], "--out",
                      tmp_path / "model.pt", "--spec-opt", "n=16")
        assert result.exit_code == 0, result.output
        assert torch.load(tmp_path / "model.pt", weights_only=True)["backbone_fingerprint"] == \
            plain["report"].fingerprint
