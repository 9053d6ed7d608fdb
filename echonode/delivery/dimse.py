"""SRs to a DICOM peer: association, C-STORE in the SR class the peer takes, C-ECHO.

One attempt is one association under a hard deadline kept from outside it
(:mod:`echonode.network.deadline`), with the PDU limits and read deadlines of
:mod:`echonode.network.pdu_guard`. Every SR class is proposed (each in Explicit
and Implicit VR Little Endian, the file's own syntax first); the best the
peer takes is sent (:mod:`echonode.report.sop`). What comes back is sorted
into stored, retried or dead (:mod:`echonode.delivery.outcome`).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

from echonode.config import Config, Destination, TLSConfig
from echonode.delivery.outcome import (
    DeliveryError,
    Sent,
    classify_store_status,
    converted_report,
)
from echonode.network.deadline import STOP, AssociationDeadline
from echonode.network.pdu_guard import guard_connection
from echonode.network.tls import client_ssl_context
from echonode.ops.logs import get_logger
from echonode.report.sop import SR_SOP_CLASS_UIDS, fallback_sop_class, sendable_classes

__all__ = ["PROTOCOL_TIMER_MARGIN_S", "REJECT_REASONS", "Peer", "associate", "echo", "store_file"]

log = get_logger(__name__)


@dataclass(frozen=True)
class Peer:
    """Where to connect: a configured destination or an ``AET@HOST:PORT`` string."""

    ae_title: str
    host: str
    port: int
    tls: TLSConfig = TLSConfig()

    @classmethod
    def parse(cls, text: str, cfg: Config) -> Peer:
        """A destination name from the config, or ``AET@HOST:PORT``.

        Raises
        ------
        ValueError
            Naming what is wrong.
        """
        try:
            d = cfg.destination(text)
        except KeyError:
            pass
        else:
            if d.kind != "dimse":
                raise ValueError(f"destination {text!r} is a STOW-RS destination ({d.url}), not a DICOM peer")
            return cls(d.ae_title, d.host, d.port, d.tls)
        m = re.match(r"^([^@]{1,16})@(\[[0-9a-fA-F:]+\]|[^:]+):(\d{1,5})$", text)
        if not m:
            names = ", ".join(d.name for d in cfg.destinations) or "none configured"
            raise ValueError(f"unknown destination {text!r}: give a configured name ({names}) or AET@HOST:PORT")
        host = m.group(2).strip("[]")
        return cls(m.group(1), host, int(m.group(3)))

    @classmethod
    def of(cls, dest: Destination) -> Peer:
        return cls(dest.ae_title, dest.host, dest.port, dest.tls)


#: Proposed for every SR after the file's own transfer syntax: pynetdicom
#: converts between these two, not to Big Endian (retired) or compressed ones.
SEND_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: A presentation context's result when the peer knows the abstract syntax
#: but none of the proposed transfer syntaxes (PS3.8 9.3.3.2).
_TRANSFER_SYNTAX_NOT_SUPPORTED = 0x04

#: A-ASSOCIATE-RJ (source, reason/diag) -> what it means (PS3.8 9.3.4).
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}

#: How far beyond an attempt's deadline pynetdicom's own timers are set.
PROTOCOL_TIMER_MARGIN_S = 1.0

#: Rejections whose reason is temporary whatever result the peer chose: the
#: presentation service provider's "temporary congestion" and "local limit
#: exceeded" (PS3.8 9.3.4). Some PACS send them as rejected-permanent.
_TEMPORARY_REJECT_REASONS = {(3, 1), (3, 2)}


def associate(
    local_ae_title: str,
    peer: Peer,
    contexts: list[tuple[str, list[str] | None]],
    timeout_s: float = 30.0,
    max_pdu: int = 131072,
    deadline: AssociationDeadline | None = None,
) -> Association:
    """Open an association or raise :class:`DeliveryError` saying why not.

    With ``deadline``, the association is handed to it as soon as its
    connection opens, so that the deadline can end it whatever it waits for.
    """
    ae = _requesting_ae(local_ae_title, contexts, timeout_s, max_pdu, deadline is not None)
    try:
        ctx = client_ssl_context(peer.tls)
    except (OSError, ValueError) as exc:
        # The config checked that the files exist, not what they hold: a CA
        # file that is no certificate fails here on every try until someone
        # replaces it. (ssl.SSLError is an OSError, which the caller would
        # otherwise take for an unreadable SR file.)
        raise DeliveryError(f"TLS setup for {peer.host}:{peer.port} failed: {exc}", permanent=True) from exc
    tls_args = (ctx, peer.host) if ctx is not None else None
    # pynetdicom reports a refused or timed-out TCP connection as an abort;
    # only EVT_CONN_OPEN tells the two apart.
    connected: list[bool] = []
    # The A-ASSOCIATE-RJ as it came off the wire: when it comes at once,
    # pynetdicom's requestor can find the transport closed before it reads
    # the rejection, and reports an abort instead (a race in its ACSE).
    rejection: list[tuple[int, int, int]] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        if deadline is not None:
            deadline.watch(event.assoc)

    def on_pdu(event: evt.Event) -> None:
        pdu = event.pdu
        if isinstance(pdu, A_ASSOCIATE_RJ):
            rejection.append((int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0)))

    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            tls_args=tls_args,
            # guard_connection: PDU limits and read deadlines (pdu_guard.py);
            # pynetdicom puts the socket back to blocking once connected.
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_PDU_RECV, on_pdu),
                          (evt.EVT_CONN_OPEN, guard_connection)],
        )
    except socket.gaierror as exc:
        # pynetdicom resolves the name before it connects and lets this
        # through. Transient: a resolver can be down for a while; a
        # misspelt name ends in the dead letter after max_attempts, saying so.
        raise DeliveryError(f"cannot resolve host {peer.host!r}: {exc.strerror or exc}", permanent=False) from exc
    except OSError as exc:
        raise DeliveryError(f"cannot connect to {peer.host}:{peer.port}: {exc}", permanent=False) from exc
    if assoc.is_established:
        return assoc
    raise _why_not_established(assoc, peer, connected=bool(connected), rejection=rejection[0] if rejection else None)


def _requesting_ae(
    local_ae_title: str, contexts: list[tuple[str, list[str] | None]], timeout_s: float, max_pdu: int, under_deadline: bool
) -> AE:
    """The requesting AE with its timers and presentation contexts."""
    ae = AE(ae_title=local_ae_title)
    # Under a deadline the protocol's own timers (and any read deadline
    # derived from them) are backstops set just beyond it, so that an
    # attempt the peer stalls ends at the deadline, with that reason.
    # Connecting stays bounded by timeout_s itself: the deadline only
    # reaches an association once its connection is open.
    timer_s = timeout_s + PROTOCOL_TIMER_MARGIN_S if under_deadline else timeout_s
    ae.acse_timeout = timer_s
    ae.dimse_timeout = timer_s
    ae.network_timeout = timer_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    for abstract, syntaxes in contexts:
        if syntaxes:
            ae.add_requested_context(abstract, syntaxes)
        else:
            ae.add_requested_context(abstract)
    return ae


def _why_not_established(
    assoc: Association, peer: Peer, *, connected: bool, rejection: tuple[int, int, int] | None
) -> DeliveryError:
    """The error an association that did not open ends in: permanent or not, and why."""
    if not connected:
        return DeliveryError(f"cannot connect to {peer.host}:{peer.port}", permanent=False)
    if assoc.is_rejected or rejection:
        if rejection:
            result, source, diag = rejection
        else:
            prim = assoc.acceptor.primitive
            result = getattr(prim, "result", 0) or 0
            source = getattr(prim, "result_source", 0) or 0
            diag = getattr(prim, "diagnostic", 0) or 0
        reason = REJECT_REASONS.get((source, diag), f"source {source}, reason {diag}")
        if result == 0x01 and (source, diag) in _TEMPORARY_REJECT_REASONS:
            # Retried: a PACS that is busy today takes the SR tomorrow,
            # whatever result code it chose.
            return DeliveryError(
                f"association rejected: {reason} (sent as rejected-permanent, source {source} reason {diag};"
                " retried, the reason is temporary)", permanent=False)
        permanent = result == 0x01
        kind = "permanently" if permanent else "transiently"
        return DeliveryError(f"association rejected {kind}: {reason}", permanent=permanent)
    accept = assoc.acceptor.primitive
    if getattr(accept, "result", None) == 0x00 and not assoc.accepted_contexts:
        # The peer accepted the association but none of our presentation
        # contexts (pynetdicom then aborts it): it does not take this object.
        return DeliveryError(_no_context_reason(assoc), permanent=True)
    if assoc.is_aborted:
        return DeliveryError("association aborted by the peer (or no answer to the request)", permanent=False)
    return DeliveryError(f"cannot connect to {peer.host}:{peer.port}", permanent=False)


def _no_context_reason(assoc: Association) -> str:
    """Why the peer accepted none of our presentation contexts, from each one's result."""
    refused = assoc.rejected_contexts
    syntax = sorted({_uid_name(cx.abstract_syntax) for cx in refused
                     if cx.result == _TRANSFER_SYNTAX_NOT_SUPPORTED})
    other = sorted({_uid_name(cx.abstract_syntax) for cx in refused} - set(syntax))
    parts: list[str] = []
    if other:
        parts.append(f"the destination does not accept {', '.join(other)}")
    if syntax:
        offered = ", ".join(uid.name for uid in SEND_TRANSFER_SYNTAXES)
        parts.append(f"the destination accepts {', '.join(syntax)} in none of the transfer syntaxes"
                     f" offered ({offered})")
    return "; ".join(parts) or "the destination does not accept the proposed SOP classes"


