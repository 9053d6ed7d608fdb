"""The clip cache (``echonode-train index``) and the training datasets.

Cache layout::

    CACHE/manifest.json          what is cached, how, and what was refused
    CACHE/videos/<sop_uid>.npy   (T, S, S) uint8 frames of one video

Each usable video is decoded and preprocessed once, by the node's own code
(:func:`echonode.analyse.preprocess.preprocess_file`), so training sees exactly the
pixels the node will see at inference. One ``.npy`` per video keeps the
cache incremental (a new study adds files, nothing is rewritten) and is read
with ``mmap_mode="r"``, so a data-loader worker touches only the frames of the
clip it cuts.

The manifest holds no patient identifiers: patients are a pseudonymous
``patient_key`` (:func:`train.splits.patient_key`), enough to split by patient.
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
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from echonode.analyse.decode import (
    DEFAULT_MAX_DECODED_BYTES,
    DecodedVideo,
    UnusableObject,
)
from echonode.analyse.preprocess import (
    PreprocessConfig,
    make_eval_clips,
    preprocess_file,
    training_clip,
)
from echonode.analyse.preprocess_config import FRAMINGS
from echonode.dicomfile import InflatesTooLarge
from echonode.header import read_header
from train.augment import AugmentConfig, augment_clip
from train.losses import NUM_PERMUTATIONS, REORDER_FRAMES, permute_clip
from train.splits import patient_key, split_by_patient

if TYPE_CHECKING:
    from pydicom.dataset import Dataset as DicomDataset

__all__ = [
    "MANIFEST",
    "METHODS",
    "ClipCache",
    "ClipDataset",
    "IndexReport",
    "PairDataset",
    "add_index_arguments",
    "build_index",
    "load_study_labels",
    "manifest_hash",
    "split_cache",
    "run_index",
]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
METHODS: tuple[str, ...] = ("echoclr", "mi-simclr", "simclr")
#: Files in an archive that are data about the archive, not DICOM objects.
_SIDECAR_SUFFIXES = {".csv", ".json", ".txt", ".md", ".toml", ".log", ".npy", ".png"}


# --------------------------------------------------------------------------
# Index


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


def load_manifest(cache_dir: str | os.PathLike[str]) -> dict:
    """Read ``CACHE/manifest.json``.

    Raises
    ------
    FileNotFoundError
        With a message that says how to make one.
    """
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no clip cache here; build one with `echonode-train index ARCHIVE --out {cache_dir}`")
    with open(path) as fh:
        return json.load(fh)


def manifest_hash(cache_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of the manifest: identifies the training data in provenance."""
    return hashlib.sha256((Path(cache_dir) / MANIFEST).read_bytes()).hexdigest()


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
    if cfg.framing != "sector":
        # Recorded only when not the default, so that caches made before
        # framing was a setting (all ``sector``) stay valid.
        settings["framing"] = cfg.framing

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


def _study_patient_keys(videos: Iterable[Mapping]) -> dict[str, set[str]]:
    """Study UID -> the patient keys its videos carry (one, unless a study
    was filed under two patients)."""
    keys: dict[str, set[str]] = defaultdict(set)
    for v in videos:
        keys[v["study_uid"]].add(v["patient_key"])
    return keys


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train index``."""
    parser.add_argument("archive", help="folder of DICOM files (node storage or any archive)")
    parser.add_argument("--out", required=True, help="cache folder (created or updated)")
    parser.add_argument("--videos-csv", default=None, help="videos.csv with per-video views (default: ARCHIVE/videos.csv)")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default: preset's)")
    parser.add_argument("--max-frames", type=int, default=100, help="frames kept per video (default 100)")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper", help="size preset (paper 112, tiny 32)")
    parser.add_argument(
        "--framing", choices=FRAMINGS, default="sector",
        help="sector: crop to the sector and pad to a square (default); frame: resize the whole masked frame "
        "(the EchoCLR authors' code)",
    )  # fmt: skip
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
            PreprocessConfig(size=size, max_frames=ns.max_frames, framing=ns.framing),
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


# --------------------------------------------------------------------------
# Reading the cache


class ClipCache:
    """Read access to a clip cache.

    Parameters
    ----------
    cache_dir : path
        A folder written by :func:`build_index`.
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.root = Path(cache_dir)
        self.manifest = load_manifest(self.root)
        self.videos: list[dict] = list(self.manifest["videos"])
        self.by_sop: dict[str, dict] = {v["sop_uid"]: v for v in self.videos}
        self.size = int(self.manifest["preprocess"]["size"])

    def frames(self, sop_uid: str) -> np.ndarray:
        """``(T, S, S)`` uint8 frames, memory-mapped (read-only)."""
        return np.load(self.root / self.by_sop[sop_uid]["file"], mmap_mode="r")

    def study_patient(self) -> dict[str, str]:
        """Study UID -> patient key, for splitting by patient.

        A study whose videos name two patients (a merge, a typo at the
        modality) joins them: every study of either gets one key (the
        smallest), so that no split holds a heart that another split holds.
        """
        parent: dict[str, str] = {}

        def root(key: str) -> str:
            parent.setdefault(key, key)
            while parent[key] != key:
                parent[key] = parent[parent[key]]
                key = parent[key]
            return key

        for keys in _study_patient_keys(self.videos).values():
            first, *rest = sorted(keys)
            for key in rest:
                a, b = root(first), root(key)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        return {study: root(min(keys)) for study, keys in _study_patient_keys(self.videos).items()}

    def videos_of(self, studies: Iterable[str], views: Sequence[str] | None = None) -> list[dict]:
        """Manifest entries of the given studies, optionally of some views only."""
        wanted = set(studies)
        allowed = None if views is None else {v.lower() for v in views}
        return [v for v in self.videos if v["study_uid"] in wanted and (allowed is None or v["view"] in allowed)]


