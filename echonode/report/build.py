"""Building the report: :func:`build_report`, a TID 1500 document made with highdicom.

One report per study and model set, in the *same* study as its source videos
(same Patient and Study attributes), in a new series, Modality SR. It is built
with highdicom (:class:`highdicom.sr.MeasurementReport`) and stored as a
Comprehensive 3D SR by default (the IHE AI Results IOD), or as a
Comprehensive SR or Enhanced SR; :mod:`echonode.report.sop` gives the same
report in another of these classes for a PACS that refuses its own.

What a reader sees first. TID 1500's order is not significant (dcmtk's
TID 1500 class, which follows PS3.16, declares it so), so the Qualitative Evaluations container (TID
1500 row 10, TEXT items allowed) is the root's *first* item: one
plain-language line per finding (DCM 121071 "Finding", TEXT;
:mod:`echonode.report.summary`), then the disclaimer, and, where they
apply, why nothing was used and which report this one supersedes. A viewer
that renders the tree in order (dsr2html, most PACS viewers) shows the
verdicts right under the document title, ahead of the observer context and
the measurement groups. Every container's content is SEPARATE, not
CONTINUOUS, so that a renderer names each item ("Probability: 0.428")
instead of running the values together as one sentence.

Per task the report holds one Measurement Group (TID 1501) with

- a tracking identifier and tracking UID;
- the finding (left ventricular hypertrophy; aortic stenosis, modified by
  severity "Severe" for the ``severe_as`` task) and its finding site;
- the algorithm identification (TID 4019: model name, version, parameters);
- a qualitative evaluation of the finding from CID 240 "Present-Absent":
  Present or Absent by the threshold, or Undetermined for a task the models
  could not assess, with a second evaluation "Reason not assessed" (No
  usable video; No video of the required view; No video the model could
  measure). One report may hold both: each installed task is either a
  finding or not assessed, never silent;
- for an assessed task, the study-level probability (DCM 122157
  "Probability", unit UCUM "1", 3 decimals, rounded on its side of the
  threshold), the number of videos used (an integer), and optionally one
  probability per video that references its video;
- a reference (DCM 121112 "Source of Measurement") to every video used,
  with its echocardiographic view as acquisition context ("Image View"):
  CODE from CID 12226 "Echocardiography Image View" for the labels
  :data:`~echonode.report.codes.VIEWS` knows (``plax`` is SCT 399139001
  "Parasternal long axis"), TEXT with the label for any other;
- the model bundle's DeviceUID as the algorithm parameter ``device_uid=...``.

Observers: TID 1500 has its observation context (TID 1001) at document level
only; TID 1501 has none. The document therefore lists one device observer
(TID 1002, which may repeat) per model bundle: Device Observer UID = the
bundle's DeviceUID, Name = model name. A group is tied to its device by the
``device_uid`` algorithm parameter, and the same DeviceUID appears in the
Contributing Equipment Sequence item of that model. (Observer context items
inside a group would be outside TID 1501, and highdicom's reader then
mistakes them for qualitative evaluations.)

The codes are in :mod:`echonode.report.codes`; the header the report copies
is repaired by :mod:`echonode.report.header`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import cast

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import echonode
from echonode.ops.logs import get_logger
from echonode.report.codes import (
    COMMENT,
    ECHONODE_SCHEME,
    FINDING_TEXT,
    IHE_SCHEME,
    IMAGE_VIEW,
    NO_USABLE_VIDEO,
    NOT_ASSESSED_REASONS,
    NUMBER_OF_VIDEOS,
    PROBABILITY,
    PROBABILITY_UNIT,
    PROCESSING_ALGORITHM,
    QUALITATIVE_EVALUATIONS,
    REASON_NOT_ASSESSED,
    SUPERSEDES,
    TASKS,
    UNDETERMINED,
    VIDEO_PROBABILITY,
    VIDEOS_UNIT,
    VIEWS,
)
from echonode.report.findings import (
    NotAssessed,
    SourceInstance,
    TaskFinding,
    check_finding,
    check_not_assessed,
)
from echonode.report.header import (
    check_copied_exactly,
    evidence_datasets,
    restore_evidence_classes,
)
from echonode.report.summary import (
    finding_line,
    not_assessed_line,
    reported_probability,
)

log = get_logger(__name__)

__all__ = [
    "DISCLAIMER",
    "SERIES_DESCRIPTION",
    "SOP_CLASSES",
    "SRDocument",
    "build_report",
]

#: Series Description of every SR echonode writes.
SERIES_DESCRIPTION = "echonode AI result - NOT FOR DIAGNOSTIC USE"

#: The comment every report carries.
DISCLAIMER = (
    "Generated automatically by an AI algorithm (echonode). "
    "NOT FOR DIAGNOSTIC USE."
)

#: What :func:`build_report` returns.
SRDocument = hd.sr.ComprehensiveSR | hd.sr.EnhancedSR | hd.sr.Comprehensive3DSR

#: ``sop_class`` argument (a key of :data:`echonode.report.sop.SR_SOP_CLASS_UIDS`)
#: -> highdicom SR class.
SOP_CLASSES: dict[str, type[SRDocument]] = {
    "comprehensive3d": hd.sr.Comprehensive3DSR,
    "comprehensive": hd.sr.ComprehensiveSR,
    "enhanced": hd.sr.EnhancedSR,
}

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

# The header attributes the report cannot do without.
_REQUIRED_HEADER = ("StudyInstanceUID",)


#: A task as the report names its model: assessed or not.
Assessment = TaskFinding | NotAssessed


def _device_observer(item: Assessment, manufacturer: str) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=item.device_uid,
            name=item.model_name,
            manufacturer_name=manufacturer,
            model_name=item.model_name,
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


def _algorithm(item: Assessment) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the model, its version, and its parameters with the threshold and DeviceUID."""
    parameters = dict(item.parameters)
    parameters.setdefault("threshold", f"{item.threshold:g}")
    parameters["device_uid"] = item.device_uid
    return hd.sr.AlgorithmIdentification(
        name=item.model_name,
        version=item.model_version,
        parameters=[f"{k}={v}" for k, v in parameters.items()],
    )


