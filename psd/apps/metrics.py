"""Evaluation metrics in plain numpy, so apps report them without extra dependencies."""
from __future__ import annotations

import numpy as np


def log_loss(y, p, eps: float = 1e-12) -> float:
    """Mean binary cross-entropy; ``p`` is clipped to [eps, 1 - eps] so one confident miss stays finite."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    # start of each run of equal values, plus the end sentinel
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1], True])
    run_rank = (starts[:-1] + 1 + starts[1:]) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, np.diff(starts))
    return ranks


def auc(y, scores) -> float:
    """Area under the ROC curve via the Mann-Whitney rank sum: O(n log n), ties count half.

    Returns nan when only one class is present (the AUC is undefined there).
    """
    y = np.asarray(y).ravel() > 0
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
