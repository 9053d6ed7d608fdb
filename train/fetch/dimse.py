"""DIMSE plumbing shared by the query and the retrieval: associations, statuses, contexts."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association

from echonode.delivery.dimse import REJECT_REASONS, Peer
from echonode.dicomfile import RETIRED_US_STORAGE
from echonode.network.tls import client_ssl_context

from .errors import FetchError
from .reader import install_on_connection

# pynetdicom logs every query identifier (a patient ID from --studies) and
# every response identifier at INFO; fetch keeps pynetdicom at WARNING, and
# these stay off in case a caller does not.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

#: Image storage classes an echo study holds.
ECHO_IMAGE_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    *RETIRED_US_STORAGE,  # the retired (pre-1996) US and US Multi-frame classes
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
#: The SR classes measurement reports come in.
ECHO_SR_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
)
ECHO_STORAGE_CLASSES = ECHO_IMAGE_CLASSES + ECHO_SR_CLASSES

UNCOMPRESSED: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Every encoding an echo object may be stored in. Proposed one per
#: presentation context (C-GET), so the PACS can send each object as it holds
#: it, without transcoding; the bytes arrive as they are stored.
IMAGE_ENCODINGS: tuple[UID, ...] = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
)

#: The encodings a C-GET asks for one at a time when a PACS failed to send
#: some instances over the usual contexts (:func:`get_contexts`): lossless
#: first, so that a PACS that converts reaches for a lossy one only when
#: nothing lossless served.
FALLBACK_ENCODINGS: tuple[UID, ...] = (
    RLELossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

#: A requestor may propose at most this many presentation contexts (PS3.8 9.3.2.2: IDs 1..255, odd).
MAX_CONTEXTS = 128


def get_contexts() -> list[tuple[str, list[UID]]]:
    """The presentation contexts of a C-GET association: the GET model, then storage.

    One context per (class, encoding), Explicit and Implicit VR Little Endian
    apart too, so that whatever a PACS holds it can send as it holds it; SRs
    uncompressed or deflated. 103 contexts, within the 128 allowed.
    """
    contexts: list[tuple[str, list[UID]]] = [(STUDY_ROOT_GET, list(UNCOMPRESSED))]
    for sop_class in ECHO_IMAGE_CLASSES:
        contexts.extend((sop_class, [ts]) for ts in (*UNCOMPRESSED, *IMAGE_ENCODINGS))
    for sop_class in ECHO_SR_CLASSES:
        contexts.extend((sop_class, [ts]) for ts in (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian))
    assert len(contexts) <= MAX_CONTEXTS
    return contexts


def single_encoding_get_contexts(encoding: UID) -> list[tuple[str, list[UID]]]:
    """The contexts of a C-GET that takes the image classes in ``encoding`` only (no SR classes).

    Some PACS (dcmtk's ``dcmqrscp`` 3.6.7) send each instance over the first
    context they accepted for its SOP class, whatever its transfer syntax,
    and fail the instances stored in another encoding (they cannot convert
    them). Over these contexts such a PACS sends what it holds in
    ``encoding`` as it holds it.
    """
    contexts: list[tuple[str, list[UID]]] = [(STUDY_ROOT_GET, list(UNCOMPRESSED))]
    contexts.extend((sop_class, [encoding]) for sop_class in ECHO_IMAGE_CLASSES)
    return contexts


def storage_roles() -> list[Any]:
    """SCP/SCU role selection: fetch is the storage SCP on a C-GET association."""
    return [build_role(sop_class, scp_role=True) for sop_class in ECHO_STORAGE_CLASSES]




def make_ae(local_ae_title: str, timeout_s: float, max_pdu: int) -> AE:
    """An AE whose every wait (connect, association, each DIMSE message, idle) has a deadline."""
    ae = AE(ae_title=local_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    return ae


def no_delay(assoc: Association) -> None:
    """Turn off Nagle's algorithm on the association's socket.

    A request goes out as two PDUs (command, then identifier): with Nagle on,
    the second waits for the peer's delayed ACK of the first, about 40 ms a
    request (C-FIND round trips measured 95 ms against Orthanc, 49 ms without).
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(
    local_ae_title: str,
    peer: Peer,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    timeout_s: float,
    max_pdu: int = 131072,
    ext_neg: list[Any] | None = None,
    handlers: list[tuple[Any, Callable[..., Any]]] | None = None,
) -> Association:
    """Open an association with the PACS or raise :class:`FetchError` saying why not.

    A refused connection, a transient rejection, an abort or no answer is
    ``busy`` (the PACS is down or overloaded: wait, then retry); a permanent
    rejection (unknown calling or called AE title) is ``fatal``.
    """
    ae = make_ae(local_ae_title, timeout_s, max_pdu)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    try:
        ssl_ctx = client_ssl_context(peer.tls)
    except (OSError, ValueError) as exc:
        raise FetchError(f"TLS setup for {peer.host}:{peer.port} failed: {type(exc).__name__}", fatal=True) from exc
    connected: list[bool] = []
    all_handlers: list[Any] = [(evt.EVT_CONN_OPEN, lambda event: connected.append(True)),
                               (evt.EVT_CONN_OPEN, install_on_connection), *(handlers or [])]
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            ext_neg=ext_neg,
            tls_args=(ssl_ctx, peer.host) if ssl_ctx is not None else None,
            evt_handlers=all_handlers,
        )
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve host {peer.host!r}", busy=True) from exc
    except OSError as exc:
        raise FetchError(f"cannot connect to {peer.host}:{peer.port} ({type(exc).__name__})", busy=True) from exc
    if assoc.is_established:
        no_delay(assoc)
        return assoc
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if not connected:
        raise FetchError(f"cannot connect to {where}", busy=True)
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result = getattr(prim, "result", None)
        source = getattr(prim, "result_source", None)
        diag = getattr(prim, "diagnostic", None)
        why = REJECT_REASONS.get((source or 0, diag or 0), f"source {source}, reason {diag}")
        if result == 0x01:
            raise FetchError(f"association rejected permanently by {where}: {why}", fatal=True)
        raise FetchError(f"association rejected transiently by {where}: {why}", busy=True)
    if getattr(assoc.acceptor.primitive, "result", None) == 0x00 and not assoc.accepted_contexts:
        raise FetchError(f"{where} accepted none of the proposed presentation contexts", fatal=True)
    raise FetchError(f"association with {where} aborted, or no answer within {timeout_s:g} s", busy=True)


