"""The DICOM side of the node: a pynetdicom Storage and Verification SCP.

Handlers stay fast: the C-STORE handler moves the file pynetdicom already
streamed to disk (``STORE_RECV_CHUNKED_DATASET``) into the store and records
it; nothing is decoded or inferred here. The network allow-list is checked
when a connection is accepted, before anything is read from it; the calling
AE title and the disk guard when the A-ASSOCIATE-RQ arrives, with the
association-reject reasons of PS3.8 9.3.4; the disk guard again for every
C-STORE (0xA700). Every association reads through ``pdu_guard`` (PDU limits,
read deadlines) and spools through ``spool`` (files tracked and removed when
it ends).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sqlite3
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
    register_uid,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from echonode.config import Config, NodeConfig
from echonode.dicomfile import RETIRED_US_STORAGE
from echonode.network import pdu_guard
from echonode.network.contexts import share_contexts, store_on_wrong_context
from echonode.network.pdu_guard import ending as association_ending
from echonode.network.tls import server_ssl_context
from echonode.ops.logs import get_logger, peer_text
from echonode.receive import spool
from echonode.receive.access import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_LOW_DISK,
    REJECT_NO_REASON,
    AccessPolicy,
    dicom_ae_title,
    printable_ae,
    request_refusal,
)
from echonode.studies.store import BadObject, StudyStore

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


spool.install()


class _AssociationRequestHandler(RequestHandler):
    """pynetdicom's connection handler, keeping the association it starts for the server."""

    association: Association | None = None

    def _create_association(self) -> Association:
        self.association = super()._create_association()
        return self.association


class _HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the address check at accept and the TLS handshake off the accept loop.

    An address the node does not accept is turned away as soon as its TCP
    connection is accepted (``verify_peer``), before a byte of it is read:
    it never gets a thread, an association, a TLS handshake or a
    ``max_associations`` slot.

    pynetdicom wraps each accepted socket with the handshake done inside
    ``get_request``, on the one thread that accepts every connection, with
    no timeout. A peer that connects and never speaks (a load balancer's
    TCP check, a half-open link, a cart pointed at the TLS port without
    TLS that waits for us to talk first) then blocks every other sender
    until it goes away. Here the accept loop only accepts; the handshake
    runs in the connection's own thread, bounded by ``handshake_timeout``,
    and a failure is logged with the peer's address.

    The connection's thread then waits for its association to end and
    hands it to ``on_association_end`` (whatever ended it: release, abort,
    timeout, a dead reader thread), where what it left behind is cleared.
    """

    #: The listen backlog (socketserver's default is 5): connections turned
    #: away at accept still pass through it, and a burst of them would make
    #: the kernel drop carts' SYNs (each retried after a second or more).
    request_queue_size = 128
    #: Called with the peer's address at accept; False turns the connection away.
    verify_peer: Callable[[str], bool] | None = None
    #: Called with each association once its thread has ended.
    on_association_end: Callable[[Association], None] | None = None

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
        share_contexts(self)

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

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # socketserver closes the connection when this is False.
        if self.verify_peer is None:
            return True
        return self.verify_peer(_peer_address(client_address))

    def finish_request(self, request: Any, client_address: Any) -> None:
        # typeshed types the third argument as the server class itself (Self), which a subclass is not.
        handler = self.RequestHandlerClass(request, client_address, self)  # type: ignore[arg-type]
        assoc = getattr(handler, "association", None)
        if assoc is None or self.on_association_end is None:
            return
        if assoc.ident is not None:  # started
            assoc.join()
        try:
            self.on_association_end(assoc)
        except Exception:  # socketserver would print a raw traceback
            log.exception("association.cleanup_failed")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            peer = _peer_address(client_address)
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


class _ReusePortServer(_HandshakeInThreadServer):
    """The same, bound with SO_REUSEPORT beside the node's other receivers (``node.receivers``)."""

    def server_bind(self) -> None:
        # pynetdicom's server_bind replaces socketserver's, which would honour allow_reuse_port.
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _peer_address(client_address: Any) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)


