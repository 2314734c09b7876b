"""The seed's backbone, SeqSetVAE in its deterministic form, and its on-disk data.

Everything here follows SEQSETVAE_KEYS.md, the key and computation reference
shared beside the project (the section numbers below refer to it): the module names are the original ones, so a real
checkpoint's ``state_dict`` loads with no key map, and the data rules are the
fine-tuning script's, except for missing labels (the seed silently used 0).

NOTE [ Patients without an oc.csv row ]
Labels come from ``oc.csv``, one split at a time:
- every patient of the split has a row: a labelled split;
- no patient of the split has one (or there is no ``oc.csv`` beside
  ``patient_ehr``): an unlabelled split (labels None; the cache stores -1), so
  new patients can be extracted and predicted, and train refuses the split
  as its train or val split;
- only some lack one: an error naming them, since that is most likely a
  mistake (a stale or cut oc.csv) that would silently shrink the labelled data.
An ``--spec-opt oc=PATH`` that does not exist is an error: naming a file says it should be there.

Batch layout (what `collate` returns and `SeqSetVAEBackbone.forward` takes)::

    embeddings   (N_events, E) float32  every event of the batch, patient by patient, set by set
    values       (N_events,)   float32  scaled values, same order
    set_sizes    (N_sets,)     int64    events per set, sets of all patients in order
    set_minutes  (N_sets,)     float32  the minute of each set
    num_sets     (B,)          int64    sets per patient

An item's ``inputs`` is the same dict for one patient, without ``num_sets``.

NOTE [ Padding invariance in SeqSetVAE ]
Events are projected one by one, then the sets of every patient are padded
into one tensor; padded events are hidden from the inducing points by a key
padding mask and left out of the mean over the set. Patients are padded at the
end of the sequence axis, so under the strict causal mask a real position
never attends to padding. The time term, badly conditioned in float32, is
computed in float64 (`SeqSetVAEBackbone.time_term`). A patient's hidden states
therefore do not depend on the rest of its batch beyond float rounding, about
1e-6 (see headcache.spec).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from headcache.errors import DataError, SpecError

SPLITS = ("train", "valid", "test")
CLASS_NAMES = ("survived", "died")
TIME_HIDDEN = 64  # width of the time encoder's hidden layer (time_encoder.0 is [64, 1])
SEED_DIMS = {
    "input_dim": 768,
    "reduced_dim": 256,
    "latent_dim": 256,
    "levels": 2,
    "heads": 2,
    "m": 16,
    "ff_dim": 512,
    "transformer_heads": 8,
    "transformer_layers": 4,
}
SIZES: dict[str, dict[str, int]] = {
    "seed": {},
    "tiny": {
        "reduced_dim": 16,
        "latent_dim": 16,
        "heads": 2,
        "m": 4,
        "ff_dim": 32,
        "transformer_heads": 2,
        "transformer_layers": 2,
    },
}
PATIENT_COLUMNS = ("variable", "value", "minute")


# ----------------------------------------------------------------------------- model


class MAB(nn.Module):
    """Multihead attention block as SeqSetVAE has it: no residual inside (section 5.3).

    The weights sit in an ``nn.MultiheadAttention`` named ``multihead`` so the
    keys match; the computation is spelled out in steps so that `ISAB` can
    run the per-row steps on unpadded rows and pad only for the attention.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.multihead = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ln2 = nn.LayerNorm(dim)

    def query(self, x: Tensor) -> Tensor:
        dim = self.multihead.embed_dim
        return F.linear(x, self.multihead.in_proj_weight[:dim], self.multihead.in_proj_bias[:dim])

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dim = self.multihead.embed_dim
        both = F.linear(x, self.multihead.in_proj_weight[dim:], self.multihead.in_proj_bias[dim:])
        return both[..., :dim], both[..., dim:]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_real: Tensor | None = None) -> Tensor:
        """Scaled dot-product attention over heads of projected q (B, Lq, D) and k, v (B, Lk, D)."""
        heads = self.multihead.num_heads

        def split(t: Tensor) -> Tensor:
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)

        mask = None if key_real is None else key_real[:, None, None, :]
        attended = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return attended.transpose(1, 2).flatten(2)

    def finish(self, attended: Tensor) -> Tensor:
        """out_proj, then ln1 -> ff -> ln2, row by row."""
        return self.ln2(self.ff(self.ln1(self.multihead.out_proj(attended))))


