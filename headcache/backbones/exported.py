"""Built-in spec ``exported``: a torch.export program and ragged arrays, no code written.

``headcache extract --spec exported --checkpoint model.pt2 --spec-opt data=DIR --out c.h5``

The program (``torch.export.save``; TorchScript is deprecated) is called as
``program(x, mask)`` with ``x`` float32 ``[B, T, F]`` and ``mask`` bool
``[B, T]`` (True on real positions), B and T dynamic, and returns the hidden
states ``[B, T, D]`` (or a tuple / dict whose first tensor they are). `load`
calls it on a small probe before anything else, so a program made for another
call is refused with the expected call in the message.

Data: ``DIR/<split>.npz``, one file per split, holding ``x`` (sum T_i, F)
float32, ``offsets`` (N+1,) int (sequence i is rows offsets[i]:offsets[i+1]),
``labels`` (N,) int (-1 = unlabelled; no ``labels`` = all unlabelled), ``ids``
(N,) strings, optional ``class_names``. Arrays are read with
``allow_pickle=False``: ids and class names must be string arrays, never objects.

NOTE [ Loading an exported program never unpickles untrusted bytes ]
torch.export.load is *not* pickle-free (its own docstring warns so; torch
2.13, torch/export/pt2_archive/_package.py and torch/_export/serde/serialize.py):
plain tensors are stored as raw bytes with JSON metadata, but a weight or
constant marked ``use_pickle`` (tensor subclasses) is read with
``torch.load(weights_only=False)``, ``custom_obj_*`` / ``opaque_obj_*``
constants are unpickled, legacy ``data/weights/<model>.pt`` files take the
torch.load path, and the sample inputs are read with ``weights_only=True`` and
*retried with weights_only=False* when that fails. So before torch sees the
file, `check_archive` reads the archive as a zip: any of those payloads (or
sample inputs that weights-only loading refuses) needs ``--trust-checkpoint``.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from headcache.errors import CheckpointError, DataError

EXPECTED_CALL = ("program(x, mask) with x float32 [B, T, F] and mask bool [B, T] (True on real positions), "
                 "B and T dynamic (torch.export.Dim), returning hidden [B, T, D] or a tuple / dict whose first "
                 "tensor it is")
PROBE_SHAPES = ((2, 3), (3, 5))  # two (B, T): a program with a static B or T fails one of them
SPLIT_ORDER = ("train", "val", "valid", "validation", "dev", "test")


def make_spec(data: str) -> "ExportedSpec":
    """The ``exported`` spec over ``DIR/<split>.npz`` (``--spec-opt data=DIR``).

    Raises
    ------
    DataError
        No such folder, no npz files in it, or a file that breaks the layout.
    """
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--spec-opt data={folder}: not a folder; the exported spec reads DIR/<split>.npz")
    files = {p.stem: p for p in folder.glob("*.npz")}
    if not files:
        raise DataError(f"--spec-opt data={folder}: no .npz files (one per split: train.npz, val.npz, ... holding "
                        "x, offsets, labels, ids)")
    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    return ExportedSpec({name: files[name] for name in sorted(files, key=lambda s: (rank.get(s, len(rank)), s))})


class ExportedBackbone(nn.Module):
    """An exported program as a backbone: ``forward(x, mask) -> hidden [B, T, D]``.

    torch refuses ``train()`` / ``eval()`` on a program's module: its mode was
    fixed when it was exported. Only this wrapper's flag follows them, so the
    rest of headcache can put every backbone in eval mode the same way.
    """

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> "ExportedBackbone":
        self.training = mode
        return self

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return first_tensor(self.program(x, mask))


class ExportedSpec:
    """Ragged float sequences through an exported program (see the module docstring).

    Attributes
    ----------
    splits : tuple of str
        The npz files present.
    num_classes, class_names :
        From ``class_names`` when a file has them, else the largest label + 1; None when unlabelled.
    input_features : int or None
        F of the program's ``x`` (set by `load`).
    """

    name = "exported"

    def __init__(self, files: dict[str, Path]):
        self._files = files
        self.splits = tuple(files)
        self._arrays: dict[str, dict[str, np.ndarray]] = {split: _read_npz(path) for split, path in files.items()}
        names = [tuple(a["class_names"].tolist()) for a in self._arrays.values() if "class_names" in a]
        if len(set(names)) > 1:
            raise DataError(f"--spec-opt data={next(iter(files.values())).parent}: the npz files give different "
                            "class_names; give every file the same ones")
        top = max((int(a["labels"].max(initial=-1)) for a in self._arrays.values()), default=-1)
        self.class_names = list(names[0]) if names else None
        self.num_classes = len(self.class_names) if self.class_names else (top + 1 or None)
        self.input_features: int | None = None

    def load(self, checkpoint: str | Path | None, *, trust: bool = False) -> tuple[nn.Module, dict]:
        """The program, checked against the expected call on a probe input.

        Raises
        ------
        CheckpointError
            No such file, not a torch.export archive, payloads that need unpickling
            without ``--trust-checkpoint``, or a program that does not fit the call.
        """
        if checkpoint is None:
            raise CheckpointError("--checkpoint: the exported spec needs a program saved with torch.export.save")
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {path} does not exist (expected a torch.export.save file, .pt2)")
        pickled = check_archive(path, trust=trust)
        try:
            program = torch.export.load(path)
        except Exception as exc:  # torch raises many types on a damaged archive
            raise CheckpointError(f"{path}: torch.export.load cannot read it: {type(exc).__name__}: "
                                  f"{_first_line(exc)}") from exc
        self.input_features = _input_features(program, path)
        backbone = ExportedBackbone(program.module())
        hidden_dim = _probe(backbone, self.input_features, path)
        report: dict[str, Any] = {"input_features": self.input_features, "hidden_dim": hidden_dim}
        if pickled:
            report["unpickled_payloads"] = pickled  # allowed by --trust-checkpoint
        return backbone, report

    def dataset(self, split: str) -> "RaggedDataset":
        if split not in self._arrays:
            raise DataError(f"the exported data has no split {split!r}; it has {', '.join(self.splits)}")
        arrays = self._arrays[split]
        if self.input_features is not None and arrays["x"].shape[1] != self.input_features:
            raise DataError(f"{self._files[split]}: x has {arrays['x'].shape[1]} features per position, but the "
                            f"program takes F={self.input_features}")
        return RaggedDataset(arrays)

    def collate(self, inputs: list[Tensor]) -> dict[str, Tensor]:
        """Zero-pad to the longest sequence; the mask says which positions are real."""
        width = max(len(x) for x in inputs)
        x = torch.zeros(len(inputs), width, inputs[0].shape[1], dtype=torch.float32)
        mask = torch.zeros(len(inputs), width, dtype=torch.bool)
        for b, item in enumerate(inputs):
            x[b, :len(item)] = item
            mask[b, :len(item)] = True
        return {"x": x, "mask": mask}

    def encode(self, backbone: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return backbone(batch["x"], batch["mask"]), batch["mask"]


class RaggedDataset(torch.utils.data.Dataset):
    """Items ``(x [T_i, F] float32, label or None, id)`` of one npz file."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._x, self._offsets, self._labels = arrays["x"], arrays["offsets"], arrays["labels"]
        self._ids = [str(i) for i in arrays["ids"]]

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> tuple[Tensor, int | None, str]:
        x = torch.from_numpy(self._x[self._offsets[i]:self._offsets[i + 1]])
        label = int(self._labels[i])
        return x, (None if label < 0 else label), self._ids[i]

    def lengths(self) -> list[int]:
        return np.diff(self._offsets).tolist()


