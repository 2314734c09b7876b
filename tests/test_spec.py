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


class TestLoadContract:
    """spec.load(checkpoint) -> module or (module, report): headcache fingerprints the module itself."""

    class _Spec:
        def __init__(self, report):
            self.report, self.seen = report, []

        def load(self, checkpoint):
            self.seen.append(checkpoint)
            module = torch.nn.Linear(2, 3)
            return module if self.report == "module only" else (module, self.report)

        dataset = collate = encode = None

    @pytest.mark.parametrize("report", ["module only", None, {"source": "folder", "keys": ["a.b"]}])
    def test_module_mapping_or_none(self, tmp_path, report):
        from headcache.checkpoint import fingerprint
        from headcache.spec import load_backbone

        folder = tmp_path / "weights"
        folder.mkdir()
        (folder / "w.bin").write_bytes(b"1234")
        spec = self._Spec(report)
        module, loaded = load_backbone(spec, folder)
        assert spec.seen == [folder] and not module.training and not module.weight.requires_grad
        assert loaded.fingerprint == fingerprint(module) and loaded.loaded == 2 and loaded.values == 9
        assert loaded.spec_report == (report if isinstance(report, dict) else {})
        assert loaded.format == "spec load()" and len(loaded.checkpoint_sha256) == 64

    def test_a_load_report_is_kept_and_checkpoint_may_be_none(self):
        from headcache.checkpoint import LoadReport
        from headcache.spec import load_backbone

        given = LoadReport("x", "state_dict", 1, 1, {}, ["old.head"], "not-this", "abc")
        _, loaded = load_backbone(self._Spec(given), None)
        assert loaded.spec_report["unexpected"] == ["old.head"] and loaded.fingerprint != "not-this"
        assert loaded.path == "" and loaded.checkpoint_sha256 == ""
        assert LoadReport.from_dict({**loaded.to_dict(), "later_field": 1}).spec_report == loaded.spec_report

    def test_anything_else_is_a_spec_error(self):
        from headcache.spec import load_backbone

        with pytest.raises(SpecError, match="a report of type int; expected a LoadReport, a mapping or None"):
            load_backbone(self._Spec(0), None)
        with pytest.raises(SpecError, match="not JSON-able"):
            load_backbone(self._Spec({"weights": object()}), None)


def test_checkpoint_sha256_of_a_folder_follows_names_and_bytes(tmp_path):
    from headcache.checkpoint import checkpoint_sha256

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "sub").mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert checkpoint_sha256(a) == checkpoint_sha256(b)  # the location does not count
    (b / "sub" / "w.bin").write_bytes(b"\x00\x02")
    assert checkpoint_sha256(a) != checkpoint_sha256(b)
    (b / "sub" / "w.bin").rename(b / "sub" / "v.bin")
    (b / "sub" / "v.bin").write_bytes(b"\x00\x01")
    assert checkpoint_sha256(a) != checkpoint_sha256(b)  # a renamed file does
