"""``echonode-train index``: an archive of DICOM files into a clip cache.

Cache layout::

    CACHE/manifest.json          what is cached, how, and what was refused
    CACHE/videos/<sop_uid>.npy   (T, S, S) uint8 frames of one video

Each usable video is decoded and preprocessed once, by the node's own code
(:func:`echonode.analyse.preprocess.preprocess_file`), so training sees exactly the
pixels the node will see at inference. One ``.npy`` per video keeps the
cache incremental (a new study adds files, nothing is rewritten).
Reading the cache is :mod:`train.cache`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from echonode.analyse.decode import (
    DEFAULT_MAX_DECODED_BYTES,
    DecodedVideo,
    UnusableObject,
)
from echonode.analyse.preprocess import PreprocessConfig, preprocess_file
from echonode.dicomfile import InflatesTooLarge
from echonode.header import read_header
from train.cache import MANIFEST, MANIFEST_VERSION, _study_patient_keys, load_manifest
from train.splits import patient_key

if TYPE_CHECKING:
    from pydicom.dataset import Dataset as DicomDataset

__all__ = ["IndexReport", "add_index_arguments", "build_index", "run_index"]

#: Files in an archive that are data about the archive, not DICOM objects.
_SIDECAR_SUFFIXES = {".csv", ".json", ".txt", ".md", ".toml", ".log", ".npy", ".png"}



@dataclass
class IndexReport:
    """What :func:`build_index` did.

    Attributes
    ----------
    cached : int
        Videos in the cache after the run.
    added : int
        Videos preprocessed by this run.
    reused : int
        Files skipped because the cache already had them unchanged (videos
        and listed objects alike).
    unusable : int
        Objects refused (listed with reasons in the manifest).
    not_dicom : int
        Files that are not DICOM (ignored, not listed).
    duplicates : int
        Files refused because an earlier file of the archive (in path order)
        has the same SOP Instance UID; listed, with the path that was kept.
    missing : int
        Cached videos whose file is no longer in the archive (kept, as
        ``prune`` was not asked for).
    removed : int
        Cached videos dropped by ``prune`` because their file is gone.
    patient_conflicts : int
        Studies whose videos name more than one patient (their patients are
        kept on one side of every split; see :meth:`ClipCache.study_patient`).
    manifest : str
        Path of the manifest.
    seconds : float
        Wall time.
    """

    cached: int = 0
    added: int = 0
    reused: int = 0
    unusable: int = 0
    not_dicom: int = 0
    duplicates: int = 0
    missing: int = 0
    removed: int = 0
    patient_conflicts: int = 0
    manifest: str = ""
    seconds: float = 0.0


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_videos_csv(path: Path | None) -> dict[str, dict[str, str]]:
    """``sop_uid -> row`` of a ``videos.csv`` (view and patient per video)."""
    if path is None or not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["sop_uid"]: row for row in csv.DictReader(fh) if row.get("sop_uid")}


def _safe_name(uid: str) -> str:
    """A file name for a UID (UIDs are digits and dots; anything else is hashed)."""
    if uid and all(c.isdigit() or c == "." for c in uid) and len(uid) <= 64:
        return uid
    return hashlib.sha256(uid.encode()).hexdigest()[:32]



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
    import pydicom

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
    from pydicom.errors import InvalidDicomError

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


#: A deflated data set inflating past this is refused before pydicom reads it
#: (the decoder's own limit).
_MAX_INFLATED_BYTES = DEFAULT_MAX_DECODED_BYTES

#: Media Storage Directory Storage: a DICOMDIR indexes the media, holds no image.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Records changed between two saves of the manifest during a run.
_SAVE_EVERY = 200


class _IndexRun:
    """One pass of :func:`build_index` over an archive, against the manifest
    of the previous passes.

    Every file path holds at most one record: a video (``videos``, by SOP
    Instance UID) or a listing (``unusable``, by path). A SOP Instance UID is
    *claimed* by the first path in scan order that gives it as a usable video;
    later paths with the same UID are listed as duplicates of that path, so
    that two copies neither both decode on every run nor take turns.
    """

    def __init__(
        self,
        archive: Path,
        cache: Path,
        manifest: dict,
        cfg: PreprocessConfig,
        video_rows: Mapping[str, Mapping[str, str]],
        report: IndexReport,
    ) -> None:
        self.archive = archive
        self.cache = cache
        self.manifest = manifest
        self.cfg = cfg
        self.video_rows = video_rows
        self.report = report
        self.videos: dict[str, dict] = {v["sop_uid"]: v for v in manifest["videos"]}
        self.unusable: dict[str, dict] = {u["source"]["path"]: u for u in manifest["unusable"]}
        self.by_path: dict[str, dict] = {v["source"]["path"]: v for v in self.videos.values()}
        self.claimed: dict[str, str] = {}  # SOP Instance UID -> the path that gives it, this run
        self.listed: set[str] = set()  # paths listed as unusable, this run
        # .npy files of dropped videos: deleted only once a saved manifest no
        # longer names them, so that the cache on disk stays readable.
        self.doomed: set[str] = set()
        self.changes = 0

    def visit(self, path: Path) -> None:
        """Bring the record of one file of the archive up to date."""
        rel = str(path.relative_to(self.archive))
        try:
            st = path.stat()
        except OSError as exc:  # gone since the scan, or a dangling link
            self._list(rel, {"path": rel, "bytes": 0, "mtime_ns": 0}, "", f"cannot read the file ({exc.strerror})")
            return
        source = {"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

        def unchanged(record: Mapping) -> bool:
            return record["source"]["bytes"] == st.st_size and record["source"]["mtime_ns"] == st.st_mtime_ns

        video = self.by_path.get(rel)
        fresh = video is not None and video["source"]["path"] == rel and unchanged(video)
        if fresh and video["sop_uid"] not in self.claimed:
            self.claimed[video["sop_uid"]] = rel
            self.report.reused += 1
            return
        listing = self.unusable.get(rel)
        if listing is not None and unchanged(listing):
            kept = listing.get("duplicate_of")
            # A duplicate stays one only while its UID is still given by the path it names.
            if kept is None or self.claimed.get(listing["sop_uid"]) == kept:
                self.listed.add(rel)
                self.report.reused += 1
                if kept is not None:
                    self.report.duplicates += 1
                return

        try:
            header = _read_header(path)
        except _NotDicom:
            self._forget_video_at(rel)
            self.unusable.pop(rel, None)
            self.report.not_dicom += 1
            return
        except UnusableObject as exc:
            self._forget_video_at(rel)
            self._list(rel, source, "", exc.reason)
            return
        sop_uid = str(header.get("SOPInstanceUID", "") or "")
        # Whatever this file was before (another object, a cached video), it
        # is this object now: one record per path.
        self._forget_video_at(rel, keep=sop_uid)
        if not sop_uid:
            meta = getattr(header, "file_meta", None)
            if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
                self._list(rel, source, "", "a DICOMDIR (the media's index of its files), not an image")
            elif len(header) == 0:  # cut short inside the file meta: pydicom does not warn
                self._list(rel, source, "", "no data set after the file meta header (file truncated?)")
            else:
                self._list(rel, source, "", "no SOP Instance UID")
            return
        if sop_uid in self.claimed:
            kept = self.claimed[sop_uid]
            self._list(rel, source, sop_uid, f"same SOP Instance UID as {kept}, which is cached instead", duplicate_of=kept)
            self.report.duplicates += 1
            return
        cached = self.videos.get(sop_uid)
        if cached is not None and unchanged(cached):
            # Moved, or a copy whose first path has gone: same bytes, no decode.
            cached["source"] = source
            self.by_path[rel] = cached
            self.unusable.pop(rel, None)
            self.claimed[sop_uid] = rel
            self.report.reused += 1
            self._changed()
            return
        try:
            decoded, frames = preprocess_file(path, self.cfg)
        except UnusableObject as exc:
            if cached is not None and cached["source"]["path"] == rel:
                self._drop(sop_uid)  # this very object is now unusable: no training on its old frames
            self._list(rel, source, sop_uid, exc.reason)
            return
        self._add(rel, source, sop_uid, header, decoded, frames, replacing=cached is not None)

    def _add(
        self, rel: str, source: dict, sop_uid: str, header: DicomDataset, decoded: DecodedVideo, frames: np.ndarray,
        *, replacing: bool,
    ) -> None:
        row = self.video_rows.get(sop_uid, {})
        raw_patient = row.get("patient_id") or str(getattr(header, "PatientID", "") or "")
        file_name = f"videos/{_safe_name(sop_uid)}.npy"
        _atomic_save_npy(self.cache / file_name, np.ascontiguousarray(frames, dtype=np.uint8))
        entry = {
            "sop_uid": sop_uid,
            "study_uid": decoded.study_uid,
            "series_uid": decoded.series_uid,
            # No raw patient ID in the manifest; an empty ID makes each study
            # its own "patient" so that splitting still works.
            "patient_key": patient_key(raw_patient) if raw_patient else patient_key("study:" + decoded.study_uid),
            "view": (row.get("view") or "unknown").strip().lower(),
            "frames": int(frames.shape[0]),
            "fps": float(decoded.fps),
            "size": int(frames.shape[1]),
            "file": file_name,
            "source": source,
        }
        self.videos[sop_uid] = entry
        self.by_path[rel] = entry
        self.unusable.pop(rel, None)
        self.listed.discard(rel)
        self.claimed[sop_uid] = rel
        self.report.added += 1
        self._changed()
        if replacing:
            # The .npy now holds the new frames: the manifest's frame count
            # must follow before anything can interrupt the run.
            self.save(final=False)

    def _list(self, rel: str, source: dict, sop_uid: str, reason: str, *, duplicate_of: str | None = None) -> None:
        record: dict = {"source": source, "sop_uid": sop_uid, "reason": reason}
        if duplicate_of is not None:
            record["duplicate_of"] = duplicate_of
        self.unusable[rel] = record
        self.listed.add(rel)
        self._changed()

    def _forget_video_at(self, rel: str, *, keep: str | None = None) -> None:
        """Drop the video cached from ``rel`` unless it is ``keep``: the file
        there changed into something else (not DICOM, unreadable, another
        SOP Instance UID), and its old frames must not be trained on."""
        entry = self.by_path.pop(rel, None)
        if entry is None:
            return
        sop_uid = entry["sop_uid"]
        if sop_uid == keep:
            self.by_path[rel] = entry
        elif entry["source"]["path"] == rel and self.videos.get(sop_uid) is entry:
            self._drop(sop_uid)

    def _drop(self, sop_uid: str) -> None:
        entry = self.videos.pop(sop_uid)
        self.doomed.add(entry["file"])
        self._changed()

    def _changed(self) -> None:
        self.changes += 1
        # Save as we go: an interrupted index of a large archive resumes.
        if self.changes >= _SAVE_EVERY:
            self.save(final=False)

    def save(self, *, final: bool, prune: bool = False) -> None:
        """Write the manifest.

        A partial save (during the run, or when it is interrupted) keeps the
        records of files not reached yet; the final one keeps only what this
        run saw, and counts (or with ``prune`` drops) the cached videos whose
        file is gone.
        """
        if final:
            self.unusable = {rel: u for rel, u in self.unusable.items() if rel in self.listed}
            gone = [sop for sop in self.videos if sop not in self.claimed]
            if prune:
                for sop in gone:
                    self._drop(sop)
                self.report.removed = len(gone)
            else:
                self.report.missing = len(gone)
        self.manifest["videos"] = sorted(self.videos.values(), key=lambda v: (v["study_uid"], v["series_uid"], v["sop_uid"]))
        self.manifest["unusable"] = sorted(self.unusable.values(), key=lambda u: u["source"]["path"])
        _atomic_write_bytes(self.cache / MANIFEST, (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())
        # A dropped UID may have come back under another path in this run.
        in_use = {v["file"] for v in self.videos.values()}
        for name in self.doomed - in_use:
            (self.cache / name).unlink(missing_ok=True)
        self.doomed.clear()
        self.changes = 0


def build_index(
    archive_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    preprocess_cfg: PreprocessConfig | None = None,
    progress: bool = True,
    *,
    videos_csv: str | os.PathLike[str] | None = None,
    prune: bool = False,
) -> IndexReport:
    """Preprocess every usable video of a DICOM folder tree into a clip cache.

    Parameters
    ----------
    archive_dir : path
        Any folder of DICOM files (the node's storage, a PACS export, a
        synthetic archive). Files are found by content, not by extension;
        symbolic links to files are followed, links to folders are not.
    cache_dir : path
        Output folder; created if needed. An existing cache is updated: files
        whose path, size and modification time are unchanged are skipped
        (videos and listed objects alike), and so is an object whose SOP
        Instance UID is cached with the same size and time (a moved file).
        A file that changed is read again and its record replaced.
    preprocess_cfg : PreprocessConfig, optional
        Size and frame limits; must match an existing cache's.
    progress : bool
        Show a tqdm progress bar.
    videos_csv : path, optional
        ``videos.csv`` with ``sop_uid`` and ``view`` (and ``patient_id``);
        ``ARCHIVE/videos.csv`` is used when present and this is not given.
        Without it views are ``"unknown"``.
    prune : bool
        Drop cached videos whose file is no longer in the archive. Off by
        default: the node's retention purges delivered studies from its
        storage, and an unmounted archive looks empty; either would empty a
        training cache. Without it they are counted in ``missing``.

    Returns
    -------
    IndexReport

    Raises
    ------
    ValueError
        If the cache was built with different preprocessing settings.
    FileNotFoundError
        If ``archive_dir`` does not exist.
    RuntimeError
        If another index run is updating the same cache.

    Notes
    -----
    An interrupted run (Ctrl-C, an error) saves what it did before it
    stops; one killed outright loses at most the last ``_SAVE_EVERY``
    records, which the next run redoes. Either way the cache on disk is
    consistent: every video the manifest names has its ``.npy``.
    """
    started = time.monotonic()
    cfg = preprocess_cfg or PreprocessConfig()
    archive = Path(archive_dir)
    if not archive.is_dir():
        raise FileNotFoundError(f"{archive}: not a folder")
    cache = Path(cache_dir)
    (cache / "videos").mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache):
        return _build_index_locked(archive, cache, cfg, progress, videos_csv, prune, started)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Hold ``CACHE/.lock`` for one index run.

    Two runs on one cache would each save a manifest without the other's
    videos; and the temporary files a killed run leaves can only be cleared
    when no other run may be writing one.

    Raises
    ------
    RuntimeError
        If another run holds the lock.
    """
    import fcntl

    with open(cache / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{cache}: another `echonode-train index` run is updating this cache") from None
        # Left by a run killed while writing (see _atomic_save_npy, _atomic_write_bytes).
        for leftover in itertools.chain((cache / "videos").glob(".*.npy"), cache.glob(f".{MANIFEST}.*.tmp")):
            leftover.unlink(missing_ok=True)
        yield


def _build_index_locked(
    archive: Path,
    cache: Path,
    cfg: PreprocessConfig,
    progress: bool,
    videos_csv: str | os.PathLike[str] | None,
    prune: bool,
    started: float,
) -> IndexReport:
    """:func:`build_index` once the cache is locked."""
    settings = {k: v for k, v in asdict(cfg).items() if k in ("size", "max_frames", "min_fps", "target_fps", "mask_frames")}

    manifest_path = cache / MANIFEST
    if manifest_path.is_file():
        manifest = load_manifest(cache)
        if manifest.get("preprocess") != settings:
            raise ValueError(
                f"{cache}: cache built with preprocessing {manifest.get('preprocess')}, asked for {settings}; "
                "use another --out folder"
            )
    else:
        manifest = {"version": MANIFEST_VERSION, "preprocess": settings, "videos": [], "unusable": []}
    if videos_csv is None and (archive / "videos.csv").is_file():
        videos_csv = archive / "videos.csv"
    video_rows = _read_videos_csv(Path(videos_csv) if videos_csv else None)

    # The scan order decides which of two files with one SOP Instance UID is
    # cached: sorted, so that it is the same on every run.
    files = sorted(p for p in archive.rglob("*") if p.is_file() and p.suffix.lower() not in _SIDECAR_SUFFIXES)
    report = IndexReport(manifest=str(manifest_path))
    run = _IndexRun(archive, cache, manifest, cfg, video_rows, report)
    iterator: Iterable[Path] = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="index", unit="file")
    try:
        for path in iterator:
            run.visit(path)
    except BaseException:
        run.save(final=False)  # keep what was done; the next run resumes
        raise
    run.save(final=True, prune=prune)
    report.cached = len(run.videos)
    report.unusable = len(run.unusable)
    report.patient_conflicts = sum(len(keys) > 1 for keys in _study_patient_keys(run.videos.values()).values())
    report.seconds = time.monotonic() - started
    return report



