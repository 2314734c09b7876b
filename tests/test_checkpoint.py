"""Verified checkpoint loading: formats, prefix maps, refusals, the load report, fingerprints."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from headcache import checkpoint
from headcache.checkpoint import (
    LoadReport,
    detect_key_map,
    file_sha256,
    fingerprint,
    group_keys,
    load_checkpoint,
    parse_key_map,
    read_state_dict,
)
from headcache.errors import CheckpointError, ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"  # beside the repository root
SEED_CHECKPOINT = SHARED / "seqsetvae_fixture" / "seed_model.ckpt"


class Tiny(nn.Module):
    """7 tensors, 33 values: a Linear and a BatchNorm (buffers, an int64 scalar)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)


class Wrapped(nn.Module):
    """Tiny one level down, as a training module holds its backbone."""

    def __init__(self, name: str):
        super().__init__()
        self.add_module(name, Tiny())


class SetVAEOuter(nn.Module):
    """Keys ``setvae.setvae.*``, like the full SeqSetVAE model's set encoder."""

    def __init__(self):
        super().__init__()
        self.setvae = Wrapped("setvae")


class Opaque:
    """A custom object that weights-only loading refuses."""

    def __init__(self, value):
        self.value = value


def trained_state(offset: float = 0.5) -> dict[str, torch.Tensor]:
    """A Tiny state dict whose every value differs from a fresh Tiny's."""
    state = {}
    for name, tensor in Tiny().state_dict().items():
        if tensor.dtype == torch.int64:
            state[name] = torch.tensor(7)
        else:
            state[name] = torch.arange(tensor.numel(), dtype=tensor.dtype).reshape(tensor.shape) + offset
    return state


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def assert_state_equal(module: nn.Module, state: dict) -> None:
    got = module.state_dict()
    assert sorted(got) == sorted(state)
    for key, tensor in state.items():
        assert torch.equal(got[key], tensor.to(got[key].dtype)), key


@pytest.fixture
def save(tmp_path):
    def save(obj, name: str = "model.ckpt") -> Path:
        path = tmp_path / name
        torch.save(obj, path)
        return path

    return save


