"""``echonode-train index``: an archive of DICOM files into a clip cache.

Cache layout::

    CACHE/manifest.json          what is cached, how, and what was refused
    CACHE/videos/<sop_uid>.npy   (T, S, S) uint8 frames of one video

Each usable video is decoded and preprocessed once, by the node's own code
(:func:`echonode.analyse.preprocess.preprocess_file`), so training sees exactly the
pixels the node will see at inference. One ``.npy`` per video keeps the
cache incremental (a new study adds files, nothing is rewritten).

Files are read and decoded by worker processes (:mod:`train.index_worker`),
by default one per core; this module walks the archive, decides what each
file's record is, in sorted path order, and writes the manifest. With a
:class:`~train.index_worker.Shard`, only the studies of one part of the
archive are cached (one part per machine; :class:`train.cache.ClipCache`
reads the parts together). Reading a cache is :mod:`train.cache`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from echonode.analyse.preprocess import SECTOR_MASK_RULE, PreprocessConfig
from echonode.analyse.preprocess_config import FRAMINGS
from train.cache import MANIFEST, MANIFEST_VERSION, _study_patient_keys, load_manifest
from train.index_worker import (
    ELSEWHERE,
    KNOWN,
    NOT_DICOM,
    REFUSED,
    UNREADABLE,
    Examined,
    Examiner,
    Shard,
    Task,
    examined_in_order,
    safe_name,
    stamp,
)
from train.presets import get_preset
from train.splits import patient_key

__all__ = ["IndexReport", "Shard", "add_index_arguments", "build_index", "default_workers", "run_index"]

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
    elsewhere : int
        Files of studies that belong to another shard (``--shard``): read
        to their header, not decoded, not listed.
    workers : int
        Processes that decoded.
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
    elsewhere: int = 0
    workers: int = 1
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


def _read_videos_csv(path: Path | None) -> dict[str, dict[str, str]]:
    """``sop_uid -> row`` of a ``videos.csv`` (view and patient per video)."""
    if path is None or not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["sop_uid"]: row for row in csv.DictReader(fh) if row.get("sop_uid")}


#: Records changed between two saves of the manifest during a run.
_SAVE_EVERY = 200
#: ... and at least this many times as long as the last save took: a manifest
#: of a million videos takes seconds to write, and the workers must not wait
#: on the parent rewriting it every 200 of their videos.
_SAVE_SPACING = 5.0


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
        examiner: Examiner,
    ) -> None:
        self.archive = archive
        self.cache = cache
        self.manifest = manifest
        self.cfg = cfg
        self.video_rows = video_rows
        self.report = report
        #: Examines, in this process, a file whose plan proved wrong.
        self.examiner = examiner
        self.videos: dict[str, dict] = {v["sop_uid"]: v for v in manifest["videos"]}
        self.unusable: dict[str, dict] = {u["source"]["path"]: u for u in manifest["unusable"]}
        self.by_path: dict[str, dict] = {v["source"]["path"]: v for v in self.videos.values()}
        self.claimed: dict[str, str] = {}  # SOP Instance UID -> the path that gives it, this run
        self.listed: set[str] = set()  # paths listed as unusable, this run
        # .npy files of dropped videos: deleted only once a saved manifest no
        # longer names them, so that the cache on disk stays readable.
        self.doomed: set[str] = set()
        self.changes = 0
        self.next_save = 0.0  # time.monotonic() before which a partial save waits

    def fresh(self, rel: str, st: os.stat_result) -> bool:
        """Whether the record of ``rel`` may stand as it is (nothing to read),
        judged on what the manifest held when the run began (to plan the work)."""
        video = self.by_path.get(rel)
        if video is not None and video["source"]["path"] == rel and _unchanged(video, st):
            return True
        listing = self.unusable.get(rel)
        return listing is not None and _unchanged(listing, st)

    def visit(self, rel: str, st: os.stat_result | OSError, examined: Examined | None) -> None:
        """Bring the record of one file of the archive up to date.

        Files are visited in the archive's sorted path order, whatever the
        order the workers finished in. ``examined`` is a worker's reading of
        the file, None for a file planned as fresh; this call examines it
        here when the plan proves wrong (rare: two paths for one object).
        """
        if isinstance(st, OSError):  # gone since the scan, or a dangling link
            self._list(rel, {"path": rel, "bytes": 0, "mtime_ns": 0}, "", f"cannot read the file ({st.strerror})")
            return
        if self._reuse(rel, st):
            if examined is not None:
                examined.discard()
            return
        if examined is None:
            examined = self.examiner(_task(self.archive, rel, st))
        self._apply(rel, st, examined)

    def _reuse(self, rel: str, st: os.stat_result) -> bool:
        video = self.by_path.get(rel)
        fresh = video is not None and video["source"]["path"] == rel and _unchanged(video, st)
        if fresh and video is not None and video["sop_uid"] not in self.claimed:
            self.claimed[video["sop_uid"]] = rel
            self.report.reused += 1
            return True
        listing = self.unusable.get(rel)
        if listing is not None and _unchanged(listing, st):
            kept = listing.get("duplicate_of")
            # A duplicate stays one only while its UID is still given by the path it names.
            if kept is None or self.claimed.get(listing["sop_uid"]) == kept:
                self.listed.add(rel)
                self.report.reused += 1
                if kept is not None:
                    self.report.duplicates += 1
                return True
        return False

    def _apply(self, rel: str, st: os.stat_result, examined: Examined) -> None:
        source = {"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        kind, sop_uid = examined.kind, examined.sop_uid
        if kind in (NOT_DICOM, ELSEWHERE):
            self._forget_video_at(rel)
            if self.unusable.pop(rel, None) is not None:
                self._changed()
            if kind == NOT_DICOM:
                self.report.not_dicom += 1
            else:
                self.report.elsewhere += 1
            return
        if kind == UNREADABLE:
            self._forget_video_at(rel)
            self._list(rel, source, "", examined.reason)
            return
        # Whatever this file was before (another object, a cached video), it
        # is this object now: one record per path.
        self._forget_video_at(rel, keep=sop_uid)
        if sop_uid in self.claimed:
            examined.discard()
            kept = self.claimed[sop_uid]
            self._list(rel, source, sop_uid, f"same SOP Instance UID as {kept}, which is cached instead", duplicate_of=kept)
            self.report.duplicates += 1
            return
        cached = self.videos.get(sop_uid)
        if cached is not None and _unchanged(cached, st):
            # Moved, or a copy whose first path has gone: same bytes, no decode.
            examined.discard()
            cached["source"] = source
            self.by_path[rel] = cached
            self.unusable.pop(rel, None)
            self.claimed[sop_uid] = rel
            self.report.reused += 1
            self._changed()
            return
        if kind == KNOWN:  # its size and time matched another cached video's: decode it after all
            examined = self.examiner(_task(self.archive, rel, st), decode_known=True)
            if examined.kind != KNOWN:
                self._apply(rel, st, examined)
            return
        if kind == REFUSED:
            if cached is not None and cached["source"]["path"] == rel:
                self._drop(sop_uid)  # this very object is now unusable: no training on its old frames
            self._list(rel, source, sop_uid, examined.reason)
            return
        self._add(rel, source, examined, replacing=cached is not None)

    def _add(self, rel: str, source: dict, examined: Examined, *, replacing: bool) -> None:
        sop_uid = examined.sop_uid
        row = self.video_rows.get(sop_uid, {})
        # No raw patient ID in the manifest; an empty ID makes each study
        # its own "patient" so that splitting still works.
        if row.get("patient_id"):
            key = patient_key(row["patient_id"])
        else:
            key = examined.patient_key or patient_key("study:" + examined.study_uid)
        file_name = f"videos/{safe_name(sop_uid)}.npy"
        os.replace(examined.tmp, self.cache / file_name)
        entry = {
            "sop_uid": sop_uid,
            "study_uid": examined.study_uid,
            "series_uid": examined.series_uid,
            "patient_key": key,
            "view": (row.get("view") or "unknown").strip().lower(),
            "frames": examined.frames,
            "fps": examined.fps,
            "size": examined.size,
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
        if self.changes >= _SAVE_EVERY and time.monotonic() >= self.next_save:
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
        started = time.monotonic()
        self.manifest["videos"] = sorted(self.videos.values(), key=lambda v: (v["study_uid"], v["series_uid"], v["sop_uid"]))
        self.manifest["unusable"] = sorted(self.unusable.values(), key=lambda u: u["source"]["path"])
        _atomic_write_bytes(self.cache / MANIFEST, (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())
        # A dropped UID may have come back under another path in this run.
        in_use = {v["file"] for v in self.videos.values()}
        for name in self.doomed - in_use:
            (self.cache / name).unlink(missing_ok=True)
        self.doomed.clear()
        self.changes = 0
        self.next_save = time.monotonic() + _SAVE_SPACING * (time.monotonic() - started)


def default_workers() -> int:
    """Processes ``index`` uses by default: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def build_index(
    archive_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    preprocess_cfg: PreprocessConfig | None = None,
    progress: bool = True,
    *,
    videos_csv: str | os.PathLike[str] | None = None,
    prune: bool = False,
    workers: int = 1,
    shard: Shard | None = None,
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
    workers : int
        Processes that read and decode (:func:`default_workers` from the
        command line); 1 works in this process. The cache is the same
        whatever the number.
    shard : Shard, optional
        Index only the studies of this part of the archive (each machine of
        an array job one part, into its own cache; train on all the caches
        together). Must match an existing cache's.

    Returns
    -------
    IndexReport

    Raises
    ------
    ValueError
        If the cache was built with different preprocessing settings or
        another shard, or ``workers`` is below 1.
    FileNotFoundError
        If ``archive_dir`` does not exist.
    RuntimeError
        If another index run is updating the same cache.

    Notes
    -----
    An interrupted run (Ctrl-C, an error) saves what it did before it
    stops; one killed outright loses the records made since the last save
    (every ``_SAVE_EVERY`` records, spaced out for a very large manifest),
    which the next run redoes. Either way the cache on disk is
    consistent: every video the manifest names has its ``.npy``.
    """
    started = time.monotonic()
    cfg = preprocess_cfg or PreprocessConfig()
    if int(workers) < 1:
        raise ValueError(f"--workers {workers}: want at least 1")
    archive = Path(archive_dir)
    if not archive.is_dir():
        raise FileNotFoundError(f"{archive}: not a folder")
    cache = Path(cache_dir)
    (cache / "videos").mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache):
        manifest = _open_manifest(cache, cfg, shard)
        report = IndexReport(manifest=str(cache / MANIFEST), workers=int(workers))
        if videos_csv is None and (archive / "videos.csv").is_file():
            videos_csv = archive / "videos.csv"
        run = _IndexRun(
            archive, cache, manifest, cfg, _read_videos_csv(Path(videos_csv) if videos_csv else None), report,
            Examiner(cache / "videos", cfg, shard, _stamps(manifest)),
        )  # fmt: skip
        try:
            _walk(run, int(workers), progress)
        except BaseException:
            run.save(final=False)  # keep what was done; the next run resumes
            _clear_leftovers(cache)  # frames of files not reached: redone next time
            raise
        run.save(final=True, prune=prune)
    report.cached = len(run.videos)
    report.unusable = len(run.unusable)
    report.patient_conflicts = sum(len(keys) > 1 for keys in _study_patient_keys(run.videos.values()).values())
    report.seconds = time.monotonic() - started
    return report


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
    with open(cache / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{cache}: another `echonode-train index` run is updating this cache") from None
        _clear_leftovers(cache)
        yield


def _clear_leftovers(cache: Path) -> None:
    """Temporary files of a run that stopped while writing (a worker's frames, a manifest)."""
    for leftover in itertools.chain((cache / "videos").glob(".*.npy"), cache.glob(f".{MANIFEST}.*.tmp")):
        leftover.unlink(missing_ok=True)


def _open_manifest(cache: Path, cfg: PreprocessConfig, shard: Shard | None) -> dict:
    """The cache's manifest, or a new one; refuses other settings or another shard."""
    settings = {k: v for k, v in asdict(cfg).items() if k in ("size", "max_frames", "min_fps", "target_fps", "mask_frames")}
    if cfg.framing != "sector":
        # Recorded only when not the default, so that caches made before
        # framing was a setting (all ``sector``) stay valid.
        settings["framing"] = cfg.framing
    if cfg.framing == "physical":
        settings["field_cm"] = float(cfg.field_cm)
    # A cache made before the rule was recorded used rule 1: adding to it is
    # refused below, since its frames were masked otherwise.
    settings["sector_mask"] = SECTOR_MASK_RULE
    wanted_shard = shard.as_dict() if shard is not None else None
    if not (cache / MANIFEST).is_file():
        manifest: dict = {"version": MANIFEST_VERSION, "preprocess": settings, "videos": [], "unusable": []}
        if wanted_shard is not None:
            manifest["shard"] = wanted_shard
        return manifest
    manifest = load_manifest(cache)
    if manifest.get("preprocess") != settings:
        raise ValueError(
            f"{cache}: cache built with preprocessing {manifest.get('preprocess')}, asked for {settings}; "
            "use another --out folder"
        )
    if manifest.get("shard") != wanted_shard:
        def name(d: Mapping | None) -> str:
            return "the whole archive" if d is None else f"shard {d['index']}/{d['count']}"

        raise ValueError(
            f"{cache}: cache holds {name(manifest.get('shard'))}, asked for {name(wanted_shard)}; use another --out folder"
        )
    return manifest


def _stamps(manifest: Mapping) -> np.ndarray:
    """Sorted size-and-time stamps of the cached videos (see :class:`Examiner`)."""
    return np.unique(np.array([stamp(v["source"]["bytes"], v["source"]["mtime_ns"]) for v in manifest["videos"]], dtype=np.int64))


def _unchanged(record: Mapping, st: os.stat_result) -> bool:
    return record["source"]["bytes"] == st.st_size and record["source"]["mtime_ns"] == st.st_mtime_ns


def _task(archive: Path, rel: str, st: os.stat_result) -> Task:
    return Task(str(archive / rel), rel, st.st_size, st.st_mtime_ns)


def _walk(run: _IndexRun, workers: int, progress: bool) -> None:
    """Visit every file of the archive in path order, the workers reading ahead.

    The scan order decides which of two files with one SOP Instance UID is
    cached: sorted, so that it is the same on every run and for any number
    of workers. Files the manifest holds unchanged are not sent to a worker.
    """
    archive = run.archive
    files = sorted(p for p in archive.rglob("*") if p.is_file() and p.suffix.lower() not in _SIDECAR_SUFFIXES)
    plan: list[tuple[str, os.stat_result | OSError, bool]] = []
    for path in files:
        rel = str(path.relative_to(archive))
        try:
            st: os.stat_result | OSError = path.stat()
        except OSError as exc:
            st = exc
        plan.append((rel, st, isinstance(st, os.stat_result) and not run.fresh(rel, st)))
    tasks = (_task(archive, rel, st) for rel, st, send in plan if send and isinstance(st, os.stat_result))
    steps: Iterable[tuple[str, os.stat_result | OSError, bool]] = plan
    if progress:
        # Late: tqdm comes with the train extra, needed only for a progress bar.
        from tqdm import tqdm

        steps = tqdm(plan, desc="index", unit="file")
    with examined_in_order(run.examiner, tasks, workers) as results:
        for rel, st, sent in steps:
            run.visit(rel, st, next(results) if sent else None)


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train index``."""
    parser.add_argument("archive", help="folder of DICOM files (node storage or any archive)")
    parser.add_argument("--out", required=True, help="cache folder (created or updated)")
    parser.add_argument("--videos-csv", default=None, help="videos.csv with per-video views (default: ARCHIVE/videos.csv)")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default: preset's)")
    parser.add_argument("--max-frames", type=int, default=100, help="frames kept per video (default 100)")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper", help="size preset (paper 112, tiny 32)")
    parser.add_argument(
        "--target-fps", type=float, default=None, metavar="FPS",
        help="resample every video in time to FPS frames a second, nearest frame (default: the native frames, "
        "as EchoCLR); a model trained on it asks the node for the same",
    )  # fmt: skip
    parser.add_argument(
        "--framing", choices=FRAMINGS, default="sector",
        help="sector: crop to the sector and pad to a square (default); frame: resize the whole masked frame "
        "(the EchoCLR authors' code); physical: a --field-cm window at the pixel size the image's calibrated "
        "region states, the same size in cm in every video (videos without calibration are left out)",
    )  # fmt: skip
    parser.add_argument(
        "--field-cm", type=float, default=16.0, metavar="CM",
        help="side of the physical framing's window in cm (default 16)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--prune", action="store_true", help="drop cached videos whose file is no longer in the archive (default: keep, count)"
    )
    parser.add_argument(
        "--workers", type=int, default=None,
        help=f"processes that read and decode (default: the cores this process may use, here {default_workers()})",
    )  # fmt: skip
    parser.add_argument(
        "--shard", default=None, metavar="I/N",
        help="index only part I of N of the archive's studies (0 <= I < N), e.g. one part per machine of an array job",
    )  # fmt: skip


def run_index(ns: argparse.Namespace) -> int:
    """Run ``echonode-train index``; returns the exit status."""
    size = ns.size if ns.size is not None else get_preset(ns.preset).size
    try:
        shard = Shard.parse(ns.shard) if ns.shard else None
        report = build_index(
            ns.archive,
            ns.out,
            PreprocessConfig(size=size, max_frames=ns.max_frames, framing=ns.framing,
                             target_fps=getattr(ns, "target_fps", None), field_cm=getattr(ns, "field_cm", 16.0)),
            progress=not ns.no_progress,
            videos_csv=ns.videos_csv,
            prune=ns.prune,
            workers=default_workers() if ns.workers is None else ns.workers,
            shard=shard,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"echonode-train index: {exc}")
        return 2
    print(
        f"cache {ns.out}: {report.cached} videos ({report.added} added, {report.reused} unchanged), "
        f"{report.unusable} unusable ({report.duplicates} duplicate SOP Instance UIDs), "
        f"{report.not_dicom} non-DICOM files ignored, {report.seconds:.1f} s on {report.workers} worker(s)"
    )
    if shard is not None:
        print(f"shard {shard}: {report.elsewhere} files of other shards' studies left to them")
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
