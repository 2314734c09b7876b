"""The command line: parse flags, build a config, call one library function, print.

A `HeadcacheError` is caught once (in `_user_errors`): its message is printed
and the command exits with status 1; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import json
import signal
import threading
import time
import warnings
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from headcache.config import BenchConfig, CVConfig, ExtractConfig, TrainConfig, field_type
from headcache.errors import ConfigError, HeadcacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a frozen backbone once, cache its hidden states, train heads from the cache.")
# soft_wrap: rich never breaks a printed line itself, so a path in a message stays whole on one line when the
# output is a file or a pipe (rich assumes 80 columns there); a terminal still wraps long lines visually.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

# What an interrupted command kept and how to go on, by command (the one line Ctrl-C prints).
_INTERRUPTED = {
    "extract": "the rows written so far are kept in the cache; run the same command again to resume after them",
    "train": "the run directory has no metrics.json, so it is unfinished; run the same command again to start "
             "it over",
    "sweep": "runs without metrics.json are unfinished; run the same command again to train them",
    "cv": "folds without metrics.json are unfinished; run the same command again to train them",
}


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks of user errors.")) -> None:
    ctx.obj = {"debug": debug}


@contextlib.contextmanager
def _user_errors(ctx: typer.Context) -> Iterator[None]:
    """Print a HeadcacheError's message and exit 1; print warnings as one line each. Ctrl-C and SIGTERM
    stop the command with one line (the library's RunInterrupted says what was kept) and exit 128 + signal."""
    received: list[int] = []

    def terminate(signum: int, frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt  # the same clean-up path as Ctrl-C

    in_main = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = signal.signal(signal.SIGTERM, terminate) if in_main else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except HeadcacheError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            errors.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if str(exc):  # the library's RunInterrupted says what was kept, in its own words
                errors.print(escape(str(exc)), highlight=False)
            else:
                kept = _INTERRUPTED.get(ctx.info_name, "run the same command again to start over")
                errors.print(f"[bold yellow]interrupted:[/bold yellow] {escape(kept)}", highlight=False)
            raise typer.Exit(128 + (received[0] if received else signal.SIGINT)) from None
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
            for warning in caught:
                errors.print(f"[yellow]warning:[/yellow] {escape(str(warning.message))}", highlight=False)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        if key in pairs and pairs[key] != value:  # the later one would silently win
            raise ConfigError(f"{flag} {key} is given twice ({key}={pairs[key]} and {key}={value}); give it once")
        pairs[key] = value
    return pairs


# ------------------------------------------------------------------------------------------ options from configs


def config_options(cls: type, *, into: str, unset: bool = False, exclude: tuple[str, ...] = ()) -> Callable:
    """Add one option per setting of the config dataclass ``cls`` to a command: the one options builder.

    Each option's flag (``weight_decay`` -> ``--weight-decay``), type, choices,
    default and help come from the setting's declaration in config.py, so the
    command line restates nothing. The command receives the settings given as
    the dict ``into``; with ``unset`` every option defaults to "not given" (it
    is left out of the dict, so the config's default applies: sweep and cv
    options over a base TrainConfig). Typer reads the command's signature, so
    the options are added to it with `inspect.Signature`.
    """
    settings = [f for f in fields(cls) if f.name not in exclude]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {f.name: _plain(kwargs.pop(f.name)) for f in settings}
            if unset:
                given = {name: value for name, value in given.items() if value is not None}
            return command(*args, **kwargs, **{into: given})

        own = [p for p in signature.parameters.values() if p.name != into]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_option(cls, f, unset),
                                   annotation=_option_type(cls, f, unset)) for f in settings]
        wrapper.__signature__ = signature.replace(parameters=own + added)
        return wrapper

    return decorate


def _option_type(cls: type, setting: Field, unset: bool) -> Any:
    """The option's Python type for Typer: an Enum of the choices, the field's number type, else text
    (which the config parses, e.g. ``--memory-budget 4G`` or ``--splits train,val``)."""
    kind, optional = field_type(cls, setting.name)
    choices = setting.metadata["constraint"].choices
    if choices is not None:
        kind = enum.Enum(f"{cls.__name__}_{setting.name}", {c: c for c in choices}, type=str)
    elif setting.metadata["parse"] is not None or kind not in (bool, int, float):
        kind = str
    return Optional[kind] if optional or unset or setting.default is None else kind


