"""Specs that break the contract or the data rules, one option at a time (tests/test_reliability.py).

``make_spec`` wraps the toy GRU of tests/data/toy_spec.py, so the toy
checkpoint fixture loads into it. Options (all text, as ``--spec-opt`` gives them):

``n``            sequences per split (default 12)
``mode``         one defect: ``hidden2d``, ``hidden4d`` (4-D hidden, no ``layers``), ``short_mask``, ``numpy``,
                 ``triple``, ``none`` (what ``encode`` returns); ``pad_dependent`` (states shift with the
                 batch size); ``collate_raises``, ``dataset_raises``;
                 ``label_none``, ``label_str``, ``label_float``, ``label_out`` (item 2 of train gets that
                 label: None, "pos", 1.5, 5); ``dup_ids`` (train item 3 has item 2's id); ``ok`` (default)
``big_at``       train item whose hidden states are scaled by 1e7 (beyond float16's range)
``scale``        every hidden state times this, and a batch of several items times (1 + 2**-23): padding
                 invariant within float32 noise, relative to the states' magnitude
``data``         a folder whose ``seed.txt`` (an integer) shifts every input: the "same" data under another
                 spelling of the path, or changed data of the same size
``kill_at``      ``SPLIT:I``: SIGKILL the process when item I of SPLIT is loaded, once per ``marker`` file
``fail_at``      ``SPLIT:I``: item I of SPLIT raises a DataError (a failure part-way through)
``stop_at``      ``SPLIT:I``: as fail_at, but once per ``marker`` file (an extraction stopped part-way that
                 the same command, run again, resumes)
``sigint_at``    ``SPLIT:I``: send SIGINT to the extracting process (as Ctrl-C does) when item I of SPLIT is
                 loaded, once per ``marker`` file (from a DataLoader worker too)
``hold_at``      ``SPLIT:I``: when item I of SPLIT is loaded, create ``<hold>.waiting`` and wait until the file
                 ``hold`` exists (an extraction paused part-way, its cache open); once per ``<hold>.waiting``
``delay``        seconds to sleep per item loaded (slow extraction, for concurrency and interrupts)
``id_prefix``    prefix of every id (spaces, unicode)
``empty``        a split with no items
``num_classes``  the spec's num_classes (default 2; ``none``: the spec declares none)
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_spec import DIM, ToyBackbone

from headcache.errors import DataError

ENCODE_MODES = ("hidden2d", "hidden4d", "short_mask", "numpy", "triple", "none")
LABELS = {"label_none": None, "label_str": "pos", "label_float": 1.5, "label_out": 5}


def _split_index(text):
    if not text:
        return None
    split, _, index = text.partition(":")
    return split, int(index)


class BadDataset(torch.utils.data.Dataset):
    def __init__(self, spec, split):
        self.spec, self.split = spec, split
        self.offset = {"train": 0, "val": 10_000, "test": 20_000}[split] + spec.seed

    def __len__(self):
        return 0 if self.split == self.spec.empty else self.spec.n

    def lengths(self):
        return [1 + (7 * i) % 9 for i in range(len(self))]

    def __getitem__(self, i):
        spec = self.spec
        if spec.delay:
            time.sleep(spec.delay)
        if spec.kill_at == (self.split, i) and not Path(spec.marker).exists():
            Path(spec.marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        if spec.sigint_at == (self.split, i) and not Path(spec.marker).exists():
            Path(spec.marker).write_text("interrupted")
            os.kill(spec.main_pid, signal.SIGINT)
        if spec.hold_at == (self.split, i) and not Path(spec.hold + ".waiting").exists():
            Path(spec.hold + ".waiting").write_text("waiting")
            deadline = time.monotonic() + 120
            while not Path(spec.hold).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if spec.stop_at == (self.split, i) and not Path(spec.marker).exists():
            Path(spec.marker).write_text("stopped")
            raise DataError(f"item {i} of split {self.split!r}: stopped here once, on purpose")
        if spec.fail_at == (self.split, i):
            raise DataError(f"item {i} of split {self.split!r} cannot be read (a failure part-way, on purpose)")
        generator = torch.Generator().manual_seed(self.offset + i)
        x = torch.randn(self.lengths()[i], DIM, generator=generator)
        label = int(x[:, 0].sum() > 0)
        if spec.mode in LABELS and self.split == "train" and i == 2:
            label = LABELS[spec.mode]
        item_id = f"{spec.id_prefix}{self.split}-{i:04d}"
        if spec.mode == "dup_ids" and self.split == "train" and i == 3:
            item_id = f"{spec.id_prefix}{self.split}-{2:04d}"
        big = torch.tensor(1.0 if spec.big_at == i and self.split == "train" else 0.0)
        return {"x": x, "big": big}, label, item_id


class BadSpec:
    name = "bad"
    splits = ("train", "val", "test")

    def __init__(self, n, mode, big_at, scale, seed, kill_at, fail_at, stop_at, marker, delay, id_prefix,
                 num_classes, empty, sigint_at, hold_at, hold):
        self.n, self.mode, self.big_at, self.scale, self.seed = n, mode, big_at, scale, seed
        self.kill_at, self.fail_at, self.stop_at = kill_at, fail_at, stop_at
        self.marker, self.delay, self.id_prefix, self.empty = marker, delay, id_prefix, empty
        self.sigint_at, self.hold_at, self.hold = sigint_at, hold_at, hold
        self.main_pid = os.getpid()  # the extracting process (DataLoader workers are forked from it)
        if num_classes is not None:
            self.num_classes = num_classes

    def backbone(self):
        return ToyBackbone()

    def dataset(self, split):
        if self.mode == "dataset_raises":
            raise RuntimeError("cannot reach the data server")
        return BadDataset(self, split)

    def collate(self, inputs):
        if self.mode == "collate_raises":
            raise TypeError("unexpected input structure")
        lengths = torch.tensor([len(item["x"]) for item in inputs])
        x = torch.zeros(len(inputs), int(lengths.max()), DIM)
        for b, item in enumerate(inputs):
            x[b, : len(item["x"])] = item["x"]
        return {"x": x, "lengths": lengths, "big": torch.stack([item["big"] for item in inputs])}

    def encode(self, backbone, batch):
        hidden = backbone(batch["x"], batch["lengths"])
        hidden = hidden * torch.where(batch["big"] > 0, 1e7, 1.0).view(-1, 1, 1)
        if self.scale != 1.0:
            hidden = hidden * self.scale
            if hidden.shape[0] > 1:
                hidden = hidden * (1.0 + 2.0 ** -23)  # one float32 ulp: batch-dependent float noise
        if self.mode == "pad_dependent":
            hidden = hidden + 0.01 * (hidden.shape[0] - 1)
        mask = torch.arange(hidden.shape[1]) < batch["lengths"].unsqueeze(1)
        if self.mode == "hidden2d":
            return hidden[..., 0], mask
        if self.mode == "hidden4d":
            return hidden.unsqueeze(1).expand(-1, 2, -1, -1), mask
        if self.mode == "short_mask":
            return hidden, mask[:, :-1]
        if self.mode == "numpy":
            return hidden.numpy(), mask.numpy()
        if self.mode == "triple":
            return hidden, mask, hidden
        if self.mode == "none":
            return None
        return hidden, mask


def make_spec(n="12", mode="ok", big_at="-1", scale="1", data="", kill_at="", fail_at="", stop_at="",
              marker="/nonexistent/marker", delay="0", id_prefix="", num_classes="2", empty="",
              sigint_at="", hold_at="", hold=""):
    seed = int((Path(data) / "seed.txt").read_text()) if data else 0
    return BadSpec(int(n), mode, int(big_at), float(scale), seed, _split_index(kill_at), _split_index(fail_at),
                   _split_index(stop_at), marker, float(delay), id_prefix,
                   None if num_classes == "none" else int(num_classes), empty, _split_index(sigint_at),
                   _split_index(hold_at), hold)


def make_raising_spec():
    """A factory that raises (say, it cannot reach its data)."""
    raise RuntimeError("the data server is down")
