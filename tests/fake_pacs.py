"""A DICOM peer on a raw socket that misbehaves on purpose, for the sending side's tests.

It speaks just enough of the upper layer protocol (PS3.8 9.3) to get a
requestor where the test wants it, with every PDU built by hand so that the
misbehaviour does not depend on a library's idea of what a peer may do:

- ``stall_reply``: accept the association (every proposed presentation
  context, in its first transfer syntax), then answer the first P-DATA-TF
  (the C-STORE or C-ECHO request) with the first half of a P-DATA-TF PDU and
  go silent, the socket left open: a PACS that hangs mid-answer, or a link
  that dies without FIN or RST;
- ``stall_accept``: send half an A-ASSOCIATE-AC and go silent;
- ``reject``: answer A-ASSOCIATE-RJ with the given result, source and reason.

Whatever the requestor sends afterwards is read and dropped, so its own
writes never block. Every connection is closed, and every thread joined,
by :meth:`FakePACS.stop`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field

_APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
_IMPLEMENTATION_CLASS = b"1.2.826.0.1.3680043.9.9999.1"


@dataclass
class RequestedContext:
    """One presentation context of an A-ASSOCIATE-RQ."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str] = field(default_factory=list)


def _item(item_type: int, data: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(data)) + data


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii")


def parse_associate_rq(pdu: bytes) -> tuple[bytes, bytes, list[RequestedContext]]:
    """Called AE, calling AE and presentation contexts of a whole A-ASSOCIATE-RQ PDU."""
    called, calling = pdu[10:26], pdu[26:42]
    contexts: list[RequestedContext] = []
    pos = 74
    while pos + 4 <= len(pdu):
        item_type, _, length = struct.unpack(">BBH", pdu[pos:pos + 4])
        body = pdu[pos + 4:pos + 4 + length]
        pos += 4 + length
        if item_type != 0x20:
            continue
        cx = RequestedContext(body[0], "")
        sub = 4
        while sub + 4 <= len(body):
            sub_type, _, sub_len = struct.unpack(">BBH", body[sub:sub + 4])
            value = _uid(body[sub + 4:sub + 4 + sub_len])
            sub += 4 + sub_len
            if sub_type == 0x30:
                cx.abstract_syntax = value
            elif sub_type == 0x40:
                cx.transfer_syntaxes.append(value)
        contexts.append(cx)
    return called, calling, contexts


def associate_ac(called: bytes, calling: bytes, contexts: list[RequestedContext], max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-AC that accepts every context in its first proposed transfer syntax."""
    items = _item(0x10, _APPLICATION_CONTEXT)
    for cx in contexts:
        ts = _item(0x40, cx.transfer_syntaxes[0].encode("ascii"))
        items += _item(0x21, struct.pack(">BBBB", cx.context_id, 0, 0, 0) + ts)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _IMPLEMENTATION_CLASS)
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + called + calling + b"\x00" * 32 + items
    return struct.pack(">BBI", 0x02, 0, len(body)) + body


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


def half_p_data_tf(declared: int = 200) -> bytes:
    """The header and first bytes of a P-DATA-TF PDU that declares ``declared`` bytes."""
    pdv = struct.pack(">IBB", declared - 4, 1, 0x03)  # a PDV of context 1: last command fragment
    return struct.pack(">BBI", 0x04, 0, declared) + pdv + b"\x00" * 8


def _read_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_pdu(conn: socket.socket) -> bytes | None:
    head = _read_exact(conn, 6)
    if head is None:
        return None
    (length,) = struct.unpack(">I", head[2:6])
    body = _read_exact(conn, length)
    return None if body is None else head + body


class FakePACS:
    """A misbehaving peer on 127.0.0.1; see the module docstring for ``mode``.

    Parameters
    ----------
    mode : str
        ``stall_reply``, ``stall_accept`` or ``reject``.
    reject : tuple of int
        ``(result, source, reason)`` of the A-ASSOCIATE-RJ in ``reject`` mode.
    tls : ssl.SSLContext, optional
        A server context: every connection speaks TLS first.
    """

    def __init__(self, mode: str = "stall_reply", reject: tuple[int, int, int] = (1, 3, 2),
                 tls: ssl.SSLContext | None = None) -> None:
        if mode not in ("stall_reply", "stall_accept", "reject"):
            raise ValueError(f'Argument "mode" must be stall_reply, stall_accept or reject, not {mode!r}.')
        self.mode = mode
        self.reject = reject
        self.tls = tls
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        # Polled, so that stop() ends the accept loop without relying on close() waking accept().
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        #: Association requests read, and the requests (P-DATA-TF) left unanswered.
        self.requests = 0
        self.stalled = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept, name="fake-pacs-accept", daemon=True)

    def start(self) -> FakePACS:
        self._accept_thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            t = threading.Thread(target=self._serve, args=(conn,), name="fake-pacs-conn", daemon=True)
            with self._lock:
                self._conns.append(conn)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                raw = conn
                conn = self.tls.wrap_socket(raw, server_side=True)
                with self._lock:  # wrapping took the descriptor over: stop() must shut this one
                    self._conns[self._conns.index(raw)] = conn
            rq = _read_pdu(conn)
            if rq is None or rq[0] != 0x01:
                return
            with self._lock:
                self.requests += 1
            called, calling, contexts = parse_associate_rq(rq)
            if self.mode == "reject":
                conn.sendall(associate_rj(*self.reject))
                _read_pdu(conn)  # the requestor closes; wait for that
                return
            ac = associate_ac(called, calling, contexts)
            if self.mode == "stall_accept":
                conn.sendall(ac[: len(ac) // 2])
            else:
                conn.sendall(ac)
                while True:
                    pdu = _read_pdu(conn)
                    if pdu is None:
                        return
                    if pdu[0] == 0x04:
                        break
                conn.sendall(half_p_data_tf())
            with self._lock:
                self.stalled += 1
            # Silent from here on; drain so that the requestor's writes never block.
            while not self._stopping.is_set() and conn.recv(65536):
                pass
        except (OSError, ValueError):  # ValueError: an SSL socket shut down under the read
            return

    def stop(self) -> None:
        self._stopping.set()
        self._accept_thread.join(5)
        self.listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            # The raw socket (a TLS connection is wrapped in a thread of its own).
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        for t in threads:
            t.join(5)
        for conn in conns:
            conn.close()
