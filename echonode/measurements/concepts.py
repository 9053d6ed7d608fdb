"""The echo measurement concepts echonode reads, and how a content item is recognised as one.

Every code comes from pydicom's dictionaries (:data:`pydicom.sr.codedict.codes`,
checked against pydicom 3.0), never from a table typed in here, so a code
cannot be mistyped. A concept is reached by several names:

* TID 5200 "Adult Echocardiography Procedure Report" (TID 5202 sections,
  TID 5203 measurements) uses post-coordinated names from CID 12200-12299.
  Names that carry their anatomy (``codes.LN.InterventricularSeptumDiastolicThickness``,
  18154-5) are enough alone. Pure flow and orifice properties (CID 12222
  "Orifice Flow Property": ``codes.LN.PeakSystolicVelocity`` 11726-7, whose
  CID 12211 meaning is "Peak Velocity"; ``codes.LN.MeanGradient`` 20256-4;
  ``codes.SCT.CardiovascularOrificeArea`` 399367004) say nothing of where
  they were measured: they are the aortic valve's only with the Finding Site
  ``codes.SCT.AorticValve`` (34202007), on the item itself or inherited from
  its section (PS3.17 N.2). The same 11726-7 in the LVOT section is the LVOT
  velocity.
* TID 5300 "Simplified Echo Procedure Report" (Supplement 169) uses the
  pre-coordinated codes of CID 12300 "Core Echo Measurement", which carry
  anatomy, image mode and method in the code itself
  (``codes.LN.InterventricularSeptumDiastolicDimension2D`` 79969-2,
  ``codes.LN.AorticValveVmax`` 79964-3, ``codes.LN.AorticValveAreaContinuityVTI``
  79958-5 ...). The image mode or method a code implies is recorded as if it
  were a modifier.

``codes.LN.LeftVentricleMass`` (18087-7) serves both the LV mass and its
BSA-indexed form in TID 5200 (PS3.16 records an index with the measurement's
own concept name and an indexed unit): the unit's dimension (g or g/m2)
decides which. Indexes by height^2.7 (CID 12232 "... adjusted by Height"
methods, LN "/ height^^2.7" codes) are not BSA indexes and are not read as one.

SNOMED codes are compared in SCT form: the SRT codes older carts write
(``G-C0E3`` "Finding Site", ``T-35400`` "Aortic Valve") are mapped with
pydicom's SRT-SCT table (:func:`normalise_code`).

Plausible ranges are not diagnostic limits: a value outside them is almost
always a unit error (a septum of "11 cm" that was 11 mm) and is not used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.sr._snomed_dict import mapping as _snomed_mapping
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "CONCEPTS",
    "CONCEPTS_BY_KEY",
    "STANDARD_SCHEMES",
    "CodeKey",
    "Concept",
    "NameMatch",
    "code_key",
    "is_private_scheme",
    "loinc_check_digit_fails",
    "match_meaning",
    "match_name",
    "normalise_code",
    "private_meaning_says",
]

#: ``(coding scheme designator, code value)`` with SNOMED codes in SCT form.
CodeKey = tuple[str, str]

#: Coding schemes of the standard (PS3.16 Section 8): a concept name in any
#: other scheme (99GEMS, 99PHILIPS ...) is private and is ignored (counted).
STANDARD_SCHEMES = frozenset({"DCM", "SCT", "SRT", "LN", "UCUM", "FMA", "UMLS", "RADLEX", "NCIt", "NCIT", "ACR", "I10", "I9C"})

_SRT_TO_SCT: dict[str, str] = _snomed_mapping["SRT"]


def normalise_code(scheme: str, value: str) -> CodeKey:
    """``(scheme, value)`` with an SRT code mapped to its SCT equivalent.

    Parameters
    ----------
    scheme : str
        Coding Scheme Designator as written (``SRT``, ``SNM3``, ``SCT``, ``LN``...).
    value : str
        Code Value (or Long / URN Code Value).

    Returns
    -------
    tuple of str
        The comparable key. An SRT code pydicom does not map stays SRT.
    """
    scheme = scheme.strip()
    value = value.strip()
    if scheme in ("SRT", "SNM3"):
        sct = _SRT_TO_SCT.get(value)
        if sct is not None:
            return ("SCT", sct)
        return ("SRT", value)
    return (scheme, value)


def code_key(code: Code) -> CodeKey:
    """The comparable key of a pydicom :class:`~pydicom.sr.coding.Code`."""
    return normalise_code(code.scheme_designator, code.value)


def private_meaning_says(meaning: str, yes: Sequence[str], no: Sequence[str]) -> bool:
    """Whether a private code's meaning plainly says one thing: one of ``yes`` and none of ``no``.

    Private codes (a cart's own "Rest" stage or "Forward" direction) have no
    meaning but their text; this reads it only when it is unambiguous, so an
    unknown private code is never taken for the reading a standard code would
    have to earn.
    """
    text = meaning.lower()
    return any(w in text for w in yes) and not any(w in text for w in no)


def is_private_scheme(scheme: str) -> bool:
    """Whether a coding scheme is private (``99...``) or otherwise not the standard's."""
    scheme = scheme.strip()
    return scheme.startswith("99") or scheme not in STANDARD_SCHEMES


@dataclass(frozen=True)
class NameMatch:
    """One concept name that reaches a :class:`Concept`.

    Attributes
    ----------
    code : Code
        The concept name (from :data:`pydicom.sr.codedict.codes`).
    needs_site : bool
        Whether the name means the concept only with the concept's finding
        site (a CID 12222 orifice flow property).
    image_mode : Code, optional
        The image mode a pre-coordinated code implies.
    method : Code, optional
        The method a pre-coordinated code implies.
    phases : tuple of Code
        When given, the name means the concept only with one of these
        cardiac phases (CID 12307) on the item: a post-coordinated
        "Thickness" at the septum is the IVSd only at end-diastole.
    """

    code: Code
    needs_site: bool = False
    image_mode: Code | None = None
    method: Code | None = None
    phases: tuple[Code, ...] = ()


@dataclass(frozen=True)
class Concept:
    """A measurement concept echonode reads.

    Attributes
    ----------
    key : str
        Short name (``ivsd``).
    column : str
        Column of ``labels.csv`` (``ivsd_cm``); the unit is in the name.
    label : str
        What it is, for people.
    dimension : str
        ``length``, ``velocity``, ``pressure``, ``area``, ``mass`` or
        ``mass_per_area`` (see :mod:`echonode.measurements.units`).
    unit : str
        The UCUM unit values are converted to.
    names : tuple of NameMatch
        Concept names that mean it.
    site : Code, optional
        The finding site that names with ``needs_site`` must carry.
    plausible : tuple of float
        ``(low, high)`` in ``unit``; values outside are not used.
    excluded_methods : tuple of Code
        Methods that make an item something else (LV mass adjusted by height
        is not a BSA index).
    """

    key: str
    column: str
    label: str
    dimension: str
    unit: str
    names: tuple[NameMatch, ...]
    site: Code | None = None
    plausible: tuple[float, float] = (0.0, float("inf"))
    excluded_methods: tuple[Code, ...] = field(default_factory=tuple)


_LN, _SCT, _DCM = codes.LN, codes.SCT, codes.DCM
_2D, _MM = _SCT._2DMode, _SCT.MMode
#: The cardiac phases (CID 12307) a diastolic wall is measured at.
_DIASTOLE = (_SCT.EndDiastole, _SCT.Diastole)

CONCEPTS: tuple[Concept, ...] = (
    Concept(
        "ivsd", "ivsd_cm", "interventricular septum thickness, end-diastole", "length", "cm",
        (
            NameMatch(_LN.InterventricularSeptumDiastolicThickness),
            NameMatch(_LN.InterventricularSeptumDiastolicDimension2D, image_mode=_2D),
            NameMatch(_LN.InterventricularSeptumDiastolicDimensionMM, image_mode=_MM),
            # TID 5300 post-coordinated: CID 12304 "Thickness" at the septum, at end-diastole.
            NameMatch(_LN.Thickness, needs_site=True, phases=_DIASTOLE),
        ),
        site=_SCT.InterventricularSeptum,
        plausible=(0.2, 4.0),
    ),
    Concept(
        "lvpwd", "lvpwd_cm", "LV posterior wall thickness, end-diastole", "length", "cm",
        (
            NameMatch(_LN.LeftVentriclePosteriorWallDiastolicThickness),
            NameMatch(_LN.LeftVentricularPosteriorWallDiastolicThicknessByUS2D, image_mode=_2D),
            NameMatch(_LN.LeftVentricularPosteriorWallDiastolicThicknessByUSMMode, image_mode=_MM),
        ),
        plausible=(0.2, 4.0),
    ),
    Concept(
        "lvidd", "lvidd_cm", "LV internal dimension, end-diastole", "length", "cm",
        (
            NameMatch(_LN.LeftVentricleInternalEndDiastolicDimension),
            NameMatch(_LN.LeftVentricularInternalDiastolicDimension2D, image_mode=_2D),
            NameMatch(_LN.LeftVentricularInternalDiastolicDimensionMM, image_mode=_MM),
        ),
        plausible=(1.0, 12.0),
    ),
    Concept(
        "lv_mass", "lv_mass_g", "LV mass", "mass", "g",
        (
            NameMatch(_LN.LeftVentricleMass),
            NameMatch(_LN.LeftVentricularMass, method=_DCM.LeftVentricleMassByTruncatedEllipse),
            NameMatch(_LN.LeftVentricularMassAreaLength, method=_DCM.LeftVentricleMassByAreaLength),
            NameMatch(_LN.LeftVentricularMassDimensionMethod2D, image_mode=_2D),
            NameMatch(_LN.LeftVentricularMassDimensionMethodMM, image_mode=_MM),
            # TID 5300 post-coordinated: CID 12304 "Mass" at the left ventricle (3D LV mass has no
            # pre-coordinated code); the unit tells the mass from its index.
            NameMatch(_SCT.MassQuantity, needs_site=True),
        ),
        site=_SCT.LeftVentricle,
        plausible=(10.0, 1500.0),
    ),
    Concept(
        "lv_mass_index", "lv_mass_index_g_m2", "LV mass indexed to body surface area", "mass_per_area", "g/m2",
        (
            NameMatch(_LN.LeftVentricleMass),
            NameMatch(_LN.LeftVentricularMassTruncatedEllipseBSA, method=_DCM.LeftVentricleMassByTruncatedEllipse),
            NameMatch(_LN.LeftVentricularMassAreaLengthBSA, method=_DCM.LeftVentricleMassByAreaLength),
            NameMatch(_LN.LeftVentricularMassDimensionMethod2DBSA, image_mode=_2D),
            NameMatch(_LN.LeftVentricularMassDimensionMethodMMBSA, image_mode=_MM),
            NameMatch(_SCT.MassQuantity, needs_site=True),
        ),
        site=_SCT.LeftVentricle,
        plausible=(10.0, 500.0),
        excluded_methods=(
            _DCM.LeftVentricleMassByMModeAdjustedByHeight,
            _DCM.LeftVentricleMassByTruncatedEllipseAdjustedByHeight,
            _DCM.LeftVentricleMassByAreaLengthAdjustedByHeight,
        ),
    ),
    Concept(
        "av_vmax", "av_vmax_m_s", "aortic valve peak velocity", "velocity", "m/s",
        (
            NameMatch(_LN.AorticValveVmax),
            NameMatch(_LN.PeakSystolicVelocity, needs_site=True),
            NameMatch(_LN.StenosisPeakVelocity, needs_site=True),
            NameMatch(_LN.PeakBloodVelocity, needs_site=True),
        ),
        site=_SCT.AorticValve,
        plausible=(0.2, 9.0),
    ),
    Concept(
        "av_mean_gradient", "av_mean_gradient_mmhg", "aortic valve mean pressure gradient", "pressure", "mm[Hg]",
        (
            NameMatch(_LN.AorticValveMeanGradient),
            NameMatch(_LN.MeanGradient, needs_site=True),
        ),
        site=_SCT.AorticValve,
        plausible=(0.1, 200.0),
    ),
    Concept(
        "av_area", "av_area_cm2", "aortic valve area", "area", "cm2",
        (
            NameMatch(_LN.AorticValveAreaContinuityVTI, method=_DCM.ContinuityEquationByVelocityTimeIntegral),
            NameMatch(_LN.AorticValveAreaContinuityVmax, method=_DCM.ContinuityEquationByPeakVelocity),
            NameMatch(_SCT.CardiovascularOrificeArea, needs_site=True),
            # TID 5300 post-coordinated (CID 12304): planimetry has no pre-coordinated AVA code.
            NameMatch(_SCT.Area, needs_site=True),
            NameMatch(_DCM.EffectiveOrificeArea, needs_site=True),
        ),
        site=_SCT.AorticValve,
        plausible=(0.05, 8.0),
        # An orifice measured by PISA is a regurgitant one (the AR's EROA), not the stenotic valve's.
        excluded_methods=(_DCM.ProximalIsovelocitySurfaceArea,),
    ),
    Concept(
        "av_cusp_sep", "av_cusp_sep_cm", "aortic valve cusp separation", "length", "cm",
        (NameMatch(_LN.AorticValveCuspSeparation),),
        plausible=(0.05, 4.0),
    ),
)

CONCEPTS_BY_KEY: dict[str, Concept] = {c.key: c for c in CONCEPTS}

#: Concept name key -> [(concept, how the name matches)], built once.
_BY_NAME: dict[CodeKey, list[tuple[Concept, NameMatch]]] = {}
for _concept in CONCEPTS:
    for _match in _concept.names:
        _BY_NAME.setdefault(code_key(_match.code), []).append((_concept, _match))


#: Normalised code meaning -> [(concept, how the name matches)], for names whose code is wrong.
_BY_MEANING: dict[str, list[tuple[Concept, NameMatch]]] = {}
for _concept in CONCEPTS:
    for _match in _concept.names:
        _BY_MEANING.setdefault(" ".join(_match.code.meaning.lower().split()), []).append((_concept, _match))


def match_name(name: CodeKey) -> list[tuple[Concept, NameMatch]]:
    """The concepts a (normalised) concept name can mean; empty when none.

    More than one comes back for ``codes.LN.LeftVentricleMass``; the unit
    decides between them (:mod:`echonode.measurements.reading`).
    """
    return _BY_NAME.get(name, [])


def match_meaning(meaning: str) -> list[tuple[Concept, NameMatch]]:
    """The concepts whose standard code meaning is ``meaning`` (case and spacing aside).

    Used only to explain an item whose code is malformed: a meaning is free
    text and never makes an item a concept's by itself.
    """
    return _BY_MEANING.get(" ".join(meaning.lower().split()), [])


_LOINC_CODE = re.compile(r"([0-9]{1,7})-([0-9])")


def loinc_check_digit_fails(value: str) -> bool:
    """Whether ``value`` is shaped like a LOINC code (``18154-5``) but its check digit is wrong.

    LOINC's check digit is the Mod 10 (Luhn) digit of the part before the
    hyphen; a wrong one means a code typed by hand into a template, and the
    code names nothing.  Values of other shapes (LOINC Part and answer codes)
    are not judged.

    Parameters
    ----------
    value : str
        A Code Value of the ``LN`` scheme.

    Returns
    -------
    bool
    """
    shaped = _LOINC_CODE.fullmatch(value.strip())
    if shaped is None:
        return False
    total = 0
    for position, digit in enumerate(reversed(shaped.group(1))):
        doubled = int(digit) * (2 if position % 2 == 0 else 1)
        total += doubled - 9 if doubled > 9 else doubled
    return (10 - total % 10) % 10 != int(shaped.group(2))
