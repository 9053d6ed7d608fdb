"""Reading an echo measurement SR into typed measurements.

:func:`read_measurement_sr` takes a file or a dataset and returns a
:class:`MeasurementDocument`: the SR's identity (UIDs, content date and time,
predecessors, equipment), and one :class:`Measurement` per NUM content item
that means one of :data:`~echonode.measurements.concepts.CONCEPTS`, with its
value in the concept's unit, its modifiers and where it came from (SOP
Instance UID and content path, ``1.3.2`` = third child of the second child of
the first root item, as ``dsrdump`` numbers them).

It reads

* TID 5200 "Adult Echocardiography Procedure Report": the document title
  (DCM 125200), TID 5202 sections (Findings, with a Finding Site that the
  measurements inherit) holding Measurement Groups (with an Image Mode they
  inherit), and TID 5203 measurements with concept modifiers: Finding Site,
  Image Mode, Measurement Method, Derivation, Selection Status, Flow
  Direction, and the protocol Stage (TID 5202's acquisition context). A
  modifier on the NUM overrides the inherited one. Modifiers are recognised
  under any of HAS CONCEPT MOD, HAS ACQ CONTEXT and HAS PROPERTIES, as carts
  and editions of the standard differ on which;
* TID 5300 "Simplified Echo Procedure Report" (same title, Supplement 169):
  Pre-coordinated, Post-coordinated and Adhoc Measurements containers with
  pre-coordinated codes, CID 12304 properties at a CID 12305 site (and, for a
  wall, at a CID 12307 cardiac phase), and the TID 5301 Selection Status and
  Derivation rows;

in any SR storage class (Comprehensive, Enhanced, Comprehensive 3D,
Simplified Adult Echo). Any other SR is not an echo measurement report and
is returned with ``status == "not_echo"`` and the reason.

A flow property whose Flow Direction is other than antegrade (a
regurgitant jet, retrograde flow, a shunt: CID 12221/12306) is not the
valve's forward flow, whatever its name: the aortic regurgitation jet's
peak velocity is written with the same concept name and site as the
stenotic jet's, and only that modifier tells them apart.

Vendor dialects are read, not refused: repeated items, SRT codes, values in
mm, private coding schemes (99GEMS, 99PHILIPS ...) mixed in. A NUM or a
modifier with a private concept name is skipped and counted in
:attr:`MeasurementDocument.counts`.

Nothing here raises on bad input. A file that cannot be read (cut short,
not DICOM, a deflated data set that inflates past the limit, over
``max_bytes``) comes back with ``status == "unreadable"``; a NUM whose value
cannot be used (no value, not a number, no unit, a unit of the wrong kind,
outside the plausible range) comes back with ``value=None`` and ``problem``
saying why. The file is read from its encoding (:mod:`~echonode.measurements.rawtree`),
not through pydicom's Dataset: nothing is validated, a file cut short is
found, and it is 10-40 times faster. Nothing from the file but UIDs and
codes reaches the log.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes

from echonode.measurements.concepts import (
    CONCEPTS,
    CodeKey,
    Concept,
    NameMatch,
    code_key,
    is_private_scheme,
    loinc_check_digit_fails,
    match_meaning,
    match_name,
    normalise_code,
    private_meaning_says,
)
from echonode.measurements.rawtree import (
    Item,
    Malformed,
    NotPart10,
    Truncated,
    decode_text,
    first_float,
    parse_dataset,
    parse_part10,
    python_encodings,
)
from echonode.measurements.units import CANONICAL_UNIT, convert, parse_unit
from echonode.ops.logs import get_logger

__all__ = [
    "DEFAULT_MAX_SR_BYTES",
    "SR_SOP_CLASS_PREFIX",
    "Coded",
    "Measurement",
    "MeasurementDocument",
    "is_sr_sop_class",
    "patient_key",
    "read_measurement_sr",
]

log = get_logger("echonode.measurements")

#: Every SR storage SOP class UID starts with this.
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: An SR file larger than this is not read (a cart's measurement SR is tens
#: of kilobytes; this bounds the memory one file can take).
DEFAULT_MAX_SR_BYTES = 32 * 1024**2

_TITLE = code_key(codes.DCM.AdultEchocardiographyProcedureReport)
_FINDING_SITE = code_key(codes.SCT.FindingSite)
_IMAGE_MODE = code_key(codes.SCT.ImageMode)
_METHOD = code_key(codes.SCT.MeasurementMethod)
_SELECTION = code_key(codes.DCM.SelectionStatus)
_DERIVATION = code_key(codes.DCM.Derivation)
_SUBJECT_SEX = code_key(codes.DCM.SubjectSex)
_FLOW_DIRECTION = code_key(codes.SCT.DirectionOfFlow)
#: The only flow direction that is a valve's forward flow (CID 12221 "Antegrade Flow", CID 12306
#: "Antegrade Direction": one SCT code).
_FORWARD_FLOW = code_key(codes.SCT.AntegradeFlow)
#: Names of the protocol stage a measurement was acquired at: TID 5202's (LN 18139-6, "Stage"), and
#: the SCT and DCM names some carts write instead.
_STAGE_NAMES = (("LN", "18139-6"), code_key(codes.SCT.Stage), code_key(codes.DCM.ProtocolStage))
_SIMPLIFIED_CONTAINERS = frozenset(
    code_key(c)
    for c in (codes.DCM.PreCoordinatedMeasurements, codes.DCM.PostCoordinatedMeasurements, codes.DCM.AdhocMeasurements)
)
_SEX_CODES = {code_key(codes.DCM.Male): "M", code_key(codes.DCM.Female): "F"}
#: Anatomic sites (CID 12305, and the sites concepts are read at): a container named by one (an
#: "Aortic Valve" section without a Finding Site modifier, as some carts write it) gives its items
#: that site, in place of any site it inherits (an LVOT container inside an Aortic Valve one).
_SITE_NAMES = frozenset(
    {code_key(c.site) for c in CONCEPTS if c.site is not None}
    | {code_key(getattr(getattr(codes, scheme), name)) for scheme, names in cid_concepts[12305].items() for name in names}
)
_CARDIAC_PHASE = code_key(codes.SCT.CardiovascularCyclePoint)
#: Body Surface Area (TID 5201 Patient Characteristics; LOINC's measured and derived codes).
_BSA_NAMES = frozenset({("LN", "8277-6"), ("LN", "3140-1")})
_MODIFIER_RELATIONSHIPS = frozenset({"HAS CONCEPT MOD", "HAS ACQ CONTEXT", "HAS PROPERTIES"})

# Tags of the content items (a raw item is a dict keyed by tag).
_VALUE_TYPE = 0x0040A040
_RELATIONSHIP = 0x0040A010
_CONCEPT_NAME = 0x0040A043
_CONCEPT_CODE = 0x0040A168
_CONTENT = 0x0040A730
_MEASURED_VALUE = 0x0040A300
_NUMERIC_VALUE = 0x0040A30A
_FLOAT_VALUE = 0x0040A161
_UNITS = 0x004008EA
_QUALIFIER = 0x0040A301
_CODE_VALUE = 0x00080100
_SCHEME = 0x00080102
_MEANING = 0x00080104
_LONG_CODE_VALUE = 0x00080119
_URN_CODE_VALUE = 0x00080120


def patient_key(patient_id: str | None) -> str | None:
    """A digest of a Patient ID, spaces around it aside: compared, never the ID itself.

    Parameters
    ----------
    patient_id : str or None
        The Patient ID (0010,0020) as read.

    Returns
    -------
    str or None
        16 hex digits of its SHA-256; None when it is absent or blank.
    """
    text = (patient_id or "").strip()
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] if text else None


def is_sr_sop_class(uid: str | None) -> bool:
    """Whether a SOP Class UID is one of the SR storage classes."""
    return bool(uid) and str(uid).startswith(SR_SOP_CLASS_PREFIX)


@dataclass(frozen=True, slots=True)
class Coded:
    """A coded value as read: scheme and value normalised (SRT to SCT), and its meaning."""

    scheme: str
    value: str
    meaning: str

    @property
    def key(self) -> CodeKey:
        """``(scheme, value)``, comparable with :func:`~echonode.measurements.concepts.code_key`."""
        return (self.scheme, self.value)

    def __str__(self) -> str:
        return self.meaning or f"({self.scheme}, {self.value})"


@dataclass(frozen=True, slots=True)
class Measurement:
    """One NUM content item that means a concept echonode reads.

    Attributes
    ----------
    concept : str
        :attr:`Concept.key` (``ivsd``, ``av_vmax`` ...).
    value : float or None
        In :attr:`unit`; None when the item cannot be used (see ``problem``).
    unit : str
        The concept's UCUM unit (``cm``, ``m/s``, ``mm[Hg]``, ``cm2``, ``g``, ``g/m2``).
    raw_value : str
        The value as written (at most 32 characters).
    raw_unit : str
        The unit as written, ``SCHEME:CODE`` (empty when missing).
    name : Coded
        The NUM's concept name.
    finding_site, image_mode, method, selection_status, derivation : Coded or None
        The item's modifiers, its own or inherited (site and image mode from
        its section and group; image mode and method also implied by a
        pre-coordinated code).
    stage : Coded or None
        The protocol stage it was acquired at (CID 12002: resting state,
        peak stress, before or after a procedure ...), its own or its
        group's; None when the report names none.
    sop_instance_uid : str
        The SR it came from.
    content_path : str
        Where in the SR (``1.3.2``).
    problem : str or None
        Why ``value`` is None.
    """

    concept: str
    value: float | None
    unit: str
    raw_value: str
    raw_unit: str
    name: Coded
    finding_site: Coded | None
    image_mode: Coded | None
    method: Coded | None
    selection_status: Coded | None
    derivation: Coded | None
    sop_instance_uid: str
    content_path: str
    problem: str | None = None
    stage: Coded | None = None

    @property
    def selected(self) -> bool:
        """Whether the sonographer (or the cart) marked this value as the one to use."""
        return self.selection_status is not None


@dataclass
class MeasurementDocument:
    """What one SR file holds, as far as echo measurements go.

    Attributes
    ----------
    path : str or None
        The file read (None when read from a dataset).
    status : str
        ``read`` (an echo measurement report, see :attr:`measurements`),
        ``not_echo`` (an SR, but not an adult echo report), ``not_sr`` (not
        an SR at all), ``no_measurements`` (an echo report without any NUM
        echonode reads, e.g. only private codes), ``unreadable``, or
        ``other_patient`` (set by a caller that found the SR filed under
        another Patient ID than the study's images).
    reason : str or None
        Why, for every status but ``read``.
    template : str or None
        ``5200`` or ``5300`` (from the Content Template Sequence, else from
        the containers it uses).
    measurements : list of Measurement
        Every NUM item of a known concept, usable or not.
    values_read : int
        How many of :attr:`measurements` have a value.
    counts : Counter
        ``numeric_items`` (all NUM items), ``private_items`` (NUMs with a
        private concept name), ``private_modifiers``, ``other_items`` (NUMs
        of standard concepts echonode does not read, or of another site's
        flow), ``reverse_flow_items`` (flow properties of a regurgitant,
        retrograde or shunt flow: not the valve's forward flow) and
        ``unsited_items`` (flow or orifice properties with no finding site to
        say where: kept in :attr:`measurements` as unusable).
    patient_sex : str or None
        ``M`` or ``F``: the Subject Sex in the SR's patient characteristics,
        else its Patient's Sex (0010,0040).
    body_surface_area_m2 : float or None
        The Body Surface Area of the SR's patient characteristics (LN
        8277-6 or 3140-1, TID 5201), when given in an area unit and within
        0.2-3.5 m2.
    patient_key : str or None
        :func:`patient_key` of the SR's Patient ID (never the ID itself), to
        tell whether two SRs, or an SR and the study's images, are one
        patient's; None when it has none.
    """

    path: str | None
    status: str = "read"
    reason: str | None = None
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    instance_number: int | None = None
    content_datetime: str = ""
    completion_flag: str = ""
    verification_flag: str = ""
    manufacturer: str = ""
    model_name: str = ""
    station_name: str = ""
    template: str | None = None
    title: Coded | None = None
    predecessors: tuple[str, ...] = ()
    identical_documents: tuple[str, ...] = ()
    patient_sex: str | None = None
    body_surface_area_m2: float | None = None
    patient_key: str | None = None
    measurements: list[Measurement] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    values_read: int = 0

    @property
    def usable(self) -> bool:
        """Whether the document gives at least one value (counted when read, so
        that a caller may drop :attr:`measurements` once it has used them)."""
        return self.status == "read" and self.values_read > 0

    @property
    def is_echo_report(self) -> bool:
        """Whether it is an adult echo report (with or without usable values)."""
        return self.status in ("read", "no_measurements")


@dataclass
class _Context:
    """Modifiers a content item inherits from its containers."""

    finding_site: Coded | None = None
    image_mode: Coded | None = None
    method: Coded | None = None
    flow_direction: Coded | None = None
    stage: Coded | None = None
    phase: Coded | None = None


def read_measurement_sr(
    source: str | os.PathLike[str] | Dataset,
    *,
    max_bytes: int = DEFAULT_MAX_SR_BYTES,
) -> MeasurementDocument:
    """Read an echo measurement SR.

    Parameters
    ----------
    source : path-like or pydicom.dataset.Dataset
        A DICOM Part 10 file, or a dataset already read.
    max_bytes : int
        A file larger than this is not read (``status == "unreadable"``);
        also the most a deflated data set may inflate to.

    Returns
    -------
    MeasurementDocument
        Never raises for bad input: see :attr:`MeasurementDocument.status`.
    """
    doc = _read(source, max_bytes)
    _log_outcome(doc)
    return doc


def _read(source: str | os.PathLike[str] | Dataset, max_bytes: int) -> MeasurementDocument:
    if isinstance(source, Dataset):
        doc = MeasurementDocument(path=None)
        root, little = _from_dataset(source, doc)
    else:
        path = Path(source)
        doc = MeasurementDocument(path=str(path))
        root, little = _load(path, max_bytes, doc)
    if root is None:
        return doc
    try:
        _Walker(doc, root, little).read()
    except Exception as exc:  # noqa: BLE001 - keep one broken SR from stopping a run
        doc.status = "unreadable"
        doc.reason = f"the SR content cannot be read ({type(exc).__name__})"
        doc.measurements = []
    return doc


def _load(path: Path, max_bytes: int, doc: MeasurementDocument) -> tuple[Item | None, bool]:
    """The data set of the file, or None with the reason recorded in ``doc``."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            doc.status, doc.reason = "unreadable", f"the file is {size >> 20} MiB, over the {max_bytes >> 20} MiB an SR may take"
            return None, True
        data = path.read_bytes()
        root, tsyntax = parse_part10(data, max_inflated=max_bytes)
    except OSError as exc:
        doc.status, doc.reason = "unreadable", f"cannot read the file ({exc.strerror or type(exc).__name__})"
        return None, True
    except NotPart10:
        doc.status, doc.reason = "unreadable", "not a DICOM Part 10 file"
        return None, True
    except Truncated as exc:
        doc.status, doc.reason = "unreadable", f"the file is cut short ({exc})"
        return None, True
    except Malformed as exc:
        doc.status, doc.reason = "unreadable", f"the DICOM encoding cannot be followed ({exc})"
        return None, True
    return root, tsyntax != "1.2.840.10008.1.2.2"


def _from_dataset(ds: Dataset, doc: MeasurementDocument) -> tuple[Item | None, bool]:
    """A dataset already in memory, encoded once (explicit VR little endian) and read as a file would be."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    try:
        write_dataset(fp, ds)
        return parse_dataset(fp.getvalue(), implicit=False, little=True), True
    except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot encode
        doc.status, doc.reason = "unreadable", f"the data set cannot be encoded ({type(exc).__name__})"
        return None, True


class _Walker:
    """One pass over the content tree of one SR."""

    def __init__(self, doc: MeasurementDocument, root: Item, little: bool) -> None:
        self.doc = doc
        self.root = root
        self.little = little
        self.encodings = python_encodings(root.get(0x00080005))

    def text(self, item: Item, tag: int) -> str:
        return decode_text(item.get(tag), self.encodings)

    def read(self) -> None:
        doc, root, text = self.doc, self.root, self.text
        doc.sop_instance_uid = text(root, 0x00080018)
        doc.sop_class_uid = text(root, 0x00080016)
        doc.study_instance_uid = text(root, 0x0020000D)
        doc.series_instance_uid = text(root, 0x0020000E)
        number = text(root, 0x00200013)
        try:
            doc.instance_number = int(float(number)) if number else None
        except ValueError:
            doc.instance_number = None
        doc.content_datetime = _datetime(text(root, 0x00080023), text(root, 0x00080033))
        doc.completion_flag = text(root, 0x0040A491).upper()
        doc.verification_flag = text(root, 0x0040A493).upper()
        doc.manufacturer = text(root, 0x00080070)
        doc.model_name = text(root, 0x00081090)
        doc.station_name = text(root, 0x00081010)
        doc.predecessors = tuple(self.referenced_instances(0x0040A360))
        doc.identical_documents = tuple(self.referenced_instances(0x0040A525))
        doc.patient_key = patient_key(text(root, 0x00100020))
        sex = text(root, 0x00100040).upper()
        doc.patient_sex = sex if sex in ("M", "F") else None

        if not is_sr_sop_class(doc.sop_class_uid) or text(root, _VALUE_TYPE) != "CONTAINER":
            doc.status, doc.reason = "not_sr", "not a structured report"
            return
        doc.title = self.coded(_first(root, _CONCEPT_NAME))
        if doc.title is None or doc.title.key != _TITLE:
            title = f"{doc.title.scheme} {doc.title.value} '{doc.title.meaning}'" if doc.title else "none"
            doc.status = "not_echo"
            doc.reason = f"not an adult echocardiography report (document title {title}, not DCM 125200)"
            return
        template = _first(root, 0x0040A504)
        doc.template = text(template, 0x0040DB00) if template is not None else None
        children = _children(root)
        if not doc.template:
            names = {(self.coded(_first(c, _CONCEPT_NAME)) or _NO_CODE).key for c in children}
            doc.template = "5300" if names & _SIMPLIFIED_CONTAINERS else "5200"
        self.walk(children, _Context(), "")
        doc.values_read = sum(m.value is not None for m in doc.measurements)

        if not doc.measurements:
            doc.status = "no_measurements"
            if doc.counts["private_items"] and not doc.counts["other_items"]:
                doc.reason = (
                    f"only private codes: {doc.counts['private_items']} measurements in private coding schemes, "
                    "none standard"
                )
            elif doc.counts["numeric_items"]:
                doc.reason = f"none of its {doc.counts['numeric_items']} measurements is one echonode reads"
            else:
                doc.reason = "the report holds no measurements"

    def coded(self, item: Item | None) -> Coded | None:
        """The code of a code sequence item, normalised; None when it has no value."""
        if item is None:
            return None
        text = self.text
        value = text(item, _CODE_VALUE) or text(item, _LONG_CODE_VALUE) or text(item, _URN_CODE_VALUE)
        if not value:
            return None
        scheme, value = normalise_code(text(item, _SCHEME), value)
        return Coded(scheme, value, text(item, _MEANING))

    def referenced_instances(self, tag: int) -> list[str]:
        """SOP Instance UIDs of a Hierarchical SOP Instance Reference sequence."""
        out: list[str] = []
        for study in _sequence(self.root, tag):
            for series in _sequence(study, 0x00081115):
                for sop in _sequence(series, 0x00081199):
                    uid = self.text(sop, 0x00081155)
                    if uid:
                        out.append(uid)
        return out

    def modifiers(self, item: Item) -> dict[CodeKey, Coded]:
        """The recognised CODE modifiers directly under ``item`` (name key -> value)."""
        found: dict[CodeKey, Coded] = {}
        text = self.text
        for child in _children(item):
            if text(child, _VALUE_TYPE) != "CODE" or text(child, _RELATIONSHIP) not in _MODIFIER_RELATIONSHIPS:
                continue
            name = self.coded(_first(child, _CONCEPT_NAME))
            if name is None:
                continue
            if is_private_scheme(name.scheme):
                self.doc.counts["private_modifiers"] += 1
                continue
            value = self.coded(_first(child, _CONCEPT_CODE))
            if value is not None:
                found.setdefault(name.key, value)
        return found

    def walk(self, items: list[Item], ctx: _Context, path: str) -> None:
        """Visit content items depth-first, carrying the modifiers containers pass down."""
        text = self.text
        for index, item in enumerate(items, 1):
            item_path = f"{path}.{index}" if path else str(index)
            value_type = text(item, _VALUE_TYPE)
            if value_type == "CONTAINER":
                mods = self.modifiers(item)
                site = mods.get(_FINDING_SITE)
                if site is None:
                    named = self.coded(_first(item, _CONCEPT_NAME))
                    site = named if named is not None and named.key in _SITE_NAMES else None
                inner = _Context(
                    finding_site=site or ctx.finding_site,
                    image_mode=mods.get(_IMAGE_MODE, ctx.image_mode),
                    method=mods.get(_METHOD, ctx.method),
                    flow_direction=mods.get(_FLOW_DIRECTION, ctx.flow_direction),
                    stage=_stage(mods) or ctx.stage,
                    phase=mods.get(_CARDIAC_PHASE, ctx.phase),
                )
                self.walk(_children(item), inner, item_path)
            elif value_type == "NUM" and text(item, _RELATIONSHIP) == "CONTAINS":
                self.doc.counts["numeric_items"] += 1
                self.read_num(item, ctx, item_path)
            elif value_type == "CODE":
                name = self.coded(_first(item, _CONCEPT_NAME))
                if name is not None and name.key == _SUBJECT_SEX:
                    sex = self.coded(_first(item, _CONCEPT_CODE))
                    if sex is not None and sex.key in _SEX_CODES:
                        self.doc.patient_sex = _SEX_CODES[sex.key]

    def read_num(self, item: Item, ctx: _Context, path: str) -> None:
        """Read one NUM item into the document (or count it as private or other)."""
        doc = self.doc
        name = self.coded(_first(item, _CONCEPT_NAME))
        if name is None:
            doc.counts["other_items"] += 1
            return
        if is_private_scheme(name.scheme):
            doc.counts["private_items"] += 1
            return
        if name.key in _BSA_NAMES:
            self.read_bsa(item)
            return
        candidates = match_name(name.key)
        code_problem: str | None = None
        if not candidates and name.scheme == "LN" and loinc_check_digit_fails(name.value):
            # A hand-typed code in a vendor template: the item is kept, refused with the reason, so
            # the study says why its measurement is missing instead of "not measured".
            candidates = match_meaning(name.meaning)
            if candidates:
                meant_concept, meant = candidates[0]
                code_problem = (
                    f"concept name LN {_quote(name.value)} is not a LOINC code (its check digit is wrong); its "
                    f"meaning is that of the {meant_concept.label}'s {meant.code.scheme_designator} {meant.code.value}, but a"
                    " meaning alone is not read"
                )
        if not candidates:
            doc.counts["other_items"] += 1
            return
        mods = self.modifiers(item)
        direction = mods.get(_FLOW_DIRECTION, ctx.flow_direction)
        flow = all(concept.dimension in _FLOW_DIMENSIONS for concept, _ in candidates)
        if flow and direction is not None and not _is_forward(direction):
            doc.counts["reverse_flow_items"] += 1  # the regurgitant jet's velocity is not the stenosis's
            return
        site = mods.get(_FINDING_SITE, ctx.finding_site)
        # A flow or orifice property is the concept's only at the concept's site.
        sited: list[tuple[Concept, NameMatch]] = []
        phase = mods.get(_CARDIAC_PHASE, ctx.phase)
        for concept, match in candidates:
            at_its_site = site is not None and concept.site is not None and site.key == code_key(concept.site)
            in_its_phase = not match.phases or (phase is not None and phase.key in {code_key(c) for c in match.phases})
            if (not match.needs_site or at_its_site) and in_its_phase:
                sited.append((concept, match))
        if not sited and site is not None:
            doc.counts["other_items"] += 1  # another site's flow (the LVOT's velocity): not ours
            return
        if not sited:
            # A flow property with no site at all could be the concept's: keep it, refused with the
            # reason, so that the study's evidence and reason show it rather than "not measured".
            doc.counts["unsited_items"] += 1

        mv = _first(item, _MEASURED_VALUE)
        raw_value, number, problem = self.numeric_value(item, mv)
        unit_code = self.coded(_first(mv, _UNITS)) if mv is not None else None
        raw_unit = f"{unit_code.scheme}:{unit_code.value}" if unit_code else ""
        unit = parse_unit(unit_code.scheme, unit_code.value) if unit_code else None

        problem = code_problem or problem
        concept, match = (sited or candidates)[0]
        if not sited:
            at = concept.site.meaning if concept.site is not None else "its site"
            problem = problem or f"no finding site: read as the {concept.label} only at the {at.lower()}"
        if unit is not None and len(sited) > 1:
            # LV mass and its BSA index share 18087-7: the unit's dimension decides.
            for c, m in sited:
                if c.dimension == unit.dimension:
                    concept, match = c, m
                    break
        value: float | None = None
        if problem is None:
            if unit_code is None:
                problem = "no unit"
            elif unit is None:
                problem = f"unit {_quote(unit_code.value)} ({_quote(unit_code.scheme)}) is not a UCUM unit echonode knows"
            elif unit.dimension != concept.dimension:
                wanted = " or ".join(sorted({c.dimension.replace("_", " ") for c, _ in sited}))
                problem = f"unit {_quote(unit_code.value)} is a {unit.dimension.replace('_', ' ')}, not a {wanted}"
            elif number is not None:
                # A Doppler velocity is signed by its direction to the probe (flow away from an apical
                # probe through the aortic valve is negative on some carts); its size is the measurement.
                value = convert(abs(number) if unit.dimension == "velocity" else number, unit)
                low, high = concept.plausible
                if not (low <= value <= high):
                    problem = (
                        f"{value:g} {concept.unit} is outside the plausible {low:g}-{high:g} {concept.unit} "
                        "(a unit written wrong?)"
                    )
        method = mods.get(_METHOD, ctx.method)
        if match.method is not None and method is None:
            method = _as_coded(match.method)
        if problem is None and method is not None and method.key in _excluded_methods(concept):
            why = "not indexed to body surface area" if concept.dimension == "mass_per_area" else "a regurgitant orifice"
            problem = f"measured by '{method.meaning}', which is {why}"
        image_mode = mods.get(_IMAGE_MODE, ctx.image_mode)
        if match.image_mode is not None and image_mode is None:
            image_mode = _as_coded(match.image_mode)
        doc.measurements.append(
            Measurement(
                concept=concept.key,
                value=value if problem is None else None,
                unit=CANONICAL_UNIT[concept.dimension],
                raw_value=raw_value,
                raw_unit=raw_unit,
                name=name,
                finding_site=site,
                image_mode=image_mode,
                method=method,
                selection_status=mods.get(_SELECTION),
                derivation=mods.get(_DERIVATION),
                sop_instance_uid=doc.sop_instance_uid,
                content_path=path,
                problem=problem,
                stage=_stage(mods) or ctx.stage,
            )
        )

    def read_bsa(self, item: Item) -> None:
        """The patient's Body Surface Area, kept when it is an area in the plausible range."""
        mv = _first(item, _MEASURED_VALUE)
        _, number, problem = self.numeric_value(item, mv)
        unit_code = self.coded(_first(mv, _UNITS)) if mv is not None else None
        unit = parse_unit(unit_code.scheme, unit_code.value) if unit_code else None
        if problem is None and number is not None and unit is not None and unit.dimension == "area":
            square_metres = convert(number, unit) / 10_000
            if 0.2 <= square_metres <= 3.5:
                self.doc.body_surface_area_m2 = round(square_metres, 9)

    def numeric_value(self, item: Item, mv: Item | None) -> tuple[str, float | None, str | None]:
        """``(raw text, number, problem)`` of a NUM item's Measured Value Sequence."""
        qualifier = self.coded(_first(item, _QUALIFIER)) or (self.coded(_first(mv, _QUALIFIER)) if mv else None)
        if mv is None:
            return "", None, f"no value ({qualifier.meaning})" if qualifier and qualifier.meaning else "no value"
        raw = self.text(mv, _NUMERIC_VALUE)
        if qualifier is not None:
            # CID 42 qualifies a value as not a number, infinite, out of range, unknown, a failed
            # measurement: whatever number is written beside it is not a measurement.
            return _printable(raw), None, f"the value is qualified as '{qualifier.meaning or qualifier.value}'"
        # The Floating Point Value, when present, is the full-precision value
        # that Numeric Value (a 16-character DS) rounds.
        number = first_float(mv.get(_FLOAT_VALUE), little=self.little)
        if number is None:
            if not raw:
                return "", None, "no value"
            try:
                number = float(raw)
            except ValueError:
                return _printable(raw), None, "the value is not a number"
        if not math.isfinite(number):
            return _printable(raw), None, "the value is not a finite number"
        return _printable(raw), number, None


_NO_CODE = Coded("", "", "")
#: Dimensions of flow and orifice properties: what a Flow Direction qualifies (a wall has none).
_FLOW_DIMENSIONS = frozenset({"velocity", "pressure", "area"})
_FORWARD_WORDS = ("antegrade", "anterograde", "forward")
_REVERSE_WORDS = ("regurg", "retrograde", "reverse", "backward", "shunt", "insufficien")


def _is_forward(direction: Coded) -> bool:
    """Whether a Flow Direction is the valve's forward flow.

    A standard code is forward only as CID 12221/12306's antegrade code. A private one (a cart's
    own "Forward") is read by its meaning, and only when the meaning says forward and nothing
    reverse: an unknown direction is not taken to be the forward jet.
    """
    if not is_private_scheme(direction.scheme):
        return direction.key == _FORWARD_FLOW
    return private_meaning_says(direction.meaning, _FORWARD_WORDS, _REVERSE_WORDS)


def _stage(mods: dict[CodeKey, Coded]) -> Coded | None:
    """The protocol stage among an item's modifiers, under any of its names."""
    for name in _STAGE_NAMES:
        if name in mods:
            return mods[name]
    return None


@functools.cache
def _excluded_methods(concept: Concept) -> frozenset[CodeKey]:
    return frozenset(code_key(m) for m in concept.excluded_methods)


def _sequence(item: Item | None, tag: int) -> list[Item]:
    if item is None:
        return []
    value = item.get(tag)
    return value if isinstance(value, list) else []


def _first(item: Item | None, tag: int) -> Item | None:
    items = _sequence(item, tag)
    return items[0] if items else None


def _children(item: Item) -> list[Item]:
    return _sequence(item, _CONTENT)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:32]


