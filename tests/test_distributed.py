"""Extraction in parts: --shard I/N + merge, and torchrun with 2 CPU processes (gloo), against one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, TOY
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from headcache.cli import app
from headcache.distributed import merge_parts, part_path, shard_bounds
from headcache.errors import CacheError
from headcache.extract import ExtractConfig, extract
from headcache.store import CacheReader

runner = CliRunner()
CONFIG = ExtractConfig(dtype="float32", device="cpu", batch_size=8)


@given(st.integers(0, 500), st.integers(1, 17))
def test_shards_are_contiguous_disjoint_covering_and_even(n, count):
    bounds = [shard_bounds(n, i, count) for i in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def single(tmp_path_factory, toy_checkpoint) -> Path:
    """The toy spec's cache from one process."""
    out = tmp_path_factory.mktemp("single") / "cache.h5"
    extract(TOY, toy_checkpoint, out, CONFIG, spec_options={"n": "40"})
    return out


def assert_same_cache(merged: Path, single: Path) -> None:
    """Equal offsets, labels, ids and fingerprints; tokens and pools within float32 batch-shape noise."""
    with CacheReader(merged) as a, CacheReader(single) as b:
        assert a.backbone_fingerprint == b.backbone_fingerprint and a.spec == b.spec and a.splits == b.splits
        for name in b.splits:
            x, y = a.split(name), b.split(name)
            assert x.complete and x.n == y.n
            np.testing.assert_array_equal(x.offsets, y.offsets)
            np.testing.assert_array_equal(x.labels, y.labels)
            assert x.ids == y.ids
            np.testing.assert_allclose(x.tokens(), y.tokens(), atol=1e-5, rtol=0)
            for pool in y.pooled_names:
                np.testing.assert_allclose(x.pooled(pool), y.pooled(pool), atol=1e-5, rtol=0)


def shard_command(out: Path, checkpoint: Path, shard: str) -> list[str]:
    return ["extract", "--spec", TOY, "--checkpoint", str(checkpoint), "--out", str(out), "--spec-opt", "n=40",
            "--dtype", "float32", "--device", "cpu", "--batch-size", "8", "--shard", shard]


