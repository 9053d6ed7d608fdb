"""What a DICOM peer can make the node read: PDU size limits and read deadlines.

pynetdicom reads a PDU as a 6-byte header, then ``recv(length)`` of
whatever length that header declares, on a socket without a timeout (it
puts an outgoing association's socket back to blocking once connected).
So a peer could make the node allocate (and zero) up to 4 GiB on its word
alone, before any access control, and a peer that stops in the middle of a
PDU (a cart unplugged mid C-STORE, a hostile socket that sent 6 bytes, a
PACS whose link dies mid-answer) held its association for ever: none of
pynetdicom's timers runs while its reader thread waits in ``recv``, and its
``abort()`` waits for that thread too.

:func:`guard` replaces that read for one association, acceptor or
requestor, before its first byte is read (``EVT_CONN_OPEN``):

- **sizes**: a P-DATA-TF PDU may be as long as the maximum length this side
  advertised (PS3.8 D.1; "0 = unlimited" is held to
  :data:`UNLIMITED_PDU_CEILING`); any other PDU (A-ASSOCIATE-RQ/AC/RJ,
  release, abort) to :data:`ASSOCIATE_PDU_CEILING`. A longer declaration
  is answered as DCMTK answers it: an A-ABORT, and the connection closed.
- **memory**: the body is read into buffers of at most :data:`READ_CHUNK`
  bytes as it arrives, so what a PDU costs follows what the peer sent,
  never what it declared.
- **deadlines**: before the association is established, everything must
  arrive within ``acse_timeout`` of the TCP connection (PS3.8's ARTIM);
  once established, a PDU must arrive whole within ``network_timeout`` of
  its first byte (a read may end up to half a second late). A peer that misses the
  deadline is aborted, the connection closed. The socket keeps ``network_timeout`` as its own
  timeout, which bounds every send too: a peer that stops reading cannot
  hold a sender for ever.
- **stopping**: :meth:`PduGuard.abort` ends an association from another
  thread at once (A-ABORT, then the socket shut down, which ends a read in
  the middle of a PDU); pynetdicom's own ``abort()`` would wait for the
  read's deadline.
- **no silent thread death**: an exception while the state machine handles
  a PDU (pynetdicom lets it end the reader thread, printed as a raw
  traceback on stderr) aborts the association instead.

Each refusal is logged once with the peer and the figures that decided it
(``association.pdu_too_large``, ``association.stalled``,
``association.bad_pdu``, ``association.failed``) and reported to the
caller's ``on_fault`` (for counters).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_P_ABORT

from echonode.ops.logs import get_logger

log = get_logger(__name__)

#: The longest A-ASSOCIATE-RQ/AC (or any PDU but P-DATA-TF) a peer may send:
#: 1 MiB, DCMTK's ``dcmAssociatePDUSizeLimit``. A request proposing all 128
#: presentation contexts with ten transfer syntaxes each is about 100 KB, a
#: user identity item at most 128 KiB; release, reject and abort PDUs are 10 bytes.
ASSOCIATE_PDU_CEILING = 1 << 20
#: What "unlimited" (a maximum length of 0) still means for a P-DATA-TF PDU:
#: 64 MiB, the largest ``node.max_pdu`` the configuration takes.
UNLIMITED_PDU_CEILING = 1 << 26
#: Largest buffer allocated for a PDU body before its bytes have arrived.
READ_CHUNK = 1 << 20
#: The largest command set accepted. A DIMSE command is a few hundred bytes
#: (UIDs, a status, a move destination); pynetdicom holds one in memory
#: until its last fragment, so a peer that never ends one would grow the
#: node without bound.
MAX_COMMAND_BYTES = 64 * 1024
#: Used when an association has no timeout set (pynetdicom's own defaults).
DEFAULT_ACSE_TIMEOUT_S = 30.0
DEFAULT_NETWORK_TIMEOUT_S = 60.0
#: How long the A-ABORT that precedes a forced close may take to send.
ABORT_SEND_TIMEOUT_S = 1.0
#: How far past its deadline a read may end (see _fill).
_TIMEOUT_SLACK_S = 0.5

P_DATA_TF = 0x04
A_ASSOCIATE_RQ = 0x01
A_ABORT = 0x07
_PDU_TYPES = range(0x01, 0x08)
#: Upper-layer states before the association is established: idle (an
#: acceptor's reader may read before it has handled the connection event;
#: once an association has ended its socket is closed), waiting for the
#: A-ASSOCIATE-RQ (acceptor), for our own answer, for the transport or for
#: the A-ASSOCIATE-AC (requestor).
_NEGOTIATING = frozenset({"Sta1", "Sta2", "Sta3", "Sta4", "Sta5"})
#: States in which an acceptor has not yet received an A-ASSOCIATE-RQ.
_AWAITING_REQUEST = frozenset({"Sta1", "Sta2"})
#: Waiting for the transport to close: an A-RELEASE-RP or an A-ABORT was sent already.
_CLOSING = "Sta13"

# A-ABORT reasons for source 2, service provider (PS3.8 9.3.8).
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER_VALUE = 0x06

_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT",
}

#: Called with the kind of fault (``pdu_too_large``, ``stalled``, ``bad_pdu``, ``failed``).
FaultCallback = Callable[[str], None]

#: The attribute of an Association that holds its guard. On the association
#: itself, not in a registry keyed by it: the guard refers back to the
#: association, which would keep every association of a weak-keyed registry
#: alive for ever.
_ATTRIBUTE = "_echonode_pdu_guard"


class _PeerClosed(Exception):
    """The peer closed (or reset) the connection; ``received`` bytes of the PDU had come."""

    def __init__(self, received: int) -> None:
        self.received = received


class _Stalled(Exception):
    """The deadline passed with ``received`` bytes of the PDU read."""

    def __init__(self, received: int) -> None:
        self.received = received


def abort_pdu(reason: int, source: int = 0x02) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8) from ``source`` (2: service provider) with ``reason``."""
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


