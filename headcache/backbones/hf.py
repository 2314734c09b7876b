"""Built-in spec ``hf``: a local Hugging Face model folder and a table of texts, no code written.

``headcache extract --spec hf --checkpoint MODEL_FOLDER --spec-opt data=FILE_OR_DIR --out c.h5``

The model is read from the folder only (``local_files_only``: never a hub,
whatever the environment says) through AutoModel and AutoTokenizer; code
shipped inside the folder runs only with ``--spec-opt trust_remote_code=true``.
A sentence-transformers folder (``modules.json``) works as it is: its
Transformer module's folder is the model, and its pooling mode is kept as
``recommended_pool`` (the seed's meanq pool is far worse on such models).

Weights are verified like any checkpoint (see checkpoint.py): every tensor of
the model must come from the folder's weight files, after transformers' own
base-model prefix stripping; a tensor transformers would initialise at random
is an error naming it, not a warning. Keys the model does not use (an MLM
head, a pooler of another class) are listed in the load report. The one
exception is a pooler missing from the weights: ``last_hidden_state`` never
reads it, so it is removed from the model (and said so in the report) rather
than left at random.

Data: CSV, TSV, JSONL or Parquet. ``data=FILE`` with the split column gives one
split per value; without it, one split named after the file's stem;
``data=DIR`` gives one split per file. A file without the label column (or a
row with an empty label) is unlabelled. Labels, integers or strings, map to
classes in sorted order. Texts are tokenized once per split, which also gives
`HFDataset.lengths` for length buckets.

NOTE [ hf layer ids ]
``--spec-opt layers=last|all|i,j,...`` picks the hidden states ``encode``
returns. Ids index transformers' ``hidden_states`` (n + 1 of them for a model
of n = ``config.num_hidden_layers`` layers): 0 is the embeddings' output, i the
output of layer i, and negative indexes count from the end (-1 = n). Id n is
always ``last_hidden_state``, the model's own output after any final norm, and
what a sentence-transformers folder pools. transformers gives that same tensor
as the last of ``hidden_states`` for BERT-like models and most others, while a
few keep the state before their final norm there (ModernBERT in transformers 4,
models with ``tie_last_hidden_states=False`` in 5); headcache takes
``last_hidden_state`` for id n in every case, so one id is one tensor whichever
layers a cache holds, and ids 0..n-1 are ``hidden_states[i]``. ``last`` (the
default) is [n], exactly the tensor a cache held before layers existed, and
runs the model without ``output_hidden_states``; ``all`` is 0..n. Ids are
resolved once the folder's config is read (`HFSpec.load`): out-of-range,
repeated and non-integer values are refused there, naming the option.
"""
from __future__ import annotations

import contextlib
import csv
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from headcache.errors import CheckpointError, ConfigError, DataError, SpecError

DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
# Weight files transformers reads from a folder, in the order it prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Any one of these lets AutoTokenizer build a tokenizer from the folder.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
MAX_LENGTH_CAP = 512  # the default max_length: the tokenizer's model_max_length, at most this
# Order of well-known split names (other names follow in order of appearance).
SPLIT_ORDER = ("train", "val", "valid", "validation", "dev", "test")
# sentence-transformers pooling modes -> headcache pool names (or words, where headcache has none).
ST_POOLING = {"mean": "mean", "mean_tokens": "mean", "cls": "first token", "cls_token": "first token",
              "max": "max", "max_tokens": "max", "lasttoken": "last", "mean_sqrt_len_tokens": "mean / sqrt(length)",
              "weightedmean": "position-weighted mean", "weightedmean_tokens": "position-weighted mean"}
_INTEGER = re.compile(r"-?\d+")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass
class _Row:
    text: str
    pair: str | None
    label: Any  # the file's value, None when unlabelled
    id: str