class TestFormats:
    def test_lightning_checkpoint_loads_the_state_dict_inside(self, save):
        state = trained_state()
        path = save({"state_dict": state, "epoch": 3, "global_step": 30, "hyper_parameters": {"lr": 0.1}})
        module = Tiny()
        report = load_checkpoint(module, path)
        assert (report.format, report.loaded, report.values, report.key_map, report.unexpected) == (
            "lightning", 7, 33, {}, [])
        assert_state_equal(module, state)

    def test_plain_state_dict_loads(self, save):
        state = trained_state()
        module = Tiny()
        report = load_checkpoint(module, save(state))
        assert (report.format, report.loaded, report.values) == ("state_dict", 7, 33)
        assert_state_equal(module, state)

    def test_model_wrapper_is_unwrapped(self, save):
        state = trained_state()
        module = Tiny()
        assert load_checkpoint(module, save({"model": state, "epoch": 1})).format == "state_dict"
        assert_state_equal(module, state)

    def test_module_wrapper_is_unwrapped(self, save):
        state = trained_state()
        module = Tiny()
        assert load_checkpoint(module, save({"module": state})).format == "state_dict"
        assert_state_equal(module, state)

    def test_non_tensor_entries_of_a_state_dict_are_ignored(self, save):
        sd, fmt = read_state_dict(save({**trained_state(), "_version": 2, "note": "x"}))
        assert (sorted(sd), fmt) == (sorted(trained_state()), "state_dict")

    def test_safetensors_written_by_the_library_loads(self, tmp_path):
        state = trained_state()
        path = tmp_path / "model.safetensors"
        safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
        module = Tiny()
        report = load_checkpoint(module, path)
        assert (report.format, report.loaded, report.values) == ("safetensors", 7, 33)
        assert_state_equal(module, state)

    def test_safetensors_reader_matches_the_library_for_every_dtype(self, tmp_path):
        tensors = {
            "f64": torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3),
            "f32": torch.tensor([1.5, -2.25, 3e-8]),
            "f16": torch.tensor([[0.5, 65504.0]], dtype=torch.float16),
            "bf16": torch.tensor([1.0, -3.5, 1e30], dtype=torch.bfloat16),
            "i64": torch.tensor(-(2**40)),
            "i32": torch.tensor([[-7], [2**30]], dtype=torch.int32),
            "i16": torch.tensor([-300, 300], dtype=torch.int16),
            "i8": torch.tensor([-128, 127], dtype=torch.int8),
            "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),  # odd size: later offsets are unaligned
            "bool": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 4),
            "f8": torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
        }
        path = tmp_path / "all.safetensors"
        safetensors.torch.save_file(tensors, str(path))
        expected = safetensors.torch.load_file(str(path))
        got, fmt = read_state_dict(path)
        assert fmt == "safetensors" and sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
            assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name

    def test_truncated_safetensors_is_refused(self, tmp_path):
        path = tmp_path / "model.safetensors"
        safetensors.torch.save_file(trained_state(), str(path))
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(CheckpointError, match="is not a safetensors checkpoint.*data_offsets"):
            read_state_dict(path)

    def test_safetensors_with_garbage_header_is_refused(self, tmp_path):
        path = tmp_path / "model.safetensors"
        path.write_bytes((5).to_bytes(8, "little") + b"{oops" + b"\0" * 8)
        with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors checkpoint: the header is not JSON"):
            read_state_dict(path)

    def test_pickled_module_loads_with_trust(self, save):
        source = Tiny()
        source.load_state_dict(trained_state())
        module = Tiny()
        report = load_checkpoint(module, save(source), trust=True)
        assert report.format == "module"
        assert_state_equal(module, trained_state())


class TestKeyMap:
    def test_model_prefix_is_stripped(self, save):
        module = Tiny()
        report = load_checkpoint(module, save({"state_dict": prefixed(trained_state(), "model.")}))
        assert (report.key_map, report.unexpected) == ({"model.": ""}, [])
        assert_state_equal(module, trained_state())

    def test_module_prefix_is_stripped(self, save):
        module = Tiny()
        report = load_checkpoint(module, save(prefixed(trained_state(), "module.")))
        assert report.key_map == {"module.": ""}
        assert_state_equal(module, trained_state())

    def test_nested_wrapper_prefixes_are_stripped_at_once(self, save):
        module = Tiny()
        report = load_checkpoint(module, save(prefixed(trained_state(), "module._orig_mod.")))
        assert report.key_map == {"module._orig_mod.": ""}

    def test_setvae_only_checkpoint_maps_to_setvae_setvae(self, save):
        state = {**prefixed(trained_state(), "setvae."), "setvae.decoder.weight": torch.ones(2, 2)}
        module = SetVAEOuter()
        report = load_checkpoint(module, save({"state_dict": state}))
        assert report.key_map == {"setvae.": "setvae.setvae."}
        assert report.unexpected == ["setvae.decoder.weight"]
        assert_state_equal(module, prefixed(trained_state(), "setvae.setvae."))

    def test_missing_prefix_is_added_to_every_key(self, save):
        module = Wrapped("net")
        report = load_checkpoint(module, save(trained_state()))
        assert report.key_map == {"": "net."}
        assert_state_equal(module, prefixed(trained_state(), "net."))

    def test_exact_names_win_a_tie(self, save):
        state = {**trained_state(), **prefixed(trained_state(9.0), "model.")}
        module = Tiny()
        report = load_checkpoint(module, save(state))
        assert report.key_map == {}
        assert report.unexpected == sorted(prefixed(trained_state(), "model."))
        assert_state_equal(module, trained_state())

    def test_explicit_key_map_is_used_as_given(self, save):
        state = prefixed(trained_state(), "net.")
        module = Tiny()
        report = load_checkpoint(module, save(state), key_map={"net.": ""})
        assert report.key_map == {"net.": ""}
        assert_state_equal(module, trained_state())

    def test_explicit_key_map_first_match_wins(self, save):
        state = {"a.weight": torch.ones(4, 3), "a.bias": torch.ones(4),
                 **{k: v for k, v in prefixed(trained_state(), "b.").items() if "norm" in k}}
        module = Tiny()
        report = load_checkpoint(module, save(state), key_map={"a.": "encoder.", "b.norm.": "norm.", "b.": "wrong."})
        assert report.unexpected == []
        assert torch.equal(module.encoder.weight, torch.ones(4, 3))
        assert torch.equal(module.norm.running_var, trained_state()["norm.running_var"])

    def test_explicit_key_map_replaces_detection(self, save):
        module = Tiny()
        with pytest.raises(CheckpointError, match="prefix map tried: 'x.' -> ''"):
            load_checkpoint(module, save(prefixed(trained_state(), "model.")), key_map={"x.": ""})

    def test_detect_strips_the_prefix_that_matches_most(self):
        assert detect_key_map(["a.b.x", "a.b.y", "c.x"], ["b.x", "b.y", "x"]) == {"a.": ""}

    def test_detect_keeps_names_when_nothing_matches_better(self):
        assert detect_key_map(["p.q", "r"], ["s.t"]) == {}

    def test_detect_ignores_prefixes_that_end_inside_a_name(self):
        assert detect_key_map(["xnorm.weight"], ["norm.weight"]) == {}


