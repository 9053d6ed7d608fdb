"""The sonographer's measurement SR of every synthetic study.

A real echo cart sends, beside the cine loops, the sonographer's
measurements as a DICOM Structured Report: TID 5200 "Adult Echocardiography
Procedure Report" (sections TID 5202, measurements TID 5203 / TID 300) or the
simplified TID 5300 (Supplement 169).  ``echonode-train synth`` writes one such
SR per study whose values are the study's truth, so that reading labels from
measurement SRs (``echonode-train labels``) can be checked against the
archive's own ``labels.csv``.

What the SR says
----------------
* LV: IVSd, LVPWd, LVIDd (the rendered anatomy, :class:`train.synth.StudyTruth`),
  LV mass by the ASE cube formula, LV mass indexed to BSA, and the LVOT
  diameter, peak velocity and VTI.
* Aortic valve: cusp separation (the rendered anatomy), peak velocity, VTI,
  peak and mean gradients and the valve area by continuity.
* Patient characteristics: age, sex and BSA (Mosteller, from the Patient's
  Size and Weight written in every header).

The physics
-----------
* LV mass (g) = 0.8 x 1.04 x ((LVIDd + IVSd + LVPWd)^3 - LVIDd^3) + 0.6, dimensions
  in cm (Devereux's cube formula as the ASE recommends).
* BSA (m2) = sqrt(height_cm x weight_kg / 3600) (Mosteller), from the header's
  rounded values, so anyone can recompute it.  Coded DCM 122244
  "BSA = (HT*WT/36)^0.5", the Mosteller entry of CID 3663 (height in m).
* The aortic orifice: the Doppler velocity index DVI = AVA / A_LVOT
  = V_LVOT / V_AV rises with the cusp separation.  The separation itself is
  drawn continuously through 0.8 cm (normal, sclerosis, moderate and severe
  valves meet there), but DVI steps at 0.8 cm:
  ``DVI = 0.13 + 0.075 sep / 0.8`` under it (a valve whose cusps part by less
  than 0.8 cm keeps DVI <= 0.205; guidelines call DVI < 0.25 severe) and
  ``DVI = 0.42 + 0.50 (1 - exp(-(sep - 0.8) / 0.6))`` from it (0.42 at 0.8 cm,
  0.76-0.89 for a normal valve of 1.5-2.5 cm).  The step is what lets the SR's
  Doppler rules give exactly the label the image's separation defines, with no
  low-gradient AS between them; it lives in the SR only, the pictures have no
  step.  The price: a moderately stenotic valve (0.8-1.4 cm) reads as mild AS
  by Doppler (V_AV 2.0-2.5 m/s).  The LVOT diameter is
  drawn per patient (women 1.8-2.2 cm, men 2.0-2.4 cm), the LVOT peak velocity
  per study (0.85-1.05 m/s); neither reads a label.
* Continuity: AVA = DVI x A_LVOT and V_AV = V_LVOT x A_LVOT / AVA.
* Both Doppler envelopes have the shape v(t) = Vmax sin(pi t / ET)^(1/2) over the
  ejection time ET (Weissler: 413 - 1.7 HR ms for men, 418 - 1.6 HR for women),
  a rounded envelope as in AS.  Hence VTI = Vmax x ET x 0.7628, and by the
  simplified Bernoulli relation the peak gradient is 4 Vmax^2 and the mean
  gradient the mean of 4 v(t)^2, (8 / pi) Vmax^2 = 2.546 Vmax^2 (mmHg, m/s).
  With one shape for both, AVA by VTI equals AVA by peak velocities.

So every cusp separation under 0.8 cm gives V_AV >= 4.1 m/s and a mean gradient
>= 42 mmHg (severe AS by the default rules of ``labels``), every separation of
0.8 cm or more V_AV <= 2.5 m/s, a mean gradient <= 16 mmHg and AVA >= 1.05 cm2;
the archive has no low-gradient AS (AVA <= 1.0 cm2 with V_AV < 4 and MG < 40),
which ``labels`` would leave undecided.  :func:`measure_study` checks these
bounds on every study.

LVH and the mass index
----------------------
METHOD.md defines LVH as IVSd or LVPWd >= 1.2 cm; the rules of ``labels`` also
call LVH when the LV mass index exceeds 115 g/m2 (men) or 95 g/m2 (women).
With the truth sampler's ranges (normal walls up to 1.2 cm, LVIDd 3.8-6.0 cm) and the
synthetic patients' sizes, about 15 % of studies with normal walls would have a
mass index over the limit (a dilated LV in a small patient).  Letting
``labels.csv`` follow the mass index instead would tie the label to the patient's
size (BSA), which METHOD.md forbids, and raise the LVH prevalence to about
40 %.  So the sampling is constrained instead (:func:`fit_normal_walls`): for a
study with normal walls whose mass index would exceed the limit less 1 g/m2,
both walls are thinned in proportion until it does not.  The label draws are
untouched (same labels, same prevalence, about 30 %), LVIDd stays
label-independent, and the wall rule and the mass-index rule never disagree.
The price: for a given seed, the walls (and so the images) of those studies
differ from what earlier releases of ``synth`` drew.

Dialects
--------
Chosen by the synthetic vendor (:data:`train.synth.VENDORS`):

``tid5200-ge`` (GE-like)
    TID 5200, Comprehensive SR.  Sections per TID 5202 (a ``Findings``
    container with the section's Finding Site); each measurement twice, once
    plain and once with Selection Status (DCM 121404) "User chosen value"
    (TID 310, HAS PROPERTIES); concept modifiers Finding Site, Image Mode,
    Measurement Method and Cardiac Cycle Point coded with the *legacy* SNOMED
    designator SRT (``G-C0E3`` "Finding Site", ``T-35400`` "Aortic Valve" ...),
    as older carts write them; the measurement concepts themselves are LN and
    SCT.  Values in cm, m/s, mmHg, cm2, g, g/m2.
``tid5200-philips`` (Philips-like)
    TID 5200, Comprehensive SR, modifiers in SCT.  Lengths in mm, velocities in
    cm/s, the valve area in mm2.  Each directly measured value appears as
    three repeats (no selection) and their mean with Derivation (DCM 121401)
    "Mean"; the repeats average exactly to the mean.  Private codes of the
    scheme ``99HELIOS`` (declared in the Coding Scheme Identification
    Sequence) sit beside the standard ones: private measurements (a
    duplicate mass index, relative wall thickness, the dimensionless index)
    and a private modifier.
``tid5300``
    TID 5300, Enhanced SR: "Pre-coordinated Measurements" (DCM 125301) with
    CID 12300 codes such as ``AorticValveVmax`` (79964-3) and a Short Label,
    and "Post-coordinated Measurements" (DCM 125302) for the cusp separation,
    which has no pre-coordinated code (TID 5302 modifiers).  IVSd, LVPWd,
    LVIDd and the AV peak velocity appear three times, the truth marked with
    Selection Status "User chosen value", the other two symmetric around it.

Whatever rule picks one value per concept (the selected value, else the mean
of the repeats, else the only value), it gets the truth.  Values carry the
precision of ``labels.csv`` (cm to 0.001, m/s to 0.01, mmHg and g/m2 to 0.1,
cm2 to 0.01), converted exactly for mm, cm/s and mm2.  No label threshold is
crossed by any single repeat.

Codes, checked against pydicom 3.0's ``pydicom.sr.codedict.codes`` (every code
below is taken from it; the SRT forms through pydicom's own SCT-SRT table):

* Measurements, TID 5200: LN 18154-5 IVSd, 18152-9 LVPWd, 29436-3 LVIDd,
  18087-7 LV mass, 80020-1 "LV mass (dimension method) 2D / BSA" for the
  index (TID 5200's CIDs have no indexed mass; this LOINC code is CID 12300's),
  11726-7 (pydicom: "Peak Systolic Velocity"), 20354-7 VTI, 20247-3 peak gradient,
  20256-4 mean gradient, 17996-0 aortic cusp separation; SCT 399027007
  "Cardiovascular Orifice Diameter" (LVOT diameter), SCT 399367004
  "Cardiovascular Orifice Area" (AVA).  Sites SCT 87878005 LV, 13418002 LVOT,
  34202007 aortic valve.  SRT equivalents used by the GE-like dialect:
  G-C0E3 Finding Site, G-0373 Image Mode, G-C036 Measurement Method,
  T-32600 LV, T-32650 LVOT, T-35400 aortic valve, G-03A2 2D, G-0394 M mode,
  R-409E4 pulsed and R-409E3 continuous-wave Doppler, F-32020 systole,
  R-FAB5C end diastole (SCT 416190007) and SCT 272518008 "Cardiac Cycle Point"
  mapped the same way.  pydicom compares a Code by its SCT form, so
  ``Code('T-35400', 'SRT', ...) == codes.SCT.AorticValve``.
* Measurements, TID 5300 (CID 12300): 79969-2 IVSd 2D, 80032-6 LVPWd 2D,
  80007-8 LVIDd 2D, 80019-3 LV mass (dimension method) 2D, 80020-1 its BSA
  index, 80028-4 LVOT dimension, 80029-2 LVOT Vmax, 80030-0 LVOT VTI,
  79964-3 AV Vmax, 79965-0 AV VTI, 79963-5 AV peak gradient, 79962-7 AV mean
  gradient, 79958-5 AV area (continuity VTI).
* Methods: DCM 125206 Cube Method, 125215 Continuity Equation by VTI, 125218
  Simplified Bernoulli.  Patient characteristics (TID 5201): DCM 121118,
  121033 Subject Age, 121032 Subject Sex (DCM M / F), LN 8277-6 BSA with DCM
  121420 Equation.  LN 8302-2 "Patient Height" and 29463-7 "Patient Weight" are
  not in pydicom's dictionaries and are left out; the header's Patient's Size
  and Weight carry them.
* Units are UCUM: ``cm mm cm/s mm[Hg] cm2 mm2 a 1`` from ``codes.UCUM``; ``m/s g
  g/m2 m2`` (absent from pydicom's table) written with the UCUM code as meaning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr import _snomed_dict
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian

__all__ = [
    "COMPREHENSIVE_SR",
    "DIALECTS",
    "DIALECT_GE",
    "DIALECT_PHILIPS",
    "DIALECT_TID5300",
    "ENHANCED_SR",
    "LVMI_LIMIT_G_M2",
    "PRIVATE_SCHEME",
    "REPORT_SERIES_NUMBER",
    "Body",
    "EchoMeasurements",
    "build_measurement_report",
    "doppler_velocity_index",
    "draw_lvot_diameter",
    "fit_normal_walls",
    "lv_mass_g",
    "mean_gradient_mmhg",
    "measure_study",
]

DIALECT_GE = "tid5200-ge"
DIALECT_PHILIPS = "tid5200-philips"
DIALECT_TID5300 = "tid5300"
DIALECTS = (DIALECT_GE, DIALECT_PHILIPS, DIALECT_TID5300)

REPORT_SERIES_NUMBER = 900
"""Series Number of the measurement SR (after the videos' 1, 2, ...)."""

LVMI_LIMIT_G_M2 = {"M": 115.0, "F": 95.0}
"""LV mass index above which the default rules of ``labels`` call LVH."""
_LVMI_MARGIN_G_M2 = 1.0
LVH_WALL_CM = 1.2
SEVERE_VMAX_M_S = 4.0
SEVERE_MEAN_GRADIENT_MMHG = 40.0
LOW_GRADIENT_AVA_CM2 = 1.0

# Doppler velocity index of the cusp separation: linear under the severe
# threshold, a saturating rise from it (see the module docstring).
_DVI_SEVERE_LOW, _DVI_SEVERE_SPAN = 0.13, 0.075
_DVI_OPEN_LOW, _DVI_OPEN_SPAN, _DVI_OPEN_SCALE_CM = 0.42, 0.50, 0.6
_SEVERE_SEP_CM = 0.8
_LVOT_VMAX_RANGE_M_S = (0.85, 1.05)
_LVOT_DIAMETER_CM = {"F": (1.8, 2.2), "M": (2.0, 2.4)}
# v(t) = Vmax sin(pi t / ET)^(1/2): mean of v over ET, and of v^2.
_ENVELOPE_MEAN = math.gamma(0.75) / (math.sqrt(math.pi) * math.gamma(1.25))  # 0.7628
_ENVELOPE_MEAN_SQUARE = 2.0 / math.pi  # mean of sin over a half period


# --------------------------------------------------------------------------
# Numbers with a fixed number of decimals
# --------------------------------------------------------------------------


def _q(value: float | Decimal, decimals: int) -> Decimal:
    """``value`` rounded (half-even) to ``decimals`` places, as an exact decimal."""
    return Decimal(repr(float(value)) if isinstance(value, float) else value).quantize(
        Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN
    )


# --------------------------------------------------------------------------
# Patient and LV
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """The patient as the header states it (Patient's Sex, Size, Weight).

    Attributes
    ----------
    sex : str
        ``"M"`` or ``"F"``.
    height_m, weight_kg : float
        As written in the header (2 and 1 decimals).
    """

    sex: str
    height_m: float
    weight_kg: float

    @property
    def bsa_m2(self) -> Decimal:
        """Mosteller BSA from the header values, to 0.01 m2."""
        return _q(math.sqrt(self.height_m * 100.0 * self.weight_kg / 3600.0), 2)


def lv_mass_g(ivsd_cm: float, lvpwd_cm: float, lvidd_cm: float) -> Decimal:
    """LV mass by the ASE cube formula (Devereux), to 0.1 g.

    Parameters
    ----------
    ivsd_cm, lvpwd_cm, lvidd_cm : float
        End-diastolic septum, posterior wall and LV internal diameter in cm.

    Returns
    -------
    decimal.Decimal
        0.8 x 1.04 x ((LVIDd + IVSd + LVPWd)^3 - LVIDd^3) + 0.6 grams.
    """
    outer = lvidd_cm + ivsd_cm + lvpwd_cm
    return _q(0.8 * 1.04 * (outer**3 - lvidd_cm**3) + 0.6, 1)


def _mass_index(ivsd_cm: float, lvpwd_cm: float, lvidd_cm: float, body: Body) -> Decimal:
    return _q(lv_mass_g(ivsd_cm, lvpwd_cm, lvidd_cm) / body.bsa_m2, 1)


def fit_normal_walls(ivs_cm: float, lvpw_cm: float, lvid_cm: float, body: Body) -> tuple[float, float]:
    """Thin normal walls until the LV mass index is under the LVH limit.

    A study with walls under 1.2 cm must not be LVH by the mass-index rule
    either (see the module docstring).  When the mass index exceeds the
    sex's limit less 1 g/m2, both walls are scaled by one factor (to 0.001 cm,
    rounded down) until it does not.  Walls of 1.2 cm or more are returned
    unchanged: such a study is LVH by either rule.

    Parameters
    ----------
    ivs_cm, lvpw_cm, lvid_cm : float
        The drawn anatomy in cm (3 decimals).
    body : Body
        The patient (sex and BSA).

    Returns
    -------
    tuple of float
        ``(ivs_cm, lvpw_cm)``, unchanged when already consistent.
    """
    if max(ivs_cm, lvpw_cm) >= LVH_WALL_CM:
        return ivs_cm, lvpw_cm
    limit = Decimal(repr(LVMI_LIMIT_G_M2[body.sex] - _LVMI_MARGIN_G_M2))
    if _mass_index(ivs_cm, lvpw_cm, lvid_cm, body) <= limit:
        return ivs_cm, lvpw_cm
    # Wall sum at which the mass reaches the limit, then step down to be sure
    # of the rounded values.
    mass_limit = float(limit * body.bsa_m2)
    outer = ((mass_limit - 0.6) / 0.832 + lvid_cm**3) ** (1.0 / 3.0)
    k = max(outer - lvid_cm, 0.0) / (ivs_cm + lvpw_cm)
    ivs = math.floor(ivs_cm * k * 1000.0) / 1000.0
    lvpw = math.floor(lvpw_cm * k * 1000.0) / 1000.0
    while _mass_index(ivs, lvpw, lvid_cm, body) > limit:
        ivs, lvpw = round(ivs - 0.001, 3), round(lvpw - 0.001, 3)
    return ivs, lvpw


# --------------------------------------------------------------------------
# Aortic valve haemodynamics
# --------------------------------------------------------------------------


def doppler_velocity_index(cusp_separation_cm: float) -> float:
    """DVI = AVA / A_LVOT as a function of the aortic cusp separation (increasing).

    Parameters
    ----------
    cusp_separation_cm : float
        Mid-systolic cusp separation in cm.

    Returns
    -------
    float
        0.13-0.205 under 0.8 cm (severe AS), 0.42-0.92 from 0.8 cm on.
    """
    sep = max(float(cusp_separation_cm), 0.0)
    if sep < _SEVERE_SEP_CM:
        return _DVI_SEVERE_LOW + _DVI_SEVERE_SPAN * sep / _SEVERE_SEP_CM
    return _DVI_OPEN_LOW + _DVI_OPEN_SPAN * (1.0 - math.exp(-(sep - _SEVERE_SEP_CM) / _DVI_OPEN_SCALE_CM))


def mean_gradient_mmhg(vmax_m_s: float) -> float:
    """Mean gradient of the envelope Vmax sin(pi t/ET)^(1/2) by 4 v^2 (mmHg)."""
    return 4.0 * vmax_m_s**2 * _ENVELOPE_MEAN_SQUARE


def draw_lvot_diameter(rng: np.random.Generator, sex: str) -> float:
    """The patient's LVOT diameter in cm (2 decimals), label-independent."""
    lo, hi = _LVOT_DIAMETER_CM[sex]
    return round(float(rng.uniform(lo, hi)), 2)


@dataclass(frozen=True)
class EchoMeasurements:
    """One study's measurements, each at the precision the SR carries.

    Lengths in cm, velocities in m/s, VTIs in cm, gradients in mmHg, areas in
    cm2, mass in g, index in g/m2, BSA in m2, ejection time in ms.
    """

    ivsd_cm: Decimal
    lvpwd_cm: Decimal
    lvidd_cm: Decimal
    lv_mass_g: Decimal
    bsa_m2: Decimal
    lv_mass_index_g_m2: Decimal
    lvot_diameter_cm: Decimal
    lvot_vmax_m_s: Decimal
    lvot_vti_cm: Decimal
    av_cusp_sep_cm: Decimal
    av_vmax_m_s: Decimal
    av_vti_cm: Decimal
    av_peak_gradient_mmhg: Decimal
    av_mean_gradient_mmhg: Decimal
    av_area_cm2: Decimal
    ejection_time_ms: int
    sex: str
    age_years: int

    def lvh_by_rules(self) -> bool:
        """LVH by the default rules: a wall >= 1.2 cm, or the mass index over the sex's limit."""
        wall = max(self.ivsd_cm, self.lvpwd_cm) >= Decimal(repr(LVH_WALL_CM))
        return wall or float(self.lv_mass_index_g_m2) > LVMI_LIMIT_G_M2[self.sex]

    def severe_as_by_rules(self) -> bool | None:
        """Severe AS by the default rules; None for low-gradient AS (undecided)."""
        vmax, mg = float(self.av_vmax_m_s), float(self.av_mean_gradient_mmhg)
        if vmax >= SEVERE_VMAX_M_S or mg >= SEVERE_MEAN_GRADIENT_MMHG:
            return True
        if float(self.av_area_cm2) <= LOW_GRADIENT_AVA_CM2:
            return None
        return False

    def label_columns(self) -> dict[str, str]:
        """The ``labels.csv`` columns CONTRACT.md names, as written in the SR."""
        return {
            "ivsd_cm": str(self.ivsd_cm),
            "lvpwd_cm": str(self.lvpwd_cm),
            "lvidd_cm": str(self.lvidd_cm),
            "lv_mass_index_g_m2": str(self.lv_mass_index_g_m2),
            "av_vmax_m_s": str(self.av_vmax_m_s),
            "av_mean_gradient_mmhg": str(self.av_mean_gradient_mmhg),
            "av_area_cm2": str(self.av_area_cm2),
        }


def measure_study(
    *,
    ivs_cm: float,
    lvpw_cm: float,
    lvid_cm: float,
    av_cusp_sep_cm: float,
    body: Body,
    age_years: int,
    lvot_diameter_cm: float,
    heart_rate_bpm: float,
    rng: np.random.Generator,
) -> EchoMeasurements:
    """What the sonographer measures in one study.

    Parameters
    ----------
    ivs_cm, lvpw_cm, lvid_cm, av_cusp_sep_cm : float
        The study's anatomy (after :func:`fit_normal_walls`).
    body : Body
        The patient as the header states it.
    age_years : int
        Age at the study.
    lvot_diameter_cm : float
        The patient's LVOT diameter (:func:`draw_lvot_diameter`).
    heart_rate_bpm : float
        The study's heart rate (sets the ejection time).
    rng : numpy.random.Generator
        A stream of this study used for nothing else (the LVOT peak velocity).

    Returns
    -------
    EchoMeasurements

    Raises
    ------
    RuntimeError
        If the physics broke a bound the labels rely on (a bug, never input).
    """
    lvot_vmax = _q(float(rng.uniform(*_LVOT_VMAX_RANGE_M_S)), 2)
    d = _q(lvot_diameter_cm, 2)
    lvot_area = math.pi / 4.0 * float(d) ** 2
    sep = _q(av_cusp_sep_cm, 3)
    ava = _q(doppler_velocity_index(float(sep)) * lvot_area, 2)
    vmax = _q(float(lvot_vmax) * lvot_area / float(ava), 2)
    if body.sex == "F":
        et_ms = round(418.0 - 1.6 * heart_rate_bpm)
    else:
        et_ms = round(413.0 - 1.7 * heart_rate_bpm)
    mass = lv_mass_g(ivs_cm, lvpw_cm, lvid_cm)
    bsa = body.bsa_m2
    m = EchoMeasurements(
        ivsd_cm=_q(ivs_cm, 3),
        lvpwd_cm=_q(lvpw_cm, 3),
        lvidd_cm=_q(lvid_cm, 3),
        lv_mass_g=mass,
        bsa_m2=bsa,
        lv_mass_index_g_m2=_q(mass / bsa, 1),
        lvot_diameter_cm=d,
        lvot_vmax_m_s=lvot_vmax,
        lvot_vti_cm=_q(float(lvot_vmax) * 100.0 * et_ms / 1000.0 * _ENVELOPE_MEAN, 1),
        av_cusp_sep_cm=sep,
        av_vmax_m_s=vmax,
        av_vti_cm=_q(float(vmax) * 100.0 * et_ms / 1000.0 * _ENVELOPE_MEAN, 1),
        av_peak_gradient_mmhg=_q(4.0 * float(vmax) ** 2, 1),
        av_mean_gradient_mmhg=_q(mean_gradient_mmhg(float(vmax)), 1),
        av_area_cm2=ava,
        ejection_time_ms=et_ms,
        sex=body.sex,
        age_years=age_years,
    )
    severe = float(sep) < 0.8
    if m.severe_as_by_rules() is not severe:
        raise RuntimeError(f"AS physics: separation {sep} cm gives Vmax {vmax}, MG {m.av_mean_gradient_mmhg}, AVA {ava}")
    if severe != (float(vmax) >= SEVERE_VMAX_M_S and float(m.av_mean_gradient_mmhg) >= SEVERE_MEAN_GRADIENT_MMHG):
        raise RuntimeError(f"AS physics: Vmax {vmax} and MG {m.av_mean_gradient_mmhg} disagree for separation {sep}")
    wall_lvh = max(ivs_cm, lvpw_cm) >= LVH_WALL_CM
    if m.lvh_by_rules() is not wall_lvh:
        raise RuntimeError(f"LVH: the mass index {m.lv_mass_index_g_m2} g/m2 disagrees with the walls")
    return m


# --------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------

_CONTAINS = "CONTAINS"
_MOD = "HAS CONCEPT MOD"
_PROPS = "HAS PROPERTIES"
_OBS = "HAS OBS CONTEXT"


def _ucum(unit: str) -> Code:
    """A UCUM unit; pydicom's entry where it has one."""
    known = {
        "cm": codes.UCUM.Centimeter, "mm": codes.UCUM.Millimeter, "cm/s": codes.UCUM.CentimeterPerSecond,
        "mm[Hg]": codes.UCUM.MillimetersHg, "cm2": codes.UCUM.SquareCentimeter,
        "mm2": codes.UCUM.SquareMillimeter, "a": codes.UCUM.Year, "1": codes.UCUM.NoUnits,
    }
    return known.get(unit) or Code(unit, "UCUM", unit)


_SCT_TO_SRT: dict[str, str] = _snomed_dict.mapping["SCT"]


def _srt(code: Code) -> Code:
    """The legacy SNOMED-RT (SRT) form of an SCT code, from pydicom's table."""
    if code.scheme_designator != "SCT":
        return code
    return Code(_SCT_TO_SRT[code.value], "SRT", code.meaning)


PRIVATE_SCHEME = "99HELIOS"
_PRIVATE = {
    "lvmi": Code("HLS-LVMI-ASE", PRIVATE_SCHEME, "LV Mass Index (ASE)"),
    "rwt": Code("HLS-RWT", PRIVATE_SCHEME, "Relative Wall Thickness"),
    "dvi": Code("HLS-AV-DVI", PRIVATE_SCHEME, "AV Dimensionless Index"),
    "package": Code("HLS-CALC-PKG", PRIVATE_SCHEME, "Calculation Package"),
    "adult": Code("HLS-ADULT-ECHO", PRIVATE_SCHEME, "Adult Echo"),
}


def _as(code: Code, meaning: str) -> Code:
    """``code`` with the meaning DICOM's templates show (pydicom has the SNOMED FSN)."""
    return Code(code.value, code.scheme_designator, meaning)


_IMAGE_MODE = _as(codes.SCT.ImageMode, "Image Mode")  # 399264008
_CARDIAC_CYCLE_POINT = _as(codes.SCT.CardiovascularCyclePoint, "Cardiac Cycle Point")  # 272518008

# Pieces of one measurement, independent of the dialect.
_MODE_2D = codes.SCT._2DMode
_MODE_M = codes.SCT.MMode
_MODE_PW = codes.SCT.DopplerPulsed
_MODE_CW = codes.SCT.DopplerContinuousWave
_END_DIASTOLE = codes.SCT.EndDiastole
_SYSTOLE = codes.SCT.Systole


@dataclass(frozen=True)
class _Measure:
    """One measured concept and how each dialect codes and scales it."""

    key: str  # EchoMeasurements attribute
    tid5200: Code
    tid5300: Code | None  # None: post-coordinated in TID 5300
    unit: str  # in EchoMeasurements
    philips_unit: str
    site: Code | None
    mode: Code | None
    phase: Code | None
    method: Code | None
    label: str
    repeated: bool  # measured directly (repeats), or calculated (once)
    threshold: float | None = None  # repeats must stay on its side


_LV_MEASURES = (
    _Measure("ivsd_cm", codes.LN.InterventricularSeptumDiastolicThickness,
             codes.LN.InterventricularSeptumDiastolicDimension2D, "cm", "mm",
             codes.SCT.LeftVentricle, _MODE_2D, _END_DIASTOLE, None, "IVSd (2D)", True, LVH_WALL_CM),
    _Measure("lvpwd_cm", codes.LN.LeftVentriclePosteriorWallDiastolicThickness,
             codes.LN.LeftVentricularPosteriorWallDiastolicThicknessByUS2D, "cm", "mm",
             codes.SCT.LeftVentricle, _MODE_2D, _END_DIASTOLE, None, "LVPWd (2D)", True, LVH_WALL_CM),
    _Measure("lvidd_cm", codes.LN.LeftVentricleInternalEndDiastolicDimension,
             codes.LN.LeftVentricularInternalDiastolicDimension2D, "cm", "mm",
             codes.SCT.LeftVentricle, _MODE_2D, _END_DIASTOLE, None, "LVIDd (2D)", True),
    _Measure("lv_mass_g", codes.LN.LeftVentricleMass, codes.LN.LeftVentricularMassDimensionMethod2D,
             "g", "g", codes.SCT.LeftVentricle, _MODE_2D, None, codes.DCM.CubeMethod, "LV Mass (Cube)", False),
    _Measure("lv_mass_index_g_m2", codes.LN.LeftVentricularMassDimensionMethod2DBSA,
             codes.LN.LeftVentricularMassDimensionMethod2DBSA, "g/m2", "g/m2", codes.SCT.LeftVentricle,
             _MODE_2D, None, codes.DCM.CubeMethod, "LV Mass Index", False),
    _Measure("lvot_diameter_cm", codes.SCT.CardiovascularOrificeDiameter,
             codes.LN.LeftVentricularOutflowTractDimension2D, "cm", "mm",
             codes.SCT.LeftVentricleOutflowTract, _MODE_2D, _SYSTOLE, None, "LVOT Diam", False),
    _Measure("lvot_vmax_m_s", codes.LN.PeakSystolicVelocity, codes.LN.LeftVentricularOutflowTractVmax,
             "m/s", "cm/s", codes.SCT.LeftVentricleOutflowTract, _MODE_PW, _SYSTOLE, None, "LVOT Vmax", False),
    _Measure("lvot_vti_cm", codes.LN.VelocityTimeIntegral, codes.LN.LeftVentricularOutflowTractVTI,
             "cm", "cm", codes.SCT.LeftVentricleOutflowTract, _MODE_PW, _SYSTOLE, None, "LVOT VTI", False),
)
_AV_MEASURES = (
    _Measure("av_cusp_sep_cm", codes.LN.AorticValveCuspSeparation, None, "cm", "mm",
             codes.SCT.AorticValve, _MODE_M, _SYSTOLE, None, "AV Cusp Sep", True, 0.8),
    _Measure("av_vmax_m_s", codes.LN.PeakSystolicVelocity, codes.LN.AorticValveVmax, "m/s", "cm/s",
             codes.SCT.AorticValve, _MODE_CW, _SYSTOLE, None, "AV Vmax", True, SEVERE_VMAX_M_S),
    _Measure("av_vti_cm", codes.LN.VelocityTimeIntegral, codes.LN.AorticValveVTI, "cm", "cm",
             codes.SCT.AorticValve, _MODE_CW, _SYSTOLE, None, "AV VTI", False),
    _Measure("av_peak_gradient_mmhg", codes.LN.PeakGradient, codes.LN.AorticValvePeakInstantaneousGradient,
             "mm[Hg]", "mm[Hg]", codes.SCT.AorticValve, _MODE_CW, _SYSTOLE, codes.DCM.SimplifiedBernoulli,
             "AV Max PG", False),
    _Measure("av_mean_gradient_mmhg", codes.LN.MeanGradient, codes.LN.AorticValveMeanGradient,
             "mm[Hg]", "mm[Hg]", codes.SCT.AorticValve, _MODE_CW, _SYSTOLE, codes.DCM.SimplifiedBernoulli,
             "AV Mean PG", False),
    _Measure("av_area_cm2", codes.SCT.CardiovascularOrificeArea, codes.LN.AorticValveAreaContinuityVTI,
             "cm2", "mm2", codes.SCT.AorticValve, None, _SYSTOLE,
             codes.DCM.ContinuityEquationByVelocityTimeIntegral, "AVA (VTI)", False),
)

# Exact unit conversions (powers of ten) from the stored unit to Philips'.
_SCALE = {("cm", "mm"): 1, ("m/s", "cm/s"): 2, ("cm2", "mm2"): 2}


def _value_in(value: Decimal, unit: str, to_unit: str) -> Decimal:
    """``value`` from ``unit`` to ``to_unit``, exactly (a shift of the decimal point)."""
    if unit == to_unit:
        return value
    return value.scaleb(_SCALE[(unit, to_unit)])


# --------------------------------------------------------------------------
# Content items
# --------------------------------------------------------------------------
#
# Built as plain pydicom data sets: highdicom's content item classes and its
# SR document classes validate, deep-copy and re-parse the whole tree, which
# cost 0.2-3 s per report on the development machine (a GE-like report has
# about 150 items; 3 s), minutes on a 64-patient archive, against 0.02-0.06 s
# this way.  The tests read every dialect back with highdicom
# (hd.sr.ComprehensiveSR / EnhancedSR.from_dataset), check it with dciodvfy
# and dsrdump, and walk the tree with pydicom.


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _content_item(relationship: str | None, value_type: str, name: Code) -> Dataset:
    item = Dataset()
    if relationship is not None:
        item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code_item(name)]
    return item