def no_answer(assoc: Association, what: str, waited_s: float) -> FetchError:
    """The error for a request that got no response: the PACS aborted, or did not answer in time."""
    timeout = float(assoc.dimse_timeout or 0)
    if timeout and waited_s < 0.9 * timeout:
        return FetchError(f"{what}: the association was aborted or the connection dropped", busy=True)
    return FetchError(f"{what}: no answer from the PACS within {timeout:g} s", busy=True)


def status_of(status: Dataset | None) -> int | None:
    """The Status of a response, None when there was none (timeout, abort)."""
    if status is None or "Status" not in status:
        return None
    return int(status.Status)


def sub_operations(status: Dataset) -> tuple[int, int, int, int]:
    """(remaining, completed, failed, warning) sub-operation counts of a C-MOVE/C-GET response."""
    def count(name: str) -> int:
        value = status.get(name)
        return int(value) if value is not None and value != "" else 0

    return (count("NumberOfRemainingSuboperations"), count("NumberOfCompletedSuboperations"),
            count("NumberOfFailedSuboperations"), count("NumberOfWarningSuboperations"))


def retrieve_failure(code: int, what: str, failed: int) -> FetchError:
    """The error for a C-MOVE/C-GET that did not end in success."""
    hexcode = f"0x{code:04X}"
    if code == 0xA801:
        return FetchError(f"{what}: 0xA801 move destination unknown: declare fetch's AE title (with its host and "
                          "port) as a DICOM node in the PACS", fatal=True)
    if code == 0xC801:  # dcm4chee: the destination is not among the AE's accepted move destinations
        return FetchError(f"{what}: 0xC801 move destination not allowed: add fetch's AE title to the PACS's "
                          "accepted move destinations", fatal=True)
    if code == 0xB000:
        return FetchError(f"{what}: {hexcode} {failed} instance(s) failed at the PACS", transient=True)
    if code & 0xFF00 == 0xA700:
        return FetchError(f"{what}: {hexcode} PACS out of resources ({failed} instance(s) failed)", busy=True)
    if code == 0xFE00:
        return FetchError(f"{what}: {hexcode} cancelled by the PACS", transient=True)
    if code & 0xF000 == 0xC000:
        return FetchError(f"{what}: {hexcode} unable to process", transient=True)
    return FetchError(f"{what}: {hexcode} refused", transient=True)
