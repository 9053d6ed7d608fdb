"""The SR a study gets back: a TID 1500 Imaging Measurement Report.

One report per study and model set, in the *same* study as its source videos
(same Patient and Study attributes), in a new series, Modality SR. It is built
with highdicom (:class:`highdicom.sr.MeasurementReport`) and stored as a
Comprehensive SR by default, or as an Enhanced SR or Comprehensive 3D SR.

Per task the report holds one Measurement Group (TID 1501) with

- a tracking identifier and tracking UID;
- the finding (left ventricular hypertrophy; aortic stenosis, modified by
  severity "Severe" for the ``severe_as`` task) and its finding site;
- the algorithm identification (TID 4019: model name, version, parameters);
- a qualitative evaluation: the finding, Present or Absent by the threshold;
- the study-level probability (DCM 122157 "Probability", unit UCUM "1"),
  the number of videos used, and optionally one probability per video that
  references its video;
- one "Image View" text item per echocardiographic view used;
- a reference (DCM 121112 "Source of Measurement") to every video used;
- the model bundle's DeviceUID as the algorithm parameter ``device_uid=...``.

Observers: TID 1500 has its observation context (TID 1001) at document level
only; TID 1501 has none. The document therefore lists one device observer
(TID 1002, which may repeat) per model bundle: Device Observer UID = the
bundle's DeviceUID, Name = model name. A group is tied to its device by the
``device_uid`` algorithm parameter, and the same DeviceUID appears in the
Contributing Equipment Sequence item of that model. (Observer context items
inside a group would be outside TID 1501, and highdicom's reader then
mistakes them for qualitative evaluations.)

Codes, and where they were checked (pydicom 3.0 ``pydicom.sr.codedict`` and
its CID tables, ``pydicom.sr._cid_dict``):

- SCT 55827005 "Left ventricular hypertrophy": *not* in pydicom's
  dictionaries; the meaning is SNOMED CT's preferred term (FSN "Left
  ventricular hypertrophy (disorder)").
- SCT 60573004 "Aortic stenosis": ``codes.SCT.AorticStenosis``, the meaning
  used by CID 12248 "Cardiac Ultrasound Summary Codes" (pydicom also lists the
  FSN "Aortic valve stenosis (disorder)", which is in no CID).
- SCT 87878005 "Left ventricle" (CID 3010, 12305 family) and SCT 34202007
  "Aortic Valve" (CID 12305 "Basic Echo Anatomic Site").
- SCT 52101004 "Present" and SCT 272519000 "Absent": CID 240
  "Present-Absent". (SCT 2667000 "Absent" is not the code DICOM uses.)
- SCT 246112005 "Severity (attribute)" and SCT 24484000 "Severe".
- DCM 122157 "Probability" (no CID; a generic concept, unlike DCM 111047
  "Probability of cancer"); unit UCUM "1" "no units".
- DCM 111031 "Image View"; DCM 121106 "Comment"; SCT 40701008
  "Echocardiography" as the procedure reported.
- UMLS C0034375 "Qualitative Evaluations": the TID 1500 container concept;
  not in pydicom's dictionaries, taken from TID 1500 row 10.
- Contributing equipment purpose: DCM 109102 "Processing Equipment" (CID 7005,
  pydicom) *and* IHE AIR's ("Newcode1", 99IHE, "Processing Algorithm"), the
  placeholder code the IHE AI Results profile assigns (DICOM has no
  "Processing Algorithm" code in CID 7005 as of pydicom 3.0's tables).
- Codes echonode defines itself use the private coding scheme designator
  ``99ECHONODE``, declared in the Coding Scheme Identification Sequence
  together with ``99IHE``.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

import echonode
from echonode.dicomfile import RETIRED_US_STORAGE
from echonode.header import MAX_ELEMENT_BYTES, read_header
from echonode.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "COPIED_EXACTLY",
    "SERIES_DESCRIPTION",
    "SOP_CLASSES",
    "TASKS",
    "HeaderRefused",
    "SRDocument",
    "SourceInstance",
    "TaskFinding",
    "build_report",
    "read_study_header",
    "summarise_report",
]

#: Series Description of every SR echonode writes.
SERIES_DESCRIPTION = "echonode AI result - NOT FOR DIAGNOSTIC USE"

#: What :func:`build_report` returns.
SRDocument = hd.sr.ComprehensiveSR | hd.sr.EnhancedSR | hd.sr.Comprehensive3DSR

#: ``sop_class`` argument -> highdicom SR class.
SOP_CLASSES: dict[str, type[SRDocument]] = {
    "comprehensive": hd.sr.ComprehensiveSR,
    "enhanced": hd.sr.EnhancedSR,
    "comprehensive3d": hd.sr.Comprehensive3DSR,
}

ECHONODE_SCHEME = "99ECHONODE"
IHE_SCHEME = "99IHE"

# echonode's own concepts (private coding scheme 99ECHONODE).
NUMBER_OF_VIDEOS = Code("EN0001", ECHONODE_SCHEME, "Number of videos used")
VIDEO_PROBABILITY = Code("EN0002", ECHONODE_SCHEME, "Video-level probability")
NO_USABLE_VIDEO = Code("EN0003", ECHONODE_SCHEME, "No usable video")
SUPERSEDES = Code("EN0004", ECHONODE_SCHEME, "Supersedes report")

# IHE AI Results (AIR): purpose of reference of the AI algorithm's equipment.
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")

# Not in pydicom's dictionaries; TID 1500 row 10 and SNOMED CT (see above).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
LEFT_VENTRICULAR_HYPERTROPHY = Code(
    "55827005", "SCT", "Left ventricular hypertrophy"
)

PROBABILITY = codes.DCM.Probability
PROBABILITY_UNIT = codes.UCUM.NoUnits
VIDEOS_UNIT = Code("{videos}", "UCUM", "videos")
IMAGE_VIEW = codes.DCM.ImageView
COMMENT = codes.DCM.Comment
DISCLAIMER = (
    "Generated automatically by an AI algorithm (echonode). "
    "NOT FOR DIAGNOSTIC USE."
)

_CODING_SCHEMES = (
    hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=ECHONODE_SCHEME,
        name="echonode local codes",
        responsible_organization="echonode project",
    ),
    hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=IHE_SCHEME,
        name="IHE placeholder codes",
        responsible_organization="IHE",
    ),
)

# Patient and study attributes copied from the source header. Those that
# highdicom reads from its first evidence dataset must exist (Type 2: may be
# empty).
_REQUIRED_HEADER = ("StudyInstanceUID",)
#: The attributes that decide which patient and study a report belongs to: copied
#: exactly as received, never normalised (see :func:`build_report`).
COPIED_EXACTLY = ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber")
_TYPE2_HEADER = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class _TaskCodes:
    finding: Code
    site: Code
    severity: Code | None = None


#: Task name -> the codes that describe its finding.
TASKS: dict[str, _TaskCodes] = {
    "lvh": _TaskCodes(LEFT_VENTRICULAR_HYPERTROPHY, codes.SCT.LeftVentricle),
    "severe_as": _TaskCodes(
        codes.SCT.AorticStenosis, codes.SCT.AorticValve, codes.SCT.Severe
    ),
}


@dataclass(frozen=True)
class SourceInstance:
    """One video (instance) a finding was computed from.

    Attributes
    ----------
    sop_class_uid : str
        SOP Class UID of the instance.
    sop_instance_uid : str
        SOP Instance UID of the instance.
    series_instance_uid : str
        Series Instance UID of the instance (same study as the report).
    view : str or None
        Echocardiographic view label (e.g. ``"plax"``), when known.
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    view: str | None = None