def _with_children(item: Dataset, children: Iterable[Dataset]) -> Dataset:
    kids = list(children)
    if kids:
        item.ContentSequence = kids
    return item


def _num(name: Code, value: Decimal, unit: str, children: Iterable[Dataset] = (),
         relationship: str = _CONTAINS) -> Dataset:
    """NUM: exactly the decimal given (DS), and the same as FD."""
    item = _content_item(relationship, "NUM", name)
    measured = Dataset()
    measured.MeasurementUnitsCodeSequence = [_code_item(_ucum(unit))]
    measured.NumericValue = format(value, "f")
    measured.FloatingPointValue = float(value)
    item.MeasuredValueSequence = [measured]
    return _with_children(item, children)


def _code(name: Code, value: Code, relationship: str = _MOD) -> Dataset:
    item = _content_item(relationship, "CODE", name)
    item.ConceptCodeSequence = [_code_item(value)]
    return item


def _text(name: Code, value: str, relationship: str) -> Dataset:
    item = _content_item(relationship, "TEXT", name)
    item.TextValue = value
    return item


def _container(name: Code, children: Iterable[Dataset], relationship: str | None = _CONTAINS) -> Dataset:
    item = _content_item(relationship, "CONTAINER", name)
    item.ContinuityOfContent = "SEPARATE"
    return _with_children(item, children)