def make_spec(data: str, text_column: str = "text", text_pair_column: str | None = None,
              label_column: str = "label", id_column: str = "id", split_column: str = "split",
              max_length: str | None = None, layers: str = "last", trust_remote_code: str = "false") -> "HFSpec":
    """The ``hf`` spec over the table(s) at ``data`` (``--spec-opt key=value`` options).

    Parameters
    ----------
    data : str
        A CSV, TSV, JSONL or Parquet file, or a folder of them (one split per file).
    text_column, text_pair_column : str
        The text (and, for pairs, the second text) of each row.
    label_column, id_column, split_column : str
        Where each row's label, id and split are (each optional in the file).
    max_length : str, optional
        Tokens per text; default the tokenizer's model_max_length, at most 512
        (a sentence-transformers folder: its max_seq_length).
    layers : str
        ``last`` (default), ``all`` or indexes ``i,j,...`` into the model's
        hidden states (NOTE [ hf layer ids ]); checked against the model in `HFSpec.load`.
    trust_remote_code : str
        ``true`` lets code shipped in the model folder run.

    Raises
    ------
    SpecError
        transformers is not installed.
    DataError
        ``data`` is missing, or a file lacks the text column or has duplicate ids.
    ConfigError
        ``max_length``, ``layers`` or ``trust_remote_code`` is not a valid value.
    """
    _require_transformers()
    if max_length is not None and not (_INTEGER.fullmatch(str(max_length)) and int(max_length) >= 1):
        raise ConfigError(f"--spec-opt max_length={max_length}: expected an integer >= 1")
    if str(trust_remote_code).lower() not in _TRUE + _FALSE:
        raise ConfigError(f"--spec-opt trust_remote_code={trust_remote_code}: expected true or false")
    choice = parse_layers(layers)
    splits = read_splits(Path(data), text_column=text_column, text_pair_column=text_pair_column,
                         label_column=label_column, id_column=id_column, split_column=split_column)
    return HFSpec(splits, max_length=None if max_length is None else int(max_length),
                  trust_remote_code=str(trust_remote_code).lower() in _TRUE, layers=choice, layers_text=str(layers))


def parse_layers(text: str) -> str | tuple[int, ...]:
    """``--spec-opt layers`` text as ``"last"``, ``"all"`` or the indexes it lists (not yet resolved).

    Raises
    ------
    ConfigError
        The text is none of those, or lists an index twice.
    """
    text = str(text).strip()
    if text.lower() in ("last", "all"):
        return text.lower()
    items = [item.strip() for item in text.split(",")]
    if not all(_INTEGER.fullmatch(item) for item in items):
        raise ConfigError(f"--spec-opt layers={text}: expected last, all or comma-separated layer indexes "
                          "(integers, e.g. layers=0,-1)")
    indexes = tuple(int(item) for item in items)
    repeated = sorted({i for i in indexes if indexes.count(i) > 1})
    if repeated:
        raise ConfigError(f"--spec-opt layers={text}: layer {repeated[0]} is given twice; name each layer once")
    return indexes


def resolve_layers(choice: str | tuple[int, ...], count: int, text: str, meaning: str) -> list[int]:
    """Non-negative ids in ``0..count-1`` for a `parse_layers` choice, in the order given.

    Parameters
    ----------
    choice : "last", "all" or tuple of int
        As `parse_layers` returns it; negative indexes count from the end (-1 = count - 1).
    count : int
        How many hidden states the model has.
    text : str
        The option's text, for the messages.
    meaning : str
        What the ids are, for the messages (e.g. "0 = the embeddings, 2 = the last layer").

    Raises
    ------
    ConfigError
        An index outside ``-count..count-1``, or two indexes naming one layer.
    """
    if choice == "last":
        return [count - 1]
    if choice == "all":
        return list(range(count))
    outside = [i for i in choice if not -count <= i < count]
    if outside:
        raise ConfigError(f"--spec-opt layers={text}: layer {outside[0]} is out of range: this model has layers "
                          f"0..{count - 1} ({meaning}), or -{count}..-1 counting from the end")
    ids = [i % count for i in choice]
    for position, i in enumerate(ids):
        if i in ids[:position]:
            raise ConfigError(f"--spec-opt layers={text}: {choice[ids.index(i)]} and {choice[position]} are both "
                              f"layer {i} (negative indexes count from the end, -1 = {count - 1}); name each layer "
                              "once")
    return ids


