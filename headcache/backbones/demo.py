"""A synthetic data set and checkpoint in the seed's layout, for the demo and tests.

`write_demo` writes what a SeqSetVAE user has on disk (see
`headcache.backbones.seqsetvae`): ``data/patient_ehr/{train,valid,test}/``,
``cached.csv``, ``stats.csv``, ``oc.csv``, and ``backbone.ckpt``, a
Lightning-style checkpoint whose backbone keys carry the seed's names next to
an unused decoder and a stale classifier head of other shapes. Everything is
a function of ``seed``: the same seed writes the same files.

The label is a pattern that no per-patient average of raw values shows.
Lactic Acid (high) and the arterial mean pressure (low) are each abnormal in
about half of every patient's sets; for a patient who dies they are mostly
abnormal *in the same sets*, for a survivor mostly in different ones. Seeing
it takes a model of the sets, which the backbone is, even with random weights.

NOTE [ Demo layer ids ]
The backbone's sequence transformer has n = ``transformer_layers`` layers
(4 at the seed's size, 2 tiny) and a final ``post_transformer_norm``. Id 0
is the transformer's input (set embeddings plus the positional and time
terms, layer-normed), id i < n the output of transformer layer i, and id n
the backbone's output, ``post_transformer_norm`` of layer n's output: the
hidden states the spec has always given. ``last`` = [n] runs the plain
forward, so its cache is bit for bit what it was before layers existed.
Other ids are read by forward hooks while that forward runs: id 0 by one on
the transformer, which changes nothing (``layers=0,-1`` gives the same id n
bit for bit); id i of 1..n-1 by one on layer i, and torch runs a layer that
has hooks without its fused inference kernel: the same computation, rounded
differently, so the layers from i on differ from ``last``'s run by float
rounding (about 1e-6), not more. Every layer is zero at padded positions, as
the output is.
"""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from headcache.backbones import seqsetvae
from headcache.backbones.hf import parse_layers, resolve_layers
from headcache.backbones.seqsetvae import SeqSetVAEBackbone, SeqSetVAESpec
from headcache.errors import ConfigError, OutputExistsError, SpecError

# name, mean, std of the synthetic values (and stats.csv, where listed there)
VARIABLES: tuple[tuple[str, float, float], ...] = (
    ("Heart Rate", 86.3, 17.9),
    ("Respiratory Rate", 19.6, 5.4),
    ("O2 saturation pulseoxymetry", 96.8, 3.1),
    ("Non Invasive Blood Pressure systolic", 121.4, 21.7),
    ("Non Invasive Blood Pressure diastolic", 63.2, 14.8),
    ("Non Invasive Blood Pressure mean", 79.5, 15.2),
    ("Arterial Blood Pressure systolic", 118.9, 22.6),
    ("Arterial Blood Pressure diastolic", 60.1, 12.9),
    ("Arterial Blood Pressure mean", 77.1, 14.3),
    ("Temperature Fahrenheit", 98.6, 1.2),
    ("Glucose (serum)", 139.2, 58.6),
    ("Potassium (serum)", 4.1, 0.62),
    ("Sodium (serum)", 138.7, 4.9),
    ("Chloride (serum)", 104.2, 5.8),
    ("HCO3 (serum)", 24.1, 4.6),
    ("Anion gap", 13.9, 3.8),
    ("Creatinine (serum)", 1.43, 1.37),
    ("BUN", 27.8, 21.9),
    ("Hemoglobin", 10.3, 1.9),
    ("Hematocrit (serum)", 31.2, 5.6),
    ("Platelet Count", 204.5, 109.8),
    ("WBC", 11.6, 7.4),
    ("Lactic Acid", 2.3, 1.9),
    ("PH (Arterial)", 7.38, 0.08),
    ("Arterial O2 pressure", 128.6, 78.2),
    ("Arterial CO2 Pressure", 41.2, 9.7),
    ("Arterial Base Excess", -0.4, 4.8),
    ("Bilirubin, Total", 2.1, 3.8),
    ("Albumin", 3.0, 0.62),
    ("Magnesium", 2.05, 0.36),
    ("Phosphorous", 3.6, 1.3),
    ("Calcium non-ionized", 8.4, 0.7),
    ("Inspired O2 Fraction", 47.5, 17.2),
    ("GCS - Eye Opening", 3.0, 1.0),
    ("GCS - Verbal Response", 3.0, 1.6),
    ("GCS - Motor Response", 5.0, 1.4),
    ("Richmond-RAS Scale", -1.0, 1.5),
)
# Absent from stats.csv, so the backbone sees their raw (small) values, as in the seed's data.
UNSCALED = ("GCS - Eye Opening", "GCS - Verbal Response", "GCS - Motor Response", "Richmond-RAS Scale")
# The label's pattern (module docstring): where an abnormal value lies, in standard deviations.
PAIR = {"Lactic Acid": 2.5, "Arterial Blood Pressure mean": -2.5}
# Chance, per set, that the second of PAIR is abnormal exactly when the first is (died, survived).
CONCORDANCE = {True: 0.85, False: 0.15}
POSITIVE_RATE = 0.15
SETS = (5, 60)  # sets per patient, inclusive
EVENTS = (1, 20)  # events per set, inclusive
SPLIT_SHARES = (("train", 0.70), ("valid", 0.15), ("test", 0.15))
FIRST_ID = 100001
MIN_PATIENTS = 10
INPUT_DIM = seqsetvae.SEED_DIMS["input_dim"]  # the embedding width of cached.csv, as in the seed's data