class ISAB(nn.Module):
    """Induced set attention: m inducing points read the set, the set reads them back."""

    def __init__(self, dim: int, heads: int, m: int) -> None:
        super().__init__()
        self.mab1 = MAB(dim, heads)
        self.mab2 = MAB(dim, heads)
        self.inducing = nn.Parameter(torch.randn(m, dim))

    def forward(self, x: Tensor, sets: Padding) -> Tensor:
        """ISAB(x) for the events of many sets.

        Parameters
        ----------
        x : Tensor (N_events, D)
            Events of all sets, set by set, unpadded.
        sets : Padding
            Where each set's events sit once padded.

        Returns
        -------
        Tensor (N_events, D)
        """
        # MAB1: the inducing points read each set; their query projection is shared by all sets.
        q = self.mab1.query(self.inducing).expand(len(sets.real), -1, -1)
        k, v = (sets.pad(t) for t in self.mab1.keys_values(x))
        summary = self.mab1.finish(self.mab1.attend(q, k, v, sets.real))
        # MAB2: each event reads its set's m summaries; only the attention needs the events padded.
        k, v = self.mab2.keys_values(summary)
        attended = sets.unpad(self.mab2.attend(sets.pad(self.mab2.query(x)), k, v))
        return self.mab2.finish(attended)