#: DIMSE statuses this node answers with (Storage Service Class, PS3.4 B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_UNEXPECTED = 0xC211
STATUS_CANNOT_UNDERSTAND = 0xC210
#: PS3.4 B.2.3: "Refused: SOP Class not supported".
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: The Error Comment (and log line) for a C-STORE request that carries no data set.
NO_DATA_SET = "the C-STORE request has no data set (Command Data Set Type 0101H)"


def _status(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902: 64 characters at most) for the sender."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds

#: Connections that have not yet sent their A-ASSOCIATE-RQ. Beyond this many,
#: the one that has waited longest is closed to make room: a cart sends its
#: request within milliseconds of connecting, so only a peer that connects
#: and stays silent (a hostile socket, a half-open link) is ever the oldest,
#: and however many of those there are, a cart's connection is never the one
#: turned away. They do not count against ``max_associations``, which limits
#: associations that have asked for something.
MAX_AWAITING_REQUEST = 32

#: How long :meth:`StorageSCP.stop` waits, in all, for the threads of the
#: associations it aborted (not per association).
STOP_JOIN_S = 5.0

#: Why pynetdicom's own ACSE refused an association (after EVT_REQUESTED), as
#: the log's ``reason``: (result, source, diagnostic) -> words.
_PYNETDICOM_REJECTS: dict[tuple[int | None, int | None, int | None], str] = {
    (0x01, 0x01, 0x07): "called AE title not recognized",
    (0x02, 0x03, 0x02): "max_associations reached",
    (0x02, 0x02, 0x01): "user identity not accepted",
}


