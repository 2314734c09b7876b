"""Shared by the benchmark scripts: synthetic caches, timing, and the JSON record of a result.

Every script measures both sides of its comparison in one run and writes
``benchmarks/results/<name>.json`` with the machine, the versions and the
system load (other processes on the machine skew timings; the load average is
recorded so a reader can tell).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import headcache
from headcache.pooling import PARAMETER_FREE_POOLS, pool_parameter_free
from headcache.store import CacheWriter

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Machine, versions and load, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "headcache": headcache.__version__, "commit": _commit(), "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, result: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json with the machine record added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), **result,
              "machine": machine()}
    path.write_text(json.dumps(record, indent=2, default=float))
    print(f"wrote {path}")
    return path


def timed(function: Callable[[], Any]) -> float:
    """Seconds one call takes (CUDA work included)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def summary(seconds: list[float]) -> dict[str, float]:
    """min (the least disturbed by other processes), median and all values."""
    return {"min": min(seconds), "median": statistics.median(seconds), "all": seconds}


def synthetic_cache(path: Path, splits: dict[str, int], *, dim: int = 256, tokens: tuple[int, int] = (5, 60),
                    dtype: str = "float16", seed: int = 0, block: int = 512) -> Path:
    """A cache of random ragged sequences (lengths uniform in ``tokens``) with a learnable signal:
    the label shifts the mean of the first feature. Written block by block, so memory stays small."""
    rng = np.random.default_rng(seed)
    attrs = {"backbone_fingerprint": "synthetic", "spec": "synthetic", "checkpoint_sha256": "none",
             "hidden_dim": dim, "dtype": dtype, "load_report": {}}
    with CacheWriter(path, attrs, overwrite=True) as writer:
        writers = {name: writer.split(name, n, list(PARAMETER_FREE_POOLS)) for name, n in splits.items()}
        for name, n in splits.items():
            for start in range(0, n, block):
                count = min(block, n - start)
                labels = (rng.random(count) < 0.2).astype(np.int64)
                lengths = rng.integers(tokens[0], tokens[1] + 1, count)
                rows = [rng.standard_normal((t, dim), dtype=np.float32) for t in lengths]
                for row, label in zip(rows, labels):
                    row[:, 0] += 0.5 * label
                rows = [r.astype(dtype).astype(np.float32) for r in rows]
                padded = torch.zeros(count, int(lengths.max()), dim)
                for i, row in enumerate(rows):
                    padded[i, :len(row)] = torch.from_numpy(row)
                mask = torch.arange(padded.shape[1]) < torch.from_numpy(lengths)[:, None]
                pooled = {p: pool_parameter_free(p, padded, mask).numpy() for p in PARAMETER_FREE_POOLS}
                writers[name].write(rows, labels, [f"{name}-{start + i}" for i in range(count)], pooled)
            writers[name].finish()
    return path
