"""The demo: deterministic synthetic data and checkpoint in the seed's layout."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from headcache.backbones import demo, seqsetvae
from headcache.backbones.seqsetvae import SEED_DIMS, SIZES, Padding, SeqSetVAEBackbone
from headcache.cli import app
from headcache.errors import ConfigError, OutputExistsError, SpecError
from headcache.spec import check_encode_output


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _patient_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "patient_ehr").glob("*/*.parquet"))


def _oc(data_dir: Path) -> dict[int, int]:
    with open(data_dir / "oc.csv", newline="") as handle:
        return {int(row["ts_id"]): int(row["in_hospital_mortality"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> demo.DemoFiles:
    return demo.write_demo(tmp_path_factory.mktemp("demo"), patients=40, seed=0, size="tiny")


@pytest.fixture(scope="module")
def many_patients(tmp_path_factory) -> Path:
    """Data only (no checkpoint), enough patients for rates and ranges."""
    return demo.write_demo_data(tmp_path_factory.mktemp("many") / "data", patients=400, seed=1)


class TestDeterminism:
    def test_same_seed_writes_the_same_bytes(self, tmp_path):
        first = demo.write_demo(tmp_path / "one", patients=20, seed=5, size="tiny")
        second = demo.write_demo(tmp_path / "two", patients=20, seed=5, size="tiny")
        assert first.checkpoint.name == second.checkpoint.name == "backbone.ckpt"
        one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
        assert len(one) == 20 + 5  # patients, cached/stats/oc.csv, demo.json, backbone.ckpt
        assert one == two

    def test_another_seed_writes_other_data_and_weights(self, tmp_path):
        first = demo.write_demo(tmp_path / "one", patients=20, seed=5, size="tiny")
        second = demo.write_demo(tmp_path / "two", patients=20, seed=6, size="tiny")
        assert (first.data_dir / "cached.csv").read_bytes() != (second.data_dir / "cached.csv").read_bytes()
        tables = [[pq.read_table(p) for p in _patient_files(d)] for d in (first.data_dir, second.data_dir)]
        assert any(not a.equals(b) for a, b in zip(*tables))
        states = [torch.load(f.checkpoint, weights_only=True)["state_dict"] for f in (first, second)]
        assert not torch.equal(states[0]["pos_embedding"], states[1]["pos_embedding"])

    def test_global_random_state_is_untouched(self, tmp_path):
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
        demo.write_demo(tmp_path, patients=10, seed=3, size="tiny")
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert np.array_equal(np.random.get_state()[1], numpy_state)


class TestCheckpoint:
    def test_lightning_layout(self, tiny_demo):
        checkpoint = torch.load(tiny_demo.checkpoint, weights_only=True)
        expected = {"state_dict", "epoch", "global_step", "pytorch-lightning_version", "hyper_parameters"}
        assert expected <= set(checkpoint)
        hyper = checkpoint["hyper_parameters"]
        assert all(isinstance(v, (int, float)) for v in hyper.values())
        assert {k: hyper[k] for k in SEED_DIMS} == {**SEED_DIMS, **SIZES["tiny"]}

    def test_backbone_keys_load_strictly_and_the_rest_is_decoder_and_stale_head(self, tiny_demo):
        state = torch.load(tiny_demo.checkpoint, weights_only=True)["state_dict"]
        backbone = SeqSetVAEBackbone(**{**SEED_DIMS, **SIZES["tiny"]})
        own = backbone.state_dict()
        assert set(own) <= set(state)
        backbone.load_state_dict({key: state[key] for key in own}, strict=True)
        leftover = set(state) - set(own)
        assert leftover == {k for k in state if k.startswith(("decoder.", "cls_head."))}
        assert any(k.startswith("decoder.") for k in leftover)
        # the joint model's 4-layer head: its names clash with headcache's head, its shapes do not fit it
        latent = SIZES["tiny"]["latent_dim"]
        assert state["cls_head.0.weight"].shape == (latent, latent) != (latent // 2, latent)
        assert state["cls_head.12.weight"].shape == (2, latent // 4)

    def test_seed_size_checkpoint_has_the_117_backbone_keys(self):
        state = demo.demo_checkpoint({**SEED_DIMS}, seed=0)["state_dict"]
        own = SeqSetVAEBackbone().state_dict()
        assert len(own) == 117 and set(own) <= set(state)
        assert all(state[k].shape == own[k].shape for k in own)


class TestData:
    def test_layout_and_split_shares(self, tiny_demo):
        data = tiny_demo.data_dir
        assert {p.name for p in data.iterdir()} >= {"patient_ehr", "cached.csv", "stats.csv", "oc.csv"}
        counts = {s: len(list((data / "patient_ehr" / s).glob("*.parquet"))) for s in ("train", "valid", "test")}
        assert counts == {"train": 28, "valid": 6, "test": 6}

    def test_ragged_sets_and_events(self, many_patients):
        set_counts, set_sizes = [], []
        for path in _patient_files(many_patients):
            table = pq.read_table(path).to_pydict()
            key = table["set_index"] if "set_index" in table else table["minute"]
            starts = [0] + [i for i in range(1, len(key)) if key[i] != key[i - 1]] + [len(key)]
            set_counts.append(len(starts) - 1)
            set_sizes += np.diff(starts).tolist()
        assert (min(set_counts), max(set_counts)) == (5, 60)
        assert (min(set_sizes), max(set_sizes)) == (1, 20)

    def test_file_variants_of_the_seed_layout(self, many_patients):
        files = _patient_files(many_patients)
        stems = [p.name[: -len(".parquet")] for p in files]
        assert any(s.endswith(".0") for s in stems) and any("." not in s for s in stems)
        with_index = ["set_index" in pq.read_schema(p).names for p in files]
        assert any(with_index) and not all(with_index)
        with open(many_patients / "stats.csv", newline="") as handle:
            scaled = {row["variable"] for row in csv.DictReader(handle)}
        with open(many_patients / "cached.csv", newline="") as handle:
            rows = list(csv.reader(handle))
        variables = {row[0] for row in rows[1:]}
        assert 30 <= len(variables) <= 40 and "Bilirubin, Total" in variables
        assert len(rows[0]) == 1 + 768
        assert variables - scaled == set(demo.UNSCALED)

    def test_positive_rate_and_labels_for_every_file(self, many_patients):
        labels = _oc(many_patients)
        ids = [int(float(p.name[: -len(".parquet")])) for p in _patient_files(many_patients)]
        assert set(ids) < set(labels)  # oc.csv also lists stays without a file, as the seed's did
        assert 0.1 <= np.mean([labels[i] for i in ids]) <= 0.2

    def test_label_is_in_co_occurrence_not_in_raw_means(self, many_patients):
        labels = _oc(many_patients)
        (lactate, lactate_shift), (pressure, pressure_shift) = demo.PAIR.items()
        means, stds = ({name: row[k] for name, *row in demo.VARIABLES} for k in (0, 1))
        both, lactate_mean, positive = [], [], []
        for path in _patient_files(many_patients):
            table = pq.read_table(path).to_pydict()
            variable, value = np.array(table["variable"]), np.array(table["value"], dtype=float)
            z = (value - np.array([means[v] for v in variable])) / np.array([stds[v] for v in variable])
            key = np.array(table["set_index"] if "set_index" in table else table["minute"])
            set_of_row = np.concatenate([[0], np.cumsum(key[1:] != key[:-1])])
            is_pressure = variable == pressure
            high = set(set_of_row[(variable == lactate) & (z > lactate_shift / 2)])
            low = set(set_of_row[is_pressure & (z < pressure_shift / 2)])
            pressure_sets = np.unique(set_of_row[is_pressure])
            both.append(np.mean([s in high and s in low for s in pressure_sets]))
            lactate_mean.append(value[variable == lactate].mean())
            positive.append(labels[int(float(path.name[: -len(".parquet")]))] == 1)
        both, lactate_mean, positive = map(np.array, (both, lactate_mean, positive))
        assert both[positive].mean() > 0.3 > 0.15 > both[~positive].mean()
        assert abs(lactate_mean[positive].mean() - lactate_mean[~positive].mean()) < 0.25 * stds[lactate]


class TestRerunsAndSpec:
    def test_rerun_keeps_the_files_and_new_arguments_rewrite_them(self, tmp_path):
        data = demo.write_demo_data(tmp_path / "data", patients=12, seed=0)
        before = _files(data)
        demo.write_demo_data(data, patients=12, seed=0)
        assert _files(data) == before
        demo.write_demo_data(data, patients=15, seed=0)
        assert len(_patient_files(data)) == 15
        assert not (data / "patient_ehr.partial").exists()

    def test_refuses_data_it_did_not_write(self, tmp_path):
        (tmp_path / "data" / "patient_ehr").mkdir(parents=True)
        with pytest.raises(OutputExistsError, match="not written by the demo"):
            demo.write_demo(tmp_path, patients=12)

    def test_too_few_patients(self, tmp_path):
        with pytest.raises(ConfigError, match="patients=3.*at least 10"):
            demo.write_demo(tmp_path, patients=3)

    def test_unknown_size(self, tmp_path):
        with pytest.raises(SpecError, match="unknown size"):
            demo.write_demo(tmp_path, patients=10, size="huge")

    def test_make_spec_generates_missing_data_and_encodes_with_the_tiny_checkpoint(self, tmp_path, tiny_demo):
        data = tmp_path / "fresh" / "data"
        spec = demo.make_spec(str(data), patients="12", seed="0", size="tiny")
        assert (data / "patient_ehr").is_dir() and len(_patient_files(data)) == 12
        backbone = spec.backbone()
        state = torch.load(tiny_demo.checkpoint, weights_only=True)["state_dict"]
        backbone.load_state_dict({k: state[k] for k in backbone.state_dict()}, strict=True)
        dataset = spec.dataset("valid")
        with torch.inference_mode():
            hidden, mask = spec.encode(backbone.eval(), spec.collate([dataset[i][0] for i in range(len(dataset))]))
        assert hidden.shape[-1] == SIZES["tiny"]["latent_dim"]
        assert mask.sum(1).min() >= 5 and torch.isfinite(hidden).all()

    def test_make_spec_options_must_be_integers(self, tmp_path):
        with pytest.raises(SpecError, match="patients='many'"):
            demo.make_spec(str(tmp_path / "data"), patients="many")


def _loaded(tiny_demo: demo.DemoFiles, **options) -> tuple[demo.DemoSpec, torch.nn.Module]:
    """The tiny demo spec with ``--spec-opt`` options, and its backbone with the demo's weights, in eval mode."""
    spec = demo.make_spec(str(tiny_demo.data_dir), size="tiny", **options)
    backbone = spec.backbone()
    state = torch.load(tiny_demo.checkpoint, weights_only=True)["state_dict"]
    backbone.load_state_dict({k: state[k] for k in backbone.state_dict()}, strict=True)
    return spec, backbone.eval().requires_grad_(False)  # frozen, as load_backbone gives it


