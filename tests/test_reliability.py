"""Issue 9, "Nothing lost, nothing silent": one test (or a small parametrized group) per defect, reached the way a
user reaches it, asserting the behaviour the issue and DESIGN.md ("The command line", "Cache format", "Errors")
demand; then the "What held" list.

Tests are named ``test_NN_...`` after the issue's item NN (1..16) and ``test_held_...`` for "What held".
Already covered elsewhere, not repeated here:
- resume after SIGKILL at three points gives the same file: tests/test_store.py::TestKilledWriter and
  tests/test_extract.py::TestResume::test_sigkilled_extraction_resumes_to_the_same_file;
- config, grid, seeds, folds, spec import and checkpoint format errors are clear: tests/test_cli.py
  (TestUserSpec, TestCheckpointErrors), tests/test_train.py, tests/test_sweep.py, tests/test_cv.py.

Specs: tests/data/bad_specs.py (the toy GRU of tests/data/toy_spec.py, one defect per option), so the toy
checkpoint fixture loads into every one of them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TOY
from typer.testing import CliRunner

from headcache.cli import app
from headcache.config import TrainConfig
from headcache.errors import CacheError, SpecError
from headcache.export import export
from headcache.extract import ExtractConfig, extract
from headcache.store import CacheReader
from headcache.train import train

BAD = str(REPO / "tests" / "data" / "bad_specs.py") + ":make_spec"
RAISING = str(REPO / "tests" / "data" / "bad_specs.py") + ":make_raising_spec"
CLI = str(REPO / "cli.py")
runner = CliRunner(env={"COLUMNS": "1000"})  # the in-process runs check words, not wrapping (test_16 does that)


# ---------------------------------------------------------------------------------------------- helpers


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_clean_error(result, *fragments: str, any_of: tuple[str, ...] = ()) -> None:
    """Non-zero exit, one 'error:' message, no traceback or uncaught exception, every fragment in the message."""
    output = result.output
    problems = []
    if result.exit_code == 0:
        problems.append("exit code 0")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"uncaught {type(result.exception).__name__}: {result.exception}")
    if "Traceback" in output:
        problems.append("a traceback was printed")
    if "error:" not in output:
        problems.append("no 'error:' message")
    problems += [f"{fragment!r} not in the message" for fragment in fragments if fragment not in flat(output)]
    if any_of and not any(fragment in flat(output) for fragment in any_of):
        problems.append(f"none of {any_of} in the message")
    assert not problems, "; ".join(problems) + f"\n--- output ---\n{output}"


def says_what_was_kept(text: str) -> bool:
    """A line that says the command was interrupted (or stopped) and how to go on (the same command again)."""
    return any(re.search(r"interrupt|stopped", line, re.IGNORECASE)
               and re.search(r"same command|again|resume", line, re.IGNORECASE) for line in text.splitlines())


def assert_ok(result) -> None:
    assert result.exit_code == 0 and result.exception is None, \
        f"exit {result.exit_code}, {result.exception!r}\n--- output ---\n{result.output}"


def opts(**options) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--spec-opt", f"{key}={value}")]


def extract_args(out, checkpoint, *extra, spec=BAD, **options) -> list:
    return ["extract", "--spec", spec, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", *extra,
            *opts(**options)]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def contents(path: Path) -> dict:
    """Every split's tokens, offsets, labels, ids and pooled matrices (read through the public reader)."""
    with CacheReader(path) as reader:
        out = {}
        for name in reader.splits:
            split = reader.split(name)
            out[name] = {"tokens": split.tokens(), "offsets": split.offsets, "labels": split.labels,
                         "ids": split.ids, **{f"pooled/{p}": split.pooled(p) for p in split.pooled_names}}
        return out


def assert_same_contents(a: Path, b: Path) -> None:
    """Same splits, ids, labels and offsets; the same states within float32 noise of other batch shapes (1e-5,
    as tests/test_extract.py::test_bucketing_does_not_change_the_tokens)."""
    ca, cb = contents(a), contents(b)
    assert list(ca) == list(cb)
    for split in ca:
        assert sorted(ca[split]) == sorted(cb[split]), split
        for key in ca[split]:
            x, y = ca[split][key], cb[split][key]
            if key == "ids":
                assert x == y, (split, key)
            elif key in ("offsets", "labels"):
                assert np.array_equal(x, y), (split, key)
            else:
                assert x.shape == y.shape and np.abs(x.astype(np.float64) - y).max(initial=0) <= 1e-5, (split, key)


def complete_splits(path: Path) -> dict[str, bool]:
    with h5py.File(path, "r") as f:
        return {name: bool(g.attrs.get("complete", False)) for name, g in f.items() if isinstance(g, h5py.Group)}


def flip_byte(path: Path, split: str, dataset: str, index: int = 0, mask: int = 0x01) -> None:
    """XOR one byte of a dataset's stored data in place (the first chunk of a chunked dataset)."""
    with h5py.File(path, "r") as f:
        d = f[split][dataset]
        offset = d.id.get_chunk_info(0).byte_offset if d.chunks else d.id.get_offset()
    with open(path, "r+b") as handle:
        handle.seek(offset + index)
        byte = handle.read(1)[0]
        handle.seek(offset + index)
        handle.write(bytes([byte ^ mask]))


def env() -> dict[str, str]:
    """The environment of a subprocess: this checkout importable, output not a terminal, no COLUMNS."""
    e = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def cli_process(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO, **kwargs)


def wait_for(condition, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process ended (rc {process.returncode}) before the condition held\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory, toy_checkpoint) -> Path:
    """A float32 cache of the bad spec in mode ok: 24 sequences per split, d=8 (read-only: copy it)."""
    path = tmp_path_factory.mktemp("toy_cache") / "cache.h5"
    extract(BAD, toy_checkpoint, path, ExtractConfig(device="cpu", dtype="float32"), spec_options={"n": "24"})
    return path


@pytest.fixture
def cache(tmp_path, toy_cache) -> Path:
    """A copy of toy_cache to damage."""
    copy = tmp_path / "cache.h5"
    shutil.copy(toy_cache, copy)
    return copy


@pytest.fixture(scope="module")
def slow_cache(tmp_path_factory, toy_checkpoint) -> Path:
    """400 sequences per split: 20 epochs of batch 16 take a couple of seconds, time to interrupt them."""
    path = tmp_path_factory.mktemp("slow_cache") / "cache.h5"
    extract(BAD, toy_checkpoint, path, ExtractConfig(device="cpu", dtype="float32"), spec_options={"n": "400"})
    return path


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory, toy_cache, toy_checkpoint) -> tuple[Path, Path]:
    """(run directory, exported model) of a 1-epoch head on toy_cache (read-only)."""
    folder = tmp_path_factory.mktemp("toy_model")
    run_dir = train(toy_cache, folder / "run", TrainConfig(epochs=1, device="cpu")).run_dir
    model = folder / "model.pt"
    export(BAD, toy_checkpoint, run_dir, model, spec_options={"n": "24"})
    return run_dir, model


TRAIN = ("--epochs", "2", "--device", "cpu", "--quiet")


# ---------------------------------------------------------------------------------------------- 1


READER = """
import sys, h5py
f = h5py.File(sys.argv[1], "r")
print("open", flush=True)
sys.stdin.readline()
f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
print("read ok", flush=True)
"""


