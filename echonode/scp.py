"""The DICOM side of the node: a pynetdicom Storage and Verification SCP.

Handlers stay fast: the C-STORE handler moves the file pynetdicom already
streamed to disk (``STORE_RECV_CHUNKED_DATASET``) into the store and records
it; nothing is decoded or inferred here. Access control (calling AE title and
network allow-lists) and the disk guard happen when the A-ASSOCIATE-RQ
arrives, with the association-reject reasons of PS3.8 9.3.4; the disk guard
is checked again for every C-STORE (0xA700).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt, register_uid
from pynetdicom.association import Association
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from pynetdicom.utils import make_target

from .config import NodeConfig, TLSConfig
from .dicomfile import RETIRED_US_STORAGE
from .logs import get_logger
from .store import BadObject, StudyStore

log = get_logger(__name__)

# Stream every received data set straight to a temp file instead of memory.
_config.STORE_RECV_CHUNKED_DATASET = True
# Carry structlog's bound context into association threads.
_config.PASS_CONTEXTVARS = True

# The retired US classes (RETIRED_US_STORAGE): dcmtk's storescp takes them;
# pynetdicom lists neither among its storage contexts nor ties them to the
# Storage service, so a C-STORE of one would be aborted: register both.
for _uid, (_keyword, _current) in RETIRED_US_STORAGE.items():
    register_uid(_uid, _keyword, StorageServiceClass)
RETIRED_US_STORAGE_UIDS = tuple(RETIRED_US_STORAGE)


def _recv_into(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` (fewer only at end of stream), as ``AssociationSocket.recv``.

    pynetdicom's own loop reads 4 KiB per call and extends a bytearray: ~32
    calls and copies per 128 KiB PDU, the largest CPU cost of receiving.
    Reading into one preallocated buffer keeps the semantics (block until
    all bytes or EOF; return what was read) at about three quarters of the
    CPU per GB received (bench/receive.py). Works for TLS sockets too.
    """
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = self.socket.recv_into(view[got:], nr_bytes - got)  # type: ignore[union-attr]
        if not n:
            view.release()
            return buf[:got]
        got += n
    view.release()
    return buf


AssociationSocket.recv = _recv_into  # type: ignore[method-assign]


class _HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop.

    pynetdicom wraps each accepted socket with the handshake done inside
    ``get_request``, on the one thread that accepts every connection, with
    no timeout. A peer that connects and never speaks (a load balancer's
    TCP check, a half-open link, a cart pointed at the TLS port without
    TLS that waits for us to talk first) then blocks every other sender
    until it goes away. Here the accept loop only accepts; the handshake
    runs in the connection's own thread, bounded by ``handshake_timeout``,
    and a failure is logged with the peer's address.
    """

    #: Seconds a peer has to complete the TLS handshake (the node's ACSE timeout).
    handshake_timeout: float | None = None
    # A connection's thread only starts its association (a thread of its own)
    # and returns, unless it is still in the TLS handshake: stopping the node
    # must not wait up to ``handshake_timeout`` for a silent peer.
    daemon_threads = True
    block_on_close = False
    #: Set when the server closes: a handshake that ends after that starts no association.
    closing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: Sockets still in the TLS handshake, closed with the server.
        self.handshaking: set[ssl.SSLSocket] = set()
        self._handshaking_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_close(self) -> None:
        self.closing = True
        with self._handshaking_lock:
            pending = list(self.handshaking)
        for sock in pending:
            # Unblocks do_handshake in its thread, which then logs the failure.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        super().server_close()

    def get_request(self) -> tuple[Any, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            peer = client_address[0] if isinstance(client_address, tuple) else str(client_address)
            with self._handshaking_lock:
                self.handshaking.add(request)
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                # Back to blocking, as the accepted socket was before (the
                # DUL polls it with select and its own timers).
                request.settimeout(None)
            except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
                structlog.contextvars.clear_contextvars()
                log.warning("association.tls_failed", peer=peer, error=f"{type(exc).__name__}: {exc}")
                self.shutdown_request(request)
                return
            finally:
                with self._handshaking_lock:
                    self.handshaking.discard(request)
            if self.closing:
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

#: DIMSE statuses this node answers with (Storage Service Class, PS3.4 B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_UNEXPECTED = 0xC211

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognized
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service-user, no reason given
# Transient, so that the sender keeps its images and retries; the same triple
# pynetdicom sends when max_associations is reached, which senders already
# treat as "try again later".
REJECT_LOW_DISK = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded

#: Why pynetdicom's own ACSE refused an association (after EVT_REQUESTED), as
#: the log's ``reason``: (result, source, diagnostic) -> words.
_PYNETDICOM_REJECTS = {
    (0x01, 0x01, 0x07): "called AE title not recognized",
    (0x02, 0x03, 0x02): "max_associations reached",
    (0x02, 0x02, 0x01): "user identity not accepted",
}


@dataclass
class AccessPolicy:
    """Who may associate: calling AE titles and source networks (empty = anyone)."""

    calling_aets: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, node: NodeConfig) -> AccessPolicy:
        return cls(
            calling_aets=frozenset(a.strip() for a in node.allowed_calling_aets),
            networks=tuple(ipaddress.ip_network(n, strict=False) for n in node.allowed_networks),
        )

    def check(self, calling_ae: str, address: str) -> tuple[int, int, int] | None:
        """Return the reject reason for this peer, or None when it may associate."""
        if self.networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return REJECT_NO_REASON
            # An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            if not any(ip in net for net in self.networks):
                return REJECT_NO_REASON
        if self.calling_aets and calling_ae.strip() not in self.calling_aets:
            return REJECT_CALLING_AE
        return None


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """A TLS context for an outgoing association (delivery, echo), or None."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # DICOM peers are addressed by IP and AE title far more often than by a
    # name in their certificate; trust is the CA's (PS3.15 B.1 leaves this open).
    ctx.check_hostname = False
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


