"""When is a study complete? When no instance arrived for ``stable_after_s``.

Carts send a study over minutes, sometimes over several associations, and
DICOM has no "end of study" message; quiet time is what every router uses.
The check is an apscheduler job; it moves ``receiving -> stable`` and, when
at least one task model is installed, ``stable -> queued`` for the worker.
Without a model, complete studies wait as ``stable`` and are queued as soon
as one is installed.
"""

from __future__ import annotations

from collections.abc import Callable

from .journal import Journal
from .logs import get_logger

log = get_logger(__name__)


class StabilityCheck:
    """The periodic job.

    Parameters
    ----------
    journal : Journal
    stable_after_s : float
        Quiet time after the last instance.
    has_models : callable
        Returns True when at least one task bundle is installed.
    """

    def __init__(self, journal: Journal, stable_after_s: float, has_models: Callable[[], bool]) -> None:
        self.journal = journal
        self.stable_after_s = stable_after_s
        self.has_models = has_models

    def run(self) -> tuple[list[str], list[str]]:
        """One pass; returns (studies now stable, studies now queued)."""
        stable = self.journal.mark_stable(self.stable_after_s)
        for uid in stable:
            log.info("study.stable", study_uid=uid)
        queued: list[str] = []
        if self.has_models():
            queued = self.journal.queue_stable()
            for uid in queued:
                log.info("study.queued", study_uid=uid)
        return stable, queued
