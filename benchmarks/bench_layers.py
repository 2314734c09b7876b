"""Every layer from one cache (issue 11): what it costs on disk, in extraction and in training.

Three comparisons, each side measured in the same run, the sides alternating:

1. size and extraction time of a cache of the last layer (``layers=last``), of every
   layer's pooled vectors with the last layer's tokens (``layers=all``, the default
   ``token_layers``), and of every layer's tokens too (``layers=all``, ``--token-layers all``):
   (a) the demo (spec ``demo``, the seed's size: ids 0..4), (b) a BERT made here from a config
   (``--bert-layers`` x ``--hidden``, spec ``hf``: ids 0..L) over short synthetic texts.
   Target: ``layers=all`` with the default token layers <= 1.25x the last layer's cache.
   Each cache's bytes are also broken down by dataset (tokens, pooled, the rest) into the
   bytes its rows hold and the bytes HDF5 allocated for them (whole chunks), so a miss shows its cause.
2. epoch time of ``--layer mix`` against one layer (``--layer last``), meanq, both from the
   demo's ``layers=all`` cache (the one-layer side opened on its last layer, as `headcache train`
   does): median of the epochs of a `fit`, the fastest of the repeats. Target: mix <= 2x.
   The same for the learned pool on the ``--token-layers all`` cache (no target).
3. a layer sweep, one bank of L + 1 heads (every cached layer and mix, configs differing only in
   ``layer``, the source opened with ``layer="all"``) against one head on the last layer: whole
   `fit` calls, the same epochs, fastest of the repeats. Target (meanq): <= 3x. Learned: no target.

    python benchmarks/bench_layers.py [--patients 300 --texts 1000 --bert-layers 6 --hidden 128
                                       --epochs 10 --extract-repeats 3 --repeats 7 --threads 2]

Writes benchmarks/results/bench_layers.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the generated models of the backbone tests

from _common import summary, timed, write_result  # noqa: E402
from backbones.hf_models import synthetic_texts, write_bert_folder, write_csv  # noqa: E402
from bench_extract import WORK, demo_data  # noqa: E402

from headcache.config import TrainConfig  # noqa: E402
from headcache.extract import ExtractConfig, extract  # noqa: E402
from headcache.features import CachedFeatures  # noqa: E402
from headcache.store import CacheReader  # noqa: E402
from headcache.train import fit, layer_view, num_classes_of, resolve_splits, tasks_for_splits  # noqa: E402

SIZE_TARGET = 1.25  # layers=all (default token layers) / layers=last, bytes on disk
MIX_EPOCH_TARGET = 2.0  # a --layer mix epoch / a one-layer epoch, meanq
SWEEP_TARGET = 3.0  # an (L + 1)-head layer sweep / one head, whole fit, meanq
VARIANTS = {  # name: (spec option layers, ExtractConfig.token_layers)
    "last": ("last", "last"),
    "all": ("all", "last"),
    "all_tokens": ("all", "all"),
}
SPLIT_SHARES = (("train", 0.7), ("val", 0.15), ("test", 0.15))


# ---------------------------------------------------------------------------- 1. size and extraction time


def bert_data(texts: int, layers: int, hidden: int) -> tuple[Path, Path]:
    """A BERT folder (random weights, its own WordPiece vocabulary) and a CSV of labelled short texts
    with a split column, written once per shape under cache/benchmarks/layers_hf/."""
    folder = WORK / "layers_hf"
    folder.mkdir(parents=True, exist_ok=True)
    words, labels = synthetic_texts(texts, seed=0)
    splits = [name for name, share in SPLIT_SHARES for _ in range(round(share * texts))][:texts]
    splits += ["train"] * (texts - len(splits))
    data = write_csv(folder / f"texts_{texts}.csv", [{"id": f"t{i}", "text": t, "label": y, "split": s}
                                                      for i, (t, y, s) in enumerate(zip(words, labels, splits))])
    bert = folder / f"bert_{layers}x{hidden}"
    if not (bert / "config.json").is_file():
        write_bert_folder(bert, hidden=hidden, layers=layers, max_positions=64, texts=words)
    return data, bert


def breakdown(path: Path) -> dict[str, dict[str, int]]:
    """Bytes per kind of dataset (tokens, pooled, other): ``rows`` what the arrays hold, ``allocated``
    what HDF5 stored for them (whole chunks, checksums)."""
    parts = {kind: {"rows": 0, "allocated": 0} for kind in ("tokens", "pooled", "other")}

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            kind = "tokens" if name.endswith("/tokens") else "pooled" if "/pooled/" in name else "other"
            parts[kind]["rows"] += int(np.prod(item.shape, dtype=np.int64)) * item.dtype.itemsize
            parts[kind]["allocated"] += item.id.get_storage_size()

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return parts


def cache_facts(path: Path) -> dict[str, Any]:
    with CacheReader(path) as reader:
        splits = {name: reader.split(name) for name in reader.splits}
        return {"layers": reader.layers, "token_layers": reader.token_layers, "hidden_dim": reader.hidden_dim,
                "dtype": str(reader.dtype), "items": sum(s.n for s in splits.values()),
                "token_rows": sum(int(s.offsets[-1]) for s in splits.values())}


def _rows(variant: dict[str, Any]) -> int:
    return sum(part["rows"] for part in variant["breakdown"].values())


def size_case(name: str, spec: str, checkpoint: Path, options: dict[str, str], scratch: Path,
              repeats: int) -> dict[str, Any]:
    """Extract the three variants ``repeats`` times, alternating; sizes of the last run of each, time the fastest."""
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    paths = {variant: scratch / f"{name}_{variant}.h5" for variant in VARIANTS}
    for _ in range(repeats):
        for variant, (layers, token_layers) in VARIANTS.items():
            config = ExtractConfig(device="cpu", overwrite=True, token_layers=token_layers)
            started = time.process_time()
            seconds[variant].append(timed(lambda: extract(spec, checkpoint, paths[variant], config,
                                                          spec_options={**options, "layers": layers})))
            cpu[variant].append(time.process_time() - started)
    variants = {}
    for variant, path in paths.items():
        variants[variant] = {"bytes": os.path.getsize(path), "seconds": summary(seconds[variant]),
                             "cpu_seconds": summary(cpu[variant]), "breakdown": breakdown(path), **cache_facts(path)}
    last = variants["last"]
    for variant in variants.values():
        variant["size_ratio"] = variant["bytes"] / last["bytes"]
        # what the arrays' rows alone would take: the ratio with no chunk allocated beyond them
        variant["rows_ratio"] = _rows(variant) / _rows(last)
        variant["seconds_ratio"] = variant["seconds"]["min"] / last["seconds"]["min"]
    facts = variants["last"]
    per_item = facts["token_rows"] / facts["items"]
    return {"case": name, "spec": spec, "items": facts["items"], "tokens_per_item": per_item,
            "variants": variants, "size_ratio": variants["all"]["size_ratio"],
            "rows_ratio": variants["all"]["rows_ratio"], "size_target": SIZE_TARGET,
            "met": variants["all"]["size_ratio"] <= SIZE_TARGET}


# ---------------------------------------------------------------------------- 2 and 3. training


def timed_fit(path: Path, pool: str, layers: list[str], epochs: int) -> dict[str, Any]:
    """One `fit` of a bank with one head per entry of ``layers``, the source opened on its `layer_view`:
    whole seconds (loading excluded), and the epochs' own seconds (between consecutive epoch ends)."""
    configs = [TrainConfig(pool=pool, epochs=epochs, patience=epochs, device="cpu", layer=layer) for layer in layers]
    source = CachedFeatures(path, pool=pool, device=torch.device("cpu"), layer=layer_view(configs))
    splits = resolve_splits(configs[0], source.splits)
    num_classes = num_classes_of(source, splits)  # loads every split: the timings see a loaded cache
    tasks = tasks_for_splits(configs, source, splits)
    marks: list[float] = []
    cpu, started = time.process_time(), time.perf_counter()
    fit(source, tasks, num_classes=num_classes, hidden_dim=source.hidden_dim,
        on_epoch=lambda epoch, rows: marks.append(time.perf_counter()))
    ended, cpu = time.perf_counter(), time.process_time() - cpu
    epoch_seconds = [b - a for a, b in zip(marks, marks[1:])]
    return {"seconds": ended - started, "cpu_seconds": cpu, "epoch_median": statistics.median(epoch_seconds),
            "epoch_seconds": epoch_seconds}


