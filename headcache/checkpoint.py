"""Verified checkpoint loading: every backbone tensor comes from the file, or it fails.

The seed loaded its checkpoint with ``strict=False`` and printed only counts, so
a prefix mismatch silently left the backbone at random initialisation. Here,
like timm's loader, the file is read with ``weights_only=True`` unless the user
trusts it, Lightning / ``{"model": ...}`` wrappers are unwrapped, key prefixes
are mapped (automatically or by ``--key-map``), and then every tensor of the
backbone's ``state_dict`` must be present with its exact shape. Whatever else
the checkpoint holds (decoders, an old head whose shapes differ) is listed in
the `LoadReport` and never loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from headcache.errors import CheckpointError, ConfigError

# Prefixes that wrappers commonly add (Lightning/timm `model.`, DDP `module.`,
# torch.compile `_orig_mod.`); always tried by the automatic key map.
COMMON_PREFIXES = ("model.", "backbone.", "module.", "_orig_mod.")

# How many keys an error message lists before it says "... and N more".
_MAX_LISTED = 20

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# torch.load's weights-only unpickler refused an object (not a corrupt file):
# an unsafe global, a blocked module, or an import it would need.
_NEEDS_UNPICKLING = re.compile(r"was not an allowed global|is blocked|must be \S+ to load")
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


@dataclass
class LoadReport:
    """What `load_checkpoint` did; stored in the cache so a result can be traced to its weights.

    Attributes
    ----------
    path : str
        The checkpoint file.
    format : str
        ``"lightning"``, ``"state_dict"``, ``"safetensors"`` or ``"module"``.
    loaded : int
        Backbone tensors loaded (all of the backbone's ``state_dict``).
    values : int
        Scalar values in those tensors.
    key_map : dict of str to str
        Prefix rewrites applied to checkpoint keys, old -> new; empty when the
        keys were used as they are. A new prefix ``""`` strips the old one.
    unexpected : list of str
        Checkpoint keys (as named in the file) the backbone does not use, sorted.
    fingerprint : str
        `fingerprint` of the backbone after loading.
    checkpoint_sha256 : str
        `file_sha256` of the checkpoint file.
    casts : dict of str to int
        dtype conversions made to fit the backbone, e.g. ``{"float16 -> float32": 117}``.
    spec_report : dict
        What a spec's own ``load`` reported (JSON-able), kept beside headcache's
        counts; empty when headcache loaded the checkpoint itself.
    """

    path: str
    format: str
    loaded: int
    values: int
    key_map: dict[str, str]
    unexpected: list[str]
    fingerprint: str
    checkpoint_sha256: str
    casts: dict[str, int] = field(default_factory=dict)
    spec_report: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return a JSON-able dict (the cache stores it as a JSON string)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoadReport":
        """Rebuild a report from `to_dict` output; fields added later get their defaults."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def summary(self) -> str:
        """A few human-readable lines: what was loaded, the prefix map, what was left out."""
        lines = [f"loaded {self.loaded} tensors ({self.values:,} values) from {self.path} [{self.format}]"]
        lines.append(f"prefix map: {_describe_map(self.key_map)}")
        if self.casts:
            lines.append("dtype casts: " + ", ".join(f"{k} ({n})" for k, n in sorted(self.casts.items())))
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected keys, not loaded: {group_keys(self.unexpected)}")
        else:
            lines.append("no unexpected keys")
        lines += [f"{key}: {_describe_value(value)}" for key, value in self.spec_report.items()]
        return "\n".join(lines)


def group_keys(keys: list[str]) -> str:
    """Summarise keys by top-level prefix: ``"cls_head.* (9), decoder.* (84)"``.

    Each group is shown by the longest dotted prefix its keys share, so a group
    of one key shows that key, and a decoder nested under ``setvae.setvae``
    shows as ``setvae.setvae.decoder_layers.*`` rather than ``setvae.*``.
    """
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    parts = []
    for members in groups.values():
        if len(members) == 1:
            parts.append(f"{members[0]} (1)")
            continue
        split = [m.split(".") for m in members]
        common = []
        for pieces in zip(*split):
            if len(set(pieces)) > 1:
                break
            common.append(pieces[0])
        # A key may equal the common prefix itself (`a` next to `a.b`): show `a*`.
        label = ".".join(common) + ("." if all(len(s) > len(common) for s in split) else "")
        parts.append(f"{label}* ({len(members)})")
    return ", ".join(parts)


def parse_key_map(items: list[str]) -> dict[str, str]:
    """Parse ``--key-map OLD=NEW`` items into an ordered prefix map (first match wins).

    Parameters
    ----------
    items : list of str
        e.g. ``["model.=", "setvae.=setvae.setvae."]``: strip ``model.``; add a
        ``setvae.`` level. Either side may be empty.

    Raises
    ------
    ConfigError
        An item without ``=``, or the same OLD prefix twice.
    """
    key_map: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"--key-map {item!r}: expected OLD=NEW (a checkpoint key prefix and its replacement; "
                "NEW may be empty to strip it, e.g. --key-map model.=)"
            )
        old, new = item.split("=", 1)
        if old in key_map:
            raise ConfigError(f"--key-map {item!r}: prefix {old!r} is already mapped to {key_map[old]!r}")
        key_map[old] = new
    return key_map


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks (checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 hex digest of a checkpoint file, or of a folder's files (a Hugging Face model folder).

    For a folder the digest runs over every file below it in sorted order of
    relative path, each as its path, a NUL, its size, a NUL and its bytes, so a
    renamed, added or changed file changes it while the folder's location and
    file times do not.
    """
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 hex over the sorted (name, dtype, shape, bytes) of every tensor of a state dict.

    Ties a cache to the exact weights that wrote it: identical weights give the
    identical string on any device; any changed value, dtype, shape or name
    gives another. Non-tensor entries (``_extra_state``) are not part of it.
    """
    if isinstance(module_or_state_dict, nn.Module):
        state = module_or_state_dict.state_dict()
    else:
        state = module_or_state_dict
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header = f"{name}\0{_dtype_name(tensor.dtype)}\0{list(tensor.shape)}\0{raw.nbytes}\0"
        digest.update(header.encode())
        digest.update(raw)
    return digest.hexdigest()


def read_state_dict(path: str | Path, *, trust: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Read the tensors of a checkpoint file, unwrapped, on the CPU.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file, a Lightning ``.ckpt`` (``state_dict`` inside), a
        dict with ``model`` or ``module`` holding the state dict, a plain state
        dict, or (``trust`` only) a pickled ``nn.Module``.
    trust : bool
        Unpickle fully (``weights_only=False``), which can run code from the
        file. Without it a file that needs this is refused, never retried.

    Returns
    -------
    state : dict of str to Tensor
        The tensors; non-tensor entries of the state dict are dropped.
    format : str
        ``"lightning"``, ``"state_dict"``, ``"safetensors"`` or ``"module"``.

    Raises
    ------
    CheckpointError
        Missing file, a file that is not a checkpoint, or one that needs
        ``--trust-checkpoint``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), "safetensors"
    obj = _torch_load(path, trust)
    fmt = "state_dict"
    if isinstance(obj, Mapping):
        for wrapper, wrapped_format in (("state_dict", "lightning"), ("model", "state_dict"), ("module", "state_dict")):
            if isinstance(obj.get(wrapper), (Mapping, nn.Module)):
                obj, fmt = obj[wrapper], wrapped_format
                break
    if isinstance(obj, nn.Module):
        obj, fmt = obj.state_dict(), "module"
    if not isinstance(obj, Mapping):
        raise _not_a_checkpoint(path, f"it holds a {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise _not_a_checkpoint(path, f"it is a dict with no tensors (top-level keys: {_listing(list(obj))})")
    return state, fmt


def load_checkpoint(
    module: nn.Module,
    path: str | Path,
    *,
    key_map: dict[str, str] | None = None,
    trust: bool = False,
) -> LoadReport:
    """Load every tensor of ``module.state_dict()`` from a checkpoint, or raise.

    Parameters
    ----------
    module : nn.Module
        The backbone, constructed untrained; loaded in place.
    path : str or Path
        The checkpoint (any format `read_state_dict` reads).
    key_map : dict of str to str, optional
        Prefix rewrites OLD -> NEW applied to checkpoint keys, first match wins
        (see `parse_key_map`). Without it the single rewrite that matches the
        most backbone keys is chosen (`detect_key_map`).
    trust : bool
        Allow full unpickling (``--trust-checkpoint``).

    Returns
    -------
    LoadReport
        What was loaded, the prefix map, the unused keys, the fingerprint.

    Raises
    ------
    CheckpointError
        Unreadable file, backbone keys missing from the checkpoint (listed,
        with the prefix map tried and the ``--key-map`` fix), or shapes that
        differ (key and both shapes).

    Example
    -------
    >>> report = load_checkpoint(spec.backbone(), "demo_out/model.ckpt")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    state, fmt = read_state_dict(path, trust=trust)
    target = module.state_dict()
    if key_map is None:
        key_map = detect_key_map(list(state), list(target))

    selected: dict[str, str] = {}  # backbone key -> checkpoint key
    unexpected = []
    for old_key in state:
        new_key = _rewrite(old_key, key_map)
        if new_key not in target:
            unexpected.append(old_key)
        elif new_key in selected:
            raise CheckpointError(
                f"{path}: checkpoint keys {selected[new_key]!r} and {old_key!r} both map to backbone key "
                f"{new_key!r} under prefix map {_describe_map(key_map)}; pass --key-map OLD=NEW to choose"
            )
        else:
            selected[new_key] = old_key

    missing = [k for k in target if k not in selected]
    mismatched = [k for k, old in selected.items() if state[old].shape != target[k].shape]
    if missing or mismatched:
        raise CheckpointError(_mismatch_message(path, state, target, selected, missing, mismatched, key_map))

    casts: Counter[str] = Counter()
    loaded = {}
    for key, old_key in selected.items():
        tensor, want = state[old_key], target[key].dtype
        if tensor.dtype != want:
            casts[f"{_dtype_name(tensor.dtype)} -> {_dtype_name(want)}"] += 1
            tensor = tensor.to(want)
        loaded[key] = tensor
    module.load_state_dict(loaded, strict=True)
    return LoadReport(
        path=str(path),
        format=fmt,
        loaded=len(loaded),
        values=sum(t.numel() for t in loaded.values()),
        key_map=dict(key_map),
        unexpected=sorted(unexpected),
        fingerprint=fingerprint(module),
        checkpoint_sha256=file_sha256(path),
        casts=dict(casts),
    )


def detect_key_map(checkpoint_keys: list[str], expected_keys: list[str]) -> dict[str, str]:
    """Choose the single prefix rewrite under which the most backbone keys are found.

    Candidates: strip a prefix P where a checkpoint key is P + a backbone key;
    add a prefix P where a backbone key is P + a checkpoint key (anchored on
    that key's first component, e.g. ``setvae.`` -> ``setvae.setvae.``, and
    unanchored, ``""`` -> P); strip each of `COMMON_PREFIXES`. Prefixes end at
    a dot. Ties go to no rewrite, then to the longer (more specific) OLD, then
    alphabetically, so the choice is deterministic.

    Returns
    -------
    dict of str to str
        ``{}`` (keys used as they are) or ``{OLD: NEW}``.
    """
    ckpt, expected = set(checkpoint_keys), set(expected_keys)
    candidates = {(prefix, "") for prefix in COMMON_PREFIXES}
    for key in ckpt:
        candidates.update((prefix, "") for prefix, rest in _dotted_splits(key) if rest in expected)
    for key in expected:
        for prefix, rest in _dotted_splits(key):
            if rest in ckpt:
                candidates.add(("", prefix))
                if "." in rest:
                    head = rest.split(".", 1)[0] + "."
                    candidates.add((head, prefix + head))

    def found(key_map: dict[str, str]) -> int:
        return len({_rewrite(k, key_map) for k in ckpt} & expected)

    best, best_found = {}, found({})
    for old, new in sorted(candidates, key=lambda c: (-len(c[0]), c)):
        score = found({old: new})
        if score > best_found:
            best, best_found = {old: new}, score
    return best


def _dotted_splits(key: str):
    """Yield (prefix, rest) for every split of ``key`` just after a dot."""
    for i, char in enumerate(key):
        if char == "." and i + 1 < len(key):
            yield key[: i + 1], key[i + 1 :]


def _rewrite(key: str, key_map: Mapping[str, str]) -> str:
    for old, new in key_map.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _describe_value(value) -> str:
    """One line for a spec-report entry; a long list of tensor names is grouped like unexpected keys."""
    if isinstance(value, list) and len(value) > 3 and all(isinstance(v, str) and "." in v for v in value):
        return group_keys(value)
    return str(value)


def _describe_map(key_map: Mapping[str, str]) -> str:
    if not key_map:
        return "none (checkpoint keys used as they are)"
    return ", ".join(f"{old!r} -> {new!r}" for old, new in key_map.items())


def _mismatch_message(path, state, target, selected, missing, mismatched, key_map) -> str:
    lines = [f"checkpoint {path} does not fit the backbone:"]
    if missing:
        lines.append(
            f"{len(missing)} of the backbone's {len(target)} tensors are missing from it "
            f"({group_keys(missing)}):"
        )
        lines += [f"  {key}" for key in missing[:_MAX_LISTED]]
        if len(missing) > _MAX_LISTED:
            lines.append(f"  ... and {len(missing) - _MAX_LISTED} more")
    if mismatched:
        lines.append(f"{len(mismatched)} tensors have another shape in the checkpoint:")
        for key in mismatched[:_MAX_LISTED]:
            lines.append(
                f"  {key}: checkpoint {list(state[selected[key]].shape)} (as {selected[key]!r}), "
                f"backbone {list(target[key].shape)}"
            )
        if len(mismatched) > _MAX_LISTED:
            lines.append(f"  ... and {len(mismatched) - _MAX_LISTED} more")
    lines.append(f"prefix map tried: {_describe_map(key_map)}")
    lines.append(f"the checkpoint's {len(state)} keys: {group_keys(list(state))}")
    if missing:
        lines.append(
            "fix: pass --key-map OLD=NEW (repeatable) so checkpoint keys get the backbone's names, "
            "e.g. --key-map model.= strips 'model.'; or check that the checkpoint belongs to this backbone"
        )
    else:
        lines.append("fix: use the checkpoint of this architecture (or the spec that matches this checkpoint)")
    return "\n".join(lines)


def _torch_load(path: Path, trust: bool):
    """torch.load, with its many failure types turned into one named error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if not trust and _NEEDS_UNPICKLING.search(message):
            found = _UNSAFE_GLOBAL.search(message)
            what = f"it holds {found.group(1)}" if found else "it holds objects other than tensors"
            raise CheckpointError(
                f"checkpoint {path} needs full unpickling ({what}), which weights_only loading refuses. "
                "--trust-checkpoint allows full unpickling for a file you trust "
                "(unpickling can run arbitrary code from the file)"
            ) from None
        # torch wraps the real reason in advice to retry unsafely; keep that out of the message.
        raise _not_a_checkpoint(path, "torch.load cannot unpickle it") from exc
    except RuntimeError as exc:
        if not trust and "TorchScript" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} is a TorchScript archive; loading it runs its code. "
                "--trust-checkpoint allows that for a file you trust"
            ) from None
        raise _not_a_checkpoint(path, _first_line(str(exc))) from exc
    except Exception as exc:  # torch.load also raises EOFError, KeyError, ... on arbitrary bytes
        raise _not_a_checkpoint(path, f"{type(exc).__name__}: {_first_line(str(exc))}") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file without the `safetensors` package.

    Format: 8-byte little-endian header size N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}``,
    then the raw little-endian tensor bytes, offsets relative to their start.
    Each tensor is read into its own buffer, so it is aligned and writable.
    """
    size = path.stat().st_size
    tensors = {}
    with open(path, "rb") as f:
        head = f.read(8)
        header_size = int.from_bytes(head, "little")
        if len(head) < 8 or header_size > size - 8:
            raise _not_safetensors(path, "the header size does not fit the file")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, ValueError):
            raise _not_safetensors(path, "the header is not JSON") from None
        if not isinstance(header, dict):
            raise _not_safetensors(path, "the header is not a JSON object")
        data_start, data_size = 8 + header_size, size - 8 - header_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                code, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise _not_safetensors(path, f"tensor {name!r} lacks dtype, shape or data_offsets") from None
            if code not in _SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has safetensors dtype {code}, which headcache does not read "
                    f"(it reads {', '.join(_SAFETENSORS_DTYPES)})"
                )
            dtype = _SAFETENSORS_DTYPES[code]
            nbytes = math.prod(shape) * dtype.itemsize
            if not 0 <= begin <= end <= data_size or end - begin != nbytes:
                raise _not_safetensors(path, f"tensor {name!r} has data_offsets that do not fit its shape")
            if nbytes == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            buffer = bytearray(nbytes)
            f.seek(data_start + begin)
            f.readinto(buffer)
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    if not tensors:
        raise _not_safetensors(path, "it holds no tensors")
    return tensors


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a PyTorch checkpoint / state dict: {why}")


def _not_safetensors(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a safetensors checkpoint: {why}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def _listing(keys: list) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
