"""Retrieval: C-MOVE to fetch's own storage SCP, C-GET on one association, the outcome of each series.

C-MOVE asks the PACS to open an association back to fetch's AE title
(``--move-aet``, listening on ``--port``), which the PACS must know as a
DICOM node. C-GET needs no such setting: the instances come back on the
association fetch opened, in the presentation contexts it proposed
(:func:`train.fetch.dimse.get_contexts`). Either way each C-STORE is landed
and recorded before it is acknowledged (:class:`train.fetch.landing.Sink`),
and the bandwidth cap reads the bytes as they come off the socket
(``EVT_DATA_RECV``), so a capped fetch slows the PACS's sending instead of
holding each acknowledgement back (which would run into the PACS's own
timeout on a large instance).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from pynetdicom.utils import make_target

from echonode.network import pdu_guard
from echonode.network.contexts import share_contexts, store_on_wrong_context
from echonode.ops.logs import get_logger, peer_text
from echonode.receive import spool
from echonode.receive.access import request_refusal

from .dimse import (
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    make_ae,
    no_answer,
    no_delay,
    retrieve_failure,
    status_of,
    sub_operations,
)
from .errors import FetchError, UsageError
from .landing import STATUS_OUT_OF_RESOURCES, InFlight, Sink
from .pacing import RateLimiter
from .reader import install

log = get_logger(__name__)

# Every C-STORE streams to a temp file (the runner points tempfile at
# ARCHIVE/.fetch/tmp), which is then renamed into place: memory stays flat
# whatever the size of an instance.
_config.STORE_RECV_CHUNKED_DATASET = True
# Spool files of the move listener's and the C-GET associations are tracked
# (as the node's are), so the part of a data set that an association ended
# in the middle of is deleted when it ends, and a write error becomes a status.
spool.install()

#: How long, after its connection closed, the end of an association's thread is waited
#: for before what it left in tmp/ is deleted (its C-STORE handler may still be running).
ASSOCIATION_END_WAIT_S = 60.0


@dataclass(frozen=True)
class SeriesOutcome:
    """The final answer to the C-MOVE or C-GET of one series."""

    series_uid: str
    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        # 0xB000 with no failure: only warnings (e.g. the store SCP coerced an element).
        return self.status in (0x0000, 0xB000) and self.failed == 0


def series_identifier(study_uid: str, series_uid: str | None) -> Dataset:
    """The identifier of one series, or of the whole study when ``series_uid`` is None."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
    ds.StudyInstanceUID = study_uid
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    return ds


def _final(assoc: Association, responses: Iterable[tuple[Dataset, Dataset | None]], series_uid: str,
           what: str) -> SeriesOutcome:
    t0 = time.monotonic()
    for status, _identifier in responses:
        code = status_of(status)
        if code is None:
            raise no_answer(assoc, what, time.monotonic() - t0)
        t0 = time.monotonic()
        if code in (0xFF00, 0xFF01):
            continue
        _remaining, completed, failed, warning = sub_operations(status)
        return SeriesOutcome(series_uid, code, completed, failed, warning)
    raise FetchError(f"{what}: no final answer from the PACS", busy=True)


def move_series(assoc: Association, move_aet: str, study_uid: str, series_uid: str | None) -> SeriesOutcome:
    """C-MOVE one series (None: the whole study) to ``move_aet``; the final status and sub-operation counts."""
    responses = assoc.send_c_move(series_identifier(study_uid, series_uid), move_aet, STUDY_ROOT_MOVE)
    return _final(assoc, responses, series_uid or "(all)", f"C-MOVE {_target(study_uid, series_uid)}")


def get_series(assoc: Association, study_uid: str, series_uid: str | None) -> SeriesOutcome:
    """C-GET one series (None: the whole study) over ``assoc``; the final status and sub-operation counts."""
    responses = assoc.send_c_get(series_identifier(study_uid, series_uid), STUDY_ROOT_GET)
    return _final(assoc, responses, series_uid or "(all)", f"C-GET {_target(study_uid, series_uid)}")


def _target(study_uid: str, series_uid: str | None) -> str:
    return f"study {study_uid}" if series_uid is None else f"series {series_uid}"