def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train index``."""
    parser.add_argument("archive", help="folder of DICOM files (node storage or any archive)")
    parser.add_argument("--out", required=True, help="cache folder (created or updated)")
    parser.add_argument("--videos-csv", default=None, help="videos.csv with per-video views (default: ARCHIVE/videos.csv)")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default: preset's)")
    parser.add_argument("--max-frames", type=int, default=100, help="frames kept per video (default 100)")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper", help="size preset (paper 112, tiny 32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--prune", action="store_true", help="drop cached videos whose file is no longer in the archive (default: keep, count)"
    )


def run_index(ns: argparse.Namespace) -> int:
    """Run ``echonode-train index``; returns the exit status."""
    from train.presets import get_preset

    size = ns.size if ns.size is not None else get_preset(ns.preset).size
    try:
        report = build_index(
            ns.archive,
            ns.out,
            PreprocessConfig(size=size, max_frames=ns.max_frames),
            progress=not ns.no_progress,
            videos_csv=ns.videos_csv,
            prune=ns.prune,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"echonode-train index: {exc}")
        return 2
    print(
        f"cache {ns.out}: {report.cached} videos ({report.added} added, {report.reused} unchanged), "
        f"{report.unusable} unusable ({report.duplicates} duplicate SOP Instance UIDs), "
        f"{report.not_dicom} non-DICOM files ignored, {report.seconds:.1f} s"
    )
    if report.missing:
        print(f"{report.missing} cached videos have no file in the archive any more (kept; --prune drops them)")
    if report.removed:
        print(f"{report.removed} cached videos whose file is gone were dropped")
    if report.patient_conflicts:
        print(
            f"{report.patient_conflicts} studies have videos of more than one patient ID; "
            "their patients are kept on one side of the split (the manifest lists them by study_uid)"
        )
    return 0