class TestParseKeyMap:
    def test_items_become_an_ordered_map(self):
        got = parse_key_map(["model.=", "setvae.=setvae.setvae."])
        assert list(got.items()) == [("model.", ""), ("setvae.", "setvae.setvae.")]

    def test_empty_old_adds_a_prefix(self):
        assert parse_key_map(["=backbone."]) == {"": "backbone."}

    def test_new_may_contain_equals(self):
        assert parse_key_map(["a.=b=c."]) == {"a.": "b=c."}

    def test_item_without_equals_is_a_config_error_naming_it(self):
        with pytest.raises(ConfigError, match=r"--key-map 'model\.': expected OLD=NEW"):
            parse_key_map(["model."])

    def test_same_prefix_twice_is_refused(self):
        with pytest.raises(ConfigError, match=r"prefix 'a\.' is already mapped to 'b\.'"):
            parse_key_map(["a.=b.", "a.=c."])

    def test_config_error_is_a_value_error(self):
        with pytest.raises(ValueError):
            parse_key_map(["nope"])


class TestVerification:
    def test_missing_keys_are_listed_with_the_fix(self, save):
        state = {k: v for k, v in trained_state().items() if k.startswith("encoder.")}
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(Tiny(), save(state))
        message = str(info.value)
        assert "5 of the backbone's 7 tensors are missing from it (norm.* (5)):" in message
        for key in ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
            assert f"\n  {key}\n" in message + "\n"
        assert "prefix map tried: none (checkpoint keys used as they are)" in message
        assert "--key-map OLD=NEW" in message

    def test_missing_keys_name_the_detected_prefix_map(self, save):
        state = prefixed({k: v for k, v in trained_state().items() if k.startswith("encoder.")}, "model.")
        with pytest.raises(CheckpointError, match="prefix map tried: 'model.' -> ''"):
            load_checkpoint(Tiny(), save(state))

    def test_a_long_list_of_missing_keys_is_cut_at_20(self, save):
        module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])  # 30 tensors
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(module, save({"other.weight": torch.ones(1)}))
        lines = str(info.value).splitlines()
        assert "30 of the backbone's 30 tensors are missing from it (0.* (2), 1.* (2), " in lines[1]
        assert lines[2:23] == [f"  {i}.{name}" for i in range(10) for name in ("weight", "bias")] + ["  ... and 10 more"]

    def test_shape_mismatch_names_the_key_and_both_shapes(self, save):
        state = {**trained_state(), "encoder.weight": torch.ones(4, 5)}
        with pytest.raises(CheckpointError, match=r"encoder\.weight: checkpoint \[4, 5\] \(as 'encoder\.weight'\), backbone \[4, 3\]"):
            load_checkpoint(Tiny(), save(state))

    def test_a_failed_load_leaves_the_module_untouched(self, save):
        module = Tiny()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        state = {**trained_state(), "norm.bias": torch.ones(5)}
        with pytest.raises(CheckpointError):
            load_checkpoint(module, save(state))
        assert_state_equal(module, before)

    def test_unexpected_keys_are_reported_and_not_loaded(self, save):
        state = {**trained_state(), "decoder.out.weight": torch.ones(3, 3), "cls_head.0.weight": torch.ones(2, 4)}
        module = Tiny()
        report = load_checkpoint(module, save({"state_dict": state}))
        assert report.unexpected == ["cls_head.0.weight", "decoder.out.weight"]
        assert "cls_head.0.weight" not in module.state_dict()
        assert_state_equal(module, trained_state())

    def test_a_stale_head_whose_shapes_differ_is_reported_not_loaded(self, save):
        """The seed's fine-tuning and joint checkpoints share head names with other shapes."""
        stale = {"cls_head.0.weight": torch.ones(256, 256), "cls_head.12.weight": torch.ones(2, 64),
                 "cls_head.1.num_batches_tracked": torch.tensor(3)}
        module = Tiny()
        report = load_checkpoint(module, save({**trained_state(), **stale}))
        assert (report.unexpected, report.loaded) == (sorted(stale), 7)
        assert_state_equal(module, trained_state())

    def test_tensors_are_cast_to_the_module_dtype_and_the_casts_reported(self, save):
        state = {k: v.half() if v.is_floating_point() else v for k, v in trained_state().items()}
        module = Tiny()
        report = load_checkpoint(module, save(state))
        assert report.casts == {"float16 -> float32": 6}
        assert module.encoder.weight.dtype == torch.float32
        assert_state_equal(module, state)

    def test_two_checkpoint_keys_mapping_to_one_name_are_refused(self, save):
        state = {**trained_state(), "model.encoder.weight": torch.ones(4, 3)}
        with pytest.raises(CheckpointError, match="'model.encoder.weight' both map to backbone key 'encoder.weight'"):
            load_checkpoint(Tiny(), save(state), key_map={"model.": ""})

    def test_report_carries_the_module_fingerprint_and_file_hash(self, save):
        path = save(trained_state())
        module = Tiny()
        report = load_checkpoint(module, path)
        assert report.fingerprint == fingerprint(module)
        assert report.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert report.path == str(path)


