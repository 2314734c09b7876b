"""How much a bank of K heads costs against one head: the sweep's reason to exist.

Times `train.fit` alone (the cache already loaded, the same epochs, no early
stopping) for one head, as `headcache train` runs it, and for a bank:
- pooled: K = 32 mlp heads on the stored meanq vectors (lr x weight decay x 2 seeds);
- learned: K = 8 mlp heads with learned-query pools on the tokens (lr x weight decay, one seed,
  so the heads share their batches);
- learned-own-orders: the same K = 8 where every head has its own batch order
  (informational: each head then gathers and pools its own tokens, so the data work is K times one head's).
Each case alternates one head and the bank `--repeats` times and keeps the fastest of each, which
is robust to other load on the machine; the load average is recorded too.

Targets on 2 CPU cores (issue 5): pooled K = 32 <= 6x one head, learned K = 8 <= 3x.

    python benchmarks/bench_sweep.py [--cache cache/demo/cache.h5] [--patients 1000] [--epochs 50]

The demo cache is made first when missing (the pieces of `headcache demo`: synthetic data in the
seed's layout, its checkpoint, extraction). Results: benchmarks/results/bench_sweep_<device>.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import sklearn
import torch
from _common import summary, write_result

from headcache.backbones.demo import write_demo
from headcache.config import TrainConfig
from headcache.extract import ExtractConfig, extract
from headcache.features import CachedFeatures
from headcache.train import fit, num_classes_of, resolve_splits, tasks_for_splits

REPO = Path(__file__).resolve().parents[1]
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
CASES = {  # name: (pool, weight decays, seeds, heads, target ratio on 2 CPU cores)
    "pooled": ("meanq", (0.0, 1e-3, 1e-2, 1e-1), (0, 1), 32, 6.0),
    "learned": ("learned", (0.0, 1e-2), (0,), 8, 3.0),
    "learned-own-orders": ("learned", (0.0,), tuple(range(8)), 8, None),
    "pooled-256": ("meanq", (0.0, 1e-3, 1e-2, 1e-1), tuple(range(16)), 256, None),  # GPU target: <= 2x
}


def ensure_cache(cache: Path, patients: int, device: str) -> None:
    """Make the demo's data, checkpoint and cache next to ``cache`` (as `headcache demo` lays them out)."""
    if cache.exists():
        return
    print(f"no cache at {cache}: writing the demo ({patients} patients) and extracting it once")
    files = write_demo(cache.parent, patients=patients)
    extract("seqsetvae", files.checkpoint, cache, ExtractConfig(device=device),
            spec_options={"data": str(files.data_dir)})


def timed_fit(source, configs: list[TrainConfig], splits, num_classes: int) -> dict:
    """Seconds of one `fit`, and how they split into the epochs and the final evaluation (CIs included)."""
    marks: list[float] = []
    started = time.perf_counter()
    fit(source, tasks_for_splits(configs, source, splits), num_classes=num_classes, hidden_dim=source.hidden_dim,
        on_epoch=lambda epoch, rows: marks.append(time.perf_counter()))
    ended = time.perf_counter()
    return {"seconds": ended - started, "epochs_seconds": marks[-1] - started,
            "final_evaluation_seconds": ended - marks[-1]}


def run_case(cache: Path, name: str, epochs: int, repeats: int, device: str) -> dict:
    pool, weight_decays, seeds, heads, target = CASES[name]
    base = TrainConfig(pool=pool, epochs=epochs, patience=epochs, device=device)
    one = [base]
    bank = [TrainConfig(**{**base.to_dict(), "lr": lr, "weight_decay": wd, "seed": seed})
            for seed in seeds for lr in LRS for wd in weight_decays][:heads]
    source = CachedFeatures(cache, pool=pool, device=torch.device(device))
    splits = resolve_splits(base, source.splits)
    num_classes = num_classes_of(source, splits)  # loads every split: the timings see a loaded cache
    timed_fit(source, one, splits, num_classes)  # warm-up: allocator, thread pool, first-call costs
    singles, banks = [], []
    for _ in range(repeats):  # alternate, so that outside load hits both alike
        singles.append(timed_fit(source, one, splits, num_classes))
        banks.append(timed_fit(source, bank, splits, num_classes))
    single = min(singles, key=lambda r: r["seconds"])
    many = min(banks, key=lambda r: r["seconds"])
    ratio = many["seconds"] / single["seconds"]
    return {"case": name, "pool": pool, "heads": len(bank), "seeds": list(seeds), "lrs": list(LRS),
            "weight_decays": list(weight_decays), "one_head": single, "bank": many, "ratio": ratio,
            "epochs_ratio": many["epochs_seconds"] / single["epochs_seconds"],
            "separate_runs_ratio": float(len(bank)), "target_ratio": target,
            "met": None if target is None else ratio <= target,
            "seconds": {"one_head": summary([r["seconds"] for r in singles]),
                        "bank": summary([r["seconds"] for r in banks])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=REPO / "cache" / "demo" / "cache.h5")
    parser.add_argument("--patients", type=int, default=1000, help="demo size, when the cache is made")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--name", default=None, help="results file name (default: bench_sweep_<device>)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ensure_cache(args.cache, args.patients, args.device)
    results = []
    for name in args.cases.split(","):
        result = run_case(args.cache, name, args.epochs, args.repeats, args.device)
        results.append(result)
        verdict = "" if result["met"] is None else f" (target <= {result['target_ratio']:g}x: " \
                                                    f"{'met' if result['met'] else 'MISSED'})"
        print(f"{name:>24}: K={result['heads']:2d} in {result['bank']['seconds']:6.2f}s vs one head "
              f"{result['one_head']['seconds']:5.2f}s -> {result['ratio']:4.2f}x{verdict}; epochs alone "
              f"{result['epochs_ratio']:.2f}x; {result['heads']} separate runs: {result['heads']}x")

    write_result(args.name or f"bench_sweep_{args.device.split(':')[0]}", {
        "epochs": args.epochs, "repeats": args.repeats, "statistic": "fastest of the repeats",
        "cache": str(args.cache), "scikit-learn": sklearn.__version__, "cases": results})


if __name__ == "__main__":
    main()
