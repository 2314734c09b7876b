"""Stage 1: run the frozen backbone once and write every sequence's hidden states to HDF5.

The backbone runs in eval mode under `torch.inference_mode()`, on the GPU when
there is one. Time goes to the backbone alone:
- items are taken in length buckets (sorted within windows), so batches carry
  little padding; rows still reach the file in the dataset's order;
- a DataLoader (optionally with workers) prepares batches, pinned in memory on
  CUDA so host-to-device copies overlap compute;
- a writer thread does the HDF5 writes in large row blocks while the next
  batch runs through the backbone (h5py serialises HDF5 calls under one lock,
  so only that thread touches the file during the loop).

An interrupted extraction resumes from the split's `rows_written` when the
same command runs again: every block is flushed before `rows_written` moves.
"""
from __future__ import annotations

import json
import math
import queue
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from headcache.checkpoint import LoadReport
from headcache.config import AMP_DTYPES, ExtractConfig  # ExtractConfig re-exported: it lived here
from headcache.devices import resolve_device, to_device
from headcache.distributed import (
    MergeResult,
    ShardSpec,
    agree,
    merge_parts,
    part_path,
    rank_device,
    spec_text,
    torchrun_world,
)
from headcache.errors import (
    ConfigError,
    DataError,
    DiskFullError,
    HeadcacheError,
    NonFiniteError,
    OutputExistsError,
    SpecError,
)
from headcache.pooling import PARAMETER_FREE_POOLS, cache_inputs
from headcache.rundir import refuse_inputs
from headcache.spec import encode_checked, load_backbone, resolve_spec, spec_layers, spec_member, spec_splits
from headcache.store import CHUNK_BYTES, CacheWriter, SplitWriter, check_float16_range, is_complete

BUCKET_WINDOW = 32  # batches per length-sorting window: bounds the reorder buffer
PADDING_PROBE = 4  # items encoded alone and together to check padding invariance
# Alone and batched states may differ by PADDING_TOLERANCE * max(1, largest |state| of the item): an absolute
# 1e-4 for states of order one or less, relative above, since float rounding grows with the magnitude (a
# batch-shape dependent kernel moves a state of 1e6 by whole ulps, about 0.1).
PADDING_TOLERANCE = 1e-4
RESUME_SAMPLE = 256  # committed rows compared with the data before a resume (`_check_same_data`)


class PaddingInvarianceWarning(UserWarning):
    """spec.encode gave a sequence different states alone and in a batch (NOTE [ Padding invariance ])."""


@dataclass
class ExtractResult:
    """What `extract` returns."""

    path: Path
    split_sizes: dict[str, int]
    written: int  # sequences written by this call (less than the total when resuming)
    resumed: bool
    load_report: LoadReport
    seconds: float

    @property
    def sequences_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def bucketed_batches(indices: Sequence[int], lengths: Sequence[int] | None, batch_size: int) -> list[list[int]]:
    """Batches of similar-length items: windows of BUCKET_WINDOW batches, each sorted by length.

    Without lengths, batches follow the dataset's order.
    """
    indices = list(indices)
    if lengths is None:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    window = batch_size * BUCKET_WINDOW
    batches = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return batches


def _item(dataset: Any, i: int, split: str) -> tuple:
    """Item i of a spec's dataset, checked to be ``(inputs, label, id)``."""
    with spec_member("dataset", f"item {i} of split {split!r}"):
        item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        raise SpecError(f"spec.dataset({split!r})[{i}] returned {type(item).__name__}"
                        f"{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}; expected a 3-tuple "
                        "(inputs, label, id)")
    return item


def _collate(spec: Any, inputs: list, split: str) -> Any:
    with spec_member("collate", f"{len(inputs)} item(s) of split {split!r}"):
        return spec.collate(inputs)


class _Failure:
    """A HeadcacheError raised while loading a batch, carried to the main process as data.

    A DataLoader worker's exception is re-raised with the worker's traceback
    pasted into its message, so the one-line error would carry a traceback.
    """

    def __init__(self, error: HeadcacheError):
        self.error = error