def test_01_overwrite_while_another_process_reads_keeps_the_reader_reading(tmp_path, toy_checkpoint):
    """extract --overwrite of a cache another process is reading: the new cache is written to a temporary file
    and renamed into place, so the reader keeps reading the old file to its end (no truncation under it), and
    the new file is complete."""
    path = tmp_path / "cache.h5"
    assert_ok(run(*extract_args(path, toy_checkpoint, n=8)))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        result = run(*extract_args(path, toy_checkpoint, "--overwrite", n=8))
        out, err = reader.communicate("\n", timeout=60)
    finally:
        reader.kill()
    problems = []
    if "Traceback" in result.output or not isinstance(result.exception, (SystemExit, type(None))):
        problems.append(f"traceback / uncaught {result.exception!r}")
    if reader.returncode != 0 or "read ok" not in out:
        problems.append(f"the reading process failed: {err[-500:]}")
    if result.exit_code == 0:
        with CacheReader(path) as cache:
            if not all(cache.split(name).complete for name in cache.splits):
                problems.append("the replaced cache is incomplete")
    elif not re.search(r"another process", flat(result.output), re.IGNORECASE):
        problems.append("refused without saying that another process has the file open")
    assert not problems, "; ".join(problems) + "\n" + result.output


def test_01_overwrite_against_a_running_extraction_is_refused_and_the_writer_finishes(tmp_path, toy_checkpoint):
    """extract --overwrite while another extraction writes the file: refused; the running writer's file stays
    readable and complete (today it is truncated under the writer, which still prints 'wrote' and exits 0)."""
    path, go = tmp_path / "cache.h5", tmp_path / "go"
    args = extract_args(path, toy_checkpoint, n=40, hold_at="train:5", hold=go)
    writer = cli_process(*args)
    try:
        wait_for(Path(f"{go}.waiting").exists, process=writer)  # the writer is mid-split, its cache open
        result = run(*args, "--overwrite")
        go.touch()
        _, err = writer.communicate(timeout=120)
    finally:
        go.touch()
        writer.kill()
    problems = []
    if result.exit_code == 0 or not re.search(r"another process", flat(result.output), re.IGNORECASE):
        problems.append(f"extract --overwrite was not refused saying another process has the file open "
                        f"(exit {result.exit_code})")
    if writer.returncode != 0:
        problems.append(f"the running extraction failed: {err[-300:]}")
    try:
        assert complete_splits(path) == {"train": True, "val": True, "test": True}
        assert sum(len(c["ids"]) for c in contents(path).values()) == 120
    except Exception as exc:  # noqa: BLE001 - any failure to read it back is the defect
        problems.append(f"the running extraction's cache is not intact: {type(exc).__name__}: {exc}")
    assert not problems, "; ".join(problems) + f"\n--- refused command ---\n{result.output}"


# ---------------------------------------------------------------------------------------------- 2


def test_02_float16_overflow_is_refused_naming_the_sequence(tmp_path, toy_checkpoint):
    """States beyond 65504 in a float16 cache: refused naming the sequence and --dtype float32, nothing complete
    (today the rounded inf is compared with inf and the cache is marked complete)."""
    path = tmp_path / "cache.h5"
    result = run(*extract_args(path, toy_checkpoint, big_at=7))  # item 7: outside the padding probe's items
    assert_clean_error(result, "train-0007", "--dtype float32")
    if path.exists():
        assert not any(complete_splits(path).values())


# ---------------------------------------------------------------------------------------------- 3


@pytest.mark.parametrize("target", ["csv", "model"])
def test_03_predict_onto_an_existing_file_needs_overwrite(tmp_path, toy_model, target):
    """predict --out onto an existing file (a csv of the user's, or the model itself): refused without --overwrite,
    the file byte-identical."""
    _, model = toy_model
    mine = tmp_path / "model.pt"
    shutil.copy(model, mine)
    out = mine if target == "model" else tmp_path / "preds.csv"
    if target == "csv":
        out.write_text("id,label,p0,p1\nmine,0,1,0\n")
    before = sha256(out)
    result = run("predict", "--model", mine, "--split", "test", "--out", out, "--device", "cpu")
    # onto the model it reads, --overwrite would not help: the message says to choose another name
    assert_clean_error(result, "--overwrite" if target == "csv" else "choose another name")
    assert sha256(out) == before


def test_03_predict_overwrite_replaces_the_file(tmp_path, toy_model):
    _, model = toy_model
    out = tmp_path / "preds.csv"
    out.write_text("old\n")
    assert_ok(run("predict", "--model", model, "--split", "test", "--out", out, "--device", "cpu", "--overwrite"))
    assert out.read_text().splitlines()[0] == "id,label,p0,p1" and len(out.read_text().splitlines()) == 25


def test_03_a_failing_predict_leaves_no_partial_csv(tmp_path, toy_model):
    """A predict that fails part-way (item 7 of 24, batches of 2): no csv at --out, nothing else left behind."""
    _, model = toy_model
    out = tmp_path / "preds.csv"
    before = sorted(os.listdir(tmp_path))
    result = run("predict", "--model", model, "--split", "test", "--out", out, "--device", "cpu",
                 "--batch-size", "2", *opts(fail_at="test:7"))
    assert_clean_error(result, "item 7")
    assert not out.exists(), f"a partial csv was left: {out.read_text()!r}"
    assert sorted(os.listdir(tmp_path)) == before


# ---------------------------------------------------------------------------------------------- 4


def test_04_label_outside_the_classes_is_refused_naming_item_and_split(tmp_path, toy_checkpoint):
    path = tmp_path / "cache.h5"
    assert_clean_error(run(*extract_args(path, toy_checkpoint, mode="label_out")), "train-0002", "train", "5")
    if path.exists():
        assert not complete_splits(path).get("train", False)


def test_04_float_label_is_refused_not_truncated(tmp_path, toy_checkpoint):
    """A label 1.5 is not an integer: refused naming item and split (today int() truncates it to 1)."""
    path = tmp_path / "cache.h5"
    assert_clean_error(run(*extract_args(path, toy_checkpoint, mode="label_float")), "train-0002", "1.5")
    if path.exists():
        assert not complete_splits(path).get("train", False)


@pytest.mark.parametrize("declared", ["2", "none"])
def test_04_the_cache_records_num_classes(tmp_path, toy_checkpoint, declared):
    """Root attribute num_classes: the spec's, else from the labels of every split."""
    path = tmp_path / "cache.h5"
    assert_ok(run(*extract_args(path, toy_checkpoint, num_classes=declared)))
    with h5py.File(path, "r") as f:
        assert "num_classes" in f.attrs, f"root attrs: {sorted(f.attrs)}"
        assert int(f.attrs["num_classes"]) == 2


