"""Resolving --spec: built-in names, module paths, file paths; refusals name the fix."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO

from headcache.devices import resolve_device, to_device
from headcache.errors import ConfigError, SpecError
from headcache.spec import resolve_spec


def test_builtin_module_and_file_spellings(tiny_options):
    builtin = resolve_spec("seqsetvae", tiny_options)
    by_module = resolve_spec("headcache.backbones.seqsetvae:make_spec", tiny_options)
    assert builtin.name == by_module.name == "seqsetvae"
    assert len(builtin.dataset("train")) == len(by_module.dataset("train")) > 0
    toy = resolve_spec(str(REPO / "tests" / "data" / "toy_spec.py") + ":make_spec", {"n": "3"})
    assert toy.name == "toy" and len(toy.dataset("train")) == 3


def test_object_missing_members_is_refused(tmp_path):
    spec_file = tmp_path / "half.py"
    spec_file.write_text("class Half:\n    def dataset(self, split): return []\n\ndef make(): return Half()\n")
    with pytest.raises(SpecError, match="no backbone \\(or load\\), collate, encode"):
        resolve_spec(f"{spec_file}:make")


def test_missing_function_is_named(tmp_path):
    spec_file = tmp_path / "empty.py"
    spec_file.write_text("x = 1\n")
    with pytest.raises(SpecError, match="has no function 'make_spec'"):
        resolve_spec(f"{spec_file}:make_spec")


def test_a_spec_file_that_fails_to_import_says_why(tmp_path):
    spec_file = tmp_path / "broken.py"
    spec_file.write_text("raise RuntimeError('no GPU driver')\n")
    with pytest.raises(SpecError, match="importing .*broken.py failed: RuntimeError: no GPU driver"):
        resolve_spec(f"{spec_file}:make_spec")


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_to_device_walks_nested_structures():
    moved = to_device({"a": [torch.zeros(1), (torch.ones(1), 3)]}, torch.device("cpu"))
    assert torch.equal(moved["a"][1][0], torch.ones(1)) and moved["a"][1][1] == 3
