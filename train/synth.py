"""A synthetic echocardiography archive whose labels are visible anatomy.

``echonode-train synth --out DIR --patients N [--seed S]`` writes DICOM
Ultrasound Multi-frame objects (JPEG baseline, YBR_FULL_422) that look like
transthoracic echo cines, the sonographer's measurement SR of every study
(:mod:`train.synth_reports`), plus ``labels.csv`` (one row per study),
``videos.csv`` (one row per video) and ``reports.csv`` (one row per SR).  Real labelled echo cannot be shipped, so
this archive stands in for one (METHOD.md, "The synthetic archive").

Design
------
* The labels are *physical*: every study has a ground-truth anatomy in
  centimetres (:class:`StudyTruth`).  LVH means the end-diastolic septum or
  posterior wall is at least 1.2 cm thick; severe AS means the aortic cusp
  separation at mid-systole is under 0.8 cm with thick, bright leaflets.  The
  renderer draws exactly that anatomy, and the DICOM geometry (Sequence of
  Ultrasound Regions, PhysicalDeltaX/Y in cm, apex as the reference pixel)
  lets anyone measure it back from the pixels.
* Every study also has the sonographer's measurement SR (TID 5200 or TID
  5300, in one of three vendor dialects) whose values are its truth: IVSd,
  LVPWd, LVIDd, LV mass and mass index, cusp separation, and an aortic
  valve's peak velocity, gradients and area that follow from the cusp
  separation by continuity and Bernoulli.  Severe AS (cusp separation under
  0.8 cm) is exactly V_AV >= 4 m/s and mean gradient >= 40 mmHg; normal walls
  keep the LV mass index under the LVH limit (see :mod:`train.synth_reports`).
* Nothing else carries the label.  The label sampler has its own random
  stream; gain, depth, sector angle, heart rate, frame rate, text, patient
  size and vendor look come from other streams and never read the label.
* Image formation mimics a scanner: tissue reflectivity is evaluated on a
  polar (depth x beam) grid, multiplied by complex random scatterers,
  blurred by an anisotropic point-spread function (which makes spatially
  correlated Rayleigh speckle), attenuated with depth, time-gain
  compensated, log-compressed and scan-converted into a sector.  Overlays
  (text, depth scale, ECG, icons) are drawn in colour so that the colour
  conversion of a consumer is exercised.
* Deterministic: all randomness comes from ``numpy.random.default_rng`` keyed
  by ``(seed, patient, study, video, purpose)``, UIDs from
  :func:`pydicom.uid.generate_uid` with seed-derived entropy, and no wall
  clock is written into the files.  Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, UltrasoundMultiFrameImageStorage, generate_uid

from train import synth_reports

__all__ = [
    "ArchiveSummary",
    "StudyTruth",
    "Vendor",
    "VENDORS",
    "VIEWS",
    "LVH_THRESHOLD_CM",
    "SEVERE_AS_THRESHOLD_CM",
    "END_DIASTOLE_PHASE",
    "MID_SYSTOLE_PHASE",
    "sample_truth",
    "sample_study_truths",
    "generate_archive",
    "add_synth_arguments",
    "run_synth",
]

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

LVH_THRESHOLD_CM = 1.2
"""End-diastolic IVS or LVPW thickness at or above which a study is LVH."""

SEVERE_AS_THRESHOLD_CM = 0.8
"""Mid-systolic aortic cusp separation below which a study is severe AS."""

P_SEVERE_AS = 0.08
# P(LVH | AS) and P(LVH | no AS) chosen so that the marginal is 30 % and AS
# roughly doubles the odds of LVH (0.08 * 0.55 + 0.92 * 0.278 = 0.300).
P_LVH_GIVEN_AS = 0.55
P_LVH_GIVEN_NO_AS = (0.30 - P_SEVERE_AS * P_LVH_GIVEN_AS) / (1.0 - P_SEVERE_AS)

END_DIASTOLE_PHASE = 0.0
"""Cardiac phase (fraction of the R-R interval after the R wave) of end-diastole."""
MID_SYSTOLE_PHASE = 0.18
"""Cardiac phase at which the aortic valve is fully open (cusp separation)."""

VIEWS = ("plax", "a4c", "psax")
_VIEW_CODES = {  # CID 12226 Echocardiography Image View
    "plax": ("399139001", "SCT", "Parasternal long axis"),
    "a4c": ("399214001", "SCT", "Apical four chamber"),
    "psax": ("399271003", "SCT", "Parasternal short axis at the Papillary Muscle level"),
}
_VIEW_DESCRIPTIONS = {"plax": "2D PLAX", "a4c": "2D A4C", "psax": "2D PSAX PM"}

# Tissue reflectivities (linear power, relative).  Blood sits ~30 dB under
# myocardium, which is what makes chambers black on a real scanner.
_R_BLOOD = 0.0006
_R_MYO = 0.30
_R_TISSUE = 0.12
_R_WALL = 0.9  # fibrous aortic walls, annulus
_R_PERI = 2.5  # pericardium: the brightest specular line in PLAX
_R_LEAFLET = 0.7
_R_CALCIFIED = 4.0

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
class Vendor:
    """The look of one synthetic scanner make (never depends on any label).

    Parameters
    ----------
    manufacturer, model, software : str
        Written to the General Equipment module and burned into the image.
    text_rgb, ecg_rgb : tuple of int
        Colours of the burned-in text and the ECG trace.
    angle_deg, depth_cm : float
        Typical sector angle and depth; studies vary around them.
    gamma, dynamic_range_db : float
        Grey map: compression curve and displayed dynamic range.
    psf_axial, psf_lateral : float
        Speckle grain in polar samples (axial, lateral).
    text_left : bool
        Whether the settings text block sits on the left or the right.
    report_dialect : str
        How its measurement SR is written (one of
        :data:`train.synth_reports.DIALECTS`).
    """

    manufacturer: str
    model: str
    software: str
    text_rgb: tuple[int, int, int]
    ecg_rgb: tuple[int, int, int]
    angle_deg: float
    depth_cm: float
    gamma: float
    dynamic_range_db: float
    psf_axial: float
    psf_lateral: float
    text_left: bool
    report_dialect: str = synth_reports.DIALECT_TID5300


VENDORS: tuple[Vendor, ...] = (
    Vendor("Northwind Sonics", "NW-C9", "4.2.1", (255, 230, 0), (0, 230, 0),
           80.0, 16.0, 1.25, 54.0, 0.9, 1.3, True, synth_reports.DIALECT_GE),
    Vendor("Helios Imaging", "Helios Cardio 5", "HC5 2.08", (235, 235, 235), (60, 255, 60),
           75.0, 15.0, 1.10, 50.0, 1.1, 1.6, False, synth_reports.DIALECT_PHILIPS),
    Vendor("Orca Medical", "Orca X3", "X3-1.9", (0, 220, 255), (0, 255, 120),
           85.0, 17.0, 1.40, 58.0, 0.8, 1.1, True, synth_reports.DIALECT_TID5300),
    Vendor("Kestrel Echo", "KE-70", "7.0.3", (255, 200, 60), (90, 255, 0),
           70.0, 14.5, 1.20, 52.0, 1.0, 1.4, False, synth_reports.DIALECT_TID5300),
)


# --------------------------------------------------------------------------
# Ground truth and its sampler
# --------------------------------------------------------------------------


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
        Aortic leaflet thickness (thick and calcified in severe AS).
    ao_root_cm : float
        Aortic root internal diameter (label-independent).
    """

    ivs_cm: float
    lvpw_cm: float
    lvid_cm: float
    av_cusp_sep_cm: float
    av_leaflet_cm: float
    ao_root_cm: float

    @property
    def lvh(self) -> bool:
        """LVH: septum or posterior wall at least 1.2 cm at end-diastole."""
        return max(self.ivs_cm, self.lvpw_cm) >= LVH_THRESHOLD_CM

    @property
    def severe_as(self) -> bool:
        """Severe AS: mid-systolic cusp separation under 0.8 cm."""
        return self.av_cusp_sep_cm < SEVERE_AS_THRESHOLD_CM


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
    u_as, u_lvh, u_pattern = rng.random(3)
    severe_as = bool(u_as < P_SEVERE_AS) if force_as is None else force_as
    p_lvh = P_LVH_GIVEN_AS if severe_as else P_LVH_GIVEN_NO_AS
    lvh = bool(u_lvh < p_lvh) if force_lvh is None else force_lvh
    lvid = float(rng.uniform(3.8, 6.0))
    ao_root = float(rng.uniform(2.6, 3.6))
    thick, other, normal_a, normal_b = rng.uniform(0.0, 1.0, 4)
    if lvh:
        # Mostly concentric, sometimes septal-predominant or posterior-predominant.
        t_max = 1.25 + 0.65 * thick
        t_other = 0.85 + (t_max - 0.85) * other
        ivs, lvpw = (t_max, t_other) if u_pattern < 0.6 else (t_other, t_max)
    else:
        # Normal range 0.6-1.1 cm; the gap to 1.2 keeps labels unambiguous.
        ivs = 0.6 + 0.5 * normal_a
        lvpw = 0.6 + 0.5 * normal_b
    u_sep, u_leaf = rng.random(2)
    if severe_as:
        sep = 0.35 + 0.40 * u_sep
        leaflet = 0.25 + 0.15 * u_leaf
    else:
        sep = 1.5 + (min(2.5, ao_root - 0.8) - 1.5) * u_sep
        leaflet = 0.08 + 0.05 * u_leaf
    return StudyTruth(
        ivs_cm=round(float(ivs), 3),
        lvpw_cm=round(float(lvpw), 3),
        lvid_cm=round(lvid, 3),
        av_cusp_sep_cm=round(float(sep), 3),
        av_leaflet_cm=round(float(leaflet), 3),
        ao_root_cm=round(ao_root, 3),
    )


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator keyed by the archive seed and a path of integers.

    Keying each purpose separately (labels, nuisance, noise) means that no
    nuisance draw can be influenced by a label draw, not even through the
    number of values the label draw consumed.
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


