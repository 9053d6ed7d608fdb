"""Binary classification statistics in numpy: AUROC, AUPRC, bootstrap CIs, threshold metrics.

The one implementation both sides use: the node's agreement with the
sonographers (:mod:`echonode.agreement`) and ``echonode-train evaluate``
(``train.metrics`` imports them from here; echonode never imports train).
Written without scikit-learn (not a dependency of the node). Ties are handled
the way the usual definitions require: AUROC counts a tied positive/negative
pair as one half (the Mann-Whitney statistic with midranks), and average
precision treats a group of tied scores as one threshold.

Both ranking metrics are computed from per-distinct-score counts of positives
and negatives. A bootstrap resample is just another set of counts, so 10,000
stratified resamples are a few matrix operations instead of 10,000 sorts.

Confidence intervals are stratified (positives and negatives resampled
separately, so every resample has the original prevalence) percentile
intervals; ``level=0.95`` takes the 2.5th and 97.5th percentiles. The sister
repository of the paper took the 5th and 95th and called it 95 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, overload

import numpy as np

__all__ = [
    "BootstrapResult",
    "Metric",
    "auroc",
    "average_precision",
    "bootstrap_ci",
    "pr_curve",
    "roc_curve",
    "threshold_metrics",
]

Metric = Literal["auroc", "auprc"]
_METRICS: tuple[str, ...] = ("auroc", "auprc")


def _check_binary(y_true: np.ndarray | Sequence, y_score: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f'Arguments "y_true" and "y_score" must be 1-D; got shapes {y.shape} and {s.shape}.')
    if y.shape != s.shape:
        raise ValueError(f'Arguments "y_true" and "y_score" must have the same length; got {y.size} and {s.size}.')
    if not np.isin(y, (0, 1)).all():
        raise ValueError('Argument "y_true" must contain only 0 and 1.')
    if not np.isfinite(s).all():
        raise ValueError('Argument "y_score" must be finite.')
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError('Argument "y_true" must contain both positives and negatives for a ranking metric.')
    return y, s


def _counts_by_score(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Distinct scores, descending, and where each positive / negative falls.

    Returns ``(pos_bin, neg_bin, n_bins, unique)``: ``pos_bin[i]`` is the bin of
    positive ``i`` in the descending list of distinct scores.
    """
    unique, inverse = np.unique(-s, return_inverse=True)  # ascending -s = descending s
    return inverse[y], inverse[~y], unique.size, -unique


def _auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of rows of per-bin counts (bins in descending score order)."""
    n_pos = pos.sum(axis=-1)
    n_neg = neg.sum(axis=-1)
    # Negatives strictly below each bin = all negatives in later bins.
    below = n_neg[..., None] - np.cumsum(neg, axis=-1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=-1)
    return wins / (n_pos * n_neg)


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision of rows of per-bin counts (descending score order)."""
    tp = np.cumsum(pos, axis=-1)
    fp = np.cumsum(neg, axis=-1)
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp, dtype=np.float64), where=predicted > 0)
    return (pos * precision).sum(axis=-1) / pos.sum(axis=-1)


def auroc(y_true: np.ndarray | Sequence, y_score: np.ndarray | Sequence) -> float:
    """Area under the ROC curve (tied pairs count one half).

    Parameters
    ----------
    y_true : array-like of {0, 1}
        Labels.
    y_score : array-like of float
        Scores; higher means more likely positive.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        On shape mismatch, non-binary labels, or a single class.
    """
    y, s = _check_binary(y_true, y_score)
    pos_bin, neg_bin, n_bins, _ = _counts_by_score(y, s)
    pos = np.bincount(pos_bin, minlength=n_bins).astype(np.float64)
    neg = np.bincount(neg_bin, minlength=n_bins).astype(np.float64)
    return float(_auroc_from_counts(pos, neg))


def average_precision(y_true: np.ndarray | Sequence, y_score: np.ndarray | Sequence) -> float:
    """Average precision (area under the precision-recall step curve).

    ``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds, tied scores
    forming one threshold (scikit-learn's definition).

    Parameters
    ----------
    y_true : array-like of {0, 1}
    y_score : array-like of float

    Returns
    -------
    float

    Raises
    ------
    ValueError
        As :func:`auroc`.
    """
    y, s = _check_binary(y_true, y_score)
    pos_bin, neg_bin, n_bins, _ = _counts_by_score(y, s)
    pos = np.bincount(pos_bin, minlength=n_bins).astype(np.float64)
    neg = np.bincount(neg_bin, minlength=n_bins).astype(np.float64)
    return float(_ap_from_counts(pos, neg))


