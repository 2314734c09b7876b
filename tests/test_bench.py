"""`headcache bench` and `headcache extract --plan`: behaviour only, never wall-clock time."""
from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from headcache.bench import WEIGHT_TOLERANCE, BenchResult, bench
from headcache.cli import app
from headcache.config import TrainConfig
from headcache.errors import ConfigError, EquivalenceError
from headcache.extract import ExtractConfig, plan_extraction
from headcache.features import LiveFeatures

CPU = TrainConfig(device="cpu")
KEYS = ("epoch_seconds_end_to_end", "epoch_seconds_cached", "extract_seconds", "speedup_per_epoch",
        "break_even_epochs", "speedup_at_10_epochs", "speedup_at_50_epochs", "speedup_at_100_epochs",
        "max_abs_weight_diff", "max_abs_weight_diff_timed_runs")


def _result(end_to_end: float, cached: float, extract: float) -> BenchResult:
    return BenchResult(spec="s", pool="meanq", head="mlp", device="cpu", dtype="float16", epochs=2,
                       split_sizes={"train": 10}, extract_seconds=extract, epochs_end_to_end=[end_to_end] * 2,
                       epochs_cached=[cached] * 2, max_abs_weight_diff=0.0, max_abs_weight_diff_timed_runs=0.0)


class TestBench:
    def test_writes_bench_json_and_png_with_a_weight_diff_within_tolerance(self, tmp_path, tiny_demo, tiny_options):
        result = bench("seqsetvae", tiny_demo.checkpoint, epochs=2, out=tmp_path, config=CPU,
                       spec_options=tiny_options, limit=32)
        record = json.loads((tmp_path / "bench.json").read_text())
        assert all(key in record for key in KEYS)
        assert record["tolerance"] == WEIGHT_TOLERANCE
        assert record["max_abs_weight_diff"] <= 1e-5  # the tiny backbone agrees far inside the tolerance
        assert len(record["epochs_end_to_end"]) == len(record["epochs_cached"]) == 2
        assert record["split_sizes"] == {"train": 32, "valid": 12}  # test is not part of training
        assert (tmp_path / "bench.png").stat().st_size > 0 and (tmp_path / "cache.h5").exists()
        assert result.speedup_per_epoch == pytest.approx(record["speedup_per_epoch"])

    def test_a_learned_pool_on_the_first_items_only(self, tmp_path, tiny_demo, tiny_options):
        result = bench("seqsetvae", tiny_demo.checkpoint, epochs=1, config=TrainConfig(pool="learned", device="cpu"),
                       spec_options=tiny_options, dtype="float32", limit=20)
        assert result.split_sizes == {"train": 20, "valid": 12}
        assert result.max_abs_weight_diff <= WEIGHT_TOLERANCE and result.out is None

    def test_an_end_to_end_run_that_computes_other_features_fails_loudly(self, tmp_path, tiny_demo, tiny_options,
                                                                          monkeypatch):
        original = LiveFeatures.batch
        monkeypatch.setattr(LiveFeatures, "batch", lambda self, split, rows: original(self, split, rows) * 1.01)
        with pytest.raises(EquivalenceError, match="differ by .*tolerance"):
            bench("seqsetvae", tiny_demo.checkpoint, epochs=2, out=tmp_path, config=CPU, spec_options=tiny_options,
                  limit=32)
        assert json.loads((tmp_path / "bench.json").read_text())["max_abs_weight_diff"] > WEIGHT_TOLERANCE

    @pytest.mark.parametrize("options", [{"epochs": 0}, {"limit": 0}])
    def test_bad_settings_are_refused_up_front(self, tiny_demo, options):
        with pytest.raises(ConfigError, match=next(iter(options))):
            bench("seqsetvae", tiny_demo.checkpoint, **options)

    def test_cli_prints_the_table_and_writes_the_files(self, tmp_path, tiny_demo):
        out = tmp_path / "bench"
        run = CliRunner().invoke(app, ["bench", "--spec", "seqsetvae", "--spec-opt", f"data={tiny_demo.data_dir}",
                                       "--spec-opt", "size=tiny", "--checkpoint", str(tiny_demo.checkpoint),
                                       "--epochs", "1", "--out", str(out), "--device", "cpu", "--limit", "24"])
        assert run.exit_code == 0, run.output
        assert "break-even" in run.output and "50 epochs" in run.output
        assert (out / "bench.json").exists() and (out / "bench.png").exists()


class TestProjections:
    def test_break_even_is_the_first_epoch_count_where_the_cache_is_ahead(self):
        result = _result(end_to_end=10.0, cached=1.0, extract=45.0)
        assert result.break_even_epochs == 5  # 45 / (10 - 1) = 5: 50 s either way
        assert result.speedup_per_epoch == 10.0
        assert result.speedup_at(50) == pytest.approx(500 / 95)

    def test_no_break_even_when_a_cached_epoch_is_not_faster(self):
        assert _result(end_to_end=1.0, cached=1.0, extract=5.0).break_even_epochs is None

    def test_per_epoch_seconds_are_medians(self):
        result = _result(1.0, 1.0, 1.0)
        result.epochs_end_to_end = [9.0, 3.0, 4.0]
        assert result.epoch_seconds_end_to_end == 4.0


class TestPlan:
    def test_estimates_size_time_and_break_even_without_writing(self, tmp_path, tiny_demo, tiny_options):
        plan = plan_extraction("seqsetvae", tiny_demo.checkpoint, ExtractConfig(device="cpu", batch_size=8),
                               spec_options=tiny_options, sample=16)
        assert plan.split_sizes == {"train": 56, "valid": 12, "test": 12} and plan.sample == 16
        assert plan.hidden_dim == 16 and 5 <= plan.tokens_per_item <= 60  # the demo's 5..60 sets per patient
        assert plan.cache_bytes >= 80 * plan.tokens_per_item * 16 * 2
        assert plan.extract_seconds > 0 and plan.epoch_seconds_end_to_end > 0
        assert plan.break_even_epochs == max(1, math.ceil(plan.extract_seconds / plan.epoch_seconds_end_to_end))
        assert list(tmp_path.iterdir()) == []

    def test_the_estimated_size_is_close_to_the_written_file(self, tiny_demo, tiny_options, tiny_cache_f16):
        plan = plan_extraction("seqsetvae", tiny_demo.checkpoint, ExtractConfig(device="cpu"),
                               spec_options=tiny_options, sample=80)
        assert plan.cache_bytes == pytest.approx(tiny_cache_f16.stat().st_size, rel=0.25)

    def test_cli_plan_prints_and_exits_without_a_file(self, tmp_path, tiny_demo):
        out = tmp_path / "cache.h5"
        run = CliRunner().invoke(app, ["extract", "--spec", "seqsetvae", "--spec-opt", f"data={tiny_demo.data_dir}",
                                       "--spec-opt", "size=tiny", "--checkpoint", str(tiny_demo.checkpoint),
                                       "--out", str(out), "--device", "cpu", "--plan"])
        assert run.exit_code == 0, run.output
        for words in ("cache size on disk", "extraction time", "end-to-end epoch", "break-even"):
            assert words in run.output
        assert not out.exists()

