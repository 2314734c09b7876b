"""Session fixtures of the backbone tests: the tiny Hugging Face folders and texts of hf_models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbones.hf_models import synthetic_texts, write_bert_folder, write_csv, write_sentence_transformers_folder


@pytest.fixture(autouse=True)
def _own_random_state():
    """These tests draw from torch's global generator (model init, inputs); tests after them must not
    see a different generator state than they would without them."""
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny BertModel folder (2 layers, hidden 32); read-only: copy it before changing it."""
    return write_bert_folder(tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture(scope="session")
def st_folder(tmp_path_factory, bert_folder) -> Path:
    """bert_folder as a sentence-transformers folder (max_seq_length 12, mean pooling); read-only."""
    return write_sentence_transformers_folder(bert_folder, tmp_path_factory.mktemp("st") / "st", max_seq_length=12)


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory) -> Path:
    """120 labelled texts with a split column: train 72, val 24, test 24."""
    texts, labels = synthetic_texts(120, seed=1)
    splits = ["train"] * 72 + ["val"] * 24 + ["test"] * 24
    rows = [{"id": f"r{i}", "text": t, "label": y, "split": s} for i, (t, y, s) in enumerate(zip(texts, labels, splits))]
    return write_csv(tmp_path_factory.mktemp("reviews") / "reviews.csv", rows)