_PURPOSE_TRUTH, _PURPOSE_STUDY, _PURPOSE_VIDEO, _PURPOSE_PATIENT, _PURPOSE_FORCE = 1, 2, 3, 4, 5
# The measurement SRs draw from their own streams, so that adding them left
# every label, nuisance and noise draw of an archive where it was.
_PURPOSE_REPORT = 6


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
        [sample_truth(_rng(seed, _PURPOSE_TRUTH, p, s)) for s in range(n)]
        for p, n in enumerate(studies_per_patient)
    ]
    flat = [(p, s) for p, n in enumerate(studies_per_patient) for s in range(n)]
    if len(flat) >= 8:
        pick = _rng(seed, _PURPOSE_FORCE)
        order = pick.permutation(len(flat))
        if not any(t.lvh for row in truths for t in row):
            p, s = flat[int(order[0])]
            truths[p][s] = sample_truth(_rng(seed, _PURPOSE_FORCE, p, s, 1), force_lvh=True,
                                        force_as=truths[p][s].severe_as)
        if not any(t.severe_as for row in truths for t in row):
            p, s = flat[int(order[1])]
            truths[p][s] = sample_truth(_rng(seed, _PURPOSE_FORCE, p, s, 2), force_as=True,
                                        force_lvh=truths[p][s].lvh)
    return truths


# --------------------------------------------------------------------------
# Label-independent anatomy and acquisition parameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Everything the renderer draws: the truth plus label-free anatomy."""

    truth: StudyTruth
    chest_wall_cm: float  # skin to RV free wall: patient size, never the label
    rv_cm: float
    la_cm: float
    lv_length_cm: float
    fractional_shortening: float
    pericardial_gap_cm: float = 0.4  # fluid/fat between epicardium and pericardium


@dataclass(frozen=True)
class VideoPlan:
    """The acquisition of one video: geometry, timing and look."""

    view: str
    series_number: int
    vendor: Vendor
    depth_cm: float
    angle_deg: float
    tilt_deg: float
    shift_x_cm: float
    shift_z_cm: float
    heart_rate_bpm: float
    fps: int
    phase0: float
    frames: int
    gain_db: float
    tgc_db: tuple[float, ...]
    atten_db_per_cm: float
    freq_mhz: float
    noise_seed: int


# --------------------------------------------------------------------------
# Cardiac timing
# --------------------------------------------------------------------------


def _knots(ph: float, knots: tuple[tuple[float, ...], tuple[float, ...]]) -> float:
    """Piecewise-linear, smoothed with a cosine ease between knots."""
    xs, ys = knots
    ph = ph % 1.0
    i = int(np.searchsorted(xs, ph, side="right")) - 1
    i = min(max(i, 0), len(xs) - 2)
    t = (ph - xs[i]) / max(xs[i + 1] - xs[i], 1e-9)
    t = 0.5 - 0.5 * math.cos(math.pi * t)
    return float(ys[i] + (ys[i + 1] - ys[i]) * t)


def _ecg(ph: np.ndarray) -> np.ndarray:
    """A PQRST complex over the phase, R wave at phase 0 (end-diastole)."""

    def g(c: float, w: float, a: float) -> np.ndarray:
        d = (ph - c + 0.5) % 1.0 - 0.5
        return a * np.exp(-((d / w) ** 2))

    return g(0.88, 0.025, 0.12) + g(-0.018, 0.007, -0.10) + g(0.0, 0.009, 1.0) + \
        g(0.02, 0.008, -0.25) + g(0.27, 0.045, 0.28)


# --------------------------------------------------------------------------
# Anatomy: reflectivity on view-local coordinates (cm)
# --------------------------------------------------------------------------


def _clamp01(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0.0, 1.0, out=a)


def _between(a: np.ndarray, lo, hi, e: float) -> np.ndarray:
    """Soft membership of ``lo < a < hi`` with edges ``e`` wide (anti-aliasing)."""
    return _clamp01((a - lo) / e + 0.5) * _clamp01((hi - a) / e + 0.5)


def _paint(refl: np.ndarray, m: np.ndarray, value) -> None:
    """Lay ``value`` over ``refl`` where the membership ``m`` is set."""
    refl += m * (value - refl)


def _segment_dist(u: np.ndarray, v: np.ndarray, p0, p1) -> tuple[np.ndarray, np.ndarray]:
    """Distance from points to the segment p0-p1 and the position along it."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    ll = du * du + dv * dv + 1e-12
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / ll, 0.0, 1.0)
    return np.hypot(u - p0[0] - t * du, v - p0[1] - t * dv), t


def _leaflet(refl, u, v, hinge, tip, thick, value, e) -> None:
    d, t = _segment_dist(u, v, hinge, tip)
    _paint(refl, _clamp01((thick / 2 - d) / e + 0.5), value)


def _thickened(inner_ed: float, wall_ed: float, inner_now: np.ndarray | float):
    """Outer radius keeping the wall's cross-section area (myocardium is incompressible)."""
    return np.sqrt(np.square(inner_now) + (inner_ed + wall_ed) ** 2 - inner_ed ** 2)


def _ao_geometry(an: Anatomy, s: float) -> tuple[float, float]:
    """Anterior and posterior inner wall of the aortic root (v, cm) in PLAX.

    The anterior aortic wall continues the septum (aorto-septal continuity),
    so the root starts halfway into the septum's end-diastolic thickness.
    """
    h_base = an.truth.lvid_cm / 2 * (1 - an.fractional_shortening * s * 0.35)
    v_a = -h_base - 0.5 * an.truth.ivs_cm
    return v_a, v_a + an.truth.ao_root_cm


def _mitral_posterior(an: Anatomy, s: float) -> float:
    """Depth (v) of the posterior mitral annulus: at least 2.3 cm below the aortic root."""
    h_base = an.truth.lvid_cm / 2 * (1 - an.fractional_shortening * s * 0.35)
    return max(h_base + 0.1, _ao_geometry(an, s)[1] + 2.3)


