"""Where tensors go: the device a run uses, and moving nested batches there."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from headcache.errors import ConfigError

_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(text: str = "auto") -> torch.device:
    """The torch device for ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or ``mps`` where it exists).

    ``auto`` picks the first CUDA device when there is one, else the CPU.
    Anything else is refused here, before any work: torch would accept
    ``meta`` (tensors without data) or ``mps`` on a machine without it, and
    fail later with a message that names neither the flag nor the fix.
    """
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps: MPS (Apple GPU) is not available on this machine; use --device auto "
                              "or cpu")
        return torch.device("mps")
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise ConfigError(f"--device {text!r}: expected {_CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: CUDA is not available on this machine; use --device cpu or auto")
    device = torch.device(text)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}; choose one of those, or cuda")
    return device


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor inside nested dicts/lists/tuples to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj
