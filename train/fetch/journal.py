"""The fetch journal: a SQLite record of every study a fetch found and how far it got.

It lives in ``ARCHIVE/.fetch/journal.sqlite``. A study is::

    found -> fetching -> complete      every instance the PACS announced is on disk
                      -> failed        the last attempt failed; ``reason`` says why
                      -> skipped       nothing to fetch (no US series)

A re-run fetches every study its query finds that is not ``complete`` or
``skipped`` (``found``, ``fetching`` after a kill, ``failed``) and leaves the
others alone. An instance is recorded only after its file is fsynced and
renamed into place, and acknowledged to the PACS only after that commit, so
a kill -9 loses nothing that was acknowledged; a power cut may lose the
last commits (``synchronous=NORMAL``), which the next run fetches again.

``attempts`` keeps one row per try of a study with its start time and
outcome: the record the pacing tests read. Nothing here identifies a
patient: studies, series and instances by UID, counts, sizes, times and
reasons that name UIDs and statuses only.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class FetchState(StrEnum):
    FOUND = "found"
    FETCHING = "fetching"
    COMPLETE = "complete"
    FAILED = "failed"
    SKIPPED = "skipped"


#: States a re-run leaves alone.
DONE_STATES = (FetchState.COMPLETE, FetchState.SKIPPED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid        TEXT PRIMARY KEY,
    state            TEXT NOT NULL,
    reason           TEXT,
    -- instances of the US and SR series the PACS announced at the last try (NULL: not said)
    expected         INTEGER,
    received         INTEGER NOT NULL DEFAULT 0,
    bytes            INTEGER NOT NULL DEFAULT 0,
    failed_instances INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    found_at         REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    updated          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);

CREATE TABLE IF NOT EXISTS instances (
    sop_uid     TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    series_uid  TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    landed_at   REAL NOT NULL,
    attempt     INTEGER
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);

CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    outcome     TEXT,
    reason      TEXT,
    instances   INTEGER,
    bytes       INTEGER
);
CREATE INDEX IF NOT EXISTS attempts_study ON attempts(study_uid);

-- Instances refused on arrival (did not parse, bad UID, ...): kept for the summary.
CREATE TABLE IF NOT EXISTS refused (
    id          INTEGER PRIMARY KEY,
    study_uid   TEXT,
    sop_uid     TEXT,
    reason      TEXT NOT NULL,
    at          REAL NOT NULL,
    attempt     INTEGER
);
"""


@dataclass(frozen=True)
class StudyRow:
    """One study as the journal holds it."""

    study_uid: str
    state: str
    reason: str | None
    expected: int | None
    received: int
    bytes: int
    failed_instances: int
    attempts: int
    found_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class AttemptRow:
    """One try of one study."""

    id: int
    study_uid: str
    started_at: float
    finished_at: float | None
    outcome: str | None
    reason: str | None
    instances: int | None
    bytes: int | None


class SopInOtherStudy(Exception):
    """The SOP Instance UID was already fetched under another study."""


