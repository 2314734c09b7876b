"""Settings of each stage, declared once: the dataclasses, their constraints and the text parsing.

Like scikit-learn's estimators, a config holds settings only (never learned
state), and every setting's allowed values are declared once next to it;
every message is generated from that declaration.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

from headcache.errors import ConfigError
from headcache.head import HEAD_NAMES
from headcache.losses import LOSS_NAMES
from headcache.pooling import POOL_NAMES

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one head's training (never learned state)."""

    pool: str = "meanq"
    head: str = "mlp"
    loss: str | None = None  # None: focal for two classes, else ce
    lr: float = 5e-4
    weight_decay: float = 1e-3
    epochs: int = 50
    batch_size: int = 16
    patience: int = 8
    min_delta: float = 5e-4
    grad_clip: float = 0.05
    dropout: float = 0.1
    hidden: int | None = None  # mlp width; None: D // 2
    focal_gamma: float = 3.0
    seed: int = 0
    device: str = "auto"
    train_split: str = "train"
    val_split: str | None = None  # None: the cache's val or valid
    test_split: str | None = "test"
    memory_budget: int | None = None  # bytes for token matrices on the device; None: a share of what is free

    def __post_init__(self) -> None:
        check_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


# Allowed values of each setting, declared once; every message comes from here.
CONSTRAINTS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "pool": (f"one of {', '.join(POOL_NAMES)}", lambda v: v in POOL_NAMES),
    "head": (f"one of {', '.join(HEAD_NAMES)}", lambda v: v in HEAD_NAMES),
    "loss": (f"one of {', '.join(LOSS_NAMES)} (or unset)", lambda v: v is None or v in LOSS_NAMES),
    "lr": ("a number > 0", lambda v: _number(v) and v > 0),
    "weight_decay": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "epochs": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "batch_size": ("an integer >= 2", lambda v: _integer(v) and v >= 2),
    "patience": ("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "min_delta": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "grad_clip": ("a number > 0", lambda v: _number(v) and v > 0),
    "dropout": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "hidden": ("an integer >= 1 (or unset)", lambda v: v is None or (_integer(v) and v >= 1)),
    "focal_gamma": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "seed": ("an integer >= 0", lambda v: _integer(v) and v >= 0),
    "memory_budget": ("an integer >= 1 (bytes, or unset)", lambda v: v is None or (_integer(v) and v >= 1)),
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(config: TrainConfig) -> None:
    """Refuse a setting outside its allowed values, in scikit-learn's shape of message."""
    for name, (allowed, ok) in CONSTRAINTS.items():
        value = getattr(config, name)
        if not ok(value):
            raise ConfigError(f"The '{name}' parameter of TrainConfig must be {allowed}. Got {value!r} instead.")


def config_from_options(options: dict[str, str], base: TrainConfig | None = None) -> TrainConfig:
    """A config from text values (``--grid lr=1e-3`` and friends), converted by field type."""
    base = base or TrainConfig()
    known = {f.name: f for f in fields(TrainConfig)}
    changes = {}
    for key, text in options.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown train option {key!r}; known: {', '.join(sorted(known))}")
        changes[name] = _parse_value(name, text, getattr(base, name))
    return replace(base, **changes)


def _parse_value(name: str, text: str, current: Any) -> Any:
    if not isinstance(text, str):
        return text
    if text.lower() in ("none", "null", ""):
        return None
    kind = {"epochs": int, "batch_size": int, "patience": int, "hidden": int, "seed": int,
            "lr": float, "weight_decay": float, "min_delta": float, "grad_clip": float,
            "dropout": float, "focal_gamma": float, "memory_budget": parse_bytes}.get(name, str)
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"The '{name}' parameter must be {CONSTRAINTS[name][0]}. Got {text!r} instead.") from None



def parse_bytes(text: str | int) -> int:
    """``--memory-budget`` text as bytes: a number with an optional unit K, M, G or T (powers of 1024).

    >>> parse_bytes("1.5G")
    1610612736
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
        if match is None:
            raise ConfigError(f"--memory-budget {text!r}: expected a size such as 512M, 4G or 1073741824")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise ConfigError(f"--memory-budget {text!r}: the budget must be positive")
    return value