def test_04_a_test_label_beyond_num_classes_is_refused_not_a_bigger_head(tmp_path, cache):
    """One test label 2 in a binary cache (num_classes 2 recorded): refused naming split 'test' (today: a 3-class
    head trains silently)."""
    with h5py.File(cache, "r+") as f:
        f.attrs["num_classes"] = 2
        labels = f["test/labels"][()]
        labels[2] = 2
        f["test/labels"][...] = labels
    result = run("train", "--cache", cache, "--out", cache.parent / "run", *TRAIN)
    assert_clean_error(result, "test", cache.name)
    assert not (cache.parent / "run" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- 5

# (dataset, byte index, xor mask, train pool): a label 0 <-> 1, an offset off by one, a pooled sign/exponent
# byte, a token byte. Each stays plausible, so only a checksum can tell.
DAMAGE = {
    "pooled/meanq": ("pooled/meanq", 3, 0x40, "meanq"),
    "labels": ("labels", 0, 0x01, "meanq"),
    "offsets": ("offsets", 8 * 3, 0x01, "meanq"),
    "tokens": ("tokens", 5, 0x10, "learned"),
}


@pytest.mark.parametrize("damaged", list(DAMAGE))
def test_05_flipped_bytes_are_detected_naming_file_split_and_dataset(cache, damaged):
    """One flipped byte in what training reads: a CacheError naming file, split and dataset (today pooled, labels
    and offsets train silently to another result, tokens give a raw h5py OSError)."""
    dataset, index, mask, pool = DAMAGE[damaged]
    flip_byte(cache, "train", dataset, index, mask)
    result = run("train", "--cache", cache, "--out", cache.parent / "run", "--pool", pool, *TRAIN)
    assert_clean_error(result, cache.name, "train", dataset.split("/")[-1])


def test_05_inspect_verify_passes_an_intact_cache(toy_cache):
    assert_ok(run("inspect", toy_cache, "--verify"))


@pytest.mark.parametrize("damaged", list(DAMAGE))
def test_05_inspect_verify_reports_the_damaged_split(cache, damaged):
    dataset, index, mask, _ = DAMAGE[damaged]
    flip_byte(cache, "train", dataset, index, mask)
    result = run("inspect", cache, "--verify")
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    assert "train" in flat(result.output) and dataset.split("/")[-1] in flat(result.output), result.output


# ---------------------------------------------------------------------------------------------- 6


def test_06_inspect_and_train_on_a_freshly_interrupted_cache(tmp_path, toy_checkpoint):
    """An extraction stopped at once in split val (train complete; val and test created, no row written, as after
    a kill or a full disk): inspect shows it, train says it is incomplete; neither gives a traceback (today
    inspect formats the None lengths of the empty splits)."""
    path = tmp_path / "cache.h5"
    with pytest.raises(Exception, match="stopped here once"):
        extract(BAD, toy_checkpoint, path, ExtractConfig(device="cpu"),
                spec_options={"stop_at": "val:0", "marker": str(tmp_path / "stopped")})
    assert complete_splits(path) == {"train": True, "val": False, "test": False}
    result = run("inspect", path)
    if result.exit_code == 0:
        assert result.exception is None and "val" in result.output, result.output
    else:
        assert_clean_error(result, any_of=("incomplete", "interrupted"))
    assert_clean_error(run("train", "--cache", path, "--out", tmp_path / "run", *TRAIN), "incomplete")


@pytest.fixture
def empty_test_split(tmp_path, toy_checkpoint) -> Path:
    path = tmp_path / "cache.h5"
    assert_ok(run(*extract_args(path, toy_checkpoint, "--dtype", "float32", n=24, empty="test")))
    return path


def test_06_inspect_shows_a_complete_split_with_no_rows(empty_test_split):
    """Today inspect formats the None lengths of the empty split (TypeError)."""
    result = run("inspect", empty_test_split)
    assert_ok(result)
    assert "test" in result.output


def test_06_train_with_an_empty_test_split_trains_or_says_why(empty_test_split, tmp_path):
    """Either trains (no test metrics) or a clear message naming the split; never a traceback (today
    num_classes_of takes max() of an empty tensor)."""
    result = run("train", "--cache", empty_test_split, "--out", tmp_path / "run", *TRAIN)
    if result.exit_code != 0:
        assert_clean_error(result, "test")
    else:
        assert (tmp_path / "run" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------- 7


def _limited(limit: int):
    def preexec() -> None:  # every file this process writes is cut at `limit` bytes (EFBIG): a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_07_metrics_json_is_written_last(tmp_path, toy_cache):
    """A run whose files cannot all be written (curves.png hits a 16 KB file size limit, as on a full disk) holds
    no metrics.json, so it reads as unfinished; the same command then completes it without --overwrite."""
    out = tmp_path / "run"
    args = ["train", "--cache", toy_cache, "--out", out, *TRAIN]
    process = cli_process(*args, preexec_fn=_limited(16_000))
    process.communicate(timeout=120)
    assert process.returncode != 0, "the run was expected to fail writing its files"
    assert not (out / "metrics.json").exists(), \
        f"metrics.json written before the run's other files: {sorted(os.listdir(out))}"
    assert_ok(run(*args))
    assert (out / "metrics.json").is_file() and (out / "curves.png").is_file()


SLOW_TRAIN = ("--epochs", "20", "--batch-size", "16", "--patience", "100", "--device", "cpu", "--quiet")


def _interrupt_when(process: subprocess.Popen, ready, sig: int, settle: float = 0.0) -> tuple[str, str]:
    """Send ``sig`` once ``ready()`` holds (and ``settle`` seconds more); the process's (stdout, stderr)."""
    try:
        wait_for(ready, process=process)
        time.sleep(settle)
        process.send_signal(sig)
        return process.communicate(timeout=120)
    finally:
        process.kill()


def test_07_sigint_during_train_says_what_was_kept_exits_130_and_the_same_command_completes(tmp_path, slow_cache):
    out = tmp_path / "run"
    args = ["train", "--cache", slow_cache, "--out", out, *SLOW_TRAIN]
    process = cli_process(*args)
    stdout, stderr = _interrupt_when(process, (out / "config.json").exists, signal.SIGINT)
    text = stdout + stderr
    problems = []
    if process.returncode != 130:
        problems.append(f"exit code {process.returncode}, not 130")
    if "Traceback" in text:
        problems.append("a traceback")
    if not says_what_was_kept(text):
        problems.append("no line saying what was kept and how to go on")
    rerun = run(*args)
    if rerun.exit_code != 0 or not (out / "metrics.json").is_file():
        problems.append(f"the same command did not complete the run: {flat(rerun.output)[-300:]}")
    assert not problems, "; ".join(problems) + f"\n--- interrupted run ---\n{text[-2000:]}"


def test_07_sigkilled_train_is_completed_by_the_same_command(tmp_path, slow_cache):
    out = tmp_path / "run"
    args = ["train", "--cache", slow_cache, "--out", out, *SLOW_TRAIN]
    process = cli_process(*args)
    _interrupt_when(process, (out / "config.json").exists, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL and not (out / "metrics.json").exists()
    assert_ok(run(*args))
    assert (out / "metrics.json").is_file()


def test_07_sigkilled_sweep_is_completed_by_the_same_command(tmp_path, slow_cache):
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", slow_cache, "--out", out, "--grid", "lr=1e-3,1e-2", *SLOW_TRAIN]
    process = cli_process(*args)
    _interrupt_when(process, lambda: len(list(out.glob("runs/*/config.json"))) == 2, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert_ok(run(*args))
    assert (out / "leaderboard.csv").is_file() and len(list(out.glob("runs/*/metrics.json"))) == 2


def test_07_a_run_that_failed_after_config_json_is_rerun_without_overwrite(tmp_path, toy_cache):
    """A batch larger than the split fails after config.json; the corrected command needs no --overwrite, since
    a run directory without metrics.json is unfinished."""
    out = tmp_path / "run"
    assert_clean_error(run("train", "--cache", toy_cache, "--out", out, "--batch-size", "1000", *TRAIN),
                       "--batch-size")
    assert not (out / "metrics.json").exists()
    assert_ok(run("train", "--cache", toy_cache, "--out", out, "--batch-size", "4", *TRAIN))
    assert (out / "metrics.json").is_file()


def test_07_a_failed_train_overwrite_leaves_the_previous_run_byte_identical(tmp_path, toy_cache):
    out = tmp_path / "run"
    assert_ok(run("train", "--cache", toy_cache, "--out", out, *TRAIN))
    before = tree(out)
    result = run("train", "--cache", toy_cache, "--out", out, "--batch-size", "1000", "--overwrite", *TRAIN)
    assert_clean_error(result, "--batch-size")
    assert tree(out) == before


def test_07_sweep_overwrite_with_a_smaller_grid_leaves_no_stale_runs(tmp_path, toy_cache):
    out = tmp_path / "sweep"
    assert_ok(run("sweep", "--cache", toy_cache, "--out", out, "--grid", "lr=1e-3,1e-2", *TRAIN))
    assert len(list((out / "runs").iterdir())) == 2
    assert_ok(run("sweep", "--cache", toy_cache, "--out", out, "--grid", "lr=1e-3", "--overwrite", *TRAIN))
    runs = sorted(p.name for p in (out / "runs").iterdir())
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    assert len(runs) == 1 and [row["run"] for row in leaderboard] == runs, runs


# ---------------------------------------------------------------------------------------------- 8


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module", params=["rlimit", "tmpfs"])
def full_disk(request, tmp_path_factory, toy_checkpoint):
    """An extraction that runs out of space part-way: (how, completed process, cache path, command args, remedy).

    rlimit: RLIMIT_FSIZE in the child (writes past 1.5 MB fail with EFBIG); tmpfs: a 2 MB tmpfs (ENOSPC), root only.
    """
    folder = tmp_path_factory.mktemp(f"full_{request.param}") / "disk"
    if request.param == "tmpfs" and not _mount_tmpfs(folder, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    folder.mkdir(exist_ok=True)
    path = folder / "cache.h5"
    args = extract_args(path, toy_checkpoint, "--dtype", "float32", n=40)
    preexec = _limited(1_500_000) if request.param == "rlimit" else None
    process = subprocess.run([sys.executable, CLI, *map(str, args)], capture_output=True, text=True, env=env(),
                             cwd=REPO, preexec_fn=preexec, timeout=120, check=False)

    def remedy() -> None:
        if request.param == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

    yield request.param, process, path, args, remedy
    if request.param == "tmpfs":
        subprocess.run(["umount", str(folder)], capture_output=True, check=False)


def test_08_disk_full_during_extract_is_a_clear_error(full_disk):
    """Exit 1 with a message naming the file and the space problem; no segfault (139 / -11), no h5py
    'Exception ignored' tracebacks."""
    how, process, path, _, _ = full_disk
    text = process.stdout + process.stderr
    problems = []
    if process.returncode != 1:
        problems.append(f"exit code {process.returncode}")
    if "Traceback" in text or "Exception ignored" in text:
        problems.append("tracebacks printed")
    if "error:" not in text or path.name not in text:
        problems.append("no error message naming the file")
    if not re.search(r"space|disk|full|too large", text, re.IGNORECASE):
        problems.append("the message does not say the disk is full")
    assert not problems, f"{how}: " + "; ".join(problems) + f"\n{text[-1500:]}"


# ---------------------------------------------------------------------------------------------- 9


@pytest.mark.parametrize("mode", ["hidden2d", "hidden4d", "short_mask", "numpy", "triple", "none"])
def test_09_encode_breaking_the_contract_is_a_spec_error_naming_encode(tmp_path, toy_checkpoint, mode):
    args = extract_args(tmp_path / "cache.h5", toy_checkpoint, mode=mode)
    assert_clean_error(run(*args), "encode")
    debug = runner.invoke(app, ["--debug", *map(str, args)])
    assert isinstance(debug.exception, SpecError), repr(debug.exception)


@pytest.mark.parametrize("mode,member", [("collate_raises", "collate"), ("dataset_raises", "dataset")])
def test_09_a_member_that_raises_is_a_spec_error_naming_it(tmp_path, toy_checkpoint, mode, member):
    args = extract_args(tmp_path / "cache.h5", toy_checkpoint, mode=mode)
    assert_clean_error(run(*args), member)
    assert isinstance(runner.invoke(app, ["--debug", *map(str, args)]).exception, SpecError)


@pytest.mark.parametrize("options", [{"fail_at": "train:7"}, {"mode": "label_str"}], ids=["item_raises", "bad_label"])
def test_09_an_error_in_a_dataloader_worker_is_one_clean_message(tmp_path, toy_checkpoint, options):
    """With --num-workers, DataLoader re-raises a worker's exception with the worker's traceback pasted into its
    message; the error must still be one line naming the item."""
    args = extract_args(tmp_path / "cache.h5", toy_checkpoint, "--num-workers", "2", **options)
    assert_clean_error(run(*args), "train")
    assert "Original Traceback" not in run(*args).output


def test_09_label_none_is_unlabelled_or_refused_cleanly(tmp_path, toy_checkpoint):
    """DESIGN: a label None is an unlabelled item (stored as -1); either that, or a clear refusal naming the item."""
    path = tmp_path / "cache.h5"
    result = run(*extract_args(path, toy_checkpoint, mode="label_none"))
    if result.exit_code == 0:
        with CacheReader(path) as reader:
            assert reader.split("train").labels[2] == -1
    else:
        assert_clean_error(result, "train-0002")


def test_09_label_string_is_refused_naming_item_and_split(tmp_path, toy_checkpoint):
    assert_clean_error(run(*extract_args(tmp_path / "cache.h5", toy_checkpoint, mode="label_str")),
                       "train-0002", "train")


def test_09_a_factory_that_raises_is_a_spec_error(tmp_path, toy_checkpoint):
    args = extract_args(tmp_path / "cache.h5", toy_checkpoint, spec=RAISING)
    assert_clean_error(run(*args), "the data server is down", any_of=("factory", "make_raising_spec"))
    assert isinstance(runner.invoke(app, ["--debug", *map(str, args)]).exception, SpecError)


def test_09_a_spec_opt_value_the_factory_rejects(tmp_path, toy_checkpoint):
    assert_clean_error(run(*extract_args(tmp_path / "cache.h5", toy_checkpoint, spec=TOY, n="abc")),
                       "--spec-opt", "abc")


def test_09_seqsetvae_without_data_says_which_spec_opt(tmp_path, tiny_demo):
    result = run("extract", "--spec", "seqsetvae", "--checkpoint", tiny_demo.checkpoint, "--out",
                 tmp_path / "cache.h5", "--device", "cpu")
    assert_clean_error(result, "--spec-opt data=")


# ---------------------------------------------------------------------------------------------- 10


def _first_patient(data: Path, k: int = 0) -> Path:
    return sorted((data / "patient_ehr" / "train").glob("*.parquet"))[k]


def _value_string(data: Path, checkpoint: Path) -> tuple[Path, tuple[str, ...]]:
    path = _first_patient(data)
    table = pq.read_table(path)
    values = [str(v) for v in table.column("value").to_pylist()]
    values[1] = "abc"
    pq.write_table(table.set_column(table.column_names.index("value"), "value", pa.array(values)), path)
    return checkpoint, (path.name, "value")


def _corrupt_sixth(data: Path, checkpoint: Path):
    path = _first_patient(data, 5)  # beyond the first four (the padding probe reads those)
    path.write_bytes(b"not parquet" * 10)
    return checkpoint, (path.name,)


def _std_zero(data: Path, checkpoint: Path):
    lines = (data / "stats.csv").read_text().splitlines()
    variable, mean, _ = lines[1].split(",")
    lines[1] = f"{variable},{mean},0"
    (data / "stats.csv").write_text("\n".join(lines) + "\n")
    return checkpoint, ("stats.csv", variable)


def _nan_weights(data: Path, checkpoint: Path):
    state = torch.load(checkpoint, weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("transformer.") and k.endswith("weight"))
    state["state_dict"][key] = torch.full_like(state["state_dict"][key], float("nan"))
    nan = data.parent / "nan_weights.ckpt"
    torch.save(state, nan)
    return nan, ("nan_weights.ckpt",)


@pytest.mark.parametrize("damage", [_value_string, _corrupt_sixth, _std_zero, _nan_weights],
                         ids=["value_column_string", "corrupt_parquet_beyond_four", "std_zero", "nan_checkpoint"])
def test_10_seqsetvae_data_errors_are_clear(tmp_path, tiny_demo, damage):
    data = tmp_path / "data"
    shutil.copytree(tiny_demo.data_dir, data)
    checkpoint, fragments = damage(data, tiny_demo.checkpoint)
    result = run("extract", "--spec", "seqsetvae", "--checkpoint", checkpoint, "--out", tmp_path / "cache.h5",
                 "--device", "cpu", *opts(data=data, size="tiny"))
    assert_clean_error(result, *fragments)
    assert "divide by zero" not in result.output
    assert "check that sequence's inputs" not in flat(result.output), "blamed on a sequence"


# ---------------------------------------------------------------------------------------------- 11


def _edit(split: str, dataset: str, change):
    def edit(f: h5py.File) -> None:
        values = f[split][dataset][()]
        change(values)
        f[split][dataset][...] = values
    return edit


def _swap(values):
    values[5], values[6] = values[6], values[5]


METADATA = {
    "missing_split_attr": lambda f: f["train"].attrs.__delitem__("n"),
    "schema_not_an_integer": lambda f: f.attrs.__setitem__("schema", "one"),
    "wrong_hidden_dim": lambda f: f.attrs.__setitem__("hidden_dim", 9),
    "offsets_not_monotonic": _edit("train", "offsets", _swap),
    "offsets_beyond_the_tokens": _edit("train", "offsets", lambda v: v.__setitem__(-1, 10**9)),
    "negative_label": _edit("train", "labels", lambda v: v.__setitem__(2, -5)),
}


@pytest.mark.parametrize("damage", list(METADATA))
def test_11_damaged_metadata_is_a_cache_error_at_open(cache, damage):
    """Validated when the cache is opened (API) and refused before training (CLI), naming the file."""
    with h5py.File(cache, "r+") as f:
        METADATA[damage](f)
    with pytest.raises(CacheError), CacheReader(cache) as reader:
        for name in reader.splits:  # what training reads first; a split validates these as they are loaded
            split = reader.split(name)
            split.offsets, split.labels, split.ids
    result = run("train", "--cache", cache, "--out", cache.parent / "run", *TRAIN)
    assert_clean_error(result, cache.name)
    assert not (cache.parent / "run" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- 12


def _empty_model(tmp_path, run_dir, model, checkpoint):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    return ["predict", "--model", empty, "--out", tmp_path / "p.csv", "--device", "cpu"], ("empty.pt",)


def _empty_head(tmp_path, run_dir, model, checkpoint):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "head_best.pt").write_bytes(b"")
    return ["export", "--spec", BAD, "--checkpoint", checkpoint, "--run", copy, "--out", tmp_path / "m.pt"], \
        ("head_best.pt",)


def _no_config(tmp_path, run_dir, model, checkpoint):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "config.json").unlink()
    return ["export", "--spec", BAD, "--checkpoint", checkpoint, "--run", copy, "--out", tmp_path / "m.pt"], \
        ("config.json",)


def _batch_zero(tmp_path, run_dir, model, checkpoint):
    return ["predict", "--model", model, "--out", tmp_path / "p.csv", "--device", "cpu", "--batch-size", "0"], \
        ("--batch-size",)


def _csv_as_model(tmp_path, run_dir, model, checkpoint):
    csv_file = tmp_path / "preds.csv"
    csv_file.write_text("id,label,p0,p1\na,0,1,0\n")
    return ["predict", "--model", csv_file, "--out", tmp_path / "p.csv", "--device", "cpu"], ("preds.csv",)


def _train_device(device):
    def case(tmp_path, run_dir, model, checkpoint):
        return ["train", "--cache", json.loads((run_dir / "config.json").read_text())["cache"], "--out",
                tmp_path / "run", "--device", device, "--epochs", "1"], ("--device", device)
    return case


@pytest.mark.parametrize("case", [_empty_model, _empty_head, _no_config, _batch_zero, _csv_as_model,
                                  _train_device("mps"), _train_device("meta")],
                         ids=["empty_model", "empty_head", "run_without_config", "predict_batch_size_0",
                              "csv_as_model", "train_device_mps", "train_device_meta"])
def test_12_export_predict_and_device_errors_are_clear(tmp_path, toy_model, toy_checkpoint, case):
    run_dir, model = toy_model
    args, fragments = case(tmp_path, run_dir, model, toy_checkpoint)
    assert_clean_error(run(*args), *fragments)


def test_12_predict_out_in_a_missing_folder(tmp_path, toy_model):
    """Either the folder is made, or a clear message names it; never a FileNotFoundError traceback."""
    _, model = toy_model
    out = tmp_path / "no" / "such" / "preds.csv"
    result = run("predict", "--model", model, "--out", out, "--device", "cpu")
    if result.exit_code == 0:
        assert out.is_file()
    else:
        assert_clean_error(result, str(out.parent))


# ---------------------------------------------------------------------------------------------- 13


def test_13_unknown_test_split_is_an_error_like_val_split(tmp_path, toy_cache):
    result = run("train", "--cache", toy_cache, "--out", tmp_path / "run", "--test-split", "nosuch", *TRAIN)
    assert_clean_error(result, "nosuch", "--test-split")
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- 14


def _interrupted(tmp_path: Path, checkpoint: Path, data_option: str, dtype: str = "float16") -> tuple[Path, dict]:
    """A cache stopped at train item 35 of 40 (batches of 1, 4 rows per commit: about 30 rows committed), and the
    spec options that stopped it (the marker now exists, so the same options run to the end)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "seed.txt").write_text("0")
    path = tmp_path / "cache.h5"
    options = {"n": "40", "data": data_option, "stop_at": "train:35", "marker": str(tmp_path / "stopped")}
    with pytest.raises(Exception, match="stopped here once"):
        extract(BAD, checkpoint, path, ExtractConfig(device="cpu", batch_size=1, write_block=4, dtype=dtype),
                spec_options=options)
    with CacheReader(path) as reader:
        assert 0 < reader.split("train", require_complete=False).rows_written < 40
    return path, options


def test_14_the_same_data_by_a_relative_path_resumes(tmp_path, toy_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # float32: batches of 1 before the stop and of 64 after it move states by ~1e-7, which can flip a float16
    # rounding (1.2e-4 seen); the comparison is about which rows were kept, not about rounding
    path, options = _interrupted(tmp_path, toy_checkpoint, str(tmp_path / "data"), dtype="float32")
    result = run(*extract_args(path, toy_checkpoint, "--dtype", "float32", **{**options, "data": "data"}))
    assert_ok(result)
    assert "resumed" in result.output
    reference = tmp_path / "reference.h5"
    extract(BAD, toy_checkpoint, reference, ExtractConfig(device="cpu", dtype="float32"), spec_options={"n": "40"})
    assert_same_contents(path, reference)


def test_14_changed_data_of_the_same_size_is_refused(tmp_path, toy_checkpoint):
    """The data under the same path changed (same n, same ids): refused with the fix, the cache byte-identical
    (today the committed rows of the old data are silently mixed with rows of the new)."""
    path, options = _interrupted(tmp_path, toy_checkpoint, str(tmp_path / "data"))
    (tmp_path / "data" / "seed.txt").write_text("7")
    before = sha256(path)
    assert_clean_error(run(*extract_args(path, toy_checkpoint, **options)), "--overwrite")
    assert sha256(path) == before


def test_14_a_new_split_can_be_added_to_a_finished_cache(tmp_path, toy_checkpoint):
    path = tmp_path / "cache.h5"
    assert_ok(run(*extract_args(path, toy_checkpoint, "--splits", "train,val", "--dtype", "float32")))
    before = contents(path)
    assert_ok(run(*extract_args(path, toy_checkpoint, "--splits", "test", "--dtype", "float32")))
    after = contents(path)
    assert list(after) == ["train", "val", "test"] and all(complete_splits(path).values())
    for split in ("train", "val"):
        assert np.array_equal(before[split]["tokens"], after[split]["tokens"])
        assert before[split]["ids"] == after[split]["ids"]


# ---------------------------------------------------------------------------------------------- 15


def test_15_duplicate_ids_are_refused_at_extraction(tmp_path, toy_checkpoint):
    path = tmp_path / "cache.h5"
    assert_clean_error(run(*extract_args(path, toy_checkpoint, mode="dup_ids")), "train-0002", "train")
    if path.exists():
        assert not complete_splits(path).get("train", False)


# ---------------------------------------------------------------------------------------------- 16


def test_16_an_error_with_a_long_path_prints_the_path_whole_on_one_line(tmp_path):
    """Output that is not a terminal is not hard-wrapped at 80 columns."""
    cache = tmp_path / ("a_long_folder_name_" * 4) / ("another_long_folder_name_" * 3) / "cache.h5"
    assert len(str(cache)) > 120
    process = subprocess.run([sys.executable, CLI, "train", "--cache", str(cache), "--out", str(tmp_path / "run")],
                             capture_output=True, text=True, env=env(), cwd=REPO, timeout=120, check=False)
    assert process.returncode == 1, process.stderr
    assert any(str(cache) in line for line in process.stderr.splitlines()), process.stderr


def test_16_a_truncated_cache_error_gives_the_fix(cache):
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    result = run("train", "--cache", cache, "--out", cache.parent / "run", *TRAIN)
    assert_clean_error(result, cache.name, any_of=("headcache extract", "re-extract"))


def test_16_padding_invariance_check_uses_a_relative_tolerance(tmp_path, toy_checkpoint):
    """States of magnitude 1e6 that differ by one float32 ulp between batch shapes are padding invariant."""
    result = run(*extract_args(tmp_path / "cache.h5", toy_checkpoint, "--dtype", "float32", scale="1e6"))
    assert_ok(result)
    assert "padding-invariant" not in result.output, result.output


@pytest.fixture(scope="module")
def sigint_extractions(tmp_path_factory, toy_checkpoint):
    """Extractions interrupted by SIGINT (sent by the spec when val item 20 of 60 is loaded, as Ctrl-C would)
    with 0 and 2 DataLoader workers: (exit code, output, cache, command); memoized."""
    done: dict[int, tuple] = {}

    def interrupted(workers: int):
        if workers not in done:
            folder = tmp_path_factory.mktemp(f"sigint_{workers}")
            path = folder / "cache.h5"
            args = extract_args(path, toy_checkpoint, "--batch-size", "4", "--num-workers", str(workers),
                                "--dtype", "float32", n=60, sigint_at="val:20", marker=folder / "interrupted")
            process = subprocess.run([sys.executable, CLI, *map(str, args)], capture_output=True, text=True,
                                     env=env(), cwd=REPO, timeout=300, check=False)
            done[workers] = (process.returncode, process.stdout + process.stderr, path, args)
        return done[workers]
    return interrupted


def test_16_ctrl_c_during_extract_says_what_was_kept_and_exits_130(sigint_extractions):
    returncode, text, _, _ = sigint_extractions(0)
    problems = []
    if returncode != 130:
        problems.append(f"exit code {returncode}, not 130")
    if "Traceback" in text:
        problems.append("a traceback")
    if not says_what_was_kept(text):
        problems.append("no line saying what was kept and how to go on")
    assert not problems, "; ".join(problems) + f"\n{text[-2000:]}"


# ---------------------------------------------------------------------------------------------- what held


@pytest.mark.parametrize("workers", [0, 2])
def test_held_sigint_during_extract_resumes_to_the_same_cache(sigint_extractions, toy_checkpoint, tmp_path, workers):
    _, _, path, args = sigint_extractions(workers)
    assert not all(complete_splits(path).values())
    assert_ok(run(*args))
    reference = tmp_path / "reference.h5"
    extract(BAD, toy_checkpoint, reference, ExtractConfig(device="cpu", dtype="float32"), spec_options={"n": "60"})
    assert_same_contents(path, reference)


def test_held_a_full_disk_leaves_a_cache_that_resumes_to_the_same_content(full_disk, toy_checkpoint, tmp_path):
    _, process, path, args, remedy = full_disk
    assert process.returncode != 0 and path.exists()
    remedy()
    assert_ok(run(*args))
    reference = tmp_path / "reference.h5"
    extract(BAD, toy_checkpoint, reference, ExtractConfig(device="cpu", dtype="float32"), spec_options={"n": "40"})
    assert_same_contents(path, reference)


def test_held_of_two_concurrent_extractions_the_loser_is_refused_and_the_winner_intact(tmp_path, toy_checkpoint):
    path, go = tmp_path / "cache.h5", tmp_path / "go"
    args = extract_args(path, toy_checkpoint, "--dtype", "float32", n=40, hold_at="train:5", hold=go)
    winner = cli_process(*args)
    try:
        wait_for(Path(f"{go}.waiting").exists, process=winner)  # the winner is mid-split, its cache open
        loser = run(*args)
        go.touch()
        _, err = winner.communicate(timeout=120)
    finally:
        go.touch()
        winner.kill()
    assert_clean_error(loser, path.name)
    assert winner.returncode == 0, err
    reference = tmp_path / "reference.h5"
    extract(BAD, toy_checkpoint, reference, ExtractConfig(device="cpu", dtype="float32"), spec_options={"n": "40"})
    assert_same_contents(path, reference)


def test_held_spaces_and_unicode_in_paths_and_ids(tmp_path, toy_checkpoint):
    folder = tmp_path / "my données 缓存"
    folder.mkdir()
    cache, run_dir, model, preds = (folder / "a cache ü.h5", folder / "run é 1", folder / "model ß.pt",
                                    folder / "preds ø.csv")
    prefix = "patient ü 缓存 "
    assert_ok(run(*extract_args(cache, toy_checkpoint, "--dtype", "float32", n=24, id_prefix=prefix)))
    assert_ok(run("train", "--cache", cache, "--out", run_dir, *TRAIN))
    assert_ok(run("export", "--spec", BAD, "--checkpoint", toy_checkpoint, "--run", run_dir, "--out", model,
                  *opts(n=24, id_prefix=prefix)))
    assert_ok(run("predict", "--model", model, "--split", "test", "--out", preds, "--device", "cpu"))
    ids = [line.split(",")[0] for line in preds.read_text(encoding="utf-8").splitlines()[1:]]
    assert ids == [f"{prefix}test-{i:04d}" for i in range(24)]
    with CacheReader(cache) as reader:
        assert reader.split("train").ids[0] == f"{prefix}train-0000"


def test_held_a_spec_that_is_not_padding_invariant_is_warned(tmp_path, toy_checkpoint):
    result = run(*extract_args(tmp_path / "cache.h5", toy_checkpoint, "--dtype", "float32", mode="pad_dependent"))
    assert_ok(result)
    assert "padding-invariant" in result.output


# ---- second hostile pass
# Cases found by trying the project again as a hostile user would, beyond the 16 items above: one test each,
# named test_hostile_<what>.


def test_hostile_out_under_a_file_is_a_clear_error(cache):
    """train --out CACHE.h5/run (a folder on the path is a file): one message naming --out (today a
    NotADirectoryError traceback from mkdir), the file byte-identical."""
    before = sha256(cache)
    assert_clean_error(run("train", "--cache", cache, "--out", cache / "run", *TRAIN), "--out", "Not a directory")
    assert sha256(cache) == before


def test_hostile_out_symlink_to_a_complete_run_is_replaced_through_the_link(tmp_path, toy_cache):
    """train --overwrite into a symbolic link to a complete run: the run it points to is replaced, the link stays
    a link (today the swap renames the link itself, then rmtree refuses the renamed link: a traceback, the link
    replaced by a directory and a dangling .NAME.replaced link left)."""
    target, link = tmp_path / "runs" / "a", tmp_path / "latest"
    assert_ok(run("train", "--cache", toy_cache, "--out", target, *TRAIN))
    link.symlink_to(target, target_is_directory=True)
    before = json.loads((target / "config.json").read_text())["train"]["lr"]
    assert_ok(run("train", "--cache", toy_cache, "--out", link, "--overwrite", "--lr", "1e-2", *TRAIN))
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads((target / "config.json").read_text())["train"]["lr"] == 1e-2 != before
    assert (target / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "runs"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["a"]


def test_hostile_two_trains_into_one_out_the_second_is_refused(tmp_path, slow_cache):
    """A second train into the --out a running train writes: refused saying another process writes it; the first
    finishes its own run (today the second clears the first's files and both exit 0: the first's finished run is
    silently replaced, or the two runs' files are mixed)."""
    out = tmp_path / "run"
    first = cli_process("train", "--cache", slow_cache, "--out", out, "--lr", "1e-2", *SLOW_TRAIN)
    try:
        wait_for((out / "config.json").exists, process=first)
        second = run("train", "--cache", slow_cache, "--out", out, "--lr", "1e-3", *SLOW_TRAIN)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert_clean_error(second, "--out", "another process")
    assert first.returncode == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-2
    head = torch.load(out / "head_best.pt", weights_only=True)
    assert head["config"]["lr"] == 1e-2 and (out / "metrics.json").is_file()


def test_hostile_predict_a_split_the_spec_lacks(tmp_path, toy_model):
    """predict --split nosuch: one message naming --split and the spec's splits (today the spec's KeyError as a
    traceback); no csv written."""
    _, model = toy_model
    out = tmp_path / "preds.csv"
    assert_clean_error(run("predict", "--model", model, "--split", "nosuch", "--out", out, "--device", "cpu"),
                       "--split", "nosuch", "train, val, test")
    assert not out.exists()


def _one_class_cache(path: Path) -> Path:
    """A float32 cache whose train split holds label 0 only (val and test hold both classes)."""
    from headcache.pooling import PARAMETER_FREE_POOLS, pool_parameter_free
    from headcache.store import CacheWriter

    rng, d = np.random.default_rng(0), 8
    attrs = {"backbone_fingerprint": "one", "spec": "one", "checkpoint_sha256": "", "hidden_dim": d,
             "dtype": "float32", "load_report": {}}
    with CacheWriter(path, attrs) as writer:
        for name in ("train", "val", "test"):
            split = writer.split(name, 32, list(PARAMETER_FREE_POOLS))
            labels = np.zeros(32, np.int64) if name == "train" else np.arange(32) % 2
            tokens = [rng.standard_normal((int(rng.integers(2, 7)), d)).astype(np.float32) for _ in labels]
            pooled = {pool: np.stack([pool_parameter_free(pool, torch.from_numpy(t)[None],
                                                          torch.ones(1, len(t), dtype=torch.bool))[0].numpy()
                                      for t in tokens]) for pool in PARAMETER_FREE_POOLS}
            split.write(tokens, labels, [f"{name}-{i}" for i in range(32)], pooled)
            split.finish()
    return path


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_hostile_a_train_split_of_one_class_is_refused(tmp_path, command):
    """Every train label 0: refused naming the split and --train-split, as cv refuses such folds (today train and
    sweep exit 0 with a head that can only answer one class)."""
    cache = _one_class_cache(tmp_path / "cache.h5")
    result = run(command, "--cache", cache, "--out", tmp_path / "out", *TRAIN)
    assert_clean_error(result, "'train'", "one class", "--train-split")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--val-split", "--test-split"])
def test_hostile_val_or_test_split_equal_to_the_train_split_is_refused(tmp_path, toy_cache, flag):
    """--val-split train (or --test-split train): early stopping or test metrics would score the rows the head
    trains on; refused naming the flag (today a run with inflated metrics, exit 0)."""
    result = run("train", "--cache", toy_cache, "--out", tmp_path / "run", flag, "train", *TRAIN)
    assert_clean_error(result, flag, "train split")
    assert not (tmp_path / "run").exists()


def test_hostile_spec_opt_given_twice_is_refused(tmp_path, toy_checkpoint):
    """--spec-opt n=8 --spec-opt n=9: refused naming the key (today the later one wins silently)."""
    path = tmp_path / "cache.h5"
    assert_clean_error(run(*extract_args(path, toy_checkpoint, "--spec-opt", "n=9", n=8)), "--spec-opt n", "twice")
    assert not path.exists()


def _protected(tmp_path, toy_model, toy_checkpoint, which):
    run_dir, model = toy_model
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = tmp_path / "backbone.pt"
    shutil.copy(toy_checkpoint, checkpoint)
    export_args = ["export", "--spec", BAD, "--checkpoint", checkpoint, "--run", copy, *opts(n=24), "--overwrite"]
    cases = {
        "extract_out_is_the_checkpoint": (extract_args(checkpoint, checkpoint, "--overwrite", n=8), checkpoint),
        "export_out_is_the_checkpoint": (export_args + ["--out", checkpoint], checkpoint),
        "export_out_is_the_runs_head": (export_args + ["--out", copy / "head_best.pt"], copy / "head_best.pt"),
    }
    return cases[which]


@pytest.mark.parametrize("which", ["extract_out_is_the_checkpoint", "export_out_is_the_checkpoint",
                                   "export_out_is_the_runs_head"])
def test_hostile_out_onto_an_input_is_refused_even_with_overwrite(tmp_path, toy_model, toy_checkpoint, which):
    """--out naming a file the command reads (the backbone checkpoint, the run's head): refused even with
    --overwrite, the input byte-identical (today it is replaced by the cache or model, exit 0; without
    --overwrite extract's refusal even suggested --overwrite)."""
    args, victim = _protected(tmp_path, toy_model, toy_checkpoint, which)
    before = sha256(victim)
    assert_clean_error(run(*args), "--out", "choose another name")
    assert sha256(victim) == before


def _full_disk_run(tmp_path, toy_cache, toy_model, toy_checkpoint, command):
    """(args, file size limit) of a command whose largest output file passes the limit (EFBIG, as a full disk)."""
    run_dir, model = toy_model
    return {
        "train": (["train", "--cache", toy_cache, "--out", tmp_path / "out", *TRAIN], 16_000),  # curves.png
        "sweep": (["sweep", "--cache", toy_cache, "--out", tmp_path / "out", "--grid", "lr=1e-3,1e-2", *TRAIN],
                  16_000),
        "export": (["export", "--spec", BAD, "--checkpoint", toy_checkpoint, "--run", run_dir, "--out",
                    tmp_path / "model.pt", *opts(n=24)], 4_000),  # the model file is about 8 KB
        "predict": (["predict", "--model", model, "--split", "test", "--out", tmp_path / "preds.csv", "--device",
                     "cpu"], 300),  # the csv is about 700 bytes
    }[command]


@pytest.mark.parametrize("command", ["train", "sweep", "export", "predict"])
def test_hostile_a_full_disk_while_writing_outputs_is_a_clear_error(tmp_path, toy_cache, toy_model, toy_checkpoint,
                                                                    command):
    """Run files, tables, plots, models and predictions that hit a file size limit (EFBIG, as on a full disk):
    exit 1 with one message naming the file and the fix (today a Python traceback: OSError from matplotlib
    and csv, RuntimeError from torch.save); no temporary file left."""
    args, limit = _full_disk_run(tmp_path, toy_cache, toy_model, toy_checkpoint, command)
    process = cli_process(*args, preexec_fn=_limited(limit))
    out, err = process.communicate(timeout=300)
    text = out + err
    problems = []
    if process.returncode != 1:
        problems.append(f"exit code {process.returncode}")
    if "Traceback" in text:
        problems.append("a traceback")
    if not re.search(r"error: cannot write \S+.*free space", flat(text)):
        problems.append("no message naming the file and the fix")
    temporaries = [str(p) for p in tmp_path.rglob(".*.tmp-*")]
    if temporaries:
        problems.append(f"temporary files left: {temporaries}")
    assert not problems, "; ".join(problems) + f"\n{text[-1500:]}"


def _temporaries(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*.tmp"))


def test_hostile_a_killed_overwrite_leaves_no_stale_temporary_once_replaced_again(tmp_path, toy_checkpoint):
    """extract --overwrite killed by SIGKILL leaves its hidden temporary (a cache-sized .NAME.*.tmp) beside the
    cache, as it must (the old cache stays whole); the next --overwrite removes it, as no process holds it open
    (today every killed attempt leaves one more, forever)."""
    path = tmp_path / "cache.h5"
    assert_ok(run(*extract_args(path, toy_checkpoint, n=8)))
    killed = extract_args(path, toy_checkpoint, "--overwrite", n=8, kill_at="val:3", marker=tmp_path / "killed")
    process = subprocess.run([sys.executable, CLI, *map(str, killed)], capture_output=True, text=True, env=env(),
                             cwd=REPO, timeout=120, check=False)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert len(_temporaries(path)) == 1
    assert_ok(run(*extract_args(path, toy_checkpoint, "--overwrite", n=8)))
    assert _temporaries(path) == []
    assert all(complete_splits(path).values())


def test_hostile_a_running_overwrite_keeps_its_temporary_while_another_replaces_the_file(tmp_path, toy_checkpoint):
    """The stale-temporary clean-up spares a temporary that a live replacement holds open (HDF5's exclusive lock):
    that replacement still finishes and renames its file into place."""
    path, go = tmp_path / "cache.h5", tmp_path / "go"
    assert_ok(run(*extract_args(path, toy_checkpoint, "--dtype", "float32", n=8)))
    held = cli_process(*extract_args(path, toy_checkpoint, "--overwrite", "--dtype", "float32", n=40,
                                     hold_at="train:5", hold=go))
    try:
        wait_for(Path(f"{go}.waiting").exists, process=held)
        live = _temporaries(path)
        assert len(live) == 1
        assert_ok(run(*extract_args(path, toy_checkpoint, "--overwrite", "--dtype", "float32", n=8)))
        assert _temporaries(path) == live, "the live replacement's temporary was deleted"
        go.touch()
        _, err = held.communicate(timeout=120)
    finally:
        go.touch()
        held.kill()
    assert held.returncode == 0, err
    assert _temporaries(path) == []
    with CacheReader(path) as reader:
        assert len(reader.split("train").ids) == 40


@pytest.mark.parametrize("command", ["extract", "predict"])
def test_hostile_overwrite_through_a_symlink_replaces_the_file_it_names(tmp_path, toy_checkpoint, toy_model, command):
    """--out a symbolic link to a file elsewhere (a cache on a bigger disk), with --overwrite: the file it names is
    replaced and the link stays a link (today the link itself is replaced by a new file in the link's folder,
    and the file it named is left, stale)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if command == "extract":
        real, link = elsewhere / "cache.h5", tmp_path / "cache.h5"
        assert_ok(run(*extract_args(real, toy_checkpoint, n=8)))
        args = extract_args(link, toy_checkpoint, "--overwrite", n=12)
    else:
        real, link = elsewhere / "preds.csv", tmp_path / "preds.csv"
        real.write_text("old\n")
        args = ["predict", "--model", toy_model[1], "--split", "test", "--out", link, "--device", "cpu", "--overwrite"]
    link.symlink_to(real)
    assert_ok(run(*args))
    assert link.is_symlink() and link.resolve() == real.resolve()
    if command == "extract":
        with CacheReader(real) as reader:
            assert len(reader.split("train").ids) == 12
    else:
        assert real.read_text().splitlines()[0] == "id,label,p0,p1"
    assert sorted(p.name for p in elsewhere.iterdir()) == [real.name]


def test_hostile_out_dot_is_the_current_directory(tmp_path, toy_cache, monkeypatch):
    """train --out . (or --out ''): the current directory, refused when it holds files of the user's, written when
    empty (today a ValueError traceback: '.' has an empty name)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("mine")
    assert_clean_error(run("train", "--cache", toy_cache, "--out", ".", *TRAIN), "mine.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert_ok(run("train", "--cache", toy_cache, "--out", ".", *TRAIN))
    assert (empty / "metrics.json").is_file()


def test_hostile_bench_out_a_file_is_refused(tmp_path, toy_cache, toy_checkpoint):
    """bench --out naming a file: refused before any work, the file byte-identical (today a FileExistsError
    traceback from mkdir)."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    result = run("bench", "--spec", BAD, "--checkpoint", toy_checkpoint, "--out", target, "--epochs", "1",
                 "--device", "cpu", *opts(n=24))
    assert_clean_error(result, "--out", "is a file")
    assert target.read_text() == "mine"


def test_hostile_predict_model_a_folder_says_so(tmp_path):
    """predict --model naming a folder: the message says it is a folder (today: 'does not exist')."""
    result = run("predict", "--model", tmp_path, "--out", tmp_path / "p.csv", "--device", "cpu")
    assert_clean_error(result, "--model", "is a folder")
    assert "does not exist" not in result.output


@pytest.mark.parametrize("mode, got", [("hidden2d", "hidden ["), ("short_mask", "mask ["), ("triple", "tuple of 3")])
def test_hostile_predict_checks_what_encode_returns(tmp_path, toy_model, mode, got):
    """predict with a spec whose encode breaks the contract (a spec option the model is run with): a SpecError
    naming spec.encode and what it returned, as extraction gives; no csv written."""
    _, model = toy_model
    out = tmp_path / "preds.csv"
    assert_clean_error(run("predict", "--model", model, "--split", "test", "--out", out, "--device", "cpu",
                           "--spec-opt", f"mode={mode}"), "spec.encode returned", got)
    assert not out.exists()