def _as_integer(measurement: hd.sr.Measurement) -> hd.sr.Measurement:
    """A count written as one ("2", not highdicom's "2.0")."""
    value = measurement[0].MeasuredValueSequence[0]
    value.NumericValue = str(int(float(value.NumericValue)))
    if "FloatingPointValue" in value:
        del value.FloatingPointValue
    return measurement


def _measurements(finding: TaskFinding) -> list[hd.sr.Measurement]:
    """The probability (3 decimals, on its side of the threshold), the count, the per-video probabilities."""
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY,
            value=reported_probability(finding.probability, finding.threshold),
            unit=PROBABILITY_UNIT,
        ),
        _as_integer(hd.sr.Measurement(name=NUMBER_OF_VIDEOS, value=int(finding.n_videos), unit=VIDEOS_UNIT)),
    ]
    by_uid = {s.sop_instance_uid: s for s in finding.sources}
    for uid, p in finding.video_probabilities.items():
        measurements.append(
            hd.sr.Measurement(
                name=VIDEO_PROBABILITY,
                value=reported_probability(p),
                unit=PROBABILITY_UNIT,
                referenced_images=[hd.sr.SourceImageForMeasurement(by_uid[uid].sop_class_uid, uid)],
            )
        )
    return measurements


def _group(
    item: Assessment,
    measurements: Sequence[hd.sr.Measurement],
    evaluations: Sequence[hd.sr.QualitativeEvaluation],
    sources: Sequence[SourceInstance],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A task's TID 1501 group: tracking, finding, site, algorithm, then what was found."""
    task = TASKS[item.task]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"echonode {item.task}"),
        finding_type=task.finding,
        finding_sites=[hd.sr.FindingSite(task.site)],
        algorithm_id=_algorithm(item),
        measurements=list(measurements) or None,
        qualitative_evaluations=list(evaluations),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(s.sop_class_uid, s.sop_instance_uid) for s in sources
        ] or None,
    )
    if task.severity is not None:
        # The finding and its evaluation are about the *severe* form.
        for content in group[0].ContentSequence:
            if content.ValueType == "CODE" and content.name in (codes.DCM.Finding, task.finding):
                content.ContentSequence = _severity_modifier(task.severity)
    return group


def _view_item(label: str) -> hd.sr.ContentItem:
    """Image View: coded from CID 12226 when the label is known, else the label as text.

    Acquisition context of the video it describes, as the echo templates
    (TID 5200) give a measurement's view. (At group level, a CODE item would
    read as one of the group's qualitative evaluations to highdicom's reader
    and to TID 1501's CONTAINS CODE row.)
    """
    context = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    view = VIEWS.get(label)
    if view is not None:
        return hd.sr.CodeContentItem(name=IMAGE_VIEW, value=view.code, relationship_type=context)
    return hd.sr.TextContentItem(name=IMAGE_VIEW, value=label, relationship_type=context)


def _measurement_group(finding: TaskFinding) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The group of an assessed task: Present or Absent, the probability, the videos and their views."""
    task = TASKS[finding.task]
    present = finding.probability >= finding.threshold
    group = _group(
        finding,
        _measurements(finding),
        [hd.sr.QualitativeEvaluation(name=task.finding, value=codes.SCT.Present if present else codes.SCT.Absent)],
        finding.sources,
    )
    views = {s.sop_instance_uid: s.view for s in finding.sources if s.view}
    for item in group[0].ContentSequence:
        if item.ValueType == "IMAGE" and item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in views:
            view = views[item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
            item.ContentSequence = hd.sr.ContentSequence([_view_item(view)])
    return group


def _not_assessed_group(item: NotAssessed) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The group of a task not assessed: Undetermined (CID 240), and the coded reason."""
    return _group(
        item,
        [],
        [
            hd.sr.QualitativeEvaluation(name=TASKS[item.task].finding, value=UNDETERMINED),
            hd.sr.QualitativeEvaluation(name=REASON_NOT_ASSESSED, value=NOT_ASSESSED_REASONS[item.reason]),
        ],
        [],
    )


def _observation_context(
    items: Sequence[Assessment], manufacturer: str, software_version: str
) -> hd.sr.ObservationContext:
    devices: dict[str, Assessment] = {}
    for item in items:
        devices.setdefault(item.device_uid, item)
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
    for item in others:  # TID 1002 may repeat: one observer per device
        context.extend(_device_observer(item, manufacturer))
    return context


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _contributing_equipment(
    items: Sequence[Assessment],
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
    equipment = [node]
    seen: set[tuple[str, str, str]] = set()
    for item in items:
        key = (item.model_name, item.model_version, item.device_uid)
        if key in seen:
            continue
        seen.add(key)
        model = hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,  # replaced below
            manufacturer_model_name=item.model_name,
            software_versions=item.model_version,
            institution_name=institution_name,
            contribution_datetime=now,
            contribution_description=(
                f"AI model for task {item.task}; NOT FOR DIAGNOSTIC USE"
            ),
        )
        # IHE AIR: the algorithm's item has purpose "Processing Algorithm".
        # The sequence takes exactly one item (dciodvfy: "1 Required by Module
        # definition"), and highdicom accepts CID 7005 codes only.
        model.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)
        ]
        model.DeviceUID = item.device_uid
        equipment.append(model)
    return equipment


def build_report(
    study_header: Dataset,
    findings: Sequence[TaskFinding],
    *,
    sop_class: str = "comprehensive3d",
    series_number: int = 9001,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manufacturer: str = "echonode",
    software_version: str = echonode.__version__,
    institution_name: str | None = None,
    supersedes: tuple[str, str, str] | None = None,
    no_usable_video_reason: str | None = None,
    not_assessed: Sequence[NotAssessed] = (),
) -> SRDocument:
    """Build the TID 1500 SR that goes back into a study.

    Parameters
    ----------
    study_header : pydicom.dataset.Dataset
        Header of an instance of the study (pixel data not needed): its
        Patient and Study attributes are copied into the report.
    findings : sequence of TaskFinding
        One finding per task, each a Measurement Group and a plain-language
        line. May be empty only together with ``no_usable_video_reason``.
    sop_class : {"comprehensive3d", "comprehensive", "enhanced"}
        SR storage SOP class: Comprehensive 3D SR (the IHE AI Results IOD,
        the default), Comprehensive SR or Enhanced SR.
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
        Why the models could not assess the study (the pipeline's words);
        the Qualitative Evaluations container says so. Only with an empty
        ``findings``.
    not_assessed : sequence of NotAssessed
        The tasks the models could not assess, each a Measurement Group whose
        finding is evaluated Undetermined with the coded reason, and a
        plain-language line after those of the findings. Beside findings
        too: a study one model measured and another could not (a model that
        measures in cm, videos without calibration) says so of the second
        instead of keeping silent. A task is either a finding or not
        assessed. With neither findings nor ``not_assessed`` the report has
        no measurement group.

    Returns
    -------
    highdicom.sr.ComprehensiveSR or highdicom.sr.EnhancedSR or highdicom.sr.Comprehensive3DSR
        The report, a :class:`pydicom.dataset.Dataset`; write it with
        ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    HeaderRefused
        When an attribute of :data:`~echonode.report.header.COPIED_EXACTLY` has a value highdicom
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
    clinical trial modules). Those of :data:`~echonode.report.header.COPIED_EXACTLY` are copied
    exactly as received: they decide which patient and study the PACS files
    the report under. Any other value that is invalid for its VR or VM (a
    vendor's PatientSex ``"MALE"``, a birth date ``"1970-01-01"``, an
    over-long Study Description, a PatientAge ``"45"``) is normalised:
    PatientSex is stripped and upper-cased when that gives M, F or O, and
    anything else invalid is emptied. The change is logged as
    ``sr.header_normalised`` with the UIDs and the attribute names, never a
    value.
    """
    findings, not_assessed = _checked_arguments(
        study_header, findings, not_assessed, sop_class, supersedes, no_usable_video_reason,
        series_number, instance_number,
    )
    assessments: list[Assessment] = [*findings, *not_assessed]
    sources = _sources(findings)
    content = _content(
        [*map(_measurement_group, findings), *map(_not_assessed_group, not_assessed)],
        _qualitative_evaluations(findings, not_assessed, no_usable_video_reason, supersedes),
        _observation_context(assessments, manufacturer, software_version),
    )
    evidence = _repaired_evidence(study_header, sources)
    sr = SOP_CLASSES[sop_class](
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=_previous_versions(supersedes, str(study_header.StudyInstanceUID)),
        performed_procedure_codes=[codes.SCT.Echocardiography],
        record_evidence=bool(sources),
        contributing_equipment=_contributing_equipment(
            assessments, manufacturer, software_version, institution_name
        ),
        coding_schemes=list(_CODING_SCHEMES),
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name="echonode",
        software_versions=software_version,
    )
    restore_evidence_classes(sr, sources)
    if not sources:
        # Nothing was used: the study header is no evidence of this report.
        for keyword in ("CurrentRequestedProcedureEvidenceSequence",
                        "PertinentOtherEvidenceSequence"):
            if keyword in sr:
                delattr(sr, keyword)
    return sr


