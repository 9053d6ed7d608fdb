"""Label-free anatomy and the cardiac cycle shared by both renderers.

A study's heart is its :class:`~train.synth.truth.StudyTruth` (what defines
the labels) plus anatomy that never reads a label (chamber sizes, chest wall,
contraction).  The cardiac cycle is a function of the phase (0 = R wave =
end-diastole): how far the LV has contracted, how far the aortic and mitral
valves are open.  Each renderer draws this heart its own way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from train.synth.truth import StudyTruth

__all__ = [
    "END_DIASTOLE_PHASE",
    "MID_SYSTOLE_PHASE",
    "Anatomy",
    "av_open",
    "contraction",
    "ecg_wave",
    "mv_open",
    "sample_anatomy",
]

END_DIASTOLE_PHASE = 0.0
"""Cardiac phase (fraction of the R-R interval after the R wave) of end-diastole."""
MID_SYSTOLE_PHASE = 0.18
"""Cardiac phase at which the aortic valve is fully open (cusp separation)."""

# Cardiac cycle as piecewise-linear knots over the phase [0, 1), phase 0 = R wave
# = end-diastole.  Systole is the first ~1/3 of the cycle.
_CONTRACTION_KNOTS = (
    (0.0, 0.05, 0.12, 0.20, 0.28, 0.35, 0.42, 0.50, 0.60, 0.85, 0.92, 1.0),
    (0.0, 0.0, 0.25, 0.60, 0.90, 1.0, 1.0, 0.55, 0.20, 0.15, 0.03, 0.0),
)
_AV_OPEN_KNOTS = ((0.0, 0.05, 0.09, 0.30, 0.36, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0))
_MV_OPEN_KNOTS = (
    (0.0, 0.40, 0.45, 0.52, 0.65, 0.80, 0.86, 0.92, 0.98, 1.0),
    (0.0, 0.0, 1.0, 0.9, 0.45, 0.40, 0.85, 0.7, 0.0, 0.0),
)


@dataclass(frozen=True)
class Anatomy:
    """Everything a renderer draws: the truth plus label-free anatomy (cm)."""

    truth: StudyTruth
    chest_wall_cm: float  # skin to RV free wall: patient size, never the label
    rv_cm: float
    la_cm: float
    lv_length_cm: float
    fractional_shortening: float
    pericardial_gap_cm: float = 0.4  # fluid/fat between epicardium and pericardium


def sample_anatomy(truth: StudyTruth, rng: np.random.Generator, chest_wall_cm: float) -> Anatomy:
    """Label-free anatomy of one study around its truth.

    Parameters
    ----------
    truth : StudyTruth
        The label-defining anatomy (not read by any draw here).
    rng : numpy.random.Generator
        The study's nuisance stream.
    chest_wall_cm : float
        Skin to heart, from the patient's habitus.

    Returns
    -------
    Anatomy
    """
    return Anatomy(
        truth=truth, chest_wall_cm=chest_wall_cm, rv_cm=float(rng.uniform(1.8, 2.8)),
        la_cm=float(rng.uniform(2.8, 4.0)), lv_length_cm=float(rng.uniform(7.5, 9.0)),
        fractional_shortening=float(rng.uniform(0.28, 0.40)),
        pericardial_gap_cm=float(rng.uniform(0.35, 0.55)),
    )


def _knots(ph: float, knots: tuple[tuple[float, ...], tuple[float, ...]]) -> float:
    """Piecewise-linear, smoothed with a cosine ease between knots."""
    xs, ys = knots
    ph = ph % 1.0
    i = int(np.searchsorted(xs, ph, side="right")) - 1
    i = min(max(i, 0), len(xs) - 2)
    t = (ph - xs[i]) / max(xs[i + 1] - xs[i], 1e-9)
    t = 0.5 - 0.5 * math.cos(math.pi * t)
    return float(ys[i] + (ys[i + 1] - ys[i]) * t)


def contraction(ph: float) -> float:
    """LV contraction at phase ``ph``: 0 at end-diastole, 1 at end-systole."""
    return _knots(ph, _CONTRACTION_KNOTS)


def av_open(ph: float) -> float:
    """Aortic valve opening at phase ``ph``: 0 closed, 1 fully open (mid-systole)."""
    return _knots(ph, _AV_OPEN_KNOTS)


def mv_open(ph: float) -> float:
    """Mitral valve opening at phase ``ph`` (E and A waves in diastole)."""
    return _knots(ph, _MV_OPEN_KNOTS)


def ecg_wave(ph: np.ndarray) -> np.ndarray:
    """A PQRST complex over the phase, R wave at phase 0 (end-diastole)."""

    def g(c: float, w: float, a: float) -> np.ndarray:
        d = (ph - c + 0.5) % 1.0 - 0.5
        return a * np.exp(-((d / w) ** 2))

    return g(0.88, 0.025, 0.12) + g(-0.018, 0.007, -0.10) + g(0.0, 0.009, 1.0) + \
        g(0.02, 0.008, -0.25) + g(0.27, 0.045, 0.28)