def _observer() -> list[Dataset]:
    """TID 1001 Observation Context: the sonographer, a person."""
    name = _content_item(_OBS, "PNAME", codes.DCM.PersonObserverName)
    name.PersonName = "SONOGRAPHER^SYNTHETIC"
    return [_code(codes.DCM.ObserverType, codes.DCM.Person, _OBS), name]


def _patient_characteristics(m: EchoMeasurements) -> Dataset:
    """TID 5201 Echocardiography Patient Characteristics."""
    return _container(codes.DCM.PatientCharacteristics, [
        _num(codes.DCM.SubjectAge, Decimal(m.age_years), "a"),
        _code(codes.DCM.SubjectSex, codes.DCM.Male if m.sex == "M" else codes.DCM.Female, _CONTAINS),
        # Mosteller: CID 3663's "BSA = (HT*WT/36)^0.5" (height in m, weight in kg).
        _num(codes.LN.BSA, m.bsa_m2, "m2", [_code(codes.DCM.Equation, codes.DCM.BSAEqualsHTWT360Point5)]),
    ])


def _same(code: Code) -> Code:
    return code


def _modifiers(meas: _Measure, srt: bool, site: bool = True) -> list[Dataset]:
    """TID 300 / 5203 concept modifiers: method, finding site, image mode, cardiac phase."""
    c = _srt if srt else _same
    out: list[Dataset] = []
    if meas.method is not None:
        out.append(_code(c(codes.SCT.MeasurementMethod), meas.method))
    if site and meas.site is not None:
        out.append(_code(c(codes.SCT.FindingSite), c(meas.site)))
    if meas.mode is not None:
        out.append(_code(c(_IMAGE_MODE), c(meas.mode)))
    if meas.phase is not None:
        out.append(_code(c(_CARDIAC_CYCLE_POINT), c(meas.phase)))
    return out


