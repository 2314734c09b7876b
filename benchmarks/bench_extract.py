"""Extraction throughput against a bare forward pass over the same batches, with nothing written.

Both sides read the demo data through the same DataLoader (length-bucketed
batches, the same workers) and run the same backbone under inference_mode;
the bare side stops there, extraction also rounds, pools, splits rows and
writes HDF5 (in its writer thread), and pays its fixed costs (checkpoint
verification, the padding probe, the split's data fingerprint). Target:
extraction >= 0.9x the bare forward's sequences per second.

    python benchmarks/bench_extract.py [--patients 1000 --batch-size 64 --num-workers 0 --repeats 2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import summary, timed, write_result
from torch.utils.data import DataLoader

from headcache.backbones.demo import write_demo
from headcache.devices import resolve_device
from headcache.extract import ExtractConfig, _Collate, _Indexed, _Runner, bucketed_batches, extract
from headcache.spec import load_backbone, resolve_spec

TARGET = 0.9
WORK = Path(__file__).resolve().parents[1] / "cache" / "benchmarks"


def demo_data(patients: int) -> tuple[Path, Path]:
    """The demo's data and checkpoint at the default (seed) size, written once per patient count."""
    folder = WORK / f"demo_{patients}"
    if not (folder / "data" / "patient_ehr").is_dir():
        write_demo(folder, patients=patients, seed=0)
    return folder / "data", folder / "backbone.ckpt"


def bare_forward(spec, checkpoint: Path, config: ExtractConfig, split: str) -> int:
    """The extraction's DataLoader and forward pass, nothing else; returns the sequences seen."""
    device = resolve_device(config.device)
    backbone, _ = load_backbone(spec, checkpoint)
    runner = _Runner(spec, backbone.to(device), device, config)
    dataset = spec.dataset(split)
    batches = bucketed_batches(range(len(dataset)), dataset.lengths(), config.batch_size)
    loader = DataLoader(_Indexed(dataset, split), batch_sampler=batches, collate_fn=_Collate(spec, split),
                        num_workers=config.num_workers, pin_memory=device.type == "cuda")
    seen = 0
    for indices, batch, _, _ in loader:
        hidden, _ = runner.encode(batch, len(indices))
        seen += len(indices)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default=None, help="bf16 or fp16 (CUDA only)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="bench_extract", help="results file name")
    args = parser.parse_args()
    data, checkpoint = demo_data(args.patients)
    options = {"data": str(data)}
    spec = resolve_spec("seqsetvae", options)
    config = ExtractConfig(splits=(args.split,), batch_size=args.batch_size, num_workers=args.num_workers,
                           device=args.device, amp=args.amp, overwrite=True)
    sequences = len(spec.dataset(args.split))
    extract_seconds, bare_seconds = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
            bare_seconds.append(timed(lambda: bare_forward(spec, checkpoint, config, args.split)))
            extract_seconds.append(timed(lambda: extract("seqsetvae", checkpoint, Path(scratch) / "cache.h5", config,
                                                         spec_options=options)))
    extract_rate, bare_rate = sequences / min(extract_seconds), sequences / min(bare_seconds)
    ratio = extract_rate / bare_rate
    print(f"extraction {extract_rate:.2f} seq/s, bare forward {bare_rate:.2f} seq/s over the same "
          f"{sequences} sequences: ratio {ratio:.3f} (target >= {TARGET})")
    write_result(args.name, {
        "what": "sequences per second (best of the repeats): headcache extract() end to end vs the same "
                "DataLoader + forward pass with nothing kept",
        "backbone": "demo (seqsetvae at the seed's size: D 256, 4 transformer layers)", "split": args.split,
        "sequences": sequences, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "device": str(resolve_device(args.device)), "amp": args.amp,
        "extract_seconds": summary(extract_seconds), "bare_forward_seconds": summary(bare_seconds),
        "extract_sequences_per_second": extract_rate, "bare_sequences_per_second": bare_rate,
        "ratio": ratio, "target": f">= {TARGET}", "met": ratio >= TARGET})


if __name__ == "__main__":
    main()
