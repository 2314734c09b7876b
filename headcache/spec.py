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
    ``[B, L, T, D]`` only for a spec that names its L layers in ``layers``.

A member that breaks this contract gets a SpecError naming it: what encode
returned is checked (`check_encode_output`), and an exception raised inside
a member is named after it (`spec_member`), the original chained.

Optional: ``splits`` (default ``("train", "val", "test")``), ``num_classes``,
``class_names``, ``name``.

NOTE [ Padding invariance ]
``encode`` must give each sequence the same hidden states whatever else is in
its batch: the cache is written with one batch composition and the live
source (and production) run with others. Extraction checks this on a sample
and warns when it does not hold, within a tolerance relative to the states'
magnitude (extract.PADDING_TOLERANCE).

A spec is named on the command line by a built-in name (``demo``), a module
path (``mypkg.heads:make_spec``) or a file path (``path/to/file.py:make_spec``);
``resolve_spec`` turns that text and the ``--spec-opt`` pairs into the object.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

from headcache.backbones import BUILTIN_SPECS
from headcache.checkpoint import LoadReport, checkpoint_sha256, fingerprint, load_checkpoint
from headcache.errors import CheckpointError, HeadcacheError, SpecError
from headcache.store import SINGLE_LAYER

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
    _check_options(factory, options, text)
    try:
        spec = factory(**options)
    except HeadcacheError:
        raise  # the factory's own message already names the option and the fix
    except Exception as exc:
        given = " ".join(f"--spec-opt {key}={value}" for key, value in options.items()) or "no --spec-opt"
        raise SpecError(
            f"--spec {text}: the factory {factory.__name__} raised {type(exc).__name__}: {exc} (called with "
            f"{given}); check those values, or fix the factory"
        ) from exc
    check_spec(spec, text)
    return spec


def _check_options(factory: Callable, options: dict[str, str], text: str) -> None:
    """Refuse --spec-opt names the factory does not take, or a required one left out, before calling it."""
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        params = inspect.signature(factory).parameters.values()
        required = [p.name for p in params if p.default is p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in options]
        missing = f"; it needs {' '.join(f'--spec-opt {name}=VALUE' for name in required)}" if required else ""
        raise SpecError(
            f"--spec {text}: options {sorted(options)} do not fit {factory.__name__}{_accepted_options(factory)}"
            f"{missing}; pass them as --spec-opt key=value with those names"
        ) from None


@contextlib.contextmanager
def spec_member(member: str, where: str = "") -> Iterator[None]:
    """Turn an exception raised inside a spec's ``member`` into a SpecError naming it.

    A HeadcacheError raised by the member (a DataError naming a file, say) is
    the spec's own message and passes through unchanged; anything else is a
    bug or a broken input that the user must find in their own code, so the
    message names the member, where it was called and the original exception,
    which stays chained (``--debug`` shows its traceback).
    """
    try:
        yield
    except HeadcacheError:
        raise
    except Exception as exc:
        at = f" ({where})" if where else ""
        raise SpecError(f"spec.{member}{at} raised {type(exc).__name__}: {exc}; "
                        f"fix the spec's {member} (--debug shows the traceback)") from exc


def check_encode_output(output: Any, *, batch_size: int | None, layers: Sequence[int] | None = None
                        ) -> tuple[Tensor, Tensor]:
    """Check what ``spec.encode`` returned against the contract; return ``(hidden, mask)``.

    Parameters
    ----------
    output : object
        What encode returned: must be a 2-tuple ``(hidden, mask)``.
    batch_size : int or None
        Items in the batch given to encode (B); None where the caller does not know it (any B).
    layers : sequence of int, optional
        The spec's ``layers``; only then may hidden be 4-D ``[B, L, T, D]``
        with ``L == len(layers)``.

    Raises
    ------
    SpecError
        Naming encode, what it returned and what was expected.
    """
    several = bool(layers) and len(layers) > 1  # then one state per layer: [B, T, D] would lose the layer axis
    hidden_shape = "[B, T, D]" if not layers else f"[B, {len(layers)}, T, D] (one per spec.layers)" if several else \
        "[B, T, D] or [B, 1, T, D] (spec.layers names one)"
    expected = f"expected (hidden {hidden_shape} float tensor, mask [B, T] bool tensor)" + (
        f" with B={batch_size}" if batch_size is not None else "")

    def refuse(got: str) -> SpecError:
        return SpecError(f"spec.encode returned {got}; {expected}")

    if not isinstance(output, (tuple, list)) or len(output) != 2:
        size = f" of {len(output)}" if isinstance(output, (tuple, list)) else ""
        raise refuse(f"{type(output).__name__}{size}")
    hidden, mask = output
    if not isinstance(hidden, Tensor) or not isinstance(mask, Tensor):
        raise refuse(f"({type(hidden).__name__}, {type(mask).__name__})")
    got = f"hidden {list(hidden.shape)} {str(hidden.dtype).removeprefix('torch.')} and mask {list(mask.shape)}"
    ndim_ok = (hidden.ndim == 3 and not several) or (hidden.ndim == 4 and bool(layers) and hidden.shape[1] == len(layers))
    if not ndim_ok or not hidden.is_floating_point() or batch_size not in (None, hidden.shape[0]):
        raise refuse(got)
    if mask.shape != (hidden.shape[0], hidden.shape[-2]) or mask.is_complex():
        raise refuse(got)
    return hidden, mask


def encode_checked(spec: Any, backbone: nn.Module, batch: Any, *, batch_size: int | None) -> tuple[Tensor, Tensor]:
    """``spec.encode(backbone, batch)``, its errors naming the member (`spec_member`) and its output checked
    against the contract (`check_encode_output`): how extraction, the live source and the exported model
    all call it."""
    where = f"a batch of {batch_size}" if batch_size is not None else "a batch"
    with spec_member("encode", where):
        output = spec.encode(backbone, batch)
    return check_encode_output(output, batch_size=batch_size, layers=getattr(spec, "layers", None))


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
    _check_finite(module, checkpoint)
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


def _check_finite(module: nn.Module, checkpoint: str | Path | None) -> None:
    """Refuse weights holding NaN or Inf when they are loaded.

    Otherwise every sequence's states come out NaN and extraction blames the
    first sequence's inputs, far from the cause.
    """
    broken = [name for name, tensor in module.state_dict().items()
              if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if broken:
        shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise CheckpointError(f"checkpoint {checkpoint}: tensor(s) {shown} hold NaN or Inf values; the weights are "
                              "damaged (or saved from a diverged run): use another checkpoint")


def spec_layers(spec: Any) -> list[int]:
    """The layer ids of a spec's hidden states: its ``layers``, or one layer (`SINGLE_LAYER`)."""
    layers = getattr(spec, "layers", None)
    if layers is None:
        return [SINGLE_LAYER]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise SpecError(f"spec.layers must be a list of distinct integer layer ids, got {layers!r}")
    layers = list(layers)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers) \
            or len(set(layers)) != len(layers):
        raise SpecError(f"spec.layers must be a non-empty list of distinct integer layer ids, got {layers!r}")
    return layers