class SetEncoder(nn.Module):
    """SetVAE's encoder: a set of events -> mu of the deepest level (section 5)."""

    def __init__(self, input_dim: int, reduced_dim: int, latent_dim: int, levels: int, heads: int, m: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.dim_reducer = nn.Linear(input_dim, reduced_dim)
        self.embed = nn.Sequential(nn.Linear(reduced_dim, latent_dim), nn.LayerNorm(latent_dim), nn.GELU())
        self.encoder_layers = nn.ModuleList(ISAB(latent_dim, heads, m) for _ in range(levels))
        # Index 3 was a dropout; the frozen backbone runs without it, so an
        # Identity keeps the key numbering (.4) and the result mode-independent.
        self.mu_logvar = nn.Sequential(
            nn.Linear(latent_dim, latent_dim),
            nn.LayerNorm(latent_dim),
            nn.GELU(),
            nn.Identity(),
            nn.Linear(latent_dim, 2 * latent_dim),
        )

    def forward(self, embeddings: Tensor, values: Tensor, set_sizes: Tensor) -> Tensor:
        """Encode every set of the batch.

        Parameters
        ----------
        embeddings : Tensor (N_events, input_dim)
        values : Tensor (N_events,)
        set_sizes : Tensor (N_sets,) int64, summing to N_events

        Returns
        -------
        Tensor (N_sets, latent_dim): mu of the deepest level, one row per set.
        """
        reduced = self.dim_reducer(embeddings)
        current = self.embed(reduced / (reduced.norm(dim=-1, keepdim=True) + 1e-8) * values[:, None])
        sets = Padding(set_sizes)
        for layer in self.encoder_layers:
            current = layer(current, sets) + current
        # Zeros in the padding leave each set's sum exactly as it is.
        mean = sets.pad(current).sum(dim=1) / set_sizes[:, None].to(current.dtype)
        # Only the deepest level's mu reaches h_seq, so the earlier levels' posteriors are skipped.
        return self.mu_logvar(mean)[:, : self.latent_dim]


class SeqSetVAEBackbone(nn.Module):
    """SeqSetVAE up to ``h_seq``, deterministic: deepest-level mu, strict causal mask.

    The attribute names are the original model's, so ``state_dict()`` holds
    exactly its backbone keys (117 at the seed's size) and nothing else.
    Dropouts are left out: the backbone is frozen, and this keeps its output
    the same in train and eval mode.

    Parameters
    ----------
    input_dim, reduced_dim, latent_dim, levels, heads, m :
        Set encoder: embedding width, projected width, latent width D, ISAB
        levels, attention heads, inducing points.
    ff_dim, transformer_heads, transformer_layers :
        The sequence transformer (pre-norm, GELU).
    """

    def __init__(
        self,
        input_dim: int = 768,
        reduced_dim: int = 256,
        latent_dim: int = 256,
        levels: int = 2,
        heads: int = 2,
        m: int = 16,
        ff_dim: int = 512,
        transformer_heads: int = 8,
        transformer_layers: int = 4,
    ) -> None:
        super().__init__()
        # The original nests SetVAEModule inside a SetVAE module inside SeqSetVAE:
        # hence the doubled "setvae.setvae." prefix of its keys.
        self.setvae = nn.ModuleDict(
            {"setvae": SetEncoder(input_dim, reduced_dim, latent_dim, levels, heads, m)}
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, 1, latent_dim))
        self.time_encoder = nn.Sequential(
            nn.Linear(1, TIME_HIDDEN), nn.ReLU(), nn.Linear(TIME_HIDDEN, latent_dim), nn.Tanh()
        )
        layer = nn.TransformerEncoderLayer(
            latent_dim,
            transformer_heads,
            ff_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, transformer_layers, enable_nested_tensor=False)
        self.post_transformer_norm = nn.LayerNorm(latent_dim, eps=1e-6)

    def forward(
        self,
        embeddings: Tensor,
        values: Tensor,
        set_sizes: Tensor,
        set_minutes: Tensor,
        num_sets: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Hidden states of a batch of patients (layout in the module docstring).

        Returns
        -------
        h_seq : Tensor (B, S_max, D)
            After `post_transformer_norm`; zero at padded positions.
        mask : Tensor (B, S_max) bool
            True on real sets.
        """
        z = self.setvae["setvae"](embeddings, values, set_sizes)
        patients = Padding(num_sets)
        z, minutes, mask = patients.pad(z), patients.pad(set_minutes[:, None]), patients.real
        steps = torch.arange(z.shape[1], device=z.device, dtype=z.dtype)
        x = z + self.pos_embedding * torch.sin(0.01 * steps)[None, :, None] + self.time_term(minutes)
        x = F.layer_norm(x, x.shape[-1:])
        # Padding sits at the end, so the causal mask alone keeps real sets from seeing it.
        causal = torch.triu(torch.ones(z.shape[1], z.shape[1], dtype=torch.bool, device=z.device), 1)
        h = self.post_transformer_norm(self.transformer(x, mask=causal))
        return h.masked_fill(~mask[..., None], 0.0), mask

    def time_term(self, minutes: Tensor) -> Tensor:
        """``time_encoder(minutes)``, computed in float64 and returned in the input's dtype.

        Minutes run into the tens of thousands, so in float32 the second layer
        sums terms of that size and keeps only about 1e-5 of the result, and
        which digits survive depends on the matrix kernel, which depends on
        the batch's shape. float64 makes a set's time term independent of its
        batch (NOTE [ Padding invariance in SeqSetVAE ]) and closer to exact.
        """
        first, relu, second, tanh = self.time_encoder
        hidden = relu(F.linear(minutes.double(), first.weight.double(), first.bias.double()))
        return tanh(F.linear(hidden, second.weight.double(), second.bias.double())).to(minutes.dtype)


class Padding:
    """Where consecutive rows land when split into groups of ``counts`` rows, padded at the end.

    Built once per batch and reused by every layer, so the positions are computed once.
    """

    def __init__(self, counts: Tensor) -> None:
        self.real = torch.arange(int(counts.max()), device=counts.device) < counts[:, None]  # (G, width)
        self.slots = self.real.flatten().nonzero().squeeze(1)  # flat position of each row, group by group

    def pad(self, rows: Tensor) -> Tensor:
        """(N, *F) -> (G, width, *F), zeros in the padding."""
        padded = rows.new_zeros((self.real.numel(), *rows.shape[1:]))
        padded[self.slots] = rows
        return padded.unflatten(0, self.real.shape)

    def unpad(self, padded: Tensor) -> Tensor:
        """(G, width, *F) -> (N, *F), the real rows in order."""
        return padded.flatten(0, 1)[self.slots]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class VariableTable:
    """Per-variable embedding and value scaling, from ``cached.csv`` and ``stats.csv``.

    Attributes
    ----------
    index : dict of str to int
        Variable name -> row of ``vectors`` (a later duplicate in cached.csv wins).
    vectors : ndarray (V, E) float32
    mean, std : ndarray (V,) float32
        The stats, rounded to float32; only meaningful where ``scaled``.
    scaled : ndarray (V,) bool
        False for variables absent from stats.csv: they keep their raw value.
    """

    cached_path: Path
    index: dict[str, int]
    vectors: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    scaled: np.ndarray

    @classmethod
    def load(cls, cached_path: Path, stats_path: Path) -> VariableTable:
        names, vectors = _read_cached(cached_path)
        stats = _read_stats(stats_path)
        index = {name: i for i, name in enumerate(names)}
        scaled = np.array([name in stats for name in names], dtype=bool)
        mean = np.array([stats.get(name, (0.0, 1.0))[0] for name in names], dtype=np.float32)
        std = np.array([stats.get(name, (0.0, 1.0))[1] for name in names], dtype=np.float32)
        return cls(cached_path, index, vectors, mean, std, scaled)

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    def rows(self, names: Sequence[str], path: Path) -> np.ndarray:
        """Rows of ``vectors`` for ``names``; refuse a variable cached.csv lacks."""
        missing = sorted({name for name in names if name not in self.index})
        if missing:
            raise DataError(
                f"{path}: variable(s) {', '.join(map(repr, missing))} not in {self.cached_path}; "
                "add an embedding row for each to cached.csv (the backbone has no fallback)"
            )
        return np.array([self.index[name] for name in names], dtype=np.int64)

    def scale(self, rows: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """z-score ``raw`` values in float32; variables without stats keep the raw value."""
        values = raw.astype(np.float32)
        has = self.scaled[rows]
        values[has] = (values[has] - self.mean[rows[has]]) / self.std[rows[has]]
        return values


def _read_cached(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise DataError(f"{path}: expected a header 'Key,<component>,...' and one embedding per variable")
        names, rows = [], []
        for line, record in enumerate(reader, start=2):
            if len(record) != len(header):
                raise DataError(
                    f"{path}, line {line}: {len(record)} fields where the header has {len(header)}; "
                    "every row needs the variable name and one value per embedding component"
                )
            try:
                rows.append([float(x) for x in record[1:]])
            except ValueError as exc:
                raise DataError(f"{path}, line {line}: {exc}; embedding components must be numbers") from None
            names.append(record[0])
    if not names:
        raise DataError(f"{path}: no variables; cached.csv needs one embedding row per variable")
    return names, np.array(rows, dtype=np.float64).astype(np.float32)


def _read_stats(path: Path) -> dict[str, tuple[np.float32, np.float32]]:
    stats = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        _require_columns(path, reader.fieldnames, ("variable", "mean", "std"))
        for line, record in enumerate(reader, start=2):
            try:
                mean, std = np.float32(float(record["mean"])), np.float32(float(record["std"]))
            except (TypeError, ValueError):
                raise DataError(f"{path}, line {line}: mean and std must be numbers") from None
            # Refused rather than read as 1: a std of 0 (or NaN) means the stats were computed from one value
            # or are broken, and guessing a scale would silently change what the backbone sees.
            if not (np.isfinite(std) and std > 0) or not np.isfinite(mean):
                raise DataError(f"{path}, line {line}: variable {record['variable']!r} has std {record['std']} "
                                f"(mean {record['mean']}); std must be a positive number: fix that row, or drop "
                                "it to use the variable's raw values")
            stats[record["variable"]] = (mean, std)
    return stats


@dataclass(frozen=True)
class Outcomes:
    """Labels from ``oc.csv``: ts_id -> in_hospital_mortality (a later duplicate wins); ``path`` None when
    there is no oc.csv, so that every split is unlabelled (NOTE [ Patients without an oc.csv row ])."""

    path: Path | None
    labels: dict[int, int]

    @classmethod
    def load(cls, path: Path) -> Outcomes:
        labels = {}
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            _require_columns(path, reader.fieldnames, ("ts_id", "in_hospital_mortality"))
            for line, record in enumerate(reader, start=2):
                try:
                    ts_id, label = int(float(record["ts_id"])), int(float(record["in_hospital_mortality"]))
                except (TypeError, ValueError, OverflowError):
                    raise DataError(f"{path}, line {line}: ts_id and in_hospital_mortality must be numbers") from None
                if label not in (0, 1):
                    raise DataError(f"{path}, line {line}: in_hospital_mortality is {label}; it must be 0 or 1")
                labels[ts_id] = label
        return cls(path, labels)

    def label(self, path: Path) -> int | None:
        """The label of a patient file, found by its stem read as a number, or None."""
        if self.path is None:
            return None  # no oc.csv: nothing to match the file name against
        try:
            ts_id = int(float(path.name[: -len(".parquet")]))
        except (ValueError, OverflowError):
            raise DataError(
                f"{path}: the file name is not a number, so it cannot be matched to a ts_id in {self.path}; "
                "name patient files <ts_id>.parquet"
            ) from None
        return self.labels.get(ts_id)


def _require_columns(path: Path, found: Sequence[str] | None, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in (found or ())]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(found or []) or 'none'}); "
            f"expected columns {', '.join(needed)}"
        )


class PatientDataset(Dataset):
    """One split of the seed's data: one parquet file per patient.

    Items are ``(inputs, label, id)`` with ``inputs`` as in the module
    docstring; ``label`` is None for every patient of an unlabelled split
    (NOTE [ Patients without an oc.csv row ]). Files are read when asked for
    (the end-to-end baseline reads every patient every epoch, as the seed
    did); the variable table is shared. Every label is checked here, so a
    missing one fails before any work.

    Parameters
    ----------
    split_dir : Path
        ``<data>/patient_ehr/<split>``; its ``*.parquet`` files in sorted order.
    variables : VariableTable
    outcomes : Outcomes

    Raises
    ------
    DataError
        The folder has no patient files, or some of its patients (not all) have no row in oc.csv.
    """

    def __init__(self, split_dir: Path, variables: VariableTable, outcomes: Outcomes) -> None:
        self.files = sorted(split_dir.glob("*.parquet"))
        if not self.files:
            raise DataError(f"{split_dir}: no .parquet patient files; expected one <ts_id>.parquet per patient")
        labels = [outcomes.label(path) for path in self.files]
        missing = [path for path, label in zip(self.files, labels) if label is None]
        if missing and len(missing) < len(self.files):  # NOTE [ Patients without an oc.csv row ]
            shown = ", ".join(str(p) for p in missing[:5])
            if len(missing) > 5:
                shown += f" and {len(missing) - 5} more"
            raise DataError(
                f"{shown}: no ts_id row in {outcomes.path}, while the other {len(self.files) - len(missing)} "
                f"patients of {split_dir} have one; add an in_hospital_mortality row for each patient (or move "
                "its file out of the split; a split none of whose patients has a row is read as unlabelled)"
            )
        self.labels: list[int | None] = labels
        self.ids = [path.name[: -len(".parquet")] for path in self.files]
        self.variables = variables

    def __len__(self) -> int:
        return len(self.files)

    def lengths(self) -> list[int]:
        """Events per patient from the parquet footers (no data read), for length bucketing."""
        return [_read_metadata(path).num_rows for path in self.files]

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int | None, str]:
        return load_patient(self.files[i], self.variables), self.labels[i], self.ids[i]


def load_patient(path: Path, variables: VariableTable) -> dict[str, Tensor]:
    """Read one patient file into the backbone's inputs (rules of section 4).

    Raises
    ------
    DataError
        Missing columns, no rows, a variable without embedding, or a set
        whose rows carry more than one minute.
    """
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(path, exc) from None
    _require_columns(path, table.column_names, PATIENT_COLUMNS)
    if table.num_rows == 0:
        raise DataError(f"{path}: the patient file has no rows; every patient needs at least one event")
    encoded = table.column("variable").combine_chunks().dictionary_encode()
    if encoded.null_count:
        raise DataError(f"{path}: {encoded.null_count} row(s) have no variable name; fill or drop them")
    rows = variables.rows(encoded.dictionary.to_pylist(), path)[encoded.indices.to_numpy()]
    minute = table.column("minute").to_numpy()
    if "set_index" in table.column_names:
        set_label = table.column("set_index").to_numpy()
    else:
        set_label = np.concatenate([[0], np.cumsum(minute[1:] != minute[:-1])])
    new_set = np.concatenate([[True], set_label[1:] != set_label[:-1]])
    starts = np.flatnonzero(new_set)
    mixed = np.flatnonzero(~new_set[1:] & (minute[1:] != minute[:-1])) + 1
    if len(mixed):
        row = mixed[0]
        number = int(np.searchsorted(starts, row, side="right")) - 1
        raise DataError(
            f"{path}: set {number} (set_index {set_label[row]}, starting at row {starts[number]}) has rows with "
            f"minutes {minute[row - 1]} and {minute[row]}; all rows of a set must share one minute: "
            "fix set_index or the minutes"
        )
    return {
        "embeddings": torch.from_numpy(variables.vectors[rows]),
        "values": torch.from_numpy(variables.scale(rows, _values(table, path))),
        "set_sizes": torch.from_numpy(np.diff(np.append(starts, len(minute)))),
        "set_minutes": torch.from_numpy(minute[starts].astype(np.float32)),
    }


def _read_metadata(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path}: cannot be read as parquet ({exc}); replace or remove the file")


def _values(table: pa.Table, path: Path) -> np.ndarray:
    """The value column as float64; refuse text, naming the first row that is not a number."""
    column = table.column("value")
    try:
        return column.cast(pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = column.to_pylist()
    for row, value in enumerate(values):
        try:
            float(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}, row {row}: the value column holds {value!r}, not a number; every value "
                            "must be numeric (drop or fix that row)") from None
    return np.array(values, dtype=np.float64)


# ----------------------------------------------------------------------------- spec


class SeqSetVAESpec:
    """The seed's model and data as a headcache spec (see headcache.spec).

    Build it with `make_spec`, which reads the shared tables once.
    """

    name = "seqsetvae"
    splits = SPLITS
    num_classes = 2
    class_names = CLASS_NAMES

    def __init__(self, data_dir: Path, variables: VariableTable, outcomes: Outcomes, dims: Mapping[str, int]) -> None:
        self.data_dir = data_dir
        self.variables = variables
        self.outcomes = outcomes
        self.dims = dict(dims)

    def backbone(self) -> SeqSetVAEBackbone:
        return SeqSetVAEBackbone(**self.dims)

    def dataset(self, split: str) -> PatientDataset:
        if split not in self.splits:
            raise SpecError(f"seqsetvae has no split {split!r}; its splits are {', '.join(self.splits)}")
        split_dir = self.data_dir / "patient_ehr" / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: no such folder; expected one <ts_id>.parquet file per {split} patient")
        return PatientDataset(split_dir, self.variables, self.outcomes)

    def collate(self, inputs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch = {key: torch.cat([item[key] for item in inputs]) for key in inputs[0]}
        batch["num_sets"] = torch.tensor([len(item["set_sizes"]) for item in inputs], dtype=torch.int64)
        return batch

    def encode(self, backbone: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return backbone(**batch)


def make_spec(
    data: str | None = None,
    cached: str | None = None,
    stats: str | None = None,
    oc: str | None = None,
    size: str = "seed",
    **dims: Any,
) -> SeqSetVAESpec:
    """The `seqsetvae` spec for a data root in the seed's layout.

    Parameters
    ----------
    data : str
        (Required.) Folder holding ``patient_ehr/{train,valid,test}/``; ``cached.csv``,
        ``stats.csv`` and ``oc.csv`` default to its files of those names
        (without an oc.csv there, every split is unlabelled).
    cached, stats, oc : str, optional
        Other paths for those tables.
    size : {"seed", "tiny"}
        Architecture preset; "tiny" is a small model for tests.
    **dims : int or str
        Overrides of `SeqSetVAEBackbone`'s arguments (strings from
        ``--spec-opt`` are read as integers). ``input_dim`` defaults to the
        width of cached.csv.

    Raises
    ------
    DataError
        A folder or table is missing or malformed.
    SpecError
        An unknown size or dimension, or a value that is not a positive integer.
    """
    if not data:  # a default of None, so the message can name the flag rather than Python's missing argument
        raise SpecError("--spec seqsetvae needs its data: pass --spec-opt data=DIR, DIR holding "
                        "patient_ehr/{train,valid,test}/<ts_id>.parquet, cached.csv, stats.csv and oc.csv")
    root = Path(data)
    if not (root / "patient_ehr").is_dir():
        raise DataError(
            f"{root}: no patient_ehr folder; --spec-opt data=DIR must name the folder holding "
            "patient_ehr/{train,valid,test}/<ts_id>.parquet, cached.csv, stats.csv and oc.csv"
        )
    paths = {
        "cached": Path(cached) if cached else root / "cached.csv",
        "stats": Path(stats) if stats else root / "stats.csv",
        "oc": Path(oc) if oc else root / "oc.csv",
    }
    # NOTE [ Patients without an oc.csv row ]: no oc.csv beside patient_ehr means unlabelled data
    unlabelled = oc is None and not paths["oc"].exists()
    for option, path in paths.items():
        if not path.is_file() and not (option == "oc" and unlabelled):
            raise DataError(
                f"{path}: no such file; put {path.name} beside patient_ehr or pass --spec-opt {option}=PATH"
            )
    variables = VariableTable.load(paths["cached"], paths["stats"])
    resolved = resolve_dims(size, dims, variables.width)
    if resolved["input_dim"] != variables.width:
        raise SpecError(
            f"input_dim={resolved['input_dim']} but {paths['cached']} has {variables.width}-d embeddings; "
            "drop the input_dim option or use a matching cached.csv"
        )
    outcomes = Outcomes(None, {}) if unlabelled else Outcomes.load(paths["oc"])
    return SeqSetVAESpec(root, variables, outcomes, resolved)


def resolve_dims(size: str, overrides: Mapping[str, Any], input_dim: int) -> dict[str, int]:
    """`SeqSetVAEBackbone` arguments: the seed's, then the ``size`` preset, then ``overrides``.

    Raises
    ------
    SpecError
        Unknown size or option, a value that is not an integer, or heads that
        do not divide the latent width.
    """
    if size not in SIZES:
        raise SpecError(f"seqsetvae: unknown size {size!r}; choose one of {', '.join(SIZES)}")
    unknown = sorted(set(overrides) - set(SEED_DIMS))
    if unknown:
        raise SpecError(
            f"seqsetvae: unknown option(s) {', '.join(unknown)}; the options are data, cached, stats, oc, size, "
            f"{', '.join(SEED_DIMS)}"
        )
    dims = {**SEED_DIMS, **SIZES[size], "input_dim": input_dim}
    for key, value in overrides.items():
        try:
            dims[key] = int(value)
        except (TypeError, ValueError):
            raise SpecError(f"seqsetvae: {key}={value!r} is not an integer") from None
    bad = [f"{k}={v} (must be at least 1)" for k, v in dims.items() if v < 1]
    for heads in ("heads", "transformer_heads"):
        if dims[heads] >= 1 and dims["latent_dim"] % dims[heads]:
            bad.append(f"{heads}={dims[heads]} (must divide latent_dim={dims['latent_dim']})")
    if bad:
        raise SpecError(f"seqsetvae: invalid dimension(s) {', '.join(bad)}")
    return dims
