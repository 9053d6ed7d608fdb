"""The anatomy that defines a synthetic study's labels, and its sampler.

The labels are physical (METHOD.md, "The synthetic archive"): LVH means the
end-diastolic septum or posterior wall is at least 1.2 cm thick; severe AS
means the aortic cusp separation at mid-systole is under 0.8 cm.  Both are
drawn *continuously across* their thresholds, so borderline studies exist on
both sides, and nothing visible in every frame gives severe AS away:

* Wall thickness: the thicker wall has one continuous density with no gap at
  1.2 cm (uniform 0.65-1.2 cm under it, a decaying tail from 1.2 to 2.1 cm
  above it, about equal densities where they meet).
* Aortic valve: four states of one disease, each with a cusp separation range
  that meets the next one's, so the separation is continuous through 0.8 cm:
  normal (1.5-2.5 cm), sclerosis without stenosis (1.3-2.3 cm), moderate AS
  (0.8-1.4 cm) and severe AS (0.35-0.8 cm).
* Leaflet thickness and calcification are drawn from *one* distribution for
  every diseased valve (sclerosis, moderate, severe) and a thinner one for a
  normal valve, so a bright, thick valve means "diseased", not "severe": only
  the opening in systole (cusp separation, cusp motion) tells severe AS from
  sclerosis or moderate AS.
* Prevalence near an echo lab's: severe AS 8 %, LVH about 30 %, and AS raises
  the odds of LVH (P(LVH) 0.55 with severe AS, 0.40 with moderate, 0.26 else).

Every study is drawn from its own random stream (:func:`keyed_rng`), keyed by
purpose, so no nuisance draw can depend on a label draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AV_STATES",
    "LVH_THRESHOLD_CM",
    "SEVERE_AS_THRESHOLD_CM",
    "StudyTruth",
    "keyed_rng",
    "sample_study_truths",
    "sample_truth",
]

LVH_THRESHOLD_CM = 1.2
"""End-diastolic IVS or LVPW thickness at or above which a study is LVH."""

SEVERE_AS_THRESHOLD_CM = 0.8
"""Mid-systolic aortic cusp separation below which a study is severe AS."""

AV_STATES = ("normal", "sclerosis", "moderate", "severe")
"""Aortic valve states, in order of disease."""

# Valve state prevalence: severe AS 8 %; sclerosis is common in an echo lab's
# (older) population, which is what keeps bright leaflets from meaning "severe".
_P_AV_STATE = (0.52, 0.28, 0.12, 0.08)
# Cusp separation ranges (cm) per state: each meets the next, no gap at 0.8.
_SEP_RANGE_CM = {"normal": (1.5, 2.5), "sclerosis": (1.3, 2.3), "moderate": (0.8, 1.4), "severe": (0.35, 0.8)}
# P(LVH | valve state): marginal 0.52 * 0.26 + 0.28 * 0.26 + 0.12 * 0.40 + 0.08 * 0.55 = 0.30.
_P_LVH = {"normal": 0.26, "sclerosis": 0.26, "moderate": 0.40, "severe": 0.55}
# Thicker wall: uniform on [0.65, 1.2) under the threshold; above it a truncated
# exponential whose density at 1.2 cm (0.30 / 0.22) is close to the one under
# it (0.70 / 0.55): a continuous distribution across the threshold.
_NORMAL_WALL_CM = (0.65, LVH_THRESHOLD_CM)
_LVH_WALL_SCALE_CM, _LVH_WALL_MAX_CM = 0.22, 2.1

PURPOSE_TRUTH, PURPOSE_STUDY, PURPOSE_VIDEO, PURPOSE_PATIENT, PURPOSE_FORCE = 1, 2, 3, 4, 5
# The measurement SRs draw from their own streams, so that adding them left
# every label, nuisance and noise draw of an archive where it was.
PURPOSE_REPORT = 6
# ``synth --look varied`` draws each video's look from a stream of its own, so
# the varied archive of a seed has the same patients, studies, labels, UIDs
# and acquisitions as the standard one; only how the tissue is drawn changes.
PURPOSE_LOOK = 7
# Which renderer draws a study of an archive drawn by several (``synth
# --renderer polar,raster``): a stream of its own, so the mixture has the
# same patients, labels and acquisitions as each single-renderer archive.
PURPOSE_RENDERER = 8


@dataclass(frozen=True)
class StudyTruth:
    """The anatomy that defines a study's labels, in centimetres.

    Attributes
    ----------
    ivs_cm, lvpw_cm : float
        End-diastolic interventricular septum and LV posterior wall thickness.
    lvid_cm : float
        End-diastolic LV internal diameter (3.8-6.0 cm, label-independent).
    av_cusp_sep_cm : float
        Aortic cusp separation (inner edges) at mid-systole.
    av_leaflet_cm : float
        Aortic leaflet thickness (thicker in any diseased valve).
    ao_root_cm : float
        Aortic root internal diameter (label-independent).
    av_calcification : float
        Leaflet calcification, 0 (none) to 1 (heavy): leaflet brightness.
    av_state : str
        One of :data:`AV_STATES`; severe AS is the separation, not this name.
    """

    ivs_cm: float
    lvpw_cm: float
    lvid_cm: float
    av_cusp_sep_cm: float
    av_leaflet_cm: float
    ao_root_cm: float
    av_calcification: float = 0.0
    av_state: str = "normal"

    @property
    def lvh(self) -> bool:
        """LVH: septum or posterior wall at least 1.2 cm at end-diastole."""
        return max(self.ivs_cm, self.lvpw_cm) >= LVH_THRESHOLD_CM

    @property
    def severe_as(self) -> bool:
        """Severe AS: mid-systolic cusp separation under 0.8 cm."""
        return self.av_cusp_sep_cm < SEVERE_AS_THRESHOLD_CM


def _thicker_wall(lvh: bool, u: float) -> float:
    """The thicker wall (cm) from a uniform ``u``, on the label's side of 1.2 cm."""
    if not lvh:
        lo, hi = _NORMAL_WALL_CM
        return min(lo + (hi - lo) * u, hi - 0.001)
    # Inverse CDF of an exponential truncated to [1.2, 2.1].
    span = 1.0 - math.exp(-(_LVH_WALL_MAX_CM - LVH_THRESHOLD_CM) / _LVH_WALL_SCALE_CM)
    return LVH_THRESHOLD_CM - _LVH_WALL_SCALE_CM * math.log(1.0 - u * span)


