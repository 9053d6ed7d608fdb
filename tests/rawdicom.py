"""DICOM Upper Layer PDUs made by hand, for protocol attacks over raw sockets.

A misbehaving peer is whatever bytes it sends; pynetdicom cannot send a
6-byte header and stop, or a tab inside an AE title. These helpers build
the PDUs of PS3.8 9.3 byte by byte so that tests (and bench/pdu_attacks.py)
can play cart, PACS or attacker against the node, dcmtk and Orthanc.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
EXPLICIT_VR_LE = b"1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.8.498.1"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _ae(title: bytes) -> bytes:
    """An AE title field: 16 bytes, space padded, exactly as given otherwise."""
    if len(title) > 16:
        raise ValueError("AE title over 16 bytes")
    return title.ljust(16, b" ")


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def header(pdu_type: int, declared_length: int) -> bytes:
    """The 6-byte header of a PDU that says ``declared_length`` bytes follow."""
    return struct.pack(">BBI", pdu_type, 0, declared_length)


def _user_information(max_length: int) -> bytes:
    return _item(0x50, _item(0x51, struct.pack(">I", max_length)) + _item(0x52, IMPLEMENTATION_UID))


def associate_rq(
    called: bytes = b"ECHONODE",
    calling: bytes = b"CART",
    abstract_syntax: bytes = VERIFICATION,
    transfer_syntaxes: tuple[bytes, ...] = (IMPLICIT_VR_LE,),
    max_length: int = 16384,
    context_id: int = 1,
    application_context: bytes = APPLICATION_CONTEXT,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context (ID ``context_id``)."""
    cx = struct.pack(">B3x", context_id) + _item(0x30, abstract_syntax) + b"".join(
        _item(0x40, ts) for ts in transfer_syntaxes)
    body = (
        struct.pack(">HH", 1, 0)
        + _ae(called)
        + _ae(calling)
        + bytes(32)
        + _item(0x10, application_context)
        + _item(0x20, cx)
        + _user_information(max_length)
    )
    return pdu(ASSOCIATE_RQ, body)


def _first_transfer_syntax(cx: bytes) -> bytes:
    """The first transfer syntax proposed in a presentation context item's body."""
    pos = 4
    while pos + 4 <= len(cx):
        sub_type, _, length = struct.unpack(">BBH", cx[pos : pos + 4])
        if sub_type == 0x40:
            return cx[pos + 4 : pos + 4 + length]
        pos += 4 + length
    return IMPLICIT_VR_LE