def _option(cls: type, setting: Field, unset: bool) -> Any:
    flag = "--" + setting.name.replace("_", "-")
    help = setting.metadata["help"]
    if unset:
        shown = "unset" if setting.default is None else setting.default
        return typer.Option(None, flag, help=f"{help} Default: as for train ({shown}).", show_default=False)
    if setting.default is None:
        return typer.Option(None, flag, help=help, show_default=False)
    return typer.Option(setting.default, flag, help=help)


def _plain(value: Any) -> Any:
    """An option's value as the config takes it (an Enum choice as its name)."""
    return value.value if isinstance(value, enum.Enum) else value


def _key_map(items: Optional[list[str]]) -> Optional[dict[str, str]]:
    """--key-map items as a prefix map; none given: None, so the map is detected (checkpoint.detect_key_map)."""
    from headcache.checkpoint import parse_key_map

    return parse_key_map(items) if items else None


_KEY_MAP = typer.Option(None, "--key-map", help="Checkpoint key prefix rewrite OLD=NEW (repeatable; default: "
                        "detected from the checkpoint's keys).")


class _Rate(ProgressColumn):
    """Sequences per second written by this run (rows found done when resuming are not counted)."""

    def render(self, task) -> Text:
        done = task.completed - task.fields["resumed_at"]
        return Text(f"{done / task.elapsed:.1f} seq/s" if task.elapsed and done > 0 else "")


def _sizes(split_sizes: dict[str, int]) -> str:
    return ", ".join(f"{s} {n}" for s, n in split_sizes.items())


@contextlib.contextmanager
def _extract_hooks(show: bool = True) -> Iterator[dict]:
    """The on_load / on_progress callbacks of `extract`: print the load report, show a bar per split
    (nothing at all when not ``show``: the other ranks of a torchrun)."""
    if not show:
        yield {}
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, auto_refresh=False) as progress:
        bars: dict[str, int] = {}

        def on_progress(split: str, done: int, total: int) -> None:
            if split not in bars:
                bars[split] = progress.add_task(f"extract {split}", total=total, completed=done, resumed_at=done)
            progress.update(bars[split], completed=done, refresh=True)
            if done == total:
                progress.stop_task(bars[split])  # freezes its clock, so the rate stays this split's own

        def on_load(report) -> None:
            console.print(escape(report.summary()), highlight=False)

        yield {"on_progress": on_progress, "on_load": on_load}


@app.command("extract")
@config_options(ExtractConfig, into="settings", exclude=("key_map",))
def extract_command(
    ctx: typer.Context,
    spec: str = typer.Option(..., help="Built-in spec name, package.module:function or file.py:function."),
    checkpoint: Path = typer.Option(..., help="The backbone's weights (.ckpt, .pt, .safetensors)."),
    out: Path = typer.Option(..., help="The cache file to write (.h5)."),
    spec_opt: list[str] = typer.Option([], help="Option for the spec factory, key=value (repeatable)."),
    key_map: Optional[list[str]] = _KEY_MAP,
    plan: bool = typer.Option(False, "--plan", help="Estimate cache size, extraction time and break-even "
                              "from a small sample; print them and exit without writing."),
    shard: Optional[str] = typer.Option(None, help="I/N: extract part I of N into OUT.part-I-of-N beside --out "
                                        "(join the parts with headcache merge)."),
    keep_parts: bool = typer.Option(False, "--keep-parts", help="Under torchrun: keep the part files after the "
                                    "merge."),
    settings: dict = None,
) -> None:
    """Run the backbone once over the spec's splits and write the HDF5 cache (under torchrun: one shard per
    process, merged by rank 0)."""
    from headcache.config import config_from_values
    from headcache.distributed import parse_shard, torchrun_world
    from headcache.extract import extract, extract_distributed, extract_shard, plan_extraction

    with _user_errors(ctx):
        config = config_from_values(ExtractConfig, {**settings, "key_map": _key_map(key_map)})
        if plan:
            console.print(plan_extraction(spec, checkpoint, config, spec_options=_pairs(spec_opt, "--spec-opt"))
                          .summary(), highlight=False)
            return
        options = _pairs(spec_opt, "--spec-opt")
        world = torchrun_world()
        if shard is not None and world is not None:
            raise ConfigError("--shard: under torchrun every process takes its shard from its rank; leave --shard out")
        if world is not None:
            started = time.perf_counter()
            with _extract_hooks(show=world[0] == 0) as hooks:
                merged = extract_distributed(spec, checkpoint, out, config, spec_options=options,
                                             keep_parts=keep_parts, **hooks)
            if merged is not None:
                seconds = time.perf_counter() - started
                total = sum(merged.split_sizes.values())
                console.print(f"merged {len(merged.parts)} parts into {merged.path} ({_sizes(merged.split_sizes)}) "
                              f"in {seconds:.1f}s, {total / seconds:.1f} sequences/s over {world[1]} processes",
                              highlight=False)
            return
        with _extract_hooks() as hooks:
            if shard is not None:
                result = extract_shard(spec, checkpoint, out, config, parse_shard(shard), spec_options=options,
                                       **hooks)
                if result is None:
                    console.print(f"part {shard} of {out} is already complete; nothing to do", highlight=False)
                    return
            else:
                result = extract(spec, checkpoint, out, config, spec_options=options, **hooks)
        sizes = ", ".join(f"{s} {n}" for s, n in result.split_sizes.items())
        verb = "resumed and finished" if result.resumed else "wrote"
        console.print(f"{verb} {result.path} ({sizes}) in {result.seconds:.1f}s, "
                      f"{result.sequences_per_second:.1f} sequences/s", highlight=False)


