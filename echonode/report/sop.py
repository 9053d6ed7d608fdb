"""The SR storage classes a report is written in, and the same report in another one.

echonode writes its report as Comprehensive 3D SR by default: the IOD of the
IHE AI Results (AIR) profile. Some PACS do not accept that class at
association (they list the SR classes they store, and older lists stop at
Comprehensive SR). The report uses nothing that a Comprehensive SR or an
Enhanced SR cannot carry (no 3D spatial coordinates, no by-reference
relationships), so the delivery can send the *same report* in the class a
destination accepts:

1. propose :func:`sendable_classes` of the report's class at association;
2. pick :func:`fallback_sop_class` of the classes the destination accepted;
3. when that is not the report's own class, send :func:`as_sop_class` of
   the report read from its file, and record the class and SOP Instance UID
   sent to that destination.

The converted report's SOP Instance UID is derived from the original's and
the target class (:func:`derived_sop_instance_uid`), so a resend after a
crash, or a second conversion of the same file, is the same instance, and
the journal's row for the original names it. This module needs pydicom
only: the node process, which delivers, never imports highdicom.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Collection, Iterable, Iterator

from pydicom.dataset import Dataset

__all__ = [
    "COMPREHENSIVE",
    "COMPREHENSIVE_3D",
    "ENHANCED",
    "SR_SOP_CLASS_UIDS",
    "as_sop_class",
    "derived_sop_instance_uid",
    "fallback_sop_class",
    "sendable_classes",
]

#: Comprehensive 3D SR Storage: the IHE AI Results IOD, echonode's default.
COMPREHENSIVE_3D = "1.2.840.10008.5.1.4.1.1.88.34"
#: Comprehensive SR Storage.
COMPREHENSIVE = "1.2.840.10008.5.1.4.1.1.88.33"
#: Enhanced SR Storage.
ENHANCED = "1.2.840.10008.5.1.4.1.1.88.22"

#: ``sr.sop_class`` setting -> SOP Class UID, in the order a report falls
#: back through: each class carries every report echonode writes.
SR_SOP_CLASS_UIDS: dict[str, str] = {
    "comprehensive3d": COMPREHENSIVE_3D,
    "comprehensive": COMPREHENSIVE,
    "enhanced": ENHANCED,
}

# The namespace of the UUIDs behind converted reports' UIDs (fixed for good:
# changing it would make a resend a second report).
_CONVERTED_NAMESPACE = uuid.UUID("5b0c7d1e-8f3a-5e0b-9a4c-2d6f1e3b7a90")

# What a class cannot carry (PS3.3 A.35: Enhanced SR has neither 3D
# coordinates nor by-reference relationships; Comprehensive SR has no 3D
# coordinates), checked before a report is converted into it.
_NO_SCOORD3D = frozenset({COMPREHENSIVE, ENHANCED})
_NO_BY_REFERENCE = frozenset({ENHANCED})


def sendable_classes(sop_class_uid: str) -> tuple[str, ...]:
    """The classes to propose at association for a report of ``sop_class_uid``, best first.

    Parameters
    ----------
    sop_class_uid : str
        The report's own SOP Class UID.

    Returns
    -------
    tuple of str
        The report's own class, then the other SR classes of
        :data:`SR_SOP_CLASS_UIDS` in their order.

    Raises
    ------
    ValueError
        When ``sop_class_uid`` is not one of :data:`SR_SOP_CLASS_UIDS`.
    """
    _check_class(sop_class_uid, "sop_class_uid")
    return (sop_class_uid, *(u for u in SR_SOP_CLASS_UIDS.values() if u != sop_class_uid))


def fallback_sop_class(sop_class_uid: str, accepted: Collection[str]) -> str | None:
    """The class to send a report of ``sop_class_uid`` as, given what a destination accepted.

    Parameters
    ----------
    sop_class_uid : str
        The report's own SOP Class UID.
    accepted : collection of str
        The abstract syntaxes (SOP Class UIDs) the destination accepted at
        association.

    Returns
    -------
    str or None
        The report's own class when accepted, else the first accepted class
        of :func:`sendable_classes`; None when it accepted none of them.

    Raises
    ------
    ValueError
        When ``sop_class_uid`` is not one of :data:`SR_SOP_CLASS_UIDS`.
    """
    accepted = {str(u) for u in accepted}
    return next((u for u in sendable_classes(sop_class_uid) if u in accepted), None)


def derived_sop_instance_uid(sop_instance_uid: str, sop_class_uid: str) -> str:
    """The SOP Instance UID of a report converted into ``sop_class_uid``.

    A UUID-derived UID (``2.25.`` and a name-based UUID, RFC 4122 version 5,
    of both arguments; PS3.5 B.2): the same report converted into the same
    class always gets the same UID, a different one from the original's and
    from any other class's.

    Parameters
    ----------
    sop_instance_uid : str
        The original report's SOP Instance UID.
    sop_class_uid : str
        The class it is converted into.

    Returns
    -------
    str
        A valid UID of at most 64 characters.
    """
    return f"2.25.{uuid.uuid5(_CONVERTED_NAMESPACE, f'{sop_instance_uid}/{sop_class_uid}').int}"


def as_sop_class(ds: Dataset, sop_class_uid: str) -> Dataset:
    """The same report in another SR storage class, as a new instance.

    The content, the patient and study attributes, the series and the
    evidence are unchanged; the SOP Class UID (and the file meta
    information's) becomes ``sop_class_uid`` and the SOP Instance UID
    :func:`derived_sop_instance_uid` of the original's. A predecessor
    document of the original's class is named by its own converted UID, in
    the Predecessor Documents Sequence and in the text that names it: a
    destination that refuses a class was sent every earlier report converted
    too.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        An echonode report (as read from its file); it is not changed.
    sop_class_uid : str
        One of :data:`SR_SOP_CLASS_UIDS`.

    Returns
    -------
    pydicom.dataset.Dataset
        A deep copy in ``sop_class_uid``; the same UIDs as ``ds`` when it is
        already of that class. Write it with ``save_as(path,
        enforce_file_format=True)`` or send it as it is.

    Raises
    ------
    ValueError
        When ``ds`` is not an SR of one of :data:`SR_SOP_CLASS_UIDS`, when
        ``sop_class_uid`` is not one of them, or when the content holds what
        the target class cannot carry (3D coordinates, by-reference
        relationships).
    """
    if not isinstance(ds, Dataset) or "SOPInstanceUID" not in ds or "ContentSequence" not in ds:
        raise ValueError('Argument "ds" must be a structured report with a SOP Instance UID.')
    source = str(ds.get("SOPClassUID", ""))
    _check_class(source, "ds.SOPClassUID")
    _check_class(sop_class_uid, "sop_class_uid")
    out = copy.deepcopy(ds)
    if source == sop_class_uid:
        return out
    _check_content_fits(out, sop_class_uid)
    uid = derived_sop_instance_uid(str(ds.SOPInstanceUID), sop_class_uid)
    out.SOPClassUID = sop_class_uid
    out.SOPInstanceUID = uid
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = uid
    _rename_predecessors(out, source, sop_class_uid)
    return out


def _check_class(sop_class_uid: str, name: str) -> None:
    if sop_class_uid not in SR_SOP_CLASS_UIDS.values():
        raise ValueError(
            f'Argument "{name}" must be one of the SR storage classes '
            f"{sorted(SR_SOP_CLASS_UIDS.values())}, got {sop_class_uid!r}."
        )


def _items(items: Iterable[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _items(item.get("ContentSequence", []))


def _check_content_fits(ds: Dataset, sop_class_uid: str) -> None:
    for item in _items(ds.ContentSequence):
        if item.get("ValueType") == "SCOORD3D" and sop_class_uid in _NO_SCOORD3D:
            raise ValueError('Argument "ds" holds 3D spatial coordinates, which the target class cannot carry.')
        if "ReferencedContentItemIdentifier" in item and sop_class_uid in _NO_BY_REFERENCE:
            raise ValueError(
                'Argument "ds" holds by-reference relationships, which the target class cannot carry.'
            )


def _rename_predecessors(ds: Dataset, source: str, target: str) -> None:
    renamed: dict[str, str] = {}
    for study in ds.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for ref in series.get("ReferencedSOPSequence", []):
                if str(ref.ReferencedSOPClassUID) != source:
                    continue
                old = str(ref.ReferencedSOPInstanceUID)
                renamed[old] = derived_sop_instance_uid(old, target)
                ref.ReferencedSOPClassUID = target
                ref.ReferencedSOPInstanceUID = renamed[old]
    if not renamed:
        return
    for item in _items(ds.ContentSequence):
        if item.get("ValueType") == "TEXT":
            text = str(item.TextValue)
            for old, new in renamed.items():
                # The whole UID, never the head of a longer one.
                text = re.sub(rf"(?<![0-9.]){re.escape(old)}(?![0-9]|\.[0-9])", new, text)
            item.TextValue = text
