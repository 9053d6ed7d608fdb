"""Retention: purge finished studies by age and by total size.

A scheduled job (``[retention]``, off by default). A study may go only when
nothing is owed for it:

- ``delivered``: every destination acknowledged its SR;
- ``skipped``: nothing usable, so no SR will ever be sent (with
  ``sr.report_skipped = true`` such a study gets an SR and ends up
  ``delivered`` instead);
- ``undelivered``: the administrator gave up on every dead letter of its SR
  (``echonode discard``: a destination that will never take it), so nothing
  is owed either.

Never purged: ``receiving``, ``stable``, ``queued``, ``running``,
``reported`` (an SR still pending or dead-lettered), ``failed`` (the
administrator should look, and may ``echonode reprocess``), and any study
with an SR still owed to a destination (an outbox row ``pending`` or
``dead``). A ``superseded`` row owes nothing: that SR was replaced (by
``echonode reprocess`` with a new model set) before it was sent, and the
replacement's own row is what must be ``sent``. Nor does a ``discarded``
row: a dead letter given up for good (``echonode discard``), kept only as a
record; a study whose other rows were sent is ``delivered``. The journal re-checks all
of this in the transaction that deletes the rows (:meth:`Journal.purge_study`),
so a study that changed since it was listed is left alone; the listing and
the re-check share one definition of "owed", since a study listed but then
refused would be logged ``retention.study_changed`` and kept at every run.
A purge removes every SR file of the study, superseded ones included: they
all live under ``reports/<Study>/`` (:meth:`StudyStore.report_path`).

Two rules, applied in this order at every run:

1. age: studies whose last activity (last instance received, or last state
   change such as the SR's delivery) is older than ``max_age_days``;
2. size: while the stored instances add up to more than ``max_total_gb``
   (10^9 bytes), the eligible studies with the oldest last activity go first.
   When only studies that may not go are left, the job logs
   ``retention.over_cap`` and stops; the SCP's ``min_free_disk_mb``
   (associations rejected, 0xA700) still protects the disk.

Candidates come from the journal a page at a time, oldest activity first,
through an index (:meth:`Journal.purge_candidates`), and a rule stops
reading as soon as it is met, instead of loading every study the node holds
(the size rule starts from one sum over the stored instances).

Rows go first (one transaction), then the files, both under the study's
lock (:meth:`StudyStore.study_lock`), which the SCP also takes to move and
record an instance: an instance that arrives for a study while it is purged
waits, then starts the study afresh.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from echonode.config import Config, RetentionConfig
from echonode.ops.logs import get_logger
from echonode.studies.connection import is_disk_full
from echonode.studies.journal import Journal
from echonode.studies.records import StudyActivity
from echonode.studies.states import StudyState
from echonode.studies.store import RESERVE_NAME, SpaceReserve, StudyStore, is_valid_uid

log = get_logger(__name__)

#: States a study may be purged in: those that owe no SR (the journal
#: checks the outbox rows too, see ``echonode.studies.states.SETTLED_STATES``).
PURGEABLE = (StudyState.DELIVERED, StudyState.UNDELIVERED, StudyState.SKIPPED)
GB = 1e9
DAY_S = 86400.0
#: Studies read from the journal at a time: memory stays flat however many
#: studies the node holds, and each page is one indexed query.
PAGE = 500


@dataclass(frozen=True)
class Purged:
    """One purged study."""

    study_uid: str
    state: str
    rule: str  # "age" or "size"
    instances: int
    bytes: int


class Retention:
    """The retention job.

    Parameters
    ----------
    settings : RetentionConfig
        The ``[retention]`` table; :meth:`apply_config` takes a new one
        (a reload), used from the next run.
    journal : Journal
    store : StudyStore
    """

    def __init__(self, settings: RetentionConfig, journal: Journal, store: StudyStore) -> None:
        self.settings = settings
        self.journal = journal
        self.store = store

    def apply_config(self, cfg: Config) -> None:
        """New settings (SIGHUP): the next run uses ``cfg.retention``."""
        self.settings = cfg.retention

    def _candidates(self, active_before: float | None = None) -> Iterator[StudyActivity]:
        """Studies that may be purged, oldest last activity first, read a page at a time.

        Parameters
        ----------
        active_before : float, optional
            Only studies last active before this time (the age rule).

        Yields
        ------
        StudyActivity
            Each eligible study once, in ``(active, study_uid)`` order. The
            journal is read as the caller goes: a study purged meanwhile is
            not seen again, one that changes is judged by its new activity.
        """
        after: tuple[float, str] | None = None
        while True:
            page = self.journal.purge_candidates(PURGEABLE, active_before=active_before, after=after, limit=PAGE)
            yield from page
            if len(page) < PAGE:
                return
            after = (page[-1].active, page[-1].study_uid)

    def run(self, now: float | None = None) -> list[Purged]:
        """Apply both rules once; return what was purged."""
        cfg = self.settings
        now = time.time() if now is None else now
        purged: list[Purged] = []
        if cfg.max_age_days > 0:
            for c in self._candidates(active_before=now - cfg.max_age_days * DAY_S):
                self._purge(c, "age", purged)
        total: int | None = None
        if cfg.max_total_gb > 0:
            cap = int(cfg.max_total_gb * GB)
            # After the age rule, so that what it freed counts.
            total = self.journal.stored_bytes()
            if total > cap:
                # From the oldest again: a study the age rule could not purge
                # (it changed meanwhile) gets a second chance here.
                for c in self._candidates():
                    if self._purge(c, "size", purged):
                        total -= c.bytes
                    if total <= cap:
                        break
            if total > cap:
                log.warning("retention.over_cap", stored_bytes=total, cap_bytes=cap,
                            reason="only studies that may not be purged are left")
        if purged:
            if total is None:
                total = self.journal.stored_bytes()
            log.info("retention.done", studies=len(purged), bytes=sum(p.bytes for p in purged), stored_bytes=total)
        return purged

    def _purge(self, c: StudyActivity, rule: str, purged: list[Purged]) -> bool:
        if not is_valid_uid(c.study_uid):
            # Cannot be a folder name we wrote; leave it for a human.
            log.warning("retention.bad_uid_skipped")
            return False
        # Under the study's lock no instance of it can be moved in and
        # acknowledged between forgetting the rows and deleting the files.
        with self.store.study_lock(c.study_uid):
            return self._purge_locked(c, rule, purged)

    def _purge_locked(self, c: StudyActivity, rule: str, purged: list[Purged]) -> bool:
        try:
            paths = self.journal.purge_study(c.study_uid, states=PURGEABLE, active_before=c.active)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # A full disk: deleting rows needs room in the journal's WAL too.
            # The worker's reserve gives it (the worker sets it aside again
            # once there is room), so that retention can free the disk.
            if not SpaceReserve(self.store.root / RESERVE_NAME).release():
                raise
            log.warning("retention.disk_full", study_uid=c.study_uid, effect="space reserve given back to purge")
            paths = self.journal.purge_study(c.study_uid, states=PURGEABLE, active_before=c.active)
        if paths is None:
            log.info("retention.study_changed", study_uid=c.study_uid)
            return False
        freed = self.store.remove_study(c.study_uid)
        log.info(
            "retention.purged",
            study_uid=c.study_uid,
            state=c.state,
            rule=rule,
            instances=c.instances,
            bytes=freed or c.bytes,
            idle_days=round((time.time() - c.active) / DAY_S, 1),
        )
        purged.append(Purged(c.study_uid, c.state, rule, c.instances, freed or c.bytes))
        return True
