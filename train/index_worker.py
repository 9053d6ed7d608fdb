"""What an index worker does with one file of an archive: read its header,
decide whether it belongs to this shard, decode and preprocess it, and write
its frames.

Workers run in a process pool (:func:`examined_in_order`) and share nothing
with the parent but the cache folder. A worker writes the frames of each
video it decodes to a temporary ``.npy`` beside the video's final place; the
parent, which alone decides what the manifest holds (in the archive's path
order, so that the result does not depend on the number of workers), renames
it into place or deletes it. Nothing here imports torch: a worker starts in
well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from echonode.analyse.decode import (
    DEFAULT_MAX_DECODED_BYTES,
    DecodeOptions,
    UnusableObject,
)
from echonode.analyse.preprocess import PreprocessConfig, preprocess_file
from echonode.dicomfile import InflatesTooLarge
from echonode.header import read_header
from train.splits import patient_key

if TYPE_CHECKING:
    from pydicom.dataset import Dataset as DicomDataset

__all__ = ["Examined", "Examiner", "Shard", "Task", "examined_in_order", "safe_name", "stamp"]

#: A deflated data set inflating past this is refused before pydicom reads it
#: (the decoder's own limit).
_MAX_INFLATED_BYTES = DEFAULT_MAX_DECODED_BYTES
#: Media Storage Directory Storage: a DICOMDIR indexes the media, holds no image.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: forkserver where the platform has it (workers fork from a clean process
#: that has imported this module once), spawn elsewhere; never fork, which
#: would copy a parent's threads and locks (tqdm's, a test runner's).
_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"

# What a file turned out to be (Examined.kind).
NOT_DICOM = "not-dicom"
UNREADABLE = "unreadable"  # DICOM, but no SOP Instance UID to file it under
ELSEWHERE = "elsewhere"  # another shard's
KNOWN = "known"  # header read, not decoded: its size and time match a cached video's
REFUSED = "refused"  # the decoder refused it
VIDEO = "video"


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` disjoint parts of one archive (``--shard I/N``).

    A study's part is a hash of its Study Instance UID, not of where its
    files lie or in which order they are found, so every machine of an
    array job agrees on it without talking to the others, and the parts
    together hold what one unsharded index holds.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index}/{self.count}: want I/N with 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` as a :class:`Shard`.

        Raises
        ------
        ValueError
            With a message that shows the expected form.
        """
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"--shard {text!r}: want I/N, e.g. 0/4 for the first of four parts")
        return cls(int(index), int(count))

    def holds(self, key: str) -> bool:
        """Whether the study (or file) ``key`` falls in this part."""
        digest = hashlib.sha256(f"echonode-shard\0{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def as_dict(self) -> dict[str, int]:
        """What the manifest records."""
        return {"index": self.index, "count": self.count}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def stamp(size: int, mtime_ns: int) -> int:
    """A 64-bit fingerprint of a file's size and modification time."""
    digest = hashlib.blake2b(f"{size}:{mtime_ns}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def safe_name(uid: str) -> str:
    """A file name for a UID (UIDs are digits and dots; anything else is hashed)."""
    if uid and all(c.isdigit() or c == "." for c in uid) and len(uid) <= 64:
        return uid
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Task:
    """One file to examine, with the size and time the parent saw."""

    path: str
    rel: str
    bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class Examined:
    """What a worker found in one file (no raw patient data: a key at most).

    ``tmp`` names the temporary ``.npy`` holding a decoded video's frames;
    the parent renames it into place or calls :meth:`discard`.
    """

    kind: str
    sop_uid: str = ""
    reason: str = ""
    study_uid: str = ""
    series_uid: str = ""
    #: :func:`train.splits.patient_key` of the header's PatientID; "" when it has none.
    patient_key: str = ""
    frames: int = 0
    fps: float = 0.0
    size: int = 0
    tmp: str = ""

    def discard(self) -> None:
        """Delete the frames written for a video the parent does not keep."""
        if self.tmp:
            Path(self.tmp).unlink(missing_ok=True)


class Examiner:
    """Reads, shards and decodes files for one index run (picklable: sent to each worker once).

    Parameters
    ----------
    videos_dir : Path
        ``CACHE/videos``, where frames are written.
    cfg : PreprocessConfig
    shard : Shard or None
        None for the whole archive.
    known : numpy.ndarray
        Sorted :func:`stamp` values of the cached videos: a file whose stamp
        is among them may be a cached video under a new path, and is not
        decoded until the parent has checked (a false match costs one decode
        in the parent, never a wrong record).
    """

    def __init__(self, videos_dir: Path, cfg: PreprocessConfig, shard: Shard | None, known: np.ndarray) -> None:
        self.videos_dir = Path(videos_dir)
        self.cfg = cfg
        self.shard = shard
        self.known = np.asarray(known, dtype=np.int64)

    def _mine(self, task: Task, study_uid: str) -> bool:
        # A file without a study (its header does not parse) goes by its path.
        return self.shard is None or self.shard.holds(study_uid or f"path:{task.rel}")

    def _maybe_known(self, task: Task) -> bool:
        key = stamp(task.bytes, task.mtime_ns)
        at = int(np.searchsorted(self.known, key))
        return at < len(self.known) and int(self.known[at]) == key

    def __call__(self, task: Task, *, decode_known: bool = False) -> Examined:
        """Examine one file; with ``decode_known``, decode it even if it may be cached."""
        path = Path(task.path)
        try:
            header = _read_header(path)
        except _NotDicom:
            return Examined(NOT_DICOM)
        except UnusableObject as exc:
            return Examined(UNREADABLE, reason=exc.reason) if self._mine(task, "") else Examined(ELSEWHERE)
        sop_uid = str(header.get("SOPInstanceUID", "") or "")
        if not self._mine(task, str(header.get("StudyInstanceUID", "") or "")):
            return Examined(ELSEWHERE, sop_uid=sop_uid)
        if not sop_uid:
            return Examined(UNREADABLE, reason=_no_sop_reason(header))
        raw_patient = str(getattr(header, "PatientID", "") or "")
        key = patient_key(raw_patient) if raw_patient else ""
        if not decode_known and self._maybe_known(task):
            return Examined(KNOWN, sop_uid=sop_uid, patient_key=key)
        try:
            # One decoding thread: the workers are the parallelism.
            decoded, frames = preprocess_file(path, self.cfg, DecodeOptions(threads=1))
        except UnusableObject as exc:
            return Examined(REFUSED, sop_uid=sop_uid, reason=exc.reason)
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        return Examined(
            VIDEO, sop_uid, study_uid=decoded.study_uid, series_uid=decoded.series_uid, patient_key=key,
            frames=int(frames.shape[0]), fps=float(decoded.fps), size=int(frames.shape[1]),
            tmp=str(_save_tmp(self.videos_dir, sop_uid, frames)),
        )  # fmt: skip


def _save_tmp(videos_dir: Path, sop_uid: str, frames: np.ndarray) -> Path:
    """Frames into ``videos/.<name>.<random>.npy`` (a name a later run clears if this one dies)."""
    fd, tmp = tempfile.mkstemp(dir=videos_dir, prefix=f".{safe_name(sop_uid)}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, frames)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _no_sop_reason(header: DicomDataset) -> str:
    meta = getattr(header, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        return "a DICOMDIR (the media's index of its files), not an image"
    if len(header) == 0:  # cut short inside the file meta: pydicom does not warn
        return "no data set after the file meta header (file truncated?)"
    return "no SOP Instance UID"


_EXAMINER: Examiner | None = None


def _init_worker(examiner: Examiner) -> None:
    global _EXAMINER
    # Ctrl-C is the parent's to handle: it saves the manifest and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    _EXAMINER = examiner


def _examine_in_worker(task: Task) -> Examined:
    assert _EXAMINER is not None, "worker not initialised"
    return _EXAMINER(task)


@contextlib.contextmanager
def examined_in_order(examiner: Examiner, tasks: Iterable[Task], workers: int) -> Iterator[Iterator[Examined]]:
    """Examine ``tasks`` on ``workers`` processes; yield the results in the tasks' order.

    One worker examines in this process (no pool, nothing to start). The
    workers run ahead of the consumer; on an error or Ctrl-C in the
    consumer the pool is stopped (frames it was writing stay as temporary
    files, which the next run clears).
    """
    if workers <= 1:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            yield (examiner(task) for task in tasks)
        finally:
            cv2.setNumThreads(threads)
        return
    ctx = multiprocessing.get_context(_START_METHOD)
    if _START_METHOD == "forkserver":
        ctx.set_forkserver_preload([__name__])
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(examiner,))
    try:
        yield pool.imap(_examine_in_worker, tasks, chunksize=1)
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


class _NotDicom(Exception):
    """The file is not DICOM at all: ignored, not listed."""


def _looks_like_bare_dicom(path: Path) -> bool:
    """Whether a file pydicom refused as Part 10 is DICOM all the same.

    Two shapes occur in exports: ``DICM`` and the file meta without the
    128-byte preamble, and a bare dataset (no preamble, no file meta) that
    starts at group 0002 or 0008 and names its SOP class and instance. Only
    files that start like one are parsed with ``force=True``, which reads
    anything (a JPEG too) as a few garbage elements.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    if head == b"DICM":
        return True
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):  # little-endian group 0002 or 0008
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return bool(ds.get("SOPClassUID")) and bool(ds.get("SOPInstanceUID"))
    except Exception:  # noqa: BLE001 - a forced read of a non-DICOM file raises anything
        return False


def _read_header(path: Path) -> DicomDataset:
    """The header (no pixel data) of a DICOM Part 10 file.

    Raises
    ------
    _NotDicom
        If the file is not DICOM.
    UnusableObject
        If it is DICOM the node cannot read (no Part 10 header, cut short,
        a header that does not parse, a file that cannot be opened). The
        reason never quotes data from the file: a parse error can hold a
        patient's name or birth date.
    """
    try:
        # The node's bounded read: a large element (a cart's private raw
        # data) is left unread. It first runs the decoder's guard against a
        # deflate bomb (pydicom inflates a deflated data set whole, pixels or
        # not). A header cut short is found by the decode that follows
        # (where reading stopped against the file's size), not here.
        header = read_header(path, max_inflated_bytes=_MAX_INFLATED_BYTES).dataset
    except InflatesTooLarge as exc:
        raise UnusableObject(str(exc)) from exc
    except InvalidDicomError as exc:
        if _looks_like_bare_dicom(path):
            raise UnusableObject(
                "DICOM without the 128-byte preamble and 'DICM' file header; the node reads Part 10 "
                "files only: export with the DICOM file meta header"
            ) from exc
        raise _NotDicom(str(exc)) from exc
    except OSError as exc:
        raise UnusableObject(f"cannot read the file ({exc.strerror or type(exc).__name__})") from exc
    except Exception as exc:  # pydicom raises many types for a broken header
        raise UnusableObject(f"DICOM header does not parse ({type(exc).__name__})") from exc
    return header