def roc_curve(y_true: np.ndarray | Sequence, y_score: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` from (0, 0) to (1, 1), one per distinct score.

    The trapezoidal area under these points equals :func:`auroc`.
    """
    y, s = _check_binary(y_true, y_score)
    pos_bin, neg_bin, n_bins, _ = _counts_by_score(y, s)
    tp = np.cumsum(np.bincount(pos_bin, minlength=n_bins))
    fp = np.cumsum(np.bincount(neg_bin, minlength=n_bins))
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def pr_curve(y_true: np.ndarray | Sequence, y_score: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall points ``(recall, precision)``, one per distinct score,
    starting at recall 0 with the first threshold's precision."""
    y, s = _check_binary(y_true, y_score)
    pos_bin, neg_bin, n_bins, _ = _counts_by_score(y, s)
    tp = np.cumsum(np.bincount(pos_bin, minlength=n_bins)).astype(np.float64)
    fp = np.cumsum(np.bincount(neg_bin, minlength=n_bins)).astype(np.float64)
    precision = tp / (tp + fp)
    return np.r_[0.0, tp / tp[-1]], np.r_[precision[0], precision]


@dataclass(frozen=True)
class BootstrapResult:
    """A point estimate with its stratified-bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)


def _resample_counts(bins: np.ndarray, n_bins: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_resamples, n_bins)`` counts of a with-replacement resample of ``bins``."""
    draws = rng.integers(0, bins.size, size=(n_resamples, bins.size))
    flat = bins[draws] + (np.arange(n_resamples) * n_bins)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n_bins).reshape(n_resamples, n_bins).astype(np.float64)


@overload
def bootstrap_ci(
    y_true: np.ndarray | Sequence,
    y_score: np.ndarray | Sequence,
    metric: Metric = ...,
    *,
    n_resamples: int = ...,
    level: float = ...,
    seed: int = ...,
    return_samples: Literal[False] = ...,
) -> BootstrapResult: ...


@overload
def bootstrap_ci(
    y_true: np.ndarray | Sequence,
    y_score: np.ndarray | Sequence,
    metric: Metric = ...,
    *,
    n_resamples: int = ...,
    level: float = ...,
    seed: int = ...,
    return_samples: Literal[True],
) -> tuple[BootstrapResult, np.ndarray]: ...


def bootstrap_ci(
    y_true: np.ndarray | Sequence,
    y_score: np.ndarray | Sequence,
    metric: Metric = "auroc",
    *,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    return_samples: bool = False,
) -> BootstrapResult | tuple[BootstrapResult, np.ndarray]:
    """Stratified bootstrap percentile interval of AUROC or AUPRC.

    Positives and negatives are resampled separately with replacement, each
    to its own original count, so the prevalence of every resample is the
    sample's. The interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the resampled statistics (2.5 % and 97.5 % for 0.95).

    Parameters
    ----------
    y_true, y_score : array-like
        Labels (0/1) and scores.
    metric : {"auroc", "auprc"}
        The statistic.
    n_resamples : int
        Number of resamples (the paper: 10,000).
    level : float
        Coverage, in (0, 1).
    seed : int
        Seed of the resampling, so a report is reproducible.
    return_samples : bool
        Also return the resampled statistics.

    Returns
    -------
    BootstrapResult or (BootstrapResult, numpy.ndarray)

    Raises
    ------
    ValueError
        For bad labels or arguments.
    """
    if metric not in _METRICS:
        raise ValueError(f'Argument "metric" must be one of {", ".join(_METRICS)}; got {metric!r}.')
    if not 0.0 < level < 1.0:
        raise ValueError(f'Argument "level" must be in (0, 1); got {level}.')
    if int(n_resamples) < 1:
        raise ValueError(f'Argument "n_resamples" must be positive; got {n_resamples}.')
    y, s = _check_binary(y_true, y_score)
    pos_bin, neg_bin, n_bins, _ = _counts_by_score(y, s)
    statistic = _auroc_from_counts if metric == "auroc" else _ap_from_counts
    estimate = float(
        statistic(
            np.bincount(pos_bin, minlength=n_bins).astype(np.float64),
            np.bincount(neg_bin, minlength=n_bins).astype(np.float64),
        )
    )

    rng = np.random.default_rng(seed)
    n_resamples = int(n_resamples)
    # Chunks bound the (chunk, n_bins) count matrices to ~4 M entries.
    chunk = max(1, min(n_resamples, 4_000_000 // max(n_bins, pos_bin.size, neg_bin.size)))
    samples = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        pos = _resample_counts(pos_bin, n_bins, stop - start, rng)
        neg = _resample_counts(neg_bin, n_bins, stop - start, rng)
        samples[start:stop] = statistic(pos, neg)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    result = BootstrapResult(estimate, float(low), float(high), float(level), n_resamples)
    return (result, samples) if return_samples else result


def threshold_metrics(
    y_true: np.ndarray | Sequence, y_prob: np.ndarray | Sequence, threshold: float = 0.5
) -> dict[str, float | int]:
    """Confusion-matrix metrics at a decision threshold (``prob >= threshold``).

    Returns accuracy, balanced accuracy, F1, MCC, sensitivity, specificity,
    PPV, NPV and the four counts. A ratio whose denominator is zero is 0
    (MCC included, as is usual), so degenerate test sets do not produce NaN
    in JSON.

    Parameters
    ----------
    y_true : array-like of {0, 1}
    y_prob : array-like of float
    threshold : float

    Returns
    -------
    dict
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f'Arguments "y_true" and "y_prob" must be 1-D of equal length; got {y.shape} and {p.shape}.')
    if not np.isin(y, (0, 1)).all():
        raise ValueError('Argument "y_true" must contain only 0 and 1.')
    y = y.astype(bool)
    pred = p >= threshold
    tp = int(np.sum(pred & y))
    tn = int(np.sum(~pred & ~y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else 0.0

    sensitivity = ratio(tp, tp + fn)
    specificity = ratio(tn, tn + fp)
    ppv = ratio(tp, tp + fp)
    mcc_den = float(np.sqrt(float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)))
    return {
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, y.size),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": ratio(tp * tn - fp * fn, mcc_den),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": ppv,
        "npv": ratio(tn, tn + fn),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "n": int(y.size),
        "n_positive": int(y.sum()),
    }