class PduGuard:
    """The bounded PDU reader of one association; see the module's docstring.

    Parameters
    ----------
    assoc : Association
        Acceptor or requestor, its socket connected, nothing read yet.
    on_fault : callable, optional
        Called with the kind of each fault that ended the association.
    context : dict, optional
        Extra fields for this guard's log lines (an association id).
    """

    def __init__(self, assoc: Association, on_fault: FaultCallback | None = None,
                 context: dict[str, Any] | None = None) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        local, remote = (assoc.acceptor, assoc.requestor) if assoc.is_acceptor else (assoc.requestor, assoc.acceptor)
        self.max_pdata = int(local.maximum_length or 0) or UNLIMITED_PDU_CEILING
        self.acse_timeout = float(assoc.acse_timeout or DEFAULT_ACSE_TIMEOUT_S)
        self.network_timeout = float(assoc.network_timeout or DEFAULT_NETWORK_TIMEOUT_S)
        self.connected_at = time.monotonic()
        self.on_fault = on_fault
        info = remote.address_info
        self.fields: dict[str, Any] = {
            **(context or {}),
            "peer": info.address if info is not None else "",
            "peer_port": info.port if info is not None else 0,
            "role": "acceptor" if assoc.is_acceptor else "requestor",
        }
        #: The called and calling AE title fields of the A-ASSOCIATE-RQ as
        #: received (16 bytes each): pynetdicom strips them with str.strip(),
        #: which takes tabs and newlines for DICOM padding.
        self.rq_ae_titles: tuple[bytes, bytes] | None = None
        #: Why the guard ended the association (None while it has not).
        self.fault: str | None = None
        #: Bytes of the command set being received (pynetdicom holds a
        #: command in memory until its last fragment; a data set is spooled).
        self.command_bytes = 0

    # -- reading ------------------------------------------------------------------------

    def read_pdu(self) -> None:
        """Read one PDU and hand it to the state machine; replaces ``DULServiceProvider._read_pdu_data``.

        Emits the events pynetdicom's reader emits (PS3.8 9.2): the PDU's
        own event, Evt17 when the connection closed, Evt19 for a PDU that
        does not decode; a fault closes the connection (Evt17) itself.
        """
        dul = self.dul
        sock = dul.socket.socket if dul.socket is not None else None
        if sock is None:
            self._closed()
            return
        negotiating = dul.state_machine.current_state in _NEGOTIATING
        deadline = (self.connected_at + self.acse_timeout) if negotiating else (time.monotonic() + self.network_timeout)
        started = time.monotonic()
        head = bytearray(6)
        try:
            _fill(sock, memoryview(head), deadline, 0)
        except _PeerClosed:
            self._closed()
            return
        except _Stalled as exc:
            self._stalled(exc.received, None, started, negotiating)
            return
        pdu_type, _, length = struct.unpack(">BBI", head)
        if pdu_type not in _PDU_TYPES:
            self._fault("bad_pdu", "association.bad_pdu", ABORT_UNRECOGNIZED_PDU,
                        reason="unrecognized PDU type", pdu_type=f"0x{pdu_type:02X}")
            return
        if pdu_type not in (A_ASSOCIATE_RQ, A_ABORT) and self._awaiting_request():
            # pynetdicom would abort it too (AA-1), but say nothing of why.
            self._fault("bad_pdu", "association.bad_pdu", ABORT_UNEXPECTED_PDU,
                        reason="a PDU other than an A-ASSOCIATE-RQ before the request", pdu_type=_PDU_NAMES[pdu_type])
            return
        limit = self.max_pdata if pdu_type == P_DATA_TF else ASSOCIATE_PDU_CEILING
        if length > limit:
            self._fault("pdu_too_large", "association.pdu_too_large", ABORT_INVALID_PARAMETER_VALUE,
                        pdu_type=_PDU_NAMES[pdu_type], declared_bytes=length, limit_bytes=limit)
            return
        try:
            data = _read_body(sock, head, length, deadline)
        except _PeerClosed:
            self._closed()
            return
        except _Stalled as exc:
            self._stalled(6 + exc.received, 6 + length, started, negotiating)
            return
        if sock.gettimeout() != self.network_timeout:
            # Sends wait network_timeout (the read may have left a shorter timeout on the socket).
            with contextlib.suppress(OSError):
                sock.settimeout(self.network_timeout)
        if pdu_type == A_ASSOCIATE_RQ and len(data) >= 42:
            self.rq_ae_titles = (bytes(data[10:26]), bytes(data[26:42]))
        try:
            pdu, event = dul._decode_pdu(data)  # type: ignore[arg-type]  # annotated bytearray, decodes bytes too
        except Exception as exc:  # noqa: BLE001 - any undecodable PDU: Evt19, as pynetdicom does
            log.warning("association.bad_pdu", **self.fields, reason="PDU does not decode",
                        pdu_type=_PDU_NAMES[pdu_type], pdu_bytes=6 + length, error=type(exc).__name__)
            if self.on_fault is not None:
                self.on_fault("bad_pdu")
            dul.event_queue.put("Evt19")
            return
        if pdu_type == P_DATA_TF:
            largest, self.command_bytes = command_bytes(data, self.command_bytes)
            if largest > MAX_COMMAND_BYTES:
                self._fault("command_too_large", "association.command_too_large", ABORT_INVALID_PARAMETER_VALUE,
                            received_bytes=largest, limit_bytes=MAX_COMMAND_BYTES)
                return
        if pdu_type == A_ASSOCIATE_RQ:
            bad_id = _bad_context_id(pdu)
            if bad_id is not None:
                # pynetdicom would raise turning the PDU into a request, in
                # its state machine's thread, and leave the peer unanswered.
                self._fault("bad_pdu", "association.bad_pdu", ABORT_INVALID_PARAMETER_VALUE,
                            reason=f"presentation context ID {bad_id} is not an odd number from 1 to 255",
                            pdu_type=_PDU_NAMES[pdu_type])
                return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    # -- faults ---------------------------------------------------------------------------

    def _stalled(self, received: int, expected: int | None, started: float, negotiating: bool) -> None:
        phase = "association negotiation" if negotiating else "PDU"
        timeout = "acse_timeout_s" if negotiating else "network_timeout_s"
        self._fault("stalled", "association.stalled", ABORT_NOT_SPECIFIED, phase=phase, received_bytes=received,
                    expected_bytes=expected, waited_s=round(time.monotonic() - started, 1), deadline=timeout)

    def _fault(self, kind: str, event: str, abort_reason: int, **fields: Any) -> None:
        """Log and count a fault, send an A-ABORT, close the connection (Evt17)."""
        self.fault = kind
        log.warning(event, **self.fields, **fields)
        if self.on_fault is not None:
            self.on_fault(kind)
        self._send_abort(abort_reason)
        dul = self.dul
        awaiting_request = self._awaiting_request()
        if dul.socket is not None:
            # Shuts the socket down and queues Evt17: the state machine then
            # tells the user (A-P-ABORT) and returns to idle.
            dul.socket.close()
        if awaiting_request:
            self._end_wait_for_request()

    def _closed(self) -> None:
        """The peer closed the connection (or it was closed under the reader): Evt17."""
        awaiting_request = self._awaiting_request()
        self.dul.event_queue.put("Evt17")
        if awaiting_request:
            # A connect-and-close burst would otherwise hold one acceptor
            # thread per connection for acse_timeout, each counted against
            # pynetdicom's association limit: carts locked out meanwhile.
            self._end_wait_for_request()

    def _awaiting_request(self) -> bool:
        return self.assoc.is_acceptor and self.dul.state_machine.current_state in _AWAITING_REQUEST

    def _end_wait_for_request(self) -> None:
        # Before an A-ASSOCIATE-RQ the state machine tells nobody (AA-5),
        # and pynetdicom's acceptor thread would wait out acse_timeout for a
        # request that cannot come, holding a max_associations slot. An
        # abort in its place ends that wait now (the thread then skips
        # negotiation for an aborted association).
        self.assoc.is_aborted = True
        self.dul.to_user_queue.put(A_P_ABORT())

    def abort(self) -> bool:
        """End the association now, from any thread (the node stopping).

        pynetdicom's ``Association.abort()`` waits for the reader thread to
        return to idle, and a reader waiting for the rest of a PDU returns
        only at its deadline (``acse_timeout_s`` or ``network_timeout_s``).
        Here the peer is sent an A-ABORT and the socket is shut down, which
        ends a read in progress at once: the reader sees a closed connection
        (Evt17) and the state machine goes idle. Not a fault of the peer:
        nothing is counted.

        An association already :func:`ending` (it may have finished its
        release since the caller looked) gets no A-ABORT after its last word,
        only the socket shut.

        Returns
        -------
        bool
            Whether an A-ABORT was sent.
        """
        if ending(self.assoc):
            self.close_transport()
            return False
        self._send_abort(ABORT_NOT_SPECIFIED)
        self.close_transport()
        return True

    def close_transport(self) -> None:
        """Shut the socket down without a word to the peer, from any thread (the node stopping).

        For an association already released or aborted: its thread may
        still wait for the peer to close the connection or for a timer
        (ARTIM, up to ``acse_timeout_s``), or sit in a read the peer left
        half done. The peer has had its answer, so no A-ABORT is sent; the
        reader sees the connection closed (Evt17) and the thread ends now.
        """
        dul = self.dul
        awaiting_request = self.assoc.is_acceptor and dul.state_machine.current_state in _AWAITING_REQUEST
        sock = dul.socket.socket if dul.socket is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if awaiting_request:
            # As in _fault: the acceptor thread waits for the request on
            # its own clock, and nobody else tells it there will be none.
            self.assoc.is_aborted = True
            dul.to_user_queue.put(A_P_ABORT())

    def _send_abort(self, reason: int) -> None:
        sock = self.dul.socket.socket if self.dul.socket is not None else None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.settimeout(ABORT_SEND_TIMEOUT_S)
            sock.sendall(abort_pdu(reason))

    def do_action(self, original: Callable[[str], None], event: str) -> None:
        """Run one state-machine action; an exception aborts the association instead of ending the thread."""
        try:
            original(event)
        except Exception:  # the reader thread must not die with the association half open
            self.fault = "failed"
            log.exception("association.failed", **self.fields, fsm_event=event)
            if self.on_fault is not None:
                self.on_fault("failed")
            self._send_abort(ABORT_NOT_SPECIFIED)
            dul = self.dul
            if dul.socket is not None:
                dul.socket._shutdown_socket()
            # What the state machine would have done for a closed connection
            # (AA-4): wake a user waiting for a DIMSE message or an ACSE
            # primitive, and stop the reader thread (pynetdicom's do_action
            # has already asked it to stop).
            self.assoc.dimse.msg_queue.put((None, None))
            primitive = A_P_ABORT()
            primitive.provider_reason = 0x00
            dul.to_user_queue.put(primitive)
            dul.kill_dul()