@dataclass
class ReceiveCounters:
    """Counts kept for status and metrics (read without locking: ints are atomic enough)."""

    instances: int = 0
    bytes: int = 0
    duplicates: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    associations: int = 0
    rejected: int = 0
    #: Associations the node ended for a protocol fault, by kind
    #: (``pdu_too_large``, ``stalled``, ``bad_pdu``, ``failed``: see pdu_guard).
    aborted: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def abort(self, kind: str) -> None:
        self.aborted[kind] = self.aborted.get(kind, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (a receiver process hands its counts to the node this way)."""
        return {"instances": self.instances, "bytes": self.bytes, "duplicates": self.duplicates,
                "failures": dict(self.failures), "associations": self.associations, "rejected": self.rejected,
                "aborted": dict(self.aborted)}

    def add(self, other: dict[str, Any]) -> None:
        """Add counts given as :meth:`to_dict` gives them; unknown keys are ignored."""
        for name in ("instances", "bytes", "duplicates", "associations", "rejected"):
            setattr(self, name, getattr(self, name) + int(other.get(name, 0)))
        for name in ("failures", "aborted"):
            mine = getattr(self, name)
            for key, n in dict(other.get(name, {})).items():
                mine[key] = mine.get(key, 0) + int(n)


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
    reuse_port : bool, optional
        Listen with SO_REUSEPORT, beside the node's other receivers on the
        same port (``node.receivers``).
    run_token : str, optional
        The first part of this listener's association keys in the journal
        (default: a new random one), by which the node ends the associations
        a dead receiver left open.
    receiver : int, optional
        The receiver process's number, on every log line of its associations.
    """

    def __init__(
        self,
        node: NodeConfig,
        store: StudyStore,
        on_instance: Callable[[str], None] | None = None,
        *,
        reuse_port: bool = False,
        run_token: str | None = None,
        receiver: int | None = None,
    ) -> None:
        self.node = node
        self.reuse_port = reuse_port
        self.receiver = receiver
        self.store = store
        self.on_instance = on_instance
        self.policy = AccessPolicy.from_config(node)
        self.counters = ReceiveCounters()
        self.min_free_bytes = node.min_free_disk_mb * 1024 * 1024
        self._server: ThreadedAssociationServer | None = None
        self._assoc_seq = 0
        self._assoc_ids: weakref.WeakKeyDictionary[Association, int] = weakref.WeakKeyDictionary()
        #: Connections whose A-ASSOCIATE-RQ has not arrived, oldest first, with when they opened.
        self._awaiting: dict[Association, float] = {}
        #: This run's part of the journal's association keys (``study.after_release_s``):
        #: an association of an earlier run never shares one.
        self._run_token = run_token or uuid.uuid4().hex[:12]
        #: Associations that brought an instance to a study still receiving, with their journal key.
        self._bringing: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        # pynetdicom counts every connection's thread against its limit, a
        # silent one that never sent a request included: a few such sockets
        # would lock every cart out until acse_timeout_s. The node applies
        # max_associations itself to associations that have asked (in
        # _on_requested) and bounds silent connections separately
        # (MAX_AWAITING_REQUEST); pynetdicom's own check stays as a backstop.
        ae.maximum_associations = self.node.max_associations + 4 * MAX_AWAITING_REQUEST
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
            assert cx.abstract_syntax is not None  # every context of pynetdicom's list names one
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for uid in RETIRED_US_STORAGE_UIDS:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae

    def apply_config(self, cfg: Config) -> None:
        """New settings (SIGHUP): allow-lists and the free-disk guard, for the next
        associations; open ones are left alone. The rest of ``[node]`` shapes the
        listening server and needs a restart."""
        node = cfg.node
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

    def _verify_connection(self, address: str) -> bool:
        """At accept, before anything is read: may ``address`` connect at all?"""
        if self.policy.address_allowed(address):
            return True
        self.counters.rejected += 1
        log.warning("association.rejected", reason="address not allowed", peer=address)
        return False

    def _on_conn_open(self, event: evt.Event) -> None:
        # In the connection's thread, before its association reads a byte.
        assoc = event.assoc
        with self._lock:
            self._assoc_seq += 1
            assoc_id = self._assoc_ids[assoc] = self._assoc_seq
        spool.track(assoc, self.store.incoming)
        pdu_guard.guard(assoc, on_fault=self.counters.abort, context={"assoc_id": assoc_id})
        self._await_request(assoc)

    def _await_request(self, assoc: Association) -> None:
        """Note a connection whose request has not come; close the longest-waiting one past the cap."""
        now = time.monotonic()
        with self._lock:
            self._awaiting[assoc] = now
            evicted = []
            while len(self._awaiting) > MAX_AWAITING_REQUEST:
                oldest = next(iter(self._awaiting))
                evicted.append((oldest, now - self._awaiting.pop(oldest), self._assoc_ids.get(oldest, 0)))
        for old, waited, old_id in evicted:
            self.counters.abort("evicted")
            log.warning("association.evicted", assoc_id=old_id, peer=old.requestor.address,
                        waited_s=round(waited, 3), reason="no association request while newer connections wait",
                        max_awaiting=MAX_AWAITING_REQUEST)
            sock = getattr(getattr(old.dul, "socket", None), "socket", None)
            if sock is not None:
                # Its reader sees the connection close and the association ends (cleared as usual).
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._awaiting.pop(assoc, None)
        rq = assoc.requestor.primitive
        if not isinstance(rq, A_ASSOCIATE):
            # The connection ended before a request arrived (the PDU guard
            # has logged why): an abort came in the request's place, and
            # pynetdicom must not negotiate it.
            assoc.is_aborted = True
            return
        with self._lock:
            assoc_id = self._assoc_ids.get(assoc, 0)
        address = assoc.requestor.address
        guard = pdu_guard.guard_of(assoc)
        raw = guard.rq_ae_titles if guard is not None else None
        called_field, calling_field = raw if raw is not None else (rq.called_ae_title.encode(), rq.calling_ae_title.encode())
        calling = dicom_ae_title(calling_field)
        # As received, escaped: a log line must not carry a newline a peer chose.
        calling_ae = calling or printable_ae(calling_field)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(assoc_id=assoc_id, calling_ae=calling_ae, peer=address,
                                               **({} if self.receiver is None else {"receiver": self.receiver}))
        refusal = request_refusal(rq)
        if refusal is not None:
            log.warning("association.rejected", reason=refusal[0],
                        application_context=peer_text(rq.application_context_name or ""))
            self._reject(assoc, refusal[1])
            return
        if calling is None:
            log.warning("association.rejected", reason="calling AE title is not a valid AE title",
                        calling_ae=calling_ae)
            self._reject(assoc, REJECT_CALLING_AE)
            return
        if dicom_ae_title(called_field) is None:
            log.warning("association.rejected", reason="called AE title is not a valid AE title",
                        calling_ae=calling_ae, called_ae=printable_ae(called_field))
            self._reject(assoc, REJECT_CALLED_AE)
            return
        # Checked at accept already; again here for a reload in between.
        if not self.policy.address_allowed(address):
            log.warning("association.rejected", reason="address not allowed")
            self._reject(assoc, REJECT_NO_REASON)
            return
        if not self.policy.calling_ae_allowed(calling):
            log.warning("association.rejected", reason="calling AE title not allowed", calling_ae=calling_ae)
            self._reject(assoc, REJECT_CALLING_AE)
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
        if self._requested_associations(other_than=assoc) >= self.node.max_associations:
            log.warning("association.rejected", reason="max_associations reached",
                        max_associations=self.node.max_associations)
            self._reject(assoc, REJECT_LOCAL_LIMIT)
            return
        # Counted as accepted only at EVT_ACCEPTED: pynetdicom may still
        # refuse it after this handler (e.g. the called AE title).
        log.info("association.requested")

    def _requested_associations(self, *, other_than: Association) -> int:
        """Incoming associations alive that have sent their request (silent connections do not count)."""
        return sum(
            1 for a in self.ae.active_associations
            if a.is_acceptor and a is not other_than and isinstance(a.requestor.primitive, A_ASSOCIATE)
        )

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
            extra["max_associations"] = self.node.max_associations
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

    def _association_key(self, assoc: Association) -> str:
        with self._lock:
            return f"{self._run_token}-{self._assoc_ids.get(assoc, 0)}"

    def _on_acse_recv(self, event: evt.Event) -> None:
        """An A-RELEASE-RQ from the peer: record the release before pynetdicom answers it.

        pynetdicom sends the A-RELEASE-RP right after this handler, so once
        the peer sees its association released, the journal holds it
        (committed and fsynced): a kill -9 after that cannot turn it back
        into a study waiting on the quiet rule.
        """
        primitive = event.primitive  # type: ignore[attr-defined]
        if not isinstance(primitive, A_RELEASE) or primitive.result is not None:
            return
        with self._lock:
            key = self._bringing.pop(event.assoc, None)
        if key is None:
            return
        try:
            self.store.journal.association_ended(key, released=True)
        except sqlite3.Error as exc:
            # The study falls back on the quiet rule (study.stable_after_s).
            log.error("association.release_not_recorded", error=type(exc).__name__,
                      code=getattr(exc, "sqlite_errorname", None))

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("association.aborted")

    def _association_ended(self, assoc: Association) -> None:
        """Delete the spool files an association left: data sets it never completed.

        pynetdicom streams a data set into ``incoming/`` and removes the file
        only after the C-STORE handler ran. When the peer aborts, the link
        drops or stalls, or the peer starts another message halfway, the
        handler never runs for it and the part received would stay until
        the next start's recovery: on a node up for months, each interrupted
        cine (easily 100 MB) is disk lost. Such an object was never
        acknowledged, so the sender still has it.
        """
        with self._lock:
            self._awaiting.pop(assoc, None)
            key = self._bringing.pop(assoc, None)
        if key is not None:
            # Ended without a release (abort, lost link, stop): its studies
            # are judged by the quiet rule.
            try:
                self.store.journal.association_ended(key, released=False)
            except sqlite3.Error as exc:
                log.error("association.end_not_recorded", error=type(exc).__name__)
        tracker = spool.tracker_of(assoc)
        if tracker is None:
            return
        with self._lock:
            assoc_id = self._assoc_ids.get(assoc, 0)
        rq = assoc.requestor.primitive
        fields: dict[str, Any] = {"assoc_id": assoc_id, "peer": assoc.requestor.address}
        if isinstance(rq, A_ASSOCIATE):
            fields["calling_ae"] = rq.calling_ae_title
        removed, not_removed = tracker.discard_leftovers()
        for leftover, size in removed:
            if leftover.handled:
                # Refused by its handler (and counted under that status); its
                # deletion failed then and worked now.
                log.info("store.refused_spool_removed", **fields, sop_uid=peer_text(leftover.sop_uid), bytes=size)
                continue
            self.counters.fail("incomplete")
            log.warning("store.partial_discarded", **fields, sop_uid=peer_text(leftover.sop_uid), bytes=size)
        for leftover, error in not_removed:
            if not leftover.handled:  # a handled one was counted with the status it got
                self.counters.fail("incomplete")
            log.error("store.partial_not_removed", **fields, sop_uid=peer_text(leftover.sop_uid), path=leftover.name,
                      handled=leftover.handled, error=f"{type(error).__name__}: {error.strerror or error}")

    def _on_echo(self, event: evt.Event) -> int:
        log.info("echo")
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        req = cast(C_STORE, event.request)  # EVT_C_STORE's request
        calling = event.assoc.requestor.ae_title
        # The request's UID, before the data set's is checked against it.
        structlog.contextvars.bind_contextvars(sop_uid=peer_text(req.AffectedSOPInstanceUID or ""))
        stage = "store"
        try:
            # Still checked per object: an association accepted with room to
            # spare may run the disk down while it lasts.
            free = self._low_disk()
            if free is not None:
                self.counters.fail("out_of_disk")
                log.error("store.refused_low_disk", free_bytes=free)
                return STATUS_OUT_OF_RESOURCES
            affected = str(req.AffectedSOPClassUID or "")
            negotiated = str(event.context.abstract_syntax or "")
            if store_on_wrong_context(affected, negotiated):
                self.counters.fail(f"0x{STATUS_SOP_CLASS_NOT_SUPPORTED:04X}")
                log.warning("store.refused", status=f"0x{STATUS_SOP_CLASS_NOT_SUPPORTED:04X}",
                            error="the request's SOP class is not its presentation context's",
                            sop_class=peer_text(affected), context_sop_class=negotiated)
                return STATUS_SOP_CLASS_NOT_SUPPORTED
            path = event.dataset_path
            if path is None:
                # CommandDataSetType 0x0101: the request says no data set follows.
                self.counters.fail(f"0x{STATUS_CANNOT_UNDERSTAND:04X}")
                log.warning("store.refused", status=f"0x{STATUS_CANNOT_UNDERSTAND:04X}", error=NO_DATA_SET)
                return _status(STATUS_CANNOT_UNDERSTAND, NO_DATA_SET)
            interrupted = spool.failure(req)
            if interrupted is not None:
                # Writing the spool file failed (disk full); the rest of the
                # data set was read and dropped so that this answer can go.
                stage = "spool"
                raise interrupted
            key = self._association_key(event.assoc)
            header, outcome = self.store.accept(path, calling, key)
            if outcome != "duplicate":
                with self._lock:
                    self._bringing[event.assoc] = key
        except BadObject as exc:
            self.counters.fail(f"0x{exc.status:04X}")
            log.warning("store.refused", status=f"0x{exc.status:04X}", error=str(exc))
            return exc.status
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.counters.fail("out_of_disk")
                log.error("store.refused_disk_full", stage=stage, error=errno.errorcode[exc.errno])
                return STATUS_OUT_OF_RESOURCES
            self.counters.fail("io_error")
            log.error("store.io_error", stage=stage, error=f"{type(exc).__name__}: {exc.strerror or exc}")
            return STATUS_OUT_OF_RESOURCES
        except sqlite3.Error as exc:
            # The journal could not take the record (locked past its
            # timeout, unreadable): the object was taken back, the sender
            # may try again later. A full disk arrives above as ENOSPC.
            self.counters.fail("journal_error")
            log.error("store.journal_error", error=type(exc).__name__,
                      code=getattr(exc, "sqlite_errorname", None))
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # a bug; the sender must not think it was stored
            self.counters.fail("unexpected")
            log.exception("store.unexpected_error")
            return STATUS_UNEXPECTED
        finally:
            structlog.contextvars.unbind_contextvars("sop_uid")
            # Handled either way: the tracker need not hold it for the rest of a long association.
            spool.release(event.assoc, req)
        if outcome == "duplicate":
            self.counters.duplicates += 1
        else:
            self.counters.instances += 1
            with contextlib.suppress(OSError):
                self.counters.bytes += self.store.instance_path(header).stat().st_size
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

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Listen (non-blocking). Data sets are spooled into the store's
        ``incoming/`` (spool.track), so that accepting one is a rename on the
        same file system."""
        # As AE.start_server(block=False), with our server class (see
        # _HandshakeInThreadServer); the AE must list the server for its
        # shutdown() to find it.
        server = cast(_HandshakeInThreadServer, self.ae.make_server(
            (self.node.host, self.node.port),
            evt_handlers=self.handlers(),
            ssl_context=server_ssl_context(self.node.tls),
            server_class=_ReusePortServer if self.reuse_port else _HandshakeInThreadServer,
            request_handler=_AssociationRequestHandler,
        ))
        server.handshake_timeout = self.node.acse_timeout_s
        server.verify_peer = self._verify_connection
        server.on_association_end = self._association_ended
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

    def _established(self) -> int:
        """Incoming associations accepted and not yet ended."""
        return len([a for a in self.ae.active_associations if a.is_acceptor and a.is_established])

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop listening, let associations in flight finish for up to ``grace_s``, abort the rest.

        An aborted transfer was never acknowledged, so the sender keeps it and
        sends it again; its spool file is removed once its association's
        thread has ended (here, within a few seconds; else at the next start).
        """
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + grace_s
        # The grace is for transfers in flight; a connection that has not
        # been accepted as an association yet has nothing to finish.
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.1)
        active = [a for a in self.ae.active_associations if a.is_acceptor]
        # One released or aborted already (or aborting on a timeout) is only finishing its thread:
        # nothing is aborted there (under load a released association's thread can outlive the
        # wait above by a moment).
        ending = [a for a in active if association_ending(a)]
        left = [a for a in active if a not in ending]
        aborted = 0
        for assoc in left:
            # First through the guard: pynetdicom's abort waits for a reader
            # that may sit in the middle of a PDU until its read deadline (a
            # connection that sent 6 bytes of a request and nothing more).
            # The guard looks again: one may have finished its release since.
            guard = pdu_guard.guard_of(assoc)
            if guard is None:
                aborted += not association_ending(assoc)
            elif guard.abort():
                aborted += 1
        for assoc in ending:
            # Its peer has had its answer; the thread may still wait for the peer to close the
            # connection (or for ARTIM): shut it here so that the thread ends within stop().
            guard = pdu_guard.guard_of(assoc)
            if guard is not None and assoc.is_alive():
                guard.close_transport()
        for assoc in left:
            assoc.abort()  # pynetdicom's: sends nothing to a released one
        if aborted:
            log.warning("scp.aborted_on_stop", associations=aborted)
        # One deadline for all of them, not a wait per association.
        join_deadline = time.monotonic() + STOP_JOIN_S
        for assoc in left + ending:
            assoc.join(timeout=max(0.0, join_deadline - time.monotonic()))
        for assoc in left + ending:
            # The connection's thread does the same when the association
            # ends; done here too so that stop() leaves incoming/ clean. One
            # still running is cleaned up when its thread ends, or at the
            # next start.
            if not assoc.is_alive():
                self._association_ended(assoc)
        self._server = None
        log.info("scp.stopped")
