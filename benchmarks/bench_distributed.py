"""Sharded extraction against one process on the same cores, and the merge against the extraction.

Both sides extract the demo data (the seed-size backbone) as whole processes
of the headcache command: one process with 2 threads, and torchrun with 2
processes of 1 thread each (gloo), which shard, write their parts and merge.
Target: the 2 ranks reach >= 0.9x the single process's sequences per second
(sharding costs nothing). Then `extract --shard I/2` for both parts and a
timed `headcache merge`: target merge time <= 5% of the extraction's.

    python benchmarks/bench_distributed.py [--patients 600 --batch-size 64 --repeats 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import summary, write_result
from bench_extract import demo_data

from headcache.distributed import merge_parts

THROUGHPUT_TARGET = 0.9
MERGE_TARGET = 0.05
REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], threads: int) -> float:
    """Seconds a whole command takes, with ``threads`` intra-op threads per process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data, checkpoint = demo_data(args.patients)
    headcache = [sys.executable, "-m", "headcache"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "headcache"]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "cache.h5"
        extract = ["extract", "--spec", "seqsetvae", "--spec-opt", f"data={data}", "--checkpoint", str(checkpoint),
                   "--out", str(out), "--device", "cpu", "--batch-size", str(args.batch_size), "--overwrite"]
        single, ranks = [], []
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
            single.append(run(headcache + extract, threads=2))
            ranks.append(run(torchrun + extract, threads=1))
        shard_seconds = [run(headcache + extract + ["--shard", f"{i}/2"], threads=1) for i in range(2)]
        out.unlink()
        started = time.perf_counter()  # in this process: the merge itself, not an interpreter's start-up
        merge_parts(out)
        merge_seconds = time.perf_counter() - started
    sequences = args.patients
    ratio = min(single) / min(ranks)
    merge_share = merge_seconds / sum(shard_seconds)
    print(f"1 process x 2 threads {sequences / min(single):.1f} seq/s, 2 ranks x 1 thread "
          f"{sequences / min(ranks):.1f} seq/s: ratio {ratio:.2f} (target >= {THROUGHPUT_TARGET})")
    print(f"merge {merge_seconds:.2f} s vs extraction of the parts "
          f"{sum(shard_seconds):.1f} s: {merge_share:.1%} (target <= {MERGE_TARGET:.0%})")
    write_result("bench_distributed", {
        "what": "whole headcache processes on the demo data: extract in 1 process x 2 threads vs torchrun 2 "
                "processes x 1 thread (shard + merge); then merge_parts of 2 --shard parts (timed in-process) vs their extraction (whole processes)",
        "patients": sequences, "batch_size": args.batch_size,
        "single_process_seconds": summary(single), "two_ranks_seconds": summary(ranks),
        "throughput_ratio": ratio, "throughput_target": f">= {THROUGHPUT_TARGET}",
        "throughput_met": ratio >= THROUGHPUT_TARGET,
        "shard_seconds": shard_seconds, "merge_seconds": merge_seconds,
        "merge_share_of_extraction": merge_share, "merge_target": f"<= {MERGE_TARGET}",
        "merge_met": merge_share <= MERGE_TARGET})


if __name__ == "__main__":
    main()
