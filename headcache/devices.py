"""Where tensors go: the device a run uses, and moving nested batches there."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from headcache.errors import ConfigError


def resolve_device(text: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: CUDA is not available on this machine; use --device cpu or auto")
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