@dataclass(frozen=True)
class DemoFiles:
    """Where `write_demo` put things: the data root and the checkpoint."""

    data_dir: Path
    checkpoint: Path


def write_demo(out_dir: str | Path, patients: int = 1000, seed: int = 0, size: str = "seed") -> DemoFiles:
    """Write the demo data set and a randomly initialised backbone checkpoint.

    Parameters
    ----------
    out_dir : str or Path
        Gets ``data/`` (the seed's layout) and ``backbone.ckpt``.
    patients : int
        Number of patients over all splits (about 70/15/15).
    seed : int
        Everything written is a function of it; no global RNG is touched.
    size : {"seed", "tiny"}
        Architecture of the checkpoint (`seqsetvae.SIZES`).

    Returns
    -------
    DemoFiles

    Raises
    ------
    ConfigError, OutputExistsError
        As `write_demo_data`.
    SpecError
        An unknown size.
    """
    out = Path(out_dir)
    dims = seqsetvae.resolve_dims(size, {}, INPUT_DIM)
    data_dir = write_demo_data(out / "data", patients, seed)
    checkpoint = out / "backbone.ckpt"
    torch.save(demo_checkpoint(dims, seed), checkpoint)
    return DemoFiles(data_dir, checkpoint)


def demo_checkpoint(dims: dict[str, int], seed: int) -> dict:
    """A Lightning-style checkpoint: the backbone at random init plus keys it must ignore.

    Besides the backbone's own keys, ``state_dict`` holds unused ``decoder.*``
    tensors and a ``cls_head.*`` shaped like the joint model's 4-layer head
    (SEQSETVAE_KEYS.md section 3), whose shapes differ from headcache's head,
    so loading must drop it rather than fail on it.
    """
    latent = dims["latent_dim"]
    stale = {
        "decoder.out.weight": (latent, latent),
        "decoder.out.bias": (latent,),
        **{f"decoder.decoder_layers.{i}.isab.inducing": (dims["m"], latent) for i in range(dims["levels"])},
        "cls_head.0.weight": (latent, latent),
        "cls_head.0.bias": (latent,),
        "cls_head.1.weight": (latent,),
        "cls_head.1.bias": (latent,),
        "cls_head.4.weight": (latent // 2, latent),
        "cls_head.4.bias": (latent // 2,),
        "cls_head.5.weight": (latent // 2,),
        "cls_head.5.bias": (latent // 2,),
        "cls_head.8.weight": (latent // 4, latent // 2),
        "cls_head.8.bias": (latent // 4,),
        "cls_head.9.weight": (latent // 4,),
        "cls_head.9.bias": (latent // 4,),
        "cls_head.12.weight": (2, latent // 4),
        "cls_head.12.bias": (2,),
    }
    # fork_rng restores the global generator afterwards: module init uses it, the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = SeqSetVAEBackbone(**dims).state_dict()
        state.update({key: 0.02 * torch.randn(shape) for key, shape in stale.items()})
    return {
        "state_dict": state,
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.1.0",
        "hyper_parameters": {**dims, "num_classes": 2, "lr": 5e-4},
    }


def write_demo_data(data_dir: str | Path, patients: int = 1000, seed: int = 0) -> Path:
    """Write the data part of the demo into ``data_dir`` (the seed's layout).

    Running it again with the same arguments keeps what is there; other
    arguments rewrite it. A ``patient_ehr`` this function did not write (no
    ``demo.json`` beside it) is refused, so real data is never overwritten.
    ``patient_ehr`` is written under a temporary name and renamed last, so a
    folder that has it is complete.

    Raises
    ------
    ConfigError
        Fewer than `MIN_PATIENTS` patients.
    OutputExistsError
        ``data_dir`` holds a ``patient_ehr`` written by something else.
    """
    if patients < MIN_PATIENTS:
        raise ConfigError(f"patients={patients}: the demo needs at least {MIN_PATIENTS} so that every split gets some")
    root = Path(data_dir)
    recipe = {"patients": patients, "seed": seed}
    marker = root / "demo.json"
    if (root / "patient_ehr").exists():
        if not marker.is_file():
            raise OutputExistsError(
                f"{root / 'patient_ehr'} exists and was not written by the demo; "
                "choose another folder for the demo data"
            )
        if json.loads(marker.read_text()) == recipe:
            return root
        shutil.rmtree(root / "patient_ehr")
    partial = root / "patient_ehr.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    for split, _ in SPLIT_SHARES:
        (partial / split).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    _write_cached(root / "cached.csv", rng.standard_normal((len(VARIABLES), INPUT_DIM)) / np.sqrt(INPUT_DIM))
    _write_stats(root / "stats.csv")
    labels = (rng.random(patients) < POSITIVE_RATE).astype(int)
    splits = _assign_splits(rng.permutation(patients))
    for i in range(patients):
        stem = f"{FIRST_ID + i}" if i % 7 == 3 else f"{FIRST_ID + i}.0"  # both spellings occur in the seed's data
        table = _patient_table(rng, bool(labels[i]), with_set_index=i % 2 == 0)
        pq.write_table(table, partial / splits[i] / f"{stem}.parquet")
    _write_outcomes(root / "oc.csv", labels, rng)
    marker.write_text(json.dumps(recipe))
    partial.rename(root / "patient_ehr")
    return root


def make_spec(
    data: str = "cache/demo/data", patients: str = "1000", seed: str = "0", size: str = "seed",
    layers: str = "last",
) -> DemoSpec:
    """The `demo` spec: the `seqsetvae` spec on the demo data, written first if absent.

    Parameters
    ----------
    data : str
        Data root; generated (``patients``, ``seed``) when it has no ``patient_ehr``.
    patients, seed : str
        As in `write_demo` (strings, as ``--spec-opt`` gives them).
    size : {"seed", "tiny"}
        Architecture preset, as in `seqsetvae.make_spec`.
    layers : str
        ``last`` (default: the seqsetvae spec's own hidden states, exactly),
        ``all`` or ids ``i,j,...`` (NOTE [ Demo layer ids ]), so that one
        extraction can give a cache of several layers.

    Raises
    ------
    SpecError
        ``patients`` or ``seed`` is not an integer, or an unknown size.
    ConfigError
        ``layers`` is not last, all or distinct ids in range.
    """
    choice = parse_layers(layers)
    if not (Path(data) / "patient_ehr").is_dir():
        write_demo_data(data, _integer("patients", patients), _integer("seed", seed))
    base = seqsetvae.make_spec(data, size=size)
    count = base.dims["transformer_layers"] + 1
    meaning = f"0 = the transformer's input, {count - 1} = the output after post_transformer_norm"
    return DemoSpec(base.data_dir, base.variables, base.outcomes, base.dims,
                    layers=resolve_layers(choice, count, str(layers), meaning))


class DemoSpec(SeqSetVAESpec):
    """The seqsetvae spec with a choice of layers (NOTE [ Demo layer ids ]).

    Attributes
    ----------
    layers : list of int
        The ids ``encode`` returns, in that order.
    """

    def __init__(self, data_dir: Path, variables: seqsetvae.VariableTable, outcomes: seqsetvae.Outcomes,
                 dims: dict[str, int], *, layers: list[int]) -> None:
        super().__init__(data_dir, variables, outcomes, dims)
        self.layers = list(layers)

    def encode(self, backbone: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The states of ``layers``: [B, T, D] for one layer, else [B, L, T, D] in ``layers`` order.

        The other states are read by forward hooks on the backbone's own
        transformer while its forward runs, so no step of the forward is copied
        here (NOTE [ Demo layer ids ] on what the hooks change).
        """
        last = len(backbone.transformer.layers)
        if self.layers == [last]:
            return backbone(**batch)
        states: dict[int, Tensor] = {}
        hooks = []
        if 0 in self.layers:  # a hook on the transformer itself leaves its layers' kernels as they are
            hooks.append(backbone.transformer.register_forward_pre_hook(
                lambda module, args: states.__setitem__(0, args[0])))
        for i in self.layers:
            if 0 < i < last:
                hooks.append(backbone.transformer.layers[i - 1].register_forward_hook(
                    lambda module, args, output, i=i: states.__setitem__(i, output)))
        try:
            states[last], mask = backbone(**batch)
        finally:
            for hook in hooks:
                hook.remove()
        picked = [states[i] for i in self.layers]
        hidden = picked[0] if len(picked) == 1 else torch.stack(picked, dim=1)
        # zero at padding, as the output is (the output's own zeros stay as they are)
        padded = ~mask[:, None, :, None] if hidden.ndim == 4 else ~mask[..., None]
        return hidden.masked_fill(padded, 0.0), mask


def _integer(option: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SpecError(f"demo: {option}={text!r} is not an integer; pass --spec-opt {option}=N") from None


def _assign_splits(order: np.ndarray) -> list[str]:
    """Split of each patient: shares of SPLIT_SHARES over a random order."""
    splits = [""] * len(order)
    bounds = np.round(np.cumsum([share for _, share in SPLIT_SHARES]) * len(order)).astype(int)
    for position, patient in enumerate(order):
        splits[patient] = SPLIT_SHARES[int(np.searchsorted(bounds, position, side="right"))][0]
    return splits


def _patient_table(rng: np.random.Generator, positive: bool, with_set_index: bool) -> pa.Table:
    """One patient's events, set by set (see the module docstring for the pattern)."""
    n_sets = int(rng.integers(SETS[0], SETS[1] + 1))
    sizes = rng.integers(EVENTS[0], EVENTS[1] + 1, n_sets)
    names = [name for name, _, _ in VARIABLES]
    pair = [names.index(name) for name in PAIR]
    others = np.array([i for i in range(len(VARIABLES)) if i not in pair])
    # Lactic Acid opens every set, the pressure every set of two or more; the rest are distinct, at random.
    chosen = [np.concatenate([pair, rng.permutation(others)])[:size] for size in sizes]
    variables = np.concatenate(chosen)
    set_of_event = np.repeat(np.arange(n_sets), [len(c) for c in chosen])
    z = rng.standard_normal(len(variables))
    first_abnormal = rng.random(n_sets) < 0.5
    second_abnormal = first_abnormal ^ (rng.random(n_sets) >= CONCORDANCE[positive])
    for position, shift, abnormal in zip(pair, PAIR.values(), (first_abnormal, second_abnormal)):
        at = variables == position
        z[at] = np.where(abnormal[set_of_event[at]], shift, -shift / 4) + 0.5 * z[at]
    mean = np.array([m for _, m, _ in VARIABLES])[variables]
    std = np.array([s for _, _, s in VARIABLES])[variables]
    values = np.round(mean + std * z, 2)
    # Sets are hours apart; with set_index, neighbours may share a minute and still be two sets.
    gaps = rng.integers(15, 240, n_sets) * (rng.random(n_sets) > (0.1 if with_set_index else 0.0))
    minutes = float(rng.integers(0, 120)) + np.cumsum(gaps) - gaps[0]
    columns = {
        "variable": pa.array([names[v] for v in variables], pa.string()),
        "value": pa.array(values, pa.float64()),
        "minute": pa.array(minutes[set_of_event].astype(np.float64), pa.float64()),
    }
    if with_set_index:
        columns["set_index"] = pa.array(set_of_event, pa.int64())
    return pa.table(columns)


def _write_cached(path: Path, vectors: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Key", *range(vectors.shape[1])])
        for (name, _, _), vector in zip(VARIABLES, vectors.astype(np.float32)):
            writer.writerow([name, *(f"{x:.6g}" for x in vector)])


def _write_stats(path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variable", "mean", "std"])
        writer.writerows((name, mean, std) for name, mean, std in VARIABLES if name not in UNSCALED)


def _write_outcomes(path: Path, labels: np.ndarray, rng: np.random.Generator) -> None:
    """oc.csv, with a few stays that have no patient file, as in the seed's data."""
    extra = FIRST_ID + len(labels) + np.arange(3)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts_id", "in_hospital_mortality"])
        writer.writerows((FIRST_ID + i, int(label)) for i, label in enumerate(labels))
        writer.writerows((int(ts_id), int(rng.random() < POSITIVE_RATE)) for ts_id in extra)
