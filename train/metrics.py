"""Training-side metrics: summaries for JSON, per-group means, multi-class metrics.

The binary statistics (AUROC, AUPRC, stratified bootstrap CIs, threshold
metrics) live in :mod:`echonode.stats`, shared with the node's agreement
figures, and are re-exported here under their old names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from echonode.stats import (
    BootstrapResult,
    Metric,
    auroc,
    average_precision,
    bootstrap_ci,
    pr_curve,
    roc_curve,
    threshold_metrics,
)

__all__ = [
    "BootstrapResult",
    "auroc",
    "average_precision",
    "bootstrap_ci",
    "group_mean",
    "multiclass_metrics",
    "pr_curve",
    "ranking_summary",
    "roc_curve",
    "threshold_metrics",
]

_METRICS: tuple[Metric, ...] = ("auroc", "auprc")


def ranking_summary(
    y_true: np.ndarray | Sequence,
    y_prob: np.ndarray | Sequence,
    *,
    threshold: float = 0.5,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, object]:
    """AUROC and AUPRC with bootstrap CIs plus threshold metrics, for JSON.

    With a single class present the ranking metrics are ``None`` (undefined)
    rather than an exception, so a small split still gets a report.
    """
    y = np.asarray(y_true).astype(int)
    out: dict[str, object] = {"n": int(y.size), "n_positive": int(y.sum())}
    for metric in _METRICS:
        try:
            out[metric] = bootstrap_ci(y, y_prob, metric, n_resamples=n_resamples, level=level, seed=seed).as_dict()
        except ValueError:
            out[metric] = None
    out["threshold_metrics"] = threshold_metrics(y, y_prob, threshold)
    return out


def group_mean(keys: Sequence, values: np.ndarray | Sequence) -> tuple[list, np.ndarray]:
    """Mean of ``values`` per key, keys in order of first appearance.

    Video probability = mean over its clips; study probability = mean over
    its videos (METHOD.md). ``values`` may be ``(N,)`` or ``(N, K)`` (class
    probabilities), averaged along the first axis.

    Returns
    -------
    keys : list
        Distinct keys.
    means : numpy.ndarray
        ``(len(keys),)`` or ``(len(keys), K)``.
    """
    v = np.asarray(values, dtype=np.float64)
    if len(keys) != v.shape[0]:
        raise ValueError(f'Arguments "keys" and "values" must have the same length; got {len(keys)} and {v.shape[0]}.')
    index: dict = {}
    for key in keys:
        index.setdefault(key, len(index))
    groups = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    sums = np.zeros((len(index),) + v.shape[1:], dtype=np.float64)
    np.add.at(sums, groups, v)
    counts = np.bincount(groups, minlength=len(index)).reshape((-1,) + (1,) * (v.ndim - 1))
    return list(index), sums / counts


def multiclass_metrics(y_true: np.ndarray | Sequence, probs: np.ndarray, labels: Sequence[str]) -> dict[str, object]:
    """Accuracy, balanced accuracy and one-vs-rest AUROC per class (view task).

    Parameters
    ----------
    y_true : array-like of int
        Class indices.
    probs : numpy.ndarray
        ``(N, K)`` class probabilities.
    labels : sequence of str
        Class names, ``K`` of them.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.size or p.shape[1] != len(labels):
        raise ValueError(f'Argument "probs" must be ({y.size}, {len(labels)}); got {p.shape}.')
    pred = p.argmax(axis=1)
    recalls = [float(np.mean(pred[y == k] == k)) for k in range(len(labels)) if np.any(y == k)]
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(labels):
        try:
            per_class[name] = auroc((y == k).astype(int), p[:, k])
        except ValueError:
            per_class[name] = None
    defined = [v for v in per_class.values() if v is not None]
    return {
        "n": int(y.size),
        "accuracy": float(np.mean(pred == y)) if y.size else 0.0,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "auroc_ovr": per_class,
        "auroc_ovr_macro": float(np.mean(defined)) if defined else None,
    }
