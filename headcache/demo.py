"""`headcache demo`: the whole job end to end on synthetic data in the seed's layout.

It writes ``OUT/data/`` (the seed's on-disk layout), ``OUT/backbone.ckpt``
(a checkpoint with the seed's key names), extracts ``OUT/cache.h5``, trains
``OUT/run/`` and ends with a short bench in ``OUT/bench/`` (end-to-end
training against the cache on the first BENCH_ITEMS items of each split, for
BENCH_EPOCHS epochs: about a minute on 2 CPU cores), so that a user can go on by hand with
``headcache extract --spec seqsetvae --spec-opt data=OUT/data --checkpoint OUT/backbone.ckpt ...``.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from headcache.backbones.demo import write_demo
from headcache.bench import BenchResult, bench
from headcache.config import TrainConfig
from headcache.extract import ExtractConfig, extract
from headcache.train import train

BENCH_ITEMS = 256  # per split: the end-to-end side runs the backbone every epoch, so the demo's bench is a sample
BENCH_EPOCHS = 2


@dataclass
class DemoSummary:
    data_dir: Path
    checkpoint: Path
    cache: Path
    run_dir: Path
    metrics: dict[str, dict]
    seconds: dict[str, float] = field(default_factory=dict)
    bench: BenchResult | None = None


def run_demo(out: str | Path = "cache/demo", *, patients: int = 1000, device: str = "auto", epochs: int = 50,
             seed: int = 0, with_bench: bool = True, on_stage: Callable[[str], None] = lambda stage: None,
             **hooks) -> DemoSummary:
    """Generate, extract, train (and bench); the demo's own files in ``out`` are replaced on every run.

    ``hooks`` are passed on: ``on_progress`` and ``on_load`` to `extract`, ``on_epoch`` to `train`.
    """
    out = Path(out)
    seconds: dict[str, float] = {}

    stages = 4 if with_bench else 3
    on_stage(f"1/{stages} writing {patients} synthetic patients and a seed-layout checkpoint to {out}")
    started = time.perf_counter()
    shutil.rmtree(out / "data", ignore_errors=True)  # the demo owns these names, nothing else in out
    files = write_demo(out, patients=patients, seed=seed)
    seconds["generate data"] = time.perf_counter() - started

    on_stage(f"2/{stages} extracting hidden states (one backbone pass)")
    cache = out / "cache.h5"
    config = ExtractConfig(device=device, overwrite=True)
    result = extract("seqsetvae", files.checkpoint, cache, config, spec_options={"data": str(files.data_dir)},
                     on_progress=hooks.get("on_progress"), on_load=hooks.get("on_load"))
    seconds["extract"] = result.seconds

    on_stage(f"3/{stages} training the seed's head (meanq pool, mlp) from the cache, up to {epochs} epochs")
    trained = train(cache, out / "run", TrainConfig(epochs=epochs, device=device, seed=seed), overwrite=True,
                    on_epoch=hooks.get("on_epoch"))
    seconds["train"] = trained.seconds
    summary = DemoSummary(files.data_dir, files.checkpoint, cache, trained.run_dir, trained.metrics, seconds)
    if with_bench:
        on_stage(f"4/4 bench: {BENCH_EPOCHS} epochs end to end (backbone in every step) against the cache, "
                 f"first {BENCH_ITEMS} patients of each split")
        started = time.perf_counter()
        summary.bench = bench("seqsetvae", files.checkpoint, epochs=BENCH_EPOCHS, out=out / "bench",
                              config=TrainConfig(device=device, seed=seed), spec_options={"data": str(files.data_dir)},
                              limit=BENCH_ITEMS)
        seconds["bench"] = time.perf_counter() - started
    return summary
