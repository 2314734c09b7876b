"""Backbone + pool + head as one deployable model, and prediction with it.

`export` writes one file that holds the verified backbone weights, the
trained head (its best weights) and how to rebuild both; `predict` runs it on
a split of the spec's data. The exported model is timm's forward_features /
forward_head seam: `spec.encode` gives the hidden states, the pool and head
give the probabilities.

The hidden states go through the same seam as at extraction (rounded through
the cache's dtype, then pooled; NOTE [ One seam ] in pooling.py), so the
exported model reproduces the run's own predictions.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from headcache.checkpoint import fingerprint
from headcache.devices import resolve_device, to_device
from headcache.errors import CheckpointError, ConfigError, FingerprintMismatchError, OutputExistsError
from headcache.pooling import head_inputs
from headcache.rundir import (
    head_from_checkpoint,
    read_head,
    read_record,
    refuse_inputs,
    replaced_atomically,
    write_predictions,
)
from headcache.spec import (
    encode_checked,
    load_backbone,
    load_from_spec,
    resolve_spec,
    spec_layers,
    spec_member,
    spec_splits,
)
from headcache.store import SINGLE_LAYER

MODEL_FORMAT = "headcache-model"


class DeployedModel(nn.Module):
    """spec.encode -> round through the cache dtype -> pool -> head -> class probabilities."""

    def __init__(self, spec: Any, backbone: nn.Module, head_checkpoint: dict, dtype: str):
        super().__init__()
        self.spec, self.backbone, self.dtype = spec, backbone, dtype
        self.pool_name = head_checkpoint["config"]["pool"]
        self.head = head_from_checkpoint(head_checkpoint)
        self.positions = layer_positions(head_checkpoint, spec_layers(spec))

    @torch.no_grad()
    def forward(self, batch: Any) -> Tensor:
        hidden, mask = encode_checked(self.spec, self.backbone, batch, batch_size=None)
        # the features the head was trained on: NOTE [ One seam ] in pooling.py
        layers = None if hidden.dim() == 3 else self.positions
        features = head_inputs(hidden, mask, pool=self.pool_name, dtype=self.dtype, layers=layers)
        return torch.softmax(self.head(features)[0], dim=-1)


def layer_positions(head: dict, spec_ids: list[int]) -> int | list[int]:
    """Where the layers a head reads lie along its spec's layer axis: one position for a head of one layer,
    the mix's positions for a learned layer mix.

    A head trained on a cache of one unnamed layer (`SINGLE_LAYER`: a spec without layers, or any cache
    from before layers) reads the spec's output, its last layer.

    Raises
    ------
    ConfigError
        The spec does not give a layer the head reads (the spec options of the extraction are missing).
    """
    wanted = head.get("layers") or [SINGLE_LAYER]  # head files from before layers do not say
    missing = [layer for layer in wanted if layer not in spec_ids and layer != SINGLE_LAYER]
    if missing:
        raise ConfigError(f"the head reads layers {', '.join(map(str, wanted))}, but the spec gives layers "
                          f"{', '.join(map(str, spec_ids))}: pass the spec options the cache was extracted with "
                          "(e.g. --spec-opt layers=all)")
    positions = [spec_ids.index(layer) if layer in spec_ids else len(spec_ids) - 1 for layer in wanted]
    return positions if "mix.logits" in head["state"] else positions[0]


@dataclass
class ExportResult:
    path: Path
    backbone_fingerprint: str
    head_epoch: int


def export(spec: str, checkpoint: str | Path, run_dir: str | Path, out: str | Path, *,
           spec_options: dict[str, str] | None = None, key_map: dict[str, str] | None = None,
           trust: bool = False, overwrite: bool = False) -> ExportResult:
    """Write backbone + the run's best head as one model file (replaced only once complete).

    The cache dtype the deployed model rounds through comes from the run's
    record (config.json), which train, sweep and cv runs all write.

    Raises
    ------
    FingerprintMismatchError
        The run was trained on the cache of another backbone.
    CheckpointError
        The run directory has no config.json or head_best.pt, or either is damaged.
    OutputExistsError
        ``out`` exists and ``overwrite`` is False.
    """
    run_dir = Path(run_dir)
    out = _output_file(out, overwrite, protect=(("--checkpoint", checkpoint), ("--run", run_dir / "config.json"),
                                                ("--run", run_dir / "head_best.pt")))
    if not (run_dir / "config.json").is_file() and (run_dir / "runs").is_dir():
        raise CheckpointError(f"--run {run_dir} is a sweep or cv directory; pass one of its runs, e.g. "
                              f"{next(p for p in sorted((run_dir / 'runs').iterdir()))}")
    record = read_record(run_dir)
    head_path = run_dir / "head_best.pt"
    head = read_head(head_path)
    spec_object = resolve_spec(spec, spec_options)
    backbone, report = load_backbone(spec_object, checkpoint, key_map=key_map, trust=trust)
    layer_positions(head, spec_layers(spec_object))  # the spec gives the layers the head reads
    if report.fingerprint != head["backbone_fingerprint"]:
        raise FingerprintMismatchError(
            f"{head_path} was trained on a cache of backbone {head['backbone_fingerprint'][:12]}, but {checkpoint} "
            f"loads as {report.fingerprint[:12]}; export with the checkpoint that wrote the run's cache")
    # A load()-spec rebuilds its backbone from the checkpoint (a model folder also holds its tokenizer),
    # so its absolute path is kept; the stored state is what then fills the module.
    with replaced_atomically(out) as temp:
        torch.save({"format": MODEL_FORMAT, "version": 1, "spec": spec, "spec_options": dict(spec_options or {}),
                    "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
                    "backbone_state": backbone.state_dict(), "backbone_fingerprint": report.fingerprint,
                    "dtype": record.dtype, "head": head}, temp)
    return ExportResult(out, report.fingerprint, head["epoch"])


def _output_file(out: str | Path, overwrite: bool, *, protect: tuple[tuple[str, Any], ...]) -> Path:
    """``out`` checked before any work: its folder exists, it is not a folder, not one of ``protect``
    (the (flag, path) the command reads: `refuse_inputs`), and it is new unless ``overwrite``."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise OutputExistsError(f"--out {out} is a folder; give a file name")
    refuse_inputs(out, protect)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    return out


