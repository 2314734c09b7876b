"""The built-in ``hf`` spec, driven as a user drives it: a Hugging Face folder and a text file, no code.

The folders are real transformers models (save_pretrained), made in tmp_path.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_user_error
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, BertForMaskedLM
from typer.testing import CliRunner

from backbones.hf_models import synthetic_texts, write_csv
from headcache.backbones.hf import HFSpec, make_spec
from headcache.cli import app
from headcache.errors import ConfigError, SpecError
from headcache.extract import ExtractConfig, extract
from headcache.spec import check_encode_output, resolve_spec
from headcache.store import CacheReader

runner = CliRunner(env={"COLUMNS": "200"})
TOLERANCE = 1e-5


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def hf_extract(folder: Path, data: Path, out: Path, *extra) -> object:
    return run("extract", "--spec", "hf", "--checkpoint", folder, "--spec-opt", f"data={data}", "--out", out,
               "--dtype", "float32", "--device", "cpu", "--batch-size", "16", *extra)


def assert_predicts_the_runs_test_probabilities(model: Path, run_dir: Path, data: Path, tmp_path: Path) -> None:
    """`predict` of the exported model on the test texts, unlabelled, gives the run's own test probabilities."""
    unlabelled = write_csv(tmp_path / "new.csv", [{"id": r["id"], "text": r["text"]}
                                                  for r in rows_of(data) if r["split"] == "test"])
    preds = tmp_path / "preds.csv"
    result = run("predict", "--model", model, "--split", "new", "--out", preds, "--spec-opt", f"data={unlabelled}",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    mine, theirs = rows_of(preds), rows_of(run_dir / "predictions_test.csv")
    assert [r["id"] for r in mine] == [r["id"] for r in theirs]
    assert all(r["label"] == "" for r in mine)
    assert max(abs(float(a["p1"]) - float(b["p1"])) for a, b in zip(mine, theirs)) <= 1e-4


def transformers_states(folder: Path, texts: list[str], pairs: list[str] | None = None,
                        max_length: int | None = None) -> list[np.ndarray]:
    """What transformers itself gives for each text alone: last_hidden_state [T_i, D]."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    states = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            encoded = tokenizer(text, pairs[i] if pairs else None, return_tensors="pt",
                                truncation=max_length is not None, max_length=max_length)
            states.append(model(**encoded).last_hidden_state[0].numpy())
    return states


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_cache_equals(split, expected: list[np.ndarray]) -> None:
    assert split.n == len(expected)
    for i, want in enumerate(expected):
        got = split.sequence(i)
        assert got.shape == want.shape, (i, got.shape, want.shape)
        assert np.abs(got - want).max() <= TOLERANCE


class TestExtractAndTrain:
    def test_cache_is_transformers_last_hidden_state_and_trains(self, tmp_path, bert_folder, reviews_csv):
        cache, run_dir = tmp_path / "c.h5", tmp_path / "run"
        result = hf_extract(bert_folder, reviews_csv, cache)
        assert result.exit_code == 0, result.output
        assert "model_class: BertModel" in result.output and "truncated: {'train': 0" in result.output
        assert f"from {bert_folder} [spec load()]" in "".join(result.output.split("\n"))  # escaped, not markup
        rows = rows_of(reviews_csv)
        with CacheReader(cache) as reader:
            assert reader.splits == ["train", "val", "test"] and reader.hidden_dim == 32
            report = reader.load_report
            assert report["format"] == "spec load()" and report["loaded"] == 39
            assert report["spec_report"]["class_names"] == ["0", "1"]
            assert report["spec_report"]["unexpected"] == [] and len(report["checkpoint_sha256"]) == 64
            for name in ("train", "val", "test"):
                mine = [r for r in rows if r["split"] == name]
                split = reader.split(name)
                assert split.ids == [r["id"] for r in mine]
                assert split.labels.tolist() == [int(r["label"]) for r in mine]
                assert_cache_equals(split, transformers_states(bert_folder, [r["text"] for r in mine]))
        result = run("train", "--cache", cache, "--out", run_dir, "--epochs", "3", "--device", "cpu", "--pool", "mean",
                     "--hidden", "8", "--quiet")
        assert result.exit_code == 0, result.output
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert 0.0 <= metrics["test"]["auroc"] <= 1.0 and 0.0 <= metrics["val"]["accuracy"] <= 1.0
        assert len(rows_of(run_dir / "predictions_test.csv")) == 24

    def test_the_python_api_gives_the_same_cache(self, tmp_path, bert_folder, reviews_csv):
        cache = tmp_path / "api.h5"
        result = extract("hf", bert_folder, cache, ExtractConfig(dtype="float32", device="cpu", splits=("val",)),
                         spec_options={"data": str(reviews_csv)})
        assert result.split_sizes == {"val": 24}
        assert result.load_report.spec_report["model_class"] == "BertModel"
        mine = [r["text"] for r in rows_of(reviews_csv) if r["split"] == "val"]
        with CacheReader(cache) as reader:
            assert_cache_equals(reader.split("val"), transformers_states(bert_folder, mine))

    def test_exported_model_predicts_the_runs_own_probabilities(self, tmp_path, bert_folder, reviews_csv):
        cache, run_dir, model = tmp_path / "c.h5", tmp_path / "run", tmp_path / "model.pt"
        assert hf_extract(bert_folder, reviews_csv, cache).exit_code == 0
        assert run("train", "--cache", cache, "--out", run_dir, "--epochs", "2", "--device", "cpu", "--pool", "mean",
                   "--quiet").exit_code == 0
        result = run("export", "--spec", "hf", "--checkpoint", bert_folder, "--run", run_dir, "--out", model,
                     "--spec-opt", f"data={reviews_csv}")
        assert result.exit_code == 0, result.output
        assert_predicts_the_runs_test_probabilities(model, run_dir, reviews_csv, tmp_path)


class TestData:
    def test_unlabelled_file_extracts_with_labels_minus_one(self, tmp_path, bert_folder):
        texts, _ = synthetic_texts(10, seed=3)
        data = write_csv(tmp_path / "fresh.csv", [{"text": t} for t in texts])
        cache = tmp_path / "c.h5"
        assert hf_extract(bert_folder, data, cache).exit_code == 0
        with CacheReader(cache) as reader:
            assert reader.splits == ["fresh"]  # no split column: one split named after the file
            split = reader.split("fresh")
            assert split.labels.tolist() == [-1] * 10 and split.ids == [str(i) for i in range(10)]
            assert "class_names" not in reader.load_report["spec_report"]
            assert_cache_equals(split, transformers_states(bert_folder, texts))
        # NOTE [ Unlabelled items ] in train.py: refused as the train split, by name and flag (a second split
        # to validate on: the train split itself is refused as --val-split)
        folder = tmp_path / "two"
        folder.mkdir()
        for name in ("fresh", "later"):
            write_csv(folder / f"{name}.csv", [{"text": t} for t in texts])
        assert hf_extract(bert_folder, folder, cache, "--overwrite").exit_code == 0
        result = run("train", "--cache", cache, "--out", tmp_path / "run", "--train-split", "fresh", "--val-split",
                     "later", "--device", "cpu", "--quiet")
        assert_user_error(result, "split 'fresh' is unlabelled: the train split needs a label for every item",
                          "--train-split")
        assert not (tmp_path / "run" / "metrics.json").exists()

    def test_string_labels_map_to_sorted_classes(self, tmp_path, bert_folder):
        texts, _ = synthetic_texts(9, seed=4)
        names = ["pos", "neg", "neutral"] * 3
        data = write_csv(tmp_path / "three.csv", [{"text": t, "label": y} for t, y in zip(texts, names)])
        spec = make_spec(str(data))
        assert spec.class_names == ["neg", "neutral", "pos"] and spec.num_classes == 3
        cache = tmp_path / "c.h5"
        assert hf_extract(bert_folder, data, cache).exit_code == 0
        with CacheReader(cache) as reader:
            assert reader.split("three").labels.tolist() == [2, 0, 1] * 3
            assert reader.load_report["spec_report"]["class_names"] == ["neg", "neutral", "pos"]

    def test_integer_labels_sort_as_numbers_and_empty_ones_are_unlabelled(self, tmp_path):
        data = write_csv(tmp_path / "d.csv", [{"text": "a", "label": v} for v in ("10", "9", "", "2")])
        spec = make_spec(str(data))
        assert spec.class_names == ["2", "9", "10"]
        spec._encoded["d"] = {"input_ids": [[1]] * 4}  # the tokenizer's part, which load() does
        assert [spec.dataset("d")[i][1] for i in range(4)] == [2, 1, None, 0]

    def test_a_folder_gives_one_split_per_file(self, tmp_path, bert_folder):
        texts, labels = synthetic_texts(30, seed=5)
        folder = tmp_path / "data"
        folder.mkdir()
        write_csv(folder / "train.csv", [{"text": t, "label": y} for t, y in zip(texts[:14], labels[:14])])
        (folder / "valid.jsonl").write_text("".join(json.dumps({"id": f"v{i}", "text": t, "label": y}) + "\n"
                                                    for i, (t, y) in enumerate(zip(texts[14:22], labels[14:22]))))
        pq.write_table(pa.table({"text": texts[22:]}), folder / "test.parquet")
        (folder / "notes.md").write_text("not data")
        cache = tmp_path / "c.h5"
        assert hf_extract(bert_folder, folder, cache).exit_code == 0
        with CacheReader(cache) as reader:
            assert reader.splits == ["train", "valid", "test"]
            assert [reader.split(s).n for s in reader.splits] == [14, 8, 8]
            assert reader.split("valid").ids == [f"v{i}" for i in range(8)]
            assert reader.split("valid").labels.tolist() == labels[14:22]
            assert reader.split("test").labels.tolist() == [-1] * 8
            assert_cache_equals(reader.split("test"), transformers_states(bert_folder, texts[22:]))

    def test_tsv_with_text_pairs(self, tmp_path, bert_folder):
        texts, labels = synthetic_texts(8, seed=6)
        data = tmp_path / "pairs.tsv"
        data.write_text("q\tanswer\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in
                                                       zip(texts, reversed(texts), labels)))
        cache = tmp_path / "c.h5"
        result = hf_extract(bert_folder, data, cache, "--spec-opt", "text_column=q", "--spec-opt",
                            "text_pair_column=answer")
        assert result.exit_code == 0, result.output
        with CacheReader(cache) as reader:
            assert_cache_equals(reader.split("pairs"), transformers_states(bert_folder, texts, texts[::-1]))

    def test_max_length_truncates_and_counts(self, tmp_path, bert_folder, reviews_csv):
        cache = tmp_path / "c.h5"
        result = hf_extract(bert_folder, reviews_csv, cache, "--spec-opt", "max_length=8", "--splits", "val")
        assert result.exit_code == 0, result.output
        texts = [r["text"] for r in rows_of(reviews_csv) if r["split"] == "val"]
        tokenizer = AutoTokenizer.from_pretrained(bert_folder)
        cut = sum(len(tokenizer(t)["input_ids"]) > 8 for t in texts)
        assert 0 < cut < len(texts)
        with CacheReader(cache) as reader:
            assert reader.load_report["spec_report"]["truncated"]["val"] == cut
            assert reader.load_report["spec_report"]["max_length"] == 8
            assert_cache_equals(reader.split("val"), transformers_states(bert_folder, texts, max_length=8))

    def test_missing_text_column_is_named(self, tmp_path, bert_folder):
        data = write_csv(tmp_path / "d.csv", [{"body": "hello", "label": 1}])
        assert_user_error(hf_extract(bert_folder, data, tmp_path / "c.h5"), "no column 'text'", "body",
                          "--spec-opt text_column=")

    def test_duplicate_ids_are_refused(self, tmp_path, bert_folder):
        data = write_csv(tmp_path / "d.csv", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
        assert_user_error(hf_extract(bert_folder, data, tmp_path / "c.h5"), "id 'x' appears twice")


class TestModelFolder:
    def test_sentence_transformers_folder_works_as_it_is(self, tmp_path, st_folder, reviews_csv):
        cache = tmp_path / "c.h5"
        result = hf_extract(st_folder, reviews_csv, cache, "--splits", "test")
        assert result.exit_code == 0, result.output
        assert "recommended_pool: mean" in result.output
        texts = [r["text"] for r in rows_of(reviews_csv) if r["split"] == "test"]
        model_dir = st_folder / "0_Transformer"
        cut = sum(len(AutoTokenizer.from_pretrained(model_dir)(t)["input_ids"]) > 12 for t in texts)
        with CacheReader(cache) as reader:
            spec_report = reader.load_report["spec_report"]
            assert spec_report["recommended_pool"] == "mean" and spec_report["max_length"] == 12  # its max_seq_length
            assert 0 < spec_report["truncated"]["test"] == cut
            assert_cache_equals(reader.split("test"), transformers_states(model_dir, texts, max_length=12))

    def test_inspect_and_train_show_the_models_own_pooling(self, tmp_path, st_folder, reviews_csv):
        cache = tmp_path / "c.h5"
        assert hf_extract(st_folder, reviews_csv, cache).exit_code == 0
        result = run("inspect", cache)
        assert result.exit_code == 0, result.output
        assert "this model was trained for mean pooling: try --pool mean" in " ".join(result.output.split())
        result = run("train", "--cache", cache, "--out", tmp_path / "meanq", "--epochs", "1", "--device", "cpu",
                     "--quiet")
        assert result.exit_code == 0, result.output
        assert ("warning: this model was trained for mean pooling: try --pool mean; this run uses --pool meanq"
                in " ".join(result.output.split()))
        result = run("train", "--cache", cache, "--out", tmp_path / "mean", "--epochs", "1", "--device", "cpu",
                     "--pool", "mean", "--quiet")
        assert result.exit_code == 0 and "trained for" not in result.output, result.output

    def test_a_plain_folder_gets_no_pooling_advice(self, tmp_path, bert_folder, reviews_csv):
        cache = tmp_path / "c.h5"
        assert hf_extract(bert_folder, reviews_csv, cache, "--splits", "val").exit_code == 0
        result = run("inspect", cache)
        assert result.exit_code == 0 and "trained for" not in result.output, result.output

    def test_cls_pooling_of_a_new_sentence_transformers_config(self, tmp_path, st_folder):
        folder = tmp_path / "st"
        shutil.copytree(st_folder, folder)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32,
                                                                       "pooling_mode": "cls"}))
        spec = make_spec(str(write_csv(tmp_path / "d.csv", [{"text": "good film"}])))
        spec.load(folder)
        assert spec.recommended_pool == "first token"

    def test_mlm_folder_reports_its_head_and_drops_the_missing_pooler(self, tmp_path, bert_folder, reviews_csv):
        folder = tmp_path / "mlm"
        base = AutoModel.from_pretrained(bert_folder)
        mlm = BertForMaskedLM(base.config)
        mlm.bert.load_state_dict(base.state_dict(), strict=False)  # BertForMaskedLM's bert has no pooler
        mlm.save_pretrained(folder)
        AutoTokenizer.from_pretrained(bert_folder).save_pretrained(folder)
        cache = tmp_path / "c.h5"
        result = hf_extract(folder, reviews_csv, cache, "--splits", "val")
        assert result.exit_code == 0, result.output
        texts = [r["text"] for r in rows_of(reviews_csv) if r["split"] == "val"]
        with CacheReader(cache) as reader:
            spec_report = reader.load_report["spec_report"]
            assert spec_report["unexpected"] == sorted(k for k in load_file(folder / "model.safetensors")
                                                       if k.startswith("cls."))
            assert "pooler_removed" in spec_report and reader.load_report["loaded"] == 37
            assert_cache_equals(reader.split("val"), transformers_states(bert_folder, texts))

    def test_missing_weight_tensor_is_refused_by_name(self, tmp_path, bert_folder, reviews_csv):
        folder = tmp_path / "partial"
        shutil.copytree(bert_folder, folder)
        state = load_file(folder / "model.safetensors")
        del state["encoder.layer.1.output.dense.weight"]
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        result = hf_extract(folder, reviews_csv, tmp_path / "c.h5")
        assert_user_error(result, "encoder.layer.1.output.dense.weight", "initialise them at random")
        assert not (tmp_path / "c.h5").exists()

    @pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors"])
    def test_missing_file_is_named(self, tmp_path, bert_folder, reviews_csv, name):
        folder = tmp_path / "broken"
        shutil.copytree(bert_folder, folder)
        (folder / name).unlink()
        assert_user_error(hf_extract(folder, reviews_csv, tmp_path / "c.h5"), f"{folder / name} does not exist")

    def test_code_in_the_folder_needs_trust_remote_code(self, tmp_path, bert_folder, reviews_csv):
        folder = tmp_path / "custom"
        shutil.copytree(bert_folder, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="custom-bert", auto_map={"AutoModel": "modeling_custom.CustomModel"})
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "modeling_custom.py").write_text("raise SystemExit('this code must not run')\n")
        assert_user_error(hf_extract(folder, reviews_csv, tmp_path / "c.h5"), "trust_remote_code=true")

    def test_checkpoint_that_is_not_a_folder(self, tmp_path, reviews_csv):
        assert_user_error(hf_extract(reviews_csv, reviews_csv, tmp_path / "c.h5"), "is not a folder")

    def test_without_transformers_the_extra_is_named(self, tmp_path, bert_folder, reviews_csv, monkeypatch):
        monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
        with pytest.raises(SpecError, match=re.escape("pip install 'headcache[hf]'")):
            resolve_spec("hf", {"data": str(reviews_csv)})
        # the CLI prints messages as rich markup: escaped, so "[hf]" is not taken for a style tag
        assert_user_error(hf_extract(bert_folder, reviews_csv, tmp_path / "c.h5"),
                          "--spec hf needs transformers, tokenizers and safetensors: pip install 'headcache[hf]'")


def loaded_spec(folder: Path, data: Path, **options) -> tuple[object, torch.nn.Module]:
    """An hf spec loaded from ``folder`` as extraction loads it (eval mode), with ``--spec-opt`` options."""
    spec = make_spec(str(data), **options)
    module, _ = spec.load(folder)
    return spec, module.eval()


def val_batch(spec, n: int = 8) -> dict[str, torch.Tensor]:
    """The first ``n`` val texts, collated by the spec: lengths differ, so the batch has padding."""
    dataset = spec.dataset("val")
    batch = spec.collate([dataset[i][0] for i in range(n)])
    assert batch["attention_mask"].sum(1).unique().numel() > 1
    return batch


class TestLayers:
    """--spec-opt layers (NOTE [ hf layer ids ]): the hidden states a cache holds, numbered as transformers does."""

    def test_all_is_transformers_hidden_states_stacked(self, bert_folder, reviews_csv):
        spec, module = loaded_spec(bert_folder, reviews_csv, layers="all")
        assert spec.layers == [0, 1, 2]  # the embeddings and both layers of the 2-layer model
        batch = val_batch(spec)
        with torch.inference_mode():
            output = spec.encode(module, batch)
            theirs = AutoModel.from_pretrained(bert_folder, local_files_only=True).eval()(
                **batch, output_hidden_states=True)
        hidden, mask = check_encode_output(output, batch_size=8, layers=spec.layers)  # the 4-D form is accepted
        expected = torch.stack(theirs.hidden_states, 1)
        assert hidden.shape == expected.shape == (8, 3, batch["input_ids"].shape[1], 32)
        assert torch.equal(mask, batch["attention_mask"].bool())
        real = mask[:, None, :, None].expand_as(hidden)
        assert (hidden - expected)[real].abs().max() <= 1e-6
        assert not torch.allclose(hidden[:, 0], hidden[:, 2])  # three different layers, not one repeated

    @pytest.mark.parametrize("option", [{}, {"layers": "last"}, {"layers": "-1"}, {"layers": "2"}])
    def test_last_is_last_hidden_state_as_before_and_names_its_layer(self, bert_folder, reviews_csv, option):
        spec, module = loaded_spec(bert_folder, reviews_csv, **option)
        assert spec.layers == [2]  # recorded in the cache, so inspect can say which layer it holds
        batch = val_batch(spec)
        with torch.inference_mode():
            hidden, _ = check_encode_output(spec.encode(module, batch), batch_size=8, layers=spec.layers)
            before = module(**batch, return_dict=True).last_hidden_state  # what encode returned before layers
        assert torch.equal(hidden, before)

    def test_chosen_layers_resolve_to_ids_in_the_order_given(self, bert_folder, reviews_csv):
        spec, module = loaded_spec(bert_folder, reviews_csv, layers="0,-1")
        assert spec.layers == [0, 2]
        reverse, _ = loaded_spec(bert_folder, reviews_csv, layers="-1, 0")
        assert reverse.layers == [2, 0]
        middle, _ = loaded_spec(bert_folder, reviews_csv, layers="-2")
        assert middle.layers == [1]
        batch = val_batch(spec)
        with torch.inference_mode():
            theirs = module(**batch, output_hidden_states=True, return_dict=True)
            pair, _ = spec.encode(module, batch)
            backwards, _ = reverse.encode(module, batch)
            one, _ = middle.encode(module, batch)
        assert pair.shape == (8, 2, batch["input_ids"].shape[1], 32)
        assert torch.equal(pair[:, 0], theirs.hidden_states[0]) and torch.equal(pair[:, 1], theirs.last_hidden_state)
        assert torch.equal(backwards, pair.flip(1))
        assert one.shape == (8, batch["input_ids"].shape[1], 32) and torch.equal(one, theirs.hidden_states[1])

    @pytest.mark.parametrize("text", ["first", "1.5", "", "0,,1", "all,0", "1,1"])
    def test_text_that_is_no_layer_list_is_refused_when_the_spec_is_made(self, reviews_csv, text):
        message = "given twice" if text == "1,1" else "expected last, all or comma-separated layer indexes"
        with pytest.raises(ConfigError, match=re.escape(f"--spec-opt layers={text}: ") + ".*" + message):
            make_spec(str(reviews_csv), layers=text)

    @pytest.mark.parametrize("text, message", [
        ("99", "layer 99 is out of range: this model has layers 0..2 (0 = the embeddings, 2 = last_hidden_state"),
        ("-4", "layer -4 is out of range: this model has layers 0..2"),
        ("2,-1", "2 and -1 are both layer 2 (negative indexes count from the end, -1 = 2); name each layer once"),
    ])
    def test_a_layer_the_model_lacks_is_refused_when_it_loads(self, bert_folder, reviews_csv, text, message):
        spec = make_spec(str(reviews_csv), layers=text)
        with pytest.raises(ConfigError, match=re.escape(f"--spec-opt layers={text}: {message}")):
            spec.load(bert_folder)

    @pytest.mark.parametrize("text, fragments", [
        ("99", ["--spec-opt layers=99: layer 99 is out of range", "0..2", "or -3..-1 counting from the end"]),
        ("top", ["--spec-opt layers=top: expected last, all or comma-separated layer indexes"]),
    ])
    def test_the_cli_prints_one_line_naming_the_option(self, tmp_path, bert_folder, reviews_csv, text, fragments):
        cache = tmp_path / "c.h5"
        result = hf_extract(bert_folder, reviews_csv, cache, "--spec-opt", f"layers={text}")
        assert_user_error(result, *fragments)
        assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]
        assert not cache.exists()

    def test_layers_are_known_only_once_the_model_is_read(self, reviews_csv):
        with pytest.raises(SpecError, match=re.escape("layers are known after load(checkpoint)")):
            make_spec(str(reviews_csv), layers="all").layers

    def test_a_config_without_num_hidden_layers_keeps_last_and_refuses_the_rest(self, bert_folder, reviews_csv,
                                                                                 monkeypatch):
        load = HFSpec._from_pretrained

        def unnumbered(self, model_dir):
            model, info = load(self, model_dir)
            # as a config that does not say how many layers it has (past the config's own type check)
            object.__setattr__(model.config, "num_hidden_layers", None)
            return model, info

        monkeypatch.setattr(HFSpec, "_from_pretrained", unnumbered)
        spec, module = loaded_spec(bert_folder, reviews_csv)
        assert spec.layers is None  # one layer, unnumbered: the contract's "the spec's output"
        batch = val_batch(spec)
        with torch.inference_mode():
            hidden, _ = spec.encode(module, batch)
            assert torch.equal(hidden, module(**batch, return_dict=True).last_hidden_state)
        with pytest.raises(ConfigError, match=r"--spec-opt layers=all: .*config.json has no num_hidden_layers.*"
                                              "use layers=last"):
            make_spec(str(reviews_csv), layers="all").load(bert_folder)

    def test_a_model_whose_hidden_states_do_not_fit_its_config_is_refused(self, bert_folder, reviews_csv,
                                                                          monkeypatch):
        load = HFSpec._from_pretrained

        def miscounted(self, model_dir):
            model, info = load(self, model_dir)
            model.config.num_hidden_layers = 3  # says 3 layers, runs 2: ids would name the wrong states
            return model, info

        monkeypatch.setattr(HFSpec, "_from_pretrained", miscounted)
        spec, module = loaded_spec(bert_folder, reviews_csv, layers="all")
        assert spec.layers == [0, 1, 2, 3]
        with torch.inference_mode(), pytest.raises(SpecError, match="returned 3 hidden states, but its config's "
                                                                    "num_hidden_layers is 3 .expected 4."):
            spec.encode(module, val_batch(spec))


class TestEveryLayerFromOneCache:
    """Issue 11's Done-when: extract every layer once, then sweep every layer and the mix from that cache."""

    def test_extract_all_layers_then_sweep_every_layer_and_the_mix(self, tmp_path, bert_folder, reviews_csv):
        cache, out = tmp_path / "c.h5", tmp_path / "sweep"
        result = hf_extract(bert_folder, reviews_csv, cache, "--spec-opt", "layers=all")
        assert result.exit_code == 0, result.output
        summary = json.loads(run("inspect", cache, "--json").output)
        assert (summary["layers"], summary["token_layers"]) == ([0, 1, 2], [2])
        with CacheReader(cache) as reader:  # every layer's mean pool is transformers' hidden state, pooled
            states = transformers_hidden_states(bert_folder, [r["text"] for r in rows_of(reviews_csv)
                                                              if r["split"] == "val"])
            pooled = reader.split("val").pooled("mean", "all")
            assert pooled.shape == (24, 3, 32)
            expected = np.stack([s.mean(1) for s in states])  # (N, L, D)
            assert np.abs(pooled - expected).max() <= TOLERANCE
        result = run("sweep", "--cache", cache, "--out", out, "--grid", "layer=0,1,2,mix", "--epochs", "3",
                     "--device", "cpu", "--pool", "mean", "--hidden", "8", "--quiet")
        assert result.exit_code == 0, result.output
        assert "4 heads trained in 1 batched" in " ".join(result.output.split())  # a layer is a slice of one matrix
        board = json.loads((out / "leaderboard.json").read_text())
        assert sorted(str(row["layer"]) for row in board) == ["0", "1", "2", "mix"]
        assert (out / "layer_curve.png").stat().st_size > 0
        runs = {json.loads((d / "config.json").read_text())["train"]["layer"]: d for d in (out / "runs").iterdir()}
        weights = json.loads((runs["mix"] / "metrics.json").read_text())["layer_weights"]
        assert sorted(weights) == ["0", "1", "2"] and abs(sum(weights.values()) - 1) <= 1e-6
        assert (runs["mix"] / "layer_weights.png").stat().st_size > 0
        for layer in ("0", "1", "2"):
            assert "layer_weights" not in json.loads((runs[layer] / "metrics.json").read_text())
            record = json.loads((runs[layer] / "config.json").read_text())
            assert (record["layers"], record["token_layers"]) == ([0, 1, 2], [2])

    @pytest.mark.parametrize("layer", ["1", "mix"])
    def test_a_layer_or_mix_head_exports_and_predicts_its_runs_probabilities(self, tmp_path, bert_folder,
                                                                             reviews_csv, layer):
        cache, run_dir, model = tmp_path / "c.h5", tmp_path / "run", tmp_path / "model.pt"
        assert hf_extract(bert_folder, reviews_csv, cache, "--spec-opt", "layers=all").exit_code == 0
        result = run("train", "--cache", cache, "--out", run_dir, "--epochs", "2", "--device", "cpu", "--pool",
                     "meanq", "--layer", layer, "--quiet")
        assert result.exit_code == 0, result.output
        if layer == "mix":
            assert re.search(r"layer mix \(softmax weight per layer\): 0: 0\.\d+, 1: 0\.\d+, 2: 0\.\d+", result.output)
        result = run("export", "--spec", "hf", "--checkpoint", bert_folder, "--run", run_dir, "--out", model,
                     "--spec-opt", f"data={reviews_csv}")
        assert_user_error(result, "the head reads layers", "--spec-opt layers=all")  # without the extraction's layers
        result = run("export", "--spec", "hf", "--checkpoint", bert_folder, "--run", run_dir, "--out", model,
                     "--spec-opt", f"data={reviews_csv}", "--spec-opt", "layers=all")
        assert result.exit_code == 0, result.output
        assert_predicts_the_runs_test_probabilities(model, run_dir, reviews_csv, tmp_path)


def transformers_hidden_states(folder: Path, texts: list[str]) -> list[np.ndarray]:
    """Every hidden state transformers gives for each text alone: (L, T_i, D)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return [torch.stack(model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states,
                            1)[0].numpy() for text in texts]