@dataclass(frozen=True)
class TaskFinding:
    """A study-level result of one binary task, ready to be reported.

    Attributes
    ----------
    task : str
        Task name, a key of :data:`TASKS` (``"lvh"`` or ``"severe_as"``).
    probability : float
        Study-level probability of the finding, in [0, 1].
    threshold : float
        Decision threshold, in [0, 1]: the finding is reported Present when
        ``probability >= threshold``.
    model_name, model_version, device_uid : str
        From the model bundle; ``device_uid`` changes with every training run.
    parameters : dict of str to str
        Algorithm parameters (e.g. ``{"clip_frames": "16"}``), written as
        ``key=value`` TID 4019 Algorithm Parameters.
    sources : tuple of SourceInstance
        Every video the finding used.
    views_used : tuple of str
        The echocardiographic views used.
    n_videos : int
        Number of videos used.
    video_probabilities : dict of str to float
        Optional per-video probabilities, keyed by SOP Instance UID (each key
        must be one of ``sources``).
    """

    task: str
    probability: float
    threshold: float
    model_name: str
    model_version: str
    device_uid: str
    parameters: Mapping[str, str]
    sources: tuple[SourceInstance, ...]
    views_used: tuple[str, ...]
    n_videos: int
    video_probabilities: Mapping[str, float] = field(default_factory=dict)


