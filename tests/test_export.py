"""Export and predict: the deployed model reproduces the run's own predictions."""
from __future__ import annotations

import csv
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig
from headcache.cv import cross_validate
from headcache.errors import CheckpointError, FingerprintMismatchError
from headcache.export import export, predict
from headcache.sweep import sweep
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


# ---------------------------------------------------------------------------- sweep and cv heads, float16 cache


@pytest.fixture(scope="module")
def f16_runs(tiny_cache_f16, tmp_path_factory):
    """A sweep head and a cv fold head trained on the float16 cache: {kind: run directory}. Max pool, high lr,
    20 epochs: heads whose outputs move by more than 1e-4 when fed unrounded states (1.4e-4 and 2.7e-4 here)."""
    out = tmp_path_factory.mktemp("f16_runs")
    base = TrainConfig(pool="max", lr=3e-2, epochs=20, patience=20, grad_clip=1.0, weight_decay=0.0, device="cpu")
    swept = sweep(tiny_cache_f16, out / "sweep", {"lr": ["3e-2"]}, base=base)
    cv = cross_validate(tiny_cache_f16, out / "cv", folds=3, base=base)
    return {"sweep": swept.out / "runs" / "lr=3e-2_seed=0", "cv": cv.out / "runs" / "seed=0_fold=1"}


@pytest.mark.parametrize("kind", ["sweep", "cv"])
def test_sweep_and_cv_heads_on_a_float16_cache_export_to_their_runs_predictions(f16_runs, kind, tmp_path, tiny_demo,
                                                                                tiny_options):
    """The exported model rounds the states through the cache dtype that the run's record names (the old export
    read a dtype only train recorded, so these heads were fed unrounded states: a 3e-4 gap)."""
    run = f16_runs[kind]
    export("seqsetvae", tiny_demo.checkpoint, run, tmp_path / "model.pt", spec_options=tiny_options)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["dtype"] == "float16"
    predict(tmp_path / "model.pt", "test", tmp_path / "preds.csv", device="cpu", batch_size=7)
    predicted, during_training = _rows(tmp_path / "preds.csv"), _rows(run / "predictions_test.csv")
    assert [r["id"] for r in predicted] == [r["id"] for r in during_training] and len(predicted) > 0
    gap = max(abs(float(a[c]) - float(b[c])) for a, b in zip(predicted, during_training) for c in ("p0", "p1"))
    assert gap <= 1e-4, f"exported {kind} head differs from its run by {gap:.3g}"


class TestExportFiles:
    @pytest.fixture(scope="class")
    def run(self, tiny_cache, tmp_path_factory):
        return train(tiny_cache, tmp_path_factory.mktemp("run") / "run", TrainConfig(epochs=1, device="cpu")).run_dir

    def _export(self, run, tmp_path, tiny_demo, tiny_options):
        return export("seqsetvae", tiny_demo.checkpoint, run, tmp_path / "model.pt", spec_options=tiny_options)

    @pytest.mark.parametrize("missing", ["config.json", "head_best.pt"])
    def test_a_run_without_its_record_or_head_is_refused_naming_the_file(self, run, tmp_path, tiny_demo,
                                                                         tiny_options, missing):
        copy = tmp_path / "copy"
        shutil.copytree(run, copy)
        (copy / missing).unlink()
        with pytest.raises(CheckpointError, match=re.escape(str(copy / missing)) + " does not exist"):
            self._export(copy, tmp_path, tiny_demo, tiny_options)
        assert not (tmp_path / "model.pt").exists()

    def test_an_empty_head_file_is_refused_naming_it(self, run, tmp_path, tiny_demo, tiny_options):
        copy = tmp_path / "copy"
        shutil.copytree(run, copy)
        (copy / "head_best.pt").write_bytes(b"")
        with pytest.raises(CheckpointError, match=re.escape(str(copy / "head_best.pt")) + " cannot be read"):
            self._export(copy, tmp_path, tiny_demo, tiny_options)

    def test_a_sweep_directory_is_refused_naming_one_of_its_runs(self, tmp_path, tiny_demo, tiny_options):
        (tmp_path / "sweep" / "runs" / "lr=1e-3_seed=0").mkdir(parents=True)
        with pytest.raises(CheckpointError, match="is a sweep or cv directory; pass one of its runs"):
            self._export(tmp_path / "sweep", tmp_path, tiny_demo, tiny_options)

    def test_the_cli_names_a_missing_config_json_without_a_traceback(self, tmp_path, tiny_demo, tiny_options):
        (tmp_path / "empty").mkdir()
        result = CliRunner().invoke(app, ["export", "--spec", "seqsetvae", "--checkpoint", str(tiny_demo.checkpoint),
                                          "--run", str(tmp_path / "empty"), "--out", str(tmp_path / "model.pt")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "config.json does not exist" in " ".join(result.output.split())


class TestPredictOutput:
    """Issue 9 item 3: predict replaces a file only when told to, and only with a complete csv."""

    @pytest.fixture(scope="class")
    def model(self, tiny_cache, tiny_demo, tiny_options, tmp_path_factory):
        folder = tmp_path_factory.mktemp("model")
        run = train(tiny_cache, folder / "run", TrainConfig(epochs=1, device="cpu")).run_dir
        return export("seqsetvae", tiny_demo.checkpoint, run, folder / "model.pt", spec_options=tiny_options).path

    def _predict(self, model, out, *extra):
        return CliRunner().invoke(app, ["predict", "--model", str(model), "--split", "test", "--out", str(out),
                                        "--device", "cpu", *map(str, extra)])

    def test_an_existing_csv_needs_overwrite_and_stays_byte_identical_without_it(self, model, tmp_path):
        out = tmp_path / "preds.csv"
        out.write_text("mine\n")
        result = self._predict(model, out)
        assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output
        assert out.read_text() == "mine\n"
        result = self._predict(model, out, "--overwrite")
        assert result.exit_code == 0, result.output
        assert out.read_text().startswith("id,label,p0,p1\n") and len(_rows(out)) > 0

    def test_the_model_file_itself_is_never_the_output(self, model, tmp_path):
        before = model.read_bytes()
        result = self._predict(model, model, "--overwrite")
        assert result.exit_code == 1 and "is the file this command reads" in " ".join(result.output.split())
        assert model.read_bytes() == before

    @pytest.mark.parametrize("args,message", [
        (["--batch-size", "0"], "--batch-size 0: give an integer >= 1"),
        ([], "does not exist; create it first"),
    ])
    def test_bad_batch_size_and_missing_folder_get_one_message(self, model, tmp_path, args, message):
        result = self._predict(model, tmp_path / "nowhere" / "preds.csv", *args)
        assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output
        assert message in " ".join(result.output.split()), result.output

    def test_a_failure_part_way_leaves_no_partial_csv_and_the_old_one_whole(self, model, tmp_path):
        out = tmp_path / "preds.csv"
        out.write_text("old\n")

        def fail(done, total):
            if done > 5:
                raise OSError("No space left on device")

        with pytest.raises(OSError):
            predict(model, "test", out, device="cpu", batch_size=5, overwrite=True, on_batch=fail)
        assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]
