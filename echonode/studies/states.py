"""Study and outbox states: the journal's state machine (CONTRACT.md, "Study states").

Study states::

    receiving -> stable -> queued -> running -> reported -> delivered
                                            |           \\-> undelivered
                                            \\-> skipped | failed

``undelivered``: nothing is owed any more, but the latest SR reached no
destination: every row of it was given up by the administrator
(``echonode discard``). A state a later release wrote is read as itself and
treated as final (:func:`as_state`).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "DELIVERY_STATES",
    "OWED_STATES",
    "REOPENABLE_STATES",
    "SETTLED_STATES",
    "OutboxState",
    "StudyState",
    "as_state",
    "owed_condition",
]


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
SETTLED_STATES = (OutboxState.SENT, OutboxState.SUPERSEDED, OutboxState.DISCARDED)
#: The known states that still owe an SR (derived, not a second list): for a query that
#: finds owing rows by state alone, which an index can seek with ``IN`` but
#: not with ``NOT IN``.
OWED_STATES = tuple(s for s in OutboxState if s not in SETTLED_STATES)


def owed_condition(column: str = "state") -> str:
    """SQL that is true when the outbox state in ``column`` still owes an SR.

    Parameters
    ----------
    column : str
        The outbox ``state`` column as the query names it (``"o.state"``
        under an alias).

    Returns
    -------
    str
        A condition with one ``?`` per entry of ``SETTLED_STATES``; bind
        ``*SETTLED_STATES`` at its place among the query's arguments.
    """
    # A complement rather than a list of the owing states: a state this
    # version does not know about keeps a study (and its images) rather
    # than letting retention delete it.
    return f"{column} NOT IN ({', '.join('?' * len(SETTLED_STATES))})"


#: States of a study whose SR went to the outbox: the outbox rows decide
#: between them (:meth:`Journal._delivery_state`).
DELIVERY_STATES = (StudyState.REPORTED, StudyState.DELIVERED, StudyState.UNDELIVERED)

def as_state(value: str) -> StudyState | str:
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


REOPENABLE_STATES = (StudyState.STABLE, StudyState.QUEUED, StudyState.RUNNING, StudyState.SKIPPED, StudyState.FAILED)

# The schema is versioned by being additive only: every statement is
# IF NOT EXISTS and runs at every open, so a journal written by an earlier
# echonode gains new tables and indexes when it is next opened, and an
# earlier echonode (a roll back) opens a newer file and ignores them.