def _uid_name(uid: str | None) -> str:
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def echo(local_ae_title: str, peer: Peer, timeout_s: float = 10.0) -> int:
    """C-ECHO ``peer``; return the status (0x0000 is success).

    Raises
    ------
    DeliveryError
        When no association could be made or no response came.
    """
    with AssociationDeadline(timeout_s) as deadline:
        try:
            assoc = associate(local_ae_title, peer, [(Verification, None)], timeout_s, deadline=deadline)
            try:
                status = assoc.send_c_echo()
                if not status or "Status" not in status:
                    raise DeliveryError("no C-ECHO response", permanent=False)
                return int(status.Status)
            finally:
                assoc.release()
        except DeliveryError as exc:
            raise _cut_reason(exc, deadline, peer) from exc


def _cut_reason(exc: DeliveryError, deadline: AssociationDeadline, peer: Peer) -> DeliveryError:
    """Say that the deadline (or the node's stop) ended an attempt, rather than what pynetdicom saw then.

    What pynetdicom reports after the cut ("aborted", "no response") hides
    why; a permanent refusal that came first stands as it is.
    """
    if deadline.reason is None or exc.permanent:
        return exc
    if deadline.reason == STOP:
        return DeliveryError("interrupted: the node is stopping", permanent=False)
    return DeliveryError(
        f"no response from {peer.ae_title}@{peer.host}:{peer.port} within {deadline.seconds:g} s"
        " (association aborted)", permanent=False)


