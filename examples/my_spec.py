"""A complete spec: your own encoder over ragged sequences stored as arrays.

Each split is one .npz file with `x` (all time steps of all sequences, stacked:
(sum T_i, F)), `offsets` (N + 1: sequence i is x[offsets[i]:offsets[i+1]]),
`labels` (N,) and `ids` (N,).
"""
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Encoder(nn.Module):
    """Stands in for your pretrained model: the architecture only, headcache loads the weights."""

    def __init__(self, features: int = 12, width: int = 64):
        super().__init__()
        self.proj = nn.Linear(features, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.relu(self.proj(x)))
        return self.norm(out)


class Sequences(torch.utils.data.Dataset):
    def __init__(self, path: Path):
        arrays = np.load(path)
        self.x, self.offsets = arrays["x"].astype(np.float32), arrays["offsets"]
        self.labels, self.ids = arrays["labels"], arrays["ids"]

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:  # optional: lets extraction batch similar lengths together
        return np.diff(self.offsets).tolist()

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.x[self.offsets[i]:self.offsets[i + 1]])
        return x, int(self.labels[i]), str(self.ids[i])


class MySpec:
    name = "my-encoder"
    splits = ("train", "val", "test")
    num_classes = 2

    def __init__(self, data: str):
        self.data = Path(data)

    def backbone(self) -> nn.Module:
        return Encoder()

    def dataset(self, split: str) -> Sequences:
        return Sequences(self.data / f"{split}.npz")

    def collate(self, inputs: list[torch.Tensor]) -> dict:
        lengths = torch.tensor([len(x) for x in inputs])
        return {"x": nn.utils.rnn.pad_sequence(inputs, batch_first=True), "lengths": lengths}

    def encode(self, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = backbone(batch["x"])  # (B, T, 64); a GRU never looks ahead, so padding cannot leak in
        steps = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden, steps < batch["lengths"].unsqueeze(1)


def make_spec(data: str = "my_data") -> MySpec:
    return MySpec(data)
