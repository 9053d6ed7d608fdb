"""The journal: a SQLite (WAL) record of instances, study states, results and the SR outbox.

The journal is one class made of parts, each in its module:
:mod:`~echonode.studies.connection` (connections, transactions),
:mod:`~echonode.studies.states` (the state machine),
:mod:`~echonode.studies.records` (what methods take and give),
:mod:`~echonode.studies.outbox` (the SR outbox),
:mod:`~echonode.studies.queries` (status, metrics, retention, the status
page) and :mod:`~echonode.studies.references` (the sonographers' reference
of each study, for the agreement figures); this module holds receiving, the study lifecycle, results and
reports. A C-STORE is acknowledged only after its commit.

Study states (CONTRACT.md)::

    receiving -> stable -> queued -> running -> reported -> delivered
                                            |           \\-> undelivered
                                            \\-> skipped | failed

``undelivered``: nothing is owed any more, but the latest SR reached no
destination: every row of it was given up by the administrator
(``echonode discard``).

A study whose worker was interrupted (``running`` at start) goes back to
``queued`` until ``max_attempts`` is reached, then to ``failed``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from echonode.studies.outbox import OutboxRows
from echonode.studies.queries import JournalQueries
from echonode.studies.records import (
    Claim,
    InstanceRecord,
    ReportRecord,
    SopInOtherStudy,
    StaleClaim,
    TaskResult,
)
from echonode.studies.references import ReferenceRows
from echonode.studies.schema import is_document_class
from echonode.studies.states import (
    REOPENABLE_STATES,
    SETTLED_STATES,
    OutboxState,
    StudyState,
    as_state,
    owed_condition,
)


class Journal(OutboxRows, JournalQueries, ReferenceRows):
    """Thread-safe access to the journal database.

    Parameters
    ----------
    path : path-like
        The SQLite file; created with its schema when absent.
    durable : bool
        False: commits are not fsynced (``recover-journal``'s journal built aside).
    """

    # -- receiving -------------------------------------------------------------

    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        row = self._connect().execute("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return InstanceRecord(**dict(row)) if row else None

    def record_instance(self, rec: InstanceRecord, association: str | None = None) -> StudyState | str:
        """Record a stored instance and (re)open its study for receiving.

        Returns the study's state after the write. A study already reported
        or delivered keeps its state: a late instance is stored and recorded,
        but the one SR per study and model set has been sent (use
        ``echonode reprocess`` to include it under a new model set).
        An SR object never re-opens a study: it is recorded (and its
        measurements read by the agreement job) whatever the study's state.

        ``association`` (the SCP's key for the association that brought it)
        is recorded with a study that is receiving, for
        :meth:`association_ended` and ``study.after_release_s``.
        """
        now = rec.received
        # synchronous=NORMAL for this write only: in WAL mode a commit still
        # survives a kill -9 of the process; what it can lose is the last
        # commits on a power failure, and those are re-recorded at start by
        # StudyStore.recover() from the files, which were fsynced (file and
        # folder) before this call. Saves one fsync per received object.
        con = self._connect()
        if not self.durable:
            return self._record_instance(rec, now, association)
        con.execute("PRAGMA synchronous=NORMAL")
        try:
            return self._record_instance(rec, now, association)
        finally:
            con.execute("PRAGMA synchronous=FULL")

    def _record_instance(self, rec: InstanceRecord, now: float, association: str | None) -> StudyState | str:
        with self._tx() as con:
            other = con.execute("SELECT study_uid FROM instances WHERE sop_uid = ?", (rec.sop_uid,)).fetchone()
            if other is not None and other["study_uid"] != rec.study_uid:
                raise SopInOtherStudy(rec.sop_uid)
            row = con.execute("SELECT state FROM studies WHERE study_uid = ?", (rec.study_uid,)).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO studies (study_uid, state, first_received, last_received, updated)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (rec.study_uid, StudyState.RECEIVING, now, now, now),
                )
                state: StudyState | str = StudyState.RECEIVING
            else:
                state = as_state(row["state"])
                # An SR (the sonographers' measurements, finished later at a
                # workstation) or another document (a report's PDF) cannot
                # change the analysis, which reads images only: it never
                # re-opens a study nor voids a worker's claim. The agreement
                # job reads an SR (the references_due trigger).
                if state in REOPENABLE_STATES and not is_document_class(rec.sop_class_uid):
                    state = StudyState.RECEIVING
                    con.execute(
                        "UPDATE studies SET state = ?, reason = NULL, last_received = ?, updated = ?,"
                        " generation = generation + 1, attempts = 0 WHERE study_uid = ?",
                        (state, now, now, rec.study_uid),
                    )
                else:
                    con.execute(
                        "UPDATE studies SET last_received = ?, updated = ? WHERE study_uid = ?",
                        (now, now, rec.study_uid),
                    )
            con.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax,"
                " path, size, received, calling_ae) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(sop_uid) DO UPDATE SET series_uid = excluded.series_uid,"
                " sop_class_uid = excluded.sop_class_uid, transfer_syntax = excluded.transfer_syntax,"
                " path = excluded.path, size = excluded.size, received = excluded.received,"
                " calling_ae = excluded.calling_ae",
                (
                    rec.sop_uid,
                    rec.study_uid,
                    rec.series_uid,
                    rec.sop_class_uid,
                    rec.transfer_syntax,
                    rec.path,
                    rec.size,
                    rec.received,
                    rec.calling_ae,
                ),
            )
            if association is not None and state == StudyState.RECEIVING:
                con.execute(
                    "INSERT OR IGNORE INTO study_associations (study_uid, assoc, opened) VALUES (?, ?, ?)",
                    (rec.study_uid, association, now),
                )
        return state

    def association_ended(self, association: str, *, released: bool, now: float | None = None) -> int:
        """Record that an association ended: released (A-RELEASE) or not (abort, lost link, stop).

        Committed durably (fsynced) before it returns: the SCP calls it
        before the A-RELEASE-RP goes, so a released association stays
        released across a kill -9.

        Parameters
        ----------
        association : str
            The key given to :meth:`record_instance`.
        released : bool
            True for an orderly release.
        now : float, optional
            When (default: now).

        Returns
        -------
        int
            Studies of which it had brought instances, still receiving.
        """
        now = time.time() if now is None else now
        with self._tx() as con:
            cur = con.execute(
                "UPDATE study_associations SET ended = ?, released = ? WHERE assoc = ? AND ended IS NULL",
                (now, int(released), association),
            )
            return cur.rowcount

    def end_open_associations(self, now: float | None = None, run_token: str | None = None) -> int:
        """Associations still open in the journal whose listener died count as aborted.

        Parameters
        ----------
        now : float, optional
            When (default: now).
        run_token : str, optional
            Only those of the listener with this token (a receiver process
            that died); default: every one (at start, when none listens).

        Returns
        -------
        int
            Rows closed.
        """
        now = time.time() if now is None else now
        where = "ended IS NULL"
        args: list[object] = [now]
        if run_token is not None:
            # Keys are "<token>-<number>"; the token is hex, so no LIKE wildcard in it.
            where = "ended IS NULL AND assoc LIKE ?"
            args = [now, f"{run_token}-%"]
        with self._tx() as con:
            return con.execute(f"UPDATE study_associations SET ended = ?, released = 0 WHERE {where}", args).rowcount

    def instances(self, study_uid: str | None = None) -> list[InstanceRecord]:
        """Instances of one study, or all, in receive order."""
        con = self._connect()
        if study_uid is None:
            rows = con.execute("SELECT * FROM instances ORDER BY received").fetchall()
        else:
            rows = con.execute(
                "SELECT * FROM instances WHERE study_uid = ? ORDER BY series_uid, received", (study_uid,)
            ).fetchall()
        return [InstanceRecord(**dict(r)) for r in rows]

    def forget_instance(self, sop_uid: str, path: str) -> None:
        """Remove an instance whose file at ``path`` is gone (recovery only).

        Matching the path too keeps a row that already points at a newer copy.
        """
        with self._tx() as con:
            con.execute("DELETE FROM instances WHERE sop_uid = ? AND path = ?", (sop_uid, path))

    # -- study lifecycle ----------------------------------------------------------

    def study_state(self, study_uid: str) -> StudyState | str | None:
        row = self._connect().execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return as_state(row["state"]) if row else None

    def study(self, study_uid: str) -> dict[str, Any] | None:
        row = self._connect().execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return dict(row) if row else None

    def mark_stable(
        self, quiet_for_s: float, now: float | None = None, *, after_release_s: float | None = None
    ) -> list[str]:
        """Move complete ``receiving`` studies to ``stable``.

        Complete: no new instance for ``quiet_for_s`` seconds. With
        ``after_release_s``, a study that an association is still bringing
        is not complete however quiet; one whose last association was
        released (and no instance came after) is complete ``after_release_s``
        seconds after that release; for the rest (the last association
        aborted or cut by a restart, instances recorded without one) the
        quiet rule stands.

        Parameters
        ----------
        quiet_for_s : float
            ``study.stable_after_s``.
        now : float, optional
            The time to judge at (default: now).
        after_release_s : float, optional
            ``study.after_release_s``; None keeps the quiet rule alone.

        Returns
        -------
        list of str
            The studies now stable.
        """
        now = time.time() if now is None else now
        with self._tx() as con:
            if after_release_s is None:
                rows = con.execute(
                    "SELECT study_uid FROM studies WHERE state = ? AND last_received <= ?",
                    (StudyState.RECEIVING, now - quiet_for_s),
                ).fetchall()
                uids = [r["study_uid"] for r in rows]
            else:
                uids = self._complete_after_release(con, quiet_for_s, after_release_s, now)
            con.executemany(
                "UPDATE studies SET state = ?, updated = ?, stable_at = ? WHERE study_uid = ?",
                [(StudyState.STABLE, now, now, u) for u in uids],
            )
            con.executemany("DELETE FROM study_associations WHERE study_uid = ?", [(u,) for u in uids])
        return uids

    @staticmethod
    def _complete_after_release(
        con: sqlite3.Connection, quiet_for_s: float, after_release_s: float, now: float
    ) -> list[str]:
        """The receiving studies complete under ``study.after_release_s`` (see :meth:`mark_stable`)."""
        rows = con.execute(
            "SELECT s.study_uid, s.last_received,"
            " (SELECT COUNT(*) FROM study_associations a WHERE a.study_uid = s.study_uid AND a.ended IS NULL)"
            "  AS open,"
            " (SELECT a.ended FROM study_associations a WHERE a.study_uid = s.study_uid"
            "  ORDER BY a.ended DESC LIMIT 1) AS ended,"
            " (SELECT a.released FROM study_associations a WHERE a.study_uid = s.study_uid"
            "  ORDER BY a.ended DESC LIMIT 1) AS released"
            " FROM studies s WHERE s.state = ?",
            (StudyState.RECEIVING,),
        ).fetchall()
        uids = []
        for r in rows:
            if r["open"]:
                continue
            if r["released"] and r["ended"] >= r["last_received"]:
                if r["ended"] <= now - after_release_s:
                    uids.append(r["study_uid"])
            elif r["last_received"] <= now - quiet_for_s:
                uids.append(r["study_uid"])
        return uids

    def queue_stable(self, now: float | None = None) -> list[str]:
        """Move every ``stable`` study to ``queued`` for the worker."""
        now = time.time() if now is None else now
        with self._tx() as con:
            rows = con.execute("SELECT study_uid FROM studies WHERE state = ?", (StudyState.STABLE,)).fetchall()
            uids = [r["study_uid"] for r in rows]
            con.executemany(
                "UPDATE studies SET state = ?, updated = ? WHERE study_uid = ?",
                [(StudyState.QUEUED, now, u) for u in uids],
            )
        return uids

    def requeue(self, study_uid: str) -> bool:
        """Queue a stored study again (``echonode reprocess``). False if unknown."""
        now = time.time()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE studies SET state = ?, reason = NULL, attempts = 0, generation = generation + 1,"
                " updated = ? WHERE study_uid = ?",
                (StudyState.QUEUED, now, study_uid),
            )
            return cur.rowcount == 1

    def claim_next(self, pid: int) -> Claim | None:
        """Take the oldest queued study for the worker (``queued -> running``)."""
        now = time.time()
        with self._tx() as con:
            row = con.execute(
                "SELECT study_uid, generation, attempts FROM studies WHERE state = ?"
                " ORDER BY updated, study_uid LIMIT 1",
                (StudyState.QUEUED,),
            ).fetchone()
            if row is None:
                return None
            gen = row["generation"] + 1
            attempts = row["attempts"] + 1
            con.execute(
                "UPDATE studies SET state = ?, generation = ?, attempts = ?, worker_pid = ?, updated = ?,"
                " claimed_at = ? WHERE study_uid = ?",
                (StudyState.RUNNING, gen, attempts, pid, now, now, row["study_uid"]),
            )
        return Claim(row["study_uid"], gen, attempts)

    def _check_claim(self, con: sqlite3.Connection, claim: Claim) -> None:
        row = con.execute(
            "SELECT state, generation FROM studies WHERE study_uid = ?", (claim.study_uid,)
        ).fetchone()
        if row is None or row["state"] != StudyState.RUNNING or row["generation"] != claim.generation:
            raise StaleClaim(claim.study_uid)

    def finish_skipped(self, claim: Claim, reason: str) -> None:
        """The study had nothing usable: ``running -> skipped`` with the reason."""
        with self._tx() as con:
            self._check_claim(con, claim)
            con.execute(
                "UPDATE studies SET state = ?, reason = ?, worker_pid = NULL, updated = ? WHERE study_uid = ?",
                (StudyState.SKIPPED, reason, time.time(), claim.study_uid),
            )

    def finish_failed(self, claim: Claim, reason: str, *, max_attempts: int) -> StudyState:
        """Record a failure: back to ``queued`` while attempts remain, else ``failed``."""
        with self._tx() as con:
            self._check_claim(con, claim)
            state = StudyState.QUEUED if claim.attempts < max_attempts else StudyState.FAILED
            con.execute(
                "UPDATE studies SET state = ?, reason = ?, worker_pid = NULL, updated = ? WHERE study_uid = ?",
                (state, reason, time.time(), claim.study_uid),
            )
        return state

    def release_claim(self, claim: Claim, reason: str) -> None:
        """Return a claimed study to the queue without counting the attempt (``running -> queued``).

        For a failure that is not the study's: storage that had no room for
        its SR or its rows. The study goes to the back of the queue
        (``updated`` is now) with ``reason`` until it is claimed again.

        Parameters
        ----------
        claim : Claim
            The worker's claim on the study.
        reason : str
            What ``status`` shows meanwhile.

        Raises
        ------
        StaleClaim
            When the study changed since the claim (its new state stands).
        """
        with self._tx() as con:
            self._check_claim(con, claim)
            con.execute(
                "UPDATE studies SET state = ?, reason = ?, attempts = MAX(attempts - 1, 0), worker_pid = NULL,"
                " updated = ? WHERE study_uid = ?",
                (StudyState.QUEUED, reason, time.time(), claim.study_uid),
            )

    def release_running(self, pid: int | None = None) -> list[str]:
        """Put studies whose worker *we* stopped back in the queue, uncounted.

        Parameters
        ----------
        pid : int, optional
            Only the studies claimed by this worker process (the others
            belong to workers still running); default: every one.
        """
        now = time.time()
        with self._tx() as con:
            rows = con.execute(
                "SELECT study_uid FROM studies WHERE state = ?" + ("" if pid is None else " AND worker_pid = ?"),
                (StudyState.RUNNING,) if pid is None else (StudyState.RUNNING, pid),
            ).fetchall()
            uids = [r["study_uid"] for r in rows]
            con.executemany(
                "UPDATE studies SET state = ?, attempts = MAX(attempts - 1, 0), worker_pid = NULL,"
                " reason = 'node stopped during processing', updated = ? WHERE study_uid = ?",
                [(StudyState.QUEUED, now, u) for u in uids],
            )
        return uids

    def recover_running(self, max_attempts: int, pid: int | None = None) -> dict[str, StudyState]:
        """Studies left ``running`` by a dead worker are queued again or failed.

        Parameters
        ----------
        max_attempts : int
            A study claimed this many times already is failed, not queued.
        pid : int, optional
            Only the studies claimed by this (dead) worker process: the
            others belong to workers still running. Default: every one (at
            start, when no worker runs).
        """
        now = time.time()
        out: dict[str, StudyState] = {}
        with self._tx() as con:
            rows = con.execute(
                "SELECT study_uid, attempts FROM studies WHERE state = ?"
                + ("" if pid is None else " AND worker_pid = ?"),
                (StudyState.RUNNING,) if pid is None else (StudyState.RUNNING, pid),
            ).fetchall()
            for r in rows:
                if r["attempts"] >= max_attempts:
                    state, reason = StudyState.FAILED, f"worker died {r['attempts']} times on this study"
                else:
                    state, reason = StudyState.QUEUED, "worker interrupted; retrying"
                con.execute(
                    "UPDATE studies SET state = ?, reason = ?, worker_pid = NULL, updated = ? WHERE study_uid = ?",
                    (state, reason, now, r["study_uid"]),
                )
                out[r["study_uid"]] = state
        return out

    # -- results, reports, outbox ----------------------------------------------

    def report_for(self, study_uid: str, model_set: str) -> ReportRecord | None:
        row = self._connect().execute(
            "SELECT sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path, supersedes"
            " FROM reports WHERE study_uid = ? AND model_set = ?",
            (study_uid, model_set),
        ).fetchone()
        return ReportRecord(**dict(row)) if row else None

    def latest_report(self, study_uid: str) -> ReportRecord | None:
        row = self._connect().execute(
            "SELECT sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path, supersedes"
            " FROM reports WHERE study_uid = ? ORDER BY created DESC, rowid DESC LIMIT 1",
            (study_uid,),
        ).fetchone()
        return ReportRecord(**dict(row)) if row else None

    def report_paths(self, study_uid: str) -> set[str]:
        """The files of every SR recorded for ``study_uid``."""
        rows = self._connect().execute("SELECT path FROM reports WHERE study_uid = ?", (study_uid,)).fetchall()
        return {r["path"] for r in rows}

    def finish_reported(
        self,
        claim: Claim,
        model_set: str,
        results: Sequence[TaskResult],
        report: ReportRecord | None,
        destinations: Iterable[str],
    ) -> StudyState:
        """Store results, the SR and its outbox rows in one transaction.

        ``report`` is None when this study and model set already have an SR
        (nothing new is sent) or when there is nothing to report. Returns the
        study's new state: ``reported`` while deliveries are pending,
        ``delivered`` when there is nothing left to send.
        """
        now = time.time()
        dests = list(destinations)
        with self._tx() as con:
            self._check_claim(con, claim)
            already = con.execute(
                "SELECT 1 FROM reports WHERE study_uid = ? AND model_set = ?", (claim.study_uid, model_set)
            ).fetchone()
            # The results shown by `status` are those of the SR the PACS has:
            # a re-run with the same models does not overwrite them.
            if already is None:
                self._replace_results(con, claim.study_uid, model_set, results, now)
            if report is not None:
                con.execute(
                    "INSERT INTO reports (sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path,"
                    " supersedes, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        report.sr_sop_uid,
                        report.study_uid,
                        report.model_set,
                        report.series_uid,
                        report.sop_class_uid,
                        report.path,
                        report.supersedes,
                        now,
                    ),
                )
                if report.supersedes:
                    # An older SR still waiting (or dead-lettered) must not
                    # reach the PACS after its replacement.
                    con.execute(
                        f"UPDATE outbox SET state = ?, last_error = ? WHERE sr_sop_uid = ? AND {owed_condition()}",
                        (OutboxState.SUPERSEDED, f"superseded by {report.sr_sop_uid}", report.supersedes,
                         *SETTLED_STATES),
                    )
                con.executemany(
                    "INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, next_attempt, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(report.sr_sop_uid, claim.study_uid, d, OutboxState.PENDING, now, now) for d in dests],
                )
            state = self._delivery_state(con, claim.study_uid)
            con.execute(
                "UPDATE studies SET state = ?, reason = NULL, worker_pid = NULL, updated = ? WHERE study_uid = ?",
                (state, now, claim.study_uid),
            )
        return state

    def record_recovered_report(
        self,
        report: ReportRecord,
        results: Sequence[TaskResult],
        destinations: Iterable[str],
        created: float,
    ) -> StudyState:
        """Record an SR found in storage as sent to every destination (``echonode recover-journal``).

        For a journal rebuilt after it was lost: whether each destination
        took the SR is not known any more, and sending it again would give
        the PACS a second copy of what it most likely has; so it counts as
        sent, and the study as ``delivered``.

        Parameters
        ----------
        report : ReportRecord
            The SR, read back from its file.
        results : sequence of TaskResult
            Its findings, as ``status`` shows them (kept only when the study
            has none for this model set yet).
        destinations : iterable of str
            The configured destinations: one ``sent`` outbox row each.
        created : float
            When the SR was written (its file's time); also the study's
            last activity, from which retention counts.

        Returns
        -------
        StudyState
            The study's state now (``delivered``).
        """
        with self._tx() as con:
            if con.execute("SELECT 1 FROM studies WHERE study_uid = ?", (report.study_uid,)).fetchone() is None:
                # An SR whose images are gone (deleted by hand): the study is known by its SR alone.
                con.execute(
                    "INSERT INTO studies (study_uid, state, first_received, last_received, updated)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (report.study_uid, StudyState.DELIVERED, created, created, created),
                )
            con.execute(
                "INSERT INTO reports (sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path,"
                " supersedes, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (report.sr_sop_uid, report.study_uid, report.model_set, report.series_uid, report.sop_class_uid,
                 report.path, report.supersedes, created),
            )
            if results and con.execute(
                "SELECT 1 FROM results WHERE study_uid = ? AND model_set = ?", (report.study_uid, report.model_set)
            ).fetchone() is None:
                self._replace_results(con, report.study_uid, report.model_set, results, created)
            con.executemany(
                "INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, attempts, next_attempt, created,"
                " sent_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                [(report.sr_sop_uid, report.study_uid, d, OutboxState.SENT, created, created, created)
                 for d in destinations],
            )
            state = self._delivery_state(con, report.study_uid)
            con.execute(
                "UPDATE studies SET state = ?, reason = NULL, worker_pid = NULL, updated = MAX(updated, ?)"
                " WHERE study_uid = ?",
                (state, created, report.study_uid),
            )
        return state

    def hold_study(self, study_uid: str, reason: str) -> bool:
        """Mark a study ``failed`` with ``reason`` so that nothing happens to it until the administrator acts.

        Returns
        -------
        bool
            False when the journal has no such study.
        """
        with self._tx() as con:
            cur = con.execute(
                "UPDATE studies SET state = ?, reason = ?, worker_pid = NULL, updated = ? WHERE study_uid = ?",
                (StudyState.FAILED, reason, time.time(), study_uid),
            )
            return cur.rowcount == 1

    @staticmethod
    def _replace_results(
        con: sqlite3.Connection, study_uid: str, model_set: str, results: Sequence[TaskResult], now: float
    ) -> None:
        con.execute("DELETE FROM results WHERE study_uid = ? AND model_set = ?", (study_uid, model_set))
        con.executemany(
            "INSERT INTO results (study_uid, model_set, task, bundle_name, bundle_version, device_uid,"
            " probability, positive, threshold, n_videos, detail, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    study_uid,
                    model_set,
                    r.task,
                    r.bundle_name,
                    r.bundle_version,
                    r.device_uid,
                    float(r.probability),
                    int(bool(r.positive)),
                    float(r.threshold),
                    int(r.n_videos),
                    json.dumps(r.detail, sort_keys=True),
                    now,
                )
                for r in results
            ],
        )

    def purge_study(
        self,
        study_uid: str,
        *,
        states: Iterable[str] | None = None,
        active_before: float | None = None,
    ) -> list[str] | None:
        """Delete a study's rows (instances, results, reports, outbox, reference, study) in one transaction.

        Parameters
        ----------
        study_uid : str
        states : iterable of str, optional
            Purge only while the study is in one of these states. With
            ``states``, a study that still owes an SR to a destination
            (outbox row pending or dead) is never purged; one whose rows are
            all ``sent``, ``superseded`` or ``discarded`` may be (the rule of
            :meth:`purge_candidates`, see ``SETTLED_STATES``).
        active_before : float, optional
            Purge only when the study's last activity (``max(last_received,
            updated)``) is at or before this time: a study that changed since
            the caller looked is left alone.

        Returns
        -------
        list of str or None
            The files the deleted rows pointed to (instances, then every SR
            of the study, superseded ones included), or
            None when nothing was deleted (unknown study, or a guard failed).
        """
        with self._tx() as con:
            row = con.execute(
                "SELECT state, MAX(last_received, updated) AS active FROM studies WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
            if row is None:
                return None
            if states is not None:
                if row["state"] not in {str(s) for s in states}:
                    return None
                owed = con.execute(
                    f"SELECT COUNT(*) AS n FROM outbox WHERE study_uid = ? AND {owed_condition()}", (study_uid, *SETTLED_STATES)
                ).fetchone()["n"]
                if owed:
                    return None
            if active_before is not None and row["active"] > active_before:
                return None
            paths = [r["path"] for r in con.execute("SELECT path FROM instances WHERE study_uid = ?", (study_uid,))]
            paths += [r["path"] for r in con.execute("SELECT path FROM reports WHERE study_uid = ?", (study_uid,))]
            con.execute(
                "DELETE FROM outbox WHERE study_uid = ? OR sr_sop_uid IN"
                " (SELECT sr_sop_uid FROM reports WHERE study_uid = ?)",
                (study_uid, study_uid),
            )
            con.execute("DELETE FROM reports WHERE study_uid = ?", (study_uid,))
            con.execute("DELETE FROM results WHERE study_uid = ?", (study_uid,))
            con.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            for table in ("study_references", "reference_labels", "references_due", "study_associations"):
                con.execute(f"DELETE FROM {table} WHERE study_uid = ?", (study_uid,))
            con.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
        return paths