class HFSpec:
    """A Hugging Face folder's hidden states over rows of text (see the module docstring).

    Attributes
    ----------
    splits : tuple of str
        The splits found in the data.
    num_classes, class_names :
        Classes over every labelled row, in sorted order; None when nothing is labelled.
    max_length : int or None
        Tokens per text (set by `load` when not given as an option).
    truncated : dict of str to int
        Texts cut at ``max_length``, per split (set by `load`).
    recommended_pool : str or None
        A sentence-transformers folder's own pooling (``"mean"``, ...); None otherwise.
    layers : list of int or None
        The hidden states ``encode`` returns, as ids (NOTE [ hf layer ids ]); set by
        `load`. None for ``layers=last`` on a model whose config has no
        ``num_hidden_layers``: one unnumbered layer, its ``last_hidden_state``.
    """

    name = "hf"

    def __init__(self, rows: dict[str, list[_Row]], *, max_length: int | None, trust_remote_code: bool,
                 layers: str | tuple[int, ...] = "last", layers_text: str = "last"):
        self._rows = rows
        self.splits = tuple(rows)
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        labels = {row.label for split_rows in rows.values() for row in split_rows if row.label is not None}
        # integers sort as numbers (so 10 follows 9); any text among them sorts them all as text
        classes = sorted(labels) if all(isinstance(v, int) for v in labels) else sorted(labels, key=str)
        self._class_of = {value: c for c, value in enumerate(classes)}
        self.class_names = [str(v) for v in classes] or None
        self.num_classes = len(classes) or None
        self.truncated: dict[str, int] = {}
        self.recommended_pool: str | None = None
        self._tokenizer = None
        self._encoded: dict[str, dict[str, list[list[int]]]] = {}
        self._pad_id = 0
        self._layer_choice, self._layer_text = layers, layers_text
        self._layers: list[int] | None = None
        self._last: int | None = None  # the id of last_hidden_state (num_hidden_layers)
        self._loaded = False

    @property
    def layers(self) -> list[int] | None:
        """The layer ids ``encode`` returns (NOTE [ hf layer ids ]), known once `load` has read the config."""
        if not self._loaded:
            raise SpecError("hf: layers are known after load(checkpoint): they index the model's hidden states")
        return None if self._layers is None else list(self._layers)

    # -- the backbone

    def load(self, checkpoint: str | Path | None) -> tuple[nn.Module, dict]:
        """AutoModel from the folder, every tensor verified; the tokenizer; each split tokenized once.

        Returns
        -------
        module : nn.Module
            The model (float32); ``encode`` takes its hidden states of ``layers``.
        report : dict
            Model class and folder, unexpected keys, max_length, truncated texts per
            split, class names, the recommended pool.

        Raises
        ------
        CheckpointError
            No folder, or config.json / weights / tokenizer files missing (named), a
            model tensor the weights lack (named), or code in the folder without
            trust_remote_code.
        ConfigError
            ``--spec-opt layers`` names a layer this model lacks, or one twice
            (NOTE [ hf layer ids ]); `layers` is resolved here.
        """
        if checkpoint is None:
            raise CheckpointError("--checkpoint: the hf spec needs a local Hugging Face model folder")
        folder = Path(checkpoint)
        if not folder.is_dir():
            raise CheckpointError(f"--checkpoint {folder} is not a folder; the hf spec reads a local Hugging Face "
                                  "model folder (config.json, model.safetensors, tokenizer files)")
        model_dir, pooling, st_max_length = _sentence_transformers_layout(folder)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"{model_dir / 'config.json'} does not exist: a Hugging Face model folder needs "
                                  "its config.json (save the model with save_pretrained)")
        weights = next((model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{model_dir / WEIGHT_FILES[0]} does not exist (nor {', '.join(WEIGHT_FILES[1:])}): "
                                  "the folder has no weights; save the model with save_pretrained")
        if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(f"{model_dir / TOKENIZER_FILES[0]} does not exist (nor {', '.join(TOKENIZER_FILES[1:])}):"
                                  " the folder has no tokenizer; save the tokenizer with save_pretrained there")
        self._check_remote_code(model_dir / "config.json")
        model, loading_info = self._from_pretrained(model_dir)
        self._resolve_layers(model, model_dir / "config.json")
        report: dict[str, Any] = {"model_class": type(model).__name__, "model_folder": str(model_dir),
                                  "weights": weights.name}
        report.update(_verify_weights(model, loading_info, weights))
        self._tokenizer = self._tokenizer_from(model_dir)
        self._pad_id = next((i for i in (self._tokenizer.pad_token_id, self._tokenizer.eos_token_id) if i is not None),
                            0)  # padding is masked out, so any id serves when the tokenizer names none
        if self.max_length is None:
            self.max_length = st_max_length or min(int(self._tokenizer.model_max_length), MAX_LENGTH_CAP)
        for split, rows in self._rows.items():
            self._encoded[split], self.truncated[split] = self._tokenize(rows)
        self.recommended_pool = pooling
        report.update({"max_length": self.max_length, "truncated": dict(self.truncated)})
        if self.class_names:
            report["class_names"] = self.class_names
        if pooling:
            report["recommended_pool"] = pooling
        return model, report

    def _resolve_layers(self, model: nn.Module, config_file: Path) -> None:
        """The ``layers`` option as ids 0..num_hidden_layers of this model (NOTE [ hf layer ids ]).

        Raises
        ------
        ConfigError
            An index out of range or repeated, or a choice other than ``last`` for a
            model whose config does not say how many layers it has.
        """
        count = getattr(model.config, "num_hidden_layers", None)
        if not isinstance(count, int):
            if self._layer_choice != "last":
                raise ConfigError(f"--spec-opt layers={self._layer_text}: {config_file} has no num_hidden_layers, "
                                  "so its hidden states cannot be numbered; use layers=last (last_hidden_state)")
            self._layers, self._last = None, None
        else:
            meaning = f"0 = the embeddings, {count} = last_hidden_state, the last layer's output"
            self._layers = resolve_layers(self._layer_choice, count + 1, self._layer_text, meaning)
            self._last = count
        self._loaded = True

    def _check_remote_code(self, config_file: Path) -> None:
        """Refuse, up front, a model whose class exists only as code in the folder (unless trusted).

        Checked here rather than left to transformers, whose answer depends on
        its version: such code would run on this machine as it is imported.
        """
        from transformers import CONFIG_MAPPING

        try:
            config = json.loads(config_file.read_text())
        except ValueError:
            raise CheckpointError(f"{config_file} is not JSON; save the model with save_pretrained") from None
        needs_code = "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING
        if needs_code and not self.trust_remote_code:
            raise CheckpointError(f"{config_file}: model type {config.get('model_type')!r} exists only as code in "
                                  "the folder (auto_map); pass --spec-opt trust_remote_code=true for a folder you "
                                  "trust (that code runs on this machine)")

    def _from_pretrained(self, model_dir: Path) -> tuple[nn.Module, dict]:
        from transformers import AutoModel

        try:
            with _quiet_transformers():
                return AutoModel.from_pretrained(str(model_dir.resolve()), local_files_only=True,
                                                 trust_remote_code=self.trust_remote_code, dtype=torch.float32,
                                                 output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{model_dir}: transformers cannot load the model: {_first_line(exc)}") from exc

    def _tokenizer_from(self, model_dir: Path):
        from transformers import AutoTokenizer

        try:
            with _quiet_transformers():
                return AutoTokenizer.from_pretrained(str(model_dir.resolve()), local_files_only=True,
                                                     trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{model_dir}: transformers cannot load the tokenizer: {_first_line(exc)}") from exc

    def _tokenize(self, rows: list[_Row]) -> tuple[dict[str, list[list[int]]], int]:
        """One tokenizer pass over a split, and how many texts ``max_length`` cut."""
        texts = [r.text for r in rows]
        pairs = [r.pair for r in rows] if any(r.pair is not None for r in rows) else None
        encoded = self._tokenizer(texts, pairs, truncation=True, max_length=self.max_length,
                                  return_attention_mask=False)
        full = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) == self.max_length]
        truncated = 0
        if full:  # only a text that fills max_length can have been cut: tokenize those again, uncut
            again = self._tokenizer([texts[i] for i in full], [pairs[i] for i in full] if pairs else None,
                                    truncation=False, return_attention_mask=False, verbose=False)
            truncated = sum(len(ids) > self.max_length for ids in again["input_ids"])
        return {key: list(values) for key, values in encoded.items()}, truncated

    # -- the data

    def dataset(self, split: str) -> "HFDataset":
        if split not in self._rows:
            raise DataError(f"the hf data has no split {split!r}; it has {', '.join(self.splits)}")
        if split not in self._encoded:
            raise SpecError("hf: dataset() needs load(checkpoint) first; the tokenizer comes from the model folder")
        labels = [None if r.label is None else self._class_of[r.label] for r in self._rows[split]]
        return HFDataset(self._encoded[split], labels, [r.id for r in self._rows[split]])

    def collate(self, inputs: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        """Right-pad to the longest item: with the attention mask, real positions never see padding."""
        width = max(len(item["input_ids"]) for item in inputs)
        batch = {key: torch.full((len(inputs), width), self._pad_id if key == "input_ids" else 0, dtype=torch.long)
                 for key in inputs[0]}
        batch["attention_mask"] = torch.zeros(len(inputs), width, dtype=torch.long)
        for b, item in enumerate(inputs):
            n = len(item["input_ids"])
            for key, values in item.items():
                batch[key][b, :n] = torch.tensor(values, dtype=torch.long)
            batch["attention_mask"][b, :n] = 1
        return batch

    def encode(self, backbone: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The hidden states of ``layers``: [B, T, D] for one layer, else [B, L, T, D] in ``layers`` order.

        Only a layer other than the last asks the model for every hidden state
        (``output_hidden_states``); the last alone is the call encode has always
        made. Id n is ``last_hidden_state`` itself (NOTE [ hf layer ids ]).

        Raises
        ------
        SpecError
            The model returned a number of hidden states other than its config's
            num_hidden_layers + 1, so the ids would name the wrong layers.
        """
        mask = batch["attention_mask"].bool()
        layers = self.layers
        wanted = [self._last] if layers is None else layers
        everything = any(i != self._last for i in wanted)
        if not everything:
            return backbone(**batch, return_dict=True).last_hidden_state, mask
        out = backbone(**batch, output_hidden_states=True, return_dict=True)
        if len(out.hidden_states) != self._last + 1:
            raise SpecError(f"hf: {type(backbone).__name__} returned {len(out.hidden_states)} hidden states, but its "
                            f"config's num_hidden_layers is {self._last} (expected {self._last + 1}); this model's "
                            "layers cannot be numbered: use --spec-opt layers=last")
        states = [out.last_hidden_state if i == self._last else out.hidden_states[i] for i in wanted]
        return (states[0] if len(states) == 1 else torch.stack(states, dim=1)), mask


class HFDataset(torch.utils.data.Dataset):
    """Items ``({"input_ids": [...], ...}, label or None, id)`` of one tokenized split."""

    def __init__(self, encoded: dict[str, list[list[int]]], labels: list[int | None], ids: list[str]):
        self._encoded, self._labels, self._ids = encoded, labels, ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> tuple[dict[str, list[int]], int | None, str]:
        return {key: values[i] for key, values in self._encoded.items()}, self._labels[i], self._ids[i]

    def lengths(self) -> list[int]:
        """Tokens per item, from the one tokenizer pass (extraction buckets by it)."""
        return [len(ids) for ids in self._encoded["input_ids"]]


# ---------------------------------------------------------------------------- the model folder


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SpecError("--spec hf needs transformers, tokenizers and safetensors: pip install 'headcache[hf]'") \
            from None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own load table and progress bars, off while loading (headcache reports instead)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _sentence_transformers_layout(folder: Path) -> tuple[Path, str | None, int | None]:
    """(model folder, recommended pool, max_seq_length) of a sentence-transformers folder, or (folder, None, None).

    ``modules.json`` names each module's type and subfolder; the Transformer
    module's subfolder ("" = the folder itself) holds the Hugging Face model.
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return folder, None, None
    try:
        modules = json.loads(modules_file.read_text())
        by_kind = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{modules_file} is not a sentence-transformers modules.json (a list of "
                              "{{\"type\", \"path\"}} entries)") from None
    if "Transformer" not in by_kind:
        raise CheckpointError(f"{modules_file} lists no Transformer module (types: {', '.join(by_kind)})")
    model_dir = folder / by_kind["Transformer"]
    pooling = None
    if "Pooling" in by_kind:
        pooling = _st_pooling(folder / by_kind["Pooling"] / "config.json")
    max_length = None
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = json.loads(st_config.read_text()).get("max_seq_length")
    return model_dir, pooling, max_length


def _st_pooling(config_file: Path) -> str | None:
    """The pooling a sentence-transformers Pooling config names, as headcache pool names where they exist."""
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} does not exist: modules.json names a Pooling module there")
    config = json.loads(config_file.read_text())
    if isinstance(config.get("pooling_mode"), str):  # sentence-transformers >= 5
        modes = [config["pooling_mode"]]
    else:  # older: one flag per mode, pooling_mode_mean_tokens: true, ...
        modes = [key.removeprefix("pooling_mode_") for key, on in config.items()
                 if key.startswith("pooling_mode_") and on is True]
    names = [ST_POOLING.get(mode, mode) for mode in modes]
    return " + ".join(names) if names else None


def _verify_weights(model: nn.Module, loading_info: Mapping[str, Any], weights: Path) -> dict[str, Any]:
    """Every tensor of ``model`` must come from the folder's weights; report the keys it does not use.

    A key of the file counts for the model as it is or with the model's
    ``base_model_prefix`` stripped (a folder saved from BertForMaskedLM holds
    ``bert.encoder...`` for BertModel's ``encoder...``). Tied tensors (one
    storage, two names) are covered when one of their names is. transformers'
    own list of keys it initialised is checked as well.
    """
    file_keys = _weight_keys(weights)
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapped = {key.removeprefix(prefix + ".") if prefix and key.startswith(prefix + ".") else key: key
              for key in file_keys}
    state = model.state_dict()
    by_storage: dict[int, set[str]] = {}
    for key, tensor in state.items():
        by_storage.setdefault(tensor.data_ptr(), set()).add(key)
    missing = {key for key, tensor in state.items() if not (by_storage[tensor.data_ptr()] & mapped.keys())}
    missing |= set(loading_info.get("missing_keys", ()))
    missing |= {entry[0] if isinstance(entry, (tuple, list)) else entry
                for entry in loading_info.get("mismatched_keys", ())}
    report: dict[str, Any] = {"unexpected": sorted(key for new, key in mapped.items() if new not in state)}
    if missing and all(key.startswith("pooler.") for key in missing) and isinstance(getattr(model, "pooler", None),
                                                                                    nn.Module):
        model.pooler = None  # last_hidden_state never reads it; better gone than random
        report["pooler_removed"] = "the weights hold no pooler, and last_hidden_state does not use one"
        missing = set()
    if missing:
        keys = sorted(missing)
        listed = ", ".join(keys[:20]) + (f", ... and {len(keys) - 20} more" if len(keys) > 20 else "")
        raise CheckpointError(f"{weights}: {len(keys)} tensors of {type(model).__name__} are not in the folder's "
                              f"weights, so transformers would initialise them at random: {listed}; use the folder "
                              "of this architecture (or save the full model with save_pretrained)")
    return report


def _weight_keys(weights: Path) -> list[str]:
    """Tensor names in a weight file (or the shards an index names), read without loading the tensors."""
    if weights.name.endswith(".index.json"):
        try:
            return list(json.loads(weights.read_text())["weight_map"])
        except (ValueError, KeyError):
            raise CheckpointError(f"{weights} is not a weight index (a JSON object with a weight_map)") from None
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    return [key for key, value in state.items() if isinstance(value, Tensor)]


# ---------------------------------------------------------------------------- the data


def read_splits(path: Path, *, text_column: str, text_pair_column: str | None, label_column: str,
                id_column: str, split_column: str) -> dict[str, list[_Row]]:
    """Rows per split from ``data=FILE`` (split column, or one split named by the stem) or ``data=DIR``.

    Raises
    ------
    DataError
        No such file or folder, an unsupported or empty folder, two files with the
        same stem, a missing text column, a row without text, duplicate ids.
    """
    if not path.exists():
        raise DataError(f"--spec-opt data={path}: no such file or folder")
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                   id_column=id_column)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"--spec-opt data={path}: the folder holds no {', '.join(DATA_SUFFIXES)} files "
                            "(one per split, e.g. train.csv, val.csv, test.csv)")
        splits: dict[str, list[_Row]] = {}
        for file in files:
            if file.stem in splits:
                raise DataError(f"--spec-opt data={path}: two files make split {file.stem!r}; keep one per split")
            splits[file.stem] = _rows(file, _read_table(file), **columns)
        return _ordered(splits)
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"--spec-opt data={path}: expected a {', '.join(DATA_SUFFIXES)} file or a folder of them")
    table = _read_table(path)
    if not any(split_column in record for record in table):
        return {path.stem: _rows(path, table, **columns)}
    grouped: dict[str, list[dict]] = {}
    for number, record in enumerate(table):
        record.setdefault(id_column, str(number))  # row numbers of the whole file, so ids stay unique
        value = record.get(split_column)
        if value is None or str(value) == "":
            raise DataError(f"{path}: row {number} has no value in the split column {split_column!r}; give every "
                            "row a split, or name another column with --spec-opt split_column=...")
        grouped.setdefault(str(value), []).append(record)
    return _ordered({split: _rows(path, records, **columns) for split, records in grouped.items()})