def _repeats(value: Decimal, meas: _Measure, rng: np.random.Generator) -> list[Decimal]:
    """Three repeats around ``value`` that average to it exactly.

    The spread is a few units of the last decimal (at most 0.04 cm, 0.08 m/s),
    and never carries a repeat across the measure's label threshold.
    """
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    unit = Decimal(1).scaleb(exponent)
    limit = 40 if meas.unit == "cm" else 8
    if meas.threshold is not None:
        gap = abs(value - Decimal(repr(meas.threshold))) / unit
        limit = min(limit, int(gap) - 1)
    if limit < 1:
        return [value, value, value]
    a, b = (int(x) for x in rng.integers(1, limit + 1, 2))
    return [value - a * unit, value + b * unit, value + (a - b) * unit]


def _sections(m: EchoMeasurements, dialect: str, rng: np.random.Generator) -> list[Dataset]:
    """TID 5202 sections (LV, aortic valve) of a TID 5200 report."""
    srt = dialect == DIALECT_GE
    c = _srt if srt else _same
    out: list[Dataset] = []
    for site, measures in ((codes.SCT.LeftVentricle, _LV_MEASURES), (codes.SCT.AorticValve, _AV_MEASURES)):
        items: list[Dataset] = []
        for meas in measures:
            value: Decimal = getattr(m, meas.key)
            if dialect == DIALECT_GE:
                # GE writes each measurement twice: plain, then with Selection Status.
                items.append(_num(meas.tid5200, value, meas.unit, _modifiers(meas, srt)))
                items.append(_num(meas.tid5200, value, meas.unit, [
                    *_modifiers(meas, srt),
                    _code(codes.DCM.SelectionStatus, codes.DCM.UserChosenValue, _PROPS),
                ]))
                continue
            unit = meas.philips_unit
            shown = _value_in(value, meas.unit, unit)
            if meas.repeated:
                for r in _repeats(value, meas, rng):
                    items.append(_num(meas.tid5200, _value_in(r, meas.unit, unit), unit, _modifiers(meas, srt)))
                items.append(_num(meas.tid5200, shown, unit, [
                    *_modifiers(meas, srt), _code(codes.DCM.Derivation, codes.SCT.Mean),
                ]))
            else:
                extra: list[Dataset] = []
                if meas.key == "lv_mass_index_g_m2":
                    extra = [_code(_PRIVATE["package"], _PRIVATE["adult"])]
                items.append(_num(meas.tid5200, shown, unit, [*_modifiers(meas, srt), *extra]))
        if dialect == DIALECT_PHILIPS:
            items.extend(_private_measures(m, site))
        out.append(_container(codes.DCM.Findings, [_code(c(codes.SCT.FindingSite), c(site)), *items]))
    return out


