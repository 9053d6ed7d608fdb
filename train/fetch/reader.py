"""A buffered PDU reader for fetch's associations: many PDUs per read, one data fragment per run of them.

pynetdicom reads every PDU on its own: a ``select``, a 6-byte ``recv``, the
body in ``recv`` calls of 4 KiB, the PDU's decoding and events, a turn of
the state machine, and a write and a flush of its fragment to the C-STORE's
temp file. That is a fixed cost of Python per PDU, whatever its size, and
Orthanc sends a C-GET's data in PDUs of 16 KB whatever maximum length was
agreed: the cost per PDU, not the bytes, set the pace of a C-GET.

:func:`install` replaces that read for one association, acceptor or
requestor: before its first PDU is read (``EVT_CONN_OPEN``: the
associations fetch opens), or once the association is accepted
(``EVT_ACCEPTED``: the C-MOVE listener's, which the node's PDU guard reads
until then; the guard reads whole PDUs and never ahead, so nothing is
left behind for this reader to miss):

- **reads**: one ``recv_into`` takes what the socket holds, up to
  :data:`READ_CHUNK`; a PDU whose bytes have not all come stays in the
  buffer, and the reader does not wait for the rest in ``recv`` (over TLS a
  read may wait for the rest of a TLS record, as pynetdicom's does).
- **joining**: the complete P-DATA-TF PDUs in the buffer go to the state
  machine as one P-DATA-TF, in which each run of data-set fragments of one
  presentation context is one fragment. The run ends with the PDU that
  carries the last fragment of a command or data set, so one P-DATA never
  holds the end of one DIMSE message and the start of the next, and at
  :data:`JOIN_LIMIT` bytes. The DIMSE layer receives the same bytes of the
  same messages in the same order; only the fragment boundaries differ.
  Each joined fragment is the one copy between the socket and the C-STORE's
  temp file (the DIMSE layer gets a view of it). Every other PDU goes on as
  it came, through pynetdicom's decoding.
- **sizes**: a P-DATA-TF PDU may be as long as the maximum length this side
  announced (``0``, unlimited, is held to
  :data:`~echonode.network.pdu_guard.UNLIMITED_PDU_CEILING`), any other PDU
  to :data:`~echonode.network.pdu_guard.ASSOCIATE_PDU_CEILING`; the buffer
  grows as bytes arrive, never on a declared length. A PDU over its limit,
  or of an unknown type, is Evt19 (pynetdicom's answer to an invalid PDU:
  an A-ABORT), and what follows on that connection is read and dropped.
- **events**: ``EVT_DATA_RECV`` and ``EVT_PDU_RECV`` fire once per P-DATA-TF
  handed on, the first with the bytes of the PDUs it joins, as read (the
  bandwidth cap counts the same total), a
  closed connection is Evt17, an undecodable PDU Evt19, as pynetdicom's own
  reader reports them.

- **acknowledgements**: every read leaves the kernel's delayed-ACK mode
  (:func:`quick_ack`): a PACS that writes a small PDU in two pieces with
  Nagle's algorithm on otherwise waits up to 40 ms for the first piece's
  acknowledgement before it sends the second.
- **waits**: pynetdicom's DUL reactor sleeps 1 ms whenever a turn of its
  loop found nothing to do, so a response queued for sending, or the next
  request's first bytes, waited up to that long: once or twice per
  instance, a C-STORE's turnaround, against the 20-30 ms an 8 MB object
  takes on loopback. The reader waits instead, in ``select``, on the socket
  and on a wake-up socket pair that a primitive queued for sending (the
  queue's ``put``) and a stop of the reactor write to: the reactor turns
  as soon as there is something to do. In the middle of a data set it
  waits for the send queue only, for at most :data:`STREAM_BATCH_S`, as
  the 1 ms sleep did: the bytes of the rest of the data set then come in
  large reads, not one PDU of 16 KB at a time. The longest wait is
  :data:`IDLE_WAIT_S`, so the reactor's timers (ARTIM, idle) are still
  checked in time.

Deadlines are unchanged: the waits for DIMSE messages keep theirs
(``dimse_timeout``), and the DUL's idle timer restarts only when a whole
PDU has been handed on.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu import P_DATA_TF as P_DATA_TF_PDU
from pynetdicom.pdu_items import PresentationDataValueItem

from echonode.network.pdu_guard import ASSOCIATE_PDU_CEILING, MAX_COMMAND_BYTES, UNLIMITED_PDU_CEILING
from echonode.ops.logs import get_logger

log = get_logger(__name__)

#: Most bytes one ``recv_into`` takes from the socket.
READ_CHUNK = 1 << 20
#: Most bytes of P-DATA-TF PDUs joined into one (a run stops after the PDU that crosses it).
JOIN_LIMIT = 2 << 20

#: Longest wait of one turn of the reactor with nothing to do (its timers are checked between turns).
IDLE_WAIT_S = 0.05
#: Wait of one turn in the middle of a data set: the socket is not watched, so the next read takes
#: what came meanwhile (pynetdicom's own loop sleeps this long).
STREAM_BATCH_S = 0.001

#: Linux's option to leave delayed-ACK mode (None where the platform has none).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

P_DATA_TF = 0x04
_PDU_TYPES = range(0x01, 0x08)
_HEADER = struct.Struct(">BBI")
_ITEM_LENGTH = struct.Struct(">I")
#: Message control header bits (PS3.8 E.2): bit 0 set, a command fragment; bit 1 set, the last fragment.
_COMMAND = 0x01
_LAST = 0x02
#: A fragment after which nothing joins it: a command's, or the last of a data set.
_ENDS = _COMMAND | _LAST
_ATTRIBUTE = "_fetch_pdu_reader"


class BufferedReader:
    """The reader of one association; see the module's docstring.

    Parameters
    ----------
    assoc : Association
        Its socket connected, nothing read from it yet.
    """

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
        self.max_pdata = int(local.maximum_length or 0) or UNLIMITED_PDU_CEILING
        #: Bytes read and not yet handed on are ``buf[start:end]``.
        self.buf = bytearray(READ_CHUNK)
        self.start = 0
        self.end = 0
        #: Set once an invalid PDU was reported: what follows it is not read as PDUs.
        self.broken = False
        #: PDUs read and PDUs handed on (they differ by the P-DATA-TF PDUs joined).
        self.pdus_read = 0
        self.pdus_handed = 0
        #: True while the last fragment handed on was not the last of its message.
        self.mid_message = False
        #: Bytes of the command set being received: pynetdicom holds a command in
        #: memory until its last fragment, so one that never ends is cut off.
        self.command_bytes = 0
        #: Written to when the reactor has something to do other than read: see :meth:`wake`.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_lock = threading.Lock()

    # -- what the DUL calls ----------------------------------------------------------------

    def is_transport_event(self) -> bool:
        """Replaces ``DULServiceProvider._is_transport_event``: True when an event was queued.

        As pynetdicom's: in Sta13 (waiting for the connection to close) the
        socket is closed once nothing more is to be read.
        """
        dul = self.dul
        sock = dul.socket
        if dul.state_machine.current_state == "Sta13":
            if sock is not None and (self._complete() or sock.ready):
                self.read()
                return True
            if sock is not None:
                sock.close()
            return True
        if sock is not None and (self._complete() or sock.ready) and self.read():
            return True
        self._wait()
        return False

    # -- waiting ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the reactor's current or next wait return at once (from any thread)."""
        with self._wake_lock:
            if self._wake_w.fileno() < 0:
                return  # closed: a descriptor number may belong to another connection by now
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                self._wake_w.send(b"\0")

    def close(self) -> None:
        """Close the wake-up pair (the connection has closed; later waits sleep)."""
        with self._wake_lock:
            self._wake_r.close()
            self._wake_w.close()

    def _wait(self) -> None:
        """Wait until the socket has bytes, something is queued for the reactor, or the wait's limit."""
        dul = self.dul
        if dul._kill_thread or not dul.event_queue.empty() or not dul.to_provider_queue.empty():
            return
        wake = self._wake_r.fileno()
        sock = dul.socket.socket if dul.socket is not None else None
        if isinstance(sock, ssl.SSLSocket) and _tls_pending(sock):
            return  # decrypted bytes wait in the TLS layer, where select does not see them
        fd = sock.fileno() if sock is not None else -1
        if wake < 0:
            time.sleep(STREAM_BATCH_S)
            return
        watched = [wake] if fd < 0 or self.mid_message else [wake, fd]
        try:
            ready, _, _ = select.select(watched, [], [], STREAM_BATCH_S if len(watched) == 1 else IDLE_WAIT_S)
        except (OSError, ValueError):  # a descriptor closed under the wait: the next turn sees why
            time.sleep(STREAM_BATCH_S)
            return
        if wake in ready:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass

    def read(self) -> bool:
        """Read what the socket holds; hand the next PDU (or joined run of PDUs) to the state machine.

        Returns
        -------
        bool
            True when an event was queued (a PDU, Evt17 or Evt19); False when
            the bytes of the next PDU have not all come yet.
        """
        dul = self.dul
        if not self._complete():
            got = self._recv()
            if got == 0:
                pending = self.end - self.start
                if pending and not self.broken:
                    # What a cut inside a transfer looks like (the DIMSE layer then sees an abort).
                    expected = 6 + _HEADER.unpack_from(self.buf, self.start)[2] if pending >= 6 else None
                    log.warning("fetch.connection_closed_mid_pdu", received_bytes=pending, expected_bytes=expected)
                self._clear()
                dul.event_queue.put("Evt17")  # closed by the peer, or reset
                return True
            if self.broken:
                self._clear()
                return False
        if self._check_header():
            return True
        if not self._complete():
            return False
        if self.buf[self.start] == P_DATA_TF:
            joined = self._take_data()
            if joined is not None:
                self.pdus_handed += 1
                dul.event_queue.put("Evt10")
                dul._recv_pdu.put(joined)
                return True
            if self.broken:  # a command over its limit: reported (Evt19)
                return True
        data = self._take_raw()
        try:
            pdu, event = dul._decode_pdu(data)  # type: ignore[arg-type]  # annotated bytearray, decodes bytes too
        except Exception as exc:  # noqa: BLE001 - any undecodable PDU: Evt19, as pynetdicom does
            log.warning("fetch.bad_pdu", reason="PDU does not decode", pdu_type=f"0x{data[0]:02X}",
                        pdu_bytes=len(data), error=type(exc).__name__)
            dul.event_queue.put("Evt19")
            return True
        self.pdus_handed += 1
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)
        return True

    # -- the buffer ------------------------------------------------------------------------

    def _clear(self) -> None:
        self.start = self.end = 0
        if len(self.buf) > READ_CHUNK:
            self.buf = bytearray(READ_CHUNK)

    def _recv(self) -> int | None:
        """One read of what the socket holds: bytes read, 0 when closed, None when nothing was there."""
        sock = self.dul.socket.socket if self.dul.socket is not None else None
        if sock is None:
            return 0
        if self.end == len(self.buf):
            self._make_room()
        view = memoryview(self.buf)
        tail = view[self.end:]
        try:
            if isinstance(sock, ssl.SSLSocket):
                # Flags are refused on a TLS socket; ready said a record is there or pending.
                n = sock.recv_into(tail)
            else:
                n = sock.recv_into(tail, 0, socket.MSG_DONTWAIT)
            if n:
                quick_ack(sock)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return None
        except OSError:  # reset, or closed under us by an abort from another thread
            return 0
        finally:
            tail.release()
            view.release()
        self.end += n
        return n

    def _make_room(self) -> None:
        """Free the buffer's tail: move the unread bytes to the front, or grow when they fill it.

        They fill it only as one incomplete PDU whose header has been
        checked: the buffer doubles as its bytes arrive, up to that PDU's size.
        """
        pending = self.end - self.start
        if self.start > 0:
            self.buf[:pending] = self.buf[self.start:self.end]
            self.start, self.end = 0, pending
            return
        needed = 6 + _HEADER.unpack_from(self.buf)[2]
        self.buf.extend(bytes(min(len(self.buf), needed - len(self.buf))))

    def _complete(self) -> bool:
        """Whether the buffer holds a whole PDU."""
        if self.broken or self.end - self.start < 6:
            return False
        return self.end - self.start >= 6 + _HEADER.unpack_from(self.buf, self.start)[2]

    def _check_header(self) -> bool:
        """Report the next PDU as invalid (Evt19) when its type or declared length is; True when it did.

        Checked on its header alone: the body of an over-long PDU is never waited for.
        """
        if self.broken or self.end - self.start < 6:
            return False
        pdu_type, _, length = _HEADER.unpack_from(self.buf, self.start)
        limit = self.max_pdata if pdu_type == P_DATA_TF else ASSOCIATE_PDU_CEILING
        if pdu_type in _PDU_TYPES and length <= limit:
            return False
        log.warning("fetch.bad_pdu", reason="unknown PDU type" if pdu_type not in _PDU_TYPES else "PDU too long",
                    pdu_type=f"0x{pdu_type:02X}", declared_bytes=length, limit_bytes=limit)
        self.broken = True
        self._clear()
        self.dul.event_queue.put("Evt19")
        return True

    def _refuse_command(self) -> None:
        """A command set past :data:`MAX_COMMAND_BYTES`: Evt19 (an A-ABORT), the rest of the connection dropped."""
        log.warning("fetch.bad_pdu", reason="command set too long", received_bytes=self.command_bytes,
                    limit_bytes=MAX_COMMAND_BYTES)
        self.broken = True
        self._clear()
        self.dul.event_queue.put("Evt19")

    def _take_raw(self) -> bytes:
        """Remove the next PDU from the buffer as it came."""
        end = self.start + 6 + _HEADER.unpack_from(self.buf, self.start)[2]
        data = bytes(self.buf[self.start:end])
        self._consumed(end, 1)
        return data

    def _consumed(self, upto: int, pdus: int) -> None:
        self.pdus_read += pdus
        self.start = upto
        if self.start == self.end:
            self._clear()

    def _take_data(self) -> P_DATA_TF_PDU | None:
        """Remove the next P-DATA-TF PDU, with those that join it, as one P-DATA-TF; None when it is malformed.

        A malformed one stays in the buffer for pynetdicom's decoding to say what of it.
        """
        buf, pos, stop = self.buf, self.start, self.end
        runs: list[list[Any]] = []  # [context, control header, [(from, to), ...]]
        pdus = 0
        while True:
            pdu_end = pos + 6 + _HEADER.unpack_from(buf, pos)[2]
            items = _items(buf, pos + 6, pdu_end)
            if items is None:
                break
            ends = False
            for context, header, a, b in items:
                if header & _COMMAND:
                    self.command_bytes += b - a
                    if self.command_bytes > MAX_COMMAND_BYTES:
                        self._refuse_command()
                        return None
                    if header & _LAST:
                        self.command_bytes = 0
                last = runs[-1] if runs else None
                if last is not None and last[0] == context and not header & _COMMAND and not last[1] & _ENDS:
                    last[1] = header
                    last[2].append((a, b))
                else:
                    runs.append([context, header, [(a, b)]])
                ends = ends or bool(header & _LAST)
            pos = pdu_end
            pdus += 1
            # The run ends with a message's last fragment, at JOIN_LIMIT, or at a PDU not (yet) whole.
            if ends or pos - self.start >= JOIN_LIMIT or stop - pos < 6:
                break
            next_type, _, next_length = _HEADER.unpack_from(buf, pos)
            if next_type != P_DATA_TF or next_length > self.max_pdata or stop - pos < 6 + next_length:
                break
        if not pdus:
            return None
        self.mid_message = not runs[-1][1] & _LAST
        pdu = P_DATA_TF_PDU()
        with memoryview(buf) as view:
            for context, header, parts in runs:
                pieces: list[Any] = [bytes((header,))]
                pieces.extend(view[a:b] for a, b in parts)
                value = b"".join(pieces)
                for piece in pieces[1:]:
                    piece.release()
                item = PresentationDataValueItem()
                item.presentation_context_id = context
                # A view of the joined bytes: the DIMSE layer slices off the
                # control header (data[1:]) without copying the fragment again.
                item.presentation_data_value = memoryview(value)  # type: ignore[assignment]
                pdu.presentation_data_value_items.append(item)
            if self.assoc.get_handlers(evt.EVT_DATA_RECV):
                # The bytes as read (the bandwidth cap counts them), built only for a listener.
                evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": bytes(view[self.start:pos])})
        self._consumed(pos, pdus)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu


def _tls_pending(sock: ssl.SSLSocket) -> bool:
    try:
        return sock.pending() > 0
    except (OSError, ValueError):  # closed under us: the next read says so
        return False


def quick_ack(sock: socket.socket) -> None:
    """Acknowledge what the socket receives at once, not after the kernel's delayed-ACK timer.

    A PACS with Nagle's algorithm on (Orthanc) writes a small PDU in two
    pieces and holds the second until the first is acknowledged; Linux
    delays that acknowledgement by up to 40 ms when the receiver has
    nothing to send, and the C-GET's final response, or a query's, waited
    that long (about 43 ms per study against Orthanc 1.10, most of the run
    on a study of four 8 MB objects). Linux clears the mode again as it
    sees fit, so it is set after every read; elsewhere there is no such
    option and nothing is done.
    """
    if _TCP_QUICKACK is None:
        return
    with contextlib.suppress(OSError):  # closed under us: the next read says so
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _items(buf: bytearray, pos: int, end: int) -> list[tuple[int, int, int, int]] | None:
    """The PDV items of a P-DATA-TF body ``buf[pos:end]``: (context, control header, from, to) each.

    None when an item's length does not fit the PDU, or there is none.
    """
    out = []
    while pos < end:
        if pos + 6 > end:
            return None
        item_end = pos + 4 + _ITEM_LENGTH.unpack_from(buf, pos)[0]
        if item_end - pos < 6 or item_end > end:
            return None
        out.append((buf[pos + 4], buf[pos + 5], pos + 6, item_end))
        pos = item_end
    return out or None


