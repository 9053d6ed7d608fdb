"""The study header a report copies: read bounded, repaired, identity kept exact.

The report carries the source header's patient and study attributes (the
Patient, General Study, Patient Study and clinical trial modules, as
highdicom copies them). Those of :data:`COPIED_EXACTLY` decide which patient
and study the PACS files the report under: they are copied exactly as
received, or the report is refused (:class:`HeaderRefused`). Any other value
that is invalid for its VR or VM is normalised or emptied
(:func:`evidence_datasets`), and a misspelt Specific Character Set is
corrected, never guessed.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from echonode.dicomfile import RETIRED_US_STORAGE
from echonode.header import MAX_ELEMENT_BYTES, read_header
from echonode.ops.logs import get_logger
from echonode.report.findings import SourceInstance

log = get_logger(__name__)

__all__ = [
    "COPIED_EXACTLY",
    "HeaderRefused",
    "check_copied_exactly",
    "evidence_datasets",
    "read_study_header",
    "restore_evidence_classes",
]

#: The attributes that decide which patient and study a report belongs to: copied
#: exactly as received, never normalised.
COPIED_EXACTLY = ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber")
# Patient and study attributes that highdicom reads from its first evidence
# dataset: they must exist (Type 2: may be empty).
_TYPE2_HEADER = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName",
)


class HeaderRefused(ValueError):
    """No SR can carry the study's identifying attributes unchanged.

    The message names the attribute, never its value.
    """


def read_study_header(path: str | os.PathLike[str]) -> Dataset:
    """The header of a stored object, as :func:`~echonode.report.build.build_report` copies the study from it.

    Read bounded (:func:`echonode.header.read_header`): an element over
    :data:`echonode.header.MAX_ELEMENT_BYTES` (a cart's private raw data) is
    not read, so the worker holds one small header, not the object's. No
    attribute the report copies is that long when valid: one of
    :data:`COPIED_EXACTLY` that is refuses the report, since it cannot be
    copied exactly; any other is left out as the report empties an
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


def check_copied_exactly(header: Dataset) -> None:
    """Refuse the identifying values highdicom refuses (it takes one value of each).

    Parameters
    ----------
    header : pydicom.dataset.Dataset
        The study header.

    Raises
    ------
    HeaderRefused
        When PatientName or StudyInstanceUID has several values; the message
        names the attribute, never its value.
    """
    for keyword in ("PatientName", "StudyInstanceUID"):
        vm = header[keyword].VM if keyword in header else 0
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
    (:func:`restore_evidence_classes`).
    """
    uid = str(sop_class_uid)
    return RETIRED_US_STORAGE[uid][1] if uid in RETIRED_US_STORAGE else uid


def restore_evidence_classes(sr: Dataset, sources: Sequence[SourceInstance]) -> None:
    """Reference each evidence object by its own SOP class, retired or not.

    Parameters
    ----------
    sr : pydicom.dataset.Dataset
        The built report; its evidence sequences are changed in place.
    sources : sequence of SourceInstance
        The objects it references, with the SOP class each was received as.
    """
    own = {s.sop_instance_uid: s.sop_class_uid for s in sources if _module_class(s.sop_class_uid) != s.sop_class_uid}
    if not own:
        return
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for ref in series.get("ReferencedSOPSequence", []):
                    if ref.ReferencedSOPInstanceUID in own:
                        ref.ReferencedSOPClassUID = own[ref.ReferencedSOPInstanceUID]


def evidence_datasets(
    header: Dataset, sources: Sequence[SourceInstance]
) -> tuple[list[Dataset], dict[str, str]]:
    """The evidence datasets highdicom builds the report from, repaired.

    Each holds the header's public attributes (no private element, no pixel
    data) under one source's UIDs; their patient and study values are made
    valid by :func:`_normalise_header` and :func:`_normalise_charset`.

    Parameters
    ----------
    header : pydicom.dataset.Dataset
        The study header.
    sources : sequence of SourceInstance
        The objects the report references; none gives one dataset, the
        header's own.

    Returns
    -------
    list of pydicom.dataset.Dataset
        One dataset per source (at least one).
    dict of str to str
        Keyword -> ``"normalised"`` or ``"emptied"``, for each value changed.

    Raises
    ------
    HeaderRefused
        When SpecificCharacterSet names a character set DICOM does not define.
    """
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


