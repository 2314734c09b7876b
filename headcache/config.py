"""Settings of each stage, declared once: the dataclasses, their constraints and the text parsing.

Like scikit-learn's estimators, a config holds settings only (never learned
state). Every setting is declared once, with `setting(default, constraint,
help)`: its default, the constraint object that both checks a value and
describes itself (scikit-learn's `Interval` / `StrOptions` shape), and its
help line. Every message, the text parsing (from the field's type) and the
command line's options, defaults, choices and help (cli.py) come from that one
declaration, so check, message and flag cannot drift apart.

Messages name the command-line flag, in the library too (``weight_decay`` ->
``--weight-decay``), so the CLI never re-checks: ``--lr must be a float in
(0, inf); got -1``.
"""
from __future__ import annotations

import math
import numbers
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Literal

import torch

from headcache.errors import ConfigError
from headcache.head import HEADS
from headcache.losses import LOSSES
from headcache.pooling import POOL_NAMES
from headcache.store import DTYPES

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NONE_TEXTS = ("none", "null", "")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp name -> autocast dtype
LAYER_WORDS = ("last", "mix")  # --layer's words; anything else is a layer id


# ------------------------------------------------------------------------------------------ constraints


class Constraint:
    """An allowed set of values: checks a value and describes itself, so check and message cannot drift."""

    def is_satisfied_by(self, value: Any) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError

    def invalid_value(self) -> Any:
        """A value this constraint refuses (the common tests generate their bad inputs from it)."""
        raise NotImplementedError

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The allowed values when they are a fixed list of names (the CLI shows and validates them)."""
        return None


class Interval(Constraint):
    """A number of ``type`` (`numbers.Integral` or `numbers.Real`) between ``low`` and ``high``
    (None: unbounded); ``closed`` says which ends belong to it. NaN and infinities never do; bools are
    not numbers here (``epochs=True`` is a mistake, not 1)."""

    def __init__(self, type: type, low: float | None, high: float | None, *,
                 closed: Literal["left", "right", "both", "neither"]):
        if type not in (numbers.Integral, numbers.Real):
            raise TypeError("Interval type must be numbers.Integral or numbers.Real")
        self.type, self.low, self.high, self.closed = type, low, high, closed

    def _closed_low(self) -> bool:
        return self.closed in ("left", "both")

    def _closed_high(self) -> bool:
        return self.closed in ("right", "both")

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.type) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self._closed_low())):
            return False
        return self.high is None or value < self.high or (value == self.high and self._closed_high())

    def __str__(self) -> str:
        kind = "an int" if self.type is numbers.Integral else "a float"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "[" if self._closed_low() and self.low is not None else "("
        right = "]" if self._closed_high() and self.high is not None else ")"
        return f"{kind} in {left}{low}, {high}{right}"

    def invalid_value(self) -> Any:
        if self.low is not None:
            return self.low - 1 if self._closed_low() else self.low
        return self.high + 1 if self._closed_high() else self.high


class Options(Constraint):
    """One of a fixed list of names (scikit-learn's StrOptions)."""

    def __init__(self, values: Iterable[str]):
        self.values = tuple(values)

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def __str__(self) -> str:
        return f"one of {', '.join(self.values)}"

    def invalid_value(self) -> Any:
        return "-".join(self.values) + "-unknown"

    @property
    def choices(self) -> tuple[str, ...]:
        return self.values


class Text(Constraint):
    """A non-empty string (a device, a split name: their meaning is checked where they are used)."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def __str__(self) -> str:
        return "a non-empty string"

    def invalid_value(self) -> Any:
        return ""


class Names(Constraint):
    """A non-empty tuple or list of distinct non-empty strings (e.g. split names)."""

    def is_satisfied_by(self, value: Any) -> bool:
        return (isinstance(value, (tuple, list)) and len(value) > 0 and len(set(value)) == len(value)
                and all(Text().is_satisfied_by(v) for v in value))

    def __str__(self) -> str:
        return "a non-empty list of distinct names"

    def invalid_value(self) -> Any:
        return ()


class Flag(Constraint):
    """True or False."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, bool)

    def __str__(self) -> str:
        return "true or false"

    def invalid_value(self) -> Any:
        return "yes"


class PrefixMap(Constraint):
    """A dict of checkpoint key prefix -> replacement (``--key-map OLD=NEW``)."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    def __str__(self) -> str:
        return "a dict of str prefixes to str replacements"

    def invalid_value(self) -> Any:
        return {"model.": 0}


class LayerText(Constraint):
    """``--layer``: "last", "mix" or a layer id as text (``"3"``, ``"-1"``); whether the cache has that id is
    checked against the cache (the feature source), not here."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and (value in LAYER_WORDS or re.fullmatch(r"-?[0-9]+", value) is not None)

    def __str__(self) -> str:
        return f"{', '.join(LAYER_WORDS)} or a layer id (an integer as text, e.g. 3)"

    def invalid_value(self) -> Any:
        return "first"


class OrNone(Constraint):
    """What ``inner`` allows, or None (the setting is unset and its documented default applies)."""

    def __init__(self, inner: Constraint):
        self.inner = inner

    def is_satisfied_by(self, value: Any) -> bool:
        return value is None or self.inner.is_satisfied_by(value)

    def __str__(self) -> str:
        return f"{self.inner} (or unset)"

    def invalid_value(self) -> Any:
        return self.inner.invalid_value()

    @property
    def choices(self) -> tuple[str, ...] | None:
        return self.inner.choices


def flag_name(name: str) -> str:
    """The command-line flag of a setting: ``weight_decay`` -> ``--weight-decay``."""
    return "--" + name.replace("_", "-")


def check_parameter(name: str, value: Any, constraint: Constraint) -> None:
    """Refuse a value outside its constraint with a message naming the flag, the allowed values and the value."""
    if not constraint.is_satisfied_by(value):
        raise ConfigError(f"{flag_name(name)} must be {constraint}; got {value!r}")


def setting(default: Any, constraint: Constraint, help: str, *, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with its constraint and help line (``parse``: how its text reads, when the field's
    type does not say it, as for ``memory_budget``'s ``4G``)."""
    return field(default=default, metadata={"constraint": constraint, "help": help, "parse": parse})


def check_settings(config: Any) -> None:
    """Check every setting of a config dataclass against its declared constraint."""
    for f in fields(config):
        check_parameter(f.name, getattr(config, f.name), f.metadata["constraint"])


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(the type a setting's text converts to, whether None is allowed), from the dataclass's type hints."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        return others[0], len(others) < len(args)
    return hint, False


def parse_text(cls: type, name: str, text: str) -> Any:
    """A setting's value from its text (``--grid lr=1e-3``, a sweep's values), converted by the field's type.

    ``none``, ``null`` or an empty text unset a setting that may be unset; a
    text that does not convert is refused with the setting's message.
    """
    spec = next(f for f in fields(cls) if f.name == name)
    kind, optional = field_type(cls, name)
    if optional and text.strip().lower() in _NONE_TEXTS:
        return None
    if spec.metadata["parse"] is not None:
        return spec.metadata["parse"](text)
    message = f"{flag_name(name)} must be {spec.metadata['constraint']}; got {text!r}"
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(message)
        return lowered in ("true", "1", "yes")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(message) from None
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in text.split(","))
    if kind is str:
        return text
    raise ConfigError(f"{flag_name(name)} cannot be given as text")


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


# ------------------------------------------------------------------------------------------ the configs

_POSITIVE_INT = Interval(numbers.Integral, 1, None, closed="left")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one head's training (never learned state)."""

    pool: str = setting("meanq", Options(POOL_NAMES), "Pool over the sequence axis.")
    head: str = setting("mlp", Options(HEADS), "Classification head.")
    loss: str | None = setting(None, OrNone(Options(LOSSES)), "Loss (unset: focal for two classes, else ce).")
    lr: float = setting(5e-4, Interval(numbers.Real, 0, None, closed="neither"), "AdamW learning rate.")
    weight_decay: float = setting(1e-3, Interval(numbers.Real, 0, None, closed="left"), "AdamW weight decay.")
    epochs: int = setting(50, _POSITIVE_INT, "Epochs; also the cosine schedule's T_max.")
    batch_size: int = setting(16, Interval(numbers.Integral, 2, None, closed="left"),
                              "Sequences per step (at least 2, for BatchNorm).")
    patience: int = setting(8, _POSITIVE_INT, "Epochs without val improvement before early stopping.")
    min_delta: float = setting(5e-4, Interval(numbers.Real, 0, None, closed="left"),
                               "Smallest val improvement that counts for early stopping.")
    grad_clip: float = setting(0.05, Interval(numbers.Real, 0, None, closed="neither"),
                               "Gradient norm clipping, per head.")
    dropout: float = setting(0.1, Interval(numbers.Real, 0, 1, closed="left"), "Dropout of the mlp head.")
    hidden: int | None = setting(None, OrNone(_POSITIVE_INT), "Width of the mlp head (unset: hidden_dim // 2).")
    layer: str = setting("last", LayerText(), "The layer heads read: a cached layer id, last, or mix (a learned "
                         "softmax over the cached layers; the learned pool: over the token layers).")
    focal_gamma: float = setting(3.0, Interval(numbers.Real, 0, None, closed="left"), "Gamma of the focal loss.")
    seed: int = setting(0, Interval(numbers.Integral, 0, None, closed="left"),
                        "Seed of initialisation, batch order and dropout.")
    device: str = setting("auto", Text(), "auto, cpu, cuda or cuda:N.")
    train_split: str = setting("train", Text(), "The cache split heads train on.")
    val_split: str | None = setting(None, OrNone(Text()), "The split for early stopping (unset: the cache's val "
                                    "or valid split).")
    test_split: str | None = setting("test", OrNone(Text()), "The split scored at the end (unset: none).")
    memory_budget: int | None = setting(None, OrNone(_POSITIVE_INT),
                                        "Memory the token cache may take on the device, e.g. 4G (unset: half of "
                                        "what is free); beyond it, tokens are streamed from the file.",
                                        parse=parse_bytes)

    def __post_init__(self) -> None:
        check_settings(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extraction."""

    splits: tuple[str, ...] | None = setting(None, OrNone(Names()),
                                             "Comma-separated splits (unset: all of the spec's).")
    batch_size: int = setting(64, _POSITIVE_INT, "Sequences per forward pass.")
    dtype: str = setting("float16", Options(DTYPES), "Storage dtype of the tokens.")
    device: str = setting("auto", Text(), "auto, cpu, cuda or cuda:N.")
    num_workers: int = setting(0, Interval(numbers.Integral, 0, None, closed="left"), "DataLoader worker processes.")
    amp: str | None = setting(None, OrNone(Options(AMP_DTYPES)), "Mixed precision on CUDA.")
    # None: detect the prefix rewrite (checkpoint.detect_key_map); a dict, even {}: exactly that map
    key_map: dict[str, str] | None = setting(None, OrNone(PrefixMap()),
                                             "Checkpoint key prefix rewrite OLD=NEW (repeatable; unset: detected).")
    trust_checkpoint: bool = setting(False, Flag(), "Allow full unpickling (only for files you trust).")
    overwrite: bool = setting(False, Flag(), "Replace an existing cache file.")
    write_block: int = setting(256, _POSITIVE_INT, "Sequences per HDF5 write.")
    token_layers: str = setting("last", Text(), "Layers whose per-token states are stored: last, all, or layer ids "
                                                "i,j (every layer's pooled vectors are stored anyway).")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class BenchConfig:
    """The bench's own settings (the head it trains is a TrainConfig)."""

    epochs: int = setting(3, _POSITIVE_INT, "Epochs timed on each path.")
    limit: int | None = setting(None, OrNone(_POSITIVE_INT), "Use only the first N items of each split (quicker).")
    dtype: str = setting("float16", Options(DTYPES), "Storage dtype of the cache; the live path rounds through it.")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation's own settings (the heads it trains are TrainConfigs)."""

    folds: int = setting(5, Interval(numbers.Integral, 2, None, closed="left"), "K of the stratified K-fold.")

    def __post_init__(self) -> None:
        check_settings(self)


def config_from_options(options: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from ``base`` with some settings changed; text values (``--grid lr=1e-3`` and friends)
    are converted by the field's type (`parse_text`), other values are taken as they are."""
    known = {f.name for f in fields(TrainConfig)}
    for key in options:
        if key.replace("-", "_") not in known:
            raise ConfigError(f"unknown train option {key!r}; known: {', '.join(sorted(known))}")
    return replace(base or TrainConfig(), **_converted(TrainConfig, options))


def config_from_values(cls: type, options: dict[str, Any]) -> Any:
    """A config of ``cls`` from given settings (the command line's), text converted as in `config_from_options`;
    the settings not given keep their declared defaults."""
    return cls(**_converted(cls, options))


def _converted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    converted = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        converted[name] = parse_text(cls, name, value) if isinstance(value, str) else value
    return converted
