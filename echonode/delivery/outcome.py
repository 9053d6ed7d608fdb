"""What one delivery attempt ends in, whatever the destination speaks (DIMSE or STOW-RS).

:func:`classify_store_status` reads a store status (C-STORE's, or a STOW-RS
FailureReason); :class:`Sent` says what the destination stored: the SR as written, or the
same report in another class (the SOP Class and Instance UIDs it got), and
what it answered. :class:`DeliveryError` says why not, and whether retrying
can help. Both kinds of destination raise and return these, so that the
outbox (:mod:`echonode.delivery.outbox`) treats them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from echonode.report.sop import as_sop_class


class DeliveryError(Exception):
    """A failed attempt; ``permanent`` says whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Sent:
    """A destination has stored the SR.

    Attributes
    ----------
    status : str
        The destination's answer as logged: ``0x0000`` (a C-STORE status)
        or ``HTTP 200``.
    sop_class_uid : str
        The SOP Class UID of what was sent: the SR's own, or the class it
        fell back to for this destination.
    sop_instance_uid : str
        The SOP Instance UID of what was sent: the SR's own, or the one
        derived for the fallback class (the same at every resend).
    warning : str or None
        A warning the destination gave with it (the instance is stored).
    """

    status: str
    sop_class_uid: str
    sop_instance_uid: str
    warning: str | None = None


#: Warning statuses outside 0xB000-0xBFFF (PS3.7 C.4: attribute list error,
#: attribute value out of range, and the general warning).
_GENERAL_WARNINGS = (0x0001, 0x0107, 0x0116)


def classify_store_status(status: int) -> tuple[bool, bool]:
    """(stored, permanent) for a C-STORE response status, or a STOW-RS FailureReason.

    Parameters
    ----------
    status : int
        The Status of the C-STORE response, or the FailureReason
        (0008,1197) a STOW-RS response gives an instance (PS3.18 uses the
        C-STORE codes).

    Returns
    -------
    tuple of bool
        ``stored``: the peer has the instance; ``permanent``: when not
        stored, whether retrying cannot help.

    Notes
    -----
    Every warning (0xB000-0xBFFF, e.g. 0xB000 coercion, 0xB006 elements
    discarded, 0xB007 data set does not match the SOP class; and the general
    warnings 0x0001, 0x0107, 0x0116) means the peer stored the instance
    (PS3.7 C.4), so it counts as delivered: dead-lettering it would have an
    operator resend an SR the PACS already holds. 0x0111 (the instance is
    already there: our own resend after a crash) counts as stored too.
    """
    if status in (0x0000, 0x0111, *_GENERAL_WARNINGS) or 0xB000 <= status <= 0xBFFF:
        return True, False
    if 0xA700 <= status <= 0xA7FF or status in (0x0213, 0x0210):  # out of resources, busy
        return False, False
    return False, True


def converted_report(ds: Dataset, sop_class_uid: str) -> Dataset:
    """The same report in ``sop_class_uid`` (the fallback for one destination), or why it cannot be.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The SR as read from its file.
    sop_class_uid : str
        The class the destination takes.

    Returns
    -------
    pydicom.dataset.Dataset
        :func:`echonode.report.sop.as_sop_class` of ``ds``: its SOP Instance
        UID derived from the original's and the class, the same at every
        resend.

    Raises
    ------
    DeliveryError
        Permanent, when the report holds what that class cannot carry.
    """
    try:
        return as_sop_class(ds, sop_class_uid)
    except ValueError as exc:
        raise DeliveryError(f"the destination takes only {sop_class_uid}, which cannot carry this SR: {exc}",
                            permanent=True) from exc