def _batch(spec) -> dict[str, torch.Tensor]:
    """Every train patient in one batch: their set counts differ, so the batch has padding."""
    dataset = spec.dataset("train")
    batch = spec.collate([dataset[i][0] for i in range(len(dataset))])
    assert batch["num_sets"].unique().numel() > 1
    return batch


def _transformer_states(backbone: SeqSetVAEBackbone, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The transformer's input and each layer's output, worked out step by step from the backbone's parts,
    as SeqSetVAEBackbone.forward computes them, with no hooks."""
    z = backbone.setvae["setvae"](batch["embeddings"], batch["values"], batch["set_sizes"])
    patients = Padding(batch["num_sets"])
    z, minutes = patients.pad(z), patients.pad(batch["set_minutes"][:, None])
    steps = torch.arange(z.shape[1], dtype=z.dtype)
    x = z + backbone.pos_embedding * torch.sin(0.01 * steps)[None, :, None] + backbone.time_term(minutes)
    states = [torch.nn.functional.layer_norm(x, x.shape[-1:])]
    causal = torch.triu(torch.ones(z.shape[1], z.shape[1], dtype=torch.bool), 1)
    for layer in backbone.transformer.layers:
        states.append(layer(states[-1], src_mask=causal))
    return states


class TestLayers:
    """--spec-opt layers (NOTE [ Demo layer ids ]): one extraction, several layers of the demo backbone."""

    @pytest.mark.parametrize("option", [{}, {"layers": "last"}, {"layers": "-1"}, {"layers": "2"}])
    def test_the_default_is_the_plain_forward_bit_for_bit(self, tiny_demo, option):
        spec, backbone = _loaded(tiny_demo, **option)
        assert spec.layers == [SIZES["tiny"]["transformer_layers"]] == [2]
        before = seqsetvae.make_spec(str(tiny_demo.data_dir), size="tiny")  # the spec the demo gave before layers
        batch = _batch(spec)
        with torch.inference_mode():
            hidden, mask = check_encode_output(spec.encode(backbone, batch), batch_size=len(batch["num_sets"]),
                                               layers=spec.layers)
            plain, plain_mask = backbone(**batch)
            old, _ = before.encode(backbone, batch)
        assert torch.equal(hidden, plain) and torch.equal(hidden, old) and torch.equal(mask, plain_mask)

    def test_all_is_the_transformers_input_each_layer_and_the_output(self, tiny_demo):
        spec, backbone = _loaded(tiny_demo, layers="all")
        assert spec.layers == [0, 1, 2]
        batch = _batch(spec)
        with torch.inference_mode():
            output = spec.encode(backbone, batch)
            plain, _ = backbone(**batch)
            states = _transformer_states(backbone, batch)
            expected = [states[0], states[1], backbone.post_transformer_norm(states[2])]
        hidden, mask = check_encode_output(output, batch_size=len(batch["num_sets"]), layers=spec.layers)
        assert hidden.shape == (len(batch["num_sets"]), 3, *plain.shape[1:])
        real = mask[..., None].expand_as(plain)
        for i, want in enumerate(expected):
            assert (hidden[:, i] - want)[real].abs().max() <= 1e-5, i
            assert not hidden[:, i][~real].any()  # zero at padding, as the output is
        assert (hidden[:, 2] - plain).abs().max() <= 1e-5  # hooked layers round differently, nothing more
        assert (hidden[:, 0] - hidden[:, 1]).abs().max() > 0.1  # three different states, not one repeated

    def test_the_transformer_input_leaves_the_output_bit_for_bit(self, tiny_demo):
        spec, backbone = _loaded(tiny_demo, layers="-1,0")
        assert spec.layers == [2, 0]
        batch = _batch(spec)
        with torch.inference_mode():
            hidden, mask = spec.encode(backbone, batch)
            plain, _ = backbone(**batch)
            states = _transformer_states(backbone, batch)
        assert hidden.shape == (len(batch["num_sets"]), 2, *plain.shape[1:])
        assert torch.equal(hidden[:, 0], plain)  # no hook on a layer, so every layer ran as in the plain forward
        real = mask[..., None].expand_as(plain)
        assert (hidden[:, 1] - states[0])[real].abs().max() <= 1e-6

    def test_one_middle_layer_is_three_dimensional(self, tiny_demo):
        spec, backbone = _loaded(tiny_demo, layers="1")
        batch = _batch(spec)
        with torch.inference_mode():
            hidden, mask = spec.encode(backbone, batch)
            states = _transformer_states(backbone, batch)
        assert spec.layers == [1] and hidden.shape == states[1].shape
        assert (hidden - states[1])[mask].abs().max() <= 1e-5

    @pytest.mark.parametrize("text, message", [
        ("3", "layer 3 is out of range: this model has layers 0..2 (0 = the transformer's input, 2 = the output "
              "after post_transformer_norm), or -3..-1 counting from the end"),
        ("1,-2", "1 and -2 are both layer 1"),
        ("0,0", "layer 0 is given twice"),
        ("mix", "expected last, all or comma-separated layer indexes"),
    ])
    def test_bad_layers_are_refused_naming_the_option(self, tiny_demo, text, message):
        with pytest.raises(ConfigError, match=re.escape(f"--spec-opt layers={text}: {message}")):
            demo.make_spec(str(tiny_demo.data_dir), size="tiny", layers=text)

    def test_the_cli_prints_one_line_naming_the_option(self, tmp_path, tiny_demo):
        cache = tmp_path / "c.h5"
        result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
            "extract", "--spec", "demo", "--checkpoint", str(tiny_demo.checkpoint), "--spec-opt",
            f"data={tiny_demo.data_dir}", "--spec-opt", "size=tiny", "--spec-opt", "layers=5", "--out", str(cache),
            "--device", "cpu"])
        assert result.exit_code == 1, result.output
        assert result.output.strip() == ("error: --spec-opt layers=5: layer 5 is out of range: this model has layers "
                                         "0..2 (0 = the transformer's input, 2 = the output after "
                                         "post_transformer_norm), or -3..-1 counting from the end")
        assert not cache.exists()
