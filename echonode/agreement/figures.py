"""The agreement figures: each model's results against the sonographers' reference labels.

Per model (bundle name and version) and task, and optionally per cart
(``--by``): the studies with both a result and a decided reference label,
their positives, the AUROC of the model's probability with a stratified
bootstrap confidence interval (positives and negatives resampled
separately, seeded: the same journal gives the same interval), and at the
bundle's threshold (the verdict the SR reported) sensitivity, specificity
and the confusion counts. The statistics are :mod:`echonode.stats`, the
ones ``echonode-train evaluate`` uses.

An AUROC needs both classes: with one, it is None and ``auroc_reason``
says why. A sensitivity with no positive (a specificity with no negative)
is None, not 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echonode.stats import bootstrap_ci
from echonode.studies.references import AgreementPair

__all__ = ["GROUPINGS", "UNKNOWN_CART", "AgreementFigures", "agreement_figures", "group_of"]

#: What ``--by`` may name: the cart's model (Manufacturer + Manufacturer's
#: Model Name), its manufacturer, or its Station Name.
GROUPINGS = ("model", "manufacturer", "station")
#: The group of a study whose images name no cart.
UNKNOWN_CART = "unknown"


@dataclass(frozen=True)
class AgreementFigures:
    """One model's agreement for one task (and one group of studies).

    Attributes
    ----------
    model, version : str
        The bundle's name and version.
    task : str
    group : str or None
        The cart group (``--by``), None for all studies.
    studies : int
        Studies with a result of this model and a decided reference label.
    positives, negatives : int
        Of those, by reference label.
    undecided : int
        Studies with a result and a reference whose rules left the label empty.
    auroc : float or None
    auroc_ci : (float, float) or None
        The bootstrap interval at ``level``.
    auroc_reason : str or None
        Why ``auroc`` is None.
    threshold : float or None
        The bundle's decision threshold (None when the results differ in it).
    sensitivity, specificity : float or None
        At the threshold; None without positives (negatives).
    confusion : dict
        ``tp``, ``fp``, ``tn``, ``fn``.
    """

    model: str
    version: str
    task: str
    group: str | None
    studies: int
    positives: int
    negatives: int
    undecided: int
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    auroc_reason: str | None
    threshold: float | None
    sensitivity: float | None
    specificity: float | None
    confusion: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` row (CONTRACT.md keys, and more)."""
        return {
            "model": self.model, "version": self.version, "task": self.task, "group": self.group,
            "studies": self.studies, "positives": self.positives, "negatives": self.negatives,
            "undecided": self.undecided, "auroc": self.auroc,
            "auroc_ci": None if self.auroc_ci is None else list(self.auroc_ci),
            "auroc_reason": self.auroc_reason, "threshold": self.threshold,
            "sensitivity": self.sensitivity, "specificity": self.specificity, "confusion": dict(self.confusion),
        }  # fmt: skip


def group_of(pair: AgreementPair, by: str | None) -> str | None:
    """The group ``pair``'s study falls in for ``--by`` (None when not grouping).

    Raises
    ------
    ValueError
        For a grouping not in :data:`GROUPINGS`.
    """
    if by is None:
        return None
    if by == "manufacturer":
        return pair.manufacturer or UNKNOWN_CART
    if by == "model":
        name = " ".join(x for x in (pair.manufacturer, pair.model_name) if x)
        return name or UNKNOWN_CART
    if by == "station":
        return pair.station_name or UNKNOWN_CART
    raise ValueError(f'Argument "by" must be one of {", ".join(GROUPINGS)} or None; got {by!r}.')


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _figures(key: tuple[str, str, str, str | None], pairs: Sequence[AgreementPair], *, n_resamples: int,
             seed: int, level: float) -> AgreementFigures:
    decided = [p for p in pairs if p.label is not None]
    y = np.array([p.label for p in decided], dtype=int)
    scores = np.array([p.probability for p in decided], dtype=np.float64)
    said = np.array([p.positive for p in decided], dtype=bool)
    truth = y.astype(bool)
    tp, fp = int(np.sum(said & truth)), int(np.sum(said & ~truth))
    tn, fn = int(np.sum(~said & ~truth)), int(np.sum(~said & truth))
    positives, negatives = tp + fn, tn + fp
    auroc = ci = reason = None
    if not decided:
        reason = "no study with a decided reference label"
    elif not negatives:
        reason = "every reference label is positive: AUROC needs both classes"
    elif not positives:
        reason = "every reference label is negative: AUROC needs both classes"
    else:
        result = bootstrap_ci(y, scores, "auroc", n_resamples=n_resamples, level=level, seed=seed)
        auroc, ci = result.estimate, (result.low, result.high)
    thresholds = {p.threshold for p in pairs}
    return AgreementFigures(
        model=key[0], version=key[1], task=key[2], group=key[3], studies=len(decided), positives=positives,
        negatives=negatives, undecided=len(pairs) - len(decided), auroc=auroc, auroc_ci=ci, auroc_reason=reason,
        threshold=thresholds.pop() if len(thresholds) == 1 else None,
        sensitivity=_ratio(tp, positives), specificity=_ratio(tn, negatives),
        confusion={"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    )  # fmt: skip


def agreement_figures(
    pairs: Iterable[AgreementPair],
    *,
    by: str | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> list[AgreementFigures]:
    """The figures of every model and task (and group), from the journal's pairs.

    Parameters
    ----------
    pairs : iterable of AgreementPair
        :meth:`~echonode.studies.references.ReferenceRows.agreement_pairs`.
    by : {"model", "manufacturer", "station", None}
        Group the studies by cart; None: all together.
    n_resamples : int
        Bootstrap resamples for the AUROC interval (METHOD.md: 10,000).
    seed : int
        The resampling's seed.
    level : float
        The interval's coverage.

    Returns
    -------
    list of AgreementFigures
        Ordered by model, version, task and group.

    Raises
    ------
    ValueError
        For an unknown ``by``, or ``n_resamples`` or ``level`` out of range.
    """
    if by is not None and by not in GROUPINGS:
        raise ValueError(f'Argument "by" must be one of {", ".join(GROUPINGS)} or None; got {by!r}.')
    groups: dict[tuple[str, str, str, str | None], list[AgreementPair]] = {}
    for pair in pairs:
        groups.setdefault((pair.model, pair.version, pair.task, group_of(pair, by)), []).append(pair)
    return [
        _figures(key, groups[key], n_resamples=n_resamples, seed=seed, level=level)
        for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] or ""))
    ]