def _valve(state: str, u_sep: float, u_leaf: float, u_calc: float, ao_root: float,
           rng: np.random.Generator) -> tuple[float, float, float]:
    """Cusp separation, leaflet thickness and calcification of one valve state."""
    lo, hi = _SEP_RANGE_CM[state]
    hi = min(hi, ao_root - 0.8)  # the cusps open inside the root
    sep = lo + (hi - lo) * u_sep
    if state == "severe":
        sep = min(sep, SEVERE_AS_THRESHOLD_CM - 0.001)
    if state == "normal":
        leaflet = 0.08 + 0.06 * u_leaf
        calc = float(rng.beta(1.2, 7.0)) * (0.5 + 0.5 * u_calc)
    else:
        # One distribution for every diseased valve: brightness and thickness
        # say "diseased", never which of sclerosis, moderate or severe.
        leaflet = 0.12 + 0.20 * u_leaf
        calc = float(rng.beta(2.5, 2.0)) * (0.6 + 0.4 * u_calc)
    return sep, leaflet, calc


def sample_truth(
    rng: np.random.Generator, *, force_lvh: bool | None = None, force_as: bool | None = None
) -> StudyTruth:
    """Draw one study's anatomy from the label model.

    Parameters
    ----------
    rng : numpy.random.Generator
        A stream used for nothing but labels and label-defining anatomy.
    force_lvh, force_as : bool or None
        Condition the draw on a label (used to guarantee positives in small
        archives); None draws the label from its prevalence.

    Returns
    -------
    StudyTruth
        Values in cm; the labels are derived from them, never stored apart.
    """
    # Draw order is fixed whatever is forced, so forcing one study does not
    # shift the others' streams (each study has its own stream anyway).
    u_state, u_lvh, u_pattern, u_wall, u_other = rng.random(5)
    cum = np.cumsum(_P_AV_STATE)
    state = AV_STATES[min(int(np.searchsorted(cum, u_state, side="right")), len(AV_STATES) - 1)]
    if force_as is True:
        state = "severe"
    elif force_as is False and state == "severe":
        state = "moderate"
    lvh = bool(u_lvh < _P_LVH[state]) if force_lvh is None else force_lvh
    lvid = float(rng.uniform(3.8, 6.0))
    ao_root = float(rng.uniform(2.6, 3.6))
    t_max = _thicker_wall(lvh, float(u_wall))
    # The other wall is thinner: concentric (close) to asymmetric (septal or
    # posterior predominance), never under the normal minimum.
    t_other = max(0.6, t_max * (0.72 + 0.28 * float(u_other)))
    if lvh:
        t_other = min(t_other, t_max)
    ivs, lvpw = (t_max, t_other) if u_pattern < 0.6 else (t_other, t_max)
    u_sep, u_leaf, u_calc = rng.random(3)
    sep, leaflet, calc = _valve(state, float(u_sep), float(u_leaf), float(u_calc), ao_root, rng)
    return StudyTruth(
        ivs_cm=round(float(ivs), 3),
        lvpw_cm=round(float(lvpw), 3),
        lvid_cm=round(lvid, 3),
        av_cusp_sep_cm=round(float(sep), 3),
        av_leaflet_cm=round(float(leaflet), 3),
        ao_root_cm=round(ao_root, 3),
        av_calcification=round(float(calc), 3),
        av_state=state,
    )


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator keyed by the archive seed and a path of integers.

    Keying each purpose separately (labels, nuisance, noise) means that no
    nuisance draw can be influenced by a label draw, not even through the
    number of values the label draw consumed.
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