def judge(outcomes: list[SeriesOutcome], flight: InFlight | None, verb: str) -> int:
    """Raise :class:`FetchError` unless every series came whole; returns the instances the PACS sent.

    A failure the PACS counts that fetch itself caused (an instance that
    does not parse, refused here) will happen again on every try: the study
    fails at once instead of being retried.
    """
    sent = sum(o.completed + o.warning for o in outcomes)
    bad = [o for o in outcomes if not o.ok]
    if bad:
        first = bad[0]
        failed = sum(o.failed for o in outcomes)
        target = "the study" if first.series_uid == "(all)" else f"series {first.series_uid}"
        err = retrieve_failure(first.status, f"{verb} {target}", failed)
        if flight is not None and flight.refused:
            reason = f"{err.reason}; refused here: {flight.refused} ({flight.reasons[0]})"
            ours = flight.refused >= failed and not err.busy and not err.fatal
            err = FetchError(reason, transient=err.transient and not ours, busy=err.busy, fatal=err.fatal)
        raise err
    if flight is not None and flight.instances < sent:
        raise FetchError(f"the PACS reported {sent} instance(s) sent but {flight.instances} arrived", transient=True)
    return sent


#: C-STORE status: the request's SOP class is not the one of its presentation context (PS3.7 9.1.1.1).
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122


def store_handler(sink: Sink, study_hint: Callable[[], str | None] = lambda: None,
                  check_context: bool = False) -> Callable[[Any], int]:
    """The EVT_C_STORE handler: land the streamed file, answer with the sink's status.

    With ``check_context`` (an association the peer proposed: C-MOVE's), a
    C-STORE on a context of another SOP class than its request names, the
    Verification context among them, is refused with 0x0122 before it lands.
    """

    def on_store(event: Any) -> int:
        try:
            return land(event)
        finally:
            spool.release(event.assoc, event.request)

    def land(event: Any) -> int:
        announced = str(event.request.AffectedSOPInstanceUID or "")
        if check_context:
            affected = str(event.request.AffectedSOPClassUID or "")
            negotiated = str(event.context.abstract_syntax or "")
            if store_on_wrong_context(affected, negotiated):
                log.warning("fetch.store_refused", status=f"0x{STATUS_SOP_CLASS_NOT_SUPPORTED:04X}",
                            error="the request's SOP class is not its presentation context's",
                            sop_class=peer_text(affected), context_sop_class=negotiated,
                            sop_uid=peer_text(announced))
                return STATUS_SOP_CLASS_NOT_SUPPORTED
        interrupted = spool.failure(event.request)
        if interrupted is not None:
            # The rest of the data set was read and dropped: nothing usable landed.
            log.error("fetch.store_not_written", sop_uid=peer_text(announced),
                      error=f"{type(interrupted).__name__}: {interrupted.strerror or interrupted}")
            return STATUS_OUT_OF_RESOURCES
        try:
            path = Path(event.dataset_path)
        except (AttributeError, ValueError):  # not received in chunks: cannot happen with fetch's settings
            return 0xC211
        try:
            return sink.accept(path, announced, study_hint())
        except Exception:
            log.exception("fetch.store_unexpected_error", sop_uid=announced)
            return 0xC211

    return on_store


def throttle_handler(limiter: RateLimiter) -> Callable[[Any], None]:
    """The EVT_DATA_RECV handler: spend the bandwidth budget as each PDU is read."""

    def on_data(event: Any) -> None:
        limiter.take(len(event.data))

    return on_data


def resolve_peers(hosts: Iterable[str]) -> frozenset[str]:
    """The IP addresses of ``hosts`` (names or addresses), normalised for comparison.

    Raises
    ------
    UsageError
        For a name that does not resolve.
    """
    found: set[str] = set()
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise UsageError(f"--move-from {host}: does not resolve ({exc.strerror or type(exc).__name__})") from None
        found.update(_normalised(str(info[4][0])) for info in infos)
    return frozenset(found)