def load_model(path: str | Path, *, spec: str | None = None, spec_options: dict[str, str] | None = None,
               device: str = "auto") -> DeployedModel:
    """Rebuild an exported model; ``spec``/``spec_options`` override the stored ones (e.g. another data dir)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"--model {path} is a folder; give the model file that headcache export wrote")
    if not path.is_file():
        raise CheckpointError(f"--model {path} does not exist")
    saved = _load_file(path, "--model", "a model written by headcache export; export it again")
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a model written by headcache export")
    options = {**saved["spec_options"], **(spec_options or {})}
    spec_object = resolve_spec(spec or saved["spec"], options)
    if callable(getattr(spec_object, "load", None)):  # never backbone() where load() exists (spec contract)
        backbone, _ = load_from_spec(spec_object, saved.get("checkpoint"))
    else:
        backbone = spec_object.backbone()
    backbone.load_state_dict(saved["backbone_state"], strict=True)
    if fingerprint(backbone) != saved["backbone_fingerprint"]:
        raise FingerprintMismatchError(f"{path}: the backbone weights do not match their recorded fingerprint; "
                                       "the file is damaged, export it again")
    model = DeployedModel(spec_object, backbone.eval(), saved["head"], saved["dtype"])
    return model.to(resolve_device(device)).eval()


def _load_file(path: Path, flag: str, what: str) -> Any:
    """torch.load (weights only) of a file headcache wrote, its failures as one CheckpointError naming it.

    torch.load raises EOFError for an empty file, UnpicklingError for other
    bytes (a CSV), RuntimeError for a cut-short archive; click would print
    only "Aborted." for the EOFError.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, pickle.UnpicklingError, RuntimeError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "the file is empty"
        raise CheckpointError(f"{flag} {path}: cannot be read ({type(exc).__name__}: {reason}); it must be "
                              f"{what}") from exc


def predict(model_path: str | Path, split: str, out: str | Path, *, spec: str | None = None,
            spec_options: dict[str, str] | None = None, device: str = "auto", batch_size: int = 64,
            overwrite: bool = False, on_batch: Callable[[int, int], None] | None = None) -> Path:
    """Write ``id, label, p0..pC`` for every item of ``split`` to the csv ``out``.

    Ids and probabilities are written for every item; ``label`` is the
    dataset's label, empty for an unlabelled item (label None: new data).
    The csv is written whole to a temporary file and renamed into place at the
    end, so a failure part-way leaves no partial csv and an existing ``out`` untouched.

    Raises
    ------
    ConfigError
        ``batch_size`` < 1, or the folder of ``out`` does not exist.
    OutputExistsError
        ``out`` exists and ``overwrite`` is False, or ``out`` is the model file.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r}: give an integer >= 1")
    out = _output_file(out, overwrite, protect=(("--model", model_path),))
    model = load_model(model_path, spec=spec, spec_options=spec_options, device=device)
    available = spec_splits(model.spec)
    if split not in available:  # as extract's --splits: the spec declares its splits
        raise ConfigError(f"--split {split!r}: the spec has no such split; it has {', '.join(available)}")
    with spec_member("dataset", f"split {split!r}"):
        dataset = model.spec.dataset(split)
    target = next(model.head.parameters()).device
    loader = DataLoader(range(len(dataset)), batch_size=batch_size, collate_fn=lambda rows: _items(dataset, rows, split))
    ids, labels, probs = [], [], []
    for items in loader:
        with spec_member("collate", f"{len(items)} item(s) of split {split!r}"):
            batch = model.spec.collate([item[0] for item in items])
        probs.append(model(to_device(batch, target)).cpu())
        ids += [item[2] for item in items]
        labels += [None if item[1] is None else int(item[1]) for item in items]  # a tensor label as its number
        if on_batch is not None:
            on_batch(len(ids), len(dataset))
    classes = model.head.bank.num_classes
    write_predictions(out, ids, torch.cat(probs).numpy() if probs else np.empty((0, classes)), labels=labels)
    return out


def _items(dataset: Any, rows: list[int], split: str) -> list:
    """Items ``rows`` of the spec's dataset, an exception inside it a SpecError naming the item."""
    items = []
    for i in rows:
        with spec_member("dataset", f"item {i} of split {split!r}"):
            items.append(dataset[i])
    return items