def _private_measures(m: EchoMeasurements, site: Code) -> list[Dataset]:
    """Vendor-private measurements beside the standard ones (readers ignore them)."""
    if site == codes.SCT.LeftVentricle:
        rwt = _q(2 * m.lvpwd_cm / m.lvidd_cm, 2)
        return [_num(_PRIVATE["lvmi"], m.lv_mass_index_g_m2, "g/m2"), _num(_PRIVATE["rwt"], rwt, "1")]
    dvi = _q(m.lvot_vmax_m_s / m.av_vmax_m_s, 2)
    return [_num(_PRIVATE["dvi"], dvi, "1")]


def _tid5300_content(m: EchoMeasurements, rng: np.random.Generator) -> list[Dataset]:
    """TID 5300: pre-coordinated (TID 5301) and post-coordinated (TID 5302) measurements."""
    pre: list[Dataset] = []
    post: list[Dataset] = []
    for meas in (*_LV_MEASURES, *_AV_MEASURES):
        value: Decimal = getattr(m, meas.key)
        label = _text(codes.DCM.ShortLabel, meas.label, _PROPS)
        if meas.tid5300 is None:
            post.append(_num(meas.tid5200, value, meas.unit, [
                _code(codes.DCM.MeasurementType, codes.DCM.DirectlyMeasured),
                _code(codes.SCT.FindingSite, meas.site or codes.SCT.AorticValve),
                _code(codes.DCM.FindingObservationType, codes.DCM.StructureOfTheFindingSite),
                _code(codes.DCM.MeasuredProperty, codes.SCT.Diameter),
                *_modifiers(meas, srt=False, site=False),
                label,
            ]))
            continue
        if meas.repeated:
            # The truth is the selected value; the other two are symmetric around it.
            low = _repeats(value, meas, rng)[0]
            selected = _code(codes.DCM.SelectionStatus, codes.DCM.UserChosenValue, _PROPS)
            pre.append(_num(meas.tid5300, low, meas.unit, [label]))
            pre.append(_num(meas.tid5300, value, meas.unit, [selected, _text(codes.DCM.ShortLabel, meas.label, _PROPS)]))
            pre.append(_num(meas.tid5300, value + (value - low), meas.unit,
                            [_text(codes.DCM.ShortLabel, meas.label, _PROPS)]))
        else:
            pre.append(_num(meas.tid5300, value, meas.unit, [label]))
    return [
        _container(codes.DCM.PreCoordinatedMeasurements, pre),
        _container(codes.DCM.PostCoordinatedMeasurements, post),
    ]