class TestTrust:
    def test_a_checkpoint_needing_unpickling_is_refused_with_the_flag_to_use(self, save):
        path = save({"state_dict": trained_state(), "hparams": argparse.Namespace(lr=0.1)})
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(Tiny(), path)
        message = str(info.value)
        assert f"checkpoint {path} needs full unpickling (it holds argparse.Namespace)" in message
        assert "--trust-checkpoint allows full unpickling for a file you trust" in message

    def test_trust_loads_a_checkpoint_holding_a_namespace(self, save):
        path = save({"state_dict": trained_state(), "hparams": argparse.Namespace(lr=0.1)})
        module = Tiny()
        assert load_checkpoint(module, path, trust=True).format == "lightning"
        assert_state_equal(module, trained_state())

    def test_trust_loads_a_checkpoint_holding_a_custom_object(self, save):
        path = save({"state_dict": trained_state(), "extra": Opaque(3)})
        with pytest.raises(CheckpointError, match=f"it holds {__name__}.Opaque"):
            read_state_dict(path)
        assert sorted(read_state_dict(path, trust=True)[0]) == sorted(trained_state())

    def test_refusal_never_retries_unsafely(self, save, monkeypatch):
        calls = []
        real_load = torch.load

        def recording_load(*args, **kwargs):
            calls.append(kwargs["weights_only"])
            return real_load(*args, **kwargs)

        monkeypatch.setattr(checkpoint.torch, "load", recording_load)
        with pytest.raises(CheckpointError):
            read_state_dict(save({"state_dict": trained_state(), "extra": Opaque(1)}))
        assert calls == [True]

    def test_a_pickled_module_is_refused_without_trust(self, save):
        with pytest.raises(CheckpointError, match="needs full unpickling"):
            read_state_dict(save(Tiny()))

    def test_torchscript_is_refused_without_trust(self, tmp_path):
        path = tmp_path / "scripted.pt"
        torch.jit.script(nn.Linear(2, 2)).save(str(path))
        with pytest.raises(CheckpointError, match="is a TorchScript archive.*--trust-checkpoint"):
            read_state_dict(path)


