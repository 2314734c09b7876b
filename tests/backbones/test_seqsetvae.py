"""The seqsetvae spec: fidelity to the original model, padding invariance, and the data rules."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from headcache.backbones.seqsetvae import SEED_DIMS, SeqSetVAEBackbone, make_spec
from headcache.errors import DataError, SpecError

FIXTURE = Path(__file__).resolve().parents[2] / "../shared/seqsetvae_fixture"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"fidelity fixture not found at {FIXTURE}")


def _is_unused(key: str) -> bool:
    return key.startswith("cls_head.") or "decoder" in key


@pytest.fixture(scope="module")
def seed_spec():
    return make_spec(str(FIXTURE / "data"))


@pytest.fixture(scope="module")
def seed_state():
    return torch.load(FIXTURE / "seed_model.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def seed_backbone(seed_spec, seed_state):
    backbone = seed_spec.backbone()
    backbone.load_state_dict({key: seed_state[key] for key in backbone.state_dict()}, strict=True)
    return backbone.eval()


def _encode(spec, backbone, inputs):
    with torch.inference_mode():
        return spec.encode(backbone, spec.collate(inputs))


# ----------------------------------------------------------------------------- the model


class TestArchitecture:
    def test_seed_size_has_exactly_the_117_backbone_keys(self):
        state = SeqSetVAEBackbone().state_dict()
        assert len(state) == 117
        assert sum(t.numel() for t in state.values()) == 4_703_616
        assert all(t.dtype == torch.float32 for t in state.values())
        prefixes = ("setvae.setvae.", "pos_embedding", "time_encoder.", "transformer.layers.", "post_transformer_norm.")
        assert all(key.startswith(prefixes) for key in state)

    def test_final_norm_eps_is_1e_6(self):
        assert SeqSetVAEBackbone().post_transformer_norm.eps == 1e-6

    def test_dims_shape_the_keys(self):
        state = SeqSetVAEBackbone(input_dim=8, reduced_dim=6, latent_dim=4, levels=1, m=3, transformer_layers=1,
                                  transformer_heads=2, ff_dim=5).state_dict()
        assert state["setvae.setvae.dim_reducer.weight"].shape == (6, 8)
        assert state["setvae.setvae.embed.0.weight"].shape == (4, 6)
        assert state["setvae.setvae.encoder_layers.0.inducing"].shape == (3, 4)
        assert state["setvae.setvae.mu_logvar.4.weight"].shape == (8, 4)
        assert state["transformer.layers.0.linear1.weight"].shape == (5, 4)
        assert not any(key.startswith(("setvae.setvae.encoder_layers.1", "transformer.layers.1")) for key in state)


@needs_fixture
class TestFidelity:
    def test_checkpoint_supplies_every_backbone_key(self, seed_spec, seed_state):
        own = seed_spec.backbone().state_dict()
        missing = sorted(set(own) - set(seed_state))
        assert not missing, f"backbone keys absent from the checkpoint: {missing}"
        wrong = [k for k in own if own[k].shape != seed_state[k].shape]
        assert not wrong, f"shape mismatches: {wrong}"
        leftover = set(seed_state) - set(own)
        assert leftover == {key for key in seed_state if _is_unused(key)}
        assert any(key.startswith("cls_head.") for key in leftover)
        assert any("decoder" in key for key in leftover)

    def test_output_is_the_same_in_train_mode(self, seed_spec, seed_backbone):
        inputs = [seed_spec.dataset("valid")[i][0] for i in range(3)]
        hidden, _ = _encode(seed_spec, seed_backbone, inputs)
        seed_backbone.train()
        try:
            again, _ = _encode(seed_spec, seed_backbone, inputs)
        finally:
            seed_backbone.eval()
        # no dropout anywhere: only the fused eval path of the transformer layers differs, by float noise
        assert (hidden - again).abs().max().item() <= 1e-5

    def test_hidden_states_match_the_original_model(self, seed_spec, seed_backbone):
        reference = np.load(FIXTURE / "reference_h_seq.npz")
        worst, tokens = 0.0, 0
        for split in seed_spec.splits:
            dataset = seed_spec.dataset(split)
            ids = list(reference[f"{split}_ids"])
            assert sorted(dataset.ids) == sorted(ids)
            items = [dataset[i] for i in range(len(dataset))]
            hidden, mask = _encode(seed_spec, seed_backbone, [inputs for inputs, _, _ in items])
            offsets, expected = reference[f"{split}_offsets"], reference[f"{split}_tokens"]
            for row, (_, label, patient) in enumerate(items):
                k = ids.index(patient)
                assert label == reference[f"{split}_labels"][k], patient
                want = expected[offsets[k] : offsets[k + 1]]
                got = hidden[row][mask[row]].numpy()
                assert got.shape == want.shape, patient
                worst = max(worst, float(np.abs(got - want).max()))
                tokens += len(want)
        assert tokens == 338
        assert worst <= 1e-4, f"max abs difference from the reference h_seq: {worst:.3g} (bar 1e-4)"

    def test_labels_come_from_oc_csv(self, seed_spec):
        reference = np.load(FIXTURE / "reference_h_seq.npz")
        for split in seed_spec.splits:
            dataset = seed_spec.dataset(split)
            assert dataset.ids == list(reference[f"{split}_ids"])  # sorted file paths = the original's order
            assert dataset.labels == list(reference[f"{split}_labels"])


@needs_fixture
class TestPaddingInvariance:
    def test_batch_equals_alone(self, seed_spec, seed_backbone):
        dataset = seed_spec.dataset("train")
        inputs = [dataset[i][0] for i in range(len(dataset))]
        hidden, mask = _encode(seed_spec, seed_backbone, inputs)
        worst = 0.0
        for row, one in enumerate(inputs):
            alone, alone_mask = _encode(seed_spec, seed_backbone, [one])
            n = int(alone_mask.sum())
            assert int(mask[row].sum()) == n and bool(alone_mask[0, :n].all())
            worst = max(worst, (hidden[row, :n] - alone[0]).abs().max().item())
        assert worst <= 1e-5, f"batch vs alone: max abs difference {worst:.3g}"

    def test_batch_order_does_not_matter(self, seed_spec, seed_backbone):
        dataset = seed_spec.dataset("test")
        inputs = [dataset[i][0] for i in range(len(dataset))]
        forward, _ = _encode(seed_spec, seed_backbone, inputs)
        backward, _ = _encode(seed_spec, seed_backbone, inputs[::-1])
        n = backward.shape[1]
        diff = (forward[:, :n] - backward.flip(0)).abs().max().item()
        assert diff <= 1e-5, f"max abs difference {diff:.3g}"

    def test_padding_is_masked_and_zero(self, seed_spec, seed_backbone):
        dataset = seed_spec.dataset("test")
        inputs = [dataset[i][0] for i in range(len(dataset))]
        hidden, mask = _encode(seed_spec, seed_backbone, inputs)
        assert mask.dtype == torch.bool
        assert mask.sum(1).tolist() == [len(x["set_sizes"]) for x in inputs]
        assert torch.all(hidden[~mask] == 0)
        assert torch.isfinite(hidden).all()


# ----------------------------------------------------------------------------- the data

EMBEDDINGS = {"a": [1.0, 0.0, 0.0, 0.0], "b": [0.0, 2.0, 0.0, 0.0], "c, with comma": [0.0, 0.0, 3.0, 0.5]}
STATS = [("a", 10.0, 4.0), ("c, with comma", 1.0, 0.5)]  # "b" has none: it keeps its raw value


def write_root(tmp_path: Path, patients: dict[str, dict], *, cached=None, stats=None, oc=None) -> Path:
    """A tiny data root: ``patients`` maps a file stem to its columns (all in the train split)."""
    root = tmp_path / "data"
    for split in ("train", "valid", "test"):
        (root / "patient_ehr" / split).mkdir(parents=True)
    for stem, columns in patients.items():
        pq.write_table(pa.table(columns), root / "patient_ehr" / "train" / f"{stem}.parquet")
    cached = cached if cached is not None else [(name, *vector) for name, vector in EMBEDDINGS.items()]
    _write_csv(root / "cached.csv", ["Key", "0", "1", "2", "3"], cached)
    _write_csv(root / "stats.csv", ["variable", "mean", "std"], STATS if stats is None else stats)
    oc = oc if oc is not None else [(int(float(stem)), 1) for stem in patients] + [(999, 0)]
    _write_csv(root / "oc.csv", ["ts_id", "in_hospital_mortality"], oc)
    return root


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def events(variables, values, minutes, set_index=None) -> dict:
    columns = {
        "variable": pa.array(variables, pa.string()),
        "value": pa.array(values, pa.float64()),
        "minute": pa.array(minutes, pa.float64()),
    }
    if set_index is not None:
        columns["set_index"] = pa.array(set_index, pa.int64())
    return columns


def load(root: Path, split: str = "train"):
    spec = make_spec(str(root), size="tiny")
    return spec, spec.dataset(split)


class TestSets:
    def test_without_set_index_a_set_is_a_run_of_one_minute(self, tmp_path):
        root = write_root(tmp_path, {"7": events(["a", "b", "a", "b", "a", "b"], [1] * 6, [10, 10, 20, 20, 20, 10])})
        inputs, _, _ = load(root)[1][0]
        assert inputs["set_sizes"].tolist() == [2, 3, 1]  # back to minute 10 is a new set
        assert inputs["set_minutes"].tolist() == [10.0, 20.0, 10.0]

    def test_set_index_changes_make_sets_in_file_order(self, tmp_path):
        patient = events(["a", "a", "b", "b", "a", "b"], [1] * 6, [0, 0, 0, 0, 3, 5], set_index=[5, 5, 2, 2, 7, 5])
        inputs, _, _ = load(write_root(tmp_path, {"7": patient}))[1][0]
        # unsorted labels; neighbours 5 and 2 share minute 0 yet stay two sets; label 5 again is a new set
        assert inputs["set_sizes"].tolist() == [2, 2, 1, 1]
        assert inputs["set_minutes"].tolist() == [0.0, 0.0, 3.0, 5.0]

    def test_values_are_scaled_in_float32_unless_stats_lack_the_variable(self, tmp_path):
        patient = events(["a", "b", "c, with comma"], [17.3, 123.456, 0.1], [0, 0, 0])
        inputs, _, _ = load(write_root(tmp_path, {"7": patient}))[1][0]
        a = (np.float32(17.3) - np.float32(10.0)) / np.float32(4.0)
        c = (np.float32(0.1) - np.float32(1.0)) / np.float32(0.5)
        assert inputs["values"].dtype == torch.float32
        assert inputs["values"].tolist() == [a, np.float32(123.456), c]

    def test_embeddings_are_looked_up_by_exact_name(self, tmp_path):
        patient = events(["c, with comma", "a", "b"], [1, 1, 1], [0, 0, 0])
        inputs, _, _ = load(write_root(tmp_path, {"7": patient}))[1][0]
        expected = [EMBEDDINGS["c, with comma"], EMBEDDINGS["a"], EMBEDDINGS["b"]]
        assert inputs["embeddings"].dtype == torch.float32
        assert inputs["embeddings"].tolist() == expected

    def test_later_duplicates_win_in_cached_and_stats(self, tmp_path):
        cached = [(name, *vector) for name, vector in EMBEDDINGS.items()] + [("a", 9, 9, 9, 9)]
        stats = [*STATS, ("a", 0.0, 2.0)]
        patient = events(["a"], [6.0], [0])
        inputs, _, _ = load(write_root(tmp_path, {"7": patient}, cached=cached, stats=stats))[1][0]
        assert inputs["embeddings"].tolist() == [[9.0, 9.0, 9.0, 9.0]]
        assert inputs["values"].tolist() == [3.0]

    def test_ids_labels_and_lengths(self, tmp_path):
        patients = {
            "300.0": events(["a"] * 3, [1] * 3, [0, 1, 2]),
            "200": events(["b"] * 5, [1] * 5, [0, 0, 0, 0, 0]),
        }
        oc = [(200, 0), (300, 1), (400, 1)]  # 400 has no file: allowed
        spec, dataset = load(write_root(tmp_path, patients, oc=oc))
        assert dataset.ids == ["200", "300.0"]  # sorted file paths
        assert dataset.labels == [0, 1]
        assert dataset.lengths() == [5, 3]
        assert [dataset[i][1:] for i in range(2)] == [(0, "200"), (1, "300.0")]

    def test_a_split_none_of_whose_patients_has_a_row_is_unlabelled(self, tmp_path):
        """NOTE [ Patients without an oc.csv row ]: new patients, to be predicted."""
        patients = {"5": events(["a"], [1], [0]), "6": events(["b"], [1], [0])}
        spec, dataset = load(write_root(tmp_path, patients, oc=[(100, 1), (101, 0)]))
        assert dataset.labels == [None, None] and [dataset[i][1:] for i in range(2)] == [(None, "5"), (None, "6")]

    def test_without_oc_csv_every_split_is_unlabelled(self, tmp_path):
        root = write_root(tmp_path, {"5": events(["a"], [1], [0]), "x7": events(["b"], [1], [0])}, oc=[])
        (root / "oc.csv").unlink()
        dataset = make_spec(str(root), size="tiny").dataset("train")
        assert dataset.labels == [None, None] and dataset.ids == ["5", "x7"]  # no ts_id to match: any name

    def test_collate_layout(self, tmp_path):
        patients = {
            "1": events(["a", "b", "a"], [1, 2, 3], [0, 0, 4]),
            "2": events(["b"], [5], [7]),
        }
        spec, dataset = load(write_root(tmp_path, patients))
        batch = spec.collate([dataset[0][0], dataset[1][0]])
        assert sorted(batch) == ["embeddings", "num_sets", "set_minutes", "set_sizes", "values"]
        assert batch["embeddings"].shape == (4, 4)
        assert batch["values"].shape == (4,)
        assert batch["set_sizes"].tolist() == [2, 1, 1]
        assert batch["set_minutes"].tolist() == [0.0, 4.0, 7.0]
        assert batch["num_sets"].tolist() == [2, 1]
        hidden, mask = spec.encode(spec.backbone().eval(), batch)
        assert hidden.shape == (2, 2, 16)
        assert mask.tolist() == [[True, True], [True, False]]


class TestErrors:
    def test_missing_label_fails_when_the_dataset_is_built(self, tmp_path):
        patients = {"5.0": events(["a"], [1], [0]), "6": events(["a"], [1], [0])}
        root = write_root(tmp_path, patients, oc=[(5, 0)])
        spec = make_spec(str(root), size="tiny")
        with pytest.raises(DataError) as error:
            spec.dataset("train")
        message = str(error.value)
        assert "6.parquet" in message and "5.0.parquet" not in message
        assert str(root / "oc.csv") in message and "add" in message

    def test_a_split_where_only_some_patients_lack_a_row_is_refused_naming_them(self, tmp_path):
        """NOTE [ Patients without an oc.csv row ]: most likely a mistake, never read as unlabelled."""
        patients = {str(i): events(["a"], [1], [0]) for i in range(1, 9)}
        root = write_root(tmp_path, patients, oc=[(i, i % 2) for i in range(1, 9) if i not in (3, 7)])
        with pytest.raises(DataError) as error:
            make_spec(str(root), size="tiny").dataset("train")
        message = str(error.value)
        assert "3.parquet, " in message and "7.parquet: no ts_id row" in message and "1.parquet" not in message
        assert "the other 6 patients" in message and "read as unlabelled" in message

    def test_empty_patient_file(self, tmp_path):
        root = write_root(tmp_path, {"5": events([], [], [])})
        with pytest.raises(DataError, match=r"5\.parquet.*no rows"):
            load(root)[1][0]

    def test_variable_missing_from_cached_csv(self, tmp_path):
        root = write_root(tmp_path, {"5": events(["a", "zz"], [1, 1], [0, 0])})
        with pytest.raises(DataError) as error:
            load(root)[1][0]
        message = str(error.value)
        assert "'zz'" in message and "5.parquet" in message and "cached.csv" in message

    def test_set_with_two_minutes(self, tmp_path):
        patient = events(["a", "a", "b", "b"], [1] * 4, [0, 0, 3, 4], set_index=[0, 0, 1, 1])
        root = write_root(tmp_path, {"5": patient})
        with pytest.raises(DataError) as error:
            load(root)[1][0]
        message = str(error.value)
        assert "5.parquet" in message and "set 1" in message and "3.0 and 4.0" in message

    def test_unknown_split_lists_the_splits(self, tmp_path):
        spec = make_spec(str(write_root(tmp_path, {"5": events(["a"], [1], [0])})), size="tiny")
        with pytest.raises(SpecError, match="train, valid, test"):
            spec.dataset("val")

    def test_split_without_patients(self, tmp_path):
        spec = make_spec(str(write_root(tmp_path, {"5": events(["a"], [1], [0])})), size="tiny")
        with pytest.raises(DataError, match=r"valid: no \.parquet"):
            spec.dataset("valid")

    def test_missing_data_folder(self, tmp_path):
        with pytest.raises(DataError, match="no patient_ehr folder") as error:
            make_spec(str(tmp_path / "nowhere"))
        assert "cached.csv" in str(error.value)

    def test_a_named_oc_csv_that_does_not_exist_is_an_error(self, tmp_path):
        root = write_root(tmp_path, {"5": events(["a"], [1], [0])})
        with pytest.raises(DataError, match=r"elsewhere\.csv: no such file.*--spec-opt oc="):
            make_spec(str(root), oc=str(tmp_path / "elsewhere.csv"))

    def test_missing_table(self, tmp_path):
        root = write_root(tmp_path, {"5": events(["a"], [1], [0])})
        (root / "stats.csv").unlink()
        with pytest.raises(DataError, match=r"stats\.csv: no such file.*--spec-opt stats="):
            make_spec(str(root))

    def test_file_name_that_is_not_a_number(self, tmp_path):
        root = write_root(tmp_path, {"5": events(["a"], [1], [0])})
        pq.write_table(pa.table(events(["a"], [1], [0])), root / "patient_ehr" / "train" / "abc.parquet")
        with pytest.raises(DataError, match=r"abc\.parquet: the file name is not a number"):
            make_spec(str(root), size="tiny").dataset("train")

    @pytest.mark.parametrize(
        ("options", "pattern"),
        [
            ({"size": "huge"}, "unknown size 'huge'.*seed, tiny"),
            ({"latent": "8"}, "unknown option.*latent"),
            ({"m": "x"}, "m='x' is not an integer"),
            ({"heads": "3"}, "heads=3 .must divide latent_dim=256"),
            ({"transformer_heads": "0"}, r"transformer_heads=0 \(must be at least 1\)"),
            ({"input_dim": "768"}, "input_dim=768 but .*4-d embeddings"),
        ],
    )
    def test_bad_options(self, tmp_path, options, pattern):
        root = write_root(tmp_path, {"5": events(["a"], [1], [0])})
        with pytest.raises(SpecError, match=pattern):
            make_spec(str(root), **options)


class TestSpec:
    def test_options_arrive_as_strings(self, tmp_path):
        root = write_root(tmp_path, {"5": events(["a"], [1], [0])})
        spec = make_spec(str(root), size="tiny", latent_dim="8", transformer_layers="1")
        assert spec.dims == {**SEED_DIMS, "input_dim": 4, "reduced_dim": 16, "latent_dim": 8, "heads": 2, "m": 4,
                             "ff_dim": 32, "transformer_heads": 2, "transformer_layers": 1}
        assert spec.backbone().post_transformer_norm.normalized_shape == (8,)

    def test_other_table_paths(self, tmp_path):
        root = write_root(tmp_path, {"5": events(["b"], [4.0], [0])})
        (tmp_path / "mine.csv").write_text("variable,mean,std\nb,1,3\n")
        spec = make_spec(str(root), stats=str(tmp_path / "mine.csv"), size="tiny")
        assert spec.dataset("train")[0][0]["values"].tolist() == [1.0]

    def test_contract_members(self, tmp_path):
        spec = make_spec(str(write_root(tmp_path, {"5": events(["a"], [1], [0])})), size="tiny")
        assert (spec.name, spec.splits, spec.num_classes, len(spec.class_names)) == (
            "seqsetvae", ("train", "valid", "test"), 2, 2)


def test_new_patients_without_oc_rows_extract_as_unlabelled_and_predict(tmp_path, tiny_demo):
    """NOTE [ Patients without an oc.csv row ], end to end through the CLI: the test split has no rows, so it
    is extracted unlabelled; train keeps its predictions without test metrics (and says so); an exported
    model predicts those patients with the run's own probabilities."""
    import json
    import shutil

    from typer.testing import CliRunner

    from headcache.cli import app
    from headcache.store import CacheReader

    data = tmp_path / "data"
    shutil.copytree(tiny_demo.data_dir, data)
    test_ids = {int(float(p.name[: -len(".parquet")])) for p in (data / "patient_ehr" / "test").glob("*.parquet")}
    with open(data / "oc.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(float(r["ts_id"])) not in test_ids]
    _write_csv(data / "oc.csv", ["ts_id", "in_hospital_mortality"], [(r["ts_id"], r["in_hospital_mortality"])
                                                                      for r in rows])
    runner = CliRunner(env={"COLUMNS": "200"})
    invoke = lambda *args: runner.invoke(app, [str(a) for a in args])  # noqa: E731
    options = ["--spec-opt", f"data={data}", "--spec-opt", "size=tiny"]
    cache, run_dir, model, preds = tmp_path / "c.h5", tmp_path / "run", tmp_path / "model.pt", tmp_path / "p.csv"
    result = invoke("extract", "--spec", "seqsetvae", "--checkpoint", tiny_demo.checkpoint, "--out", cache,
                    "--device", "cpu", "--dtype", "float32", *options)
    assert result.exit_code == 0, result.output
    with CacheReader(cache) as reader:
        test = reader.split("test")
        assert test.n == len(test_ids) and test.labels.tolist() == [-1] * test.n
        assert set(reader.split("train").labels.tolist()) == {0, 1}
    result = invoke("train", "--cache", cache, "--out", run_dir, "--epochs", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "no test metrics" in " ".join(result.output.split())
    assert "test" not in json.loads((run_dir / "metrics.json").read_text())
    result = invoke("export", "--spec", "seqsetvae", "--checkpoint", tiny_demo.checkpoint, "--run", run_dir,
                    "--out", model, *options)
    assert result.exit_code == 0, result.output
    result = invoke("predict", "--model", model, "--split", "test", "--out", preds, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with open(preds, newline="") as a, open(run_dir / "predictions_test.csv", newline="") as b:
        mine, theirs = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["id"] for r in mine] == [r["id"] for r in theirs] and len(mine) == len(test_ids)
    assert all(r["label"] == "" for r in mine)
    assert max(abs(float(x[f"p{c}"]) - float(y[f"p{c}"])) for x, y in zip(mine, theirs) for c in (0, 1)) <= 1e-4