def first_tensor(output: Any) -> Tensor:
    """The hidden states in a program's output: the tensor itself, or the first tensor of a tuple / dict."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else [output]
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise CheckpointError(f"the program returned {type(output).__name__} with no tensor; expected {EXPECTED_CALL}")


def check_archive(path: Path, *, trust: bool) -> list[str]:
    """The payloads of a .pt2 archive that loading would unpickle (NOTE above); refuse them without trust.

    Returns
    -------
    list of str
        Archive members that need unpickling (only ever non-empty with ``trust``).

    Raises
    ------
    CheckpointError
        Not a torch.export archive, or payloads that need unpickling and no ``trust``.
    """
    from torch.export.pt2_archive import constants as pt2

    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.split("/", 1)[1]: name for name in archive.namelist() if "/" in name}
            if archive.read(members[pt2.ARCHIVE_FORMAT_PATH]).decode().strip() != pt2.ARCHIVE_FORMAT_VALUE:
                raise KeyError(pt2.ARCHIVE_FORMAT_PATH)
            models = [m[len(pt2.MODELS_DIR):-len(".json")] for m in members
                      if m.startswith(pt2.MODELS_DIR) and m.endswith(".json")]
            if not models:
                raise KeyError(pt2.MODELS_DIR)
            pickled = []
            for model in models:
                for config_name, kind in ((pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, "weights"),
                                          (pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, "constants")):
                    directory = pt2.WEIGHTS_DIR if kind == "weights" else pt2.CONSTANTS_DIR
                    if f"{directory}{model}.pt" in members:  # the legacy format: one torch.save'd file
                        pickled.append(f"{directory}{model}.pt")
                    config_file = config_name.format(model)
                    if config_file not in members:
                        continue
                    for fqn, payload in json.loads(archive.read(members[config_file]))["config"].items():
                        tensor_file = kind == "weights" or payload["path_name"].startswith(
                            pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
                        if payload.get("use_pickle") or not tensor_file:
                            pickled.append(f"{directory}{payload['path_name']} ({fqn})")
                sample = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
                if sample in members and not _weights_only_loads(archive.read(members[sample])):
                    pickled.append(sample)
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"--checkpoint {path} is not a torch.export program (torch.export.save writes a "
                              f".pt2 archive): {type(exc).__name__} {_first_line(exc)}") from None
    if pickled and not trust:
        raise CheckpointError(f"--checkpoint {path}: loading the program would unpickle {', '.join(pickled[:5])}"
                              f"{' ...' if len(pickled) > 5 else ''}, which can run code from the file; "
                              "--trust-checkpoint allows it for a file you trust")
    return pickled


def _weights_only_loads(raw: bytes) -> bool:
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception:  # torch.export.load would retry this one with full unpickling
        return False
    return True


def _input_features(program: Any, path: Path) -> int:
    """F of the program's x, from its user inputs' recorded shapes (refusing any other signature)."""
    names = list(program.graph_signature.user_inputs)
    shapes = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in names}
    values = [shapes.get(name) for name in names]
    ok = (len(values) == 2 and all(isinstance(v, Tensor) for v in values) and values[0].dim() == 3
          and values[1].dim() == 2 and values[0].dtype == torch.float32 and values[1].dtype == torch.bool
          and isinstance(values[0].shape[2], int))
    if not ok:
        got = ", ".join(f"{n}: {getattr(v, 'dtype', type(v).__name__)} {list(getattr(v, 'shape', []))}"
                        for n, v in zip(names, values))
        raise CheckpointError(f"{path}: the program takes ({got}); expected {EXPECTED_CALL}")
    return int(values[0].shape[2])


def _probe(backbone: ExportedBackbone, features: int, path: Path) -> int:
    """Call the program on zero-padded random inputs of two shapes; the hidden size D."""
    generator = torch.Generator().manual_seed(0)
    dims = set()
    for b, t in PROBE_SHAPES:
        x = torch.randn(b, t, features, generator=generator)
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[0, t - 1:] = False  # a padded position, as in every real batch
        try:
            with torch.inference_mode():
                hidden = backbone(x, mask)
        except Exception as exc:  # a guard on a static B or T, a wrong rank, ...: all mean "another call"
            raise CheckpointError(f"{path}: the program fails on x [{b}, {t}, {features}] with a mask [{b}, {t}] "
                                  f"({type(exc).__name__}: {_first_line(exc)}); expected {EXPECTED_CALL}") from None
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (b, t) or not hidden.is_floating_point():
            raise CheckpointError(f"{path}: for x [{b}, {t}, {features}] the program returned {hidden.dtype} "
                                  f"{list(hidden.shape)}; expected {EXPECTED_CALL}")
        dims.add(int(hidden.shape[2]))
    return dims.pop()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one split, checked against the layout (allow_pickle=False: no object arrays)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read it as npz without pickle ({_first_line(exc)}); store ids and "
                        "class_names as string arrays") from None
    missing = [key for key in ("x", "offsets", "ids") if key not in arrays]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} (it has {', '.join(arrays) or 'nothing'}); expected "
                        "x (sum T_i, F), offsets (N+1,), ids (N,), optional labels (N,) and class_names")
    x, offsets, ids = arrays["x"], arrays["offsets"].astype(np.int64), arrays["ids"]
    n = len(ids)
    arrays["labels"] = arrays["labels"].astype(np.int64) if "labels" in arrays else np.full(n, -1, dtype=np.int64)
    problems = [
        (x.ndim == 2, f"x has shape {list(x.shape)}; expected (sum T_i, F)"),
        (offsets.shape == (n + 1,), f"offsets has shape {list(offsets.shape)}; expected ({n + 1},) for {n} ids"),
        (arrays["labels"].shape == (n,), f"labels has shape {list(arrays['labels'].shape)}; expected ({n},)"),
        (len(set(ids.tolist())) == n, "ids are not unique"),
    ]
    for ok, message in problems:
        if not ok:
            raise DataError(f"{path}: {message}")
    if offsets[0] != 0 or offsets[-1] != len(x) or (np.diff(offsets) < 0).any():
        raise DataError(f"{path}: offsets must rise from 0 to len(x) = {len(x)}")
    arrays["x"], arrays["offsets"] = np.ascontiguousarray(x, dtype=np.float32), offsets
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