def _ordered(splits: dict[str, list[_Row]]) -> dict[str, list[_Row]]:
    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    return dict(sorted(splits.items(), key=lambda item: rank.get(item[0], len(rank))))


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it as {suffix[1:]}: {_first_line(exc)}") from None


def _rows(path: Path, table: list[dict], *, text_column: str, text_pair_column: str | None, label_column: str,
          id_column: str) -> list[_Row]:
    if not table:
        raise DataError(f"{path} holds no rows")
    present = set().union(*table)
    for option, column in (("text_column", text_column), ("text_pair_column", text_pair_column)):
        if column is not None and column not in present:
            raise DataError(f"{path} has no column {column!r} (it has {', '.join(sorted(present))}); name the text "
                            f"column with --spec-opt {option}=...")
    rows, seen = [], set()
    for number, record in enumerate(table):
        item_id = str(record.get(id_column, number))
        if item_id in seen:
            raise DataError(f"{path}: id {item_id!r} appears twice in column {id_column!r}; ids must be unique "
                            "(or name another column with --spec-opt id_column=...)")
        seen.add(item_id)
        text = record.get(text_column)
        if text is None:
            raise DataError(f"{path}: row {item_id!r} has no text in column {text_column!r}")
        pair = None if text_pair_column is None else record.get(text_pair_column)
        if text_pair_column is not None and pair is None:
            raise DataError(f"{path}: row {item_id!r} has no text in column {text_pair_column!r}")
        rows.append(_Row(str(text), None if pair is None else str(pair), _label(record.get(label_column)), item_id))
    return rows


def _label(value: Any) -> Any:
    """A row's label as a class key: None (unlabelled) for a missing or empty value; integers as ints."""
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value):
        return None  # value != value: a NaN, how pandas-written files mark a missing label
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return str(value)
    text = str(value).strip()
    return int(text) if _INTEGER.fullmatch(text) else text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