def compare(path: Path, pool: str, sides: dict[str, list[str]], epochs: int, repeats: int) -> dict[str, Any]:
    """Each side (a bank's layer list) ``repeats`` times, alternating, after one warm-up of the first."""
    timed_fit(path, pool, next(iter(sides.values())), epochs)  # warm-up: allocator, thread pool, first calls
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, layers in sides.items():
            runs[side].append(timed_fit(path, pool, layers, epochs))
    return {side: {"layers": sides[side], "heads": len(sides[side]),
                   "seconds": summary([r["seconds"] for r in values]),
                   "cpu_seconds": summary([r["cpu_seconds"] for r in values]),
                   "epoch_median": summary([r["epoch_median"] for r in values])}
            for side, values in runs.items()}


def mix_case(path: Path, pool: str, epochs: int, repeats: int, target: float | None) -> dict[str, Any]:
    sides = compare(path, pool, {"one_layer": ["last"], "mix": ["mix"]}, epochs, repeats)
    ratio = sides["mix"]["epoch_median"]["min"] / sides["one_layer"]["epoch_median"]["min"]
    return {"case": f"mix epoch, {pool}", "pool": pool, "cache": path.name, **sides, "ratio": ratio,
            "statistic": "median epoch of a fit, fastest of the repeats", "target": target,
            "met": None if target is None else ratio <= target}


