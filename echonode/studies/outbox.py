"""The journal's SR outbox: one row per SR and destination, due, sent, retried, dead, discarded.

Delivery (:mod:`echonode.delivery.outbox`) reads the rows due and records
each attempt here; ``echonode retry`` and ``echonode discard`` act on the
dead ones. A study settles (``delivered`` or ``undelivered``) when its
latest SR owes nothing more.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from echonode.studies.connection import JournalConnection
from echonode.studies.records import DiscardedDelivery, OutboxItem
from echonode.studies.states import (
    DELIVERY_STATES,
    SETTLED_STATES,
    OutboxState,
    StudyState,
    owed_condition,
)


class OutboxRows(JournalConnection):
    """The outbox's rows (mixed into :class:`echonode.studies.journal.Journal`)."""

    @staticmethod
    def _delivery_state(con: sqlite3.Connection, study_uid: str) -> StudyState:
        """The state a reported study's outbox rows put it in.

        ``reported`` while any row owes an SR; then ``undelivered`` when the
        latest SR has rows, none ``sent`` and some ``discarded`` (an older
        SR sent before does not count: the PACS lacks the results ``status``
        shows); else ``delivered`` (no destination configured counts here,
        as it always has).
        """
        row = con.execute(
            f"SELECT COUNT(*) AS n FROM outbox WHERE study_uid = ? AND {owed_condition()}", (study_uid, *SETTLED_STATES)
        ).fetchone()
        if row["n"]:
            return StudyState.REPORTED
        # Older SRs' rows are all settled (a new SR supersedes what they
        # owed), so only the latest SR's rows can tell that it went nowhere.
        latest = con.execute(
            "SELECT SUM(state = ?) AS sent, SUM(state = ?) AS discarded FROM outbox WHERE sr_sop_uid ="
            " (SELECT sr_sop_uid FROM reports WHERE study_uid = ? ORDER BY created DESC, rowid DESC LIMIT 1)",
            (OutboxState.SENT, OutboxState.DISCARDED, study_uid),
        ).fetchone()
        if latest["discarded"] and not latest["sent"]:
            return StudyState.UNDELIVERED
        return StudyState.DELIVERED

    def due_deliveries(
        self, now: float | None = None, limit: int = 32, *, skip: Iterable[str] = (),
        destination: str | None = None,
    ) -> list[OutboxItem]:
        """Pending outbox rows due at ``now``, the longest due first.

        Parameters
        ----------
        now : float, optional
            Epoch seconds; default the current time.
        limit : int, optional
            Rows returned at most.
        skip : iterable of str, optional
            Destinations to leave out: those a delivery pass has stopped
            trying, whose backlog would otherwise fill all ``limit`` rows and
            hide every other destination's SRs.
        destination : str, optional
            Only this destination's rows (one delivery lane's).

        Returns
        -------
        list of OutboxItem
        """
        now = time.time() if now is None else now
        skipped = sorted(set(skip))
        not_skipped = f" AND o.destination NOT IN ({', '.join('?' * len(skipped))})" if skipped else ""
        only = " AND o.destination = ?" if destination is not None else ""
        rows = self._connect().execute(
            "SELECT o.id, o.sr_sop_uid, o.study_uid, o.destination, o.state, o.attempts, o.next_attempt,"
            " o.last_error, r.path FROM outbox o JOIN reports r USING (sr_sop_uid)"
            f" WHERE o.state = ? AND o.next_attempt <= ?{not_skipped}{only} ORDER BY o.next_attempt, o.id LIMIT ?",
            (OutboxState.PENDING, now, *skipped, *([destination] if destination is not None else []), limit),
        ).fetchall()
        return [OutboxItem(**dict(r)) for r in rows]

    def mark_sent(
        self, item_id: int, sop_class_uid: str | None = None, sop_uid: str | None = None
    ) -> StudyState | None:
        """A destination acknowledged the SR; the study is ``delivered`` when all have.

        Parameters
        ----------
        item_id : int
            The outbox row.
        sop_class_uid, sop_uid : str, optional
            What the destination stored: the SR's own SOP Class and
            Instance UIDs, or the class it fell back to and the UID derived
            for it (``echonode status --json``: ``sent_sop_class_uid``,
            ``sent_sop_uid``).
        """
        now = time.time()
        with self._tx() as con:
            row = con.execute("SELECT study_uid FROM outbox WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            con.execute(
                "UPDATE outbox SET state = ?, sent_at = ?, attempts = attempts + 1, last_error = NULL,"
                " sent_sop_class_uid = ?, sent_sop_uid = ? WHERE id = ?",
                (OutboxState.SENT, now, sop_class_uid, sop_uid, item_id),
            )
            return self._settle_study(con, row["study_uid"], now)

    def mark_retry(self, item_id: int, next_attempt: float, error: str) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
                (next_attempt, error, item_id),
            )

    def mark_dead(self, item_id: int, error: str) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
                (OutboxState.DEAD, error, item_id),
            )

    def retry_dead(self, study_uid: str | None = None) -> int:
        """Put dead-lettered SRs back in the outbox (``echonode retry``)."""
        now = time.time()
        with self._tx() as con:
            if study_uid is None:
                cur = con.execute(
                    "UPDATE outbox SET state = ?, attempts = 0, next_attempt = ? WHERE state = ?",
                    (OutboxState.PENDING, now, OutboxState.DEAD),
                )
            else:
                cur = con.execute(
                    "UPDATE outbox SET state = ?, attempts = 0, next_attempt = ? WHERE state = ? AND study_uid = ?",
                    (OutboxState.PENDING, now, OutboxState.DEAD, study_uid),
                )
            return cur.rowcount

    def discard_dead(
        self, study_uid: str | None = None, destination: str | None = None
    ) -> list[DiscardedDelivery] | None:
        """Give up for good on dead-lettered SRs (``echonode discard``).

        Only ``dead`` rows change, to ``discarded`` with the time; a row
        ``pending`` (perhaps being sent by the running node right now) or
        ``sent`` is left alone. A study left owing nothing leaves
        ``reported`` (see :meth:`_delivery_state`), so retention may purge it.

        Parameters
        ----------
        study_uid : str, optional
            Only this study's rows; default every study's.
        destination : str, optional
            Only rows for this destination name, which need not be in the
            config any more (a decommissioned PACS is the main use).

        Returns
        -------
        list of DiscardedDelivery or None
            The rows discarded, in outbox order (empty when none was dead);
            None when ``study_uid`` is given and the journal has no such study.
        """
        now = time.time()
        where: list[str] = ["state = ?"]
        args: list[str] = [OutboxState.DEAD]
        if study_uid is not None:
            where.append("study_uid = ?")
            args.append(study_uid)
        if destination is not None:
            where.append("destination = ?")
            args.append(destination)
        # One transaction: the rows read are the rows changed, whatever the
        # node's delivery pass does meanwhile (it waits on the write lock).
        with self._tx() as con:
            if study_uid is not None and not con.execute(
                "SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone():
                return None
            rows = con.execute(
                "SELECT id, study_uid, sr_sop_uid, destination, last_error FROM outbox"
                f" WHERE {' AND '.join(where)} ORDER BY id",
                args,
            ).fetchall()
            con.executemany(
                "UPDATE outbox SET state = ?, discarded_at = ? WHERE id = ? AND state = ?",
                [(OutboxState.DISCARDED, now, r["id"], OutboxState.DEAD) for r in rows],
            )
            for uid in sorted({r["study_uid"] for r in rows}):
                self._settle_study(con, uid, now)
        return [DiscardedDelivery(r["study_uid"], r["sr_sop_uid"], r["destination"], r["last_error"]) for r in rows]

    def _settle_study(self, con: sqlite3.Connection, study_uid: str, now: float) -> StudyState:
        """Move a study waiting on deliveries to the state its outbox rows now give.

        A delivery or a discard is activity: retention's age rule counts from
        it. A study in another state (queued or running again after
        ``echonode reprocess``) is left alone: its worker sets the state when
        it finishes.

        Returns
        -------
        StudyState
            The state the outbox rows give, whether or not it was written.
        """
        state = self._delivery_state(con, study_uid)
        cur = con.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        if cur is not None and cur["state"] in DELIVERY_STATES:
            con.execute("UPDATE studies SET state = ?, updated = ? WHERE study_uid = ?", (state, now, study_uid))
        return state
