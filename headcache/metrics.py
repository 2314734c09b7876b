"""Classification metrics equal to scikit-learn's, with the edge cases handled here.

Binary: AUROC and AUPRC on p[:, 1]. Multi-class: macro one-vs-rest AUROC and
AUPRC. Both: accuracy, F1 (binary: the positive class; multi-class: macro)
and balanced accuracy of the argmax. A split holding a single class has no
AUROC or AUPRC: they are reported as None (null in JSON) with a warning, never
as a made-up 0.5.

The row-wise versions (`rows_auroc`, `rows_auprc`) score many heads, or many
bootstrap resamples, at once; they equal scikit-learn's values exactly
(tests/test_metrics.py checks every metric here against scikit-learn).

NOTE [ Final-evaluation memory ]
A training process computes these once, at its end, while it still holds its
validation split. Importing scikit-learn (and scipy with it) there added 50 to
75 MB of resident memory, and scoring 100 bootstrap resamples of 5,000 items
at once held about ten 4 MB float64 temporaries: together they took a streamed
run 52 MB over its RSS target (benchmarks/README.md). So the metrics are numpy
only, and a chunk of resamples is scored SCORE_CELLS cells at a time; the
draws, and so the intervals, are the same as scoring the chunk at once.
"""
from __future__ import annotations

import warnings

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CHUNK = 100  # resamples drawn at once (the draws depend on it: keep it fixed)
SCORE_CELLS = 1 << 17  # resamples x items scored at once: 1 MB per float64 temporary
CI_LEVEL = 0.95


class SingleClassWarning(UserWarning):
    """AUROC/AUPRC are undefined because the labels hold one class."""


def classification_metrics(probs: np.ndarray, labels: np.ndarray, *, split: str = "") -> dict:
    """Metrics of one split.

    Parameters
    ----------
    probs : ndarray (N, C)
        Predicted class probabilities.
    labels : ndarray (N,)
        True classes.
    split : str
        Named in the warning when the split holds one class.

    Returns
    -------
    dict with auroc, auprc (None for a single class), accuracy, f1, balanced_accuracy, n.
    """
    labels = np.asarray(labels)
    preds = probs.argmax(1)
    if len(np.unique(labels)) < 2:
        warnings.warn(f"split {split or '?'} holds only class {labels[0] if len(labels) else '-'}: "
                      "AUROC and AUPRC are undefined there and reported as null", SingleClassWarning,
                      stacklevel=2)
        auroc = auprc = None
    else:
        aurocs, auprcs = _macro_rows(probs[None], labels[None])
        auroc, auprc = float(aurocs[0]), float(auprcs[0])
    classes = np.union1d(labels, preds)  # scikit-learn's labels: those of the truth or the predictions
    f1 = _f1(labels, preds, 1) if probs.shape[1] == 2 else float(np.mean([_f1(labels, preds, c) for c in classes]))
    recalls = [float((preds[labels == c] == c).mean()) for c in np.unique(labels)]  # classes with true items
    return {"auroc": auroc, "auprc": auprc, "accuracy": float((preds == labels).mean()), "f1": f1,
            "balanced_accuracy": float(np.mean(recalls)), "n": int(len(labels))}


def _f1(labels: np.ndarray, preds: np.ndarray, positive: int) -> float:
    """F1 of class ``positive``; 0 where it is neither true nor predicted (scikit-learn's zero_division=0)."""
    true_pos = int(((preds == positive) & (labels == positive)).sum())
    either = int((preds == positive).sum() + (labels == positive).sum())
    return 2 * true_pos / either if either else 0.0