class FetchJournal:
    """The journal of one archive; one connection shared by fetch's threads.

    Parameters
    ----------
    path : path-like
        The SQLite file (created with its folder).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- studies -------------------------------------------------------------------

    def record_found(self, studies: Iterable[tuple[str, int | None]], now: float) -> None:
        """Add the studies a query found (UID, announced instances); known ones keep their state."""
        with self._tx() as db:
            for uid, expected in studies:
                db.execute(
                    "INSERT INTO studies (study_uid, state, expected, found_at, updated) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(study_uid) DO NOTHING",
                    (uid, FetchState.FOUND, expected, now, now),
                )

    def study(self, uid: str) -> StudyRow | None:
        rows = self._query(
            "SELECT study_uid, state, reason, expected, received, bytes, failed_instances, attempts, found_at,"
            " started_at, finished_at FROM studies WHERE study_uid = ?",
            (uid,),
        )
        return StudyRow(*rows[0]) if rows else None

    def studies(self) -> list[StudyRow]:
        rows = self._query(
            "SELECT study_uid, state, reason, expected, received, bytes, failed_instances, attempts, found_at,"
            " started_at, finished_at FROM studies ORDER BY found_at, study_uid"
        )
        return [StudyRow(*r) for r in rows]

    def states(self) -> dict[str, str]:
        """Study UID -> state, for every study."""
        return dict(self._query("SELECT study_uid, state FROM studies"))

    def start_attempt(self, uid: str, now: float) -> int:
        """Mark the study ``fetching``; returns the attempt's id."""
        with self._tx() as db:
            db.execute(
                "UPDATE studies SET state = ?, reason = NULL, attempts = attempts + 1, started_at = ?, updated = ?"
                " WHERE study_uid = ?",
                (FetchState.FETCHING, now, now, uid),
            )
            cur = db.execute("INSERT INTO attempts (study_uid, started_at) VALUES (?, ?)", (uid, now))
            return int(cur.lastrowid or 0)

    def finish_attempt(self, attempt: int, uid: str, state: FetchState, reason: str | None, now: float, *,
                       expected: int | None = None, failed_instances: int = 0, moved: int | None = None) -> StudyRow:
        """Close an attempt and set the study's state.

        The study's totals are recounted from its instances; ``moved`` (the
        PACS's count, for a C-MOVE straight to the node, where nothing lands
        here) replaces the count when given.
        """
        with self._tx() as db:
            n, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM instances WHERE study_uid = ?", (uid,)
            ).fetchone()
            got, got_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM instances WHERE attempt = ?", (attempt,)
            ).fetchone()
            if moved is not None:
                n = got = moved
            db.execute(
                "UPDATE attempts SET finished_at = ?, outcome = ?, reason = ?, instances = ?, bytes = ? WHERE id = ?",
                (now, state, reason, got, got_bytes, attempt),
            )
            db.execute(
                "UPDATE studies SET state = ?, reason = ?, received = ?, bytes = ?, failed_instances = ?,"
                " expected = COALESCE(?, expected), finished_at = ?, updated = ? WHERE study_uid = ?",
                (state, reason, n, size, failed_instances, expected, now, now, uid),
            )
        row = self.study(uid)
        assert row is not None
        return row

    # -- instances -------------------------------------------------------------------

    def record_instance(self, study_uid: str, series_uid: str, sop_uid: str, size: int, now: float,
                        attempt: int | None) -> None:
        """Record an instance whose file is in place (before it is acknowledged).

        Raises
        ------
        SopInOtherStudy
            When the SOP Instance UID was fetched under another study.
        """
        with self._tx() as db:
            row = db.execute("SELECT study_uid FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
            if row is not None and row[0] != study_uid:
                raise SopInOtherStudy(sop_uid)
            db.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, bytes, landed_at, attempt)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(sop_uid) DO UPDATE SET series_uid = excluded.series_uid,"
                " bytes = excluded.bytes, landed_at = excluded.landed_at, attempt = excluded.attempt",
                (sop_uid, study_uid, series_uid, size, now, attempt),
            )

    def instance_study(self, sop_uid: str) -> str | None:
        rows = self._query("SELECT study_uid FROM instances WHERE sop_uid = ?", (sop_uid,))
        return str(rows[0][0]) if rows else None

    def instances_of(self, study_uid: str) -> set[str]:
        return {r[0] for r in self._query("SELECT sop_uid FROM instances WHERE study_uid = ?", (study_uid,))}

    def instance_times(self) -> list[tuple[float, int]]:
        """(landed_at, bytes) of every instance, oldest first."""
        return [(float(t), int(b)) for t, b in self._query("SELECT landed_at, bytes FROM instances ORDER BY landed_at")]

    def record_refused(self, study_uid: str | None, sop_uid: str | None, reason: str, now: float,
                       attempt: int | None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO refused (study_uid, sop_uid, reason, at, attempt) VALUES (?, ?, ?, ?, ?)",
                (study_uid, sop_uid, reason, now, attempt),
            )

    def refused(self, attempt: int | None = None) -> list[tuple[str | None, str | None, str]]:
        sql = "SELECT study_uid, sop_uid, reason FROM refused"
        args: tuple = ()
        if attempt is not None:
            sql += " WHERE attempt = ?"
            args = (attempt,)
        return [(a, b, c) for a, b, c in self._query(sql + " ORDER BY id", args)]

    def attempts(self, study_uid: str | None = None) -> list[AttemptRow]:
        sql = "SELECT id, study_uid, started_at, finished_at, outcome, reason, instances, bytes FROM attempts"
        args: tuple = ()
        if study_uid is not None:
            sql += " WHERE study_uid = ?"
            args = (study_uid,)
        return [AttemptRow(*r) for r in self._query(sql + " ORDER BY id", args)]

    def mean_instance_bytes(self) -> float | None:
        """The mean size of the instances fetched so far (None: none yet), for dry-run estimates."""
        rows = self._query("SELECT AVG(bytes) FROM instances")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None
