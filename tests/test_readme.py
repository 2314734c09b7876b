"""The README's spec example is examples/my_spec.py, word for word, and it works as the README says."""
from __future__ import annotations

import json
import re

import numpy as np
import torch
from conftest import REPO
from typer.testing import CliRunner

from headcache.cli import app


def test_readme_shows_the_example_file_verbatim():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert (REPO / "examples" / "my_spec.py").read_text() in blocks


def test_the_example_spec_extracts_and_trains(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 80), ("val", 30), ("test", 30)):
        lengths = rng.integers(3, 15, n)
        labels = rng.integers(0, 2, n)
        x = rng.normal(size=(lengths.sum(), 12)) + np.repeat(labels, lengths)[:, None] * 0.5
        np.savez(tmp_path / f"{split}.npz", x=x, offsets=np.concatenate([[0], np.cumsum(lengths)]), labels=labels,
                 ids=np.array([f"{split}-{i}" for i in range(n)]))
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from my_spec import Encoder

    with torch.random.fork_rng():  # the encoder's random init, whatever the tests before drew (3 of 8 seeds fail)
        torch.manual_seed(0)
        encoder = Encoder()
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    runner = CliRunner()
    spec = f"{REPO / 'examples' / 'my_spec.py'}:make_spec"
    result = runner.invoke(app, ["extract", "--spec", spec, "--spec-opt", f"data={tmp_path}", "--checkpoint",
                                 str(tmp_path / "encoder.pt"), "--out", str(tmp_path / "cache.h5"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--cache", str(tmp_path / "cache.h5"), "--out", str(tmp_path / "run"),
                                 "--epochs", "5", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["auroc"] > 0.6  # the label shifts every feature: a head must find it


def test_the_python_api_is_the_commands(tmp_path, tiny_demo, tiny_options):
    """headcache.extract / headcache.train, as the README shows them, return result objects."""
    import headcache

    extracted = headcache.extract("seqsetvae", tiny_demo.checkpoint, tmp_path / "c.h5",
                                  headcache.ExtractConfig(device="cpu"), spec_options=tiny_options)
    spec = headcache.resolve_spec("seqsetvae", tiny_options)
    assert extracted.load_report.loaded == len(spec.backbone().state_dict())
    assert extracted.split_sizes == {split: len(spec.dataset(split)) for split in ("train", "valid", "test")}
    assert sum(extracted.split_sizes.values()) == 80
    run = headcache.train(tmp_path / "c.h5", tmp_path / "run", headcache.TrainConfig(epochs=2, device="cpu"))
    assert run.run_dir == tmp_path / "run" and set(run.metrics) == {"val", "test"}
    with headcache.CacheReader(tmp_path / "c.h5") as reader:
        assert reader.backbone_fingerprint == extracted.load_report.fingerprint


# ---------------------------------------------------------------------------- the quick starts, word for word


def quick_start(title: str) -> tuple[list[str], list[str]]:
    """The bash lines and python blocks of the README's "### Quick start: <title>" section."""
    readme = (REPO / "README.md").read_text()
    start = readme.index(f"### Quick start: {title}")
    section = readme[start:readme.index("\n### ", start + 1)]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
             for line in block.splitlines() if line.strip()]
    return lines, re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_verbatim(lines: list[str], folder, monkeypatch) -> list:
    """Each line, split as bash splits it, through the CLI in ``folder`` (a clone has cache/ there)."""
    import shlex

    monkeypatch.chdir(folder)
    (folder / "cache").mkdir(exist_ok=True)
    results = []
    for line in lines:
        words = shlex.split(line)
        assert words[0] == "headcache", line  # the quick starts are headcache commands only
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
        results.append(result)
    return results


def csv_rows(path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_npz_split(path, n: int, rng, *, features: int = 12) -> None:
    lengths = rng.integers(3, 15, n)
    labels = rng.integers(0, 2, n)
    x = rng.normal(size=(lengths.sum(), features)) + np.repeat(labels, lengths)[:, None] * 0.5
    np.savez(path, x=x.astype(np.float32), offsets=np.concatenate([[0], np.cumsum(lengths)]), labels=labels,
             ids=np.array([f"{path.stem}-{i}" for i in range(n)]))


def test_quick_start_hugging_face_folder(tmp_path, monkeypatch):
    from backbones.hf_models import synthetic_texts, write_bert_folder, write_csv

    lines, _ = quick_start("a Hugging Face folder")
    assert len(lines) == 4 and "--spec hf --checkpoint MODEL_FOLDER" in lines[0]
    write_bert_folder(tmp_path / "MODEL_FOLDER")
    texts, labels = synthetic_texts(120, seed=1)
    splits = ["train"] * 72 + ["val"] * 24 + ["test"] * 24
    rows = [{"id": f"r{i}", "text": t, "label": y, "split": s} for i, (t, y, s) in enumerate(zip(texts, labels, splits))]
    write_csv(tmp_path / "reviews.csv", rows)
    write_csv(tmp_path / "new.csv", [{"id": r["id"], "text": r["text"]} for r in rows if r["split"] == "test"])
    with torch.random.fork_rng():
        run_verbatim(lines, tmp_path, monkeypatch)
    metrics = json.loads((tmp_path / "runs" / "reviews" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auroc"] <= 1.0 and json.loads(
        (tmp_path / "runs" / "reviews" / "config.json").read_text())["train"]["pool"] == "mean"
    # the unlabelled file: ids and the run's own probabilities for the same texts, labels empty
    mine, theirs = csv_rows(tmp_path / "new-predictions.csv"), csv_rows(tmp_path / "runs/reviews/predictions_test.csv")
    assert [r["id"] for r in mine] == [r["id"] for r in theirs] == [f"r{i}" for i in range(96, 120)]
    assert all(r["label"] == "" for r in mine)
    assert max(abs(float(a["p1"]) - float(b["p1"])) for a, b in zip(mine, theirs)) <= 1e-4


def test_quick_start_every_layer_from_one_cache(tmp_path, monkeypatch):
    from backbones.hf_models import synthetic_texts, write_bert_folder, write_csv

    lines, _ = quick_start("every layer from one cache")
    assert len(lines) == 3 and "--spec-opt layers=all" in lines[0] and "--grid layer=0,1,2,mix" in lines[1]
    write_bert_folder(tmp_path / "MODEL_FOLDER")  # 2 layers: hidden states 0, 1, 2
    texts, labels = synthetic_texts(120, seed=1)
    splits = ["train"] * 72 + ["val"] * 24 + ["test"] * 24
    write_csv(tmp_path / "reviews.csv", [{"id": f"r{i}", "text": t, "label": y, "split": s}
                                         for i, (t, y, s) in enumerate(zip(texts, labels, splits))])
    with torch.random.fork_rng():
        results = run_verbatim(lines, tmp_path, monkeypatch)
    board = json.loads((tmp_path / "sweeps" / "layers" / "leaderboard.json").read_text())
    assert sorted(str(row["layer"]) for row in board) == ["0", "1", "2", "mix"]
    assert (tmp_path / "sweeps" / "layers" / "layer_curve.png").is_file()
    weights = json.loads((tmp_path / "runs" / "mix" / "metrics.json").read_text())["layer_weights"]
    assert sorted(weights) == ["0", "1", "2"] and "layer mix (softmax weight per layer)" in results[2].output


def test_quick_start_exported_program(tmp_path, monkeypatch):
    from headcache.store import CacheReader

    lines, [python] = quick_start("an exported program")
    assert "--spec exported --checkpoint encoder.pt2 --spec-opt data=my_data" in lines[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exec(compile(python, "README.md", "exec"), namespace)  # writes encoder.pt2, as the README says
    assert (tmp_path / "encoder.pt2").is_file()
    rng = np.random.default_rng(0)
    (tmp_path / "my_data").mkdir()
    for split, n in (("train", 80), ("val", 30), ("test", 30)):
        write_npz_split(tmp_path / "my_data" / f"{split}.npz", n, rng)
    with torch.random.fork_rng():
        run_verbatim(lines, tmp_path, monkeypatch)
    arrays = np.load(tmp_path / "my_data" / "val.npz")
    x = torch.from_numpy(arrays["x"][arrays["offsets"][0]:arrays["offsets"][1]])[None]
    with torch.no_grad():
        want = namespace["encoder"](x, torch.ones(x.shape[:2], dtype=torch.bool))[0].numpy()
    with CacheReader(tmp_path / "cache" / "exported.h5") as reader:
        assert reader.splits == ["train", "val", "test"] and reader.dtype == "float16"
        assert np.abs(reader.split("val").sequence(0) - want).max() <= 5e-3  # float16 rounding of O(1) states
    metrics = json.loads((tmp_path / "runs" / "exported" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auroc"] <= 1.0 and metrics["best_epoch"] >= 0


def test_quick_start_your_own_spec(tmp_path, monkeypatch):
    import shutil
    import sys

    lines, blocks = quick_start("your own spec")
    assert (REPO / "examples" / "my_spec.py").read_text() in blocks and len(lines) == 2
    shutil.copy(REPO / "examples" / "my_spec.py", tmp_path / "my_spec.py")
    rng = np.random.default_rng(0)
    (tmp_path / "my_data").mkdir()
    for split, n in (("train", 80), ("val", 30), ("test", 30)):
        write_npz_split(tmp_path / "my_data" / f"{split}.npz", n, rng)
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from my_spec import Encoder
    finally:
        sys.path.remove(str(REPO / "examples"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(Encoder().state_dict(), tmp_path / "encoder.pt")
        run_verbatim(lines, tmp_path, monkeypatch)
    metrics = json.loads((tmp_path / "runs" / "first" / "metrics.json").read_text())
    assert metrics["test"]["auroc"] > 0.6  # the label shifts every feature: a head must find it
