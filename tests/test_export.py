"""Export and predict: the deployed model reproduces the run's own predictions."""
from __future__ import annotations

import csv

import pytest
import torch
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig
from headcache.errors import FingerprintMismatchError
from headcache.export import export
from headcache.train import train


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("pool", ["meanq", "learned"])
def test_exported_model_predicts_what_the_run_predicted(tmp_path, tiny_cache_f16, tiny_demo, tiny_options, pool):
    run = train(tiny_cache_f16, tmp_path / "run", TrainConfig(pool=pool, epochs=3, device="cpu")).run_dir
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--spec", "seqsetvae", "--checkpoint", str(tiny_demo.checkpoint),
                                 "--run", str(run), "--out", str(tmp_path / "model.pt"),
                                 *sum((["--spec-opt", f"{k}={v}"] for k, v in tiny_options.items()), [])])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "model.pt"), "--split", "test", "--out",
                                 str(tmp_path / "preds.csv"), "--device", "cpu", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    predicted, during_training = _rows(tmp_path / "preds.csv"), _rows(run / "predictions_test.csv")
    assert [r["id"] for r in predicted] == [r["id"] for r in during_training]
    gap = max(abs(float(a[c]) - float(b[c])) for a, b in zip(predicted, during_training) for c in ("p0", "p1"))
    assert gap <= 1e-4, f"exported model differs from the run by {gap:.3g}"


def test_export_refuses_a_backbone_other_than_the_caches(tmp_path, tiny_cache, tiny_demo, tiny_options):
    run = train(tiny_cache, tmp_path / "run", TrainConfig(epochs=1, device="cpu")).run_dir
    state = torch.load(tiny_demo.checkpoint, weights_only=True)
    state["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    with pytest.raises(FingerprintMismatchError, match="trained on a cache of backbone"):
        export("seqsetvae", other, run, tmp_path / "model.pt", spec_options=tiny_options)
    assert not (tmp_path / "model.pt").exists()
