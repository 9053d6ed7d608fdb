"""Where fetched instances land: ``ARCHIVE/<Study>/<Series>/<SOP>.dcm``, atomically.

Each object arrives in ``ARCHIVE/.fetch/tmp/`` (pynetdicom streams a
C-STORE there; a WADO-RS part is written there), is checked with the node's
own header reader (it parses, its UIDs are valid, it is not cut short),
renamed into place and recorded in the journal; only then is it
acknowledged. A kill at any point (kill -9 included) leaves either no file
or the whole file under its final name; what is left in ``tmp/`` was never
acknowledged and is cleared at the next start.

Durability against a power cut is settled per study, not per instance: a
background thread fsyncs each file as it lands, and a study is recorded
``complete`` only after every one of its files and folders has been
fsynced (:meth:`Sink.sync`, which the runner calls off the retrieval
thread, so that the next study is already coming while the last one's
writes reach the disk). An fsync costs a file-system journal commit (about 12 ms here);
one per instance before its acknowledgement would hold the PACS back for
every small object, while an instance lost to a power cut before its study
is complete is simply fetched again (the PACS still has it).

The names are the node's (``echonode.studies.store``: ``studies/<Study>/<Series>/<SOP>.dcm``
under its storage), so ``echonode-train index`` and ``labels`` read a
fetched archive and the node's storage alike.
"""

from __future__ import annotations

import errno
import filecmp
import os
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from echonode.durable import fsync_dir, fsync_file
from echonode.ops.logs import get_logger
from echonode.studies.store import BadObject, Header, read_header

from .journal import FetchJournal, SopInOtherStudy
from .pacing import Clock

log = get_logger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600

STATUS_SUCCESS = 0x0000
#: Out of resources (disk full, I/O error): the PACS may try again later.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Not an instance of a study this fetch is retrieving.
STATUS_NOT_REQUESTED = 0xC001
#: The SOP Instance UID was fetched before under another study.
STATUS_SOP_IN_OTHER_STUDY = 0xC230


class Archive:
    """The archive folder: studies by UID, and ``.fetch/`` for fetch's own files.

    Parameters
    ----------
    root : path-like
        ``--out``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.meta = self.root / ".fetch"
        self.tmp = self.meta / "tmp"
        for d in (self.root, self.meta, self.tmp):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    @property
    def journal_path(self) -> Path:
        return self.meta / "journal.sqlite"

    @property
    def lock_path(self) -> Path:
        return self.meta / "lock"

    @property
    def log_path(self) -> Path:
        return self.meta / "fetch.log"

    def instance_path(self, header: Header) -> Path:
        return self.root / header.study_uid / header.series_uid / f"{header.sop_uid}.dcm"

    def clear_tmp(self) -> int:
        """Delete what a stopped run left in ``tmp/`` (never acknowledged); returns the count."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def place(self, temp_path: Path, header: Header, *, replace: bool = True) -> tuple[Path, str]:
        """Rename a checked temp file to its final name; ``"stored"``, ``"replaced"``, ``"same"`` or ``"kept"``.

        With ``replace`` False a file already there stays as it is
        (``"kept"``) and the temp file is deleted. Atomic against a kill;
        durable once :meth:`Sink.end` has synced the study.
        """
        dest = self.instance_path(header)
        if dest.exists():
            if filecmp.cmp(dest, temp_path, shallow=False):
                temp_path.unlink(missing_ok=True)
                return dest, "same"
            if not replace:
                temp_path.unlink(missing_ok=True)
                return dest, "kept"
            outcome = "replaced"
        else:
            outcome = "stored"
        # One level at a time: mkdir(parents=True) gives the parents the
        # default mode, and the study folder names a patient's study.
        dest.parent.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        dest.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(temp_path, FILE_MODE)
        os.replace(temp_path, dest)
        return dest, outcome


@dataclass
class InFlight:
    """What arrived for one study during one attempt."""

    study_uid: str
    attempt: int
    instances: int = 0
    bytes: int = 0
    refused: int = 0
    by_series: Counter = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)
    #: fsyncs of the files landed, running in the background
    syncs: list[Future] = field(default_factory=list)
    #: Why the study's files could not be made durable (None: they are).
    sync_error: str | None = None
    #: SOP Instance UID -> Series Instance UID of every instance landed in this attempt.
    landed: dict[str, str] = field(default_factory=dict)
    #: The SOP Instance UIDs refused in this attempt (each counted once in ``refused``).
    refused_sops: set[str] = field(default_factory=set)
    #: Set while a C-GET asks again in another encoding: a file already in
    #: the archive stays as it first came (a PACS that converts must not
    #: replace it with a converted copy), and an instance sent again that
    #: landed in this attempt is answered Success and counted in ``resent``.
    keep_landed: bool = False
    resent: int = 0

    def landed_in(self, series_uid: str | None) -> int:
        """Distinct instances landed in this attempt, of one series or (None) of the study."""
        if series_uid is None:
            return len(self.landed)
        return sum(1 for s in self.landed.values() if s == series_uid)


