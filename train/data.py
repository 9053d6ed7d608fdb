"""The clip cache (``echonode-train index``) and the training datasets.

Cache layout::

    CACHE/manifest.json          what is cached, how, and what was refused
    CACHE/videos/<sop_uid>.npy   (T, S, S) uint8 frames of one video

Each usable video is decoded and preprocessed once, by the node's own code
(:func:`echonode.preprocess.preprocess_file`), so training sees exactly the
pixels the node will see at inference. One ``.npy`` per video keeps the
cache incremental (a new study adds files, nothing is rewritten) and is read
with ``mmap_mode="r"``, so a data-loader worker touches only the frames of the
clip it cuts.

The manifest holds no patient identifiers: patients are a pseudonymous
``patient_key`` (:func:`train.splits.patient_key`), enough to split by patient.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from echonode.decode import UnusableObject
from echonode.preprocess import PreprocessConfig, make_eval_clips, preprocess_file, training_clip
from train.augment import AugmentConfig, augment_clip
from train.losses import NUM_PERMUTATIONS, REORDER_FRAMES, permute_clip
from train.splits import patient_key, split_by_patient, study_strata

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
        Files skipped because the cache already had them unchanged.
    unusable : int
        Objects refused (listed with reasons in the manifest).
    not_dicom : int
        Files that are not DICOM (ignored, not listed).
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


def build_index(
    archive_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    preprocess_cfg: PreprocessConfig | None = None,
    progress: bool = True,
    *,
    videos_csv: str | os.PathLike[str] | None = None,
) -> IndexReport:
    """Preprocess every usable video of a DICOM folder tree into a clip cache.

    Parameters
    ----------
    archive_dir : path
        Any folder of DICOM files (the node's storage, a synthetic archive).
    cache_dir : path
        Output folder; created if needed. An existing cache is updated: files
        whose path, size and modification time are unchanged are skipped, and
        so is an object whose SOP Instance UID is cached with the same size
        and time (a moved file).
    preprocess_cfg : PreprocessConfig, optional
        Size and frame limits; must match an existing cache's.
    progress : bool
        Show a tqdm progress bar.
    videos_csv : path, optional
        ``videos.csv`` with ``sop_uid`` and ``view`` (and ``patient_id``);
        ``ARCHIVE/videos.csv`` is used when present and this is not given.
        Without it views are ``"unknown"``.

    Returns
    -------
    IndexReport

    Raises
    ------
    ValueError
        If the cache was built with different preprocessing settings.
    FileNotFoundError
        If ``archive_dir`` does not exist.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    started = time.monotonic()
    cfg = preprocess_cfg or PreprocessConfig()
    archive = Path(archive_dir)
    if not archive.is_dir():
        raise FileNotFoundError(f"{archive}: not a folder")
    cache = Path(cache_dir)
    (cache / "videos").mkdir(parents=True, exist_ok=True)
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

    videos: dict[str, dict] = {v["sop_uid"]: v for v in manifest["videos"]}
    unusable: dict[str, dict] = {u["source"]["path"]: u for u in manifest["unusable"]}
    by_path = {v["source"]["path"]: v for v in videos.values()}

    files = sorted(p for p in archive.rglob("*") if p.is_file() and p.suffix.lower() not in _SIDECAR_SUFFIXES)
    report = IndexReport(manifest=str(manifest_path))
    iterator: Iterable[Path] = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="index", unit="file")
    since_save = 0
    for path in iterator:
        rel = str(path.relative_to(archive))
        st = path.stat()
        source = {"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        known = by_path.get(rel) or unusable.get(rel)
        if known and known["source"]["bytes"] == st.st_size and known["source"]["mtime_ns"] == st.st_mtime_ns:
            report.reused += 1
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            report.not_dicom += 1
            continue
        sop_uid = str(getattr(header, "SOPInstanceUID", "") or "")
        cached = videos.get(sop_uid)
        if cached and cached["source"]["bytes"] == st.st_size and cached["source"]["mtime_ns"] == st.st_mtime_ns:
            cached["source"] = source  # moved, unchanged
            by_path[rel] = cached
            report.reused += 1
            continue
        try:
            if not sop_uid:
                raise UnusableObject("no SOP Instance UID")
            video, frames = preprocess_file(path, cfg)
        except UnusableObject as exc:
            unusable[rel] = {"source": source, "sop_uid": sop_uid, "reason": exc.reason}
            continue
        unusable.pop(rel, None)
        row = video_rows.get(sop_uid, {})
        raw_patient = row.get("patient_id") or str(getattr(header, "PatientID", "") or "")
        file_name = f"videos/{_safe_name(sop_uid)}.npy"
        _atomic_save_npy(cache / file_name, np.ascontiguousarray(frames, dtype=np.uint8))
        entry = {
            "sop_uid": sop_uid,
            "study_uid": video.study_uid,
            "series_uid": video.series_uid,
            # No raw patient ID in the manifest; an empty ID makes each study
            # its own "patient" so that splitting still works.
            "patient_key": patient_key(raw_patient) if raw_patient else patient_key("study:" + video.study_uid),
            "view": (row.get("view") or "unknown").strip().lower(),
            "frames": int(frames.shape[0]),
            "fps": float(video.fps),
            "size": int(frames.shape[1]),
            "file": file_name,
            "source": source,
        }
        videos[sop_uid] = entry
        by_path[rel] = entry
        report.added += 1
        since_save += 1
        # Save as we go: an interrupted index of a large archive resumes.
        if since_save >= 200:
            _save_manifest(manifest_path, manifest, videos, unusable)
            since_save = 0
    _save_manifest(manifest_path, manifest, videos, unusable)
    report.cached = len(videos)
    report.unusable = len(unusable)
    report.seconds = time.monotonic() - started
    return report


def _save_manifest(path: Path, manifest: dict, videos: Mapping[str, dict], unusable: Mapping[str, dict]) -> None:
    manifest["videos"] = sorted(videos.values(), key=lambda v: (v["study_uid"], v["series_uid"], v["sop_uid"]))
    manifest["unusable"] = sorted(unusable.values(), key=lambda u: u["source"]["path"])
    _atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train index``."""
    parser.add_argument("archive", help="folder of DICOM files (node storage or any archive)")
    parser.add_argument("--out", required=True, help="cache folder (created or updated)")
    parser.add_argument("--videos-csv", default=None, help="videos.csv with per-video views (default: ARCHIVE/videos.csv)")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default: preset's)")
    parser.add_argument("--max-frames", type=int, default=100, help="frames kept per video (default 100)")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper", help="size preset (paper 112, tiny 32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"echonode-train index: {exc}")
        return 2
    print(
        f"cache {ns.out}: {report.cached} videos ({report.added} added, {report.reused} unchanged), "
        f"{report.unusable} unusable, {report.not_dicom} non-DICOM files ignored, {report.seconds:.1f} s"
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
        """Study UID -> patient key."""
        return {v["study_uid"]: v["patient_key"] for v in self.videos}

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
    labels: Sequence[Mapping[str, str]] | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The archive's patient-level split, the same for pretraining and tasks.

    Studies of the cache are split by ``patient_key``, stratified on the
    joint binary labels of ``labels`` (see :func:`train.splits.study_strata`)
    when given. Pretraining must get the same ``labels`` file as fine-tuning
    to get the same split.
    """
    strata = study_strata(labels) if labels else None
    return split_by_patient(
        cache.study_patient(), strata, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )


def _resize(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resize ``(C, T, H, W)`` frames to ``size`` x ``size`` (a cache at
    112 px serves a 32 px ``tiny`` run without re-indexing)."""
    if clip.shape[-1] == size and clip.shape[-2] == size:
        return clip
    c, t, h, w = clip.shape
    return F.interpolate(clip.reshape(c * t, 1, h, w), size=(size, size), mode="area").reshape(c, t, size, size)


def _normalise(clip: torch.Tensor) -> torch.Tensor:
    """Per-clip min-max to [0, 1], zeros for a constant clip (as
    :func:`echonode.preprocess.normalise_clip`)."""
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
    (:func:`echonode.preprocess.eval_clip_starts`), no augmentation; item
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