def _check_unit_interval(value: Any, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ValueError(f'Argument "{name}" must be a number in [0, 1], got {value!r}.')


def _check_finding(finding: Any, i: int) -> None:
    name = f"findings[{i}]"
    if not isinstance(finding, TaskFinding):
        raise ValueError(f'Argument "{name}" must be a TaskFinding.')
    if finding.task not in TASKS:
        raise ValueError(
            f'Argument "{name}.task" must be one of {sorted(TASKS)}, '
            f"got {finding.task!r}."
        )
    _check_unit_interval(finding.probability, f"{name}.probability")
    _check_unit_interval(finding.threshold, f"{name}.threshold")
    for attr in ("model_name", "model_version", "device_uid"):
        if not isinstance(getattr(finding, attr), str) or not getattr(finding, attr):
            raise ValueError(f'Argument "{name}.{attr}" must be a non-empty string.')
    if len(finding.sources) == 0:
        raise ValueError(f'Argument "{name}.sources" must not be empty.')
    for j, src in enumerate(finding.sources):
        if not isinstance(src, SourceInstance):
            raise ValueError(f'Argument "{name}.sources[{j}]" must be a SourceInstance.')
    if (
        isinstance(finding.n_videos, bool)
        or not isinstance(finding.n_videos, int)
        or finding.n_videos < 1
    ):
        raise ValueError(f'Argument "{name}.n_videos" must be a positive integer.')
    source_uids = {s.sop_instance_uid for s in finding.sources}
    for uid, p in finding.video_probabilities.items():
        if uid not in source_uids:
            raise ValueError(
                f'Argument "{name}.video_probabilities" names {uid!r}, '
                "which is not one of its sources."
            )
        _check_unit_interval(p, f"{name}.video_probabilities[{uid!r}]")


class HeaderRefused(ValueError):
    """No SR can carry the study's identifying attributes unchanged.

    The message names the attribute, never its value.
    """


def read_study_header(path: str | os.PathLike[str]) -> Dataset:
    """The header of a stored object, as :func:`build_report` copies the study from it.

    Read bounded (:func:`echonode.header.read_header`): an element over
    :data:`echonode.header.MAX_ELEMENT_BYTES` (a cart's private raw data) is
    not read, so the worker holds one small header, not the object's. No
    attribute the report copies is that long when valid: one of
    :data:`COPIED_EXACTLY` that is refuses the report, since it cannot be
    copied exactly; any other is left out as :func:`build_report` empties an
    invalid value, and ``sr.header_unread`` (a warning) names it.

    Parameters
    ----------
    path : str or os.PathLike
        A stored object of the study.

    Returns
    -------
    pydicom.dataset.Dataset
        Its header without pixel data and without the unread elements.

    Raises
    ------
    HeaderRefused
        When an attribute of :data:`COPIED_EXACTLY` was too long to read.
    """
    header = read_header(path)
    unread = header.skipped_keywords()
    for keyword in COPIED_EXACTLY:
        if keyword in unread:
            raise HeaderRefused(
                f"{keyword} is over {MAX_ELEMENT_BYTES >> 20} MiB, so it was not read and cannot be "
                "copied into an SR"
            )
    public = [pydicom.datadict.keyword_for_tag(t) or str(BaseTag(t)) for t in sorted(header.skipped)
              if not BaseTag(t).is_private]
    if public:
        log.warning(
            "sr.header_unread",
            study_uid=str(header.dataset.get("StudyInstanceUID", "")),
            sop_instance_uid=str(header.dataset.get("SOPInstanceUID", "")),
            attributes=public,
        )
    return header.dataset


_TEMPORAL = {"DA": pydicom.valuerep.DA, "TM": pydicom.valuerep.TM, "DT": pydicom.valuerep.DT}
_TEXT_TYPES = (str, pydicom.valuerep.PersonName, pydicom.valuerep.DSfloat,
               pydicom.valuerep.DSdecimal, pydicom.valuerep.IS)
_PATIENT_SEX = frozenset({"M", "F", "O"})
_CHARSETS = frozenset(v.value for v in hd.SpecificCharacterSetValues)


class _ModuleProbe(hd.SOPClass):
    """An empty highdicom instance: what it copies from a header is what the SR gets."""

    def __init__(self) -> None:
        Dataset.__init__(self)  # none of SOPClass's own attributes


def _valid_value(elem: pydicom.DataElement) -> bool:
    """Whether a received element's value is valid for its VR and VM."""
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    if len(values) > 1 and pydicom.datadict.dictionary_VM(elem.tag) == "1":
        return False
    try:
        for v in values:
            v = str(v) if isinstance(v, _TEXT_TYPES) else v
            pydicom.valuerep.validate_value(elem.VR, v, pydicom.config.RAISE)
            if elem.VR in _TEMPORAL:
                _TEMPORAL[elem.VR](v)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _normalise_header(ds: Dataset) -> dict[str, str]:
    """Make the patient and study values highdicom copies from ``ds`` valid.

    A vendor's invalid value (``PatientSex = "MALE"``, ``PatientBirthDate =
    "1970-01-01"``, an over-long Study Description) would make highdicom
    refuse the report, or write one that fails validation, and leave the
    study without a report for good. PatientSex is upper-cased and stripped
    when that gives M, F or O; any other invalid value is emptied (Type 2:
    present and empty is valid; the PACS keeps its own copy). The attributes
    of :data:`COPIED_EXACTLY` are never touched.

    Returns
    -------
    dict of str to str
        Keyword -> ``"normalised"`` or ``"emptied"``, for each value changed.
    """
    probe = _ModuleProbe()
    probe.copy_patient_and_study_information(ds)
    changed: dict[str, str] = {}
    for keyword in (e.keyword for e in probe):
        elem = ds[keyword]
        if keyword in COPIED_EXACTLY or elem.VR == "SQ" or elem.value in (None, ""):
            continue
        if keyword == "PatientSex":
            sex = str(elem.value).strip().upper() if elem.VM == 1 else ""
            value = sex if sex in _PATIENT_SEX else None
            if value != elem.value:
                elem.value = value
                changed[keyword] = "normalised" if value else "emptied"
        elif not _valid_value(elem):
            elem.value = None
            changed[keyword] = "emptied"
    return changed


# Vendors' misspellings that pydicom corrects when it reads the names
# ("ISO-IR 100", "ISO IR 100", "ISO_2022_IR 100"), by its rule: the prefix
# replaced, the rest kept. Only a value pydicom corrects this way was decoded
# with the corrected set, so only such a value may be declared as it.
_ISO_IR_MISSPELT = re.compile(r"^ISO[^_]IR")
_ISO_2022_MISSPELT = re.compile(r"^(?=ISO.2022.IR.)(?!ISO 2022 IR )")


def _corrected_charset(term: str) -> str | None:
    """The defined term pydicom read a Specific Character Set value as; None when unknown."""
    term = term.strip()
    if term in _CHARSETS:
        return term
    if _ISO_IR_MISSPELT.match(term):
        patched = "ISO_IR" + term[6:]
    elif _ISO_2022_MISSPELT.match(term):
        patched = "ISO 2022 IR " + term[12:]
    else:
        return None
    return patched if patched in _CHARSETS else None


def _normalise_charset(ds: Dataset) -> bool:
    """Correct a misspelt Specific Character Set; refuse one DICOM does not define.

    The report's text is the header's values as pydicom decoded them, written
    back in the report's character set; an unknown set means the names may
    have been decoded wrongly, and the node never guesses a patient's name.

    Returns
    -------
    bool
        Whether the value was changed.
    """
    if "SpecificCharacterSet" not in ds:
        return False
    elem = ds["SpecificCharacterSet"]
    if elem.VM == 0 or (elem.VM == 1 and str(elem.value).strip() in ("", "ISO_IR 6")):
        # Present and empty, or "ISO_IR 6" (a name some vendors write for it,
        # which pydicom reads as such): the default repertoire, as if absent
        # (highdicom refuses both values).
        del ds["SpecificCharacterSet"]
        return False
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    corrected = []
    for i, value in enumerate(values):
        value = "" if value is None else str(value)
        if value == "" and i == 0:
            # Value 1 empty with code extensions is the default repertoire,
            # which highdicom accepts only by its name.
            corrected.append("ISO 2022 IR 6")
            continue
        term = _corrected_charset(value)
        if term is None:
            raise HeaderRefused(
                "SpecificCharacterSet names a character set DICOM does not define, so "
                "the patient's name cannot be read for certain and no SR is built"
            )
        corrected.append(term)
    if corrected == [("" if v is None else str(v)) for v in values]:
        return False
    elem.value = corrected if len(corrected) > 1 else corrected[0]
    return True


def _check_copied_exactly(header: Dataset) -> None:
    """Refuse the identifying values highdicom refuses (it takes one value of each)."""
    for keyword in ("PatientName", "StudyInstanceUID"):
        vm = header.data_element(keyword).VM if keyword in header else 0
        if vm > 1:
            raise HeaderRefused(
                f"{keyword} has {vm} values where DICOM allows one; it identifies the "
                "study and is copied unchanged, so no SR can be built"
            )


def _module_class(sop_class_uid: str) -> str:
    """The class whose modules highdicom copies for ``sop_class_uid``.

    highdicom copies the Patient and Study modules by the IOD of its
    evidence's class and knows only current classes: a retired US class
    (:data:`~echonode.dicomfile.RETIRED_US_STORAGE`) is read as its current
    one. The report still references each object by its own class
    (:func:`_restore_evidence_classes`).
    """
    uid = str(sop_class_uid)
    return RETIRED_US_STORAGE[uid][1] if uid in RETIRED_US_STORAGE else uid


def _restore_evidence_classes(sr: Dataset, sources: Sequence[SourceInstance]) -> None:
    """Reference each evidence object by its own SOP class, retired or not."""
    own = {s.sop_instance_uid: s.sop_class_uid for s in sources if _module_class(s.sop_class_uid) != s.sop_class_uid}
    if not own:
        return
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for ref in series.get("ReferencedSOPSequence", []):
                    if ref.ReferencedSOPInstanceUID in own:
                        ref.ReferencedSOPClassUID = own[ref.ReferencedSOPInstanceUID]


def _evidence(
    header: Dataset, sources: Sequence[SourceInstance]
) -> tuple[list[Dataset], dict[str, str]]:
    """Minimal evidence datasets (the header's public attributes, per source)
    and what :func:`_normalise_header` changed in them."""
    base = Dataset()
    for elem in header:
        if elem.tag.is_private or elem.tag.group >= 0x7FE0:
            continue
        base.add(copy.deepcopy(elem))
    for keyword in _TYPE2_HEADER:
        if keyword not in base:
            setattr(base, keyword, None)
    if sources:
        # highdicom copies the modules of its first evidence's SOP class.
        base.SOPClassUID = sources[0].sop_class_uid
    if "SOPClassUID" in base:
        base.SOPClassUID = _module_class(base.SOPClassUID)
    changed = _normalise_header(base)
    if _normalise_charset(base):
        changed["SpecificCharacterSet"] = "normalised"
    if not sources:
        return [base], changed
    evidence = []
    for src in sources:
        ds = copy.deepcopy(base)
        ds.SOPClassUID = _module_class(src.sop_class_uid)
        ds.SOPInstanceUID = src.sop_instance_uid
        ds.SeriesInstanceUID = src.series_instance_uid
        evidence.append(ds)
    return evidence, changed


def _device_observer(finding: TaskFinding, manufacturer: str) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=finding.device_uid,
            name=finding.model_name,
            manufacturer_name=manufacturer,
            model_name=finding.model_name,
        ),
    )