@app.command("merge")
def merge_command(
    ctx: typer.Context,
    cache: Path = typer.Argument(..., help="The cache to write; its parts CACHE.part-I-of-N lie beside it."),
    keep_parts: bool = typer.Option(False, "--keep-parts", help="Keep the part files after the merge."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing CACHE."),
) -> None:
    """Join the parts written by extract --shard I/N into one cache, once all N are complete."""
    from headcache.distributed import merge_parts

    with _user_errors(ctx):
        result = merge_parts(cache, keep_parts=keep_parts, overwrite=overwrite)
        console.print(f"merged {len(result.parts)} parts into {result.path} ({_sizes(result.split_sizes)}) in "
                      f"{result.seconds:.1f}s" + ("" if keep_parts else "; removed the parts"), highlight=False)


# ------------------------------------------------------------------------------------------ inspect


@app.command("inspect")
def inspect_command(
    ctx: typer.Context,
    cache: Path = typer.Argument(..., help="A cache file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    verify: bool = typer.Option(False, "--verify", help="Read every dataset (checksums, validation); exit 1 if a "
                                "split is damaged."),
) -> None:
    """Show a cache's splits, sizes, dims, fingerprints and load report."""
    from headcache.store import CacheReader
    from headcache.store import verify as verify_cache

    with _user_errors(ctx):
        if verify:
            problems = verify_cache(cache)
            if as_json:
                console.print_json(json.dumps({"path": str(cache), "splits": problems}))
            else:
                for name, found in problems.items():
                    console.print(f"{name}: " + ("ok" if not found else "DAMAGED: " + "; ".join(found)),
                                  highlight=False)
            damaged = [name for name, found in problems.items() if found]
            if damaged:
                errors.print(f"[bold red]error:[/bold red] {cache}: damaged split(s) {', '.join(damaged)}",
                             highlight=False)
                raise typer.Exit(1)
            return
        with CacheReader(cache) as reader:
            summary = reader.summary()
        if as_json:
            console.print_json(json.dumps(summary, default=str))
            return
        for key in ("spec", "hidden_dim", "dtype", "amp", "num_classes", "backbone_fingerprint", "checkpoint_sha256",
                    "created_by"):
            console.print(f"[bold]{key}[/bold]: {summary.get(key)}", highlight=False)
        for key in ("layers", "token_layers"):  # pooled vectors of every layer; per-token states of the token layers
            console.print(f"[bold]{key}[/bold]: {', '.join(map(str, summary[key]))}", highlight=False)
        table = Table("split", "sequences", "tokens", "complete", "classes", "length min/mean/max")
        for name, split in summary["splits"].items():
            lengths = split["lengths"]
            shown = "-" if lengths["mean"] is None else f"{lengths['min']}/{lengths['mean']:.1f}/{lengths['max']}"
            table.add_row(name, str(split["n"]), str(split["tokens"]), str(split["complete"]),
                          str(split["class_counts"]), shown)
        console.print(table)
        report = summary.get("load_report") or {}
        console.print(f"load report: {report.get('loaded')} tensors loaded, {len(report.get('unexpected', []))} "
                      f"unexpected keys ignored, key map {report.get('key_map') or 'none'}", highlight=False)
        advice = _pool_advice(report)
        if advice:
            console.print(advice, highlight=False)


# ------------------------------------------------------------------------------------------ train


def _pool_advice(load_report: dict, pool: str | None = None) -> str | None:
    """What a cache's load report says about pooling: a sentence-transformers folder records the pool its
    model was trained for (``recommended_pool`` of the hf spec's report), which suits it far better than
    the seed's meanq. None when nothing is recorded, or when ``pool`` (the run's --pool) is that pool."""
    from headcache.pooling import POOL_NAMES

    recommended = (load_report.get("spec_report") or {}).get("recommended_pool")
    if not recommended or recommended == pool:
        return None
    hint = f"try --pool {recommended}" if recommended in POOL_NAMES else "headcache has no such pool"
    running = f"; this run uses --pool {pool}" if pool else ""
    return f"this model was trained for {recommended} pooling: {hint}{running}"


def _metrics_table(title: str, metrics: dict[str, dict]) -> Table:
    table = Table("split", "AUROC (95% CI)", "AUPRC (95% CI)", "accuracy", "F1", "balanced acc.", title=title)
    for split, m in metrics.items():
        table.add_row(split, _with_ci(m.get("auroc"), m.get("auroc_ci")), _with_ci(m.get("auprc"), m.get("auprc_ci")),
                      f"{m['accuracy']:.3f}", f"{m['f1']:.3f}", f"{m['balanced_accuracy']:.3f}")
    return table


def _with_ci(value, interval) -> str:
    if value is None:
        return "undefined (one class)"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"


def _epoch_printer(prefix: str = ""):
    def on_epoch(epoch: int, rows: list[dict]) -> None:
        row = rows[0]
        if row:
            console.print(f"{prefix}epoch {epoch:3d}  loss {row['train_loss']:.4f} / val {row['val_loss']:.4f}  "
                          f"val AUROC {row['val_auroc']:.4f}  lr {row['lr']:.1e}  {row['seconds']:.2f}s",
                          highlight=False)
    return on_epoch


@app.command("train")
@config_options(TrainConfig, into="settings")
def train_command(
    ctx: typer.Context,
    cache: Path = typer.Option(..., help="The cache file written by extract."),
    out: Path = typer.Option(..., help="The run directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a complete run directory (once the new run "
                                   "is complete; an unfinished one is replaced without it)."),
    quiet: bool = typer.Option(False, "--quiet", help="Do not print every epoch."),
    settings: dict = None,
) -> None:
    """Train one pooling + head from the cache and write its run directory."""
    from headcache.config import config_from_options
    from headcache.store import CacheReader
    from headcache.train import train

    with _user_errors(ctx):
        config = config_from_options(settings)
        with CacheReader(cache) as reader:
            advice = _pool_advice(reader.load_report, config.pool)
        if advice:
            warnings.warn(advice, UserWarning, stacklevel=1)
        result = train(cache, out, config, overwrite=overwrite, on_epoch=None if quiet else _epoch_printer())
        console.print(_metrics_table(f"best epoch {result.result.best_epoch} (of {result.result.epochs_run})",
                                     result.metrics))
        if result.result.layer_weights is not None:
            console.print(f"layer mix (softmax weight per layer): {_layer_weights(result.result.layer_weights)}",
                          highlight=False)
        console.print(f"run written to {result.run_dir} in {result.seconds:.1f}s", highlight=False)


# ------------------------------------------------------------------------------------------ demo


@app.command("demo")
def demo_command(
    ctx: typer.Context,
    out: Path = typer.Option(Path("cache/demo"), help="Folder for the demo's data, checkpoint, cache and run."),
    patients: int = typer.Option(1000, help="Synthetic patients to generate."),
    device: str = typer.Option("auto"),
    epochs: int = typer.Option(50),
    seed: int = typer.Option(0),
    bench: bool = typer.Option(True, help="End with a short bench (end to end against the cache)."),
) -> None:
    """Make demo data and a checkpoint in the seed's layout, extract, train (and bench); print a summary."""
    from headcache.demo import run_demo

    with _user_errors(ctx), _extract_hooks() as hooks:
        summary = run_demo(out, patients=patients, device=device, epochs=epochs, seed=seed, with_bench=bench,
                           on_stage=lambda stage: console.print(f"[bold]{stage}[/bold]", highlight=False),
                           on_epoch=_epoch_printer("  "), **hooks)
        console.print(_metrics_table("demo: seqsetvae backbone, meanq pool, mlp head", summary.metrics))
        if summary.bench is not None:
            console.print(_bench_table(summary.bench))
        table = Table("stage", "seconds")
        for stage, seconds in summary.seconds.items():
            table.add_row(stage, f"{seconds:.1f}")
        console.print(table)
        console.print(f"data {summary.data_dir}, checkpoint {summary.checkpoint}, cache {summary.cache}, "
                      f"run {summary.run_dir}", highlight=False)


# ------------------------------------------------------------------------------------------ bench


def _layer_weights(weights: dict[int, float]) -> str:
    return ", ".join(f"{layer}: {weight:.3f}" for layer, weight in weights.items())


def _bench_table(result) -> Table:
    """The measured and projected seconds of both paths, the ratios and the equivalence check."""
    table = Table("", "end to end", "cached", "ratio", title=f"bench: {result.spec}, {result.pool} pool, "
                  f"{result.head} head, {result.device}, {result.epochs} epochs timed each way")
    table.add_row("extraction (once)", "-", f"{result.extract_seconds:.1f}s", "")
    table.add_row("seconds per epoch", f"{result.epoch_seconds_end_to_end:.3f}s",
                  f"{result.epoch_seconds_cached:.3f}s", f"{result.speedup_per_epoch:.0f}x")
    for epochs in (10, 50, 100):
        end_to_end, cached = result.total_seconds(epochs)
        table.add_row(f"{epochs} epochs (projected)", f"{end_to_end:.0f}s", f"{cached:.0f}s",
                      f"{result.speedup_at(epochs):.1f}x")
    even = result.break_even_epochs
    table.add_row("break-even", "", f"{even} epoch{'s' if even != 1 else ''}" if even else "never", "")
    table.add_row("max |weight diff|, check run", "", f"{result.max_abs_weight_diff:.2g}",
                  f"tolerance {result.tolerance:g}")
    table.add_row("max |weight diff|, timed runs", "", f"{result.max_abs_weight_diff_timed_runs:.2g}",
                  "grows with steps")
    return table


@app.command("bench")
@config_options(BenchConfig, into="bench_settings")
@config_options(TrainConfig, into="settings", exclude=("epochs", "patience"))  # bench sets both
def bench_command(
    ctx: typer.Context,
    spec: str = typer.Option(..., help="Built-in spec name, package.module:function or file.py:function."),
    checkpoint: Path = typer.Option(..., help="The backbone's weights (.ckpt, .pt, .safetensors)."),
    spec_opt: list[str] = typer.Option([], help="Option for the spec factory, key=value (repeatable)."),
    out: Path = typer.Option(Path("cache/bench"), help="Folder for bench.json, bench.png and the cache."),
    key_map: Optional[list[str]] = _KEY_MAP,
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="Allow full unpickling (only for files you trust)."),
    settings: dict = None,
    bench_settings: dict = None,
) -> None:
    """Time end-to-end training against extraction + training from the cache, same head and batches."""
    from headcache.bench import bench
    from headcache.config import config_from_options, config_from_values

    with _user_errors(ctx):
        config = config_from_options(settings)
        own = config_from_values(BenchConfig, bench_settings)
        result = bench(spec, checkpoint, epochs=own.epochs, out=out, config=config,
                       spec_options=_pairs(spec_opt, "--spec-opt"), dtype=own.dtype, limit=own.limit,
                       key_map=_key_map(key_map), trust_checkpoint=trust_checkpoint,
                       on_stage=lambda stage: console.print(f"[bold]{stage}[/bold]", highlight=False))
        console.print(_bench_table(result))
        console.print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}", highlight=False)