def sample_study_truths(seed: int, studies_per_patient: list[int]) -> list[list[StudyTruth]]:
    """Draw every study's truth, guaranteeing positives in small archives.

    Each study is drawn from its own stream.  Then, when the archive has at
    least 8 studies but no LVH (or no severe AS) study, one study picked by a
    seeded stream is redrawn conditioned on that label, so that a tiny demo
    archive still has both classes for every task.  Prevalence in larger
    archives is untouched (the fix-up then almost never fires).

    Parameters
    ----------
    seed : int
        Archive seed.
    studies_per_patient : list of int
        Number of studies for each patient.

    Returns
    -------
    list of list of StudyTruth
        ``truths[patient][study]``.
    """
    truths = [
        [sample_truth(keyed_rng(seed, PURPOSE_TRUTH, p, s)) for s in range(n)]
        for p, n in enumerate(studies_per_patient)
    ]
    flat = [(p, s) for p, n in enumerate(studies_per_patient) for s in range(n)]
    if len(flat) >= 8:
        pick = keyed_rng(seed, PURPOSE_FORCE)
        order = pick.permutation(len(flat))
        if not any(t.lvh for row in truths for t in row):
            p, s = flat[int(order[0])]
            truths[p][s] = sample_truth(keyed_rng(seed, PURPOSE_FORCE, p, s, 1), force_lvh=True,
                                        force_as=truths[p][s].severe_as)
        if not any(t.severe_as for row in truths for t in row):
            p, s = flat[int(order[1])]
            truths[p][s] = sample_truth(keyed_rng(seed, PURPOSE_FORCE, p, s, 2), force_as=True,
                                        force_lvh=truths[p][s].lvh)
    return truths