class TestShardsAndMerge:
    def test_three_shards_merged_equal_one_process(self, tmp_path, toy_checkpoint, single):
        out = tmp_path / "cache.h5"
        for i in range(3):
            result = runner.invoke(app, shard_command(out, toy_checkpoint, f"{i}/3"))
            assert result.exit_code == 0, result.output
            assert part_path(out, i, 3).is_file() and not out.exists()
        with CacheReader(part_path(out, 1, 3)) as reader:
            assert reader.split("train").n == 13 and reader.split("train").ids[0] == "train-0014"
        result = runner.invoke(app, ["merge", str(out)])
        assert result.exit_code == 0, result.output
        assert_same_cache(out, single)
        assert not any(part_path(out, i, 3).exists() for i in range(3))  # parts removed once merged

    def test_keep_parts_keeps_them(self, tmp_path, toy_checkpoint):
        out = tmp_path / "cache.h5"
        for i in range(2):
            assert runner.invoke(app, shard_command(out, toy_checkpoint, f"{i}/2")).exit_code == 0
        assert runner.invoke(app, ["merge", str(out), "--keep-parts"]).exit_code == 0
        assert out.is_file() and part_path(out, 0, 2).is_file() and part_path(out, 1, 2).is_file()

    def test_a_part_is_not_trained_on_as_if_it_were_the_cache(self, tmp_path, toy_checkpoint):
        out = tmp_path / "cache.h5"
        for i in range(2):
            assert runner.invoke(app, shard_command(out, toy_checkpoint, f"{i}/2")).exit_code == 0
        with CacheReader(part_path(out, 1, 2)) as reader:
            assert reader.shard == (1, 2) and reader.summary()["shard"] == [1, 2]
        train = ["train", "--cache", str(part_path(out, 0, 2)), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--device", "cpu", "--quiet"]
        result = runner.invoke(app, train)
        assert result.exit_code == 1 and "is part 0 of 2 of a sharded extraction" in " ".join(result.output.split())
        assert "headcache merge" in result.output and not (tmp_path / "run").exists()
        assert runner.invoke(app, ["merge", str(out)]).exit_code == 0
        with CacheReader(out) as reader:
            assert reader.shard is None  # the merged cache is whole
        train[2] = str(out)
        assert runner.invoke(app, train).exit_code == 0

    def test_a_missing_part_is_refused_by_name_and_nothing_is_written(self, tmp_path, toy_checkpoint):
        out = tmp_path / "cache.h5"
        for i in (0, 2):
            assert runner.invoke(app, shard_command(out, toy_checkpoint, f"{i}/3")).exit_code == 0
        result = runner.invoke(app, ["merge", str(out)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert part_path(out, 1, 3).name in "".join(result.output.split())  # named, however the line wraps
        assert not out.exists() and part_path(out, 0, 3).exists()

    def test_an_incomplete_part_is_refused(self, tmp_path, toy_checkpoint):
        out = tmp_path / "cache.h5"
        for i in range(2):
            assert runner.invoke(app, shard_command(out, toy_checkpoint, f"{i}/2")).exit_code == 0
        with h5py.File(part_path(out, 1, 2), "r+") as f:
            f["val"].attrs["complete"] = False
        with pytest.raises(CacheError, match="incomplete"):
            merge_parts(out)
        assert not out.exists()

    def test_a_foreign_part_is_refused(self, tmp_path, toy_checkpoint):
        out = tmp_path / "cache.h5"
        assert runner.invoke(app, shard_command(out, toy_checkpoint, "0/2")).exit_code == 0
        foreign = shard_command(out, toy_checkpoint, "1/2")
        foreign[foreign.index("float32")] = "float16"
        assert runner.invoke(app, foreign).exit_code == 0
        with pytest.raises(CacheError, match="dtype"):
            merge_parts(out)

    def test_shard_flag_is_checked(self, tmp_path, toy_checkpoint):
        result = runner.invoke(app, shard_command(tmp_path / "c.h5", toy_checkpoint, "3/3"))
        assert result.exit_code == 1 and "--shard" in result.output and "Traceback" not in result.output

    def test_a_complete_part_is_not_extracted_again(self, tmp_path, toy_checkpoint):
        out = tmp_path / "cache.h5"
        assert runner.invoke(app, shard_command(out, toy_checkpoint, "0/2")).exit_code == 0
        before = part_path(out, 0, 2).read_bytes()
        result = runner.invoke(app, shard_command(out, toy_checkpoint, "0/2"))
        assert result.exit_code == 0 and "already complete" in result.output
        assert part_path(out, 0, 2).read_bytes() == before


def torchrun(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "headcache"] + args
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def torchrun_extract(out: Path, checkpoint: Path, *options: str) -> list[str]:
    return ["extract", "--spec", TOY, "--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "float32",
            "--device", "cpu", "--batch-size", "8", "--spec-opt", "n=40", *options]


class TestTorchrun:
    def test_two_processes_write_the_cache_of_one(self, tmp_path, toy_checkpoint, single):
        out = tmp_path / "cache.h5"
        done = torchrun(torchrun_extract(out, toy_checkpoint))
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("merged 2 parts") == 1  # rank 0 alone reports
        assert_same_cache(out, single)
        assert not part_path(out, 0, 2).exists() and not part_path(out, 1, 2).exists()

    def test_a_killed_run_resumes_with_the_same_command(self, tmp_path, toy_checkpoint, single):
        out = tmp_path / "cache.h5"
        marker = tmp_path / "killed-once"
        command = torchrun_extract(out, toy_checkpoint, "--spec-opt", "kill_at=30", "--spec-opt", f"marker={marker}")
        killed = torchrun(command)
        assert killed.returncode != 0 and marker.exists() and not out.exists()
        assert part_path(out, 1, 2).exists()  # rank 1 (train items 20..39) died part-way
        resumed = torchrun(command)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        with CacheReader(out) as a, CacheReader(single) as b:
            assert a.split("train").ids == b.split("train").ids
            np.testing.assert_allclose(a.split("train").tokens(), b.split("train").tokens(), atol=1e-5, rtol=0)


def test_readme_commands_for_many_processes_run_as_written(tmp_path):
    """The README's "Many GPUs or machines" block, run verbatim (headcache and torchrun as this Python's
    modules) in a folder laid out as `headcache demo` leaves it; both ways give the same cache."""
    import re
    import shlex

    from headcache.backbones.demo import write_demo

    write_demo(tmp_path / "cache" / "demo", patients=30, seed=0)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Many GPUs or machines", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    prefixes = {"headcache": [sys.executable, "-m", "headcache"],
                "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    for line in block.strip().splitlines():
        words = shlex.split(line)
        done = subprocess.run(prefixes[words[0]] + words[1:], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, line + "\n" + done.stdout + done.stderr
    with CacheReader(tmp_path / "cache/demo/torchrun.h5") as a, CacheReader(tmp_path / "cache/demo/sharded.h5") as b:
        for name in b.splits:
            assert a.split(name).ids == b.split(name).ids and a.split(name).n > 0
            np.testing.assert_array_equal(a.split(name).offsets, b.split(name).offsets)
            np.testing.assert_array_equal(a.split(name).tokens(), b.split(name).tokens())  # same slices, batches


def test_a_two_rank_sweep_equals_a_one_process_sweep(tmp_path, signal_cache):
    """Two banks (mlp and linear heads) spread over 2 ranks: the same leaderboard and head weights."""
    import json

    import torch

    grid = ["sweep", "--cache", str(signal_cache), "--grid", "lr=1e-3,3e-3", "--grid", "head=mlp,linear",
            "--epochs", "3", "--device", "cpu", "--quiet"]
    one = runner.invoke(app, grid + ["--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    done = torchrun(grid + ["--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("heads trained in 2 batched banks") == 1  # rank 0 alone reports
    board = [json.loads((tmp_path / out / "leaderboard.json").read_text()) for out in ("one", "two")]
    assert board[0] == board[1] and len(board[0]) == 4
    for row in board[0]:
        a, b = (torch.load(tmp_path / out / "runs" / row["run"] / "head_best.pt", weights_only=True)
                for out in ("one", "two"))
        assert a["config"] == b["config"] and a["config"]["device"] == "cpu"
        assert all(torch.equal(a["state"][name], b["state"][name]) for name in a["state"])
