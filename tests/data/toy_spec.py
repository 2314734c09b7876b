"""A spec written outside headcache, as a user would: random ragged sequences and a GRU.

Used by the tests as `--spec tests/data/toy_spec.py:make_spec`. Options:
``n`` sequences per split, ``kill_at`` (SIGKILL the process when that train
item is loaded, once per ``marker`` file: an interrupted extraction),
``nan_at`` (the backbone returns NaN for that item), ``empty_at`` (that item
has no positions).
"""
import os
import signal
from pathlib import Path

import torch
from torch import nn

DIM, HIDDEN = 4, 8


class ToyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, HIDDEN)
        self.rnn = nn.GRU(HIDDEN, HIDDEN, batch_first=True)

    def forward(self, x, lengths):
        out, _ = self.rnn(torch.tanh(self.proj(x)))
        return out


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, split, n, kill_at, nan_at, empty_at, marker):
        self.split, self.n = split, n
        self.kill_at, self.nan_at, self.empty_at, self.marker = kill_at, nan_at, empty_at, marker
        self.offset = {"train": 0, "val": 10_000, "test": 20_000}[split]

    def __len__(self):
        return self.n

    def lengths(self):
        return [1 + (7 * i) % 13 for i in range(self.n)]

    def __getitem__(self, i):
        if self.split == "train" and i == self.kill_at and not Path(self.marker).exists():
            Path(self.marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        generator = torch.Generator().manual_seed(self.offset + i)
        length = 0 if i == self.empty_at else self.lengths()[i]
        x = torch.randn(length, DIM, generator=generator)
        label = int(x[:, 0].sum() > 0) if length else 0
        flag = torch.tensor(1.0 if i == self.nan_at and self.split == "train" else 0.0)
        return {"x": x, "nan": flag}, label, f"{self.split}-{i:04d}"


class ToySpec:
    name = "toy"
    splits = ("train", "val", "test")
    num_classes = 2

    def __init__(self, n, kill_at, nan_at, empty_at, marker):
        self.options = (n, kill_at, nan_at, empty_at, marker)

    def backbone(self):
        return ToyBackbone()

    def dataset(self, split):
        return ToyDataset(split, *self.options)

    def collate(self, inputs):
        lengths = torch.tensor([len(item["x"]) for item in inputs])
        x = torch.zeros(len(inputs), max(int(lengths.max()), 1), DIM)
        for b, item in enumerate(inputs):
            x[b, : len(item["x"])] = item["x"]
        return {"x": x, "lengths": lengths, "nan": torch.stack([item["nan"] for item in inputs])}

    def encode(self, backbone, batch):
        hidden = backbone(batch["x"], batch["lengths"])
        hidden = torch.where(batch["nan"].view(-1, 1, 1) > 0, float("nan"), hidden)
        mask = torch.arange(hidden.shape[1]) < batch["lengths"].unsqueeze(1)
        return hidden, mask


def make_spec(n="40", kill_at="-1", nan_at="-1", empty_at="-1", marker="/nonexistent/marker"):
    return ToySpec(int(n), int(kill_at), int(nan_at), int(empty_at), marker)
