"""Delivery of SRs: a durable outbox in the journal, C-STORE or STOW-RS to each destination.

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

A destination is a DICOM peer (``kind = "dimse"``: C-STORE, here) or a
DICOMweb store (``kind = "stow"``: STOW-RS, :mod:`echonode.delivery.stow`); both go
through the same outbox, lanes, deadline, backoff and dead letters, and
their failures are sorted the same way.

Per destination, the SR goes in the best SR class the destination takes
(:mod:`echonode.report.sop`): its own (Comprehensive 3D SR by default),
else the same report as Comprehensive SR, then Enhanced SR, under a SOP
Instance UID derived from the SR's, the same at every resend. A DIMSE
destination says which at association (every class proposed, each in the
transfer syntaxes below); a STOW-RS one by refusing a class (FailureReason
0x0122). The outbox row records the class and UID sent.

Exactly once: the SR file and its SOP Instance UID are fixed before the
first attempt. If the node dies after the peer stored it but before the row
is marked sent, the same object is sent again, which a PACS stores as the
same instance, not a second report.

One destination never holds up another: each destination has its own lane
(a thread per pass, at most one attempt in flight), and every attempt has a
hard deadline, ``delivery.timeout_s``, kept from outside the attempt
(:mod:`echonode.network.deadline` shuts the association's socket down), so a peer
that stops in the middle of an answer costs its own lane ``timeout_s`` and
nothing else. An attempt that outlives even that (a read that nothing can
end) holds only its own lane; the node's stop gives attempts in flight a
bounded grace, cuts them, and leaves behind those that still do not come
back: their rows stay pending and go out at the next start under the same
SOP Instance UID.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.errors import InvalidDicomError

from echonode.config import Config
from echonode.delivery import stow
from echonode.delivery.dimse import Peer, store_file
from echonode.delivery.outcome import (
    DeliveryError,
)
from echonode.network.deadline import STOP, AssociationDeadline
from echonode.ops.logs import get_logger
from echonode.studies.journal import Journal
from echonode.studies.records import OutboxItem

__all__ = ["Delivery", "Lane", "LaneStatus"]

log = get_logger(__name__)


@dataclass
class Lane:
    """One destination's delivery lane: its passes run one at a time, in a thread of their own.

    Written by the lane's thread and by :meth:`Delivery.stop`, under the
    delivery's lock; read by :meth:`Delivery.lanes` for the metrics.
    """

    destination: str
    thread: threading.Thread | None = None
    #: The attempt in flight (None between attempts).
    sr_sop_uid: str | None = None
    deadline: AssociationDeadline | None = None
    attempt_started: float | None = None
    #: The attempt in flight has been reported stuck.
    stuck_reported: bool = False
    #: Attempts cut at ``delivery.timeout_s`` since the node started.
    timeouts: int = 0

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


@dataclass(frozen=True)
class LaneStatus:
    """A destination lane as the metrics show it."""

    destination: str
    #: An attempt is in flight, and for how long it has run.
    in_flight: bool
    attempt_s: float
    #: The attempt in flight has outlived its deadline and the cut by
    #: :attr:`Delivery.STUCK_AFTER_S`: nothing ends it but the peer or a restart.
    stuck: bool
    timeouts: int


@dataclass
class _LanePass:
    """One pass of one lane: its thread, and the SRs it has sent so far."""

    lane: Lane
    thread: threading.Thread = field(init=False)
    sent: int = 0


class Delivery:
    """The outbox job: one lane per destination, every attempt under a hard deadline.

    Parameters
    ----------
    cfg : Config
    journal : Journal

    Notes
    -----
    :meth:`dispatch` (what the node's scheduler runs) starts a pass in each
    idle destination's lane that has SRs due and returns at once; a lane
    still busy from an earlier pass is left to it. :meth:`run` does the same
    and waits for those passes, except for a lane whose attempt is stuck.
    :meth:`stop` ends it all within :attr:`STOP_GRACE_S` + :attr:`CUT_GRACE_S`.
    """

    #: Attempts one lane pass makes at most, so that a pass stays short; the
    #: rest are due for the next pass.
    PASS_ATTEMPTS = 32
    #: An attempt still running this long after its deadline cut it is
    #: reported stuck (``delivery.lane_stuck``, ``echonode_delivery_stuck``).
    STUCK_AFTER_S = 5.0
    #: At stop: how long attempts in flight may finish on their own, then how
    #: long they may take to come back once cut, before they are abandoned.
    STOP_GRACE_S = 5.0
    CUT_GRACE_S = 1.0

    def __init__(self, cfg: Config, journal: Journal) -> None:
        self.cfg = cfg
        self.journal = journal
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._lanes: dict[str, Lane] = {}
        self._stopping = threading.Event()

    def apply_config(self, cfg: Config) -> None:
        """New settings (SIGHUP): destinations and retry rules, from the next pass."""
        self.cfg = cfg

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failures (jittered exponential)."""
        d = self.cfg.delivery
        base = min(d.retry_max_s, d.retry_initial_s * (2 ** max(0, attempts - 1)))
        return base * random.uniform(0.8, 1.0)

    # -- passes ---------------------------------------------------------------------

    def run(self) -> int:
        """One pass over every destination with SRs due, waited for; return how many were sent.

        Each destination is tried in its own lane, all at once, so the
        figure counts every lane this pass started; a lane stuck in an
        attempt (see :attr:`STUCK_AFTER_S`) is not waited for.
        """
        sent = 0
        for p in self.dispatch():
            while p.thread.is_alive() and not self._stuck(p.lane):
                p.thread.join(0.05)
            sent += p.sent
        self._report_stuck()
        return sent

    def dispatch(self) -> list[_LanePass]:
        """Start a pass in each idle lane whose destination has SRs due; return them, not waiting.

        A destination whose lane is still busy (an attempt in flight, even
        one stuck for good) is left out: it cannot hold up the others, whose
        rows are read past it.
        """
        if self._stopping.is_set():
            return []
        self._report_stuck()
        with self._lock:
            skip = {name for name, lane in self._lanes.items() if lane.busy}
        started: list[_LanePass] = []
        while not self._stopping.is_set():
            rows = self.journal.due_deliveries(limit=1, skip=skip)
            if not rows:
                break
            name = rows[0].destination
            skip.add(name)
            p = self._start_pass(name)
            if p is not None:
                started.append(p)
        return started

    def _start_pass(self, destination: str) -> _LanePass | None:
        """Start a pass in ``destination``'s lane; None when it is busy or the delivery is stopping.

        Checked and started under the lock, so that two dispatches (the
        scheduler's and a direct :meth:`run`) never run one lane twice and
        :meth:`stop` sees every lane that started.
        """
        with self._lock:
            if self._stopping.is_set():
                return None
            lane = self._lanes.setdefault(destination, Lane(destination))
            if lane.busy:
                return None
            p = _LanePass(lane)
            p.thread = threading.Thread(target=self._lane_pass, args=(p,),
                                        name=f"echonode-delivery-{destination}", daemon=True)
            lane.thread = p.thread
            p.thread.start()
        return p

    def _lane_pass(self, p: _LanePass) -> None:
        """Try one destination's due rows, longest due first, until one fails transiently.

        After a transient failure the destination is left alone until the
        next pass: one PACS that drops connections silently would otherwise
        cost ``timeout_s`` per queued SR.
        """
        lane = p.lane
        tried: set[int] = set()
        try:
            while len(tried) < self.PASS_ATTEMPTS and not self._stopping.is_set():
                # A row tried in this pass is sent, dead or resting, so it
                # cannot come back; the filter only guards the loop's end.
                batch = [i for i in self.journal.due_deliveries(limit=self.PASS_ATTEMPTS,
                                                                destination=lane.destination)
                         if i.id not in tried]
                if not batch:
                    return
                for item in batch:
                    if len(tried) >= self.PASS_ATTEMPTS or self._stopping.is_set():
                        return
                    tried.add(item.id)
                    outcome = self._attempt(item, lane)
                    if outcome == "sent":
                        p.sent += 1
                    elif outcome in ("transient", "interrupted"):
                        return
        except Exception:  # a journal error must not end the lane silently
            log.exception("delivery.lane_failed", destination=lane.destination)
        finally:
            self.journal.close()  # this thread's connection; the next pass has a thread of its own

    # -- stuck lanes and stop ---------------------------------------------------------

    def _stuck(self, lane: Lane) -> bool:
        with self._lock:
            started, deadline = lane.attempt_started, lane.deadline
        if started is None or deadline is None:
            return False
        return time.monotonic() - started > deadline.seconds + self.STUCK_AFTER_S

    def _report_stuck(self) -> None:
        for lane in list(self._lanes.values()):
            if lane.busy and not lane.stuck_reported and self._stuck(lane):
                lane.stuck_reported = True
                log.error("delivery.lane_stuck", destination=lane.destination, sr_sop_uid=lane.sr_sop_uid,
                          running_s=round(time.monotonic() - (lane.attempt_started or time.monotonic()), 1),
                          effect="no SR goes to this destination until the attempt returns or the node"
                                 " restarts; the other destinations are not affected")

    def lanes(self) -> list[LaneStatus]:
        """Every destination lane used since the start, for the metrics."""
        now = time.monotonic()
        with self._lock:
            lanes = list(self._lanes.values())
        out = []
        for lane in sorted(lanes, key=lambda lane: lane.destination):
            started = lane.attempt_started
            out.append(LaneStatus(lane.destination, started is not None and lane.busy,
                                  now - started if started is not None and lane.busy else 0.0,
                                  lane.busy and self._stuck(lane), lane.timeouts))
        return out

    def stop(self, grace_s: float | None = None) -> list[str]:
        """Stop delivering, within ``grace_s`` (default :attr:`STOP_GRACE_S`) plus :attr:`CUT_GRACE_S`.

        No attempt starts after this is called. Attempts in flight have
        ``grace_s`` to finish; then their associations are cut, and those
        that have not come back :attr:`CUT_GRACE_S` later are abandoned
        (their threads are daemons). A cut or abandoned attempt leaves its
        row pending, its attempts uncounted: the SR goes out at the next
        start, under the same SOP Instance UID.

        Returns
        -------
        list of str
            The destinations whose attempt was abandoned.
        """
        grace = self.STOP_GRACE_S if grace_s is None else grace_s
        with self._lock:
            self._stopping.set()
            busy = [lane for lane in self._lanes.values() if lane.busy]
        self._join(busy, grace)
        with self._lock:
            busy = [lane for lane in busy if lane.busy]
            deadlines = [lane.deadline for lane in busy if lane.deadline is not None]
        for deadline in deadlines:
            deadline.cut(STOP)
        self._join(busy, self.CUT_GRACE_S)
        abandoned = [lane for lane in busy if lane.busy]
        for lane in abandoned:
            log.error("delivery.abandoned", destination=lane.destination, sr_sop_uid=lane.sr_sop_uid,
                      effect="the SR stays pending and is sent at the next start, same SOP Instance UID")
        return [lane.destination for lane in abandoned]

    @staticmethod
    def _join(lanes: list[Lane], within_s: float) -> None:
        end = time.monotonic() + within_s
        for lane in lanes:
            if lane.thread is not None:
                lane.thread.join(max(0.0, end - time.monotonic()))

    # -- one attempt ------------------------------------------------------------------

    def _attempt(self, item: OutboxItem, lane: Lane) -> str:
        """One try; returns ``sent``, ``transient`` (will be retried), ``dead`` or ``interrupted`` (stop)."""
        bound = log.bind(study_uid=item.study_uid, sr_sop_uid=item.sr_sop_uid, destination=item.destination)
        try:
            dest = self.cfg.destination(item.destination)
        except KeyError:
            self.journal.mark_dead(item.id, "destination no longer configured")
            self._count("unknown_destination")
            bound.error("delivery.dead", reason="destination no longer configured")
            return "dead"
        deadline = AssociationDeadline(self.cfg.delivery.timeout_s)
        with self._lock:
            lane.sr_sop_uid, lane.deadline, lane.attempt_started = item.sr_sop_uid, deadline, time.monotonic()
            lane.stuck_reported = False
        if self._stopping.is_set():
            deadline.cut(STOP)  # stop() may have looked at this lane just before
        try:
            if dest.kind == "stow":
                sent = stow.stow_file(dest, item.path, self.cfg.delivery.timeout_s, deadline=deadline)
            else:
                sent = store_file(self.cfg.node.ae_title, Peer.of(dest), item.path, self.cfg.delivery.timeout_s,
                                  deadline=deadline)
        except Exception as exc:  # noqa: BLE001 - sorted below; a bug must not block every later SR
            return self._failed(item, exc, deadline, lane, bound)
        finally:
            deadline.cancel()
            with self._lock:
                lane.sr_sop_uid, lane.deadline, lane.attempt_started = None, None, None
        state = self.journal.mark_sent(item.id, sent.sop_class_uid, sent.sop_instance_uid)
        # A warning means stored (PS3.7 C.4, PS3.18 10.5.3): delivered, and said at warning level.
        (bound.warning if sent.warning else bound.info)(
            "delivery.sent", status=sent.status, study_state=str(state), sent_sop_class_uid=sent.sop_class_uid,
            sent_sop_uid=sent.sop_instance_uid, warning=sent.warning)
        return "sent"

    def _failed(self, item: OutboxItem, exc: Exception, deadline: AssociationDeadline, lane: Lane,
                bound: Any) -> str:
        """Record why an attempt failed; the outcome as :meth:`_attempt` returns it."""
        if deadline.reason == STOP:
            # Not the peer's fault: the row is left as it was, attempts
            # uncounted, and goes out at the next start.
            bound.warning("delivery.interrupted", reason="node stopping",
                          effect="the SR stays pending and is sent at the next start, same SOP Instance UID")
            return "interrupted"
        if isinstance(exc, DeliveryError):
            if deadline.expired:
                with self._lock:
                    lane.timeouts += 1
            outcome = self._retry_or_dead(item, str(exc), bound, permanent=exc.permanent)
            if outcome == "transient":
                self._count("transient")
            else:
                self._count("permanent" if exc.permanent else "exhausted")
            return outcome
        if isinstance(exc, (OSError, ValueError, InvalidDicomError)):
            # The SR file itself is unreadable: nothing a retry fixes.
            self.journal.mark_dead(item.id, f"SR file unreadable: {type(exc).__name__}")
            self._count("bad_file")
            bound.error("delivery.dead", reason=f"SR file unreadable: {type(exc).__name__}")
            return "dead"
        bound.exception("delivery.unexpected_error", exc_info=exc)
        # Left to the normal backoff and max_attempts, so one bad row
        # cannot stay first in the queue and stop every pass.
        self._retry_or_dead(item, f"unexpected error: {type(exc).__name__}", bound)
        self._count("unexpected")
        # The destination rests for this pass either way, as after any
        # transient failure: the bug may be in talking to it.
        return "transient"

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
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