class Sink:
    """Lands instances of the studies in flight and records them.

    Parameters
    ----------
    archive : Archive
    journal : FetchJournal
    clock : Clock
        Times recorded in the journal.
    """

    def __init__(self, archive: Archive, journal: FetchJournal, clock: Clock) -> None:
        self.archive = archive
        self.journal = journal
        self.clock = clock
        self._lock = threading.Lock()
        self._flight: dict[str, InFlight] = {}
        self._syncer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch-fsync")
        #: Bytes landed by this run (all studies), for the progress bar.
        self.total_bytes = 0
        self.total_instances = 0

    def begin(self, study_uid: str, attempt: int) -> InFlight:
        with self._lock:
            flight = self._flight[study_uid] = InFlight(study_uid, attempt)
            return flight

    def end(self, study_uid: str) -> InFlight | None:
        """Stop taking the study's instances (their fsyncs may still be running: :meth:`sync`)."""
        with self._lock:
            return self._flight.pop(study_uid, None)

    def sync(self, flight: InFlight) -> None:
        """Wait until every file the study landed, and its folders, are on disk; failures set ``sync_error``."""
        try:
            for fut in flight.syncs:
                fut.result()
            study_dir = self.archive.root / flight.study_uid
            if study_dir.is_dir():
                for d in [*study_dir.iterdir(), study_dir, self.archive.root]:
                    if d.is_dir():
                        fsync_dir(d)
        except OSError as exc:
            flight.sync_error = f"cannot flush the study's files to disk ({exc.strerror or type(exc).__name__})"
            log.error("fetch.sync_failed", study_uid=flight.study_uid, error=type(exc).__name__)

    def close(self) -> None:
        self._syncer.shutdown(wait=True)

    def _flight_of(self, study_uid: str) -> InFlight | None:
        with self._lock:
            return self._flight.get(study_uid)

    def refuse(self, flight: InFlight | None, sop_uid: str | None, reason: str, status: int) -> int:
        """Count and record an instance that was not landed; returns ``status``."""
        study_uid = flight.study_uid if flight else None
        if flight is not None:
            with self._lock:
                if sop_uid is not None and sop_uid in flight.refused_sops:
                    return status  # the same instance again (a C-GET asking again): counted and recorded once
                if sop_uid is not None:
                    flight.refused_sops.add(sop_uid)
                flight.refused += 1
                flight.reasons.append(reason)
        self.journal.record_refused(study_uid, sop_uid, reason, self.clock.time(), flight.attempt if flight else None)
        log.warning("fetch.instance_refused", study_uid=study_uid, sop_uid=sop_uid, status=f"0x{status:04X}",
                    reason=reason)
        return status

    def accept(self, temp_path: Path, announced_sop: str | None = None, study_hint: str | None = None) -> int:
        """Check, land and record one received object; returns the DIMSE status to answer.

        Parameters
        ----------
        temp_path : Path
            The object as received (a Part 10 file in ``tmp/``). It is moved
            or deleted whatever happens.
        announced_sop : str, optional
            The SOP Instance UID the C-STORE request (or the query) named.
        study_hint : str, optional
            The study the transfer was asked for, to file a refusal under
            when the object itself cannot be read.
        """
        try:
            return self._accept(temp_path, announced_sop, study_hint)
        finally:
            temp_path.unlink(missing_ok=True)

    def _accept(self, temp_path: Path, announced_sop: str | None, study_hint: str | None) -> int:
        try:
            header = read_header(temp_path)
        except BadObject as exc:
            flight = self._flight_of(study_hint) if study_hint else self._only_flight()
            return self.refuse(flight, announced_sop, f"0x{exc.status:04X}: {exc}", exc.status)
        flight = self._flight_of(header.study_uid)
        if flight is None:
            return self.refuse(None, header.sop_uid, f"study {header.study_uid} is not being fetched",
                               STATUS_NOT_REQUESTED)
        if announced_sop and announced_sop != header.sop_uid:
            return self.refuse(flight, announced_sop, "SOP Instance UID of the data set differs from the request's",
                               0xA900)
        if flight.keep_landed and header.sop_uid in flight.landed:
            # Sent again in this attempt, though asked for in one encoding: the PACS converts.
            with self._lock:
                flight.resent += 1
            log.debug("fetch.instance_resent", study_uid=header.study_uid, sop_uid=header.sop_uid)
            return STATUS_SUCCESS
        try:
            known = self.journal.instance_study(header.sop_uid)
            if known is not None and known != header.study_uid:
                raise SopInOtherStudy(header.sop_uid)
            path, outcome = self.archive.place(temp_path, header, replace=not flight.keep_landed)
            size = path.stat().st_size
            self.journal.record_instance(header.study_uid, header.series_uid, header.sop_uid, size,
                                         self.clock.time(), flight.attempt)
        except SopInOtherStudy:
            return self.refuse(flight, header.sop_uid, "SOP Instance UID already fetched under another study",
                               STATUS_SOP_IN_OTHER_STUDY)
        except OSError as exc:
            what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"I/O error {exc.strerror or exc}"
            return self.refuse(flight, header.sop_uid, what, STATUS_OUT_OF_RESOURCES)
        sync = self._syncer.submit(fsync_file, path)
        with self._lock:
            flight.syncs.append(sync)
            flight.instances += 1
            flight.bytes += size
            flight.by_series[header.series_uid] += 1
            flight.landed[header.sop_uid] = header.series_uid
            self.total_bytes += size
            self.total_instances += 1
        log.debug("fetch.instance_landed", study_uid=header.study_uid, series_uid=header.series_uid,
                  sop_uid=header.sop_uid, bytes=size, outcome=outcome)
        return STATUS_SUCCESS

    def _only_flight(self) -> InFlight | None:
        """The study in flight when there is exactly one (to file an unreadable object under)."""
        with self._lock:
            return next(iter(self._flight.values())) if len(self._flight) == 1 else None
