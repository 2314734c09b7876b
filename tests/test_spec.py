"""Resolving --spec: built-in names, module paths, file paths; refusals name the fix."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO

from headcache.devices import resolve_device, to_device
from headcache.errors import CheckpointError, ConfigError, DataError, SpecError
from headcache.spec import check_encode_output, load_backbone, resolve_spec, spec_member


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


@pytest.mark.parametrize("text", ["meta", "mps" if not torch.backends.mps.is_available() else "meta", "cuda:x",
                                  "cpu:0", "CUDA"])
def test_devices_other_than_auto_cpu_cuda_are_refused_naming_the_flag(text):
    """torch.device accepts meta (tensors without data) and mps anywhere; a run on them fails far from the flag."""
    with pytest.raises(ConfigError, match=f"--device '?{text}'?"):
        resolve_device(text)


def test_a_factory_error_is_a_spec_error_naming_the_factory_and_the_options(tmp_path):
    spec_file = tmp_path / "picky.py"
    spec_file.write_text("def make_spec(n='1'):\n    return int(n)\n")
    with pytest.raises(SpecError, match=r"factory make_spec raised ValueError: .*'x'.*--spec-opt n=x") as caught:
        resolve_spec(f"{spec_file}:make_spec", {"n": "x"})
    assert isinstance(caught.value.__cause__, ValueError)  # chained, so --debug shows where it failed


def test_a_missing_required_option_is_named_as_a_flag(tmp_path):
    spec_file = tmp_path / "needs.py"
    spec_file.write_text("def make_spec(root, n='1'):\n    return None\n")
    with pytest.raises(SpecError, match="needs --spec-opt root=VALUE"):
        resolve_spec(f"{spec_file}:make_spec")


def test_spec_member_names_the_member_and_keeps_headcache_errors():
    with pytest.raises(SpecError, match=r"spec.collate \(2 items\) raised KeyError: 'x'"):
        with spec_member("collate", "2 items"):
            {}["x"]
    with pytest.raises(DataError, match="^bad file$"):  # the spec's own message passes through
        with spec_member("dataset"):
            raise DataError("bad file")


H, M = torch.zeros(2, 5, 3), torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize("output,got", [
    ((H[0], M), r"hidden \[5, 3\]"), ((H.unsqueeze(1), M), r"hidden \[2, 1, 5, 3\]"), ((H, M[:, :4]), r"mask \[2, 4\]"),
    ((H[:1], M[:1]), r"hidden \[1, 5, 3\]"), ((H.long(), M), "int64"), ((H.numpy(), M), r"\(ndarray, Tensor\)"),
    ((H, M, H), "tuple of 3"), (None, "NoneType"),
])
def test_check_encode_output_refuses_what_breaks_the_contract(output, got):
    with pytest.raises(SpecError, match=f"spec.encode returned .*{got}.*; expected .*B=2"):
        check_encode_output(output, batch_size=2)


def test_check_encode_output_accepts_the_contract():
    hidden, mask = check_encode_output([H, M.int()], batch_size=2)  # a list and an integer mask are fine
    assert hidden is H and torch.equal(mask, M.int())
    layered = H.unsqueeze(1).expand(-1, 3, -1, -1)
    assert check_encode_output((layered, M), batch_size=2, layers=(0, 2, 4))[0] is layered  # 4-D with layers
    with pytest.raises(SpecError, match=r"\[B, 3, T, D\]"):
        check_encode_output((layered[:, :2], M), batch_size=2, layers=(0, 2, 4))
    with pytest.raises(SpecError, match=r"returned hidden \[2, 5, 3\].*expected \(hidden \[B, 3, T, D\]"):
        check_encode_output((H, M), batch_size=2, layers=(0, 2, 4))  # several layers named, one given
    assert check_encode_output((H, M), batch_size=2, layers=(4,))[0] is H  # one layer named: [B, T, D] is fine


def test_nan_weights_are_refused_when_the_backbone_is_loaded(tmp_path):
    state = {"weight": torch.eye(2), "bias": torch.tensor([0.0, float("inf")])}
    path = tmp_path / "broken.pt"
    torch.save(state, path)

    class Spec:
        def load(self, checkpoint):  # weights another way, so no random init draws from the global RNG
            module = torch.nn.Module()
            module.weight, module.bias = (torch.nn.Parameter(t) for t in torch.load(checkpoint).values())
            return module, None

    with pytest.raises(CheckpointError, match=r"broken.pt: tensor\(s\) bias hold NaN or Inf"):
        load_backbone(Spec(), path)
    state["bias"] = torch.zeros(2)
    torch.save(state, path)
    assert torch.equal(load_backbone(Spec(), path)[0].weight, torch.eye(2))