# ------------------------------------------------------------------------------------------ export, predict


@app.command("export")
def export_command(
    ctx: typer.Context,
    spec: str = typer.Option(..., help="The spec the run's cache was extracted with."),
    checkpoint: Path = typer.Option(..., help="The backbone checkpoint that wrote the run's cache."),
    run: Path = typer.Option(..., help="A run directory (train or sweep)."),
    out: Path = typer.Option(..., help="The model file to write."),
    spec_opt: list[str] = typer.Option([], help="Option for the spec factory, key=value (repeatable)."),
    key_map: Optional[list[str]] = _KEY_MAP,
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="Allow full unpickling (only for files you trust)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model file."),
) -> None:
    """Write backbone + pool + the run's best head as one deployable model."""
    from headcache.export import export

    with _user_errors(ctx):
        result = export(spec, checkpoint, run, out, spec_options=_pairs(spec_opt, "--spec-opt"),
                        key_map=_key_map(key_map), trust=trust_checkpoint, overwrite=overwrite)
        console.print(f"wrote {result.path}: backbone {result.backbone_fingerprint[:12]}, head of epoch "
                      f"{result.head_epoch}", highlight=False)


@app.command("predict")
def predict_command(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="A model file written by export."),
    out: Path = typer.Option(..., help="The csv to write: id, label, p0..pC."),
    split: str = typer.Option("test", help="The spec's split to predict."),
    spec: Optional[str] = typer.Option(None, help="Default: the spec stored in the model."),
    spec_opt: list[str] = typer.Option([], help="Override a stored spec option, key=value (e.g. data=DIR)."),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(64),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing csv (once the new one is complete)."),
) -> None:
    """Predict a split of the spec's data with an exported model."""
    from headcache.export import predict

    with _user_errors(ctx):
        path = predict(model, split, out, spec=spec, spec_options=_pairs(spec_opt, "--spec-opt"), device=device,
                       batch_size=batch_size, overwrite=overwrite)
        console.print(f"wrote {path}", highlight=False)