def _severity_modifier(severity: Code) -> hd.sr.ContentSequence:
    return hd.sr.ContentSequence([
        hd.sr.CodeContentItem(
            name=codes.SCT.Severity,
            value=severity,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    ])


def _measurement_group(
    finding: TaskFinding,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    task = TASKS[finding.task]
    parameters = dict(finding.parameters)
    parameters.setdefault("threshold", f"{finding.threshold:g}")
    parameters["device_uid"] = finding.device_uid
    algorithm = hd.sr.AlgorithmIdentification(
        name=finding.model_name,
        version=finding.model_version,
        parameters=[f"{k}={v}" for k, v in parameters.items()],
    )
    present = finding.probability >= finding.threshold
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY, value=float(finding.probability), unit=PROBABILITY_UNIT
        ),
        hd.sr.Measurement(
            name=NUMBER_OF_VIDEOS, value=int(finding.n_videos), unit=VIDEOS_UNIT
        ),
    ]
    by_uid = {s.sop_instance_uid: s for s in finding.sources}
    for uid, p in finding.video_probabilities.items():
        src = by_uid[uid]
        measurements.append(
            hd.sr.Measurement(
                name=VIDEO_PROBABILITY,
                value=float(p),
                unit=PROBABILITY_UNIT,
                referenced_images=[
                    hd.sr.SourceImageForMeasurement(src.sop_class_uid, uid)
                ],
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"echonode {finding.task}"
        ),
        finding_type=task.finding,
        finding_sites=[hd.sr.FindingSite(task.site)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=task.finding,
                value=codes.SCT.Present if present else codes.SCT.Absent,
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(s.sop_class_uid, s.sop_instance_uid)
            for s in finding.sources
        ],
    )
    items = group[0].ContentSequence
    if task.severity is not None:
        # The finding and its evaluation are about the *severe* form.
        for item in items:
            if item.ValueType == "CODE" and item.name in (codes.DCM.Finding, task.finding):
                item.ContentSequence = _severity_modifier(task.severity)
    for view in finding.views_used:
        items.append(
            hd.sr.TextContentItem(
                name=IMAGE_VIEW,
                value=str(view),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _observation_context(
    findings: Sequence[TaskFinding], manufacturer: str, software_version: str
) -> hd.sr.ObservationContext:
    devices: dict[str, TaskFinding] = {}
    for f in findings:
        devices.setdefault(f.device_uid, f)
    if not devices:
        node_uid = generate_uid(
            prefix=None, entropy_srcs=["echonode", manufacturer, software_version]
        )
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=node_uid,
                name="echonode",
                manufacturer_name=manufacturer,
                model_name="echonode",
            ),
        )
        return hd.sr.ObservationContext(observer_device_context=observer)
    first, *others = devices.values()
    context = hd.sr.ObservationContext(
        observer_device_context=_device_observer(first, manufacturer)
    )
    for f in others:  # TID 1002 may repeat: one observer per device
        context.extend(_device_observer(f, manufacturer))
    return context


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _contributing_equipment(
    findings: Sequence[TaskFinding],
    manufacturer: str,
    software_version: str,
    institution_name: str | None,
) -> list[hd.ContributingEquipment]:
    now = datetime.datetime.now()
    node = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name="echonode",
        software_versions=software_version,
        institution_name=institution_name,
        contribution_datetime=now,
        contribution_description="echonode created this report",
    )
    items = [node]
    seen: set[tuple[str, str, str]] = set()
    for f in findings:
        key = (f.model_name, f.model_version, f.device_uid)
        if key in seen:
            continue
        seen.add(key)
        item = hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,  # replaced below
            manufacturer_model_name=f.model_name,
            software_versions=f.model_version,
            institution_name=institution_name,
            contribution_datetime=now,
            contribution_description=(
                f"AI model for task {f.task}; NOT FOR DIAGNOSTIC USE"
            ),
        )
        # IHE AIR: the algorithm's item has purpose "Processing Algorithm".
        # The sequence takes exactly one item (dciodvfy: "1 Required by Module
        # definition"), and highdicom accepts CID 7005 codes only.
        item.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)
        ]
        item.DeviceUID = f.device_uid
        items.append(item)
    return items