def bootstrap_intervals(probs: np.ndarray, labels: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0) -> dict:
    """95% bootstrap intervals of AUROC and AUPRC: stratified, seeded, reproducible.

    Each resample draws, with replacement, as many items of each class as the
    split holds, so every resample keeps the class balance and both metrics
    stay defined. All resamples are scored at once (`rows_auroc`, `rows_auprc`).
    Returns {"auroc_ci": [lo, hi], "auprc_ci": [lo, hi]}; None values for a
    split with one class.

    A resample is scored as the split weighted by how often it drew each item
    (`counted_rows`), which is the same number as scoring the drawn rows
    themselves but needs no sort per resample: several times faster, and a bank of
    K heads scores K splits at the end of training.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        return {"auroc_ci": None, "auprc_ci": None}
    rng = np.random.default_rng(seed)
    n = len(labels)
    groups = [np.flatnonzero(labels == c) for c in classes]
    aurocs, auprcs = [], []
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        chunk = min(BOOTSTRAP_CHUNK, resamples - start)
        idx = np.concatenate([rng.choice(g, size=(chunk, len(g))) for g in groups], axis=1)
        counts = np.bincount((idx + n * np.arange(chunk)[:, None]).ravel(), minlength=chunk * n).reshape(chunk, n)
        rows = max(1, SCORE_CELLS // n)  # NOTE [ Final-evaluation memory ]
        for first in range(0, chunk, rows):
            scored = [counted_rows(probs[:, c], labels == c, counts[first:first + rows])
                      for c in ([1] if probs.shape[1] == 2 else classes)]
            aurocs.append(np.mean([a for a, _ in scored], axis=0))
            auprcs.append(np.mean([p for _, p in scored], axis=0))
    aurocs, auprcs = np.concatenate(aurocs), np.concatenate(auprcs)
    tail = (1.0 - CI_LEVEL) / 2 * 100
    return {
        "auroc_ci": [float(v) for v in np.percentile(aurocs, [tail, 100 - tail])],
        "auprc_ci": [float(v) for v in np.percentile(auprcs, [tail, 100 - tail])],
    }


def counted_rows(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of R weighted copies of one split, as scikit-learn scores them.

    scores (N,), positive (N,) bool, counts (R, N): copy r holds item i counts[r, i] times.
    Items are sorted once; a tie group of scores is one threshold. AUROC counts
    the (positive, negative) pairs ordered correctly, ties as one half; AP sums,
    over thresholds, the recall gained times the precision there. Each copy
    needs both classes.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first item of each tie group
    weights = counts[:, order].astype(np.float64)
    pos, neg = weights * positive[order], weights * ~positive[order]  # (R, groups), highest scores first
    if len(starts) < len(scores):
        pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    neg_seen = np.cumsum(neg, axis=1)
    auroc = (pos * (n_neg[:, None] - neg_seen + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    pos_seen = np.cumsum(pos, axis=1)
    precision = pos_seen / np.maximum(pos_seen + neg_seen, 1)  # 0 / 0 only where no item was drawn yet
    return auroc, (pos * precision).sum(1) / n_pos


def fast_auroc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of K heads at once: probs (K, N, C), labels (N,) -> (K,); NaN for a single class."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return np.full(probs.shape[0], np.nan)
    return _macro_rows(probs, np.broadcast_to(labels, probs.shape[:2]))[0]


def _macro_rows(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise AUROC and AUPRC: probs (R, N, C), labels (R, N); binary on class 1, else macro OvR
    over the classes present in every row."""
    num_classes = probs.shape[2]
    classes = [1] if num_classes == 2 else [
        c for c in range(num_classes) if ((labels == c).any(1) & (labels != c).any(1)).all()]
    aurocs = [rows_auroc(probs[:, :, c], labels == c) for c in classes]
    auprcs = [rows_auprc(probs[:, :, c], labels == c) for c in classes]
    return np.mean(aurocs, axis=0), np.mean(auprcs, axis=0)


def rows_auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of each row (R, N): the Mann-Whitney statistic, tied scores sharing their average
    rank, which is exactly scikit-learn's roc_auc_score."""
    n_pos = positive.sum(1)
    n_neg = positive.shape[1] - n_pos
    ranks = average_ranks(scores)
    return ((ranks * positive).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def rows_auprc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Average precision of each row (R, N), as scikit-learn's average_precision_score.

    AP = sum over thresholds of (recall step) x precision. Tied scores form one
    threshold, so each positive contributes the precision measured at the end
    of its tie group, divided by the number of positives.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, 1)
    sorted_pos = np.take_along_axis(positive, order, 1)
    n = scores.shape[1]
    true_pos = np.cumsum(sorted_pos, axis=1)
    is_end = np.ones_like(sorted_pos, dtype=bool)
    is_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    position = np.arange(n)
    group_end = np.minimum.accumulate(np.where(is_end, position, n)[:, ::-1], axis=1)[:, ::-1]
    precision_at_end = np.take_along_axis(true_pos, group_end, 1) / (group_end + 1)
    return (precision_at_end * sorted_pos).sum(1) / sorted_pos.sum(1)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks (1-based) along each row, tied values sharing their average rank (scipy's rankdata)."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, 1)
    n = values.shape[1]
    position = np.broadcast_to(np.arange(n), values.shape)
    starts_group = np.ones(values.shape, dtype=bool)
    starts_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends_group = np.ones(values.shape, dtype=bool)
    ends_group[:, :-1] = starts_group[:, 1:]
    first = np.maximum.accumulate(np.where(starts_group, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends_group, position, n)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(values.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks
