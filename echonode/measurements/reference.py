"""A study's reference: its current measurement SR, one value per concept, and its labels.

This is what ``echonode-train labels`` writes per study and what the node
records beside its own result: the three steps of the package in one call
(:func:`~echonode.measurements.selection.current_document`,
:func:`~echonode.measurements.selection.select_values`,
:func:`~echonode.measurements.rules.decide_labels`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from echonode.measurements.concepts import CONCEPTS_BY_KEY
from echonode.measurements.reading import MeasurementDocument
from echonode.measurements.rules import TASKS, LabelDecision, Rules, decide_labels
from echonode.measurements.selection import (
    DEFAULT_TOLERANCE,
    Selection,
    current_document,
    select_values,
    supplementing_documents,
)

__all__ = [
    "NO_PATIENT_ID", "NO_REPORT", "OTHER_PATIENT", "REFERENCE_VERSION", "SEVERAL_PATIENTS", "StudyReference",
    "patient_refusal",
    "study_reference",
]  # fmt: skip

#: The version of how SRs become a reference (what is read, selected, supplemented and derived).
#: Raised with every change that can change a study's values or labels, so that the node reads its
#: recorded references again (see :func:`echonode.agreement.record.rules_id`).
REFERENCE_VERSION = 2

#: The reason both labels are empty when no SR of the study gives a value.
NO_REPORT = "no echo measurement SR with a usable value in the study"
#: Why an SR filed under another Patient ID than the study's images is not used.
OTHER_PATIENT = ("filed under another Patient ID than the study's images: not this patient's measurements"
                 " (check the cart's worklist entry)")
#: Why no SR is used when the study's usable SRs are filed under more than one Patient ID.
SEVERAL_PATIENTS = ("the study's measurement SRs are filed under more than one Patient ID: none can be shown to be "
                    "the study's patient's")
#: Why an SR without a Patient ID is not used when the study's images carry one.
NO_PATIENT_ID = ("filed without a Patient ID while the study's images carry one: cannot be shown to be this"
                 " patient's measurements")


def patient_refusal(image_patient: str | None, sr_patient: str | None) -> str | None:
    """Why an SR is not to be read as the study's patient's, or None when it may be.

    Compared only when the images carry a Patient ID (a study with none has
    nothing to compare with). An SR with no Patient ID is refused then: a
    reference must be shown to be the patient's, not merely not shown to be
    someone else's.

    Parameters
    ----------
    image_patient : str, optional
        The study's images' Patient ID (or a digest of it); None when absent.
    sr_patient : str, optional
        The SR's, in the same form; None when absent.

    Returns
    -------
    str or None
        :data:`OTHER_PATIENT`, :data:`NO_PATIENT_ID`, or None.
    """
    if image_patient is None or sr_patient == image_patient:
        return None
    return OTHER_PATIENT if sr_patient is not None else NO_PATIENT_ID


@dataclass(frozen=True)
class StudyReference:
    """The sonographers' reference for one study.

    Attributes
    ----------
    document : MeasurementDocument or None
        The SR whose values count (None when no SR of the study gives one).
    not_used : dict
        SOP Instance UID -> why each other SR of the study is not used.
    selections : dict
        Concept key -> :class:`~echonode.measurements.selection.Selection`
        (empty without a document).
    sex : str or None
        ``M`` or ``F`` as the rules used it.
    labels : dict
        Task (``lvh``, ``severe_as``) -> :class:`~echonode.measurements.rules.LabelDecision`.
    supplements : dict
        SOP Instance UID of an SR from other equipment -> the concept keys
        taken from it because :attr:`document` does not measure them
        (:func:`~echonode.measurements.selection.supplementing_documents`).
    """

    document: MeasurementDocument | None
    not_used: dict[str, str]
    selections: dict[str, Selection]
    sex: str | None
    labels: dict[str, LabelDecision] = field(default_factory=dict)
    supplements: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, float | None]:
        """Concept key -> the value used (None when undecided)."""
        return {key: sel.value for key, sel in self.selections.items()}


def _derive_mass_index(chosen: dict[str, Selection], documents: Sequence[MeasurementDocument]) -> None:
    """The LV mass index from the LV mass and the Body Surface Area, when the SRs give those but not it.

    A cart that writes the mass and the patient's BSA leaves the index to the reader; without it
    a hypertrophied ventricle with walls under the limit (eccentric hypertrophy) would read as 0.
    """
    index, mass = chosen.get("lv_mass_index"), chosen.get("lv_mass")
    if index is None or index.rule != "not measured" or mass is None or mass.value is None:
        return
    bsa = next((doc.body_surface_area_m2 for doc in documents if doc.body_surface_area_m2), None)
    if bsa is None:
        return
    span = (round(mass.span[0] / bsa, 9), round(mass.span[1] / bsa, 9)) if mass.span else None
    chosen["lv_mass_index"] = Selection(
        "lv_mass_index", round(mass.value / bsa, 9), "derived from LV mass and BSA", mass.used, span=span
    )


def study_reference(
    documents: Sequence[MeasurementDocument],
    rules: Rules,
    *,
    sex: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    selections: Mapping[str, Mapping[str, Selection]] | None = None,
) -> StudyReference:
    """The reference values and labels of one study.

    Parameters
    ----------
    documents : sequence of MeasurementDocument
        Every SR read from the study (any status).
    rules : Rules
        From :func:`~echonode.measurements.rules.load_rules`.
    sex : {"M", "F", None}
        The patient's sex from the study's images, used when the SR has none.
    tolerance : float
        See :func:`~echonode.measurements.selection.select_values`.
    selections : mapping, optional
        SOP Instance UID -> the :func:`~echonode.measurements.selection.select_values`
        of that SR, computed earlier (when the caller has since dropped the
        documents' measurements to save memory).

    Returns
    -------
    StudyReference
    """
    patients = {doc.patient_key for doc in documents if doc.usable and doc.patient_key}
    if len(patients) > 1:
        # With the images' own Patient ID, SRs of another patient were refused before; without it (no
        # images, or none that carry one) nothing says which patient the study is.
        undecided = {task: LabelDecision(None, SEVERAL_PATIENTS) for task in TASKS}
        return StudyReference(None, {doc.sop_instance_uid: SEVERAL_PATIENTS for doc in documents if doc.usable}, {},
                              sex, undecided)
    document, not_used = current_document(documents)
    if document is None:
        undecided = {task: LabelDecision(None, NO_REPORT) for task in TASKS}
        return StudyReference(None, not_used, {}, sex, undecided)
    def selections_of(doc: MeasurementDocument) -> dict[str, Selection]:
        known = (selections or {}).get(doc.sop_instance_uid)
        return dict(known) if known is not None else select_values(doc, tolerance=tolerance)

    chosen = selections_of(document)
    others = supplementing_documents(document, documents)
    supplements: dict[str, tuple[str, ...]] = {}
    for other in others:
        missing = [key for key, sel in chosen.items() if sel.rule == "not measured"]
        if not missing:
            break
        theirs = selections_of(other)
        taken = tuple(key for key in missing if key in theirs and theirs[key].value is not None)
        if taken:
            chosen.update({key: theirs[key] for key in taken})
            supplements[other.sop_instance_uid] = taken
            listed = ", ".join(CONCEPTS_BY_KEY[key].label for key in taken)
            not_used[other.sop_instance_uid] = (
                f"{not_used.get(other.sop_instance_uid, 'not the current SR')}; from other equipment, it gives "
                f"what the current SR does not measure: {listed}"
            )
    _derive_mass_index(chosen, [document, *others])
    used_sex = document.patient_sex or sex
    why = {key: sel.reason for key, sel in chosen.items() if sel.reason}
    spans = {key: sel.span for key, sel in chosen.items() if sel.span is not None}
    labels = decide_labels({k: s.value for k, s in chosen.items()}, used_sex, rules, why, spans)
    return StudyReference(document, not_used, chosen, used_sex, labels, supplements)