def build_report(
    study_header: Dataset,
    findings: Sequence[TaskFinding],
    *,
    sop_class: str = "comprehensive",
    series_number: int = 9001,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manufacturer: str = "echonode",
    software_version: str = echonode.__version__,
    institution_name: str | None = None,
    supersedes: tuple[str, str, str] | None = None,
    no_usable_video_reason: str | None = None,
) -> SRDocument:
    """Build the TID 1500 SR that goes back into a study.

    Parameters
    ----------
    study_header : pydicom.dataset.Dataset
        Header of an instance of the study (pixel data not needed): its
        Patient and Study attributes are copied into the report.
    findings : sequence of TaskFinding
        One finding per task, each a Measurement Group. May be empty only
        together with ``no_usable_video_reason``.
    sop_class : {"comprehensive", "enhanced", "comprehensive3d"}
        SR storage SOP class.
    series_number, instance_number : int
        Series Number and Instance Number of the report.
    series_instance_uid, sop_instance_uid : str, optional
        UIDs of the report; new ones when not given.
    manufacturer : str
        Manufacturer of the report (General Equipment), of the device
        observers and of the contributing equipment items.
    software_version : str
        echonode's version (General Equipment Software Versions).
    institution_name : str, optional
        Institution Name of the report and its contributing equipment.
    supersedes : tuple of str, optional
        ``(sop_class_uid, sop_instance_uid, series_instance_uid)`` of an
        earlier echonode SR of the same study that this one replaces: listed
        in the Predecessor Documents Sequence and named in a text item.
    no_usable_video_reason : str, optional
        Why the study had no usable video; gives a report without measurement
        groups whose Qualitative Evaluations container says so. Only with an
        empty ``findings``.

    Returns
    -------
    highdicom.sr.ComprehensiveSR or highdicom.sr.EnhancedSR or highdicom.sr.Comprehensive3DSR
        The report, a :class:`pydicom.dataset.Dataset`; write it with
        ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    HeaderRefused
        When an attribute of :data:`COPIED_EXACTLY` has a value highdicom
        refuses (PatientName or StudyInstanceUID with several values), or
        when SpecificCharacterSet names a character set DICOM does not
        define (a misspelling pydicom corrects, such as ``"ISO-IR 100"``, is
        corrected instead); the message names the attribute, never its value.
    ValueError
        When an argument is invalid; the message names it.

    Notes
    -----
    The report carries the header's patient and study attributes as
    highdicom copies them (the Patient, General Study, Patient Study and
    clinical trial modules). Those of :data:`COPIED_EXACTLY` are copied
    exactly as received: they decide which patient and study the PACS files
    the report under. Any other value that is invalid for its VR or VM (a
    vendor's PatientSex ``"MALE"``, a birth date ``"1970-01-01"``, an
    over-long Study Description, a PatientAge ``"45"``) is normalised:
    PatientSex is stripped and upper-cased when that gives M, F or O, and
    anything else invalid is emptied. The change is logged as
    ``sr.header_normalised`` with the UIDs and the attribute names, never a
    value.
    """
    if not isinstance(study_header, Dataset):
        raise ValueError('Argument "study_header" must be a pydicom Dataset.')
    for keyword in _REQUIRED_HEADER:
        if not study_header.get(keyword):
            raise ValueError(f'Argument "study_header" has no {keyword}.')
    if sop_class not in SOP_CLASSES:
        raise ValueError(
            f'Argument "sop_class" must be one of {sorted(SOP_CLASSES)}, '
            f"got {sop_class!r}."
        )
    if isinstance(findings, (str, bytes)) or not isinstance(findings, Sequence):
        raise ValueError('Argument "findings" must be a sequence of TaskFinding.')
    findings = list(findings)
    if no_usable_video_reason is not None:
        if not isinstance(no_usable_video_reason, str) or not no_usable_video_reason.strip():
            raise ValueError('Argument "no_usable_video_reason" must be a non-empty string.')
        if findings:
            raise ValueError(
                'Argument "no_usable_video_reason" must be None when "findings" '
                "is not empty."
            )
    elif not findings:
        raise ValueError(
            'Argument "findings" must not be empty unless '
            '"no_usable_video_reason" is given.'
        )
    for i, finding in enumerate(findings):
        _check_finding(finding, i)
    tasks = [f.task for f in findings]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f'Argument "findings" names a task twice: {tasks}.')
    if supersedes is not None:
        if (
            not isinstance(supersedes, tuple)
            or len(supersedes) != 3
            or not all(isinstance(u, str) and u for u in supersedes)
        ):
            raise ValueError(
                'Argument "supersedes" must be a tuple '
                "(sop_class_uid, sop_instance_uid, series_instance_uid)."
            )
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'Argument "{name}" must be a positive integer.')

    # All sources, in order, each once.
    sources: dict[str, SourceInstance] = {}
    for f in findings:
        for s in f.sources:
            sources.setdefault(s.sop_instance_uid, s)
    groups = [_measurement_group(f) for f in findings]
    evaluations: list[hd.sr.ContentItem] = [_text(COMMENT, DISCLAIMER)]
    if no_usable_video_reason is not None:
        evaluations.append(_text(NO_USABLE_VIDEO, no_usable_video_reason))
    if supersedes is not None:
        evaluations.append(
            _text(
                SUPERSEDES,
                f"This report supersedes the earlier echonode report "
                f"{supersedes[1]} (series {supersedes[2]}).",
            )
        )
    evaluations_container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations_container.ContentSequence = hd.sr.ContentSequence(evaluations)

    observation_context = _observation_context(findings, manufacturer, software_version)
    if groups:
        report = hd.sr.MeasurementReport(
            observation_context=observation_context,
            procedure_reported=codes.SCT.Echocardiography,
            imaging_measurements=groups,
        )
        root = report[0]
    else:
        # highdicom's MeasurementReport insists on a measurement group;
        # TID 1500 needs only one of rows 6, 8, 10: build the root ourselves.
        root = hd.sr.ContainerContentItem(
            name=codes.cid7021.ImagingMeasurementReport, template_id="1500"
        )
        root.ContentSequence = hd.sr.ContentSequence()
        root.ContentSequence.extend(
            hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE)
        )
        root.ContentSequence.extend(observation_context)
        root.ContentSequence.append(
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=codes.SCT.Echocardiography,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )
    root.ContentSequence.append(evaluations_container)

    previous_versions = None
    if supersedes is not None:
        pre = Dataset()
        pre.SOPClassUID, pre.SOPInstanceUID, pre.SeriesInstanceUID = supersedes
        pre.StudyInstanceUID = study_header.StudyInstanceUID
        previous_versions = [pre]

    _check_copied_exactly(study_header)
    evidence, changed = _evidence(study_header, list(sources.values()))
    if changed:
        # Attribute names only: the values are patient data.
        log.warning(
            "sr.header_normalised",
            study_uid=str(study_header.StudyInstanceUID),
            sop_instance_uid=str(study_header.get("SOPInstanceUID", "")),
            attributes=changed,
        )
    sr = SOP_CLASSES[sop_class](
        evidence=evidence,
        content=root,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=previous_versions,
        performed_procedure_codes=[codes.SCT.Echocardiography],
        record_evidence=bool(sources),
        contributing_equipment=_contributing_equipment(
            findings, manufacturer, software_version, institution_name
        ),
        coding_schemes=list(_CODING_SCHEMES),
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name="echonode",
        software_versions=software_version,
    )
    _restore_evidence_classes(sr, list(sources.values()))
    if not sources:
        # Nothing was used: the study header is no evidence of this report.
        for keyword in ("CurrentRequestedProcedureEvidenceSequence",
                        "PertinentOtherEvidenceSequence"):
            if keyword in sr:
                delattr(sr, keyword)
    return sr


