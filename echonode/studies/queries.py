"""What the journal tells those who watch: ``status``, metrics, retention's candidates, the status page.

Read-only, and bounded: on a node that has kept 100,000 studies every query
is an index seek or a bounded range (tests/echonode/studies/test_journal_scale.py and the
status page's tests check the query plans).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from echonode.studies.connection import JournalConnection
from echonode.studies.records import (
    Delivered,
    Delivery,
    OutboxLine,
    StatusSnapshot,
    StudyActivity,
    StudyLine,
    StudySummary,
    TaskSummary,
)
from echonode.studies.schema import ACTIVE
from echonode.studies.states import (
    OWED_STATES,
    SETTLED_STATES,
    OutboxState,
    StudyState,
    owed_condition,
)


class JournalQueries(JournalConnection):
    """The journal's read-only queries (mixed into :class:`echonode.studies.journal.Journal`)."""

    def snapshot(self, limit: int | None = None) -> StatusSnapshot:
        """What ``echonode status`` reports, read in one transaction.

        Every query is bounded by ``limit`` (index seeks and a ``LIMIT``),
        except the counts, which are one ``GROUP BY`` over an index each: a
        node that holds 100,000 studies answers as fast as a new one.

        Parameters
        ----------
        limit : int, optional
            List only the ``limit`` studies with the most recent activity
            (last instance received or last state change), every outbox row
            of those studies, and of the rows that still owe an SR the
            ``limit`` due first in each state (pending, dead): those need
            attention however old. None lists everything.

        Returns
        -------
        StatusSnapshot
            Studies in order of first reception, outbox rows in order of
            creation; the counts cover the whole journal.

        Raises
        ------
        ValueError
            If ``limit`` is less than 1 (``echonode status --limit 0`` means
            everything and passes None).
        """
        if limit is not None and limit < 1:
            raise ValueError(f'Argument "limit" must be at least 1 or None; got {limit}.')
        con = self._connect()
        # One snapshot: the counts and the lists describe the same moment
        # even while the node writes.
        con.execute("BEGIN")
        try:
            counts = {str(state): 0 for state in StudyState}
            counts.update(self.counts())
            outbox_counts = {str(state): 0 for state in OutboxState}
            outbox_counts.update(self.outbox_counts())
            studies = self._listed_studies(con, limit)
            rows = self._listed_deliveries(con, limit, [s.study_uid for s in studies])
        finally:
            con.execute("COMMIT")
        return StatusSnapshot(
            studies=studies,
            outbox=rows,
            study_counts=counts,
            studies_total=sum(counts.values()),
            outbox_counts=outbox_counts,
            limit=limit,
        )

    def status(self, limit: int | None = None) -> dict[str, Any]:
        """:meth:`snapshot` as plain dicts and lists (for scripts and tests; the CLI adds the models)."""
        return dataclasses.asdict(self.snapshot(limit))

    def _listed_studies(self, con: sqlite3.Connection, limit: int | None) -> list[StudySummary]:
        args: tuple[Any, ...] = ()
        source = "studies"
        if limit is not None:
            # Newest activity first through the studies_active index; only
            # these rows get their instances counted below.
            source = f"(SELECT * FROM studies s ORDER BY {ACTIVE} DESC, s.study_uid DESC LIMIT ?)"
            args = (int(limit),)
        rows = con.execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid) AS n,"
            " (SELECT COALESCE(SUM(size), 0) FROM instances i WHERE i.study_uid = s.study_uid) AS bytes"
            f" FROM {source} s ORDER BY s.first_received",
            args,
        ).fetchall()
        return [self._study_summary(con, r) for r in rows]

    @staticmethod
    def _listed_deliveries(con: sqlite3.Connection, limit: int | None, study_uids: Sequence[str]) -> list[Delivery]:
        if limit is None:
            rows = con.execute("SELECT * FROM outbox ORDER BY id").fetchall()
        else:
            by_id: dict[int, sqlite3.Row] = {}
            for state in OWED_STATES:
                # One index seek per state (outbox_due): the due first.
                for r in con.execute(
                    "SELECT * FROM outbox WHERE state = ? ORDER BY next_attempt, id LIMIT ?", (state, int(limit))
                ):
                    by_id[r["id"]] = r
            for i in range(0, len(study_uids), 500):
                chunk = study_uids[i:i + 500]
                for r in con.execute(
                    f"SELECT * FROM outbox WHERE study_uid IN ({', '.join('?' * len(chunk))})", chunk
                ):
                    by_id[r["id"]] = r
            rows = [by_id[k] for k in sorted(by_id)]
        return [Delivery(id=r["id"], study_uid=r["study_uid"], sr_sop_uid=r["sr_sop_uid"],
                         destination=r["destination"], state=r["state"], attempts=r["attempts"],
                         next_attempt=r["next_attempt"], last_error=r["last_error"], sent_at=r["sent_at"],
                         discarded_at=r["discarded_at"], sent_sop_class_uid=r["sent_sop_class_uid"],
                         sent_sop_uid=r["sent_sop_uid"])
                for r in rows]

    @staticmethod
    def _study_summary(con: sqlite3.Connection, r: sqlite3.Row) -> StudySummary:
        """One listed study: the row and the results of its latest SR."""
        results = [
            TaskSummary(
                task=x["task"],
                probability=x["probability"],
                positive=bool(x["positive"]),
                threshold=x["threshold"],
                model=x["bundle_name"],
                version=x["bundle_version"],
                n_videos=x["n_videos"],
            )
            for x in con.execute(
                "SELECT * FROM results WHERE study_uid = ? AND model_set = COALESCE("
                " (SELECT model_set FROM reports WHERE study_uid = ? ORDER BY created DESC LIMIT 1),"
                " (SELECT model_set FROM results WHERE study_uid = ? ORDER BY created DESC LIMIT 1))"
                " ORDER BY task",
                (r["study_uid"], r["study_uid"], r["study_uid"]),
            ).fetchall()
        ]
        return StudySummary(
            study_uid=r["study_uid"],
            state=r["state"],
            instances=r["n"],
            bytes=r["bytes"],
            reason=r["reason"],
            attempts=r["attempts"],
            first_received=r["first_received"],
            last_received=r["last_received"],
            updated=r["updated"],
            results=[*results],
        )

    def running(self) -> list[tuple[str, float, int | None]]:
        """(study_uid, claimed at, worker pid) of studies being processed."""
        rows = self._connect().execute(
            "SELECT study_uid, updated, worker_pid FROM studies WHERE state = ?", (StudyState.RUNNING,)
        ).fetchall()
        return [(r["study_uid"], r["updated"], r["worker_pid"]) for r in rows]

    def oldest_queued(self) -> float | None:
        """When the study longest in the queue was queued (``updated``), or None when none is."""
        row = self._connect().execute(
            "SELECT MIN(updated) AS t FROM studies WHERE state = ?", (StudyState.QUEUED,)
        ).fetchone()
        return None if row["t"] is None else float(row["t"])

    def counts(self) -> dict[str, int]:
        """Studies by state, the states with none left out (one GROUP BY over ``studies_state``)."""
        rows = self._connect().execute("SELECT state, COUNT(*) AS n FROM studies GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by state, the states with none left out (one GROUP BY over ``outbox_due``)."""
        rows = self._connect().execute("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    def last_result_id(self) -> int:
        """The highest ``results`` row id (0 when none): where :meth:`inference_seconds_since` starts."""
        row = self._connect().execute("SELECT COALESCE(MAX(id), 0) AS m FROM results").fetchone()
        return int(row["m"])

    def inference_seconds_since(self, after_id: int) -> tuple[int, list[float]]:
        """Inference times of the analyses recorded after result row ``after_id`` (for metrics).

        The worker records ``{"seconds": ...}`` in every result's detail, one
        row per task with the same figure; the rows of one analysis share
        ``(study_uid, model_set, created)`` and count once.

        Returns
        -------
        (int, list of float)
            The last row id read (``after_id`` when none is newer) and one
            figure per analysis; rows without a figure are passed over.
        """
        rows = self._connect().execute(
            "SELECT id, study_uid, model_set, created, detail FROM results WHERE id > ? ORDER BY id", (after_id,)
        ).fetchall()
        seen: set[tuple[str, str, float]] = set()
        seconds: list[float] = []
        last = after_id
        for r in rows:
            last = max(last, int(r["id"]))
            key = (r["study_uid"], r["model_set"], r["created"])
            if key in seen:
                continue
            seen.add(key)
            try:
                seconds.append(float(json.loads(r["detail"]).get("seconds")))
            except (TypeError, ValueError, AttributeError):
                continue
        return last, seconds


    def stored_bytes(self) -> int:
        """Bytes of all recorded instances: one row, kept by triggers (``stored_totals``)."""
        row = self._connect().execute("SELECT bytes FROM stored_totals WHERE id = 1").fetchone()
        if row is None:  # not counted yet (see _count_stored)
            row = self._connect().execute("SELECT COALESCE(SUM(size), 0) AS bytes FROM instances").fetchone()
        return int(row["bytes"])

    def purge_candidates(
        self,
        states: Iterable[str],
        *,
        active_before: float | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 500,
    ) -> list[StudyActivity]:
        """One page of studies retention may purge, oldest last activity first.

        Parameters
        ----------
        states : iterable of str
            Study states that may go. Studies with an SR still owed (an
            outbox row pending or dead) are left out whatever their state;
            a ``superseded`` or ``discarded`` row owes nothing (see
            ``SETTLED_STATES``), the same rule :meth:`purge_study` applies.
        active_before : float, optional
            Only studies whose last activity is before this time.
        after : (float, str), optional
            The ``(active, study_uid)`` of the last study of the previous
            page: this page starts after it. Keyset paging, so studies
            purged between pages shift nothing and each page is an index
            seek rather than a re-scan from the oldest.
        limit : int
            Page size.

        Returns
        -------
        list of StudyActivity
            Ordered by ``(active, study_uid)``; shorter than ``limit`` (or
            empty) on the last page.
        """
        names = [str(x) for x in states]
        # ``+`` keeps SQLite off the studies_state index: with it the
        # planner would read every delivered study and sort them for each
        # page, instead of walking studies_active in order and stopping.
        where = [
            f"+s.state IN ({', '.join('?' * len(names))})",
            f"NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid AND {owed_condition('o.state')})",
        ]
        args: list[Any] = [*names, *SETTLED_STATES]
        if active_before is not None:
            where.append(f"{ACTIVE} < ?")
            args.append(active_before)
        if after is not None:
            # Spelt out rather than as a row value: SQLite seeks an
            # expression index on ``expr >= ?`` but not on ``(expr, uid) > (?, ?)``.
            where.append(f"{ACTIVE} >= ? AND ({ACTIVE} > ? OR s.study_uid > ?)")
            args += [after[0], after[0], after[1]]
        rows = self._connect().execute(
            f"SELECT s.study_uid, s.state, {ACTIVE} AS active,"
            " (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid) AS n,"
            " (SELECT COALESCE(SUM(size), 0) FROM instances i WHERE i.study_uid = s.study_uid) AS bytes"
            f" FROM studies s WHERE {' AND '.join(where)} ORDER BY {ACTIVE}, s.study_uid LIMIT ?",
            (*args, int(limit)),
        ).fetchall()
        return [StudyActivity(r["study_uid"], r["state"], float(r["active"]), int(r["n"]), int(r["bytes"]))
                for r in rows]

    def page_studies(self, state: str, limit: int) -> list[StudyLine]:
        """The ``limit`` studies of ``state`` with the most recent activity, newest first.

        Parameters
        ----------
        state : str
            A study state.
        limit : int
            Rows at most (>= 1).

        Returns
        -------
        list of StudyLine
        """
        rows = self._connect().execute(
            f"SELECT s.study_uid, s.state, s.reason, s.attempts, s.first_received, s.last_received,"
            f" {ACTIVE} AS active,"
            " (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid) AS n"
            f" FROM studies s WHERE s.state = ? ORDER BY {ACTIVE} DESC, s.study_uid DESC LIMIT ?",
            (str(state), max(int(limit), 1)),
        ).fetchall()
        return [StudyLine(r["study_uid"], r["state"], r["reason"], int(r["attempts"]), int(r["n"]),
                          float(r["first_received"]), float(r["last_received"]), float(r["active"]))
                for r in rows]

    def page_outbox(self, state: str, limit: int) -> list[OutboxLine]:
        """The ``limit`` outbox rows in ``state``: ``dead`` ones newest first, others next due first.

        Parameters
        ----------
        state : str
            An outbox state (``pending``, ``dead``).
        limit : int
            Rows at most (>= 1).

        Returns
        -------
        list of OutboxLine
        """
        # Through outbox_due (state, next_attempt): a dead row's next_attempt
        # is the time of its last try, so newest first is that index backwards.
        order = "DESC" if state == OutboxState.DEAD else "ASC"
        rows = self._connect().execute(
            "SELECT id, study_uid, sr_sop_uid, destination, state, attempts, next_attempt, last_error, created"
            f" FROM outbox WHERE state = ? ORDER BY next_attempt {order}, id {order} LIMIT ?",
            (str(state), max(int(limit), 1)),
        ).fetchall()
        return [OutboxLine(**dict(r)) for r in rows]

    def page_outbox_counts(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Outbox rows by state, and the rows still owed by destination.

        Returns
        -------
        states : dict of str to int
            Every known outbox state (0 included) -> rows; counted along the
            outbox_due index.
        owed : dict of str to dict
            Destination -> {state: rows} of the rows still owed (``pending``,
            ``dead``): reads those rows only, however many were sent.
        """
        con = self._connect()
        states = {str(s): 0 for s in OutboxState}
        states.update({r["state"]: int(r["n"]) for r in
                       con.execute("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")})
        owed: dict[str, dict[str, int]] = {}
        for r in con.execute(
            "SELECT destination, state, COUNT(*) AS n FROM outbox"
            f" WHERE state IN ({', '.join('?' * len(OWED_STATES))}) GROUP BY destination, state ORDER BY destination",
            OWED_STATES,
        ):
            owed.setdefault(r["destination"], {})[r["state"]] = int(r["n"])
        return states, owed

    def page_received_per_hour(self, since: float) -> dict[int, int]:
        """Instances received since ``since``, per hour.

        Parameters
        ----------
        since : float
            Epoch seconds.

        Returns
        -------
        dict of int to int
            Start of the hour (epoch seconds, a multiple of 3600) -> instances
            received in it; hours with none are absent. A range of the
            ``instances_received`` index: the rows of the window only.
        """
        rows = self._connect().execute(
            "SELECT CAST(received / 3600 AS INTEGER) * 3600 AS hour, COUNT(*) AS n FROM instances"
            " WHERE received >= ? GROUP BY hour",
            (float(since),),
        ).fetchall()
        return {int(r["hour"]): int(r["n"]) for r in rows}

    def page_deliveries(self, since: float, limit: int) -> list[Delivered]:
        """Studies delivered since ``since``, with when their last instance came and their SR went.

        Parameters
        ----------
        since : float
            Epoch seconds: studies ``delivered`` whose last activity (the
            delivery, for a delivered study) is at or after it.
        limit : int
            Studies at most, the most recent first.

        Returns
        -------
        list of Delivered
            ``delivered_at`` is the latest acknowledgement among the study's
            sent outbox rows; a study with none (no destination configured)
            is left out.
        """
        rows = self._connect().execute(
            "SELECT s.study_uid, s.last_received,"
            " (SELECT MAX(o.sent_at) FROM outbox o WHERE o.study_uid = s.study_uid AND o.state = ?) AS sent"
            f" FROM studies s WHERE s.state = ? AND {ACTIVE} >= ? ORDER BY {ACTIVE} DESC LIMIT ?",
            (OutboxState.SENT, StudyState.DELIVERED, float(since), max(int(limit), 1)),
        ).fetchall()
        return [Delivered(r["study_uid"], float(r["last_received"]), float(r["sent"]))
                for r in rows if r["sent"] is not None]

    def page_first_instance_path(self, study_uid: str) -> str | None:
        """The stored file of one of the study's instances (to read a study-level attribute), or None."""
        row = self._connect().execute(
            "SELECT path FROM instances WHERE study_uid = ? LIMIT 1", (study_uid,)
        ).fetchone()
        return None if row is None else str(row["path"])