def sweep_case(path: Path, pool: str, epochs: int, repeats: int, target: float | None) -> dict[str, Any]:
    with CacheReader(path) as reader:
        ids = reader.token_layers if pool == "learned" else reader.layers
    sides = compare(path, pool, {"one_head": ["last"], "sweep": [str(i) for i in ids] + ["mix"]}, epochs, repeats)
    ratio = sides["sweep"]["seconds"]["min"] / sides["one_head"]["seconds"]["min"]
    return {"case": f"layer sweep, {pool}", "pool": pool, "cache": path.name, **sides, "ratio": ratio,
            "epochs_ratio": sides["sweep"]["epoch_median"]["min"] / sides["one_head"]["epoch_median"]["min"],
            "separate_runs_ratio": float(len(ids) + 1), "statistic": "whole fit, fastest of the repeats",
            "target": target, "met": None if target is None else ratio <= target}


# ---------------------------------------------------------------------------- main


def verdict(result: dict[str, Any]) -> str:
    return "" if result["target"] is None else f" (target <= {result['target']:g}x: " \
                                               f"{'met' if result['met'] else 'MISSED'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=300, help="demo size")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--bert-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every timed fit")
    parser.add_argument("--extract-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="of each training side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = {"start": os.getloadavg()}

    demo, checkpoint = demo_data(args.patients)
    texts, bert = bert_data(args.texts, args.bert_layers, args.hidden)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        sizes = [size_case("demo", "demo", checkpoint, {"data": str(demo)}, scratch, args.extract_repeats),
                 size_case("hf", "hf", bert, {"data": str(texts)}, scratch, args.extract_repeats)]
        for case in sizes:
            v = case["variants"]
            print(f"{case['case']:>5} ({case['items']} items, {case['tokens_per_item']:.1f} tokens each, layers "
                  f"{v['all']['layers']}): last {v['last']['bytes'] / 1e6:.2f} MB in {v['last']['seconds']['min']:.1f} s"
                  f"; all {v['all']['bytes'] / 1e6:.2f} MB ({v['all']['size_ratio']:.2f}x) in "
                  f"{v['all']['seconds']['min']:.1f} s ({v['all']['seconds_ratio']:.2f}x); all + tokens "
                  f"{v['all_tokens']['bytes'] / 1e6:.2f} MB ({v['all_tokens']['size_ratio']:.2f}x) in "
                  f"{v['all_tokens']['seconds']['min']:.1f} s ({v['all_tokens']['seconds_ratio']:.2f}x)"
                  f"{verdict({'target': SIZE_TARGET, 'met': case['met']})}; the arrays' rows alone: all "
                  f"{case['rows_ratio']:.2f}x")
        load["after_extraction"] = os.getloadavg()

        pooled_cache, token_cache = scratch / "demo_all.h5", scratch / "demo_all_tokens.h5"
        training = [mix_case(pooled_cache, "meanq", args.epochs, args.repeats, MIX_EPOCH_TARGET),
                    mix_case(token_cache, "learned", args.epochs, args.repeats, None),
                    sweep_case(pooled_cache, "meanq", args.epochs, args.repeats, SWEEP_TARGET),
                    sweep_case(token_cache, "learned", args.epochs, args.repeats, None)]
        for case in training:
            one, many = ("one_layer", "mix") if "mix" in case else ("one_head", "sweep")
            what = "an epoch" if many == "mix" else "a whole fit"
            key = "epoch_median" if many == "mix" else "seconds"
            print(f"{case['case']:>22}: {what}, {many} ({case[many]['heads']} head(s)) {case[many][key]['min']:.3f} s "
                  f"vs {one} {case[one][key]['min']:.3f} s -> {case['ratio']:.2f}x{verdict(case)}")
    load["end"] = os.getloadavg()

    write_result("bench_layers", {
        "patients": args.patients, "texts": args.texts, "bert": f"{args.bert_layers} layers x {args.hidden}",
        "epochs": args.epochs, "extract_repeats": args.extract_repeats, "repeats": args.repeats,
        "threads": args.threads, "load_average_during": load, "sizes": sizes, "training": training})


if __name__ == "__main__":
    main()