def _checked_arguments(
    study_header: Dataset,
    findings: Sequence[TaskFinding],
    not_assessed: Sequence[NotAssessed],
    sop_class: str,
    supersedes: tuple[str, str, str] | None,
    no_usable_video_reason: str | None,
    series_number: int,
    instance_number: int,
) -> tuple[list[TaskFinding], list[NotAssessed]]:
    """The findings and the tasks not assessed as lists, once every argument of :func:`build_report` is valid."""
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
        check_finding(finding, i)
    if isinstance(not_assessed, (str, bytes)) or not isinstance(not_assessed, Sequence):
        raise ValueError('Argument "not_assessed" must be a sequence of NotAssessed.')
    not_assessed = list(not_assessed)
    for i, item in enumerate(not_assessed):
        check_not_assessed(item, i)
    tasks = [f.task for f in findings]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f'Argument "findings" names a task twice: {tasks}.')
    unassessed = [n.task for n in not_assessed]
    if len(set(unassessed)) != len(unassessed):
        raise ValueError(f'Argument "not_assessed" names a task twice: {unassessed}.')
    if set(tasks) & set(unassessed):
        raise ValueError(f'Argument "not_assessed" names a task "findings" reports: '
                         f"{sorted(set(tasks) & set(unassessed))}.")
    if supersedes is not None and (
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
    return findings, not_assessed


def _sources(findings: Sequence[TaskFinding]) -> list[SourceInstance]:
    """Every video the findings used, in order, each once."""
    sources: dict[str, SourceInstance] = {}
    for f in findings:
        for s in f.sources:
            sources.setdefault(s.sop_instance_uid, s)
    return list(sources.values())


def _qualitative_evaluations(
    findings: Sequence[TaskFinding],
    not_assessed: Sequence[NotAssessed],
    no_usable_video_reason: str | None,
    supersedes: tuple[str, str, str] | None,
) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations: a line per finding, the disclaimer, why nothing was used."""
    lines = [*map(finding_line, findings), *map(not_assessed_line, not_assessed)]
    evaluations: list[hd.sr.ContentItem] = [_text(FINDING_TEXT, line) for line in lines]
    evaluations.append(_text(COMMENT, DISCLAIMER))
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
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(evaluations)
    return container


def _content(
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    evaluations: hd.sr.ContainerContentItem,
    observation_context: hd.sr.ObservationContext,
) -> hd.sr.ContainerContentItem:
    """The document's content tree: the TID 1500 root, the plain-language lines first."""
    if groups:
        report = hd.sr.MeasurementReport(
            observation_context=observation_context,
            procedure_reported=codes.SCT.Echocardiography,
            imaging_measurements=list(groups),
        )
        root = cast(hd.sr.ContainerContentItem, report[0])
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
    # TID 1500's order is not significant: what a reader needs goes first.
    root.ContentSequence.insert(0, evaluations)
    _separate(root)
    return root


def _separate(item: Dataset) -> None:
    """Every container's items are separate statements, not one continuous text."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


def _previous_versions(supersedes: tuple[str, str, str] | None, study_uid: str) -> list[Dataset] | None:
    """The Predecessor Documents Sequence's source: the report this one replaces."""
    if supersedes is None:
        return None
    pre = Dataset()
    pre.SOPClassUID, pre.SOPInstanceUID, pre.SeriesInstanceUID = supersedes
    pre.StudyInstanceUID = study_uid
    return [pre]


def _repaired_evidence(study_header: Dataset, sources: Sequence[SourceInstance]) -> list[Dataset]:
    """The evidence highdicom copies the study from, identity checked and values repaired."""
    check_copied_exactly(study_header)
    evidence, changed = evidence_datasets(study_header, sources)
    if changed:
        # Attribute names only: the values are patient data.
        log.warning(
            "sr.header_normalised",
            study_uid=str(study_header.StudyInstanceUID),
            sop_instance_uid=str(study_header.get("SOPInstanceUID", "")),
            attributes=changed,
        )
    return evidence
