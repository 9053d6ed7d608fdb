"""Does a severe-AS model read the valve's opening, or only that the valve is diseased?

In the synthetic archive (train/synth/truth.py) a diseased valve (sclerosis,
moderate or severe AS) is thicker and brighter than a normal one, drawn from
one distribution whatever the disease's stage, and only the mid-systolic cusp
separation tells severe AS (under 0.8 cm) from the rest. A model that sees
"diseased" and nothing more ranks severe AS at about 0.78 overall (every
severe valve is diseased, 43 % of the others are), so an overall AUROC near
that says nothing about the opening. This report splits it:

* **severe against the narrow band**: severe studies against studies whose
  separation lies in ``[0.8, 1.4)`` cm. Only diseased valves open that little
  (moderate AS, and sclerosis from 1.3 cm; a normal valve opens 1.5 cm or
  more), so both sides are diseased and a "diseased" detector scores about 0.5
  here; a model that measures the opening scores well above it;
* **rank correlation** (Spearman) of the study score with the separation over
  every study: a measuring model's score falls as the cusps open;
* the mean study score in bands of separation.

Study scores are the mean of a study's videos (as the node reports a study);
intervals resample studies, 2,000 times. The separation comes from the
archive's ``labels.csv`` (``av_cusp_sep_cm``), joined on the Study Instance
UID.

Usage::

    .venv/bin/python -m bench.valve_opening --report EVAL [EVAL ...] --labels LABELS.csv [LABELS.csv ...]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.paired_auroc import study_scores
from train.metrics import auroc
from train.synth.truth import SEVERE_AS_THRESHOLD_CM

NARROW_BAND_CM = (SEVERE_AS_THRESHOLD_CM, 1.4)
"""Separations only a diseased valve shows that are not severe AS: moderate AS (up to 1.4 cm), and
sclerosis from 1.3 cm; a normal valve opens 1.5 cm or more (train/synth/truth.py's ranges)."""
BANDS_CM = ((0.0, 0.8), (0.8, 1.1), (1.1, 1.4), (1.4, 1.8), (1.8, 3.0))
"""Bands of separation for the mean score."""


@dataclass(frozen=True)
class OpeningReport:
    """What a model's study scores say about the opening; each estimate with a 95 % interval."""

    overall: tuple[float, float, float]
    severe_vs_narrow: tuple[float, float, float]
    spearman: tuple[float, float, float]
    band_means: tuple[tuple[tuple[float, float], int, float], ...]
    severe: int
    narrow: int
    studies: int


def separations(labels: Sequence[Path]) -> dict[str, float]:
    """Study UID -> mid-systolic cusp separation (cm), from one or more ``labels.csv``."""
    out: dict[str, float] = {}
    for path in labels:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                out[row["study_uid"]] = float(row["av_cusp_sep_cm"])
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # The mean rank of a run of ties is its first rank plus half its length less one.
    first = np.concatenate([[1.0], 1.0 + np.cumsum(counts)[:-1]])
    return (first + (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties at their mean rank); nan when either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def opening_report(scores: dict[str, tuple[float, int]], separation: dict[str, float], *,
                   n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> OpeningReport:
    """Split a severe-AS model's study scores by the valve's opening.

    Parameters
    ----------
    scores : dict
        :func:`bench.paired_auroc.study_scores` of the model's ``evaluate`` reports.
    separation : dict
        :func:`separations` of the archives those reports scored.
    n_resamples : int
        Resamples of studies for the intervals (stratified by label for the AUROCs).
    level : float
        Coverage of the percentile intervals.
    seed : int
        Seed of the resampling.

    Returns
    -------
    OpeningReport

    Raises
    ------
    ValueError
        When a scored study has no separation, a label disagrees with its
        separation, or there is no severe study or none in the narrow band.
    """
    missing = scores.keys() - separation.keys()
    if missing:
        raise ValueError(f"{len(missing)} scored studies have no separation in the labels given")
    keys = sorted(scores)
    p = np.array([scores[k][0] for k in keys])
    y = np.array([scores[k][1] for k in keys])
    sep = np.array([separation[k] for k in keys])
    if np.any((sep < SEVERE_AS_THRESHOLD_CM) != (y == 1)):
        raise ValueError("some study's label disagrees with its cusp separation: these are not severe-AS reports")
    severe = np.flatnonzero(y == 1)
    narrow = np.flatnonzero((sep >= NARROW_BAND_CM[0]) & (sep < NARROW_BAND_CM[1]))
    negative = np.flatnonzero(y == 0)
    if not len(severe) or not len(narrow):
        raise ValueError("both severe studies and studies in the narrow band are needed")
    band_idx = np.concatenate([severe, narrow])
    band_y = (sep[band_idx] < SEVERE_AS_THRESHOLD_CM).astype(int)
    rng = np.random.default_rng(seed)
    samples = np.empty((n_resamples, 3))
    for i in range(n_resamples):
        s, nb, ng = rng.choice(severe, len(severe)), rng.choice(narrow, len(narrow)), rng.choice(negative, len(negative))
        overall = np.concatenate([s, ng])
        band = np.concatenate([s, nb])
        every = rng.choice(len(keys), len(keys))
        samples[i] = (auroc(y[overall], p[overall]), auroc((sep[band] < SEVERE_AS_THRESHOLD_CM).astype(int), p[band]),
                      spearman(p[every], sep[every]))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(estimate: float, values: np.ndarray) -> tuple[float, float, float]:
        lo, hi = np.nanpercentile(values, q)
        return float(estimate), float(lo), float(hi)

    bands = []
    for lo, hi in BANDS_CM:
        inside = (sep >= lo) & (sep < hi)
        bands.append(((lo, hi), int(inside.sum()), float(p[inside].mean()) if inside.any() else float("nan")))
    return OpeningReport(interval(auroc(y, p), samples[:, 0]), interval(auroc(band_y, p[band_idx]), samples[:, 1]),
                         interval(spearman(p, sep), samples[:, 2]), tuple(bands), int(len(severe)), int(len(narrow)),
                         int(len(keys)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, nargs="+", required=True, help="evaluate report folder(s), pooled")
    parser.add_argument("--labels", type=Path, nargs="+", required=True,
                        help="labels.csv of the archive(s) those reports scored")
    parser.add_argument("--name", default="", help="the row's label")
    parser.add_argument("--resamples", type=int, default=2000)
    ns = parser.parse_args(argv)
    try:
        r = opening_report(study_scores(ns.report), separations(ns.labels), n_resamples=ns.resamples)
    except (OSError, KeyError, ValueError) as exc:
        print(f"valve_opening: {exc}", file=sys.stderr)
        return 2

    def fmt(t: tuple[float, float, float], sign: str = "") -> str:
        return f"{t[0]:{sign}.3f} [{t[1]:{sign}.3f}, {t[2]:{sign}.3f}]"

    print(f"| model | overall AUROC ({r.severe} severe / {r.studies - r.severe}) | severe vs "
          f"{NARROW_BAND_CM[0]:g}-{NARROW_BAND_CM[1]:g} cm ({r.severe} / {r.narrow}) | Spearman(score, separation) | "
          + " | ".join(f"mean score {lo:g}-{hi:g} cm" for (lo, hi), _, _ in r.band_means) + " |")
    print("|---|---|---|---|" + "---|" * len(r.band_means))
    print(f"| {ns.name} | {fmt(r.overall)} | {fmt(r.severe_vs_narrow)} | {fmt(r.spearman, '+')} | "
          + " | ".join(f"{m:.2f} (n={n})" for _, n, m in r.band_means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