# --------------------------------------------------------------------------
# Reading a report back


def _code_key(item: Dataset) -> tuple[str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator))


def _key(code: Code) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def _name_key(item: Dataset) -> tuple[str, str]:
    return _code_key(item.ConceptNameCodeSequence[0])


def _num(item: Dataset) -> float:
    mv = item.MeasuredValueSequence[0]
    if "FloatingPointValue" in mv:
        return float(mv.FloatingPointValue)
    return float(mv.NumericValue)


def _image_ref(item: Dataset) -> str:
    return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _summarise_group(group: Dataset) -> dict[str, Any]:
    tasks_by_finding = {_key(t.finding): name for name, t in TASKS.items()}
    out: dict[str, Any] = {
        "task": None, "finding": None, "finding_code": None, "severity": None,
        "finding_site": None, "present": None, "probability": None,
        "threshold": None, "model_name": None, "model_version": None,
        "parameters": {}, "device_uid": None, "tracking_uid": None,
        "views_used": [], "n_videos": None, "videos": [],
        "video_probabilities": {},
    }
    finding_key: tuple[str, str] | None = None
    for item in group.get("ContentSequence", []):
        name = _name_key(item)
        vt = item.ValueType
        if vt == "CODE" and name == _key(codes.DCM.Finding):
            concept = item.ConceptCodeSequence[0]
            finding_key = _code_key(concept)
            out["finding"] = str(concept.CodeMeaning)
            out["finding_code"] = f"{concept.CodingSchemeDesignator} {concept.CodeValue}"
            out["task"] = tasks_by_finding.get(finding_key)
            for mod in item.get("ContentSequence", []):
                if _name_key(mod) == _key(codes.SCT.Severity):
                    out["severity"] = str(mod.ConceptCodeSequence[0].CodeMeaning)
        elif vt == "CODE" and name == _key(codes.SCT.FindingSite):
            out["finding_site"] = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif vt == "CODE" and finding_key is not None and name == finding_key:
            value = _code_key(item.ConceptCodeSequence[0])
            out["present"] = {
                _key(codes.SCT.Present): True, _key(codes.SCT.Absent): False
            }.get(value)
        elif vt == "TEXT" and name == _key(codes.DCM.AlgorithmName):
            out["model_name"] = str(item.TextValue)
        elif vt == "TEXT" and name == _key(codes.DCM.AlgorithmVersion):
            out["model_version"] = str(item.TextValue)
        elif vt == "TEXT" and name == _key(codes.DCM.AlgorithmParameters):
            k, _, v = str(item.TextValue).partition("=")
            out["parameters"][k] = v
        elif vt == "UIDREF" and name == _key(codes.DCM.DeviceObserverUID):
            out["device_uid"] = str(item.UID)
        elif vt == "UIDREF" and name == _key(codes.DCM.TrackingUniqueIdentifier):
            out["tracking_uid"] = str(item.UID)
        elif vt == "TEXT" and name == _key(IMAGE_VIEW):
            out["views_used"].append(str(item.TextValue))
        elif vt == "NUM" and name == _key(PROBABILITY):
            out["probability"] = _num(item)
        elif vt == "NUM" and name == _key(NUMBER_OF_VIDEOS):
            out["n_videos"] = int(round(_num(item)))
        elif vt == "NUM" and name == _key(VIDEO_PROBABILITY):
            for ref in item.get("ContentSequence", []):
                if ref.ValueType == "IMAGE":
                    out["video_probabilities"][_image_ref(ref)] = _num(item)
        elif vt == "IMAGE":
            out["videos"].append(_image_ref(item))
    device_uid = out["parameters"].pop("device_uid", None)
    if device_uid:
        out["device_uid"] = device_uid
    if "threshold" in out["parameters"]:
        out["threshold"] = float(out["parameters"]["threshold"])
    return out