def av_leaflet_tips(an: Anatomy, ph: float) -> tuple[tuple[float, float], ...]:
    """Hinges and tips of the two aortic cusps in PLAX local coordinates.

    Returns ``(hinge_a, tip_a, hinge_p, tip_p)``; at full opening the inner
    edges of the cusps are exactly ``av_cusp_sep_cm`` apart.
    """
    tr = an.truth
    s = _knots(ph, _CONTRACTION_KNOTS)
    o = _knots(ph, _AV_OPEN_KNOTS)
    v_a, v_p = _ao_geometry(an, s)
    u_av = AV_U_CM
    ha, hp = (u_av, v_a + 0.08), (u_av, v_p - 0.08)
    vc = 0.5 * (ha[1] + hp[1])
    r = 0.5 * (hp[1] - ha[1])
    ell = math.hypot(r, 0.35)
    tips = []
    for hinge, sign in ((ha, -1.0), (hp, 1.0)):
        closed = math.atan2(vc - hinge[1], 0.35)
        v_tip = vc + sign * (tr.av_cusp_sep_cm / 2 + tr.av_leaflet_cm / 2)
        opened = math.asin(max(-1.0, min(1.0, (v_tip - hinge[1]) / ell)))
        ang = closed + (opened - closed) * o
        tips.append((hinge[0] + ell * math.cos(ang), hinge[1] + ell * math.sin(ang)))
    return ha, tips[0], hp, tips[1]


AV_U_CM = 0.9
"""Position of the aortic annulus along the PLAX long axis (cm past the mitral annulus)."""
MEASURE_U_CM = -2.5
"""Where along the PLAX long axis wall thickness is measured (clear of base and apex)."""


def _smooth(a: np.ndarray) -> np.ndarray:
    a = np.clip(a, 0.0, 1.0)
    return a * a * (3 - 2 * a)


def _plax(u: np.ndarray, v: np.ndarray, bg: np.ndarray, an: Anatomy, ph: float, e: float) -> np.ndarray:
    """Parasternal long axis: RV, septum, LV, posterior wall, aortic root, LA.

    ``u`` runs along the LV long axis toward the aorta (screen right), ``v``
    across it, deeper positive; origin at the LV centre at the mitral annulus.
    Between ``u = -4.5`` and ``u = -1.5`` the walls are parallel and exactly
    ``ivs_cm`` / ``lvpw_cm`` thick at end-diastole (where one measures them).
    """
    tr = an.truth
    s = _knots(ph, _CONTRACTION_KNOTS)
    m_open = _knots(ph, _MV_OPEN_KNOTS)
    fs = an.fractional_shortening
    h0 = tr.lvid_cm / 2
    # The base moves less than the mid-ventricle; motion fades toward the annulus.
    w = np.clip(-u / 1.5, 0.35, 1.0)
    h = h0 * (1 - fs * s * w)
    # Apex: the cavity and the walls round off past 4.5 cm from the base.
    apex = np.sqrt(np.clip(1 - np.square(np.minimum(u + 4.5, 0) / (an.lv_length_cm - 4.5)), 0, 1))
    apex_o = np.sqrt(np.clip(1 - np.square(np.minimum(u + 4.5, 0) / (an.lv_length_cm - 3.6)), 0, 1))
    sep_o = _thickened(h0, tr.ivs_cm, h) - h
    pw_o = _thickened(h0, tr.lvpw_cm, h) - h
    v_a, v_p = _ao_geometry(an, s)
    v_pa = _mitral_posterior(an, s)
    # Toward the base the septum turns into the anterior aortic wall and the
    # posterior wall dips to the posterior mitral annulus.
    b_top = _smooth((u + 0.8) / 1.0)
    b_bot = _smooth((u + 1.5) / 1.8)
    cav_hi = -h * apex * (1 - b_top) + v_a * b_top
    cav_lo = (h * apex) * (1 - b_bot) + v_pa * b_bot
    sep_top = (-(h + sep_o) * apex_o) * (1 - b_top) + (v_a - 0.25) * b_top
    pw_bot = (h + pw_o) * apex_o * (1 - b_bot) + (v_pa + pw_o) * b_bot
    la_top = v_p + 0.3
    la_half = (an.la_cm / 2 + 0.6, an.la_cm / 2)
    la_c = (0.5 + la_half[0], la_top + la_half[1])
    la_bot = la_top + an.la_cm
    gap = an.pericardial_gap_cm
    peri = pw_bot + gap + _smooth(u / 1.2) * np.maximum(la_bot + 0.3 - pw_bot - gap, 0)
    rv_top = -(h0 + tr.ivs_cm + an.rv_cm)

    refl = bg.copy()
    # Pericardium (bright) and the descending aorta behind the AV groove.
    _paint(refl, _between(v, peri, peri + 0.35, e), _R_PERI)
    da = np.hypot(u - 0.6, v - (la_bot + 1.6)) - 0.9
    _paint(refl, _clamp01(0.5 - da / e), _R_BLOOD)
    # RV free wall, then RV (and RVOT, anterior to the aorta) blood.
    _paint(refl, _between(v, rv_top - 0.4, rv_top, e), _R_MYO)
    _paint(refl, _between(v, rv_top, np.where(u <= 0.3, peri, v_a - 0.2), e), _R_BLOOD)
    # LV myocardium block, then the cavity.
    lv_zone = _clamp01((0.3 - u) / e + 0.5) * (apex_o > 0)
    _paint(refl, lv_zone * _between(v, sep_top, pw_bot, e), _R_MYO)
    _paint(refl, lv_zone * _between(v, cav_hi, cav_lo, e), _R_BLOOD)
    # Aortic root: bright walls, blood lumen, sinus bulge just above the valve.
    ao_zone = _clamp01(u / e + 0.5)
    bulge = 0.25 * np.exp(-np.square((u - AV_U_CM - 0.9) / 0.8))
    _paint(refl, ao_zone * _between(v, v_a - 0.25 - bulge, v_p + 0.25 + bulge, e), _R_WALL)
    _paint(refl, ao_zone * _between(v, v_a - bulge, v_p + bulge, e), _R_BLOOD)
    # Left atrium with a thin wall, open to the LV through the mitral orifice.
    la_d = np.hypot((u - la_c[0]) / la_half[0], (v - la_c[1]) / la_half[1])
    _paint(refl, _clamp01((1.08 - la_d) / 0.03) * (u > 0.3), _R_MYO)
    _paint(refl, _clamp01((1.0 - la_d) / 0.03) * (u > 0.3), _R_BLOOD)
    _paint(refl, _between(u, -0.5, la_c[0], e) * _between(v, v_p + 0.25, v_pa, e), _R_BLOOD)
    # Mitral leaflets: open toward the septum in diastole, coapt in systole.
    ha, hp = (0.1, v_p + 0.15), (0.35, v_pa + 0.05)
    closed = (-0.8, v_p + 0.25 + 0.65 * (v_pa - v_p - 0.25))
    for hinge, length, open_tip in ((ha, 2.2, (-1.9, v_a + 0.9)), (hp, 1.3, (-0.7, v_pa + 0.6))):
        tip = (closed[0] + (open_tip[0] - closed[0]) * m_open, closed[1] + (open_tip[1] - closed[1]) * m_open)
        du, dv = tip[0] - hinge[0], tip[1] - hinge[1]
        k = length / max(math.hypot(du, dv), 1e-6)
        _leaflet(refl, u, v, hinge, (hinge[0] + du * k, hinge[1] + dv * k), 0.12, _R_LEAFLET, e)
    # Aortic cusps: thin in normals, thick and calcified (bright) in severe AS.
    ha_, ta, hp_, tp = av_leaflet_tips(an, ph)
    value = _R_CALCIFIED if tr.severe_as else _R_LEAFLET
    _leaflet(refl, u, v, ha_, ta, tr.av_leaflet_cm, value, e)
    _leaflet(refl, u, v, hp_, tp, tr.av_leaflet_cm, value, e)
    return refl


