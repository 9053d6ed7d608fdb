"""The journal: a SQLite (WAL) record of instances, study states, results and the SR outbox.

Every process and thread opens its own connection (``Journal`` keeps one per
thread). Writes that must agree happen in one transaction, at
``synchronous=FULL`` except on the receive path: there the commit is
``NORMAL`` (durable against a kill -9; after a power loss the last commits
are re-derived by ``StudyStore.recover()`` from the files, which were
fsynced before the commit). Either way the C-STORE is acknowledged only
after the commit.

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

import contextlib
import dataclasses
import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class StudyState(StrEnum):
    RECEIVING = "receiving"
    STABLE = "stable"
    QUEUED = "queued"
    RUNNING = "running"
    REPORTED = "reported"
    DELIVERED = "delivered"
    #: Nothing owed, but the latest SR reached no destination: each of its
    #: dead letters was given up (``echonode discard``). Final, like
    #: ``delivered``: a late instance does not re-open it.
    UNDELIVERED = "undelivered"
    SKIPPED = "skipped"
    FAILED = "failed"


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    #: Never sent, and no longer to be: a newer SR for the study replaced it.
    SUPERSEDED = "superseded"
    #: A dead letter the administrator gave up on (``echonode discard``):
    #: never sent, never retried; kept for the audit (``discarded_at``).
    DISCARDED = "discarded"


#: Outbox states that owe the destination nothing more: it acknowledged the
#: SR (``sent``), the SR was replaced before it got there (``superseded``:
#: the replacement has a row of its own, which owes until it is sent), or the
#: administrator gave up on it (``discarded``: the destination will never
#: take it, and a study must not be kept for ever for its sake). Every
#: other state (``pending``, ``dead``, and any state a later echonode adds,
#: read here after a roll back) means the PACS lacks an SR it should get: the
#: study stays ``reported``, a newer SR supersedes the row, and retention
#: keeps the study. The one definition of "still owed"; use :func:`_owed`.
_SETTLED = (OutboxState.SENT, OutboxState.SUPERSEDED, OutboxState.DISCARDED)
#: The known states that still owe an SR (derived, not a second list): for a query that
#: finds owing rows by state alone, which an index can seek with ``IN`` but
#: not with ``NOT IN``.
OWED_STATES = tuple(s for s in OutboxState if s not in _SETTLED)


def _owed(column: str = "state") -> str:
    """SQL that is true when the outbox state in ``column`` still owes an SR.

    Parameters
    ----------
    column : str
        The outbox ``state`` column as the query names it (``"o.state"``
        under an alias).

    Returns
    -------
    str
        A condition with one ``?`` per entry of ``_SETTLED``; bind
        ``*_SETTLED`` at its place among the query's arguments.
    """
    # A complement rather than a list of the owing states: a state this
    # version does not know about keeps a study (and its images) rather
    # than letting retention delete it.
    return f"{column} NOT IN ({', '.join('?' * len(_SETTLED))})"


#: States of a study whose SR went to the outbox: the outbox rows decide
#: between them (:meth:`Journal._delivery_state`).
_DELIVERY_STATES = (StudyState.REPORTED, StudyState.DELIVERED, StudyState.UNDELIVERED)

def _as_state(value: str) -> StudyState | str:
    """A study state read from the journal; a state this release does not
    know (written by a later one, before a roll back) stays a string and is
    treated as final: it is never re-opened, never claimed, never purged."""
    try:
        return StudyState(value)
    except ValueError:
        return value


#: SQLite's codes for a write the file system refused: SQLITE_FULL (its Unix
#: VFS's answer to ENOSPC), SQLITE_IOERR_WRITE (any other refused write, a
#: quota's EDQUOT among them) and SQLITE_IOERR_SHMSIZE (the WAL index could
#: not grow).
_DISK_FULL_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_SHMSIZE})
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or the error it was raised from) is storage refusing a write for want of room.

    Parameters
    ----------
    exc : BaseException
        An error from a file write (``OSError`` with ENOSPC or EDQUOT) or
        from the journal (``sqlite3.Error`` with one of ``_DISK_FULL_CODES``).

    Returns
    -------
    bool
        Such a failure is the node's storage, never the study's: the
        caller retries once there is room instead of counting it against
        the study.
    """
    seen: BaseException | None = exc
    for _ in range(4):  # ``raise ... from`` chains, short ones
        if seen is None:
            return False
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", None) in _DISK_FULL_CODES:
            return True
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__
    return False


