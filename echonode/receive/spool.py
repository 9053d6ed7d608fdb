"""The files pynetdicom spools received data sets into: tracked per association, write errors contained.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming C-STORE
data set into a ``NamedTemporaryFile(delete=False)`` in ``incoming/`` and
removes it after the C-STORE handler has run. It forgets a file it opened
when the association ends before the data set does, and when the peer
starts a new message in the middle of a data set (the message object that
held the file is reused for the next one). A write error (disk full) is
raised in its reader thread, which dies of it: the association hangs up
with a raw traceback on stderr and the file stays.

:func:`install` routes pynetdicom's spool files through :class:`SpoolFile`
for associations that :func:`track` was called for:

- each file is recorded in the association's :class:`SpoolTracker`, so
  :meth:`SpoolTracker.discard_leftovers` can remove whatever is left when
  the association has ended, whatever the reason;
- a write error is kept on the file instead of raised: the rest of the data
  set is read and dropped, the space already written is given back, and
  the C-STORE handler, finding :attr:`SpoolFile.error`, answers 0xA700.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages
from pynetdicom.association import Association

#: Makes the file behind a spool file (a seam for tests that fill the disk).
_new_temp_file = tempfile.NamedTemporaryFile

_trackers: weakref.WeakKeyDictionary[Association, SpoolTracker] = weakref.WeakKeyDictionary()
_trackers_lock = threading.Lock()


class SpoolFile:
    """A spool file that records its first write error instead of raising it.

    Offers what pynetdicom and pydicom use of a ``NamedTemporaryFile``:
    ``name``, ``write``, ``file.flush``, ``close``.
    """

    def __init__(self, file: Any | None, name: str, sop_uid: str, error: OSError | None = None) -> None:
        self._file = file
        self.name = name
        #: The SOP Instance UID its C-STORE request named.
        self.sop_uid = sop_uid
        #: The first error writing it; once set, what arrives is dropped.
        self.error = error
        #: Its C-STORE handler has run, whatever status it returned (the peer may
        #: still have had no response, if the association ended meanwhile).
        self.handled = False

    @property
    def file(self) -> SpoolFile:
        # pynetdicom flushes through NamedTemporaryFile's ``.file``.
        return self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is None and self._file is not None:
            try:
                return int(self._file.write(data))
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None and self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.close()
        except OSError as exc:
            # Closing flushes what is buffered; the descriptor is closed regardless.
            if self.error is None:
                self.error = exc

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        # Give the space back at once: on a full disk every byte counts, and
        # nothing written so far will be used.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.ftruncate(self._file.fileno(), 0)  # type: ignore[union-attr]  # None: AttributeError, suppressed


class SpoolTracker:
    """The spool files opened for one association, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: list[SpoolFile] = []
        self._lock = threading.Lock()

    def add(self, spool: SpoolFile) -> None:
        with self._lock:
            self.files.append(spool)

    def remove(self, spool: SpoolFile) -> None:
        """Stop tracking ``spool`` (its data set was handled)."""
        with self._lock, contextlib.suppress(ValueError):
            self.files.remove(spool)

    def discard_leftovers(self) -> tuple[list[tuple[SpoolFile, int]], list[tuple[SpoolFile, OSError]]]:
        """Close and delete every spool file still on disk.

        Call it once the association's thread has ended: a file still there
        then belongs to a data set that was never acknowledged (pynetdicom
        deletes a file after its handler, which moves a stored one away), or
        to one whose handler refused it and whose deletion then failed
        (:attr:`SpoolFile.handled`). One file that cannot be deleted stops
        none of the others.

        Returns
        -------
        removed : list of (SpoolFile, int)
            Each file deleted, with its size in bytes.
        not_removed : list of (SpoolFile, OSError)
            Each file still there, with the error deleting it.
        """
        with self._lock:
            files, self.files = self.files, []
        removed: list[tuple[SpoolFile, int]] = []
        not_removed: list[tuple[SpoolFile, OSError]] = []
        for spool in files:
            spool.close()
            path = Path(spool.name)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                not_removed.append((spool, exc))
                continue
            removed.append((spool, size))
        return removed, not_removed


def track(assoc: Association, directory: Path) -> SpoolTracker:
    """Spool the data sets of ``assoc`` into ``directory`` and record each file (call before its first C-STORE)."""
    tracker = SpoolTracker(directory)
    with _trackers_lock:
        _trackers[assoc] = tracker
    return tracker


def tracker_of(assoc: Association) -> SpoolTracker | None:
    with _trackers_lock:
        return _trackers.get(assoc)


def release(assoc: Association, request: Any) -> None:
    """Close, delete and forget the spool file of a C-STORE ``request`` (call at its handler's end).

    pynetdicom closes and deletes the file itself after the handler of a
    C-STORE on an association the peer opened, but not after one that
    arrives on an association we opened (a C-GET's): there each file would
    stay open for as long as the association lasts. On either, the tracker
    would keep a record of every data set the association carried. Deleting
    the name is harmless when the handler moved the file away, and
    pynetdicom's own delete afterwards finds nothing and says nothing.

    A file that cannot be deleted (its data set was refused, so it is still
    there) stays tracked: :meth:`SpoolTracker.discard_leftovers` tries again
    once the association has ended and reports it if it fails again, so no
    file is left behind without a log line.
    """
    spool = getattr(request, "_dataset_file", None)
    if not isinstance(spool, SpoolFile):
        return
    spool.handled = True
    spool.close()
    try:
        Path(spool.name).unlink(missing_ok=True)
    except OSError:
        return
    tracker = tracker_of(assoc)
    if tracker is not None:
        tracker.remove(spool)


def failure(request: Any) -> OSError | None:
    """The error that interrupted spooling the data set of a C-STORE ``request``, if any."""
    spool = getattr(request, "_dataset_file", None)
    return spool.error if isinstance(spool, SpoolFile) else None


def _open_spool(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` in pynetdicom's message decoder.

    Runs in the association's reader thread (pynetdicom's DUL), which leads
    to the association and to the message whose data set is starting.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    tracker = tracker_of(assoc) if isinstance(assoc, Association) else None
    if tracker is None:
        return _new_temp_file(*args, **kwargs)
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    sop_uid = str(getattr(getattr(message, "command_set", None), "AffectedSOPInstanceUID", "") or "")
    # The store's incoming/ (the same file system, so accepting is a rename).
    kwargs["dir"] = str(tracker.directory)
    try:
        f = _new_temp_file(*args, **kwargs)
        spool = SpoolFile(f, f.name, sop_uid)
    except OSError as exc:
        # Not even the file could be made (no inode left, no permission):
        # a name that does not exist, and the error for the handler.
        name = str(tracker.directory / f"unopened-{uuid.uuid4().hex}.dcm")
        spool = SpoolFile(None, name, sop_uid, exc)
    tracker.add(spool)
    return spool


def install() -> None:
    """Route pynetdicom's spool files through :func:`_open_spool` (idempotent)."""
    dimse_messages.NamedTemporaryFile = _open_spool
