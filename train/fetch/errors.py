"""What can go wrong with a fetch, sorted by what fetch does about it."""

from __future__ import annotations


class FetchError(Exception):
    """A failed query or retrieval.

    Parameters
    ----------
    reason : str
        What happened, in UIDs, counts and statuses only (it is logged and
        stored in the journal).
    transient : bool
        Trying again later may work (the study is retried, up to
        ``--attempts``).
    busy : bool
        The PACS is overloaded or not answering: every worker pauses
        (the shared backoff) before it asks again.
    fatal : bool
        No study can succeed until someone changes a setting (the move
        destination is unknown to the PACS, the association is rejected
        permanently): the run stops.
    """

    def __init__(self, reason: str, *, transient: bool = False, busy: bool = False, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient or busy
        self.busy = busy
        self.fatal = fatal


class UsageError(ValueError):
    """A bad argument or input file: exit 2 with this message."""
