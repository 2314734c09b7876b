"""The built-in ``exported`` spec: a torch.export program and ragged npz arrays, driven through the CLI."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error
from torch import nn
from typer.testing import CliRunner

from headcache.backbones.exported import ExportedBackbone, make_spec
from headcache.cli import app
from headcache.store import CacheReader

runner = CliRunner(env={"COLUMNS": "200"})
F, D = 3, 8


class Encoder(nn.Module):
    """A small masked encoder: a projection and one transformer layer that ignores padding."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(F, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        return self.layer(self.inp(x), src_key_padding_mask=~mask), mask.sum(1)  # hidden first, as allowed


def export_program(module: nn.Module, path: Path, *, dynamic: bool = True, inputs=None) -> Path:
    batch, length = torch.export.Dim("B", min=1), torch.export.Dim("T", min=1)
    inputs = inputs or (torch.randn(2, 5, F), torch.ones(2, 5, dtype=torch.bool))
    shapes = ({0: batch, 1: length}, {0: batch, 1: length}) if dynamic else None
    torch.export.save(torch.export.export(module.eval(), inputs, dynamic_shapes=shapes), path)
    return path


def write_split(path: Path, lengths: list[int], labels: list[int] | None, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sequences = [rng.normal(size=(n, F)).astype(np.float32) for n in lengths]
    arrays = {"x": np.concatenate(sequences), "offsets": np.concatenate([[0], np.cumsum(lengths)]),
              "ids": np.array([f"{path.stem}-{i}" for i in range(len(lengths))])}
    if labels is not None:
        arrays["labels"] = np.array(labels)
    np.savez(path, **arrays)
    return sequences


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder().eval()


@pytest.fixture
def data_dir(tmp_path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(7)
    folder = tmp_path / "data"
    folder.mkdir()
    sequences = {}
    for split, n, seed in (("train", 40, 1), ("val", 16, 2), ("test", 12, 3)):
        labels = [i % 2 for i in range(n)]
        sequences[split] = write_split(folder / f"{split}.npz", rng.integers(1, 9, size=n).tolist(), labels, seed)
    return folder, sequences


def test_program_extracts_and_trains_with_no_python_written(tmp_path, encoder, data_dir):
    folder, sequences = data_dir
    program = export_program(encoder, tmp_path / "model.pt2")
    cache, run_dir = tmp_path / "c.h5", tmp_path / "run"
    result = run("extract", "--spec", "exported", "--checkpoint", program, "--spec-opt", f"data={folder}",
                 "--out", cache, "--dtype", "float32", "--device", "cpu", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    with CacheReader(cache) as reader:
        assert reader.splits == ["train", "val", "test"] and reader.hidden_dim == D
        assert reader.load_report["spec_report"] == {"input_features": F, "hidden_dim": D}
        for split, seqs in sequences.items():
            cached = reader.split(split)
            assert cached.labels.tolist() == [i % 2 for i in range(len(seqs))]
            for i, x in enumerate(seqs):
                with torch.no_grad():
                    want = encoder(torch.from_numpy(x)[None], torch.ones(1, len(x), dtype=torch.bool))[0][0]
                assert np.abs(cached.sequence(i) - want.numpy()).max() <= 1e-5
    result = run("train", "--cache", cache, "--out", run_dir, "--epochs", "3", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auroc"] <= 1.0

    model, fresh, preds = tmp_path / "model.pt", tmp_path / "fresh", tmp_path / "preds.csv"
    result = run("export", "--spec", "exported", "--checkpoint", program, "--run", run_dir, "--out", model,
                 "--spec-opt", f"data={folder}")
    assert result.exit_code == 0, result.output
    fresh.mkdir()
    test = dict(np.load(folder / "test.npz"))
    np.savez(fresh / "new.npz", **{k: v for k, v in test.items() if k != "labels"})  # unlabelled
    result = run("predict", "--model", model, "--split", "new", "--out", preds, "--spec-opt", f"data={fresh}",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    mine = np.genfromtxt(preds, delimiter=",", names=True, dtype=None, encoding=None)
    theirs = np.genfromtxt(run_dir / "predictions_test.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert mine["id"].tolist() == theirs["id"].tolist()
    assert np.abs(mine["p1"] - theirs["p1"]).max() <= 1e-4


def test_unlabelled_split_and_class_names(tmp_path, encoder):
    folder = tmp_path / "data"
    folder.mkdir()
    write_split(folder / "train.npz", [3, 4], [0, 2], seed=1)
    np.savez(folder / "val.npz", **dict(np.load(folder / "train.npz")), class_names=np.array(["a", "b", "c"]))
    write_split(folder / "new.npz", [2, 5, 1], None, seed=2)
    spec = make_spec(str(folder))
    assert spec.splits == ("train", "val", "new") and spec.class_names == ["a", "b", "c"] and spec.num_classes == 3
    spec.load(export_program(encoder, tmp_path / "model.pt2"))
    assert [spec.dataset("new")[i][1] for i in range(3)] == [None, None, None]
    assert spec.dataset("new").lengths() == [2, 5, 1]


def test_program_with_another_call_is_refused_showing_the_expected_one(tmp_path, data_dir):
    class OneInput(nn.Module):
        def forward(self, x):
            return x * 2

    program = export_program(OneInput(), tmp_path / "one.pt2", dynamic=False, inputs=(torch.randn(2, 5, F),))
    result = run("extract", "--spec", "exported", "--checkpoint", program, "--spec-opt", f"data={data_dir[0]}",
                 "--out", tmp_path / "c.h5", "--device", "cpu")
    assert_user_error(result, "the program takes (x: torch.float32 [2, 5, 3])", "expected program(x, mask)")
    assert not (tmp_path / "c.h5").exists()


def test_program_with_a_static_batch_is_refused(tmp_path, encoder, data_dir):
    program = export_program(encoder, tmp_path / "static.pt2", dynamic=False)
    result = run("extract", "--spec", "exported", "--checkpoint", program, "--spec-opt", f"data={data_dir[0]}",
                 "--out", tmp_path / "c.h5", "--device", "cpu")
    assert_user_error(result, "the program fails on x [2, 3, 3]", "Guard failed", "B and T dynamic")


def test_pickled_payload_needs_trust(tmp_path, encoder, data_dir):
    program = export_program(encoder, tmp_path / "model.pt2")
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(program) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            raw = src.read(info)
            if info.filename.endswith("_weights_config.json"):
                config = json.loads(raw)
                next(iter(config["config"].values()))["use_pickle"] = True
                raw = json.dumps(config).encode()
            dst.writestr(info, raw)
    args = ("extract", "--spec", "exported", "--checkpoint", tampered, "--spec-opt", f"data={data_dir[0]}",
            "--out", tmp_path / "c.h5", "--device", "cpu")
    assert_user_error(run(*args), "would unpickle data/weights/weight_0 (inp.weight)", "--trust-checkpoint")


def test_not_a_program_is_named(tmp_path, data_dir):
    bogus = tmp_path / "model.pt2"
    torch.save({"w": torch.zeros(2)}, bogus)
    result = run("extract", "--spec", "exported", "--checkpoint", bogus, "--spec-opt", f"data={data_dir[0]}",
                 "--out", tmp_path / "c.h5", "--device", "cpu")
    assert_user_error(result, "is not a torch.export program")


def test_wrapper_keeps_the_programs_mode_and_its_state_round_trips(tmp_path, encoder):
    program = torch.export.load(export_program(encoder, tmp_path / "model.pt2"))
    backbone = ExportedBackbone(program.module()).eval()
    assert not backbone.training
    again = ExportedBackbone(torch.export.load(tmp_path / "model.pt2").module())
    again.load_state_dict({k: torch.zeros_like(v) for k, v in backbone.state_dict().items()})
    assert float(again.program.inp.weight.detach().abs().sum()) == 0.0