def _a4c(x: np.ndarray, z: np.ndarray, bg: np.ndarray, an: Anatomy, ph: float, e: float) -> np.ndarray:
    """Apical four chamber: ventricles on top (LV screen right), atria below.

    ``z`` runs from the LV endocardial apex toward the atria, ``x`` across,
    positive toward the LV lateral wall; the septum is centred on ``x = 0``.
    """
    tr = an.truth
    s = _knots(ph, _CONTRACTION_KNOTS)
    m_open = _knots(ph, _MV_OPEN_KNOTS)
    h0 = tr.lvid_cm / 2
    h = h0 * (1 - an.fractional_shortening * s)
    sep_t = float(_thickened(h0, tr.ivs_cm, h) - h)
    lat_t = float(_thickened(h0, tr.lvpw_cm, h) - h)
    length = an.lv_length_cm - 1.1 * s  # the mitral annulus descends toward the apex
    tv_len = length - 0.7 - 0.6 * s  # tricuspid annulus: more apical, moves more
    x_rv_sep = -tr.ivs_cm / 2
    x_lv_sep = x_rv_sep + sep_t
    xc = x_lv_sep + h
    zm = 0.45 * length

    def profile(zz: np.ndarray, half: float, z0: float) -> np.ndarray:
        # Bullet: elliptical cap from z0 to zm, then a straight wall.
        f = np.clip((zz - z0) / max(zm - z0, 1e-3), 0, 1)
        return half * np.sqrt(1 - np.square(1 - f))

    refl = bg.copy()
    # Atria (blood) with walls, below the annuli.
    la_c = (xc + 0.2, length + 0.3 + an.la_cm * 0.65)
    ra_c = (x_rv_sep - 1.9, tv_len + 0.3 + an.la_cm * 0.6)
    for c, rx, rz in ((la_c, 2.0, an.la_cm * 0.7), (ra_c, 1.8, an.la_cm * 0.65)):
        d = np.hypot((x - c[0]) / rx, (z - c[1]) / rz)
        _paint(refl, _clamp01((1.12 - d) / 0.03), _R_MYO)
    for c, rx, rz in ((la_c, 2.0, an.la_cm * 0.7), (ra_c, 1.8, an.la_cm * 0.65)):
        d = np.hypot((x - c[0]) / rx, (z - c[1]) / rz)
        _paint(refl, _clamp01((1.0 - d) / 0.03), _R_BLOOD)
    # The interatrial septum is thin and drops out: leave a faint band only.
    _paint(refl, _between(x, x_rv_sep - 0.1, x_rv_sep + 0.1, e) * _between(z, length + 0.8, length + 4.0, e), _R_TISSUE)
    # Pericardium along the lateral wall.
    xo = xc + profile(z, h + lat_t + 0.35, -1.2)
    _paint(refl, _between(x - xo, 0.0, 0.3, e) * _between(z, 1.0, length + 1.0, e), _R_PERI * 0.5)
    # LV myocardium (septum on the left, lateral wall on the right) and cavity.
    left = xc - profile(z, h + sep_t, -0.9)
    right = xc + profile(z, h + lat_t, -0.9)
    zone = _between(z, -0.9, length, e)
    _paint(refl, zone * _between(x, left, right, e), _R_MYO)
    _paint(refl, _between(z, 0.0, length + 0.3, e) * (np.abs(x - xc) < profile(z, h, 0.0)), _R_BLOOD)
    # RV: shorter and crescent-like, left of the septum, thin free wall.
    rv_w = 1.4 * an.rv_cm * (1 - 0.2 * s) * np.sqrt(np.clip((z - 0.15 * length) / (0.55 * length), 0, 1))
    rv_zone = _between(z, 0.15 * length - 0.4, tv_len, e)
    _paint(refl, rv_zone * _between(x, x_rv_sep - rv_w - 0.4, x_rv_sep, e) * (rv_w > 0.05), _R_MYO)
    _paint(refl, _between(z, 0.15 * length, tv_len + 0.3, e) * _between(x, x_rv_sep - rv_w, x_rv_sep, e), _R_BLOOD)
    # AV valves: hinged at the annuli, open toward the apex in diastole.
    for hinge_l, hinge_r, zz in (((x_lv_sep, length), (xc + h, length), length),
                                 ((x_rv_sep - 1.4 * an.rv_cm, tv_len), (x_rv_sep, tv_len), tv_len)):
        mid = 0.5 * (hinge_l[0] + hinge_r[0])
        half = 0.5 * (hinge_r[0] - hinge_l[0])
        for hinge, sgn in ((hinge_l, 1.0), (hinge_r, -1.0)):
            closed = (mid, zz - 0.5)
            opened = (hinge[0] + sgn * 0.25 * half, zz - 0.95 * half)
            tip = (closed[0] + (opened[0] - closed[0]) * m_open, closed[1] + (opened[1] - closed[1]) * m_open)
            _leaflet(refl, x, z, hinge, tip, 0.12, _R_LEAFLET, e)
    return refl


def _psax(x: np.ndarray, z: np.ndarray, bg: np.ndarray, an: Anatomy, ph: float, e: float) -> np.ndarray:
    """Parasternal short axis at the papillary muscles: a round LV ring.

    Origin at the LV centre; the septum faces up-left (toward the RV), the
    posterior wall down.  Ring thickness blends IVS (septal) and LVPW.
    """
    tr = an.truth
    s = _knots(ph, _CONTRACTION_KNOTS)
    h0 = tr.lvid_cm / 2
    h = h0 * (1 - an.fractional_shortening * s)
    phi = np.arctan2(z, x)
    sep_dir = math.atan2(-0.75, -0.66)
    f_sep = 0.5 * (1 + np.cos(phi - sep_dir))
    wall0 = tr.lvpw_cm + (tr.ivs_cm - tr.lvpw_cm) * f_sep
    outer = _thickened(h0, wall0, h)
    r = np.hypot(x, z * 1.05)
    refl = bg.copy()
    # Pericardium below the posterior wall.
    low = _clamp01(z / (h0 + 0.5))
    gap = an.pericardial_gap_cm
    _paint(refl, low * _between(r - outer, gap, gap + 0.35, e), _R_PERI)
    # RV crescent anterior-left: a circle offset toward the septum, minus the LV.
    r_out = h0 + tr.ivs_cm
    d_off = 0.6 * r_out
    rv_c = (d_off * math.cos(sep_dir), d_off * math.sin(sep_dir))
    r_rv = r_out - d_off + 0.75 * an.rv_cm
    rv_d = np.hypot(x - rv_c[0], z - rv_c[1])
    rv_cap = _clamp01((0.3 * h0 - z) / 0.5)
    _paint(refl, rv_cap * _clamp01((r_rv + 0.4 - rv_d) / e + 0.5), _R_MYO)
    _paint(refl, rv_cap * _clamp01((r_rv - rv_d) / e + 0.5), _R_BLOOD)
    _paint(refl, _clamp01((outer - r) / e + 0.5), _R_MYO)
    _paint(refl, _clamp01((h - r) / e + 0.5), _R_BLOOD)
    # Papillary muscles (antero-lateral and postero-medial), attached to the wall.
    for ang in (math.radians(30), math.radians(130)):
        px, pz = (h - 0.45) * math.cos(ang), (h - 0.45) * math.sin(ang)
        d = np.hypot(x - px, z - pz)
        _paint(refl, _clamp01((0.5 + 0.15 * s - d) / e + 0.5), _R_MYO * 1.2)
    return refl


_VIEW_FUNCS = {"plax": _plax, "a4c": _a4c, "psax": _psax}


# --------------------------------------------------------------------------
# Image formation
# --------------------------------------------------------------------------