# --------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"

# Copied from the study's first video: Patient, General Study, Patient Study.
_COPIED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "PatientIdentityRemoved", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "StudyDescription", "PatientAge", "PatientSize", "PatientWeight",
    "Manufacturer", "InstitutionName", "StationName", "ManufacturerModelName", "SoftwareVersions",
)


def _evidence(evidence: Sequence[Dataset]) -> list[Dataset]:
    """Current Requested Procedure Evidence Sequence: every video of the study."""
    by_series: dict[str, list[Dataset]] = {}
    for ds in evidence:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ref)
    series = []
    for uid, refs in by_series.items():
        item = Dataset()
        item.ReferencedSOPSequence = refs
        item.SeriesInstanceUID = uid
        series.append(item)
    study = Dataset()
    study.ReferencedSeriesSequence = series
    study.StudyInstanceUID = evidence[0].StudyInstanceUID
    return [study]


def build_measurement_report(
    dialect: str,
    m: EchoMeasurements,
    evidence: Sequence[Dataset],
    *,
    series_uid: str,
    sop_uid: str,
    rng: np.random.Generator,
) -> Dataset:
    """The sonographer's measurement SR of one study.

    Parameters
    ----------
    dialect : str
        One of :data:`DIALECTS`.
    m : EchoMeasurements
        The values to write.
    evidence : sequence of pydicom.dataset.Dataset
        The study's video headers: Patient, Study and equipment attributes
        are copied from the first; all are listed in the Current Requested
        Procedure Evidence Sequence.
    series_uid, sop_uid : str
        UIDs of the SR (the caller derives them from the archive seed).
    rng : numpy.random.Generator
        A stream used for nothing but the repeats' scatter.

    Returns
    -------
    pydicom.dataset.Dataset
        Comprehensive SR (TID 5200 dialects) or Enhanced SR (TID 5300), in the
        study of ``evidence``, series :data:`REPORT_SERIES_NUMBER`, with a
        file meta header; no wall-clock time in it.

    Raises
    ------
    ValueError
        For an unknown dialect or no evidence.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown measurement SR dialect {dialect!r} (expected one of {', '.join(DIALECTS)})")
    if not evidence:
        raise ValueError("a measurement SR needs the study's instances as evidence")
    first = evidence[0]
    if dialect == DIALECT_TID5300:
        content = _tid5300_content(m, rng)
        template, sop_class = "5300", ENHANCED_SR
    else:
        content = _sections(m, dialect, rng)
        template, sop_class = "5200", COMPREHENSIVE_SR

    sr = Dataset()
    for keyword in _COPIED:
        if keyword in first:
            setattr(sr, keyword, first[keyword].value)
    sr.SOPClassUID = sop_class
    sr.SOPInstanceUID = sop_uid
    # A cart's report carries the time of the exam, never the wall clock.
    sr.InstanceCreationDate = sr.ContentDate = sr.SeriesDate = first.StudyDate
    sr.InstanceCreationTime = sr.ContentTime = sr.SeriesTime = first.StudyTime
    sr.Modality = "SR"
    sr.SeriesInstanceUID = series_uid
    sr.SeriesNumber = REPORT_SERIES_NUMBER
    sr.SeriesDescription = "Echo measurements"
    sr.ReferencedPerformedProcedureStepSequence = []
    sr.InstanceNumber = 1
    sr.CompletionFlag = "COMPLETE"
    sr.VerificationFlag = "UNVERIFIED"
    sr.PreliminaryFlag = "FINAL"
    sr.PerformedProcedureCodeSequence = []
    sr.CurrentRequestedProcedureEvidenceSequence = _evidence(evidence)
    if dialect == DIALECT_PHILIPS:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = PRIVATE_SCHEME
        scheme.CodingSchemeName = "Helios Imaging echo measurements"
        scheme.CodingSchemeResponsibleOrganization = "Helios Imaging (synthetic)"
        sr.CodingSchemeIdentificationSequence = [scheme]

    # SR Document Content: the root container (TID 5200 or TID 5300).
    sr.ValueType = "CONTAINER"
    sr.ConceptNameCodeSequence = [_code_item(codes.DCM.AdultEchocardiographyProcedureReport)]
    sr.ContinuityOfContent = "SEPARATE"
    template_item = Dataset()
    template_item.MappingResource = "DCMR"
    template_item.TemplateIdentifier = template
    sr.ContentTemplateSequence = [template_item]
    sr.ContentSequence = [*_observer(), _patient_characteristics(m), *content]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    first_meta = getattr(first, "file_meta", None)
    if first_meta is not None and "ImplementationClassUID" in first_meta:
        meta.ImplementationClassUID = first_meta.ImplementationClassUID
        meta.ImplementationVersionName = first_meta.get("ImplementationVersionName", "")
    sr.file_meta = meta
    sr.set_original_encoding(False, True)
    return sr