@dataclass
class ReceiveCounters:
    """Counts kept for status and metrics (read without locking: ints are atomic enough)."""

    instances: int = 0
    bytes: int = 0
    duplicates: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    associations: int = 0
    rejected: int = 0

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class StorageSCP:
    """The listening node.

    Parameters
    ----------
    node : NodeConfig
        AE title, address, limits, TLS, allow-lists.
    store : StudyStore
        Where accepted objects go.
    on_instance : callable, optional
        Called with the study UID after each stored instance (metrics, tests).
    """

    def __init__(
        self,
        node: NodeConfig,
        store: StudyStore,
        on_instance: Callable[[str], None] | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.on_instance = on_instance
        self.policy = AccessPolicy.from_config(node)
        self.counters = ReceiveCounters()
        self.min_free_bytes = node.min_free_disk_mb * 1024 * 1024
        self._server: ThreadedAssociationServer | None = None
        self._assoc_seq = 0
        self._lock = threading.Lock()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.maximum_associations = self.node.max_associations
        ae.maximum_pdu_size = self.node.max_pdu
        ae.network_timeout = self.node.network_timeout_s
        ae.acse_timeout = self.node.acse_timeout_s
        ae.dimse_timeout = self.node.dimse_timeout_s
        # Carts and PACS address us by our AE title; a wrong called AE is a
        # misconfiguration the administrator should see, not silently accept.
        ae.require_called_aet = True
        # Every storage SOP class with every transfer syntax pydicom knows:
        # store what comes as it comes, the pipeline decides what is usable.
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for uid in RETIRED_US_STORAGE_UIDS:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae

    def update_policy(self, node: NodeConfig) -> None:
        """Apply new allow-lists (SIGHUP) without touching open associations."""
        self.policy = AccessPolicy.from_config(node)
        self.min_free_bytes = node.min_free_disk_mb * 1024 * 1024

    def _low_disk(self) -> int | None:
        """Free bytes on the storage file system when under ``min_free_disk_mb``, else None.

        Returns
        -------
        int or None
            The free bytes (for the log line) when the guard is on and the
            free space is below it; None when the node may receive. A
            file system that cannot be queried counts as full: receiving
            onto it would fail anyway, and a refusal keeps the sender's copy.
        """
        if not self.min_free_bytes:
            return None
        try:
            free = self.store.free_bytes()
        except OSError:
            return 0
        return free if free < self.min_free_bytes else None

    # -- event handlers --------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._assoc_seq += 1
            assoc_id = self._assoc_seq
        calling = assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else ""
        address = assoc.requestor.address
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(assoc_id=assoc_id, calling_ae=calling, peer=address)
        reject = self.policy.check(calling, address)
        if reject is not None:
            reason = "calling AE title not allowed" if reject == REJECT_CALLING_AE else "address not allowed"
            log.warning("association.rejected", reason=reason)
            self._reject(assoc, reject)
            return
        # Refused here, before anything is spooled: the per-C-STORE check
        # only sees an object after pynetdicom has written it to incoming/,
        # so with that check alone every new sender would still put one
        # (possibly large) object onto a disk already under the threshold.
        # Echo-only associations are refused too: a C-ECHO that succeeds
        # while every C-STORE would fail tells a PACS's "verify" the wrong thing.
        free = self._low_disk()
        if free is not None:
            log.error("association.rejected", reason="low disk", free_bytes=free,
                      min_free_bytes=self.min_free_bytes)
            self._reject(assoc, REJECT_LOW_DISK)
            return
        # Counted as accepted only at EVT_ACCEPTED: pynetdicom may still
        # refuse it after this handler (called AE title, max_associations).
        log.info("association.requested")

    def _on_accepted(self, event: evt.Event) -> None:
        self.counters.associations += 1

    def _on_rejected(self, event: evt.Event) -> None:
        """Log and count a refusal made by pynetdicom's ACSE, not by :meth:`_on_requested`.

        Our own refusals send the A-ASSOCIATE-RJ directly and never reach
        here; pynetdicom's (wrong called AE title, too many associations)
        come after EVT_REQUESTED, so without this they left no
        ``association.rejected`` line and counted as accepted.
        """
        assoc = event.assoc
        rj = assoc.acceptor.primitive
        rsd = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else None
        rq = assoc.requestor.primitive
        called = rq.called_ae_title if rq is not None else ""
        self.counters.rejected += 1
        reason = _PYNETDICOM_REJECTS.get(rsd, "rejected by the DICOM stack") if rsd else "rejected by the DICOM stack"
        extra: dict[str, Any] = {"called_ae": called}
        if rsd == (0x02, 0x03, 0x02):
            extra["max_associations"] = self.ae.maximum_associations
        log.warning("association.rejected", reason=reason, result=rsd, **extra)

    def _reject(self, assoc: Association, reason: tuple[int, int, int]) -> None:
        """Send the A-ASSOCIATE-RJ ``reason`` (result, source, diagnostic) and count it."""
        self.counters.rejected += 1
        assoc.acse.send_reject(*reason)
        # As pynetdicom's own ACSE does after a reject: wait until the
        # DUL has sent the A-ASSOCIATE-RJ before the socket is closed.
        assoc.kill()

    def _on_released(self, event: evt.Event) -> None:
        log.info("association.released")

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("association.aborted")
        self._discard_partial(event.assoc)

    def _on_conn_close(self, event: evt.Event) -> None:
        # Every way an association ends closes the connection (a drop or a
        # timeout may not pass through EVT_ABORTED first).
        self._discard_partial(event.assoc)

    def _discard_partial(self, assoc: Association) -> None:
        """Delete the spool file of a C-STORE that the association's end cut off.

        pynetdicom streams a data set into ``incoming/`` (delete=False) and
        removes the file only after the C-STORE handler ran. When the peer
        aborts or the link drops halfway, the handler never runs and the
        part received stays until the next start's recovery: on a node up
        for months, each interrupted cine (easily 100 MB) is disk lost. The
        object was never acknowledged, so the sender still has it.
        """
        # pynetdicom keeps the message being assembled on the DIMSE provider;
        # a completed one has been handed on and is no longer there.
        msg = getattr(getattr(assoc, "dimse", None), "message", None)
        # EVT_ABORTED (reactor thread) and EVT_CONN_CLOSE (DUL thread) may
        # both come: one of them takes the file.
        with self._lock:
            spool = getattr(msg, "_data_set_file", None)
            path = getattr(msg, "_data_set_path", None)
            if spool is None or path is None:
                return
            msg._data_set_file = msg._data_set_path = None  # type: ignore[union-attr]
        cmd = getattr(msg, "command_set", None)
        sop_uid = str(getattr(cmd, "AffectedSOPInstanceUID", "") or "")
        try:
            spool.close()
            size = path.stat().st_size
            path.unlink()
        except OSError as exc:
            log.error("store.partial_not_removed", sop_uid=sop_uid, error=f"{type(exc).__name__}: {exc.strerror}")
            return
        self.counters.fail("incomplete")
        log.warning("store.partial_discarded", sop_uid=sop_uid, bytes=size)

    def _on_echo(self, event: evt.Event) -> int:
        log.info("echo")
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title
        structlog.contextvars.bind_contextvars(sop_uid=sop_uid)
        try:
            # Still checked per object: an association accepted with room to
            # spare may run the disk down while it lasts.
            free = self._low_disk()
            if free is not None:
                self.counters.fail("out_of_disk")
                log.error("store.refused_low_disk", free_bytes=free)
                return STATUS_OUT_OF_RESOURCES
            path = event.dataset_path
            header, outcome = self.store.accept(path, calling)
        except BadObject as exc:
            self.counters.fail(f"0x{exc.status:04X}")
            log.warning("store.refused", status=f"0x{exc.status:04X}", error=str(exc))
            return exc.status
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.counters.fail("out_of_disk")
                log.error("store.refused_disk_full")
                return STATUS_OUT_OF_RESOURCES
            self.counters.fail("io_error")
            log.error("store.io_error", error=f"{type(exc).__name__}: {exc.strerror}")
            return STATUS_OUT_OF_RESOURCES
        except sqlite3.Error as exc:
            # The journal could not take the record (locked past its
            # timeout, unreadable): the object was taken back, the sender
            # may try again later. A full disk arrives above as ENOSPC.
            self.counters.fail("journal_error")
            log.error("store.journal_error", error=type(exc).__name__,
                      code=getattr(exc, "sqlite_errorname", None))
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # noqa: BLE001 - a bug; the sender must not think it was stored
            self.counters.fail("unexpected")
            log.exception("store.unexpected_error")
            return STATUS_UNEXPECTED
        finally:
            structlog.contextvars.unbind_contextvars("sop_uid")
        if outcome == "duplicate":
            self.counters.duplicates += 1
        else:
            self.counters.instances += 1
            try:
                self.counters.bytes += self.store.instance_path(header).stat().st_size
            except OSError:
                pass
        log.info(
            "store.accepted",
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            sop_class=header.sop_class_uid,
            transfer_syntax=header.transfer_syntax,
            outcome=outcome,
        )
        if self.on_instance is not None:
            self.on_instance(header.study_uid)
        return STATUS_SUCCESS

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Listen (non-blocking). Temp files go to the store's ``incoming/`` so
        that accepting one is a rename on the same file system."""
        tempfile.tempdir = str(self.store.incoming)
        # As AE.start_server(block=False), with our server class (see
        # _HandshakeInThreadServer); the AE must list the server for its
        # shutdown() to find it.
        server = self.ae.make_server(
            (self.node.host, self.node.port),
            evt_handlers=self.handlers(),
            ssl_context=server_ssl_context(self.node.tls),
            server_class=_HandshakeInThreadServer,
        )
        server.handshake_timeout = self.node.acse_timeout_s
        self.ae._servers.append(server)
        threading.Thread(target=make_target(server.serve_forever), name="echonode-scp-accept", daemon=True).start()
        self._server = server
        log.info(
            "scp.listening",
            ae_title=self.node.ae_title,
            host=self.node.host,
            port=self.port,
            tls=self.node.tls.enabled,
        )

    @property
    def listening(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            return self.node.port
        return int(self._server.server_address[1])

    def active_associations(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor])

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop listening, let associations in flight finish for up to ``grace_s``, abort the rest.

        An aborted transfer was never acknowledged, so the sender keeps it and
        sends it again; its temp file is removed at the next start.
        """
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + grace_s
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [a for a in self.ae.active_associations if a.is_acceptor]
        for assoc in left:
            assoc.abort()
        if left:
            log.warning("scp.aborted_on_stop", associations=len(left))
        self._server = None
        log.info("scp.stopped")
