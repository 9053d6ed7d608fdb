"""Delivery of SRs: a durable outbox in the journal, C-STORE to each destination.

Each outbox row is one SR for one destination. The scheduler runs
:meth:`Delivery.run` every few seconds; a row is tried when due.

Failures are sorted into two kinds:

- transient (host name not resolved, connection refused or timed out,
  association aborted or rejected *transiently*, 0xA7xx out of resources,
  no response): retried with exponential backoff up to
  ``delivery.max_attempts``;
- permanent (association rejected permanently, e.g. unknown called AE;
  SR storage not accepted in any transfer syntax offered; the destination's
  TLS files unusable; 0xA9xx / 0xCxxx / 0x01xx refusals): the row goes to
  the dead letter at once, with the reason, for ``echonode retry``.

Exactly once: the SR file and its SOP Instance UID are fixed before the
first attempt. If the node dies after the peer stored it but before the row
is marked sent, the same object is sent again, which a PACS stores as the
same instance, not a second report.
"""

from __future__ import annotations

import random
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .config import Config, Destination, TLSConfig
from .journal import Journal, OutboxItem
from .logs import get_logger
from .pdu_guard import guard_connection
from .scp import client_ssl_context

log = get_logger(__name__)


class DeliveryError(Exception):
    """A failed attempt; ``permanent`` says whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


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
            return cls(d.ae_title, d.host, d.port, d.tls)
        except KeyError:
            pass
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

_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def associate(
    local_ae_title: str,
    peer: Peer,
    contexts: list[tuple[str, list[str] | None]],
    timeout_s: float = 30.0,
    max_pdu: int = 131072,
) -> Association:
    """Open an association or raise :class:`DeliveryError` saying why not."""
    ae = AE(ae_title=local_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    for abstract, syntaxes in contexts:
        if syntaxes:
            ae.add_requested_context(abstract, syntaxes)
        else:
            ae.add_requested_context(abstract)
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
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            tls_args=tls_args,
            # guard_connection: PDU limits and read deadlines (pdu_guard.py);
            # pynetdicom puts the socket back to blocking once connected.
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True)),
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
    if not connected:
        raise DeliveryError(f"cannot connect to {peer.host}:{peer.port}", permanent=False)
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result = getattr(prim, "result", None)
        source = getattr(prim, "result_source", None)
        diag = getattr(prim, "diagnostic", None)
        reason = _REJECT_REASONS.get((source or 0, diag or 0), f"source {source}, reason {diag}")
        permanent = result == 0x01
        kind = "permanently" if permanent else "transiently"
        raise DeliveryError(f"association rejected {kind}: {reason}", permanent=permanent)
    accept = assoc.acceptor.primitive
    if getattr(accept, "result", None) == 0x00 and not assoc.accepted_contexts:
        # The peer accepted the association but none of our presentation
        # contexts (pynetdicom then aborts it): it does not take this object.
        raise DeliveryError(_no_context_reason(assoc), permanent=True)
    if assoc.is_aborted:
        raise DeliveryError("association aborted by the peer (or no answer to the request)", permanent=False)
    raise DeliveryError(f"cannot connect to {peer.host}:{peer.port}", permanent=False)


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


def _uid_name(uid: str) -> str:
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def echo(local_ae_title: str, peer: Peer, timeout_s: float = 10.0) -> int:
    """C-ECHO ``peer``; return the status (0x0000 is success).

    Raises
    ------
    DeliveryError
        When no association could be made or no response came.
    """
    assoc = associate(local_ae_title, peer, [(Verification, None)], timeout_s)
    try:
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            raise DeliveryError("no C-ECHO response", permanent=False)
        return int(status.Status)
    finally:
        assoc.release()


#: Warning statuses outside 0xB000-0xBFFF (PS3.7 C.4: attribute list error,
#: attribute value out of range, and the general warning).
_GENERAL_WARNINGS = (0x0001, 0x0107, 0x0116)


def classify_store_status(status: int) -> tuple[bool, bool]:
    """(stored, permanent) for a C-STORE response status.

    Parameters
    ----------
    status : int
        The Status of the C-STORE response.

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


def store_file(local_ae_title: str, peer: Peer, path: str, timeout_s: float = 30.0) -> int:
    """C-STORE one file; return the status or raise :class:`DeliveryError`.

    The SR's storage class is proposed in one presentation context per
    transfer syntax: the file's own first, then both little-endian
    uncompressed ones. Some PACS (and dcmtk's ``storescp +xi``) take only
    Implicit VR Little Endian, the one syntax every DICOM peer must support
    (PS3.5 10.1); pynetdicom re-encodes the SR for it. Separate contexts
    (rather than one listing every syntax, where the peer picks) let a peer
    accept the file's own syntax, which pynetdicom then prefers, so the SR
    arrives as written wherever the peer allows.
    """
    ds = dcmread(path)
    sop_class = str(ds.SOPClassUID)
    tsyntax = str(ds.file_meta.TransferSyntaxUID)
    contexts: list[tuple[str, list[str] | None]] = [
        (sop_class, [ts]) for ts in dict.fromkeys([tsyntax, *SEND_TRANSFER_SYNTAXES])
    ]
    assoc = associate(local_ae_title, peer, contexts, timeout_s)
    try:
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            raise DeliveryError("the destination does not accept this SR storage class", permanent=True)
        rsp = assoc.send_c_store(ds)
        if not rsp or "Status" not in rsp:
            raise DeliveryError("no C-STORE response (timeout or abort)", permanent=False)
        status = int(rsp.Status)
    finally:
        if assoc.is_established:
            assoc.release()
    stored, permanent = classify_store_status(status)
    if not stored:
        raise DeliveryError(f"C-STORE refused with status 0x{status:04X}", permanent=permanent)
    return status