#: States in which a new instance re-opens the study for receiving.
_REOPENABLE = (StudyState.STABLE, StudyState.QUEUED, StudyState.RUNNING, StudyState.SKIPPED, StudyState.FAILED)

# The schema is versioned by being additive only: every statement is
# IF NOT EXISTS and runs at every open, so a journal written by an earlier
# echonode gains new tables and indexes when it is next opened, and an
# earlier echonode (a roll back) opens a newer file and ignores them.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid       TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    reason          TEXT,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    updated         REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- bumps whenever the study is (re)claimed or re-opened: a worker whose
    -- claim is stale must not write results
    generation      INTEGER NOT NULL DEFAULT 0,
    worker_pid      INTEGER
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
-- A study's last activity: retention walks it oldest first, `status` lists
-- the most recent. Queries must spell the expression exactly as here
-- (see _ACTIVE) for SQLite to use the index.
CREATE INDEX IF NOT EXISTS studies_active ON studies(MAX(last_received, updated), study_uid);

CREATE TABLE IF NOT EXISTS instances (
    sop_uid         TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL REFERENCES studies(study_uid),
    series_uid      TEXT NOT NULL,
    sop_class_uid   TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    received        REAL NOT NULL,
    calling_ae      TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);

CREATE TABLE IF NOT EXISTS results (
    id              INTEGER PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    model_set       TEXT NOT NULL,
    task            TEXT NOT NULL,
    bundle_name     TEXT NOT NULL,
    bundle_version  TEXT NOT NULL,
    device_uid      TEXT NOT NULL,
    probability     REAL NOT NULL,
    positive        INTEGER NOT NULL,
    threshold       REAL NOT NULL,
    n_videos        INTEGER NOT NULL,
    detail          TEXT NOT NULL,
    created         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_study ON results(study_uid);

CREATE TABLE IF NOT EXISTS reports (
    sr_sop_uid      TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    model_set       TEXT NOT NULL,
    series_uid      TEXT NOT NULL,
    sop_class_uid   TEXT NOT NULL,
    path            TEXT NOT NULL,
    supersedes      TEXT,
    created         REAL NOT NULL,
    UNIQUE (study_uid, model_set)
);

CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    sr_sop_uid      TEXT NOT NULL REFERENCES reports(sr_sop_uid),
    study_uid       TEXT NOT NULL,
    destination     TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt    REAL NOT NULL,
    last_error      TEXT,
    created         REAL NOT NULL,
    sent_at         REAL,
    discarded_at    REAL,
    UNIQUE (sr_sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);
-- "does this study still owe an SR": retention, purge_study, _delivery_state.
CREATE INDEX IF NOT EXISTS outbox_study ON outbox(study_uid, state);

-- The bytes and number of recorded instances, one row kept by the triggers
-- below, so that retention and every metrics scrape read one row instead of
-- summing every instance. Filled once, from the instances, by
-- Journal._count_stored (after the triggers exist, so no write is missed).
-- An earlier echonode (a roll back) keeps it right: the triggers are the
-- file's, they fire for any writer.
CREATE TABLE IF NOT EXISTS stored_totals (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    bytes           INTEGER NOT NULL,
    instances       INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS stored_totals_insert AFTER INSERT ON instances BEGIN
    UPDATE stored_totals SET bytes = bytes + NEW.size, instances = instances + 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS stored_totals_delete AFTER DELETE ON instances BEGIN
    UPDATE stored_totals SET bytes = bytes - OLD.size, instances = instances - 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS stored_totals_update AFTER UPDATE OF size ON instances BEGIN
    UPDATE stored_totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 1;
END;
"""

# Indexes the status page reads through (Journal.page_*): each of its
# lists and figures is a seek or a range of one of these, so the page costs
# the same on a journal of 100,000 studies as on one of ten. Additive like
# the rest of the schema.
_STATUS_PAGE_SCHEMA = """
-- The most recent studies of one state: a seek per state, then LIMIT.
CREATE INDEX IF NOT EXISTS studies_state_active ON studies(state, MAX(last_received, updated), study_uid);
-- Instances received per hour over the last hours: a range, not a scan.
CREATE INDEX IF NOT EXISTS instances_received ON instances(received);
"""

#: Columns added to a table after its first release, as (table, column,
#: declaration): CREATE TABLE IF NOT EXISTS leaves an older journal's table
#: as it is, so :meth:`Journal._add_columns` adds these at open. Nullable, so
#: an earlier echonode (a roll back) inserts and reads rows as before.
_ADDED_COLUMNS = (
    ("outbox", "discarded_at", "REAL"),
    # What the destination was sent, set with ``sent``: the SR's own class
    # and UID, or the class it fell back to there and the UID derived for it.
    ("outbox", "sent_sop_class_uid", "TEXT"),
    ("outbox", "sent_sop_uid", "TEXT"),
)

#: A study's last activity (last instance received or last state change), as
#: indexed by ``studies_active``; ``s`` is the studies table's alias.
_ACTIVE = "MAX(s.last_received, s.updated)"


@dataclass(frozen=True)
class InstanceRecord:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    received: float
    calling_ae: str | None = None


@dataclass(frozen=True)
class Claim:
    """A study taken by the worker; ``generation`` guards against stale writes."""

    study_uid: str
    generation: int
    attempts: int


@dataclass(frozen=True)
class TaskResult:
    """One task's study-level result, as the worker records it."""

    task: str
    bundle_name: str
    bundle_version: str
    device_uid: str
    probability: float
    positive: bool
    threshold: float
    n_videos: int
    detail: dict[str, Any]


@dataclass(frozen=True)
class ReportRecord:
    sr_sop_uid: str
    study_uid: str
    model_set: str
    series_uid: str
    sop_class_uid: str
    path: str
    supersedes: str | None = None


@dataclass(frozen=True)
class StudyActivity:
    """A study as retention sees it (:meth:`Journal.purge_candidates`)."""

    study_uid: str
    state: str
    #: Last activity: ``max(last_received, updated)``.
    active: float
    instances: int
    bytes: int


@dataclass(frozen=True)
class OutboxItem:
    id: int
    sr_sop_uid: str
    study_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    path: str


@dataclass(frozen=True)
class DiscardedDelivery:
    """One dead letter given up by :meth:`Journal.discard_dead`."""

    study_uid: str
    sr_sop_uid: str
    destination: str
    #: Why it went dead: the delivery's last error.
    last_error: str | None


@dataclass(frozen=True)
class TaskSummary:
    """One task's result of a listed study (:meth:`Journal.snapshot`)."""

    task: str
    probability: float
    positive: bool
    threshold: float
    #: The bundle's name and version.
    model: str
    version: str
    n_videos: int


@dataclass(frozen=True)
class StudySummary:
    """A listed study (:meth:`Journal.snapshot`): its row, size and the results of its latest SR."""

    study_uid: str
    state: str
    instances: int
    bytes: int
    reason: str | None
    attempts: int
    first_received: float
    last_received: float
    updated: float
    results: list[TaskSummary]


@dataclass(frozen=True)
class Delivery:
    """A listed outbox row (:meth:`Journal.snapshot`)."""

    id: int
    study_uid: str
    sr_sop_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    sent_at: float | None
    discarded_at: float | None
    #: The SR class and SOP Instance UID the destination took (a class it
    #: refused leads to another: Comprehensive 3D SR falls back to
    #: Comprehensive SR); None until sent.
    sent_sop_class_uid: str | None = None
    sent_sop_uid: str | None = None


@dataclass(frozen=True)
class StatusSnapshot:
    """What ``echonode status`` reports (:meth:`Journal.snapshot`); its fields are the keys of ``--json``."""

    studies: list[StudySummary]
    outbox: list[Delivery]
    #: Every study state, 0 included.
    study_counts: dict[str, int]
    studies_total: int
    #: Every outbox state, 0 included.
    outbox_counts: dict[str, int]
    #: The listing's bound; None: everything listed.
    limit: int | None


@dataclass(frozen=True)
class StudyLine:
    """One study as the status page lists it (:meth:`Journal.page_studies`)."""

    study_uid: str
    state: str
    reason: str | None
    attempts: int
    instances: int
    first_received: float
    last_received: float
    #: Last activity: ``max(last_received, updated)``.
    active: float


@dataclass(frozen=True)
class OutboxLine:
    """One outbox row as the status page lists it (:meth:`Journal.page_outbox`)."""

    id: int
    study_uid: str
    sr_sop_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    created: float


@dataclass(frozen=True)
class Delivered:
    """A study's SR delivered (:meth:`Journal.page_deliveries`)."""

    study_uid: str
    last_received: float
    #: When the last destination acknowledged it.
    delivered_at: float


class SopInOtherStudy(ValueError):
    """The SOP Instance UID is already recorded under another study."""


class StaleClaim(RuntimeError):
    """The study changed (new instance, reprocess) while the worker held it."""


class Journal:
    """Thread-safe access to the journal database.

    Parameters
    ----------
    path : path-like
        The SQLite file; created with its schema when absent.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.path = Path(path)
        #: False: commits are not fsynced (``synchronous=OFF``), for a journal
        #: built aside and made durable as a whole before use (``recover-journal``).
        self.durable = durable
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._local = threading.local()
        # Create the schema once, eagerly, so that errors show at start.
        # executescript manages its own transaction.
        self._connect().executescript(_SCHEMA + _STATUS_PAGE_SCHEMA)
        self._add_columns()
        self._count_stored()

    # -- connection handling -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            new = not self.path.exists()
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=True)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            # FULL by default; record_instance lowers it to NORMAL for the
            # receive commit only (recover() re-records from the fsynced files).
            con.execute("PRAGMA synchronous=FULL" if self.durable else "PRAGMA synchronous=OFF")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=60000")
            if new:
                os.chmod(self.path, 0o600)
            self._local.con = con
        return con

    def _add_columns(self) -> None:
        """Give a journal from an earlier echonode the columns added since (``_ADDED_COLUMNS``)."""
        con = self._connect()
        # Cheap check first: a current journal takes no write lock at open.
        if all(c in self._columns(con, t) for t, c, _ in _ADDED_COLUMNS):
            return
        # Under the write lock and checked again: the node and a CLI command
        # may open an old journal at once, and the second ALTER would fail.
        with self._tx() as con:
            for table, column, decl in _ADDED_COLUMNS:
                if column not in self._columns(con, table):
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def _count_stored(self) -> None:
        """Fill ``stored_totals`` once, for a journal that had instances before it existed."""
        con = self._connect()
        # Cheap check first: a journal counted already takes no write lock at open.
        if con.execute("SELECT 1 FROM stored_totals WHERE id = 1").fetchone() is not None:
            return
        # Under the write lock: the triggers exist, so every later write is
        # added to the row this one sums up to now.
        with self._tx() as con:
            con.execute(
                "INSERT OR IGNORE INTO stored_totals (id, bytes, instances)"
                " SELECT 1, COALESCE(SUM(size), 0), COUNT(*) FROM instances"
            )

    @staticmethod
    def _columns(con: sqlite3.Connection, table: str) -> set[str]:
        return {r["name"] for r in con.execute(f"PRAGMA table_info({table})")}

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            # SQLite rolls the transaction back by itself after some errors
            # (SQLITE_FULL, SQLITE_IOERR: a full disk, in a statement or in
            # the COMMIT): a ROLLBACK then fails, and its error would hide
            # the one the caller must see. A COMMIT that failed and left the
            # transaction open must not leave the connection inside it.
            if con.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
            raise

    def close_as_one_file(self) -> None:
        """Leave the WAL mode and close: the database is then one file, to be moved or copied whole.

        For a journal built aside (``recover-journal``); the next open
        switches it back to WAL.
        """
        self._connect().execute("PRAGMA journal_mode=DELETE")
        self.close()

    def close(self) -> None:
        """Close this thread's connection."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- receiving -------------------------------------------------------------

    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        row = self._connect().execute("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return InstanceRecord(**dict(row)) if row else None

    def record_instance(self, rec: InstanceRecord) -> StudyState | str:
        """Record a stored instance and (re)open its study for receiving.

        Returns the study's state after the write. A study already reported
        or delivered keeps its state: a late instance is stored and recorded,
        but the one SR per study and model set has been sent (use
        ``echonode reprocess`` to include it under a new model set).
        """
        now = rec.received
        # synchronous=NORMAL for this write only: in WAL mode a commit still
        # survives a kill -9 of the process; what it can lose is the last
        # commits on a power failure, and those are re-recorded at start by
        # StudyStore.recover() from the files, which were fsynced (file and
        # folder) before this call. Saves one fsync per received object.
        con = self._connect()
        if not self.durable:
            return self._record_instance(rec, now)
        con.execute("PRAGMA synchronous=NORMAL")
        try:
            return self._record_instance(rec, now)
        finally:
            con.execute("PRAGMA synchronous=FULL")

    def _record_instance(self, rec: InstanceRecord, now: float) -> StudyState | str:
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
                state = StudyState.RECEIVING
            else:
                state = _as_state(row["state"])
                if state in _REOPENABLE:
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
        return state

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
        return _as_state(row["state"]) if row else None

    def study(self, study_uid: str) -> dict[str, Any] | None:
        row = self._connect().execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return dict(row) if row else None

    def mark_stable(self, quiet_for_s: float, now: float | None = None) -> list[str]:
        """Move ``receiving`` studies with no new instance for ``quiet_for_s`` to ``stable``."""
        now = time.time() if now is None else now
        with self._tx() as con:
            rows = con.execute(
                "SELECT study_uid FROM studies WHERE state = ? AND last_received <= ?",
                (StudyState.RECEIVING, now - quiet_for_s),
            ).fetchall()
            uids = [r["study_uid"] for r in rows]
            con.executemany(
                "UPDATE studies SET state = ?, updated = ? WHERE study_uid = ?",
                [(StudyState.STABLE, now, u) for u in uids],
            )
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
                "UPDATE studies SET state = ?, generation = ?, attempts = ?, worker_pid = ?, updated = ?"
                " WHERE study_uid = ?",
                (StudyState.RUNNING, gen, attempts, pid, now, row["study_uid"]),
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

    def release_running(self) -> list[str]:
        """Put studies whose worker *we* stopped back in the queue, uncounted."""
        now = time.time()
        with self._tx() as con:
            rows = con.execute("SELECT study_uid FROM studies WHERE state = ?", (StudyState.RUNNING,)).fetchall()
            uids = [r["study_uid"] for r in rows]
            con.executemany(
                "UPDATE studies SET state = ?, attempts = MAX(attempts - 1, 0), worker_pid = NULL,"
                " reason = 'node stopped during processing', updated = ? WHERE study_uid = ?",
                [(StudyState.QUEUED, now, u) for u in uids],
            )
        return uids

    def recover_running(self, max_attempts: int) -> dict[str, StudyState]:
        """At start: studies left ``running`` by a dead worker are queued again or failed."""
        now = time.time()
        out: dict[str, StudyState] = {}
        with self._tx() as con:
            rows = con.execute(
                "SELECT study_uid, attempts FROM studies WHERE state = ?", (StudyState.RUNNING,)
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
                        f"UPDATE outbox SET state = ?, last_error = ? WHERE sr_sop_uid = ? AND {_owed()}",
                        (OutboxState.SUPERSEDED, f"superseded by {report.sr_sop_uid}", report.supersedes,
                         *_SETTLED),
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
            f"SELECT COUNT(*) AS n FROM outbox WHERE study_uid = ? AND {_owed()}", (study_uid, *_SETTLED)
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
        where, args = ["state = ?"], [OutboxState.DEAD]
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
        if cur is not None and cur["state"] in _DELIVERY_STATES:
            con.execute("UPDATE studies SET state = ?, updated = ? WHERE study_uid = ?", (state, now, study_uid))
        return state

    # -- status ------------------------------------------------------------------

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
            source = f"(SELECT * FROM studies s ORDER BY {_ACTIVE} DESC, s.study_uid DESC LIMIT ?)"
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

    # -- retention -----------------------------------------------------------------

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
            ``_SETTLED``), the same rule :meth:`purge_study` applies.
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
            f"NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid AND {_owed('o.state')})",
        ]
        args: list[Any] = [*names, *_SETTLED]
        if active_before is not None:
            where.append(f"{_ACTIVE} < ?")
            args.append(active_before)
        if after is not None:
            # Spelt out rather than as a row value: SQLite seeks an
            # expression index on ``expr >= ?`` but not on ``(expr, uid) > (?, ?)``.
            where.append(f"{_ACTIVE} >= ? AND ({_ACTIVE} > ? OR s.study_uid > ?)")
            args += [after[0], after[0], after[1]]
        rows = self._connect().execute(
            f"SELECT s.study_uid, s.state, {_ACTIVE} AS active,"
            " (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid) AS n,"
            " (SELECT COALESCE(SUM(size), 0) FROM instances i WHERE i.study_uid = s.study_uid) AS bytes"
            f" FROM studies s WHERE {' AND '.join(where)} ORDER BY {_ACTIVE}, s.study_uid LIMIT ?",
            (*args, int(limit)),
        ).fetchall()
        return [StudyActivity(r["study_uid"], r["state"], float(r["active"]), int(r["n"]), int(r["bytes"]))
                for r in rows]

    def purge_study(
        self,
        study_uid: str,
        *,
        states: Iterable[str] | None = None,
        active_before: float | None = None,
    ) -> list[str] | None:
        """Delete a study's rows (instances, results, reports, outbox, study) in one transaction.

        Parameters
        ----------
        study_uid : str
        states : iterable of str, optional
            Purge only while the study is in one of these states. With
            ``states``, a study that still owes an SR to a destination
            (outbox row pending or dead) is never purged; one whose rows are
            all ``sent``, ``superseded`` or ``discarded`` may be (the rule of
            :meth:`purge_candidates`, see ``_SETTLED``).
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
                    f"SELECT COUNT(*) AS n FROM outbox WHERE study_uid = ? AND {_owed()}", (study_uid, *_SETTLED)
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
            con.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
        return paths

    # -- the status page (read-only; every query a seek or a bounded range) ----------

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
            f" {_ACTIVE} AS active,"
            " (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid) AS n"
            f" FROM studies s WHERE s.state = ? ORDER BY {_ACTIVE} DESC, s.study_uid DESC LIMIT ?",
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
            f" FROM studies s WHERE s.state = ? AND {_ACTIVE} >= ? ORDER BY {_ACTIVE} DESC LIMIT ?",
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
