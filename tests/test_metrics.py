"""Metrics: equal to scikit-learn, undefined (not 0.5) for one class, CIs seeded and reproducible."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from headcache.metrics import (
    SingleClassWarning,
    bootstrap_intervals,
    classification_metrics,
    counted_rows,
    rows_auprc,
    rows_auroc,
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, 0.33])), min_size=2, max_size=40))
def test_row_metrics_equal_sklearn_with_ties(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs])
    if labels.min() == labels.max():
        return
    assert rows_auroc(scores[None], labels[None] == 1)[0] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert rows_auprc(scores[None], labels[None] == 1)[0] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def _probs(rng, n):
    p1 = rng.random(n)
    return np.stack([1 - p1, p1], 1)


def test_binary_metrics():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    m = classification_metrics(probs, labels)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0 and m["accuracy"] == 1.0 and m["n"] == 4


def test_one_class_gives_none_and_warns():
    with pytest.warns(SingleClassWarning, match="split val holds only class 0"):
        m = classification_metrics(_probs(np.random.default_rng(0), 5), np.zeros(5, int), split="val")
    assert m["auroc"] is None and m["auprc"] is None and m["accuracy"] >= 0
    assert bootstrap_intervals(_probs(np.random.default_rng(0), 5), np.zeros(5, int)) == {"auroc_ci": None, "auprc_ci": None}


def test_bootstrap_is_seeded_stratified_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(_probs(rng, 200) + 0.3 * labels[:, None] * np.array([-1, 1]), 0, 1)
    a = bootstrap_intervals(probs, labels, seed=3)
    assert a == bootstrap_intervals(probs, labels, seed=3)
    assert a != bootstrap_intervals(probs, labels, seed=4)
    point = classification_metrics(probs, labels)
    assert a["auroc_ci"][0] < point["auroc"] < a["auroc_ci"][1]
    assert a["auprc_ci"][0] < point["auprc"] < a["auprc_ci"][1]


def test_multiclass_is_macro_one_vs_rest():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), 60)
    labels = rng.integers(0, 3, 60)
    m = classification_metrics(probs, labels)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, 0.33])), min_size=2, max_size=30),
       st.integers(0, 2**16))
def test_weighted_copies_score_like_the_drawn_rows_with_ties(pairs, seed):
    """The bootstrap scores each resample by counts (counted_rows); that equals sklearn on the drawn rows."""
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs])
    if labels.min() == labels.max():
        return
    rng = np.random.default_rng(seed)
    draws = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=(5, (labels == c).sum())) for c in (0, 1)], 1)
    counts = np.stack([np.bincount(row, minlength=len(labels)) for row in draws])
    aurocs, auprcs = counted_rows(scores, labels == 1, counts)
    for row, auroc, auprc in zip(draws, aurocs, auprcs):
        assert auroc == pytest.approx(roc_auc_score(labels[row], scores[row]), abs=1e-12)
        assert auprc == pytest.approx(average_precision_score(labels[row], scores[row]), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=5, max_size=5), min_size=1, max_size=4))
def test_average_ranks_equal_scipys_rankdata(rows):
    from scipy.stats import rankdata

    from headcache.metrics import average_ranks

    values = np.array(rows)
    assert np.array_equal(average_ranks(values), rankdata(values, axis=1))



@pytest.mark.parametrize("seed, classes", [(0, 2), (1, 2), (2, 3), (3, 4)])
def test_every_metric_equals_sklearns_also_with_a_class_never_predicted(seed, classes):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 80)
    probs = rng.dirichlet(np.ones(classes), 80)
    probs[:, 0] = 0  # class 0 is never the argmax
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(probs, labels)
    preds = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="binary" if classes == 2 else "macro",
                                             zero_division=0), abs=1e-12)
    truth_lacks_1 = labels != 1  # a class predicted that the truth lacks: scikit-learn leaves it out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(labels[truth_lacks_1], preds[truth_lacks_1])
        part = classification_metrics(probs[truth_lacks_1], labels[truth_lacks_1])
    assert part["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds), abs=1e-12)
    if classes == 2:
        assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-12)
        assert m["auprc"] == pytest.approx(average_precision_score(labels, probs[:, 1]), abs=1e-12)
    else:
        assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_bootstrap_scored_in_slices_gives_the_intervals_of_the_whole_chunk(monkeypatch):
    """NOTE [ Final-evaluation memory ]: slicing the scoring bounds memory and changes no number."""
    import headcache.metrics as metrics

    rng = np.random.default_rng(4)
    labels = (rng.random(3000) < 0.3).astype(int)
    probs = np.clip(_probs(rng, 3000) + 0.2 * labels[:, None] * np.array([-1, 1]), 0, 1)
    assert metrics.SCORE_CELLS // len(labels) < metrics.BOOTSTRAP_CHUNK  # several slices per chunk
    sliced = bootstrap_intervals(probs, labels, resamples=200, seed=1)
    monkeypatch.setattr(metrics, "SCORE_CELLS", 1 << 40)
    assert bootstrap_intervals(probs, labels, resamples=200, seed=1) == sliced


def test_scoring_a_split_imports_neither_sklearn_nor_scipy():
    """They took 50 to 75 MB of a training process's memory at its final evaluation."""
    script = ("import sys, numpy as np\n"
              "import headcache.train\n"
              "from headcache.metrics import bootstrap_intervals, classification_metrics\n"
              "probs, labels = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]), np.array([0, 1, 0])\n"
              "print(classification_metrics(probs, labels)['auroc'], bootstrap_intervals(probs, labels) is not None,\n"
              "      sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1.0", "True", "[]"]