def load_study_labels(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a ``labels.csv`` (one per study)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "study_uid" not in rows[0]:
        raise ValueError(f"{path}: labels file has no study_uid column")
    return rows


def split_cache(
    cache: ClipCache,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The archive's patient-level split, the same for pretraining and every task.

    Each study goes where its patient's key puts it
    (:func:`train.splits.assign_split`), whatever else the cache holds and
    whatever the labels say; see :mod:`train.splits`.
    """
    return split_by_patient(cache.study_patient(), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


def _resize(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resize ``(C, T, H, W)`` frames to ``size`` x ``size`` (a cache at
    112 px serves a 32 px ``tiny`` run without re-indexing)."""
    if clip.shape[-1] == size and clip.shape[-2] == size:
        return clip
    c, t, h, w = clip.shape
    return F.interpolate(clip.reshape(c * t, 1, h, w), size=(size, size), mode="area").reshape(c, t, size, size)


def _normalise(clip: torch.Tensor) -> torch.Tensor:
    """Per-clip min-max to [0, 1], zeros for a constant clip (as
    :func:`echonode.analyse.preprocess.normalise_clip`)."""
    lo, hi = clip.min(), clip.max()
    if hi <= lo:
        return torch.zeros_like(clip)
    return (clip - lo) / (hi - lo)


def _sample_seed(seed: int, epoch: int, index: int, salt: int = 0) -> int:
    """A per-sample seed: augmentation depends on (seed, epoch, index) only,
    not on worker count, process count or where a run was resumed."""
    return int(np.random.SeedSequence([seed, epoch, index, salt]).generate_state(1)[0])


class _CacheDataset(Dataset):
    """Shared plumbing: cache, epoch-keyed randomness, clip making."""

    def __init__(self, cache: ClipCache, size: int, seed: int) -> None:
        self.cache = cache
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws ``__getitem__`` makes."""
        self.epoch = int(epoch)

    def _generators(self, index: int, salt: int = 0) -> tuple[np.random.Generator, torch.Generator]:
        s = _sample_seed(self.seed, self.epoch, index, salt)
        return np.random.default_rng(s), torch.Generator().manual_seed(s)

    def _train_clip(
        self,
        sop_uid: str,
        clip_frames: int,
        rng: np.random.Generator,
        gen: torch.Generator,
        augment: AugmentConfig | None,
        raw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random-start clip -> resize -> augment -> normalise -> 3 channels.

        Returns the finished clip and the pre-augmentation clip (SimCLR
        augments one clip twice).
        """
        if raw is None:
            frames = self.cache.frames(sop_uid)
            u8 = training_clip(frames, clip_frames, rng)
            raw = _resize(torch.from_numpy(np.array(u8, dtype=np.float32)).unsqueeze(0), self.size)
        x = augment_clip(raw, augment, gen) if augment is not None else raw
        return _normalise(x).expand(3, -1, -1, -1).contiguous(), raw


class PairDataset(_CacheDataset):
    """Positive pairs for contrastive pretraining.

    * ``echoclr``: every unordered pair of distinct videos of one study (a
      study with one video pairs it with itself), each view a random clip,
      augmented independently, then frame-permuted by a uniformly drawn one of
      the 24 orderings (the label is returned).
    * ``mi-simclr``: the same pairs, no reordering (labels are 0).
    * ``simclr``: one clip of one video, augmented twice.

    Items are dicts ``{"x1", "x2", "perm1", "perm2"}`` with ``x`` of shape
    ``(3, clip_frames, size, size)``.

    Parameters
    ----------
    cache : ClipCache
    studies : sequence of str
        Study UIDs to draw from (the training split).
    method : {"echoclr", "mi-simclr", "simclr"}
    clip_frames : int
        4 in the paper (required for reordering).
    size : int
        Frame side fed to the network.
    views : sequence of str or None
        Views to use (``("plax",)``); None for all.
    augment : AugmentConfig or None
        None disables augmentation.
    seed : int
    """

    def __init__(
        self,
        cache: ClipCache,
        studies: Sequence[str],
        method: str = "echoclr",
        clip_frames: int = 4,
        size: int = 112,
        views: Sequence[str] | None = ("plax",),
        augment: AugmentConfig | None = AugmentConfig(),
        seed: int = 0,
    ) -> None:
        super().__init__(cache, size, seed)
        if method not in METHODS:
            raise ValueError(f'Argument "method" must be one of {", ".join(METHODS)}; got {method!r}.')
        if method == "echoclr" and clip_frames != REORDER_FRAMES:
            raise ValueError(f'Argument "clip_frames" must be {REORDER_FRAMES} for frame reordering; got {clip_frames}.')
        self.method = method
        self.clip_frames = int(clip_frames)
        self.augment = augment
        by_study: dict[str, list[str]] = defaultdict(list)
        for v in cache.videos_of(studies, views):
            by_study[v["study_uid"]].append(v["sop_uid"])
        #: The studies whose videos the pairs are drawn from.
        self.studies: tuple[str, ...] = tuple(sorted(by_study))
        self.pairs: list[tuple[str, str]] = []
        for study in sorted(by_study):
            sops = sorted(by_study[study])
            if method == "simclr":
                self.pairs.extend((s, s) for s in sops)
            elif len(sops) == 1:
                self.pairs.append((sops[0], sops[0]))
            else:
                self.pairs.extend(itertools.combinations(sops, 2))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng, gen = self._generators(index)
        a, b = self.pairs[index]
        x1, raw = self._train_clip(a, self.clip_frames, rng, gen, self.augment)
        if self.method == "simclr":
            x2, _ = self._train_clip(b, self.clip_frames, rng, gen, self.augment, raw=raw)
        else:
            x2, _ = self._train_clip(b, self.clip_frames, rng, gen, self.augment)
        p1 = p2 = 0
        if self.method == "echoclr":
            p1, p2 = (int(v) for v in torch.randint(0, NUM_PERMUTATIONS, (2,), generator=gen))
            x1, x2 = permute_clip(x1, p1), permute_clip(x2, p2)
        return {"x1": x1, "x2": x2, "perm1": torch.tensor(p1), "perm2": torch.tensor(p2)}


class ClipDataset(_CacheDataset):
    """Labelled clips for fine-tuning and evaluation.

    Training (``train=True``): one random clip per video per epoch,
    augmented; item ``(x, y)`` with ``x`` ``(3, T, S, S)``. With
    ``repeats`` > 1 an epoch visits every video ``repeats`` times, each visit
    a fresh random clip and augmentation (a small label fraction then gets
    as many optimiser steps per epoch as a larger one).
    Evaluation: ``eval_clips`` evenly spaced clips
    (:func:`echonode.analyse.preprocess.eval_clip_starts`), no augmentation; item
    ``(x, y)`` with ``x`` ``(eval_clips, 3, T, S, S)``.

    Parameters
    ----------
    cache : ClipCache
    videos : sequence of dict
        Manifest entries.
    targets : sequence
        One target per video (float 0/1 for binary tasks, class index for
        multi-class).
    clip_frames, size : int
    train : bool
    augment : AugmentConfig or None
    eval_clips : int
    seed : int
    repeats : int
        Visits of each video per training epoch (ignored for evaluation).
    """

    def __init__(
        self,
        cache: ClipCache,
        videos: Sequence[dict],
        targets: Sequence[float | int],
        clip_frames: int = 16,
        size: int = 112,
        train: bool = True,
        augment: AugmentConfig | None = AugmentConfig(),
        eval_clips: int = 4,
        seed: int = 0,
        repeats: int = 1,
    ) -> None:
        super().__init__(cache, size, seed)
        if len(videos) != len(targets):
            raise ValueError(f'Arguments "videos" and "targets" must have the same length; got {len(videos)} and {len(targets)}.')
        self.videos = list(videos)
        self.targets = list(targets)
        self.clip_frames = int(clip_frames)
        self.train = bool(train)
        self.augment = augment if train else None
        self.eval_clips = int(eval_clips)
        if repeats < 1:
            raise ValueError(f'Argument "repeats" must be at least 1; got {repeats}.')
        self.repeats = int(repeats) if self.train else 1

    def __len__(self) -> int:
        return len(self.videos) * self.repeats

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        visit, index = divmod(index, len(self.videos))
        video = self.videos[index]
        target = torch.tensor(self.targets[index])
        if self.train:
            # The first visit keeps the draws it had before repeats existed.
            rng, gen = self._generators(index, salt=visit)
            x, _ = self._train_clip(video["sop_uid"], self.clip_frames, rng, gen, self.augment)
            return x, target
        frames = np.asarray(self.cache.frames(video["sop_uid"]))
        cfg = PreprocessConfig(size=self.cache.size, clip_frames=self.clip_frames, eval_clips=self.eval_clips)
        # The node's own clip maker, so evaluation sees what inference sees.
        clips = torch.from_numpy(make_eval_clips(frames, cfg))
        if clips.shape[-1] != self.size:
            clips = torch.stack([_resize(c, self.size) for c in clips])
        return clips, target
