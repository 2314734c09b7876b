"""Backbone + pool + head as one deployable model, and prediction with it.

`export` writes one file that holds the verified backbone weights, the
trained head (its best weights) and how to rebuild both; `predict` runs it on
a split of the spec's data. The exported model is timm's forward_features /
forward_head seam: `spec.encode` gives the hidden states, the pool and head
give the probabilities.

The hidden states are rounded through the cache's dtype before pooling, as
they were when the head was trained (NOTE [ Float16 rounding in the live
source ] in features.py), so the exported model reproduces the run's own
predictions.
"""
from __future__ import annotations

import csv
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from headcache.checkpoint import fingerprint
from headcache.devices import resolve_device, to_device
from headcache.errors import CheckpointError, FingerprintMismatchError, OutputExistsError
from headcache.pooling import TokenBatch, is_learnable, pool_parameter_free
from headcache.rundir import head_from_checkpoint
from headcache.spec import load_backbone, resolve_spec
from headcache.store import round_through

MODEL_FORMAT = "headcache-model"


class DeployedModel(nn.Module):
    """spec.encode -> round through the cache dtype -> pool -> head -> class probabilities."""

    def __init__(self, spec: Any, backbone: nn.Module, head_checkpoint: dict, dtype: str):
        super().__init__()
        self.spec, self.backbone, self.dtype = spec, backbone, dtype
        self.pool_name = head_checkpoint["config"]["pool"]
        self.head = head_from_checkpoint(head_checkpoint)

    @torch.no_grad()
    def forward(self, batch: Any) -> Tensor:
        hidden, mask = self.spec.encode(self.backbone, batch)
        hidden, mask = round_through(hidden.float(), self.dtype), mask.bool()
        if is_learnable(self.pool_name):
            features: Tensor | TokenBatch = TokenBatch(hidden.masked_fill(~mask.unsqueeze(-1), 0.0), mask)
        else:
            features = pool_parameter_free(self.pool_name, hidden, mask)
        return torch.softmax(self.head(features)[0], dim=-1)


@dataclass
class ExportResult:
    path: Path
    backbone_fingerprint: str
    head_epoch: int


def export(spec: str, checkpoint: str | Path, run_dir: str | Path, out: str | Path, *,
           spec_options: dict[str, str] | None = None, key_map: dict[str, str] | None = None,
           trust: bool = False, overwrite: bool = False) -> ExportResult:
    """Write backbone + the run's best head as one model file.

    Raises
    ------
    FingerprintMismatchError
        The run was trained on the cache of another backbone.
    CheckpointError
        The run directory has no head_best.pt.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    head_path = Path(run_dir) / "head_best.pt"
    if not head_path.is_file():
        raise CheckpointError(f"{head_path} does not exist: --run must name a run directory written by "
                              "headcache train (or sweep)")
    head = _load_file(head_path, "--run", "a head file written by headcache train (or sweep); train the run again")
    run_config = json.loads((Path(run_dir) / "config.json").read_text())
    spec_object = resolve_spec(spec, spec_options)
    backbone, report = load_backbone(spec_object, checkpoint, key_map=key_map, trust=trust)
    if report.fingerprint != head["backbone_fingerprint"]:
        raise FingerprintMismatchError(
            f"{head_path} was trained on a cache of backbone {head['backbone_fingerprint'][:12]}, but {checkpoint} "
            f"loads as {report.fingerprint[:12]}; export with the checkpoint that wrote the run's cache")
    torch.save({"format": MODEL_FORMAT, "version": 1, "spec": spec, "spec_options": dict(spec_options or {}),
                "backbone_state": backbone.state_dict(), "backbone_fingerprint": report.fingerprint,
                "dtype": run_config.get("dtype", "float32"), "head": head}, out)
    return ExportResult(out, report.fingerprint, head["epoch"])


def load_model(path: str | Path, *, spec: str | None = None, spec_options: dict[str, str] | None = None,
               device: str = "auto") -> DeployedModel:
    """Rebuild an exported model; ``spec``/``spec_options`` override the stored ones (e.g. another data dir)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--model {path} does not exist")
    saved = _load_file(path, "--model", "a model written by headcache export; export it again")
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a model written by headcache export")
    options = {**saved["spec_options"], **(spec_options or {})}
    spec_object = resolve_spec(spec or saved["spec"], options)
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
            on_batch: Callable[[int, int], None] | None = None) -> Path:
    """Write ``id, label, p0..pC`` for every item of ``split`` to the csv ``out``."""
    model = load_model(model_path, spec=spec, spec_options=spec_options, device=device)
    dataset = model.spec.dataset(split)
    target = next(model.head.parameters()).device
    loader = DataLoader(range(len(dataset)), batch_size=batch_size, collate_fn=lambda rows: [dataset[i] for i in rows])
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"] + [f"p{c}" for c in range(model.head.bank.num_classes)])
        done = 0
        for items in loader:
            probs = model(to_device(model.spec.collate([item[0] for item in items]), target)).cpu()
            for item, row in zip(items, probs.tolist()):
                writer.writerow([item[2], item[1]] + [f"{v:.6g}" for v in row])
            done += len(items)
            if on_batch is not None:
                on_batch(done, len(dataset))
    return Path(out)
