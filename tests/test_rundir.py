"""The run directory: the typed record round-trips, head files are version-checked and tolerant of changed
settings, metrics.json comes last, and NOTE [ Finished run directories ]: an unfinished run is replaced
without --overwrite, a failed or interrupted --overwrite leaves the previous run byte-identical, a sweep
--overwrite leaves no stale runs, and SIGINT / SIGTERM stop the command with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headcache.rundir as rundir
from headcache.config import TrainConfig
from headcache.errors import CheckpointError, ConfigError, OutputExistsError, RunInterrupted
from headcache.rundir import (
    RunRecord,
    SweepRun,
    head_from_checkpoint,
    read_head,
    read_record,
    replaced_atomically,
    write_record,
)
from headcache.sweep import sweep
from headcache.train import train

REPO = Path(__file__).resolve().parents[1]
FAST = TrainConfig(epochs=2, device="cpu")


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


@pytest.fixture(scope="module")
def finished(tiny_cache, tmp_path_factory):
    """A complete run directory (read-only: copy it before changing it)."""
    return train(tiny_cache, tmp_path_factory.mktemp("finished") / "run", FAST).run_dir


class TestRecord:
    def test_the_record_reads_back_as_written(self, tmp_path):
        record = RunRecord(TrainConfig(lr=1e-3), "c.h5", ("train", "valid", None), "ab" * 32, "float16", 3, 16,
                           extra=SweepRun("lr=1e-3_seed=0", {"lr": "1e-3"}))
        write_record(tmp_path, record)
        assert read_record(tmp_path) == record
        assert json.loads((tmp_path / "config.json").read_text())["sweep"]["run"] == "lr=1e-3_seed=0"

    def test_settings_added_or_removed_since_are_defaulted_or_ignored(self, finished, tmp_path):
        content = json.loads((finished / "config.json").read_text())
        del content["train"]["focal_gamma"]
        content["train"]["colour"], content["someday"] = "red", 1
        (tmp_path / "config.json").write_text(json.dumps(content))
        record = read_record(tmp_path)
        assert record.train.focal_gamma == 3.0 and record.train.epochs == 2 and record.dtype == "float32"

    @pytest.mark.parametrize("change,message", [({"version": 99}, "run record version 99; this headcache reads up"),
                                                ({"dtype": None}, "does not record dtype")])
    def test_a_newer_or_an_incomplete_record_is_refused_naming_the_file(self, finished, tmp_path, change, message):
        content = {**json.loads((finished / "config.json").read_text()), **change}
        content = {k: v for k, v in content.items() if v is not None}
        (tmp_path / "config.json").write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=str(tmp_path / "config.json") + ".*" + message):
            read_record(tmp_path)


class TestHeadFiles:
    def test_a_head_file_with_changed_settings_still_loads_the_same_head(self, finished):
        checkpoint = read_head(finished / "head_best.pt")
        changed = {**checkpoint, "config": {k: v for k, v in checkpoint["config"].items() if k != "focal_gamma"}}
        changed["config"]["colour"] = "red"
        features = torch.randn(5, 16)
        expected = head_from_checkpoint(checkpoint)(features)
        assert torch.equal(head_from_checkpoint(changed)(features), expected)

    def test_a_newer_head_format_is_refused(self, finished, tmp_path):
        checkpoint = {**read_head(finished / "head_best.pt"), "version": 2}
        torch.save(checkpoint, tmp_path / "head_best.pt")
        with pytest.raises(CheckpointError, match="head format version 2; this headcache reads up to 1"):
            read_head(tmp_path / "head_best.pt")

    def test_a_file_that_is_not_a_head_is_refused_naming_it(self, tmp_path):
        torch.save({"weights": torch.zeros(1)}, tmp_path / "head_best.pt")
        with pytest.raises(CheckpointError, match="head_best.pt is not a head file"):
            read_head(tmp_path / "head_best.pt")


class TestFilesWrittenWhole:
    def test_a_failed_write_leaves_the_old_file_and_no_temporary(self, tmp_path):
        path = tmp_path / "metrics.json"
        path.write_text("old")
        with pytest.raises(OSError):
            with replaced_atomically(path) as temp:
                temp.write_text("half")
                raise OSError("No space left on device")
        assert path.read_text() == "old" and _siblings(path) == ["metrics.json"]

    def test_metrics_json_is_written_last(self, tiny_cache, tmp_path, monkeypatch):
        """A disk that fills before the end leaves no metrics.json: the run reads as unfinished, and the same
        command then replaces it without --overwrite."""
        def full(*args, **kwargs):
            raise OSError("No space left on device")

        monkeypatch.setattr(rundir, "write_predictions", full)
        with pytest.raises(OSError):
            train(tiny_cache, tmp_path / "run", FAST)
        assert (tmp_path / "run" / "head_last.pt").is_file() and not (tmp_path / "run" / "metrics.json").exists()
        monkeypatch.undo()
        train(tiny_cache, tmp_path / "run", FAST)
        assert (tmp_path / "run" / "metrics.json").is_file()

    def test_plots_leave_the_matplotlib_backend_alone(self, tmp_path):
        code = ("import matplotlib, sys; matplotlib.use('svg'); from headcache.rundir import plot_curves; "
                "rows = [dict(epoch=e, train_loss=1.0, val_loss=1.0, val_auroc=0.5, val_auprc=0.5) for e in range(3)]; "
                f"plot_curves(rows, __import__('pathlib').Path({str(tmp_path / 'c.png')!r}), best_epoch=1); "
                "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
        assert done.stdout.split() == ["svg", "False"]
        assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


class TestRunDirectories:
    def test_an_unfinished_run_is_replaced_without_overwrite(self, finished, tiny_cache, tmp_path):
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.json").write_text((finished / "config.json").read_text())  # as a killed run leaves it
        (run / "history.csv").write_text("stale")
        result = train(tiny_cache, run, TrainConfig(epochs=3, device="cpu"))
        assert json.loads((run / "metrics.json").read_text())["epochs_run"] == result.result.epochs_run == 3
        assert (run / "history.csv").read_text().count("\n") == 4

    def test_a_complete_run_needs_overwrite(self, finished, tiny_cache, tmp_path):
        run = tmp_path / "run"
        run.mkdir()
        for name, data in _snapshot(finished).items():
            (run / name).write_bytes(data)
        with pytest.raises(OutputExistsError, match="holds a complete run; pass --overwrite"):
            train(tiny_cache, run, FAST)
        assert _snapshot(run) == _snapshot(finished)

    def test_a_failed_overwrite_leaves_the_previous_run_byte_identical(self, finished, tiny_cache, tmp_path):
        run = tmp_path / "run"
        run.mkdir()
        for name, data in _snapshot(finished).items():
            (run / name).write_bytes(data)
        with pytest.raises(ConfigError, match="fewer than batch_size"):  # fails after config.json is written
            train(tiny_cache, run, TrainConfig(epochs=2, batch_size=10_000, device="cpu"), overwrite=True)
        assert _snapshot(run) == _snapshot(finished) and _siblings(run) == ["run"]

    def test_an_interrupted_overwrite_says_the_previous_run_is_kept(self, finished, tiny_cache, tmp_path):
        run = tmp_path / "run"
        run.mkdir()
        for name, data in _snapshot(finished).items():
            (run / name).write_bytes(data)

        def interrupt(epoch, rows):
            raise KeyboardInterrupt

        with pytest.raises(RunInterrupted, match="still holds the previous complete run, unchanged; the same command"):
            train(tiny_cache, run, TrainConfig(epochs=5, device="cpu"), overwrite=True, on_epoch=interrupt)
        assert _snapshot(run) == _snapshot(finished) and _siblings(run) == ["run"]
        result = train(tiny_cache, run, TrainConfig(epochs=3, device="cpu"), overwrite=True)
        assert json.loads((run / "metrics.json").read_text())["epochs_run"] == result.result.epochs_run == 3
        assert _siblings(run) == ["run"]

    def test_overwrite_never_deletes_files_headcache_did_not_write(self, tiny_cache, tmp_path):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text("{}")
        (tmp_path / "run" / "thesis.tex").write_text("mine")
        with pytest.raises(OutputExistsError, match=r"holds files that headcache did not write \(thesis.tex\)"):
            train(tiny_cache, tmp_path / "run", FAST, overwrite=True)
        assert (tmp_path / "run" / "thesis.tex").read_text() == "mine"

    def test_sweep_overwrite_with_a_smaller_grid_leaves_no_stale_runs(self, signal_cache, tmp_path):
        sweep(signal_cache, tmp_path / "s", {"lr": ["1e-3", "2e-3", "3e-3"]}, base=FAST)
        with pytest.raises(OutputExistsError, match="holds a complete run"):
            sweep(signal_cache, tmp_path / "s", {"lr": ["1e-3"]}, base=FAST)
        result = sweep(signal_cache, tmp_path / "s", {"lr": ["1e-3"]}, base=FAST, overwrite=True)
        assert sorted(p.name for p in (tmp_path / "s" / "runs").iterdir()) == ["lr=1e-3_seed=0"]
        assert len(result.leaderboard) == 1 and _siblings(tmp_path / "s") == ["s"]

    def test_an_unfinished_sweep_is_replaced_without_overwrite(self, signal_cache, tmp_path):
        def interrupt(epoch, rows):
            raise KeyboardInterrupt

        with pytest.raises(RunInterrupted, match="kept .* as an unfinished run .*without --overwrite"):
            sweep(signal_cache, tmp_path / "s", {"lr": ["1e-3", "2e-3"]}, base=FAST, on_epoch=interrupt)
        assert not (tmp_path / "s" / "best_config.json").exists()
        assert (tmp_path / "s" / "runs" / "lr=2e-3_seed=0" / "config.json").is_file()
        sweep(signal_cache, tmp_path / "s", {"lr": ["1e-3"]}, base=FAST)
        assert sorted(p.name for p in (tmp_path / "s" / "runs").iterdir()) == ["lr=1e-3_seed=0"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "COLUMNS": "1000"}


def _interrupt_after_first_epoch(args: list[str], signum: int) -> subprocess.CompletedProcess:
    """Run ``python -m headcache ARGS``, send ``signum`` once it prints its first epoch line, and wait."""
    process = subprocess.Popen([sys.executable, "-m", "headcache", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch"):
            process.send_signal(signum)
            break
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(lines) + out, err)


class TestSignals:
    """A real process, a real signal after the first epoch: one line, exit 128 + signal, and the same command
    starts again."""

    def test_sigint_during_train_keeps_an_unfinished_run_that_the_same_command_replaces(self, tiny_cache, tmp_path):
        args = ["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "run"), "--device", "cpu"]
        done = _interrupt_after_first_epoch(args + ["--epochs", "100000", "--patience", "100000"], signal.SIGINT)
        assert done.returncode == 130, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"interrupted: kept {tmp_path / 'run'} as an unfinished run (no metrics.json); the same command starts "
            "it again, without --overwrite"]
        assert (tmp_path / "run" / "config.json").is_file() and not (tmp_path / "run" / "metrics.json").exists()
        again = subprocess.run([sys.executable, "-m", "headcache", *args, "--epochs", "2", "--quiet"],
                               capture_output=True, text=True, env=_env(), cwd=REPO)
        assert again.returncode == 0, again.stderr
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_run"] == 2

    def test_sigterm_during_sweep_over_a_complete_one_keeps_it_byte_identical(self, signal_cache, tmp_path):
        sweep(signal_cache, tmp_path / "s", {"lr": ["1e-3"]}, base=FAST)
        before = _snapshot(tmp_path / "s")
        args = ["sweep", "--cache", str(signal_cache), "--out", str(tmp_path / "s"), "--grid", "lr=1e-3,2e-3",
                "--epochs", "100000", "--patience", "100000", "--device", "cpu", "--overwrite"]
        done = _interrupt_after_first_epoch(args, signal.SIGTERM)
        assert done.returncode == 143, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"interrupted: {tmp_path / 's'} still holds the previous complete run, unchanged; the same command "
            "starts again"]
        assert _snapshot(tmp_path / "s") == before and _siblings(tmp_path / "s") == ["s"]


def test_a_swap_cut_between_its_renames_gets_the_previous_run_back(finished, tiny_cache, tmp_path):
    """Killed after the old run was renamed aside and before the new one took its name: the next command
    puts the old run back first (it is complete, so it is refused without --overwrite)."""
    aside = tmp_path / ".run.replaced"
    aside.mkdir()
    for name, data in _snapshot(finished).items():
        (aside / name).write_bytes(data)
    with pytest.raises(OutputExistsError, match="holds a complete run"):
        train(tiny_cache, tmp_path / "run", FAST)
    assert _snapshot(tmp_path / "run") == _snapshot(finished) and _siblings(tmp_path / "run") == ["run"]
