"""Streaming a token cache larger than the memory budget against holding it in memory.

A synthetic float16 token cache (D 256) at least 4x ``--budget`` is trained
with the learned pool twice, each in its own process so that peak RSS is its
own: once with a budget that holds every split (in memory), once with
``--budget`` (the splits stream from the file: NOTE [ Streaming tokens ] in
headcache/stream.py). Peak RSS includes the interpreter and its libraries
(torch, h5py, scikit-learn), measured after import too. Targets: streaming peak
RSS <= budget + 300 MB; a streamed epoch <= 2x an in-memory epoch.

    python benchmarks/bench_stream.py [--budget 256M --train 30000 --val 5000 --epochs 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import summary, synthetic_cache, write_result

RSS_SLACK_MB = 300
TARGET_SLOWDOWN = 2.0


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def child(cache: Path, budget: int, epochs: int, threads: int | None) -> None:
    """One training run; prints its epoch seconds and memory as JSON."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from headcache.config import TrainConfig
    from headcache.features import CachedFeatures
    from headcache.train import fit, tasks_for_splits

    after_import = peak_rss_mb()
    source = CachedFeatures(cache, pool="learned", device=torch.device("cpu"), memory_budget=budget)
    config = TrainConfig(pool="learned", epochs=epochs, patience=epochs + 1, device="cpu")
    epochs_peak = []  # peak RSS when the last epoch ends, before the final evaluation (bootstrap CIs)
    [result] = fit(source, tasks_for_splits([config], source, ("train", "valid", None)), num_classes=2,
                   hidden_dim=source.hidden_dim, on_epoch=lambda epoch, rows: epochs_peak.append(peak_rss_mb()))
    print(json.dumps({"epoch_seconds": [row["seconds"] for row in result.history],
                      "streamed": {split: source.streamed(split) for split in ("train", "valid")},
                      "rss_after_import_mb": after_import, "peak_rss_epochs_mb": epochs_peak[-1],
                      "peak_rss_mb": peak_rss_mb()}))


def run_child(cache: Path, budget: int, epochs: int, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child", str(cache), "--child-budget", str(budget), "--epochs", str(epochs)]
    command += ["--threads", str(threads)] if threads else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict]) -> dict:
    """The runs of one side: every epoch's seconds, the highest peak RSS."""
    return {"epoch_seconds": [s for run in runs for s in run["epoch_seconds"]], "streamed": runs[0]["streamed"],
            **{key: max(run[key] for run in runs) for key in ("rss_after_import_mb", "peak_rss_epochs_mb",
                                                               "peak_rss_mb")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="256M")
    parser.add_argument("--train", type=int, default=30000)
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate in-memory and streamed runs this often")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.child_budget, args.epochs, args.threads)
        return
    from headcache.config import parse_bytes
    from headcache.store import CacheReader

    budget = parse_bytes(args.budget)
    with tempfile.TemporaryDirectory() as scratch:
        cache = synthetic_cache(Path(scratch) / "tokens.h5", {"train": args.train, "valid": args.val},
                                tokens=(20, 100))
        with CacheReader(cache) as reader:
            token_bytes = sum(reader.split(s).num_tokens for s in ("train", "valid")) * reader.hidden_dim * 2
        print(f"token cache {token_bytes / 2**20:.0f} MB, budget {budget / 2**20:.0f} MB "
              f"({token_bytes / budget:.1f}x)")
        runs = {"in_memory": [], "streamed": []}
        for _ in range(args.rounds):  # alternated, so both sides see the same machine load
            runs["in_memory"].append(run_child(cache, 4 * token_bytes, args.epochs, args.threads))
            runs["streamed"].append(run_child(cache, budget, args.epochs, args.threads))
    memory, streamed = (_merge(runs[side]) for side in ("in_memory", "streamed"))
    if any(memory["streamed"].values()) or not streamed["streamed"]["train"]:
        raise SystemExit(f"the runs did not keep / stream the splits as planned: {memory} {streamed}")
    in_memory_epoch, streamed_epoch = min(memory["epoch_seconds"]), min(streamed["epoch_seconds"])
    slowdown = streamed_epoch / in_memory_epoch
    rss_limit = budget / 2**20 + RSS_SLACK_MB
    print(f"epoch: in memory {in_memory_epoch:.2f}s, streamed {streamed_epoch:.2f}s: {slowdown:.2f}x "
          f"(target <= {TARGET_SLOWDOWN}x)")
    growth = streamed["peak_rss_epochs_mb"] - streamed["rss_after_import_mb"]
    print(f"peak RSS over the epochs: in memory {memory['peak_rss_epochs_mb']:.0f} MB, streamed "
          f"{streamed['peak_rss_epochs_mb']:.0f} MB (target <= budget + {RSS_SLACK_MB} = {rss_limit:.0f} MB), of "
          f"which {streamed['rss_after_import_mb']:.0f} MB right after the imports and {growth:.0f} MB for the data "
          f"(budget {budget / 2**20:.0f} MB); with the final evaluation: in memory {memory['peak_rss_mb']:.0f} MB, "
          f"streamed {streamed['peak_rss_mb']:.0f} MB")
    write_result("bench_stream", {
        "what": "learned pool, seconds per epoch (train + validation; best epoch of the runs) and peak RSS "
                "of the process, token cache in memory vs streamed from HDF5 under a memory budget",
        "threads": args.threads or "torch default", "rounds": args.rounds,
        "token_cache_mb": token_bytes / 2**20, "budget_mb": budget / 2**20, "cache_over_budget": token_bytes / budget,
        "sequences": {"train": args.train, "val": args.val}, "tokens_per_sequence": [20, 100], "dim": 256,
        "dtype": "float16", "epochs": args.epochs,
        "in_memory": {**memory, "epoch": summary(memory["epoch_seconds"])},
        "streamed": {**streamed, "epoch": summary(streamed["epoch_seconds"])},
        "streamed_growth_over_imports_mb": growth, "met_growth_within_budget": growth <= budget / 2**20,
        "epoch_slowdown": slowdown, "target_slowdown": f"<= {TARGET_SLOWDOWN}",
        "met_slowdown": slowdown <= TARGET_SLOWDOWN,
        "target_peak_rss_mb": f"<= {rss_limit:.0f}",
        "met_peak_rss_epochs": streamed["peak_rss_epochs_mb"] <= rss_limit,
        "met_peak_rss_with_final_evaluation": streamed["peak_rss_mb"] <= rss_limit,
        "note": "peak_rss_epochs_mb: when the last epoch ends (streaming and training); peak_rss_mb also "
                "covers the final evaluation (best weights on val, full metrics and bootstrap CIs: "
                "NOTE [ Final-evaluation memory ] in headcache/metrics.py)"})


if __name__ == "__main__":
    main()
