"""Real third-party models made here, no network: a BERT folder (transformers' save_pretrained, a
WordPiece vocabulary trained with the tokenizers library), the same laid out as a
sentence-transformers folder, and texts whose label a model of the words can find.

Used by the backbone tests and by benchmarks/bench_hf.py."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch

GOOD = ("good", "great", "fine", "lovely", "superb")
BAD = ("bad", "awful", "poor", "dull", "boring")
FILLER = ("the", "movie", "film", "plot", "actor", "was", "and", "a", "story", "scene", "music", "very")
MAX_POSITIONS = 40


def synthetic_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of 3-14 words; label 1 when the sentiment words are mostly good."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.random() < 0.5)
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 12))))
        words += list(rng.choice(GOOD if label else BAD, size=int(rng.integers(1, 3))))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_bert_folder(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                      max_positions: int = MAX_POSITIONS, texts: list[str] | None = None) -> Path:
    """A randomly initialised BertModel and its WordPiece tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    corpus = texts or synthetic_texts(200, seed=99)[0]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=max_positions)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=max_positions,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():  # seeded here without touching the caller's generator
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sentence_transformers_folder(bert: Path, folder: Path, *, max_seq_length: int) -> Path:
    """``bert`` as a sentence-transformers folder: the model in ``0_Transformer``, mean pooling."""
    shutil.copytree(bert, folder / "0_Transformer")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (folder / "0_Transformer" / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return folder


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
