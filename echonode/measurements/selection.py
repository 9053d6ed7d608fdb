"""One value per concept, and one SR per study.

**One value per concept** (:func:`select_values`). A report can hold a concept
many times: the beats a sonographer measured, the same value written twice
(GE writes every measurement once plainly and once with a Selection Status),
2D and M-mode readings of one wall, the resting and the peak-stress readings
of a stress echo. The value used is

0. from the items acquired at rest: a report whose items carry a protocol
   Stage (TID 5202 acquisition context, CID 12002) is read at its resting or
   baseline stage (Resting State, Baseline, Before Procedure), as are items
   with no stage; a concept measured only at other stages (peak stress,
   recovery, during or after a procedure) has no value, and never is a
   stress reading averaged with a resting one;
1. the value the sonographer selected: the items that carry a Selection
   Status (TID 300/5203 "Selection Status", TID 5301 "$Preferred": any of
   CID 224/12301, user chosen, mean chosen, most recent, maximum, minimum);
2. when no item of the concept carries one, the items the report derives as
   the Mean (TID 300 "Derivation" = Mean: the beats' average the cart wrote
   beside them), or else the mean of all its usable items (the repeats of
   one measurement: an echo lab averages beats) less those derived as
   another statistic of them (Maximum, Minimum, Median, Mode, Standard
   Deviation), which would count the beats twice or not be a wall at all;
3. selected items of one image mode and method that disagree (their spread
   is more than ``tolerance`` = 5 % of their largest value) are
   contradictory: the concept has no value and the reason lists them. The
   sonographer's choice is not second-guessed by picking one; selected items
   that agree (a value and its copy, 12 mm and 1.2 cm) give their mean;
4. readings by different image modes or methods (a 2D and an M-mode IVSd,
   both selected, as GE writes them) are two readings of one wall, not a
   contradiction: the value is their mean and :attr:`Selection.span` holds
   the lowest and highest mode's mean when they differ by more than the
   tolerance, so that a label is given only when every reading gives it
   (:func:`~echonode.measurements.rules.decide_labels`).

Items that cannot be used (no value, wrong unit ...) never take part; when a
concept has only such items its reason says why.

**One SR per study** (:func:`current_document`). A study can hold several
measurement SRs: the cart's, then the workstation's when the sonographer
finished measuring later, or an amended one. Among the SRs of a study that
give at least one value:

1. an SR named in another echo report's Predecessor Documents Sequence
   (PS3.3 C.17.2: the later document replaces it, amended or not) is
   superseded;
2. of the rest, a VERIFIED SR (Verification Flag: attested by a
   physician) supersedes any UNVERIFIED one, then a COMPLETE one any
   PARTIAL one, whatever their times: a preliminary report written after
   the signed one (an addendum begun, a cart's late export) is not the
   lab's word;
3. among equals, the latest by Content Date and Time supersedes the others,
   then the highest Instance Number, then the greatest SOP Instance UID (only
   so that the choice is the same on every run). Content Date and Time are
   compared as written (the Timezone Offset From UTC is not applied: the SRs
   of one study come from one site).

The whole document is used, not a merge of several: a later report from the
same equipment is the sonographer's final word, including on values it no
longer lists. A report from other equipment (an offline analysis package or
a workstation after the cart's, another Manufacturer or Model Name) that
does not name the cart's as its predecessor measured other things, not the
same things again: a concept the current report does not measure at all is
taken from that equipment's own current report, when it is filed under the
same Patient ID (:func:`supplementing_documents`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydicom.sr.codedict import codes

from echonode.measurements.concepts import (
    CONCEPTS,
    CONCEPTS_BY_KEY,
    CodeKey,
    code_key,
    is_private_scheme,
    private_meaning_says,
)
from echonode.measurements.reading import Coded, Measurement, MeasurementDocument

__all__ = [
    "DEFAULT_TOLERANCE",
    "Selection",
    "current_document",
    "document_order_key",
    "select_concept",
    "select_values",
    "supplementing_documents",
    "values_of",
]

#: Selected values within this fraction of each other are one value.
DEFAULT_TOLERANCE = 0.05

_MEAN = code_key(codes.SCT.Mean)
#: Protocol stages (CID 12002 and the baseline codes carts use) that are the patient at rest, before
#: any stress or intervention: a study's labels are read there.
_AT_REST: frozenset[CodeKey] = frozenset(code_key(c) for c in (
    codes.SCT.RestingState, codes.SCT.BaselineState, codes.DCM.Baseline, codes.SCT.BeforeProcedure))
#: Derivations that summarise the repeats otherwise than by their mean: never averaged with them.
_OTHER_STATISTICS: frozenset[CodeKey] = frozenset(code_key(c) for c in (
    codes.SCT.Maximum, codes.SCT.Minimum, codes.SCT.Median, codes.DCM.Median, codes.SCT.Mode,
    codes.SCT.StandardDeviation, codes.DCM.StandardDeviation))


@dataclass(frozen=True)
class Selection:
    """The value of one concept in one report.

    Attributes
    ----------
    concept : str
        :attr:`~echonode.measurements.concepts.Concept.key`.
    value : float or None
        In the concept's unit; None when not measured, unusable or contradictory.
    rule : str
        ``selected`` (the sonographer's selection), ``derived mean`` (the
        items the report derives as the Mean), ``mean`` (mean of unselected
        repeats), ``single`` (the only item), ``contradictory``,
        ``not at rest`` (measured only at a stress or procedural stage),
        ``unusable`` (only items that cannot be used) or ``not measured``.
    used : tuple of Measurement
        The items the value comes from (for ``contradictory``: the
        disagreeing selected items).
    reason : str or None
        Why ``value`` is None.
    span : tuple of float or None
        ``(low, high)``: the lowest and highest mean of the readings by
        different image modes or methods, when they differ by more than the
        tolerance; None otherwise.
    """

    concept: str
    value: float | None
    rule: str
    used: tuple[Measurement, ...] = ()
    reason: str | None = None
    span: tuple[float, float] | None = None


def _describe(m: Measurement) -> str:
    mode = f" ({m.image_mode.meaning})" if m.image_mode is not None and m.image_mode.meaning else ""
    return f"{m.value:g} {m.unit}{mode} at {m.content_path}"


def select_concept(
    concept: str, measurements: Iterable[Measurement], *, tolerance: float = DEFAULT_TOLERANCE
) -> Selection:
    """The value of ``concept`` among ``measurements`` (see the module docstring)."""
    label = CONCEPTS_BY_KEY[concept].label
    mine = [m for m in measurements if m.concept == concept]
    usable = [m for m in mine if m.value is not None]
    if not usable:
        if mine:
            problems = sorted({m.problem or "unusable" for m in mine})
            return Selection(concept, None, "unusable", reason=f"{label}: not usable ({'; '.join(problems)})")
        return Selection(concept, None, "not measured", reason=f"{label}: not measured")
    at_rest = [m for m in usable if _at_rest(m.stage)]
    if not at_rest:
        stages = ", ".join(sorted({str(m.stage) for m in usable}))
        return Selection(
            concept, None, "not at rest",
            reason=f"{label}: measured only at stages not read as rest or baseline ({stages})",
        )  # fmt: skip
    usable = at_rest
    selected = [m for m in usable if m.selected]
    derived_mean = [m for m in usable if m.derivation is not None and m.derivation.key == _MEAN]
    repeats = [m for m in usable if m.derivation is None or m.derivation.key not in _OTHER_STATISTICS]
    pool = selected or derived_mean or repeats or usable
    readings = _by_mode(pool)
    if selected:
        for group in readings.values():
            values = [m.value for m in group if m.value is not None]
            if _spread(values, tolerance):
                listed = ", ".join(_describe(m) for m in group)
                return Selection(
                    concept, None, "contradictory", tuple(group),
                    reason=f"{label}: the selected values disagree ({listed})",
                )  # fmt: skip
    values = [m.value for m in pool if m.value is not None]
    means = [sum(vs) / len(vs) for vs in ([m.value for m in g if m.value is not None] for g in readings.values())]
    span = (round(min(means), 9), round(max(means), 9)) if _spread(means, tolerance) else None
    mean = round(sum(values) / len(values), 9)
    rule = "selected" if selected else "derived mean" if derived_mean else ("single" if len(pool) == 1 else "mean")
    return Selection(concept, mean, rule, tuple(pool), span=span)


_REST_WORDS = ("rest", "baseline", "before")
_STRESS_WORDS = ("stress", "peak", "exercise", "recovery", "after", "post", "during", "pacing", "valsalva", "dobutamine")


def _at_rest(stage: Coded | None) -> bool:
    """Whether a protocol stage is the patient at rest. A standard code must be one of the resting
    codes; a private one (a cart's own "Rest") is read by its meaning, and only when it says rest
    and nothing of stress or a procedure."""
    if stage is None:
        return True
    if not is_private_scheme(stage.scheme):
        return stage.key in _AT_REST
    return private_meaning_says(stage.meaning, _REST_WORDS, _STRESS_WORDS)


def _by_mode(items: Iterable[Measurement]) -> dict[tuple[CodeKey | None, CodeKey | None], list[Measurement]]:
    """Items grouped by image mode and method: each group is one way of reading the concept."""
    groups: dict[tuple[CodeKey | None, CodeKey | None], list[Measurement]] = {}
    for m in items:
        key = (m.image_mode.key if m.image_mode else None, m.method.key if m.method else None)
        groups.setdefault(key, []).append(m)
    return groups


def _spread(values: Sequence[float], tolerance: float) -> bool:
    """Whether ``values`` differ by more than ``tolerance`` of the largest of them."""
    if len(values) < 2:
        return False
    low, high = min(values), max(values)
    return high - low > tolerance * max(abs(low), abs(high))


def select_values(
    source: MeasurementDocument | Iterable[Measurement], *, tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, Selection]:
    """One :class:`Selection` per concept of :data:`~echonode.measurements.concepts.CONCEPTS`.

    Parameters
    ----------
    source : MeasurementDocument or iterable of Measurement
        A report, or measurements gathered otherwise.
    tolerance : float
        Selected values whose spread is within this fraction of the largest
        are one value; beyond it they are contradictory.

    Returns
    -------
    dict
        Concept key -> Selection, for every concept (not measured ones too).
    """
    measurements = list(source.measurements if isinstance(source, MeasurementDocument) else source)
    return {c.key: select_concept(c.key, measurements, tolerance=tolerance) for c in CONCEPTS}


def document_order_key(doc: MeasurementDocument) -> tuple[bool, bool, str, int, str]:
    """Sort key, least authoritative first: verified, complete, Content Date/Time, Instance Number, UID."""
    number = doc.instance_number if doc.instance_number is not None else -1
    return (doc.verification_flag == "VERIFIED", doc.completion_flag == "COMPLETE", doc.content_datetime, number,
            _uid_sort_key(doc.sop_instance_uid))


def _uid_sort_key(uid: str) -> str:
    # UIDs compare component by component as numbers: pad each one.
    return ".".join(part.zfill(40) for part in uid.split("."))


def current_document(
    documents: Sequence[MeasurementDocument],
) -> tuple[MeasurementDocument | None, dict[str, str]]:
    """The SR of a study whose values count, and why each other one does not.

    Parameters
    ----------
    documents : sequence of MeasurementDocument
        The SRs of one study (any status).

    Returns
    -------
    tuple
        ``(current, reasons)``: the document used (None when no SR of the
        study gives a value) and SOP Instance UID -> why that SR is not used,
        for every other document given.
    """
    reasons: dict[str, str] = {}
    replaced_by: dict[str, str] = {}
    for doc in documents:
        if doc.is_echo_report:
            for uid in doc.predecessors:
                if uid != doc.sop_instance_uid:
                    replaced_by.setdefault(uid, doc.sop_instance_uid)
    candidates = []
    seen: set[str] = set()
    for doc in documents:
        uid = doc.sop_instance_uid
        if uid in seen:
            continue  # another file of one instance: the caller reports copies
        seen.add(uid)
        if not doc.usable:
            reasons[uid] = doc.reason or "gives no usable measurement"
        elif uid in replaced_by:
            reasons[uid] = f"replaced by {replaced_by[uid]}, which names it in its Predecessor Documents Sequence"
        else:
            candidates.append(doc)
    if not candidates:
        return None, reasons
    candidates.sort(key=document_order_key)
    current = candidates[-1]
    for doc in candidates[:-1]:
        reasons[doc.sop_instance_uid] = f"superseded by {_why_current(current, doc)} SR {current.sop_instance_uid}"
    return current, reasons


def _equipment(doc: MeasurementDocument) -> tuple[str, str] | None:
    """Manufacturer and model, compared without case; None when the SR does not name its manufacturer."""
    maker = doc.manufacturer.strip().lower()
    return (maker, doc.model_name.strip().lower()) if maker else None


def supplementing_documents(
    current: MeasurementDocument, documents: Sequence[MeasurementDocument]
) -> list[MeasurementDocument]:
    """Usable SRs of the study from other equipment than ``current``, most authoritative first.

    Parameters
    ----------
    current : MeasurementDocument
        The study's current SR (:func:`current_document`).
    documents : sequence of MeasurementDocument
        Every SR of the study.

    Returns
    -------
    list of MeasurementDocument
        For each other equipment (Manufacturer and Model Name; an SR that
        names no manufacturer is never taken to be other equipment), the SR
        :func:`current_document` would choose among that equipment's own
        (its later exports are its final word, as the current SR's are),
        when it gives a value and is filed under the same Patient ID as
        ``current`` (both must carry one: measurements of two patients are
        never merged).
    """
    mine = _equipment(current)
    if mine is None or current.patient_key is None:
        return []
    by_equipment: dict[tuple[str, str], list[MeasurementDocument]] = {}
    for doc in documents:
        theirs = _equipment(doc)
        if theirs is not None and theirs != mine and doc.patient_key == current.patient_key:
            by_equipment.setdefault(theirs, []).append(doc)
    out = []
    for own in by_equipment.values():
        chosen, _ = current_document(own)
        if chosen is not None and not _named_as_predecessor(chosen, documents):
            out.append(chosen)
    return sorted(out, key=document_order_key, reverse=True)


def _named_as_predecessor(doc: MeasurementDocument, documents: Sequence[MeasurementDocument]) -> bool:
    """Whether an echo report of the study names ``doc`` in its Predecessor Documents Sequence."""
    return any(doc.sop_instance_uid in other.predecessors for other in documents
               if other.is_echo_report and other.sop_instance_uid != doc.sop_instance_uid)


def _why_current(current: MeasurementDocument, other: MeasurementDocument) -> str:
    """What makes ``current`` win over ``other``, in a few words."""
    if (current.verification_flag == "VERIFIED") != (other.verification_flag == "VERIFIED"):
        return "the verified"
    if (current.completion_flag == "COMPLETE") != (other.completion_flag == "COMPLETE"):
        return "the complete"
    return "the later"


def values_of(selections: Mapping[str, Selection]) -> dict[str, float | None]:
    """Concept key -> value (None when undecided), from :func:`select_values`."""
    return {key: sel.value for key, sel in selections.items()}