# ------------------------------------------------------------------------------------------ sweep, cv

_GRID = typer.Option([], "--grid", help="KEY=V1,V2,... over any train option (repeatable).")
_SEEDS = typer.Option("0", help="Comma-separated seeds; every grid point is trained once per seed.")


def _grid(items: list[str]) -> dict[str, list[str]]:
    """--grid KEY=V1,V2 (repeatable) -> {KEY: [V1, V2]}; the library checks the keys and values."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid lr=1e-4,1e-3")
        if key.strip() in grid:
            raise ConfigError(f"--grid {key.strip()} is given twice; put all its values in one --grid")
        grid[key.strip()] = [value.strip() for value in values.split(",")]
    return grid


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None


def _interval(row: dict, prefix: str) -> str:
    """A metric and its 95% interval from a leaderboard row's <prefix>, <prefix>_ci_low/high columns."""
    if prefix not in row:
        return "-"
    low, high = row.get(f"{prefix}_ci_low"), row.get(f"{prefix}_ci_high")
    return _with_ci(row[prefix], None if low is None else [low, high])


def _mean_std(row: dict, prefix: str) -> str:
    mean, std = row.get(f"{prefix}_mean"), row.get(f"{prefix}_std")
    return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _bank_printer():
    """Per epoch of each bank: how many heads still train and the best val AUROC among them."""
    import math

    def on_epoch(epoch: int, rows: dict[str, dict]) -> None:
        scored = {name: row["val_auroc"] for name, row in rows.items() if not math.isnan(row["val_auroc"])}
        best = max(scored, key=scored.get) if scored else None
        console.print(f"epoch {epoch:3d}  {len(rows)} heads training" +
                      (f"  best val AUROC {scored[best]:.4f} ({best})" if best else ""), highlight=False)
    return on_epoch