class _Indexed(Dataset):
    """Items as (index, item), so batches remember where they go."""

    def __init__(self, dataset: Any, split: str):
        self.dataset, self.split = dataset, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return i, _item(self.dataset, i, self.split)
        except HeadcacheError as exc:
            return i, _Failure(exc)


class _Collate:
    def __init__(self, spec: Any, split: str):
        self.spec, self.split = spec, split

    def __call__(self, items):
        failed = [item for _, item in items if isinstance(item, _Failure)]
        if failed:
            return failed[0]
        indices = [i for i, _ in items]
        inputs = [item[0] for _, item in items]
        try:
            batch = _collate(self.spec, inputs, self.split)
        except HeadcacheError as exc:
            return _Failure(exc)
        return indices, batch, [item[1] for _, item in items], [str(item[2]) for _, item in items]


class _WriterThread:
    """Runs SplitWriter.write in a background thread, so writing overlaps the next forward pass."""

    def __init__(self, split_writer: SplitWriter):
        self.split_writer = split_writer
        self.blocks: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (block := self.blocks.get()) is not None:
            if self.error is None:
                try:
                    self.split_writer.write(*block)
                except BaseException as exc:  # handed to the main thread in put/close
                    self.error = exc

    def put(self, block: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.blocks.put(block)

    def close(self) -> None:
        self.blocks.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def extract(spec: str | Any, checkpoint: str | Path, out: str | Path, config: ExtractConfig = ExtractConfig(), *,
            spec_options: dict[str, str] | None = None,
            on_progress: Callable[[str, int, int], None] | None = None,
            on_load: Callable[[LoadReport], None] | None = None) -> ExtractResult:
    """Run the backbone over the spec's splits once and write the cache.

    Parameters
    ----------
    spec : str or spec object
        ``--spec`` text (resolved with ``spec_options``) or a spec object.
    checkpoint : path
        The backbone's weights (verified; see checkpoint.py).
    out : path
        The cache file. An unfinished one written by the same backbone and
        spec resumes; a finished one is refused unless ``config.overwrite``.
    on_progress : callable, optional
        Called as (split, rows done, rows in split) after every block.
    on_load : callable, optional
        Called with the load report once the checkpoint is loaded.

    Example
    -------
    >>> extract("demo", "demo_out/backbone.ckpt", "cache/demo.h5")  # doctest: +SKIP
    """
    started = time.perf_counter()
    refuse_inputs(out, [("--checkpoint", checkpoint)])  # before --overwrite could replace the weights with a cache
    spec_text = spec if isinstance(spec, str) else getattr(spec, "name", type(spec).__name__)
    if isinstance(spec, str):
        spec = resolve_spec(spec, spec_options)
    device = resolve_device(config.device)
    if config.amp and device.type != "cuda":
        raise ConfigError(f"--amp {config.amp} needs a CUDA device; this run is on {device}")
    splits = _splits_to_extract(spec, config.splits)
    backbone, report = load_backbone(spec, checkpoint, key_map=config.key_map, trust=config.trust_checkpoint)
    backbone.to(device)
    if on_load is not None:
        on_load(report)
    runner = _Runner(spec, backbone, device, config)
    datasets = _datasets(spec, splits)
    hidden_dim = runner.probe(datasets[splits[0]], splits[0])
    attrs = {
        "layers": runner.layers,
        "token_layers": [runner.layers[p] for p in runner.token_positions],
        "shard": getattr(spec, "shard", None),  # a ShardSpec's part file
        "backbone_fingerprint": report.fingerprint,
        # Provenance only: a resume compares the data itself (`_check_same_data`), not this text.
        "spec": spec_text + (" " + json.dumps(spec_options, sort_keys=True) if spec_options else ""),
        "checkpoint_sha256": report.checkpoint_sha256,  # every report carries it (load_checkpoint, load_from_spec)
        "hidden_dim": hidden_dim,
        "dtype": config.dtype,
        "amp": config.amp,
        "num_classes": runner.num_classes,
        "class_names": getattr(spec, "class_names", None),
        "load_report": report.to_dict(),
    }
    sizes, written = {}, 0
    with CacheWriter(out, attrs, overwrite=config.overwrite, splits=list(datasets)) as writer:
        resumed = writer.resuming
        # Every split exists before any is written, so an interrupted file always shows unfinished work.
        split_writers = {split: writer.split(split, len(dataset), list(PARAMETER_FREE_POOLS))
                         for split, dataset in datasets.items()}
        for split, split_writer in split_writers.items():
            _check_same_data(out, datasets[split], split, split_writer, runner)
        for split, split_writer in split_writers.items():
            sizes[split] = len(datasets[split])
            if not split_writer.complete:
                try:
                    written += runner.run_split(datasets[split], split, split_writer, on_progress)
                except DiskFullError as exc:
                    whole = runner.cache_bytes({s: len(d) for s, d in datasets.items()}, hidden_dim)
                    raise DiskFullError(f"{exc} (the whole cache needs about {_size(whole)}, as extract --plan "
                                        "estimates it)") from exc
                split_writer.finish()
    return ExtractResult(Path(out), sizes, written, resumed, report, time.perf_counter() - started)


def _datasets(spec: Any, splits: Sequence[str]) -> dict[str, Any]:
    datasets = {}
    for split in splits:
        with spec_member("dataset", f"split {split!r}"):
            datasets[split] = spec.dataset(split)
    return datasets


def _check_same_data(path: str | Path, dataset: Any, split: str, split_writer: SplitWriter, runner: "_Runner") -> None:
    """Refuse to resume a split whose committed rows came from other data (a changed data set of the same size).

    The data is identified by content, not by how its path was spelled: the ids and labels of a
    sample of the committed rows (RESUME_SAMPLE of them, evenly spread, the last one included) must
    be those of the same items of the dataset now. Loading every committed item would cost a pass
    over the data; a changed data set almost always changes the sampled ids.
    """
    rows = split_writer.rows_written
    if rows == 0:
        return
    sample = np.unique(np.linspace(0, rows - 1, num=min(rows, RESUME_SAMPLE)).round().astype(np.int64))
    have_ids, have_labels = split_writer.committed(sample)
    for row, have_id, have_label in zip(sample.tolist(), have_ids, have_labels.tolist()):
        _, label, item_id = dataset[row]
        item_id = str(item_id)
        label = runner.check_label(label, item_id, split)
        if (item_id, label) != (have_id, have_label):
            raise OutputExistsError(
                f"{path}: split {split!r} was extracted from other data: its row {row} is id {have_id!r} with "
                f"label {have_label} in the cache, but id {item_id!r} with label {label} in the data now. Extract "
                f"the changed data into another --out, or pass --overwrite to replace the cache (its {rows} "
                f"committed rows of {split!r} are then extracted again)")


def _splits_to_extract(spec: Any, wanted: Sequence[str] | None) -> list[str]:
    available = spec_splits(spec)
    wanted = list(wanted or available)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ConfigError(f"--splits: the spec has no split {unknown[0]!r}; it has {', '.join(available)}")
    return wanted


class _Runner:
    """Encodes batches and turns them into rows for the cache."""

    def __init__(self, spec: Any, backbone: torch.nn.Module, device: torch.device, config: ExtractConfig):
        self.spec, self.backbone, self.device, self.config = spec, backbone, device, config
        self.num_classes = getattr(spec, "num_classes", None)
        self.layers = spec_layers(spec)
        self.token_positions = token_layer_positions(config.token_layers, self.layers)
        self.items_seen = self.tokens_seen = 0  # for the size estimate of a disk-full message

    def cache_bytes(self, split_sizes: dict[str, int], hidden_dim: int) -> int:
        """The whole cache's size on disk, estimated from the items encoded so far (as extract --plan does)."""
        per_item = self.tokens_seen / max(1, self.items_seen)
        return sum(_split_bytes(n, per_item, hidden_dim, self.config.dtype, len(self.layers),
                                len(self.token_positions)) for n in split_sizes.values())

    def encode(self, batch: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The spec's states of every layer, (B, L, T, D) float32 (L = 1 for a spec without layers), and the
        bool mask (B, T)."""
        batch = to_device(batch, self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.config.amp),
                                                    enabled=self.config.amp is not None):
            hidden, mask = encode_checked(self.spec, self.backbone, batch, batch_size=batch_size)
        return (hidden if hidden.dim() == 4 else hidden.unsqueeze(1)).float(), mask.bool()

    def probe(self, dataset: Any, split: str) -> int:
        """Encode the first few items alone and together: the hidden size, and a padding check."""
        n = min(PADDING_PROBE, len(dataset))
        if n == 0:
            raise DataError(f"split {split!r} of the spec is empty; nothing to extract")
        items = [_item(dataset, i, split) for i in range(n)]
        together, mask = self.encode(_collate(self.spec, [item[0] for item in items], split), n)
        worst = 0.0  # the largest difference, in units of the tolerance's scale (see PADDING_TOLERANCE)
        for b, item in enumerate(items[1:], start=1):  # item 0 alone is the same batch shape question
            alone, alone_mask = self.encode(_collate(self.spec, [item[0]], split), 1)
            real, batched = alone[0][:, alone_mask[0]], together[b][:, mask[b]]
            if real.shape != batched.shape:
                worst = float("inf")
            elif real.numel():
                scale = max(1.0, float(batched.abs().max()))
                worst = max(worst, float((real - batched).abs().max()) / scale)
        if worst > PADDING_TOLERANCE:
            warnings.warn(f"spec.encode is not padding-invariant: an item's hidden states change by {worst:.3g} "
                          "(relative to their magnitude, or absolute below 1) when other items share its batch; "
                          "cached and live features will differ (see NOTE [ Padding invariance ] in "
                          "headcache/spec.py)", PaddingInvarianceWarning, stacklevel=3)
        return int(together.shape[-1])

    def run_split(self, dataset: Any, split: str, split_writer: SplitWriter,
                  on_progress: Callable[[str, int, int], None] | None) -> int:
        start, n = split_writer.rows_written, len(dataset)
        lengths = dataset.lengths() if callable(getattr(dataset, "lengths", None)) else None
        batches = bucketed_batches(range(start, n), lengths, self.config.batch_size)
        loader = DataLoader(_Indexed(dataset, split), batch_sampler=batches, collate_fn=_Collate(self.spec, split),
                            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")
        writer = _WriterThread(split_writer)
        pending: dict[int, tuple] = {}  # finished rows waiting for the rows before them
        next_row = start
        def hand_over(everything_ready: bool) -> None:
            nonlocal next_row
            ready = _contiguous(pending, next_row)
            while ready >= self.config.write_block or (ready and (everything_ready or next_row + ready == n)):
                count = min(ready, self.config.write_block)
                writer.put(_block([pending.pop(i) for i in range(next_row, next_row + count)]))
                next_row, ready = next_row + count, ready - count
                if on_progress is not None:
                    on_progress(split, next_row, n)

        if on_progress is not None:
            on_progress(split, start, n)  # the split starts (or resumes) here
        try:
            for loaded in loader:
                if isinstance(loaded, _Failure):
                    raise loaded.error
                indices, batch, labels, ids = loaded
                for index, row in zip(indices, self._rows(batch, labels, ids, split)):
                    pending[index] = row
                hand_over(everything_ready=False)
        except BaseException:
            hand_over(everything_ready=True)  # keep every finished row in order, so a rerun resumes after them
            raise
        finally:
            writer.close()
        return n - start

    def _rows(self, batch: Any, labels: list, ids: list[str], split: str) -> Iterator[tuple]:
        hidden, mask = self.encode(batch, len(ids))
        lengths = mask.sum(1)
        self.items_seen, self.tokens_seen = self.items_seen + len(ids), self.tokens_seen + int(lengths.sum())
        empty = (lengths == 0).nonzero().flatten()
        if len(empty):
            raise DataError(f"sequence {ids[int(empty[0])]!r} of split {split!r} has no positions (its mask is all "
                            "False); remove it from the data set or give it at least one event")
        broken = (~torch.isfinite(hidden) & mask[:, None, :, None]).flatten(1).any(1).nonzero().flatten()
        if len(broken):
            raise NonFiniteError(f"the backbone produced NaN or Inf for sequence {ids[int(broken[0])]!r} of split "
                                 f"{split!r}; check that sequence's inputs (the rows before it are kept, and a "
                                 "rerun resumes there)")
        if self.config.dtype == "float16":  # before rounding, where an overflow is still a number
            check_float16_range(hidden, mask, ids, split)
        # the same rounding and pools as the live source and the exported model: NOTE [ One seam ] in pooling.py;
        # every layer pooled as if alone, so its vectors are exactly what a one-layer cache of it would hold
        rounded, mask, pooled_states = cache_inputs(hidden, mask, dtype=self.config.dtype)
        pooled = {name: vectors.cpu().numpy() for name, vectors in pooled_states.items()}  # (B, L, D) each
        stored = rounded[:, self.token_positions].movedim(1, 2)  # the token layers' states, (B, T, Lt, D)
        stored = stored.to(getattr(torch, self.config.dtype)).cpu().numpy()  # exact: already rounded
        mask_np = mask.cpu().numpy()
        for b, (label, item_id) in enumerate(zip(labels, ids)):
            label = self.check_label(label, item_id, split)
            yield stored[b][mask_np[b]], label, item_id, {name: p[b] for name, p in pooled.items()}

    def check_label(self, label: Any, item_id: str, split: str) -> int:
        """A label as the cache stores it: a class index in [0, num_classes), or -1 for an unlabelled item (None).

        Refused, naming the item and split: a bool, a string, a float that is not a whole number, a
        negative number, or a class beyond the spec's num_classes (labels are never truncated or cast).
        """
        if label is None:
            return -1
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()
        elif isinstance(label, (np.ndarray, np.generic)) and np.size(label) == 1:
            label = label.item()
        where = f"sequence {item_id!r} of split {split!r}"
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise DataError(f"{where} has label {label!r} ({type(label).__name__}); a label must be an integer class "
                            "index (or None for an unlabelled item): fix the spec's dataset")
        if isinstance(label, float):
            if not label.is_integer():
                raise DataError(f"{where} has label {label!r}, not a whole number; a label must be an integer class "
                                "index (or None for an unlabelled item): fix the spec's dataset")
            label = int(label)
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            allowed = f"0..{self.num_classes - 1} (the spec's num_classes)" if self.num_classes else "0 or more"
            raise DataError(f"{where} has label {label}; labels must be {allowed}, or None for an unlabelled item")
        return label


def _contiguous(pending: dict[int, tuple], start: int) -> int:
    count = 0
    while start + count in pending:
        count += 1
    return count


def _block(rows: list[tuple]) -> tuple:
    tokens = [r[0] for r in rows]
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    ids = [r[2] for r in rows]
    pooled = {name: np.stack([r[3][name] for r in rows]) for name in rows[0][3]}
    return tokens, labels, ids, pooled


# ---------------------------------------------------------------------------- shards and torchrun (NOTE [ Shards ] in distributed.py)


def extract_shard(spec: str | Any, checkpoint: str | Path | None, out: str | Path, config: ExtractConfig,
                  shard: tuple[int, int], *, spec_options: dict[str, str] | None = None,
                  **hooks: Callable) -> ExtractResult | None:
    """Extract shard ``shard = (I, N)`` into `part_path` (out, I, N); resumes an interrupted part.

    Returns None when the part is already complete (nothing to do).
    """
    index, count = shard
    part = part_path(out, index, count)
    if part.exists() and not config.overwrite and is_complete(part):
        return None
    spec_object = resolve_spec(spec, spec_options) if isinstance(spec, str) else spec
    return extract(ShardSpec(spec_object, index, count, spec_text(spec, spec_options)), checkpoint, part, config,
                   **hooks)


def extract_distributed(spec: str | Any, checkpoint: str | Path | None, out: str | Path,
                        config: ExtractConfig = ExtractConfig(), *, spec_options: dict[str, str] | None = None,
                        keep_parts: bool = False, **hooks: Callable) -> MergeResult | None:
    """This rank's shard of a torchrun extraction, then (rank 0) the merge into ``out``.

    Every rank returns once the merged file is in place (rank 0 returns its MergeResult, the others None).
    A failure on any rank raises on every rank.
    """
    import torch.distributed as dist

    rank, world, local_rank = torchrun_world() or (0, 1, 0)
    out = Path(out)
    if out.exists() and not config.overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to extract again")
    config = replace(config, device=rank_device(config.device, local_rank))
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    try:
        agree(lambda: extract_shard(spec, checkpoint, out, config, (rank, world), spec_options=spec_options,
                                    **(hooks if rank == 0 else {})), rank, "extraction")
        return agree(lambda: merge_parts(out, keep_parts=keep_parts, overwrite=config.overwrite) if rank == 0
                     else None, rank, "merge")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- extract --plan


@dataclass
class ExtractPlan:
    """What `plan_extraction` estimates, from a sample, before any extraction work."""

    split_sizes: dict[str, int]
    sample: int  # items encoded for the estimate
    tokens_per_item: float
    hidden_dim: int
    dtype: str
    cache_bytes: int
    extract_seconds: float
    epoch_seconds_end_to_end: float  # the non-test splits through the backbone in training-size batches

    @property
    def break_even_epochs(self) -> int:
        """Epochs after which extraction has paid for itself, taking a cached epoch as free next to a
        backbone pass (`headcache bench` measures both)."""
        return max(1, math.ceil(self.extract_seconds / self.epoch_seconds_end_to_end))

    def summary(self) -> str:
        items = sum(self.split_sizes.values())
        sizes = ", ".join(f"{s} {n}" for s, n in self.split_sizes.items())
        return "\n".join([
            f"plan (estimated from {self.sample} sampled items; nothing written):",
            f"  splits: {sizes} ({items} items)",
            f"  tokens: {self.tokens_per_item:.1f} per item, hidden_dim {self.hidden_dim}, stored as {self.dtype}",
            f"  cache size on disk: ~{_size(self.cache_bytes)}",
            f"  extraction time: ~{_duration(self.extract_seconds)} ({items / self.extract_seconds:.1f} items/s)",
            f"  one end-to-end epoch (backbone in every step): ~{_duration(self.epoch_seconds_end_to_end)}",
            f"  break-even: {self.break_even_epochs} epoch{'s' if self.break_even_epochs > 1 else ''} "
            "(from then on the cache is ahead; a cached epoch costs little next to a backbone pass)",
        ])


def plan_extraction(spec: str | Any, checkpoint: str | Path, config: ExtractConfig = ExtractConfig(), *,
                    spec_options: dict[str, str] | None = None, sample: int = 64,
                    train_batch_size: int = 16, seed: int = 0) -> ExtractPlan:
    """Estimate the cache's size on disk, the extraction's time and the break-even epoch count.

    Encodes ``sample`` items of the first split, drawn at random, twice: in
    length-sorted batches of ``config.batch_size`` as extraction does, and in
    shuffled batches of ``train_batch_size`` as end-to-end training does (item
    loading and collation included both times). Sizes and times are scaled to
    every split; an end-to-end epoch reads every split but ``test``.

    Example
    -------
    >>> print(plan_extraction("demo", "demo_out/backbone.ckpt").summary())  # doctest: +SKIP
    """
    if isinstance(spec, str):
        spec = resolve_spec(spec, spec_options)
    device = resolve_device(config.device)
    splits = _splits_to_extract(spec, config.splits)
    backbone, _ = load_backbone(spec, checkpoint, key_map=config.key_map, trust=config.trust_checkpoint)
    runner = _Runner(spec, backbone.to(device), device, config)
    datasets = _datasets(spec, splits)
    first = datasets[splits[0]]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(first), size=min(sample, len(first)), replace=False).tolist()
    warm_up = chosen[:2]  # first calls pay one-off setup
    runner.encode(_collate(spec, [_item(first, i, splits[0])[0] for i in warm_up], splits[0]), len(warm_up))
    lengths = first.lengths() if callable(getattr(first, "lengths", None)) else None

    def timed(batches: list[list[int]]) -> tuple[float, list[torch.Tensor], int]:
        started, tokens, width = time.perf_counter(), [], 0
        for batch in batches:
            hidden, mask = runner.encode(_collate(spec, [_item(first, i, splits[0])[0] for i in batch], splits[0]),
                                         len(batch))
            tokens.append(mask.sum(1).cpu())
            width = int(hidden.shape[-1])
        return time.perf_counter() - started, tokens, width

    extract_seconds, tokens, hidden_dim = timed(bucketed_batches(sorted(chosen), lengths, config.batch_size))
    layers = (len(runner.layers), len(runner.token_positions))
    shuffled = rng.permutation(chosen).tolist()
    live_seconds, _, _ = timed([shuffled[i:i + train_batch_size] for i in range(0, len(shuffled), train_batch_size)])
    tokens_per_item = float(torch.cat(tokens).float().mean())
    sizes = {split: len(dataset) for split, dataset in datasets.items()}
    items = sum(sizes.values())
    trained = sum(n for split, n in sizes.items() if split != "test") or items
    cache_bytes = sum(_split_bytes(n, tokens_per_item, hidden_dim, config.dtype, *layers) for n in sizes.values())
    return ExtractPlan(sizes, len(chosen), tokens_per_item, hidden_dim, config.dtype, cache_bytes,
                       items * extract_seconds / len(chosen), trained * live_seconds / len(chosen))


def _split_bytes(n: int, tokens_per_item: float, hidden_dim: int, dtype: str, num_layers: int = 1,
                 num_token_layers: int = 1) -> int:
    """A split's bytes on disk: token rows of the token layers in whole chunks (store.CHUNK_BYTES each),
    every layer's float32 pools, and per item an offset, a label and an id (about 32 bytes with its offset)."""
    row_bytes = num_token_layers * hidden_dim * np.dtype(dtype).itemsize
    chunk_rows = max(1, CHUNK_BYTES // row_bytes)
    token_bytes = math.ceil(n * tokens_per_item / chunk_rows) * chunk_rows * row_bytes
    return int(token_bytes + n * (len(PARAMETER_FREE_POOLS) * num_layers * hidden_dim * 4 + 8 + 8 + 32))


def token_layer_positions(text: str, layers: Sequence[int]) -> list[int]:
    """Positions among ``layers`` of the layers whose tokens are stored (``--token-layers``: last, all or ids i,j)."""
    if text == "last":
        return [len(layers) - 1]
    if text == "all":
        return list(range(len(layers)))
    try:
        wanted = [int(part) for part in text.split(",")]
    except ValueError:
        wanted = None
    if not wanted or len(set(wanted)) != len(wanted) or any(i not in layers for i in wanted):
        raise ConfigError(f"--token-layers must be last, all, or distinct layer ids of the spec separated by commas "
                          f"(the spec's layers are {', '.join(map(str, layers))}); got {text!r}")
    return sorted(layers.index(i) for i in wanted)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