class TestBadFiles:
    def test_missing_file_is_named(self, tmp_path):
        path = tmp_path / "nope.ckpt"
        with pytest.raises(CheckpointError, match=f"checkpoint {path} does not exist"):
            load_checkpoint(Tiny(), path)

    def test_directory_is_refused(self, tmp_path):
        with pytest.raises(CheckpointError, match="is not a file"):
            read_state_dict(tmp_path)

    @pytest.mark.parametrize("trust", [False, True])
    def test_text_file_is_not_a_checkpoint(self, tmp_path, trust):
        path = tmp_path / "notes.ckpt"
        path.write_text("epoch,loss\n1,0.5\n")
        with pytest.raises(CheckpointError, match=f"{path} is not a PyTorch checkpoint / state dict"):
            read_state_dict(path, trust=trust)

    @pytest.mark.parametrize("trust", [False, True])
    def test_random_bytes_are_not_a_checkpoint(self, tmp_path, trust):
        path = tmp_path / "random.pt"
        path.write_bytes(bytes(range(256)) * 4)
        with pytest.raises(CheckpointError, match=f"{path} is not a PyTorch checkpoint / state dict"):
            read_state_dict(path, trust=trust)

    def test_empty_file_is_not_a_checkpoint(self, tmp_path):
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint / state dict"):
            read_state_dict(path)

    def test_a_saved_list_is_not_a_state_dict(self, save):
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint / state dict: it holds a list"):
            read_state_dict(save([torch.ones(2)]))

    def test_a_dict_without_tensors_is_not_a_state_dict(self, save):
        with pytest.raises(CheckpointError, match=r"a dict with no tensors \(top-level keys: 'epoch', 'lr'\)"):
            read_state_dict(save({"epoch": 3, "lr": 0.1}))


class TestFingerprint:
    def test_identical_weights_give_identical_fingerprints(self):
        a, b = Tiny(), Tiny()
        a.load_state_dict(trained_state())
        b.load_state_dict(trained_state())
        assert fingerprint(a) == fingerprint(b)

    def test_module_and_its_state_dict_agree(self):
        module = Tiny()
        assert fingerprint(module) == fingerprint(module.state_dict())

    def test_the_value_is_pinned(self):
        """Caches store it: changing how it is computed orphans every cache."""
        state = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor(3, dtype=torch.int64)}
        by_hand = hashlib.sha256(
            b"a\0int64\0[]\08\0" + (3).to_bytes(8, "little")
            + b"b\0float32\0[2]\08\0" + torch.tensor([1.0, 2.0]).numpy().tobytes()
        ).hexdigest()
        assert fingerprint(state) == by_hand == "26502dc43be26450e701a50062632d0bf6eb856708d902f0cdca16e15991ba53"

    def test_one_changed_value_changes_it(self):
        state = trained_state()
        changed = {**state, "encoder.bias": state["encoder.bias"].clone()}
        changed["encoder.bias"][2] += 1e-6
        assert fingerprint(changed) != fingerprint(state)

    def test_a_changed_dtype_changes_it(self):
        state = {"w": torch.tensor([1.0, 2.0])}
        assert fingerprint(state) != fingerprint({"w": state["w"].double()})

    def test_a_changed_shape_changes_it(self):
        w = torch.arange(6.0)
        assert fingerprint({"w": w}) != fingerprint({"w": w.reshape(2, 3)})

    def test_a_renamed_tensor_changes_it(self):
        w = torch.arange(6.0)
        assert fingerprint({"w": w}) != fingerprint({"v": w})

    def test_bfloat16_and_non_contiguous_tensors_are_fingerprinted(self):
        w = torch.arange(6.0).reshape(2, 3)
        assert fingerprint({"w": w.t()}) == fingerprint({"w": w.t().contiguous()})
        assert len(fingerprint({"w": w.bfloat16()})) == 64

    def test_file_sha256_is_the_hash_of_the_bytes(self, tmp_path):
        path = tmp_path / "f.bin"
        path.write_bytes(b"headcache" * 200_000)
        assert file_sha256(path) == hashlib.sha256(b"headcache" * 200_000).hexdigest()


