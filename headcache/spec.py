"""The contract: how a user's backbone and data plug into headcache.

A *spec* is any object with these members (duck-typed, like a Dataset):

``backbone() -> nn.Module``
    The architecture, untrained. headcache loads the checkpoint into it
    through `checkpoint.load_checkpoint`, so every spec gets the same checks.
    A spec whose weights come another way (a Hugging Face folder, an exported
    program) may instead define ``load(checkpoint) -> module`` or
    ``-> (module, report)``: ``checkpoint`` is a file, a folder or None (the
    spec's default); ``report`` a LoadReport, a mapping or None. A ``load``
    that takes a keyword ``trust`` gets ``--trust-checkpoint`` there. headcache
    fingerprints the returned module itself and never calls ``backbone()``.
``dataset(split) -> Dataset``
    Items ``(inputs, label, id)``; ``inputs`` may be any structure of tensors.
    The dataset may define ``lengths() -> Sequence[int]`` (a cost per item,
    e.g. events) so that extraction can bucket items of similar length.
``collate(inputs: list) -> batch``
    Batches the ``inputs`` of several items (headcache keeps labels and ids).
``encode(backbone, batch) -> (hidden [B, T, D], mask [B, T] bool)``
    Which tensor counts as "the hidden states"; mask is True on real positions.

Optional: ``splits`` (default ``("train", "val", "test")``), ``num_classes``,
``class_names``, ``name``.

NOTE [ Padding invariance ]
``encode`` must give each sequence the same hidden states whatever else is in
its batch: the cache is written with one batch composition and the live
source (and production) run with others. Extraction checks this on a sample
and warns when it does not hold.

A spec is named on the command line by a built-in name (``demo``), a module
path (``mypkg.heads:make_spec``) or a file path (``path/to/file.py:make_spec``);
``resolve_spec`` turns that text and the ``--spec-opt`` pairs into the object.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

from headcache.backbones import BUILTIN_SPECS
from headcache.checkpoint import LoadReport, checkpoint_sha256, fingerprint, load_checkpoint
from headcache.errors import SpecError

DEFAULT_SPLITS = ("train", "val", "test")
REQUIRED_MEMBERS = ("dataset", "collate", "encode")


@runtime_checkable
class Spec(Protocol):
    """What headcache needs from a backbone and its data (see module docstring)."""

    def backbone(self) -> nn.Module: ...

    def dataset(self, split: str) -> Any: ...

    def collate(self, inputs: list) -> Any: ...

    def encode(self, backbone: nn.Module, batch: Any) -> tuple[Tensor, Tensor]: ...


def resolve_spec(text: str, options: dict[str, str] | None = None) -> Any:
    """Turn ``--spec`` text and its ``--spec-opt`` pairs into a spec object.

    Parameters
    ----------
    text : str
        A built-in name (``seqsetvae``, ``demo``), ``package.module:function``
        or ``path/to/file.py:function``.
    options : dict of str to str
        Keyword arguments for the factory (the ``--spec-opt key=value`` pairs).

    Raises
    ------
    SpecError
        The text names nothing importable, the factory refuses the options,
        or the object it returns lacks a required member.
    """
    options = dict(options or {})
    factory = _import_factory(text)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        accepted = _accepted_options(factory)
        raise SpecError(
            f"--spec {text}: options {sorted(options)} do not fit {factory.__name__}{accepted}; "
            "pass them as --spec-opt key=value with those names"
        ) from None
    spec = factory(**options)
    check_spec(spec, text)
    return spec


def check_spec(spec: Any, text: str = "spec") -> None:
    """Refuse an object that lacks a member of the contract, naming them all."""
    missing = [m for m in REQUIRED_MEMBERS if not callable(getattr(spec, m, None))]
    if not (callable(getattr(spec, "backbone", None)) or callable(getattr(spec, "load", None))):
        missing.insert(0, "backbone (or load)")
    if missing:
        raise SpecError(
            f"--spec {text}: the spec object has no {', '.join(missing)}; "
            "see headcache.spec for the contract"
        )


def spec_splits(spec: Any) -> tuple[str, ...]:
    return tuple(getattr(spec, "splits", DEFAULT_SPLITS))


def _import_factory(text: str):
    if text in BUILTIN_SPECS:
        text = BUILTIN_SPECS[text]
    elif ":" not in text:
        raise SpecError(
            f"--spec {text!r}: not a built-in spec ({', '.join(sorted(BUILTIN_SPECS))}); "
            "name your own as package.module:function or path/to/file.py:function"
        )
    target, _, attr = text.rpartition(":")
    if not target or not attr:
        raise SpecError(f"--spec {text!r}: expected package.module:function or path/to/file.py:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target), text)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise SpecError(
                f"--spec {text}: cannot import module {target!r} ({exc}); "
                "check the module path, or give a file as path/to/file.py:function"
            ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"--spec {text}: {target} has no function {attr!r}")
    return factory


def _import_file(path: Path, text: str):
    if not path.is_file():
        raise SpecError(f"--spec {text}: file {path} does not exist")
    name = f"headcache_user_spec_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise SpecError(f"--spec {text}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def _accepted_options(factory) -> str:
    params: Sequence[inspect.Parameter] = list(inspect.signature(factory).parameters.values())
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return f"({', '.join(names)})"


def load_backbone(spec: Any, checkpoint: str | Path | None, *, key_map: dict[str, str] | None = None,
                  trust: bool = False) -> tuple[nn.Module, LoadReport]:
    """The spec's backbone with verified weights, frozen and in eval mode.

    Uses the spec's own ``load`` when it has one (weights that come another
    way, see `load_from_spec`); otherwise builds ``spec.backbone()`` and loads
    the checkpoint through `load_checkpoint`, so every spec gets the same
    checks and load report.
    """
    if callable(getattr(spec, "load", None)):
        module, report = load_from_spec(spec, checkpoint, trust=trust)
    else:
        module = spec.backbone()
        report = load_checkpoint(module, checkpoint, key_map=key_map, trust=trust)
    module.eval().requires_grad_(False)
    return module, report


def load_from_spec(spec: Any, checkpoint: str | Path | None, *, trust: bool = False) -> tuple[nn.Module, LoadReport]:
    """Call ``spec.load(checkpoint)`` and build headcache's own LoadReport around what it returns.

    The spec's report (a LoadReport, a mapping or None) is kept as a JSON-able
    dict in ``spec_report``; the fingerprint is always computed here from the
    returned module, so a cache is tied to the weights that really ran, not to
    what a spec says about them.

    Raises
    ------
    SpecError
        ``load`` returned something other than a module or (module, report),
        or a report that is not JSON-able.
    """
    kwargs = {"trust": trust} if "trust" in inspect.signature(spec.load).parameters else {}
    result = spec.load(checkpoint, **kwargs)
    if isinstance(result, nn.Module):
        module, given = result, None
    elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        module, given = result
    else:
        raise SpecError(f"spec.load({checkpoint}) returned {type(result).__name__}; expected an nn.Module or "
                        "(nn.Module, report) with report a LoadReport, a mapping or None")
    if isinstance(given, LoadReport):
        given = given.to_dict()
    elif given is not None and not isinstance(given, Mapping):
        raise SpecError(f"spec.load({checkpoint}) returned a report of type {type(given).__name__}; expected a "
                        "LoadReport, a mapping or None")
    try:
        spec_report = json.loads(json.dumps(dict(given or {})))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"spec.load({checkpoint}) returned a report that is not JSON-able ({exc}); "
                        "give its values as str, numbers, lists or dicts") from None
    state = module.state_dict()
    tensors = [t for t in state.values() if isinstance(t, Tensor)]
    report = LoadReport(
        path="" if checkpoint is None else str(checkpoint),
        format="spec load()",
        loaded=len(tensors),
        values=sum(t.numel() for t in tensors),
        key_map={},
        unexpected=[],
        fingerprint=fingerprint(state),
        checkpoint_sha256="" if checkpoint is None else checkpoint_sha256(checkpoint),
        spec_report=spec_report,
    )
    return module, report
