"""Reading a report back: :func:`summarise_report`, an echonode SR as a plain dict.

Used by the demo, ``echonode infer``, the tests and whatever rebuilds the
journal from the SRs on disk. It needs no highdicom: it walks the content
tree by concept name, as the codes of :mod:`echonode.report.codes` say.
"""

from __future__ import annotations

import os
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from echonode.report.codes import (
    FINDING_TEXT,
    IMAGE_VIEW,
    NO_USABLE_VIDEO,
    NOT_ASSESSED_REASONS,
    NUMBER_OF_VIDEOS,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    REASON_NOT_ASSESSED,
    SUPERSEDES,
    TASKS,
    UNDETERMINED,
    VIDEO_PROBABILITY,
    VIEWS,
)

__all__ = ["summarise_report"]

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


_TASKS_BY_FINDING = {_key(t.finding): name for name, t in TASKS.items()}
_LABELS_BY_VIEW = {_key(v.code): label for label, v in VIEWS.items()}
_REASONS_BY_CODE = {_key(code): reason for reason, code in NOT_ASSESSED_REASONS.items()}
_EVALUATIONS = {_key(codes.SCT.Present): True, _key(codes.SCT.Absent): False, _key(UNDETERMINED): None}


def _add_view(out: dict[str, Any], item: Dataset) -> str:
    """Record an Image View item (CODE from CID 12226, or TEXT) once; its view label."""
    if item.ValueType == "CODE":
        view = item.ConceptCodeSequence[0]
        label = _LABELS_BY_VIEW.get(_code_key(view), str(view.CodeMeaning))
        code = f"{view.CodingSchemeDesignator} {view.CodeValue}"
        if code not in out["view_codes"]:
            out["view_codes"].append(code)
    else:
        label = str(item.TextValue)
    if label not in out["views_used"]:
        out["views_used"].append(label)
    return label


def _summarise_group(group: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": None, "finding": None, "finding_code": None, "severity": None,
        "finding_site": None, "evaluation": None, "present": None, "assessed": None,
        "not_assessed_reason": None, "probability": None,
        "threshold": None, "model_name": None, "model_version": None,
        "parameters": {}, "device_uid": None, "tracking_uid": None,
        "views_used": [], "view_codes": [], "n_videos": None, "videos": [],
        "video_views": {}, "video_probabilities": {},
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
            out["task"] = _TASKS_BY_FINDING.get(finding_key)
            for mod in item.get("ContentSequence", []):
                if _name_key(mod) == _key(codes.SCT.Severity):
                    out["severity"] = str(mod.ConceptCodeSequence[0].CodeMeaning)
        elif vt == "CODE" and name == _key(codes.SCT.FindingSite):
            out["finding_site"] = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif vt == "CODE" and finding_key is not None and name == finding_key:
            value = item.ConceptCodeSequence[0]
            out["evaluation"] = str(value.CodeMeaning)
            out["present"] = _EVALUATIONS.get(_code_key(value))
            out["assessed"] = _code_key(value) in _EVALUATIONS and _code_key(value) != _key(UNDETERMINED)
        elif vt == "CODE" and name == _key(REASON_NOT_ASSESSED):
            out["not_assessed_reason"] = _REASONS_BY_CODE.get(_code_key(item.ConceptCodeSequence[0]))
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
        elif name == _key(IMAGE_VIEW):  # a group-level view: reports of earlier builds
            _add_view(out, item)
        elif vt == "NUM" and name == _key(PROBABILITY):
            out["probability"] = _num(item)
        elif vt == "NUM" and name == _key(NUMBER_OF_VIDEOS):
            out["n_videos"] = round(_num(item))
        elif vt == "NUM" and name == _key(VIDEO_PROBABILITY):
            for ref in item.get("ContentSequence", []):
                if ref.ValueType == "IMAGE":
                    out["video_probabilities"][_image_ref(ref)] = _num(item)
        elif vt == "IMAGE":
            uid = _image_ref(item)
            out["videos"].append(uid)
            for context in item.get("ContentSequence", []):
                if _name_key(context) == _key(IMAGE_VIEW):
                    out["video_views"][uid] = _add_view(out, context)
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
        document level), ``summary_lines`` (the plain-language line of each
        finding, in order), ``no_usable_video_reason``, ``supersedes_text``
        and ``findings``: one dict per measurement group with ``task``,
        ``finding``, ``finding_code``, ``severity``, ``finding_site``,
        ``evaluation`` (the evaluation's meaning: ``"Present"``,
        ``"Absent"`` or ``"Undetermined"``), ``present`` (True, False, or
        None when not assessed), ``assessed``, ``not_assessed_reason`` (a
        key of :data:`~echonode.report.codes.NOT_ASSESSED_REASONS`, or
        None), ``probability``, ``threshold``, ``model_name``,
        ``model_version``, ``parameters``, ``device_uid``, ``tracking_uid``,
        ``views_used`` (view labels, each once: ``"plax"`` for a coded
        parasternal long axis), ``view_codes`` (``"SCT 399139001"``),
        ``n_videos``, ``videos``, ``video_views`` (SOP Instance UID -> view
        label) and ``video_probabilities``. A group's ``device_uid`` falls back to
        the document's observer when there is exactly one.

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
    lines = []
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
                if _name_key(sub) == _key(FINDING_TEXT):
                    lines.append(str(sub.TextValue))
                elif _name_key(sub) == _key(NO_USABLE_VIDEO):
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
        "summary_lines": lines,
        "no_usable_video_reason": no_usable,
        "supersedes_text": supersedes_text,
        "findings": findings,
    }