@app.command("sweep")
@config_options(TrainConfig, into="settings", unset=True, exclude=("seed",))  # --seeds seeds the heads
def sweep_command(
    ctx: typer.Context,
    cache: Path = typer.Option(..., help="The cache file written by extract."),
    out: Path = typer.Option(..., help="The sweep directory to write."),
    grid: list[str] = _GRID,
    seeds: str = _SEEDS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a sweep directory that holds files."),
    quiet: bool = typer.Option(False, "--quiet", help="Do not print every epoch."),
    settings: dict = None,
) -> None:
    """Train a grid of heads (x seeds), those that can as one batched computation; print the leaderboard
    (under torchrun: the batched banks spread over the processes, rank 0 writes)."""
    from rich.table import Column

    from headcache.config import config_from_options
    from headcache.distributed import torchrun_ranks
    from headcache.sweep import sweep

    with _user_errors(ctx), torchrun_ranks() as ranks:
        base = config_from_options(settings)
        result = sweep(cache, out, _grid(grid), seeds=_seeds(seeds), base=base, overwrite=overwrite,
                       on_epoch=None if quiet else _bank_printer(), ranks=ranks)
        if result is None:  # another rank of a torchrun: rank 0 reports
            return
        table = Table("#", Column("run", overflow="fold"), "best epoch", "val AUROC (95% CI)", "val AUPRC (95% CI)",
                      "test AUROC (95% CI)", "test AUPRC (95% CI)",
                      title=f"{len(result.leaderboard)} heads, best val AUROC first")
        for rank, row in enumerate(result.leaderboard, 1):
            table.add_row(str(rank), row["run"], str(row["best_epoch"]), _interval(row, "val_auroc"),
                          _interval(row, "val_auprc"), _interval(row, "test_auroc"), _interval(row, "test_auprc"))
        console.print(table)
        console.print(f"{len(result.leaderboard)} heads trained in {len(result.banks)} batched "
                      f"bank{'s' if len(result.banks) != 1 else ''} in {result.seconds:.1f}s; wrote {result.out} "
                      "(leaderboard.csv, leaderboard.json, sweep.png, best_config.json, runs/)", highlight=False)