def summarise_report(ds: Dataset | str | os.PathLike[str]) -> dict[str, Any]:
    """Read an echonode SR back into a plain dict.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or path-like
        The report, or the path of its file.

    Returns
    -------
    dict
        ``study_uid``, ``series_uid``, ``sop_uid``, ``sop_class_uid``,
        ``modality``, ``series_description``, ``evidence`` (SOP Instance UIDs
        in the Current Requested Procedure Evidence Sequence),
        ``predecessors`` (SOP Instance UIDs), ``device_observers`` (UIDs at
        document level), ``no_usable_video_reason``, ``supersedes_text`` and
        ``findings``: one dict per measurement group with ``task``,
        ``finding``, ``finding_code``, ``severity``, ``finding_site``,
        ``present``, ``probability``, ``threshold``, ``model_name``,
        ``model_version``, ``parameters``, ``device_uid``, ``tracking_uid``,
        ``views_used``, ``n_videos``, ``videos`` and ``video_probabilities``.
        A group's ``device_uid`` falls back to the document's observer when
        there is exactly one.

    Raises
    ------
    ValueError
        When ``ds`` is not a TID 1500 SR.
    """
    if not isinstance(ds, Dataset):
        ds = pydicom.dcmread(ds)
    templates = ds.get("ContentTemplateSequence", [])
    if (
        "ContentSequence" not in ds
        or not templates
        or str(templates[0].TemplateIdentifier) != "1500"
    ):
        raise ValueError('Argument "ds" is not a TID 1500 structured report.')

    def uids(keyword: str) -> list[str]:
        return [
            str(inst.ReferencedSOPInstanceUID)
            for study in ds.get(keyword, [])
            for series in study.ReferencedSeriesSequence
            for inst in series.ReferencedSOPSequence
        ]

    root_observers = [
        str(item.UID)
        for item in ds.ContentSequence
        if item.ValueType == "UIDREF"
        and _name_key(item) == _key(codes.DCM.DeviceObserverUID)
    ]
    findings = []
    no_usable = None
    supersedes_text = None
    for item in ds.ContentSequence:
        name = _name_key(item)
        if name == _key(codes.DCM.ImagingMeasurements):
            for group in item.get("ContentSequence", []):
                if _name_key(group) == _key(codes.DCM.MeasurementGroup):
                    summary = _summarise_group(group)
                    if summary["device_uid"] is None and len(root_observers) == 1:
                        summary["device_uid"] = root_observers[0]
                    findings.append(summary)
        elif name == _key(QUALITATIVE_EVALUATIONS):
            for sub in item.get("ContentSequence", []):
                if sub.ValueType != "TEXT":
                    continue
                if _name_key(sub) == _key(NO_USABLE_VIDEO):
                    no_usable = str(sub.TextValue)
                elif _name_key(sub) == _key(SUPERSEDES):
                    supersedes_text = str(sub.TextValue)
    return {
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "sop_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "modality": str(ds.Modality),
        "series_description": str(ds.get("SeriesDescription", "")),
        "evidence": uids("CurrentRequestedProcedureEvidenceSequence"),
        "predecessors": uids("PredecessorDocumentsSequence"),
        "device_observers": root_observers,
        "no_usable_video_reason": no_usable,
        "supersedes_text": supersedes_text,
        "findings": findings,
    }