def store_file(
    local_ae_title: str, peer: Peer, path: str, timeout_s: float = 30.0,
    deadline: AssociationDeadline | None = None,
) -> Sent:
    """C-STORE one file; return what the peer stored or raise :class:`DeliveryError`.

    Everything on the network (connect, negotiate, C-STORE, release) ends
    within ``timeout_s``: ``deadline`` (started here when the caller has not;
    the caller may keep it to cut the attempt sooner), or one of its own.

    The SR's storage class is proposed in one presentation context per
    transfer syntax: the file's own first, then both little-endian
    uncompressed ones. Some PACS (and dcmtk's ``storescp +xi``) take only
    Implicit VR Little Endian, the one syntax every DICOM peer must support
    (PS3.5 10.1); pynetdicom re-encodes the SR for it. Separate contexts
    (rather than one listing every syntax, where the peer picks) let a peer
    accept the file's own syntax, which pynetdicom then prefers, so the SR
    arrives as written wherever the peer allows.

    An SR is proposed in every SR class (:func:`sendable_classes`: its own
    first), each in those contexts; a peer that does not accept its own
    class is sent the same report in the first class it accepts
    (:func:`fallback_sop_class`), under the derived SOP Instance UID.
    """
    ds = dcmread(path)
    sop_class = str(ds.SOPClassUID)
    classes = sendable_classes(sop_class) if sop_class in SR_SOP_CLASS_UIDS.values() else (sop_class,)
    tsyntax = str(ds.file_meta.TransferSyntaxUID)
    contexts: list[tuple[str, list[str] | None]] = [
        (cls, [ts]) for cls in classes for ts in dict.fromkeys([tsyntax, *SEND_TRANSFER_SYNTAXES])
    ]
    own = deadline is None
    clock = AssociationDeadline(timeout_s) if deadline is None else deadline
    clock.start()
    try:
        assoc = associate(local_ae_title, peer, contexts, timeout_s, deadline=clock)
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            target = (fallback_sop_class(sop_class, accepted) if len(classes) > 1
                      else sop_class if sop_class in accepted else None)
            if target is None:
                raise DeliveryError("the destination does not accept this SR storage class", permanent=True)
            send: Dataset = ds
            if target != sop_class:
                send = converted_report(ds, target)
                log.info("delivery.sop_class_fallback", peer=f"{peer.ae_title}@{peer.host}:{peer.port}",
                         sop_class_uid=sop_class, next_sop_class_uid=target, sent_sop_uid=str(send.SOPInstanceUID))
            rsp = assoc.send_c_store(send)
            if not rsp or "Status" not in rsp:
                raise DeliveryError("no C-STORE response (timeout or abort)", permanent=False)
            status = int(rsp.Status)
        finally:
            # A release the peer does not answer is cut by the deadline too;
            # the status it gave before stands.
            if assoc.is_established:
                assoc.release()
    except DeliveryError as exc:
        raise _cut_reason(exc, clock, peer) from exc
    finally:
        if own:
            clock.cancel()
    stored, permanent = classify_store_status(status)
    if not stored:
        raise DeliveryError(f"C-STORE refused with status 0x{status:04X}", permanent=permanent)
    warning = f"C-STORE warning 0x{status:04X}" if status not in (0x0000, 0x0111) else None
    return Sent(f"0x{status:04X}", str(send.SOPClassUID), str(send.SOPInstanceUID), warning)
