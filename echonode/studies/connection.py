"""One SQLite connection per thread to the journal, its transactions, and the full-disk errors it meets.

Every process and thread opens its own connection. Writes that must agree
happen in one transaction (:meth:`JournalConnection._tx`, ``BEGIN
IMMEDIATE``), at ``synchronous=FULL`` except on the receive path: there the
commit is ``NORMAL`` (durable against a kill -9; after a power loss the last
commits are re-derived by ``StudyStore.recover()`` from the files, which were
fsynced before the commit).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from echonode.studies.schema import (
    ADDED_COLUMNS,
    AGREEMENT_SCHEMA,
    FIRST_OBJECT_TRIGGER,
    SCHEMA,
    SR_CLASS_PREFIX,
    STATUS_PAGE_SCHEMA,
)

__all__ = ["JournalConnection", "is_disk_full"]


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


class JournalConnection:
    """The journal's database: opened (created with its schema when absent), one connection per thread.

    Parameters
    ----------
    path : path-like
        The SQLite file; created with its schema when absent.
    durable : bool
        False: commits are not fsynced, for a journal built aside and made
        durable as a whole before use (``recover-journal``).
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
        self._connect().executescript(SCHEMA + STATUS_PAGE_SCHEMA + AGREEMENT_SCHEMA + FIRST_OBJECT_TRIGGER)
        self._add_columns()
        self._count_stored()
        self._queue_earlier_srs()

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
        """Give a journal from an earlier echonode the columns added since (``ADDED_COLUMNS``)."""
        con = self._connect()
        # Cheap check first: a current journal takes no write lock at open.
        if all(c in self._columns(con, t) for t, c, _ in ADDED_COLUMNS):
            return
        # Under the write lock and checked again: the node and a CLI command
        # may open an old journal at once, and the second ALTER would fail.
        with self._tx() as con:
            for table, column, decl in ADDED_COLUMNS:
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

    def _queue_earlier_srs(self) -> None:
        """Once per journal: queue the studies whose SRs were recorded before the ``references_due`` triggers.

        A journal from an earlier echonode holds SRs that no trigger saw: their
        studies get their reference read like any other (one scan of the
        instances, once; a new journal's is empty).
        """
        con = self._connect()
        if con.execute("SELECT 1 FROM journal_marks WHERE name = 'references_due'").fetchone() is not None:
            return
        with self._tx() as con:
            if con.execute("SELECT 1 FROM journal_marks WHERE name = 'references_due'").fetchone() is not None:
                return
            con.execute(
                "INSERT OR IGNORE INTO references_due (study_uid, since)"
                " SELECT study_uid, MAX(received) FROM instances WHERE substr(sop_class_uid, 1, ?) = ?"
                " GROUP BY study_uid",
                (len(SR_CLASS_PREFIX), SR_CLASS_PREFIX),
            )
            con.execute("INSERT INTO journal_marks (name, at) VALUES ('references_due', strftime('%s', 'now'))")

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