def _datetime(date: str, time: str) -> str:
    """Content Date and Time as one sortable string (``YYYYMMDDHHMMSS.ffffff``)."""
    if not date:
        return ""
    digits = "".join(ch for ch in time.split(".")[0] if ch.isdigit())[:6].ljust(6, "0")
    fraction = time.split(".")[1] if "." in time else ""
    return f"{date[:8]}{digits}.{fraction.ljust(6, '0')[:6]}"


def _quote(text: str) -> str:
    """A code value in a message: short, printable."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)[:16]
    return f"'{cleaned}'"


def _as_coded(code: Any) -> Coded:
    scheme, value = code_key(code)
    return Coded(scheme, value, code.meaning)


def _log_outcome(doc: MeasurementDocument) -> None:
    """One log line per SR that is not read cleanly (UIDs and reasons only)."""
    if doc.status == "unreadable":
        log.warning("measurement_sr.unreadable", sop_uid=doc.sop_instance_uid or None, reason=doc.reason)
    elif doc.status in ("not_echo", "not_sr"):
        log.info("measurement_sr.ignored", sop_uid=doc.sop_instance_uid, reason=doc.reason)
    elif doc.status == "no_measurements":
        log.warning(
            "measurement_sr.no_measurements", sop_uid=doc.sop_instance_uid, study_uid=doc.study_instance_uid,
            reason=doc.reason,
        )  # fmt: skip
    else:
        refused = [m for m in doc.measurements if m.problem]
        if refused:
            log.warning(
                "measurement_sr.values_refused", sop_uid=doc.sop_instance_uid, study_uid=doc.study_instance_uid,
                refused=len(refused), read=len(doc.measurements),
                reasons=sorted({f"{m.concept}: {m.problem}" for m in refused})[:10],
            )  # fmt: skip
