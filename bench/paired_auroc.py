"""Two models on the same studies: each one's study AUROC and their paired difference.

Reads ``evaluate`` reports (their ``predictions.csv``), averages each
study's videos (as the node does), and resamples *studies*, positives and
negatives separately, with the same resamples for both models, so that the
interval of the difference carries only what differs between them. Several
reports per side are pooled (e.g. two test archives); both sides must hold
the same studies with the same labels.

Usage::

    .venv/bin/python -m bench.paired_auroc --a SECTOR_EVAL [...] --b PHYSICAL_EVAL [...] [--name "LVH, B"]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.metrics import auroc, group_mean


@dataclass(frozen=True)
class PairedAuroc:
    """Both AUROCs and their difference ``b - a``, each with a percentile interval."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    difference: tuple[float, float, float]
    positives: int
    negatives: int


def study_scores(reports: Sequence[Path]) -> dict[str, tuple[float, int]]:
    """Study UID -> (mean probability of its videos, label), pooled over ``reports``.

    Raises
    ------
    ValueError
        When a study appears in two reports, or its videos disagree on the label.
    """
    out: dict[str, tuple[float, int]] = {}
    for report in reports:
        with open(Path(report) / "predictions.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        studies = [r["study_uid"] for r in rows]
        keys, p = group_mean(studies, np.array([float(r["probability"]) for r in rows]))
        _, y = group_mean(studies, np.array([int(r["target"]) for r in rows], dtype=float))
        for key, prob, label in zip(keys, p, y, strict=True):
            if key in out:
                raise ValueError(f"study {key} is in more than one report of a side")
            if label not in (0.0, 1.0):
                raise ValueError(f"study {key}: its videos disagree on the label")
            out[str(key)] = (float(prob), int(label))
    return out


def paired_auroc(a: dict[str, tuple[float, int]], b: dict[str, tuple[float, int]], *, n_resamples: int = 2000,
                 level: float = 0.95, seed: int = 0) -> PairedAuroc:
    """Study AUROC of two scorings of the same studies and of their difference.

    Parameters
    ----------
    a, b : dict
        :func:`study_scores` of each model.
    n_resamples : int
        Stratified resamples of studies, shared by both models.
    level : float
        Coverage of the percentile intervals.
    seed : int
        Seed of the resampling.

    Returns
    -------
    PairedAuroc

    Raises
    ------
    ValueError
        When the two sides hold other studies or other labels, or a class is empty.
    """
    if a.keys() != b.keys():
        raise ValueError(f"the two sides hold other studies ({len(a.keys() ^ b.keys())} differ)")
    keys = sorted(a)
    y = np.array([a[k][1] for k in keys])
    if any(b[k][1] != a[k][1] for k in keys):
        raise ValueError("the two sides label some study differently")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not len(pos) or not len(neg):
        raise ValueError("both positive and negative studies are needed")
    pa, pb = np.array([a[k][0] for k in keys]), np.array([b[k][0] for k in keys])
    rng = np.random.default_rng(seed)
    samples = np.empty((n_resamples, 2))
    for i in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        samples[i] = auroc(y[idx], pa[idx]), auroc(y[idx], pb[idx])
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(estimate: float, values: np.ndarray) -> tuple[float, float, float]:
        lo, hi = np.percentile(values, q)
        return float(estimate), float(lo), float(hi)

    est_a, est_b = auroc(y, pa), auroc(y, pb)
    return PairedAuroc(interval(est_a, samples[:, 0]), interval(est_b, samples[:, 1]),
                       interval(est_b - est_a, samples[:, 1] - samples[:, 0]), int(len(pos)), int(len(neg)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", type=Path, nargs="+", required=True, help="evaluate report folder(s) of model A")
    p.add_argument("--b", type=Path, nargs="+", required=True, help="evaluate report folder(s) of model B")
    p.add_argument("--name", default="", help="the row's label")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    try:
        r = paired_auroc(study_scores(ns.a), study_scores(ns.b), n_resamples=ns.resamples, seed=ns.seed)
    except (OSError, KeyError, ValueError) as exc:
        print(f"paired_auroc: {exc}")
        return 2

    def fmt(t: tuple[float, float, float], sign: str = "") -> str:
        return f"{t[0]:{sign}.3f} [{t[1]:{sign}.3f}, {t[2]:{sign}.3f}]"

    print("| studies | positives / negatives | A | B | B - A (paired) |")
    print("|---|---|---|---|---|")
    print(f"| {ns.name} | {r.positives} / {r.negatives} | {fmt(r.a)} | {fmt(r.b)} | {fmt(r.difference, '+')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