def command_bytes(pdu: bytes | bytearray, pending: int) -> tuple[int, int]:
    """Command-set bytes in the PDVs of one P-DATA-TF PDU (PS3.8 9.3.5.1, E.2).

    Parameters
    ----------
    pdu : bytes
        The whole PDU, header included.
    pending : int
        Bytes of the command in progress before it.

    Returns
    -------
    tuple of int
        ``(largest, pending)``: the largest size a command reached in this
        PDU, and the bytes of a command still unfinished after it (0 once a
        last fragment came). A PDV that runs past the PDU's end counts what
        is there (pynetdicom refuses the PDU anyway).
    """
    largest = pending
    pos, end = 6, len(pdu)
    while pos + 6 <= end:
        item_length = int.from_bytes(pdu[pos : pos + 4], "big")
        control = pdu[pos + 5]
        if control & 0x01:  # a command fragment
            pending += max(0, min(item_length, end - pos - 4) - 2)
            largest = max(largest, pending)
            if control & 0x02:  # its last fragment: the command is complete
                pending = 0
        pos += 4 + item_length
    return largest, pending


def _bad_context_id(rq: Any) -> int | None:
    """The first presentation context ID of a decoded A-ASSOCIATE-RQ that is not odd and 1-255 (PS3.8 9.3.2.2)."""
    for item in getattr(rq, "presentation_context", ()):
        cid = item.context_id
        if cid is None or not (1 <= cid <= 255) or cid % 2 == 0:
            return cast(int | None, cid)
    return None


