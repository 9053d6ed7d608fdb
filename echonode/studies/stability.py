"""When is a study complete? When no instance arrived for ``stable_after_s``.

Carts send a study over minutes, sometimes over several associations, and
DICOM has no "end of study" message; quiet time is what every router uses.
A cart that sends a whole exam in one association says more: with
``study.after_release_s`` set, a study is complete that many seconds after
the association that brought it was released, none other being open for it
(:meth:`~echonode.studies.journal.Journal.mark_stable`); the quiet rule stays
for associations that were aborted or cut by a restart.
The check is an apscheduler job; it moves ``receiving -> stable`` and, when
at least one task model is installed, ``stable -> queued`` for the worker.
Without a model, complete studies wait as ``stable`` and are queued as soon
as one is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from echonode.config import Config
from echonode.ops.logs import get_logger
from echonode.studies.journal import Journal

log = get_logger(__name__)


class StabilityCheck:
    """The periodic job.

    Parameters
    ----------
    journal : Journal
    cfg : Config
        ``study.stable_after_s`` (quiet time after the last instance),
        ``study.after_release_s`` and ``models.dir`` are read from it; :meth:`apply_config` takes new ones.
    has_models : callable
        ``has_models(models_dir)`` is True when at least one task bundle is
        installed there.
    """

    def __init__(self, journal: Journal, cfg: Config, has_models: Callable[[Path], bool]) -> None:
        self.journal = journal
        self.has_models = has_models
        self.apply_config(cfg)

    def apply_config(self, cfg: Config) -> None:
        """New settings (SIGHUP): the next pass uses them."""
        self.stable_after_s = cfg.study.stable_after_s
        self.after_release_s = cfg.study.after_release_s
        self.models_dir = cfg.models_dir

    def run(self) -> tuple[list[str], list[str]]:
        """One pass; returns (studies now stable, studies now queued)."""
        stable = self.journal.mark_stable(self.stable_after_s, after_release_s=self.after_release_s)
        for uid in stable:
            log.info("study.stable", study_uid=uid)
        queued: list[str] = []
        if self.has_models(self.models_dir):
            queued = self.journal.queue_stable()
            for uid in queued:
                log.info("study.queued", study_uid=uid)
        return stable, queued