class TestLoadReport:
    REPORT = LoadReport(
        path="seed_model.ckpt", format="lightning", loaded=117, values=4_703_616, key_map={},
        unexpected=[f"cls_head.{i}" for i in range(9)] + [f"setvae.setvae.decoder_layers.0.isab.k{i}" for i in range(8)],
        fingerprint="f" * 64, checkpoint_sha256="c" * 64,
    )

    def test_dict_round_trip_through_json(self):
        assert LoadReport.from_dict(json.loads(json.dumps(self.REPORT.to_dict()))) == self.REPORT

    def test_from_dict_accepts_a_report_without_casts(self):
        d = self.REPORT.to_dict()
        del d["casts"]
        assert LoadReport.from_dict(d).casts == {}

    def test_summary_lines(self):
        assert self.REPORT.summary().splitlines() == [
            "loaded 117 tensors (4,703,616 values) from seed_model.ckpt [lightning]",
            "prefix map: none (checkpoint keys used as they are)",
            "17 unexpected keys, not loaded: cls_head.* (9), setvae.setvae.decoder_layers.0.isab.* (8)",
        ]

    def test_summary_shows_the_prefix_map_and_casts(self):
        report = LoadReport(path="m.pt", format="state_dict", loaded=2, values=5, key_map={"model.": ""},
                            unexpected=[], fingerprint="", checkpoint_sha256="", casts={"float16 -> float32": 2})
        assert report.summary().splitlines() == [
            "loaded 2 tensors (5 values) from m.pt [state_dict]",
            "prefix map: 'model.' -> ''",
            "dtype casts: float16 -> float32 (2)",
            "no unexpected keys",
        ]

    def test_group_keys_counts_by_top_level_prefix(self):
        keys = ["decoder.out.weight", "decoder.layers.0.w", "cls_head.0.weight", "cls_head.4.bias", "pos"]
        assert group_keys(keys) == "cls_head.* (2), decoder.* (2), pos (1)"

    def test_group_keys_with_a_key_that_is_also_a_prefix(self):
        assert group_keys(["a", "a.b"]) == "a* (2)"


class TestSeedCheckpoint:
    def test_the_seed_checkpoint_loads_every_backbone_tensor_without_a_map(self):
        from headcache.backbones.seqsetvae import SeqSetVAEBackbone

        module = SeqSetVAEBackbone()
        report = load_checkpoint(module, SEED_CHECKPOINT)
        assert (report.format, report.loaded, report.values, report.key_map) == ("lightning", 117, 4_703_616, {})
        assert len(report.unexpected) == 17
        assert sum(k.startswith("cls_head.") for k in report.unexpected) == 9
        assert sum(k.startswith("setvae.setvae.decoder_layers.") for k in report.unexpected) == 8
        assert report.fingerprint == fingerprint(module)