def _fill(sock: Any, view: memoryview, deadline: float, done: int) -> None:
    """Fill ``view`` from ``sock`` before ``deadline``; ``done`` bytes of the PDU precede it (for reports)."""
    got, n = 0, len(view)
    try:
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Stalled(done + got)
            # Lowered only when the deadline is nearer than the socket's own
            # timeout (a syscall per change): a recv may then end up to
            # _TIMEOUT_SLACK_S past the deadline, never more.
            current = sock.gettimeout()
            if not current or left < current - _TIMEOUT_SLACK_S:
                sock.settimeout(left)
            k = sock.recv_into(view[got:], n - got)
            if not k:
                raise _PeerClosed(done + got)
            got += k
    except TimeoutError:
        raise _Stalled(done + got) from None
    except OSError:
        # Reset, or the socket closed under us (an abort from another thread).
        raise _PeerClosed(done + got) from None
    finally:
        view.release()


def _read_body(sock: Any, head: bytearray, length: int, deadline: float) -> bytearray | bytes:
    """The whole PDU (header and ``length`` bytes of body), allocated as it arrives."""
    if length <= READ_CHUNK:
        buf = bytearray(6 + length)
        buf[:6] = head
        _fill(sock, memoryview(buf)[6:], deadline, 0)
        return buf
    parts: list[bytes | bytearray] = [head]
    done = 0
    while done < length:
        chunk = bytearray(min(READ_CHUNK, length - done))
        _fill(sock, memoryview(chunk), deadline, done)
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


