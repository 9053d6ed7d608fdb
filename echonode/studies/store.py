"""The study store: where received objects live on disk, and how they get there atomically.

Layout under ``storage_dir``::

    incoming/                      temp files of transfers in flight (same file system)
    studies/<Study>/<Series>/<SOP>.dcm
    reports/<Study>/<SR SOP>.dcm   SRs built for delivery
    locks/NN.lock                  the per-study lock stripes (echonode.studies.locks)
    journal.sqlite

A received object is written to ``incoming/``, fsynced, renamed into place
(atomic on one file system), its folder fsynced, then recorded in the
journal; only then is the C-STORE acknowledged. After a crash, anything in
``incoming/`` is a transfer that was never acknowledged and is deleted; a
file in ``studies/`` that the journal lacks was renamed but not recorded
(hence not acknowledged either) and is recorded now rather than lost.

Repeated SOP Instance UID (the choice, documented in docs/operations.md):
identical bytes are a no-op success; different bytes replace the stored
copy (the newest wins, like dcmtk's storescp and Orthanc) and re-open the
study; the same SOP Instance UID under a *different* study is refused,
since it would silently move an image between patients.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import os
import re
import shutil
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import (
    _read_file_meta_info,
    data_element_generator,
    read_preamble,
)

from echonode.dicomfile import check_inflated_size
from echonode.durable import FILE_MODE, fsync_dir, move_into_place
from echonode.ops.logs import get_logger
from echonode.studies.connection import is_disk_full
from echonode.studies.journal import Journal
from echonode.studies.locks import StudyLocks
from echonode.studies.records import InstanceRecord, SopInOtherStudy

log = get_logger(__name__)

#: A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1). We do
#: not insist on the no-leading-zero rule (vendors break it) but nothing
#: else may reach a file name.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: A deflated data set may inflate to at most this (pydicom inflates the whole
#: data set in memory to read even its header: a few MB on the wire must not
#: become many GB in the node). An uncompressed 120-frame 480x640 RGB loop
#: is about 110 MB.
MAX_INFLATED_BYTES = 512 * 2**20

DIR_MODE = 0o700


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a UID safe to use as a file name."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


@dataclass(frozen=True)
class Header:
    """The identifying attributes of a received object."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str