class Delivery:
    """The outbox job.

    Parameters
    ----------
    cfg : Config
    journal : Journal
    """

    def __init__(self, cfg: Config, journal: Journal) -> None:
        self.cfg = cfg
        self.journal = journal
        self.failures: dict[str, int] = {}

    def update_config(self, cfg: Config) -> None:
        self.cfg = cfg

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failures (jittered exponential)."""
        d = self.cfg.delivery
        base = min(d.retry_max_s, d.retry_initial_s * (2 ** max(0, attempts - 1)))
        return base * random.uniform(0.8, 1.0)

    #: Attempts one pass makes at most, so that a pass (and a graceful stop
    #: waiting for it) stays short; the rest are due for the next pass.
    PASS_ATTEMPTS = 32

    def run(self) -> int:
        """Try the due outbox rows, longest due first; return how many were sent.

        After a transient failure a destination is left alone for the rest
        of the pass: one PACS that drops connections silently would
        otherwise cost ``timeout_s`` per queued SR and hold up the SRs of
        every other destination. Its remaining rows stay due for the next
        pass, and the pass reads past them (the journal leaves resting
        destinations out), so a long backlog for a PACS that is down cannot
        hide the SRs owed to the others.
        """
        sent = 0
        resting: set[str] = set()
        tried: set[int] = set()
        while len(tried) < self.PASS_ATTEMPTS:
            # A row tried in this pass is sent, dead or resting, so it cannot
            # come back; the filter only guards the loop's end.
            batch = [i for i in self.journal.due_deliveries(limit=self.PASS_ATTEMPTS, skip=resting)
                     if i.id not in tried]
            if not batch:
                break
            for item in batch:
                if len(tried) >= self.PASS_ATTEMPTS:
                    break
                if item.destination in resting:
                    continue
                tried.add(item.id)
                outcome = self._attempt(item)
                if outcome == "sent":
                    sent += 1
                elif outcome == "transient":
                    resting.add(item.destination)
                    # Read again without it: rows beyond this batch may be
                    # owed to destinations that are up.
                    break
        return sent

    def _attempt(self, item: OutboxItem) -> str:
        """One try; returns ``sent``, ``transient`` (will be retried) or ``dead``."""
        bound = log.bind(study_uid=item.study_uid, sr_sop_uid=item.sr_sop_uid, destination=item.destination)
        try:
            dest = self.cfg.destination(item.destination)
        except KeyError:
            self.journal.mark_dead(item.id, "destination no longer configured")
            self._count("unknown_destination")
            bound.error("delivery.dead", reason="destination no longer configured")
            return "dead"
        try:
            status = store_file(self.cfg.node.ae_title, Peer.of(dest), item.path, self.cfg.delivery.timeout_s)
        except DeliveryError as exc:
            outcome = self._retry_or_dead(item, str(exc), bound, permanent=exc.permanent)
            if outcome == "transient":
                self._count("transient")
            else:
                self._count("permanent" if exc.permanent else "exhausted")
            return outcome
        except (OSError, ValueError, InvalidDicomError) as exc:
            # The SR file itself is unreadable: nothing a retry fixes.
            self.journal.mark_dead(item.id, f"SR file unreadable: {type(exc).__name__}")
            self._count("bad_file")
            bound.error("delivery.dead", reason=f"SR file unreadable: {type(exc).__name__}")
            return "dead"
        except Exception as exc:  # noqa: BLE001 - a bug must not block every later SR
            bound.exception("delivery.unexpected_error")
            # Left to the normal backoff and max_attempts, so one bad row
            # cannot stay first in the queue and stop every pass.
            self._retry_or_dead(item, f"unexpected error: {type(exc).__name__}", bound)
            self._count("unexpected")
            # The destination rests for this pass either way, as after any
            # transient failure: the bug may be in talking to it.
            return "transient"
        state = self.journal.mark_sent(item.id)
        bound.info("delivery.sent", status=f"0x{status:04X}", study_state=str(state))
        return "sent"

    def _retry_or_dead(self, item: OutboxItem, error: str, bound: Any, *, permanent: bool = False) -> str:
        """Record a failed attempt: the dead letter when it is final, else a retry after the backoff.

        Parameters
        ----------
        item : OutboxItem
            The row that failed.
        error : str
            Why; it becomes the row's ``last_error``.
        bound : structlog logger
            The attempt's logger (study, SR and destination bound).
        permanent : bool, optional
            Retrying cannot help: dead letter at once.

        Returns
        -------
        str
            ``dead`` when the row went to the dead letter (``permanent``, or
            ``delivery.max_attempts`` reached), ``transient`` when it will be tried again.
        """
        attempts = item.attempts + 1
        if permanent or attempts >= self.cfg.delivery.max_attempts:
            reason = error if permanent else f"gave up after {attempts} attempts: {error}"
            self.journal.mark_dead(item.id, reason)
            bound.error("delivery.dead", reason=reason)
            return "dead"
        delay = self.backoff(attempts)
        self.journal.mark_retry(item.id, time.time() + delay, error)
        bound.warning("delivery.retry", error=error, attempts=attempts, retry_in_s=round(delay, 1))
        return "transient"

    def _count(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