# -- installing -----------------------------------------------------------------------


def guard(assoc: Association, on_fault: FaultCallback | None = None,
          context: dict[str, Any] | None = None) -> PduGuard:
    """Bound what ``assoc`` reads from now on; call it before its first PDU is read.

    Parameters
    ----------
    assoc : Association
        Its socket connected (``EVT_CONN_OPEN`` is the place).
    on_fault : callable, optional
        Called with the kind of each fault (for counters).
    context : dict, optional
        Extra fields for the guard's log lines.

    Returns
    -------
    PduGuard
    """
    g = PduGuard(assoc, on_fault, context)
    dul = assoc.dul
    # Instance attributes shadow the class's methods for this association only
    # (what mypy's method-assign refuses is the point here).
    dul._read_pdu_data = g.read_pdu  # type: ignore[method-assign]
    original = dul.state_machine.do_action
    dul.state_machine.do_action = lambda event: g.do_action(original, event)  # type: ignore[method-assign]
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is not None:
        # Closed already (the peer went at once): the first read says so.
        with contextlib.suppress(OSError):
            sock.settimeout(g.network_timeout)
    setattr(assoc, _ATTRIBUTE, g)
    return g


def guard_connection(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler that guards the association (outgoing ones: delivery, echo)."""
    guard(event.assoc)


def ending(assoc: Association) -> bool:
    """``assoc`` has had its last word and only its thread is finishing: released, aborted, or an
    A-ABORT sent (by the node, or by pynetdicom on a timeout: its private ``_sent_abort``), the
    state machine waiting for the connection to close."""
    dul = getattr(assoc, "dul", None)
    state = dul.state_machine.current_state if dul is not None else None
    return bool(assoc.is_released or assoc.is_aborted or getattr(assoc, "_sent_abort", False) or state == _CLOSING)


def guard_of(assoc: Association) -> PduGuard | None:
    """The guard installed on ``assoc``, if any."""
    g = getattr(assoc, _ATTRIBUTE, None)
    return g if isinstance(g, PduGuard) else None