class BadObject(ValueError):
    """A received object that cannot be stored; ``status`` is the DIMSE failure status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _sop_in_other_study() -> BadObject:
    """0xC230 for an SOP Instance UID the journal holds under another study.

    Storing it would move an image between patients, whether the other
    study's copy was recorded before the pre-check or by a concurrent
    association in between (the journal's transaction then refuses it).
    """
    return BadObject(0xC230, "SOPInstanceUID already stored under another study; refusing to move it")


def _clean_uid(value: object) -> str:
    # Vendors pad UIDs with NUL or spaces; pydicom usually strips, be sure.
    return str(value).strip("\x00 ") if value is not None else ""


def read_header(path: Path) -> Header:
    """Read and check the identifying attributes of the Part 10 file at ``path``.

    Raises
    ------
    BadObject
        0xC210 when the file does not parse, 0xC220 when a required UID is
        missing or malformed, 0xA900 when SOP Class/Instance in the file
        meta and the dataset disagree.
    """
    try:
        check_inflated_size(path, MAX_INFLATED_BYTES)
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
        )
        _check_complete(path)
        study = _clean_uid(ds.get("StudyInstanceUID"))
        series = _clean_uid(ds.get("SeriesInstanceUID"))
        sop = _clean_uid(ds.get("SOPInstanceUID"))
        sop_class = _clean_uid(ds.get("SOPClassUID"))
        meta = ds.file_meta
        tsyntax = _clean_uid(meta.get("TransferSyntaxUID"))
        meta_sop = _clean_uid(meta.get("MediaStorageSOPInstanceUID"))
        meta_class = _clean_uid(meta.get("MediaStorageSOPClassUID"))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, struct.error,
            NotImplementedError) as exc:  # NotImplementedError: pydicom's "Unknown Value Representation"
        raise BadObject(0xC210, f"cannot parse the data set: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        # pydicom raises a bare OSError (no errno) for a malformed sequence
        # item ("No tag to read"); a real I/O error carries an errno.
        if exc.errno is not None:
            raise
        raise BadObject(0xC210, f"cannot parse the data set: {type(exc).__name__}: {exc}") from None
    for name, value in (
        ("StudyInstanceUID", study),
        ("SeriesInstanceUID", series),
        ("SOPInstanceUID", sop),
        ("SOPClassUID", sop_class),
    ):
        if not value:
            raise BadObject(0xC220, f"{name} is missing")
        if not is_valid_uid(value):
            raise BadObject(0xC221, f"{name} is not a valid UID")
    if meta_sop and meta_sop != sop:
        raise BadObject(0xA900, "SOPInstanceUID in the data set differs from the C-STORE request's")
    if meta_class and meta_class != sop_class:
        # The stored file's meta header would name one class and its data set another.
        raise BadObject(0xA900, "SOPClassUID in the data set differs from the C-STORE request's")
    return Header(study, series, sop, sop_class, tsyntax)


def _check_complete(path: Path) -> None:
    """Raise ValueError/EOFError when the data set runs past the end of the file.

    A sender can declare a length it never sends (a truncated object that
    still arrives as a complete P-DATA stream). The walk reads element
    headers and small values only: large values (pixel data) are skipped by
    seeking, so memory stays flat whatever the object's size.
    """
    size = path.stat().st_size
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        tsyntax = meta.get("TransferSyntaxUID")
        if tsyntax is None or tsyntax.is_deflated or not tsyntax.is_transfer_syntax:
            return
        # Every element is read; only the last one is looked at.
        tail = deque(data_element_generator(fp, tsyntax.is_implicit_VR, tsyntax.is_little_endian, defer_size=4096),
                     maxlen=1)
    last = tail[0] if tail else None
    if last is None:
        raise ValueError("the data set is empty")
    # A sequence of undefined length comes back parsed (a DataElement, no
    # length): read to its delimiter, so within the file. GE ends objects
    # with one (private raw data in 7FE1, after the pixel data).
    if isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF and last.value_tell + last.length > size:
        raise ValueError(f"element {last.tag} declares {last.length} bytes but the file ends first")


def _link_aside(path: Path) -> Path | None:
    """A hard link to ``path`` beside it (``.prev``), or None when none can be made."""
    link = path.with_name(path.name + ".prev")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
    except OSError as exc:
        log.warning("store.previous_copy_not_kept", sop_uid=path.stem, error=exc.strerror)
        return None
    return link


class StudyStore:
    """The folder tree of received objects and reports.

    Parameters
    ----------
    root : path-like
        ``storage_dir``.
    journal : Journal
        Where instances are recorded.
    """

    def __init__(self, root: str | os.PathLike[str], journal: Journal) -> None:
        self.root = Path(root)
        self.journal = journal
        self.incoming = self.root / "incoming"
        self.studies = self.root / "studies"
        self.reports = self.root / "reports"
        for d in (self.root, self.incoming, self.studies, self.reports):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # Striped per-study locks: accept (move + record) and retention
        # (forget + delete) of one study never interleave, in any of the
        # node's processes, while receives of different studies (almost
        # always) proceed in parallel.
        self.locks = StudyLocks(self.root / "locks")

    def study_lock(self, study_uid: str) -> AbstractContextManager[None]:
        """The lock that serialises changes to ``study_uid``'s files and rows (``with store.study_lock(uid):``)."""
        return self.locks.hold(study_uid)

    # -- paths -------------------------------------------------------------------

    def instance_path(self, header: Header) -> Path:
        return self.studies / header.study_uid / header.series_uid / f"{header.sop_uid}.dcm"

    def report_path(self, study_uid: str, sop_uid: str) -> Path:
        if not (is_valid_uid(study_uid) and is_valid_uid(sop_uid)):
            raise ValueError("Arguments \"study_uid\" and \"sop_uid\" must be valid UIDs.")
        return self.reports / study_uid / f"{sop_uid}.dcm"

    def _mkdirs(self, path: Path) -> None:
        created = []
        p = path
        while not p.exists():
            created.append(p)
            p = p.parent
        for d in reversed(created):
            try:
                d.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue
            fsync_dir(d.parent)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- receiving -----------------------------------------------------------------

    def accept(
        self, temp_path: Path, calling_ae: str | None, association: str | None = None
    ) -> tuple[Header, str]:
        """Move a fully received temp file into the store and record it.

        Returns the header and what happened: ``"stored"``, ``"duplicate"``
        (identical copy already stored) or ``"replaced"``. ``association``
        is the SCP's key for the association that brought it
        (:meth:`~echonode.studies.journal.Journal.record_instance`).

        Raises
        ------
        BadObject
            When the object is unparseable, lacks a UID, or reuses an SOP
            Instance UID of another study. The temp file is left for the
            caller to remove.
        """
        header = read_header(temp_path)
        with self.study_lock(header.study_uid):
            return self._accept_locked(temp_path, header, calling_ae, association)

    def _accept_locked(
        self, temp_path: Path, header: Header, calling_ae: str | None, association: str | None = None
    ) -> tuple[Header, str]:
        existing = self.journal.get_instance(header.sop_uid)
        outcome = "stored"
        if existing is not None:
            if existing.study_uid != header.study_uid:
                raise _sop_in_other_study()
            old = Path(existing.path)
            if old.exists() and filecmp.cmp(old, temp_path, shallow=False):
                return header, "duplicate"
            outcome = "replaced"
        dest = self.instance_path(header)
        self._mkdirs(dest.parent)
        # A recorded copy this object replaces in place is kept (a hard
        # link: no room needed) until the journal points at the new bytes.
        in_place = existing is not None and Path(existing.path) == dest and dest.exists()
        previous = _link_aside(dest) if in_place else None
        try:
            move_into_place(temp_path, dest)
            self._record(header, dest, time.time(), calling_ae, association)
        except BaseException as exc:
            # The sender is told the object was not stored: nothing of it
            # may stay, or the next start would record (and analyse) it.
            self._undo_placement(dest, previous, replaced_in_place=in_place)
            if isinstance(exc, SopInOtherStudy):
                # Another association stored this SOP Instance UID under another
                # study since the check above (the per-study lock cannot see it).
                raise _sop_in_other_study() from None
            if isinstance(exc, sqlite3.Error) and is_disk_full(exc):
                # One error for a full disk, whether the file or the journal found it.
                raise OSError(errno.ENOSPC, "no room to record the object in the journal") from exc
            raise
        if previous is not None:
            previous.unlink(missing_ok=True)
        if existing is not None and Path(existing.path) != dest:
            # Same instance, new series: the old copy goes only once the
            # journal points at the new one, so a crash in between leaves
            # the recorded copy in place (recover() drops the other).
            Path(existing.path).unlink(missing_ok=True)
        return header, outcome

    def _undo_placement(self, dest: Path, previous: Path | None, *, replaced_in_place: bool) -> None:
        """Take back an object moved to ``dest`` whose C-STORE is answered with a failure.

        Parameters
        ----------
        dest : Path
            Where it was (or was about to be) moved.
        previous : Path or None
            The hard link to the recorded copy it replaced in place.
        replaced_in_place : bool
            ``dest`` held a recorded copy before this C-STORE: that copy
            is put back, never deleted.
        """
        try:
            if previous is not None:
                os.replace(previous, dest)
                fsync_dir(dest.parent)
            elif replaced_in_place:
                # No link could be made: the recorded copy is gone. The new
                # bytes stay (the newest copy wins, as for a replacement);
                # deleting them would lose the instance.
                log.warning("store.replacement_kept", sop_uid=dest.stem)
            else:
                dest.unlink(missing_ok=True)
                # Folders made for it alone; one that holds anything else stays.
                for folder in (dest.parent, dest.parent.parent):
                    with contextlib.suppress(OSError):
                        folder.rmdir()
        except OSError as exc:
            log.error("store.undo_failed", sop_uid=dest.stem, error=exc.strerror)

    def record_file(self, header: Header, path: Path, received: float) -> None:
        """Record a file already in its place in ``studies/`` (recovery and ``echonode recover-journal``).

        Raises
        ------
        SopInOtherStudy
            When the journal holds the SOP Instance UID under another study.
        """
        self._record(header, path, received, None)

    def _record(
        self, header: Header, path: Path, received: float, calling_ae: str | None, association: str | None = None
    ) -> None:
        self.journal.record_instance(
            InstanceRecord(
                sop_uid=header.sop_uid,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                sop_class_uid=header.sop_class_uid,
                transfer_syntax=header.transfer_syntax,
                path=str(path),
                size=path.stat().st_size,
                received=received,
                calling_ae=calling_ae,
            ),
            association,
        )

    # -- recovery --------------------------------------------------------------------

    def _stored_files(self) -> Iterator[Path]:
        yield from self.studies.glob("*/*/*.dcm")

    def recover(self) -> dict[str, int]:
        """Make disk and journal agree after any stop, kill -9 included.

        - temp files in ``incoming/`` (never acknowledged) are deleted;
        - files in ``studies/`` missing from the journal are recorded
          (renamed but not recorded before the crash);
        - journal rows whose file is gone are removed, with a warning.

        Returns counts of each action.
        """
        counts = {"temp_removed": 0, "recorded": 0, "forgotten": 0}
        for p in self.incoming.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                counts["temp_removed"] += 1
        known = {rec.path: rec for rec in self.journal.instances()}
        for path in self._stored_files():
            if str(path) in known:
                continue
            try:
                header = read_header(path)
            except BadObject as exc:
                log.warning("recover.unreadable_file_removed", path=str(path), error=str(exc))
                path.unlink(missing_ok=True)
                continue
            if self.instance_path(header) != path:
                log.warning("recover.misplaced_file_removed", path=str(path))
                path.unlink(missing_ok=True)
                continue
            current = self.journal.get_instance(header.sop_uid)
            if current is not None and current.path != str(path) and Path(current.path).exists():
                # The copy a replacement superseded (crash before its unlink).
                log.info("recover.superseded_copy_removed", sop_uid=header.sop_uid)
                path.unlink(missing_ok=True)
                continue
            try:
                self._record(header, path, path.stat().st_mtime, None)
            except SopInOtherStudy:
                log.warning("recover.sop_in_other_study_removed", sop_uid=header.sop_uid)
                path.unlink(missing_ok=True)
                continue
            counts["recorded"] += 1
        # ``.prev``: a replaced copy kept while its replacement was recorded
        # (a crash in between); the newest copy wins, as for a replacement.
        for part in [*self.studies.glob("*/*/*.part"), *self.studies.glob("*/*/*.prev"),
                     *self.reports.glob("*/*.part")]:
            part.unlink(missing_ok=True)
            counts["temp_removed"] += 1
        for path_str, rec in known.items():
            if not Path(path_str).exists():
                log.warning("recover.missing_file", sop_uid=rec.sop_uid, study_uid=rec.study_uid)
                self.journal.forget_instance(rec.sop_uid, path_str)
                counts["forgotten"] += 1
        return counts

    def remove_study(self, study_uid: str) -> int:
        """Delete a study's files (retention); returns bytes freed."""
        if not is_valid_uid(study_uid):
            raise ValueError("Argument \"study_uid\" must be a valid UID.")
        freed = 0
        for base in (self.studies / study_uid, self.reports / study_uid):
            if base.exists():
                for f in base.rglob("*"):
                    if f.is_file():
                        freed += f.stat().st_size
                shutil.rmtree(base)
        return freed


#: ``storage_dir``'s file the worker sets aside for a full disk (:class:`SpaceReserve`).
RESERVE_NAME = "space.reserve"
#: Enough for the journal to record many state changes (a few pages each)
#: and to grow its WAL index once; small beside any storage volume.
RESERVE_BYTES = 4 * 2**20


class SpaceReserve:
    """Room set aside on the storage file system, given back when it fills up.

    When the disk is full, the write that says so (a study back to the
    queue) needs room too; giving up the reserve makes that room. Setting it
    aside again succeeds only once the file system has room, which is how
    the worker tells that it may claim studies again.

    Parameters
    ----------
    path : path-like
        The reserve file (``storage_dir / RESERVE_NAME``).
    size : int, optional
        Bytes to set aside.
    """

    def __init__(self, path: str | os.PathLike[str], size: int = RESERVE_BYTES) -> None:
        self.path = Path(path)
        self.size = size

    def restore(self) -> bool:
        """Set the room aside unless it is already.

        Returns
        -------
        bool
            False when the file system (or a quota) has no room for it; True
            when it is set aside, and also when it cannot be for another
            reason (logged: the worker must not stop for want of a reserve).
        """
        try:
            if self.path.stat().st_size >= self.size:
                return True
        except FileNotFoundError:
            pass
        tmp = self.path.with_name(self.path.name + ".part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                # Real blocks, not a sparse file: only those are room.
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            log.warning("store.reserve_not_set_aside", path=str(self.path), error=exc.strerror)
        return True

    def free_bytes(self) -> int:
        """Free bytes on the reserve's file system (beyond the reserve itself)."""
        return shutil.disk_usage(self.path.parent).free

    def release(self) -> bool:
        """Give the room back to the file system.

        Returns
        -------
        bool
            True when a reserve was there to give.
        """
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