def install(assoc: Association) -> BufferedReader:
    """Read ``assoc`` through a :class:`BufferedReader` from now on.

    Call it before its first PDU is read, or after the PDU guard has read the
    negotiation (it reads whole PDUs only, so no byte is left in between).

    Parameters
    ----------
    assoc : Association
        Its socket connected (``EVT_CONN_OPEN``), or accepted (``EVT_ACCEPTED``) behind the PDU guard.

    Returns
    -------
    BufferedReader
    """
    reader = BufferedReader(assoc)
    dul = assoc.dul
    # Instance attributes shadow the class's methods for this association
    # only (what mypy's method-assign refuses is the point here).
    dul._is_transport_event = reader.is_transport_event  # type: ignore[method-assign]
    # The reader's wait replaces the reactor's sleep; whatever the reactor
    # must act on wakes it: a primitive to send, a stop.
    dul._run_loop_delay = 0
    queue = dul.to_provider_queue
    put = queue.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        reader.wake()

    queue.put = put_and_wake  # type: ignore[method-assign]
    kill_dul, stop_dul = dul.kill_dul, dul.stop_dul

    def kill_and_wake() -> None:
        kill_dul()
        reader.wake()

    def stop_and_wake() -> bool:
        if dul.state_machine.current_state == "Sta1":
            dul._kill_thread = True  # as stop_dul does, but before the wake-up the reactor must see it after
            reader.wake()
        return stop_dul()

    dul.kill_dul = kill_and_wake  # type: ignore[method-assign]
    dul.stop_dul = stop_and_wake  # type: ignore[method-assign]
    assoc.bind(evt.EVT_CONN_CLOSE, lambda event: reader.close())
    setattr(assoc, _ATTRIBUTE, reader)
    return reader


def install_on_connection(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler that installs the reader."""
    install(event.assoc)


def reader_of(assoc: Association) -> BufferedReader | None:
    """The reader installed on ``assoc``, if any."""
    reader = getattr(assoc, _ATTRIBUTE, None)
    return reader if isinstance(reader, BufferedReader) else None