def _normalised(address: str) -> str:
    """An IP address as compared: an IPv4-mapped IPv6 address as its IPv4 form."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class StoreServer:
    """The storage SCP that receives what a C-MOVE sends.

    It accepts every storage class in every transfer syntax (the series
    asked for are US and SR; whatever they hold lands), but only instances
    of the studies being fetched at the moment (anything else: 0xC001).

    It listens on the network while a run lasts, so it is guarded as the
    node's own SCP is: a connection from an address other than the PACS's
    (``allowed``) is closed before a byte is read; every read is bounded in
    size and time by the node's PDU guard until the association is accepted
    (a connect-and-close or a PDU before the request ends at once instead
    of holding one of the 32 association slots for ``timeout_s``); a request
    that calls another AE title, names another application context, or
    proposes a malformed presentation context is rejected; a command that
    never ends is aborted (:data:`~echonode.network.pdu_guard.MAX_COMMAND_BYTES`);
    and a C-STORE on another class's context gets 0x0122. Once accepted,
    the association reads through fetch's buffered reader (the fast path).

    Parameters
    ----------
    ae_title : str
        ``--move-aet``.
    host, port : str, int
        Where to listen (``--listen``, ``--port``); port 0 picks a free one.
    sink : Sink
    limiter : RateLimiter
    timeout_s : float
        Deadline of every read on its associations.
    max_pdu : int
    allowed : frozenset of str, optional
        The IP addresses a C-MOVE's stores may come from (:func:`resolve_peers`);
        None lets any address in.
    """

    def __init__(self, ae_title: str, host: str, port: int, sink: Sink, limiter: RateLimiter, timeout_s: float,
                 max_pdu: int, allowed: frozenset[str] | None = None) -> None:
        self.ae = make_ae(ae_title, timeout_s, max_pdu)
        self.ae.maximum_associations = 32
        # A request calling another AE title than --move-aet is rejected (1/1/7) by pynetdicom.
        self.ae.require_called_aet = True
        self.allowed = allowed
        #: Connections closed for their address, by address (reported at the end of the run).
        self.refused: collections.Counter[str] = collections.Counter()
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for sop_class in ("1.2.840.10008.5.1.4.1.1.3", "1.2.840.10008.5.1.4.1.1.6"):  # retired US classes
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.host = host
        self.requested_port = port
        self.handlers: list[Any] = [(evt.EVT_C_STORE, store_handler(sink, check_context=True)),
                                    (evt.EVT_CONN_OPEN, self._on_open),
                                    (evt.EVT_CONN_CLOSE, discard_leftovers_once_ended),
                                    (evt.EVT_REQUESTED, self._on_requested),
                                    (evt.EVT_ACCEPTED, lambda event: install(event.assoc)),
                                    (evt.EVT_REJECTED, _log_rejected)]
        if limiter.enabled:
            self.handlers.append((evt.EVT_DATA_RECV, throttle_handler(limiter)))
        self._server: Any = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.requested_port

    def _on_open(self, event: Any) -> None:
        """Guard the connection's reads; close it at once when its address is not the PACS's."""
        assoc = event.assoc
        no_delay(assoc)
        guard = pdu_guard.guard(assoc, context={"scp": "fetch"})
        track_spool(event)
        address = _normalised(str(assoc.requestor.address or ""))
        if self.allowed is not None and address not in self.allowed:
            log.warning("fetch.association_refused", reason="address not allowed (--move-from)", peer=address)
            self.refused[address] += 1
            guard.abort()

    def _on_requested(self, event: Any) -> None:
        """Refuse a request fetch cannot serve before pynetdicom negotiates it."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        if not isinstance(rq, A_ASSOCIATE):
            # The connection ended before a request came (the guard logged why):
            # nothing to negotiate.
            assoc.is_aborted = True
            return
        refusal = request_refusal(rq)
        if refusal is not None:
            log.warning("fetch.association_refused", reason=refusal[0],
                        peer=_normalised(str(assoc.requestor.address or "")),
                        application_context=peer_text(rq.application_context_name or ""))
            _reject(assoc, refusal[1])

    def start(self) -> StoreServer:
        try:
            server = self.ae.make_server((self.host, self.requested_port), evt_handlers=self.handlers)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.host}:{self.requested_port} for C-MOVE "
                             f"({exc.strerror or type(exc).__name__}): choose another --port") from None
        share_contexts(server)  # one per study would cost 50 ms of CPU each
        # As AE.start_server(block=False), but polling every 50 ms instead of
        # 500: stopping the server waits for the poll, at the end of every run.
        self.ae._servers.append(server)
        threading.Thread(target=make_target(functools.partial(server.serve_forever, poll_interval=0.05)),
                         name="fetch-store-scp", daemon=True).start()
        self._server = server
        log.info("fetch.store_scp_listening", ae_title=self.ae.ae_title, port=self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def track_spool(event: Any) -> None:
    """EVT_CONN_OPEN: record the association's spool files (in tmp/, where the runner points tempfile)."""
    spool.track(event.assoc, Path(tempfile.gettempdir()))


def discard_leftovers_once_ended(event: Any) -> None:
    """EVT_CONN_CLOSE: once the association's thread has ended, delete what it left in tmp/ (never acknowledged)."""
    tracker = spool.tracker_of(event.assoc)
    if tracker is None or not tracker.files:
        # Nothing left (the usual case: each file is released after its
        # handler); the connection is closed, so no file can start now.
        return
    threading.Thread(target=discard_leftovers, args=(event.assoc,), name="fetch-spool-cleanup",
                     daemon=True).start()


def discard_leftovers(assoc: Association, wait_s: float = ASSOCIATION_END_WAIT_S) -> int:
    """Delete the spool files ``assoc`` left: data sets it ended in the middle of; returns how many.

    pynetdicom streams a data set into tmp/ and removes the file only after
    the C-STORE handler ran; when the PACS aborts, the link drops or the
    peer starts another message halfway, the handler never runs and the part
    received would stay until the run ends (a whole archive's run can last
    days, and an interrupted cine is easily 100 MB). Such an object was never
    acknowledged, so the PACS reports it failed and a later attempt asks for
    it again.
    """
    tracker = spool.tracker_of(assoc)
    if tracker is None:
        return 0
    # The PACS's address: the peer that opened a C-MOVE's association, the one fetch opened for C-GET.
    peer = _normalised(str((assoc.acceptor if assoc.is_requestor else assoc.requestor).address or ""))
    if assoc.is_alive():  # called on a thread of its own (discard_leftovers_once_ended)
        assoc.join(wait_s)
        if assoc.is_alive():
            log.warning("fetch.partial_kept", reason="the association's thread has not ended", peer=peer)
            return 0
    removed, not_removed = tracker.discard_leftovers()
    refused = [(leftover, size) for leftover, size in removed if leftover.handled]
    removed = [(leftover, size) for leftover, size in removed if not leftover.handled]
    for leftover, size in refused:
        # Refused by its handler; its deletion failed then and worked now.
        log.info("fetch.refused_spool_removed", sop_uid=peer_text(leftover.sop_uid), bytes=size, peer=peer)
    for leftover, size in removed:
        log.warning("fetch.partial_discarded", sop_uid=peer_text(leftover.sop_uid), bytes=size, peer=peer)
    for leftover, exc in not_removed:
        log.error("fetch.partial_not_removed", sop_uid=peer_text(leftover.sop_uid), path=leftover.name, peer=peer,
                  handled=leftover.handled, error=f"{type(exc).__name__}: {exc.strerror or exc}")
    return len(removed)


def _log_rejected(event: Any) -> None:
    """Log a rejection pynetdicom made itself (a called AE title other than --move-aet: 1/1/7)."""
    rq = event.assoc.requestor
    log.warning("fetch.association_rejected", peer=_normalised(str(rq.address or "")),
                called_ae=peer_text(str(getattr(rq.primitive, "called_ae_title", "") or "")),
                calling_ae=peer_text(str(getattr(rq.primitive, "calling_ae_title", "") or "")))


def _reject(assoc: Association, reason: tuple[int, int, int]) -> None:
    """Send the A-ASSOCIATE-RJ ``reason`` and end the association once it is sent."""
    assoc.acse.send_reject(*reason)
    assoc.kill()


class Associations:
    """The associations open now, so that an interrupted run can abort them instead of waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Association] = set()

    def add(self, assoc: Association) -> None:
        with self._lock:
            self._open.add(assoc)

    def discard(self, assoc: Association) -> None:
        with self._lock:
            self._open.discard(assoc)

    def abort_all(self) -> None:
        """Abort every open association and wake the thread waiting on each for a DIMSE message.

        pynetdicom's wait for the next message only ends at the DIMSE
        timeout after a local abort: an empty message ends it now (the
        caller then sees "no answer", as after a peer's abort). Several are
        queued because the abort also wakes the association's own reactor,
        which may take one of them.
        """
        with self._lock:
            live = list(self._open)
        for assoc in live:
            with contextlib.suppress(Exception):  # best effort on the way out
                assoc.abort(block=False)
                for _ in range(4):
                    assoc.dimse.msg_queue.put((None, None))