@app.command("cv")
@config_options(CVConfig, into="cv_settings")
# --seeds seeds the heads; the folds take the place of the train and val splits
@config_options(TrainConfig, into="settings", unset=True, exclude=("seed", "train_split", "val_split"))
def cv_command(
    ctx: typer.Context,
    cache: Path = typer.Option(..., help="The cache file written by extract."),
    out: Path = typer.Option(..., help="The cross-validation directory to write."),
    splits: Optional[str] = typer.Option(None, help="Comma-separated splits joined and cut into folds "
                                         "(default: the train split and the cache's val split)."),
    grid: list[str] = _GRID,
    seeds: str = typer.Option("0", help="Comma-separated seeds; each cuts its own folds (repeated K-fold)."),
    refit: bool = typer.Option(False, "--refit",
                               help="Also train on all folds for the mean best epoch count; score on test."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a directory that holds files."),
    quiet: bool = typer.Option(False, "--quiet", help="Do not print every epoch."),
    settings: dict = None,
    cv_settings: dict = None,
) -> None:
    """Stratified K-fold cross-validation, all folds as one batched computation; print mean ± std and CIs."""
    from rich.table import Column

    from headcache.config import config_from_options, config_from_values
    from headcache.cv import cross_validate

    with _user_errors(ctx):
        base = config_from_options(settings)
        folds = config_from_values(CVConfig, cv_settings).folds
        result = cross_validate(cache, out, folds=folds, splits=splits.split(",") if splits else None, base=base,
                                grid=_grid(grid), seeds=_seeds(seeds), refit=refit, overwrite=overwrite,
                                on_epoch=None if quiet else _bank_printer())
        columns = [Column("config", overflow="fold"), "seed", "val AUROC (mean ± std)", "val AUPRC (mean ± std)",
                   "out-of-fold AUROC (95% CI)", "out-of-fold AUPRC (95% CI)", "test AUROC (mean ± std)"]
        table = Table(*columns + (["refit test AUROC (95% CI)", "refit test AUPRC (95% CI)"] if refit else []),
                      title=f"{folds}-fold cv on {result.joined}, best mean val AUROC first")
        for row in result.summary:
            cells = [row["config"], str(row["seed"]), _mean_std(row, "val_auroc"), _mean_std(row, "val_auprc"),
                     _interval(row, "oof_auroc"), _interval(row, "oof_auprc"), _mean_std(row, "test_auroc")]
            table.add_row(*cells + ([_interval(row, "refit_test_auroc"), _interval(row, "refit_test_auprc")]
                                    if refit else []))
        console.print(table)
        console.print(f"{len(result.folds)} fold heads trained in {len(result.banks)} batched "
                      f"bank{'s' if len(result.banks) != 1 else ''} in {result.seconds:.1f}s; wrote {result.out} "
                      "(cv_summary.csv, cv_folds.csv, oof.csv, cv.png, best_config.json, runs/)", highlight=False)


def main() -> None:
    app()