@dataclass
class Geometry:
    """Where the sector lies in the image and how pixels map to centimetres."""

    rows: int
    cols: int
    apex_row: int
    apex_col: int
    depth_cm: float
    angle_deg: float
    delta_cm: float  # isotropic pixel size, cm/pixel
    n_r: int
    n_th: int

    @property
    def sector_px(self) -> float:
        return self.depth_cm / self.delta_cm

    @property
    def half_width_px(self) -> float:
        return self.sector_px * math.sin(math.radians(self.angle_deg / 2))

    def region_bounds(self) -> tuple[int, int, int, int]:
        """``(min_x0, min_y0, max_x1, max_y1)``, inclusive, inside the image."""
        x0 = max(0, int(math.floor(self.apex_col - self.half_width_px)))
        x1 = min(self.cols - 1, int(math.ceil(self.apex_col + self.half_width_px)))
        y1 = min(self.rows - 1, int(math.ceil(self.apex_row + self.sector_px)))
        return x0, self.apex_row, x1, y1

    def to_pixel(self, x_cm: np.ndarray, z_cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (col, row) of points given in cm relative to the apex."""
        return self.apex_col + x_cm / self.delta_cm, self.apex_row + z_cm / self.delta_cm


def _geometry(rows: int, cols: int, depth_cm: float, angle_deg: float, vendor: Vendor) -> Geometry:
    apex_row = int(round(rows * (0.07 if vendor.text_left else 0.08)))
    ecg_band = int(round(rows * 0.13))
    margin = max(24, int(cols * 0.07))
    half = math.sin(math.radians(angle_deg / 2))
    sector_px = min(rows - apex_row - ecg_band, (cols / 2 - margin) / half)
    delta = depth_cm / sector_px
    # Polar grid: ~0.6 samples per output pixel in depth is enough once the
    # PSF blur is applied, and keeps the per-frame cost low.
    n_r = int(max(96, round(sector_px * 0.6)))
    n_th = int(max(64, round(angle_deg * 1.5)))
    return Geometry(rows, cols, apex_row, cols // 2, depth_cm, angle_deg, delta, n_r, n_th)


def _view_pose(view: str, an: Anatomy, plan: VideoPlan) -> tuple[float, float, float]:
    """Centre (x, z in cm from the apex) and rotation of the view's local frame."""
    tr = an.truth
    if view == "plax":
        z = an.chest_wall_cm + 0.4 + an.rv_cm + tr.ivs_cm + tr.lvid_cm / 2
        x = 0.6
    elif view == "a4c":
        z = an.chest_wall_cm + 0.9
        x = -0.3
    else:
        z = an.chest_wall_cm + 0.4 + an.rv_cm * 0.8 + tr.ivs_cm + tr.lvid_cm / 2
        x = 0.2
    return x + plan.shift_x_cm, z + plan.shift_z_cm, math.radians(plan.tilt_deg)


def _local_coords(geo: Geometry, pose: tuple[float, float, float]):
    """View-local coordinates of every polar sample, and its depth."""
    r = (np.arange(geo.n_r, dtype=np.float32) + 0.5) * (geo.depth_cm / geo.n_r)
    half = math.radians(geo.angle_deg / 2)
    th = -half + (np.arange(geo.n_th, dtype=np.float32) + 0.5) * (2 * half / geo.n_th)
    rr, tt = np.meshgrid(r, th, indexing="ij")
    xx, zz = rr * np.sin(tt), rr * np.cos(tt)
    cx, cz, rot = pose
    c, s = math.cos(rot), math.sin(rot)
    u = c * (xx - cx) + s * (zz - cz)
    v = -s * (xx - cx) + c * (zz - cz)
    return u.astype(np.float32), v.astype(np.float32), rr, tt


def local_to_pixel(geo: Geometry, pose: tuple[float, float, float], u, v):
    """Image (col, row) of view-local points (cm); used by tests to place scan lines."""
    cx, cz, rot = pose
    c, s = math.cos(rot), math.sin(rot)
    x = cx + c * np.asarray(u) - s * np.asarray(v)
    z = cz + s * np.asarray(u) + c * np.asarray(v)
    return geo.to_pixel(x, z)


def _scan_maps(geo: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2.remap maps from image pixels to polar samples, and the sector mask."""
    cols = np.arange(geo.cols, dtype=np.float32)
    rows = np.arange(geo.rows, dtype=np.float32)
    cc, rr = np.meshgrid(cols, rows)
    x = (cc - geo.apex_col) * geo.delta_cm
    z = (rr - geo.apex_row) * geo.delta_cm
    r = np.hypot(x, z)
    th = np.arctan2(x, z)
    half = math.radians(geo.angle_deg / 2)
    map_y = (r / geo.depth_cm * geo.n_r - 0.5).astype(np.float32)
    map_x = ((th + half) / (2 * half) * geo.n_th - 0.5).astype(np.float32)
    mask = (r <= geo.depth_cm) & (np.abs(th) <= half) & (z >= 0)
    # Pixels outside the sector sample far outside the polar grid, so remap's
    # constant border blacks them out without a per-frame masking pass.
    map_x[~mask] = -100.0
    map_y[~mask] = -100.0
    return map_x, map_y, mask


def _background(rng: np.random.Generator, rr: np.ndarray, an: Anatomy) -> np.ndarray:
    """Static non-cardiac tissue: layered chest wall, smooth texture, near-field clutter."""
    n_r, n_th = rr.shape
    tex = rng.standard_normal((n_r, n_th)).astype(np.float32)
    tex = cv2.GaussianBlur(tex, (0, 0), sigmaX=6, sigmaY=8)
    tex /= tex.std() + 1e-6
    bg = _R_TISSUE * np.exp(0.6 * tex)
    layers = 1 + 0.8 * np.sin(rr * 9.0 + tex) * (rr < an.chest_wall_cm)
    bg *= layers
    bg += 0.5 * np.exp(-rr / 0.5)  # reverberation haze right under the probe
    return bg.astype(np.float32)


def _render_frames(an: Anatomy, plan: VideoPlan, geo: Geometry, phases: np.ndarray) -> np.ndarray:
    """Greyscale sector images (T, rows, cols) uint8 for the given phases."""
    rng = np.random.default_rng(plan.noise_seed)
    pose = _view_pose(plan.view, an, plan)
    u, v, rr, tt = _local_coords(geo, pose)
    bg = _background(rng, rr, an)
    e = geo.depth_cm / geo.n_r
    view_fn = _VIEW_FUNCS[plan.view]
    map_x, map_y, mask = _scan_maps(geo)
    v_ = plan.vendor
    # Depth gain: attenuation minus what the TGC sliders give back, in dB.
    knots_r = np.linspace(0, geo.depth_cm, len(plan.tgc_db))
    net_db = -plan.atten_db_per_cm * rr + np.interp(rr, knots_r, plan.tgc_db) + plan.gain_db
    half = math.radians(geo.angle_deg / 2)
    edge_db = -6.0 * np.clip((np.abs(tt) - 0.8 * half) / (0.2 * half), 0, 1) ** 2
    gain = (10 ** ((net_db + edge_db) / 10)).astype(np.float32)
    top_db = 9.0
    lo_db = top_db - v_.dynamic_range_db
    steps = np.arange(int((top_db - lo_db) * 10) + 1) / ((top_db - lo_db) * 10)
    lut = np.round(steps ** v_.gamma * 255).astype(np.uint8)
    scat = (rng.standard_normal((geo.n_r, geo.n_th, 2), dtype=np.float32))
    rho = 0.9  # frame-to-frame speckle correlation
    k = math.sqrt(1 - rho * rho)
    sig = (plan.vendor.psf_lateral, plan.vendor.psf_axial)
    psf_energy = 1.0 / (4 * math.pi * sig[0] * sig[1])
    out = np.empty((len(phases), geo.rows, geo.cols), np.uint8)
    for i, ph in enumerate(phases):
        if i:
            scat = rho * scat + k * rng.standard_normal(scat.shape, dtype=np.float32)
        refl = view_fn(u, v, bg, an, float(ph), e)
        field_ = scat * np.sqrt(refl)[..., None]
        field_ = cv2.GaussianBlur(field_, (0, 0), sigmaX=sig[0], sigmaY=sig[1])
        inten = (np.square(field_[..., 0]) + np.square(field_[..., 1])) / (2 * psf_energy)
        inten = inten * gain + 2e-5  # electronic noise floor
        # Log compression through a lookup table indexed in 0.1 dB steps.
        idx = np.log10(inten)
        idx *= 100.0
        idx -= lo_db * 10.0
        np.clip(idx, 0, len(lut) - 1, out=idx)
        polar = lut[idx.astype(np.int32)]
        cv2.remap(polar, map_x, map_y, cv2.INTER_LINEAR, dst=out[i],
                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


# --------------------------------------------------------------------------
# Overlays: text, depth scale, icons, ECG
# --------------------------------------------------------------------------


def _text(canvas, alpha, s, org, scale, rgb, thick=1) -> None:
    cv2.putText(canvas, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, rgb, thick, cv2.LINE_AA)
    cv2.putText(alpha, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)


def _static_overlay(plan: VideoPlan, geo: Geometry, header: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Burned-in annotation that does not change over the video (RGB, alpha)."""
    canvas = np.zeros((geo.rows, geo.cols, 3), np.uint8)
    alpha = np.zeros((geo.rows, geo.cols), np.uint8)
    vd = plan.vendor
    sc = geo.rows / 480.0
    fs = 0.42 * sc
    lh = int(round(16 * sc))
    left_lines = [vd.manufacturer.upper(), vd.model, header["initials"], header["date"]]
    right_lines = [
        f"{plan.freq_mhz:.1f} MHz",
        f"D {geo.depth_cm:.1f} cm",
        f"FR {plan.fps} Hz",
        f"G {int(round(50 + plan.gain_db))}",
        f"DR {int(vd.dynamic_range_db)}",
    ]
    if not vd.text_left:
        left_lines, right_lines = right_lines, left_lines
    for i, s in enumerate(left_lines):
        _text(canvas, alpha, s, (int(6 * sc), lh * (i + 1)), fs, vd.text_rgb)
    for i, s in enumerate(right_lines):
        (w, _), _ = cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
        _text(canvas, alpha, s, (geo.cols - w - int(6 * sc), lh * (i + 1)), fs, vd.text_rgb)
    # Depth scale: a tick every cm beside the sector's right edge, numbers every 5.
    x_scale = int(min(geo.cols - 30 * sc, geo.apex_col + geo.half_width_px + 10 * sc))
    for d in range(0, int(geo.depth_cm) + 1):
        y = int(round(geo.apex_row + d / geo.delta_cm))
        ln = int((8 if d % 5 == 0 else 4) * sc)
        cv2.line(canvas, (x_scale, y), (x_scale + ln, y), (200, 200, 200), 1)
        cv2.line(alpha, (x_scale, y), (x_scale + ln, y), 255, 1)
        if d % 5 == 0 and d:
            _text(canvas, alpha, str(d), (x_scale + ln + 2, y + int(4 * sc)), 0.35 * sc, (200, 200, 200))
    # Probe orientation marker near the sector's upper right, vendor-coloured.
    mk = (int(geo.apex_col + 0.35 * geo.half_width_px), int(geo.apex_row + 6 * sc))
    cv2.circle(canvas, mk, int(4 * sc), vd.text_rgb, -1)
    cv2.circle(alpha, mk, int(4 * sc), 255, -1)
    # Grey bar on the left, as scanners show their grey map.
    x0, y0, hgt = int(8 * sc), int(geo.rows * 0.35), int(geo.rows * 0.3)
    ramp = np.linspace(255, 0, hgt).astype(np.uint8)[:, None]
    canvas[y0:y0 + hgt, x0:x0 + int(6 * sc)] = ramp[..., None]
    alpha[y0:y0 + hgt, x0:x0 + int(6 * sc)] = 255
    return canvas, alpha


def _draw_ecg(img: np.ndarray, plan: VideoPlan, geo: Geometry, t_now: float) -> None:
    """Sweeping ECG trace in the bottom band, synchronised with the heart."""
    band_top = int(geo.rows * 0.89)
    band_h = geo.rows - band_top - 4
    x0, x1 = int(geo.cols * 0.12), int(geo.cols * 0.88)
    width = x1 - x0
    sweep_s = 3.0
    xs = np.arange(width)
    pos_now = (t_now % sweep_s) / sweep_s * width
    age = ((pos_now - xs) % width) / width * sweep_s  # seconds since drawn
    tau = t_now - age
    rr = 60.0 / plan.heart_rate_bpm
    y = band_top + band_h * (0.7 - 0.55 * _ecg(plan.phase0 + tau / rr))
    keep = age < sweep_s * (1 - 10 / width)  # the erase gap ahead of the cursor
    pts = np.stack([x0 + xs, y], axis=1).astype(np.int32)
    split = int(pos_now)
    for seg in (pts[:split][keep[:split]], pts[split:][keep[split:]]):
        if len(seg) > 1:
            cv2.polylines(img, [seg.reshape(-1, 1, 2)], False, plan.vendor.ecg_rgb, 1, cv2.LINE_AA)


# --------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------


def _uid(seed: int, *parts: object) -> str:
    # generate_uid joins the sources without a separator: add our own.
    return generate_uid(entropy_srcs=["echonode-synth", *[f"|{p}" for p in (seed, *parts)]])


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    # subsampling=1 is 4:2:2, matching PhotometricInterpretation YBR_FULL_422.
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality, subsampling=1)
    return buf.getvalue()


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _build_dataset(ctx: dict, plan: VideoPlan, geo: Geometry, frames: list[bytes], uncompressed: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "0001"]  # 0001 = 2D imaging
    ds.InstanceCreationDate = ctx["study_date"]
    ds.InstanceCreationTime = ctx["study_time"]
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = ctx["sop_uid"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ctx["study_date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ctx["study_time"]
    ds.AcquisitionDateTime = ctx["study_date"] + ctx["study_time"]
    ds.AccessionNumber = ctx["accession"]
    ds.Modality = "US"
    ds.Laterality = ""  # type 2C; dciodvfy asks for it, the heart is unpaired
    ds.Manufacturer = plan.vendor.manufacturer
    ds.InstitutionName = "Synthetic Echo Lab"
    ds.ReferringPhysicianName = ctx["referring"]
    ds.StationName = "SYNTHUS1"
    ds.StudyDescription = "Echocardiogram (synthetic)"
    ds.SeriesDescription = _VIEW_DESCRIPTIONS[plan.view]
    ds.ManufacturerModelName = plan.vendor.model
    ds.PatientName = ctx["patient_name"]
    ds.PatientID = ctx["patient_id"]
    ds.PatientBirthDate = ctx["birth_date"]
    ds.PatientSex = ctx["sex"]
    ds.PatientAge = ctx["age"]
    ds.PatientSize = f"{ctx['height_m']:.2f}"
    ds.PatientWeight = f"{ctx['weight_kg']:.1f}"
    ds.PatientIdentityRemoved = "NO"
    ds.BurnedInAnnotation = "YES"
    ds.CineRate = plan.fps
    ds.EffectiveDuration = f"{plan.frames / plan.fps:.4f}"
    ds.SoftwareVersions = plan.vendor.software
    ds.FrameTime = f"{1000.0 / plan.fps:.4f}"
    ds.HeartRate = int(round(plan.heart_rate_bpm))
    ds.TransducerData = [f"{plan.vendor.model}-P", "", ""]
    ds.ProcessingFunction = "CARDIAC"
    ds.StudyInstanceUID = ctx["study_uid"]
    ds.SeriesInstanceUID = ctx["series_uid"]
    ds.StudyID = ctx["study_id"]
    ds.SeriesNumber = plan.series_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ViewCodeSequence = Sequence([_code_item(*_VIEW_CODES[plan.view])])

    region = Dataset()
    x0, y0, x1, y1 = geo.region_bounds()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0 = x0
    region.RegionLocationMinY0 = y0
    region.RegionLocationMaxX1 = x1
    region.RegionLocationMaxY1 = y1
    # The reference pixel is relative to the region's upper-left corner (PS3.3
    # C.8.5.5.1.12): the transducer apex, where depth and lateral offset are 0.
    region.ReferencePixelX0 = geo.apex_col - x0
    region.ReferencePixelY0 = geo.apex_row - y0
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3  # cm
    region.ReferencePixelPhysicalValueX = 0.0
    region.ReferencePixelPhysicalValueY = 0.0
    region.PhysicalDeltaX = round(geo.delta_cm, 8)
    region.PhysicalDeltaY = round(geo.delta_cm, 8)
    region.TransducerFrequency = int(round(plan.freq_mhz * 1000))  # kHz
    ds.SequenceOfUltrasoundRegions = Sequence([region])

    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.Rows = geo.rows
    ds.Columns = geo.cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    compressed = sum(len(f) for f in frames)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{uncompressed / max(compressed, 1):.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "ECHONODE_SYNTH"
    ds.file_meta = meta
    ds.set_original_encoding(False, True)
    return ds


# --------------------------------------------------------------------------
# Archive
# --------------------------------------------------------------------------


@dataclass
class ArchiveSummary:
    """What :func:`generate_archive` wrote."""

    out_dir: Path
    patients: int
    studies: int
    videos: int
    lvh_studies: int
    severe_as_studies: int
    frames: int
    seconds: float
    reports: int = 0
    report_seconds: float = 0.0
    labels_csv: Path = field(init=False)
    videos_csv: Path = field(init=False)
    reports_csv: Path = field(init=False)

    def __post_init__(self) -> None:
        self.labels_csv = self.out_dir / "labels.csv"
        self.videos_csv = self.out_dir / "videos.csv"
        self.reports_csv = self.out_dir / "reports.csv"


LABEL_COLUMNS = ("patient_id", "study_uid", "accession_number", "study_date", "lvh", "severe_as",
                 "ivs_cm", "lvpw_cm", "lvid_cm", "av_cusp_sep_cm",
                 # CONTRACT.md's measurement columns, the values of the study's SR.
                 "ivsd_cm", "lvpwd_cm", "lvidd_cm", "lv_mass_index_g_m2", "av_vmax_m_s",
                 "av_mean_gradient_mmhg", "av_area_cm2")
VIDEO_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid", "view", "path", "frames", "fps")
REPORT_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid", "dialect", "path")


def _fit_to_mass_index(truth: StudyTruth, body: synth_reports.Body) -> StudyTruth:
    """``truth`` with normal walls thinned, if need be, so that the LV mass
    index does not call LVH either (:func:`train.synth_reports.fit_normal_walls`)."""
    ivs, lvpw = synth_reports.fit_normal_walls(truth.ivs_cm, truth.lvpw_cm, truth.lvid_cm, body)
    if (ivs, lvpw) == (truth.ivs_cm, truth.lvpw_cm):
        return truth
    return dataclasses.replace(truth, ivs_cm=ivs, lvpw_cm=lvpw)


def _study_views(rng: np.random.Generator) -> list[str]:
    """PLAX, PSAX, A4C in the usual acquisition order; sometimes extra videos.

    Most studies have more than one PLAX clip (a standard protocol records
    the long axis more than once: standard depth, zoomed on the valves, with
    and without colour): one in 30 %, two in 50 %, three in 20 %. Distinct
    PLAX videos of one study are EchoCLR's positive pairs.
    """
    u = rng.random()
    views = ["plax"] * (1 if u < 0.3 else 2 if u < 0.8 else 3)
    views.append("psax")
    views.append("a4c")
    if rng.random() < 0.2:
        views.append("a4c")
    return views


def _plan_video(rng: np.random.Generator, view: str, series_number: int, study: dict,
                frames: int | None, noise_seed: int) -> VideoPlan:
    vendor = study["vendor"]
    depth = float(np.clip(study["depth_cm"] + rng.uniform(-1.0, 1.0), 12.0, 20.0))
    angle = float(np.clip(study["angle_deg"] + rng.uniform(-4, 4), 60.0, 90.0))
    rr = 60.0 / study["heart_rate_bpm"]
    n = frames if frames is not None else int(np.clip(round(1.8 * study["fps"] * rr), 40, 64))
    tilt = {"plax": rng.uniform(-12, 6), "a4c": rng.uniform(-8, 8), "psax": rng.uniform(-10, 10)}[view]
    tgc = tuple(float(x) for x in rng.uniform(-3.0, 3.0, 5))
    return VideoPlan(
        view=view, series_number=series_number, vendor=vendor, depth_cm=round(depth, 1),
        angle_deg=round(angle, 1), tilt_deg=float(tilt), shift_x_cm=float(rng.uniform(-0.8, 0.8)),
        shift_z_cm=float(rng.uniform(-0.5, 0.5)), heart_rate_bpm=study["heart_rate_bpm"],
        fps=study["fps"], phase0=float(rng.random()), frames=int(n),
        gain_db=float(study["gain_db"] + rng.uniform(-2, 2)), tgc_db=tgc,
        atten_db_per_cm=float(rng.uniform(0.4, 0.9)), freq_mhz=study["freq_mhz"],
        noise_seed=noise_seed,
    )


def _anatomy(truth: StudyTruth, rng: np.random.Generator, chest_wall_cm: float) -> Anatomy:
    return Anatomy(
        truth=truth, chest_wall_cm=chest_wall_cm, rv_cm=float(rng.uniform(1.8, 2.8)),
        la_cm=float(rng.uniform(2.8, 4.0)), lv_length_cm=float(rng.uniform(7.5, 9.0)),
        fractional_shortening=float(rng.uniform(0.28, 0.40)),
        pericardial_gap_cm=float(rng.uniform(0.35, 0.55)),
    )


def render_video(an: Anatomy, plan: VideoPlan, rows: int = 480, cols: int = 640,
                 header: dict[str, str] | None = None) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Render a video as RGB frames.

    Parameters
    ----------
    an : Anatomy
        The anatomy to draw.
    plan : VideoPlan
        Acquisition parameters.
    rows, cols : int
        Image size.
    header : dict, optional
        ``initials`` and ``date`` strings for the burned-in text.

    Returns
    -------
    frames : numpy.ndarray
        (T, rows, cols, 3) uint8 RGB.
    geometry : Geometry
        Sector placement and pixel size.
    phases : numpy.ndarray
        Cardiac phase of each frame (0 = end-diastole).
    """
    geo = _geometry(rows, cols, plan.depth_cm, plan.angle_deg, plan.vendor)
    t = np.arange(plan.frames) / plan.fps
    phases = (plan.phase0 + t * plan.heart_rate_bpm / 60.0) % 1.0
    grey = _render_frames(an, plan, geo, phases)
    overlay, alpha = _static_overlay(plan, geo, header or {"initials": "S.P.", "date": "01/01/2020"})
    on = alpha > 0
    # One vectorised composite for all frames; only the ECG differs per frame.
    out = np.empty(grey.shape + (3,), np.uint8)
    out[...] = grey[..., None]
    out[:, on] = overlay[on]
    for i in range(plan.frames):
        _draw_ecg(out[i], plan, geo, float(t[i]))
    return out, geo, phases


def generate_archive(out_dir: Path, patients: int, seed: int = 0, *, frames: int | None = None,
                     rows: int = 480, cols: int = 640, quality: int = 75) -> ArchiveSummary:
    """Write a synthetic echo archive.

    Parameters
    ----------
    out_dir : pathlib.Path
        Destination; created if missing.  Files:
        ``dicom/<patient_id>/<accession>/<series_number:03d>.dcm`` (the
        videos, series 1, 2, ..., and the measurement SR, series 900),
        ``labels.csv`` (one row per study), ``videos.csv`` (one per video)
        and ``reports.csv`` (one per measurement SR).
    patients : int
        Number of patients (each gets 1-3 studies of 3-5 videos).
    seed : int
        Everything, UIDs included, is a function of the seed.
    frames : int, optional
        Frames per video; default 40-64 (about two heartbeats).
    rows, cols : int
        Image size.
    quality : int
        JPEG quality.

    Returns
    -------
    ArchiveSummary

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if not isinstance(patients, int) or patients < 1:
        raise ValueError('Argument "patients" must be a positive integer.')
    if frames is not None and frames < 1:
        raise ValueError('Argument "frames" must be a positive integer or None.')
    if rows < 120 or cols < 160:
        raise ValueError('Arguments "rows" and "cols" must be at least 120 and 160.')
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"echonode-synth|{seed}".encode()).hexdigest()[:4].upper()

    prng = [_rng(seed, _PURPOSE_PATIENT, p) for p in range(patients)]
    n_studies = [int(r.integers(1, 4)) for r in prng]
    truths = sample_study_truths(seed, n_studies)
    label_rows, video_rows, report_rows = [], [], []
    n_videos = n_frames = 0
    report_seconds = 0.0
    for p in range(patients):
        r = prng[p]
        pid = f"SYN{p + 1:04d}"
        sex = "F" if r.random() < 0.5 else "M"
        height = float(r.uniform(1.50, 1.75) if sex == "F" else r.uniform(1.62, 1.92))
        bmi = float(r.uniform(18.5, 38.0))
        weight = bmi * height ** 2
        # Chest wall thickness follows body habitus, never the labels.
        chest = float(np.clip(0.8 + (bmi - 18.5) / 20.0 * 1.2 + r.uniform(-0.2, 0.2), 0.8, 2.2))
        birth_year = int(r.integers(1935, 2000))
        birth = f"{birth_year:04d}{int(r.integers(1, 13)):02d}{int(r.integers(1, 29)):02d}"
        # The patient as the headers state it: the SR's BSA is recomputable from them.
        body = synth_reports.Body(sex=sex, height_m=float(f"{height:.2f}"), weight_kg=float(f"{weight:.1f}"))
        lvot_cm = synth_reports.draw_lvot_diameter(_rng(seed, _PURPOSE_REPORT, p), sex)
        for s in range(n_studies[p]):
            sr = _rng(seed, _PURPOSE_STUDY, p, s)
            truth = _fit_to_mass_index(truths[p][s], body)
            an = _anatomy(truth, sr, chest)
            day = int(sr.integers(0, 5 * 365))
            date = np.datetime64("2019-01-01") + np.timedelta64(day, "D")
            study_date = str(date).replace("-", "")
            study_time = f"{int(sr.integers(7, 18)):02d}{int(sr.integers(0, 60)):02d}{int(sr.integers(0, 60)):02d}"
            vendor = VENDORS[int(sr.integers(0, len(VENDORS)))]
            study = {
                "vendor": vendor,
                "depth_cm": float(np.clip(vendor.depth_cm + sr.uniform(-2.5, 2.5), 12.0, 20.0)),
                "angle_deg": float(np.clip(vendor.angle_deg + sr.uniform(-8, 8), 60.0, 90.0)),
                "heart_rate_bpm": float(round(sr.uniform(50, 110), 1)),
                "fps": int(sr.integers(30, 61)),
                "gain_db": float(sr.uniform(-4, 4)),
                "freq_mhz": float(sr.choice([1.7, 2.0, 2.5, 3.0, 3.5])),
            }
            study_uid = _uid(seed, "study", p, s)
            accession = f"SY{tag}{p + 1:04d}{s + 1:02d}"
            age = int(study_date[:4]) - birth_year
            ctx = {
                "study_uid": study_uid, "accession": accession, "study_id": str(s + 1),
                "study_date": study_date, "study_time": study_time,
                "patient_name": f"SYNTH^P{p + 1:04d}", "patient_id": pid, "birth_date": birth,
                "sex": sex, "age": f"{age:03d}Y", "height_m": height, "weight_kg": weight,
                "referring": f"REFERRER^R{int(sr.integers(1, 20)):02d}",
            }
            header = {"initials": f"P{p + 1:04d} S.", "date": f"{study_date[6:8]}/{study_date[4:6]}/{study_date[:4]}"}
            measured = synth_reports.measure_study(
                ivs_cm=truth.ivs_cm, lvpw_cm=truth.lvpw_cm, lvid_cm=truth.lvid_cm,
                av_cusp_sep_cm=truth.av_cusp_sep_cm, body=body, age_years=age, lvot_diameter_cm=lvot_cm,
                heart_rate_bpm=cast(float, study["heart_rate_bpm"]), rng=_rng(seed, _PURPOSE_REPORT, p, s),
            )
            label_rows.append({
                "patient_id": pid, "study_uid": study_uid, "accession_number": accession,
                "study_date": study_date, "lvh": int(truth.lvh), "severe_as": int(truth.severe_as),
                "ivs_cm": f"{truth.ivs_cm:.3f}", "lvpw_cm": f"{truth.lvpw_cm:.3f}",
                "lvid_cm": f"{truth.lvid_cm:.3f}", "av_cusp_sep_cm": f"{truth.av_cusp_sep_cm:.3f}",
                **measured.label_columns(),
            })
            evidence: list[Dataset] = []
            for k, view in enumerate(_study_views(sr)):
                vr = _rng(seed, _PURPOSE_VIDEO, p, s, k)
                plan = _plan_video(vr, view, k + 1, study, frames, int(vr.integers(0, 2**63)))
                rgb, geo, _ = render_video(an, plan, rows, cols, header)
                jpegs = [_encode_jpeg(f, quality) for f in rgb]
                ctx["series_uid"] = _uid(seed, "series", p, s, k)
                ctx["sop_uid"] = _uid(seed, "sop", p, s, k)
                ds = _build_dataset(ctx, plan, geo, jpegs, rgb.nbytes)
                rel = Path("dicom") / pid / accession / f"{plan.series_number:03d}.dcm"
                path = out_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                del ds.PixelData  # the header stays, as the measurement SR's evidence
                evidence.append(ds)
                video_rows.append({
                    "patient_id": pid, "study_uid": study_uid, "series_uid": ctx["series_uid"],
                    "sop_uid": ctx["sop_uid"], "view": view, "path": rel.as_posix(),
                    "frames": plan.frames, "fps": plan.fps,
                })
                n_videos += 1
                n_frames += plan.frames
            t_report = time.perf_counter()
            report = synth_reports.build_measurement_report(
                vendor.report_dialect, measured, evidence,
                series_uid=_uid(seed, "report-series", p, s), sop_uid=_uid(seed, "report-sop", p, s),
                rng=_rng(seed, _PURPOSE_REPORT, p, s, 1),
            )
            rel = Path("dicom") / pid / accession / f"{synth_reports.REPORT_SERIES_NUMBER:03d}.dcm"
            report.save_as(out_dir / rel, enforce_file_format=True)
            report_rows.append({
                "patient_id": pid, "study_uid": study_uid, "series_uid": report.SeriesInstanceUID,
                "sop_uid": report.SOPInstanceUID, "dialect": vendor.report_dialect, "path": rel.as_posix(),
            })
            report_seconds += time.perf_counter() - t_report
    for name, cols_, rows_ in (("labels.csv", LABEL_COLUMNS, label_rows), ("videos.csv", VIDEO_COLUMNS, video_rows),
                               ("reports.csv", REPORT_COLUMNS, report_rows)):
        with open(out_dir / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols_, lineterminator="\n")
            w.writeheader()
            w.writerows(rows_)
    return ArchiveSummary(
        out_dir=out_dir, patients=patients, studies=len(label_rows), videos=n_videos,
        lvh_studies=sum(r["lvh"] for r in label_rows),
        severe_as_studies=sum(r["severe_as"] for r in label_rows),
        frames=n_frames, seconds=time.perf_counter() - t0, reports=len(report_rows),
        report_seconds=report_seconds,
    )


# --------------------------------------------------------------------------
# CLI glue (train/cli.py wires these as the ``synth`` subcommand)
# --------------------------------------------------------------------------


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``synth`` options to ``parser`` and return it."""
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--patients", required=True, type=int, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default 40-64)")
    parser.add_argument("--rows", type=int, default=480, help="image rows (default 480)")
    parser.add_argument("--cols", type=int, default=640, help="image columns (default 640)")
    return parser


def run_synth(ns: argparse.Namespace) -> int:
    """Run ``echonode-train synth`` from parsed arguments; returns an exit status."""
    try:
        summary = generate_archive(ns.out, ns.patients, ns.seed, frames=getattr(ns, "frames", None),
                                   rows=getattr(ns, "rows", 480), cols=getattr(ns, "cols", 640))
    except ValueError as exc:
        print(f"echonode-train synth: {exc}")
        return 2
    print(
        f"wrote {summary.videos} videos in {summary.studies} studies of {summary.patients} patients "
        f"to {summary.out_dir} ({summary.lvh_studies} LVH, {summary.severe_as_studies} severe AS) "
        f"in {summary.seconds:.1f} s ({summary.reports} measurement SRs, {summary.report_seconds:.1f} s)"
    )
    return 0