def associate_ac(rq: bytes, max_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-AC accepting every presentation context of ``rq`` with its first transfer syntax."""
    body = rq[6:]
    called, calling = body[4:20], body[20:36]
    items = b""
    pos = 68
    while pos + 4 <= len(body):
        item_type, _, length = struct.unpack(">BBH", body[pos : pos + 4])
        if item_type == 0x20:
            cx = body[pos + 4 : pos + 4 + length]
            items += _item(0x21, struct.pack(">BBBB", cx[0], 0, 0, 0) + _item(0x40, _first_transfer_syntax(cx)))
        pos += 4 + length
    ac = (
        struct.pack(">HH", 1, 0)
        + called
        + calling
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + items
        + _user_information(max_length)
    )
    return pdu(ASSOCIATE_AC, ac)


def p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (``control``: 0x03 last command fragment, 0x00 data, 0x02 last data)."""
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return pdu(P_DATA_TF, pdv)


def echo_rq_command(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set, Implicit VR Little Endian."""
    uid = VERIFICATION + (b"\x00" if len(VERIFICATION) % 2 else b"")

    def element(group: int, elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", group, elem, len(value)) + value

    rest = (
        element(0x0000, 0x0002, uid)
        + element(0x0000, 0x0100, struct.pack("<H", 0x0030))
        + element(0x0000, 0x0110, struct.pack("<H", message_id))
        + element(0x0000, 0x0800, struct.pack("<H", 0x0101))
    )
    return element(0x0000, 0x0000, struct.pack("<I", len(rest))) + rest


def store_rq_command(sop_class: str, sop_uid: str, *, with_data_set: bool = True, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian), saying whether a data set follows."""
    import io

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    req = C_STORE()
    req.MessageID, req.Priority = message_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_uid
    if with_data_set:
        req.DataSet = io.BytesIO(b"-")  # only so that the command says a data set follows
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    encoded = encode(msg.command_set, True, True)
    if encoded is None:  # pynetdicom's encode returns None when the data set cannot be written
        raise ValueError(f"pynetdicom could not encode the C-STORE-RQ command set (message {message_id})")
    return encoded


def read_command(sock: socket.socket, timeout: float = 10.0) -> object:
    """The next DIMSE command set the peer sends (P-DATA-TF PDUs until a last command fragment), decoded."""
    import io

    from pynetdicom.dsutils import decode

    data = b""
    while True:
        got = read_pdu(sock, timeout)
        if got is None or got.type != P_DATA_TF:
            raise ConnectionError(f"expected P-DATA-TF, got {got}")
        pos = 0
        while pos + 6 <= len(got.body):
            (length,) = struct.unpack(">I", got.body[pos : pos + 4])
            control = got.body[pos + 5]
            data += got.body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if control & 0x03 == 0x03:
                return decode(io.BytesIO(data), True, True)


ABORT_PDU = pdu(ABORT, bytes(4))
RELEASE_RQ_PDU = pdu(RELEASE_RQ, bytes(4))


@dataclass
class Pdu:
    """A PDU read back: its type, declared length and body."""

    type: int
    length: int
    body: bytes

    @property
    def abort_source_reason(self) -> tuple[int, int]:
        """(source, reason) of an A-ABORT (PS3.8 9.3.8)."""
        return self.body[2], self.body[3]

    @property
    def reject(self) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
        return self.body[1], self.body[2], self.body[3]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer when the peer closed first."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> Pdu | None:
    """The next PDU from ``sock``; None when the peer closed the connection (or reset it).

    Raises
    ------
    TimeoutError
        When nothing (or only part of a PDU) came within ``timeout``.
    """
    sock.settimeout(timeout)
    try:
        head = recv_exact(sock, 6)
        if len(head) < 6:
            return None
        pdu_type, _, length = struct.unpack(">BBI", head)
        body = recv_exact(sock, min(length, 1 << 20))
    except ConnectionResetError:
        return None
    return Pdu(pdu_type, length, body)


def wait_closed(sock: socket.socket, timeout: float) -> tuple[float, list[Pdu]]:
    """Read until the peer closes; return (seconds it took, PDUs seen meanwhile).

    Raises
    ------
    TimeoutError
        When the peer still holds the connection after ``timeout``.
    """
    t0 = time.monotonic()
    seen: list[Pdu] = []
    while True:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            raise TimeoutError(f"the peer held the connection for {timeout} s")
        got = read_pdu(sock, left)
        if got is None:
            return time.monotonic() - t0, seen
        seen.append(got)


def associate(port: int, calling: bytes = b"CART", called: bytes = b"ECHONODE", host: str = "127.0.0.1",
              timeout: float = 10.0, **rq: object) -> tuple[socket.socket, Pdu | None]:
    """Connect and send an A-ASSOCIATE-RQ; return the socket and the answer (None: closed)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.sendall(associate_rq(called=called, calling=calling, **rq))  # type: ignore[arg-type]
    return sock, read_pdu(sock, timeout)


def connect(port: int, opened: list[socket.socket], source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``port`` on loopback from the address ``source`` (127.0.0.0/8 is all local),
    added to ``opened`` (the ``sockets`` fixture closes them)."""
    s = socket.socket()
    opened.append(s)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


#: The SOP class a wrong-context C-STORE names (CT Image Storage).
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
US_MULTIFRAME_IMAGE = "1.2.840.10008.5.1.4.1.1.3.1"


def stores_on_wrong_contexts(open_association: Callable[..., socket.socket], ds: Any) -> tuple[Any, Any]:
    """The responses to two C-STOREs of ``ds`` that PS3.7 9.1.1.1 forbids: one on a Verification-only
    association, one naming CT Image Storage on a US Multi-frame context.

    ``open_association(**rq)`` opens an accepted association proposing one context (ID 1) as
    :func:`associate_rq` takes it.
    """
    from pynetdicom.dsutils import encode

    answers = []
    for abstract_syntax, sop_class in ((VERIFICATION, str(ds.SOPClassUID)),
                                       (US_MULTIFRAME_IMAGE.encode(), CT_IMAGE)):
        s = open_association(abstract_syntax=abstract_syntax, transfer_syntaxes=(EXPLICIT_VR_LE,))
        s.sendall(p_data(1, 0x03, store_rq_command(sop_class, str(ds.SOPInstanceUID))))
        encoded = encode(ds, False, True)
        assert encoded is not None, "the data set could not be encoded"
        s.sendall(p_data(1, 0x02, encoded))
        answers.append(read_command(s))
        s.sendall(RELEASE_RQ_PDU)
    return answers[0], answers[1]


#: Bytes of one command fragment :func:`send_endless_command` sends (within a 16 KiB maximum PDU).
COMMAND_FRAGMENT = 16000


def send_endless_command(s: socket.socket, up_to: int) -> list[Pdu]:
    """Send command fragments that never set the last-fragment bit, ``up_to`` bytes at most or until
    the peer stops reading; then the PDUs it answered with before closing."""
    fragment = p_data(1, 0x01, b"\0" * COMMAND_FRAGMENT)
    sent = 0
    try:
        while sent < up_to:
            s.sendall(fragment)
            sent += COMMAND_FRAGMENT
    except OSError:
        pass
    return wait_closed(s, timeout=10)[1]
