"""One study from stored files to results: decode, pick views, infer, aggregate.

Shared by the node's worker and ``echonode infer``. Decoding runs in a
thread pool ahead of inference (OpenCV and the JPEG decoders release the
GIL), so a study's latency is close to its inference time; clips of several
videos are batched together for the task models.

Aggregation follows METHOD.md: a video's probability is the mean over its
evenly spaced clips, the study's the mean over its videos.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from echonode.analyse.decode import DecodedVideo, UnusableObject, decode_video
from echonode.analyse.preprocess import (
    PreprocessConfig,
    decode_options_for,
    make_eval_clips,
    preprocess_video,
)
from echonode.bundles.registry import ModelSet
from echonode.bundles.weights import Bundle
from echonode.header import MAX_ELEMENT_BYTES, BoundedHeader, read_header
from echonode.ops.logs import get_logger

log = get_logger(__name__)

#: Patient attributes that must agree across every object used for one SR.
IDENTITY_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID")


class StudyRefused(Exception):
    """The study must not be reported (conflicting identities); the reason says why."""


@dataclass
class VideoOutcome:
    """What happened to one stored object."""

    path: str
    sop_uid: str
    series_uid: str
    sop_class_uid: str
    usable: bool = False
    reason: str | None = None
    view: str | None = None
    view_probability: float | None = None
    used: bool = False
    n_frames: int = 0
    fps: float | None = None
    #: task -> video probability (mean over clips)
    probabilities: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskOutcome:
    """A task's study-level result."""

    bundle: Bundle
    probability: float
    positive: bool
    video_probabilities: dict[str, float]


@dataclass
class StudyAnalysis:
    """Everything the worker records and the SR reports about one study."""

    study_uid: str
    videos: list[VideoOutcome]
    tasks: dict[str, TaskOutcome]
    view_filter: str
    skipped_reason: str | None = None
    #: An image of the study, whose header the SR copies the patient and
    #: study from (None when the study has no image).
    header_path: str | None = None
    #: Seconds spent, for the logs and bench/latency.py: ``decode_s`` (decoding
    #: and preprocessing, summed over the decode threads, which run ahead of
    #: inference), ``decode_wait_s`` (inference waiting for a decoded video),
    #: ``infer_s`` (the networks, view classifier included).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def used_videos(self) -> list[VideoOutcome]:
        return [v for v in self.videos if v.used]

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (no patient data)."""
        return {
            "study_uid": self.study_uid,
            "skipped_reason": self.skipped_reason,
            "view_filter": self.view_filter,
            "tasks": {
                t: {
                    "probability": o.probability,
                    "positive": o.positive,
                    "threshold": o.bundle.threshold,
                    "model": o.bundle.name,
                    "version": o.bundle.version,
                    "device_uid": o.bundle.device_uid,
                    "random_weights": o.bundle.meta.random_weights,
                    "n_videos": len(o.video_probabilities),
                }
                for t, o in self.tasks.items()
            },
            "videos": [
                {
                    "sop_uid": v.sop_uid,
                    "series_uid": v.series_uid,
                    "usable": v.usable,
                    "reason": v.reason,
                    "view": v.view,
                    "view_probability": v.view_probability,
                    "used": v.used,
                    "frames": v.n_frames,
                    "fps": v.fps,
                    "probabilities": v.probabilities,
                }
                for v in self.videos
            ],
        }


def preprocess_config(bundle: Bundle) -> PreprocessConfig:
    """The bundle's inference preprocessing as a :class:`PreprocessConfig`."""
    return PreprocessConfig.from_meta(bundle.meta.preprocessing)


@dataclass(frozen=True)
class ObjectRecord:
    """What the pipeline keeps of one stored object while its study runs.

    A few short strings, never the header: the header of an object can
    carry private elements of hundreds of MiB, and a study holds up to
    thousands of objects.

    Attributes
    ----------
    path : Path
    sop_uid, series_uid, sop_class_uid : str
        The object's UIDs (for the outcome and the SR's references).
    is_image : bool
        The header has Rows: an image, whose pixel data is worth decoding.
    identity : tuple of (str, str)
        ``(keyword, value)`` for each of :data:`IDENTITY_KEYS`, the value
        stripped and upper-cased as :func:`check_identity` compares them.
    unread_identity : tuple of str
        Those of :data:`IDENTITY_KEYS` too large to read (no valid value is).
    """

    path: Path
    sop_uid: str
    series_uid: str
    sop_class_uid: str
    is_image: bool
    identity: tuple[tuple[str, str], ...]
    unread_identity: tuple[str, ...] = ()

    @classmethod
    def from_header(cls, path: Path, header: BoundedHeader | Dataset) -> ObjectRecord:
        """The record of ``header`` (a bounded read, or a plain data set in tests)."""
        ds = header.dataset if isinstance(header, BoundedHeader) else header
        skipped = set(header.skipped_keywords()) if isinstance(header, BoundedHeader) else set()
        return cls(
            path=Path(path),
            sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
            is_image=bool(ds.get("Rows")),
            identity=tuple((key, str(ds.get(key, "") or "").strip().upper()) for key in IDENTITY_KEYS),
            unread_identity=tuple(key for key in IDENTITY_KEYS if key in skipped),
        )


def read_record(path: Path) -> ObjectRecord:
    """Read one stored object's header, bounded, into its :class:`ObjectRecord`."""
    return ObjectRecord.from_header(path, read_header(path))


def check_identity(records: Sequence[ObjectRecord]) -> None:
    """Refuse a study whose objects disagree on who the patient is.

    An SR goes to every object's patient at once; one object filed under the
    wrong patient (a cart left on the previous patient's worklist entry)
    must stop the report, not be averaged in. An identifying attribute too
    large to read (over :data:`echonode.header.MAX_ELEMENT_BYTES`, where
    DICOM allows at most a few hundred bytes) cannot be compared, and stops
    the report too.

    Raises
    ------
    StudyRefused
        Naming the attribute (never its values).
    """
    for key in IDENTITY_KEYS:
        if any(key in r.unread_identity for r in records):
            raise StudyRefused(
                f"an object's {key} is over {MAX_ELEMENT_BYTES >> 20} MiB and was not read; not reported"
            )
        values = {dict(r.identity)[key] for r in records}
        if len(values) > 1:
            raise StudyRefused(f"objects of this study disagree on {key}; not reported")


@dataclass
class _Decoded:
    outcome: VideoOutcome
    frames: dict[PreprocessConfig, np.ndarray] | None
    seconds: float = 0.0
    #: Preprocessings this video could not be given (a ``physical`` framing
    #: of a video without calibration), with why; the others still run.
    refused: dict[PreprocessConfig, str] = field(default_factory=dict)


def _outcome(record: ObjectRecord, reason: str | None = None) -> VideoOutcome:
    return VideoOutcome(str(record.path), record.sop_uid, record.series_uid, record.sop_class_uid, reason=reason)


def _decode_one(record: ObjectRecord, configs: Sequence[PreprocessConfig], threads: int | None) -> _Decoded:
    t0 = time.perf_counter()
    decoded = _decode(record, configs, threads)
    decoded.seconds = time.perf_counter() - t0
    return decoded


def _decode(record: ObjectRecord, configs: Sequence[PreprocessConfig], threads: int | None) -> _Decoded:
    outcome = _outcome(record)
    try:
        video: DecodedVideo = decode_video(record.path, decode_options_for(configs), threads=threads)
        frames: dict[PreprocessConfig, np.ndarray] = {}
        refused: dict[PreprocessConfig, str] = {}
        for cfg in configs:
            try:
                frames[cfg] = preprocess_video(video, cfg)
            except UnusableObject as exc:
                refused[cfg] = exc.reason
        if not frames and refused:
            raise UnusableObject("; ".join(dict.fromkeys(refused.values())))
    except UnusableObject as exc:
        outcome.reason = exc.reason
        return _Decoded(outcome, None)
    except Exception as exc:  # one bad object must not fail the study
        outcome.reason = f"cannot read: {type(exc).__name__}"
        # Type and frames, never the message: a library's can quote a data element.
        log.warning("pipeline.decode_error", sop_uid=outcome.sop_uid, exc_info=exc)
        return _Decoded(outcome, None)
    outcome.usable = True
    outcome.n_frames = int(video.frames.shape[0])
    outcome.fps = float(video.fps)
    return _Decoded(outcome, frames, refused=refused)


def analyse_study(
    study_uid: str,
    paths: Sequence[Path],
    models: ModelSet,
    *,
    views: Sequence[str] = ("plax",),
    batch_size: int = 8,
    max_videos: int = 64,
    decode_threads: int = 2,
) -> StudyAnalysis:
    """Run every installed model on one study.

    Parameters
    ----------
    study_uid : str
    paths : sequence of Path
        The study's stored objects (any SOP class: unusable ones are skipped
        with a reason).
    models : ModelSet
        The models to run: at most one per task; a ``view`` bundle filters
        the videos the task bundles see.
    views : sequence of str
        View labels kept when a view bundle is installed.
    batch_size : int
        Clips per forward pass.
    max_videos : int
        At most this many objects are decoded.
    decode_threads : int
        Objects decoded ahead of inference.

    Returns
    -------
    StudyAnalysis

    Raises
    ------
    StudyRefused
        When the images disagree on the patient's identity (other objects,
        a cart's measurement SR among them, are not compared when the study
        has images: they are not analysed and the SR copies an image's header).
    """
    task_bundles = [b for b in models.bundles if b.task != "view"]
    view_bundle = models.by_task("view")
    records = _read_records(paths)
    # Frames of images only: SRs, documents and the like are skipped up front.
    # The headers were read without pixel data, so Rows is what says "image".
    candidates = [r for r in records if r.is_image]
    # The images are what the SR reports on: they must agree. A cart's
    # measurement SR with an empty birth date, or a different spelling of the
    # name, is not read here and must not hold back the study's SR.
    check_identity(candidates or records)
    skipped = [_outcome(r, "no pixel data") for r in records if not r.is_image]
    if len(candidates) > max_videos:
        skipped.extend(_outcome(r, f"beyond models.max_videos={max_videos}") for r in candidates[max_videos:])
        candidates = candidates[:max_videos]

    configs = list(dict.fromkeys(preprocess_config(b) for b in [*task_bundles, *([view_bundle] if view_bundle else [])]))
    view_filter = (
        f"view classifier {view_bundle.name} {view_bundle.version}: kept {', '.join(views)}"
        if view_bundle
        else "no view classifier installed: every usable video used"
    )
    timings = {"decode_s": 0.0, "decode_wait_s": 0.0, "infer_s": 0.0}
    batcher = _ClipBatcher(task_bundles, configs, batch_size, timings)
    outcomes: list[VideoOutcome] = []
    for decoded in _decode_ahead(candidates, configs, max(1, decode_threads), timings):
        idx = len(outcomes)
        outcomes.append(decoded.outcome)
        if decoded.frames is None:
            continue
        if view_bundle is not None and not _keep_view(decoded, view_bundle, views, batch_size, timings):
            continue
        decoded.outcome.used = True
        not_measured = [f"not measured by {b.task}: {decoded.refused[cfg]}" for b, cfg in batcher.add(idx, decoded.frames)]
        if not_measured:
            decoded.outcome.reason = "; ".join(not_measured)
    batcher.finish()
    tasks = _task_outcomes(task_bundles, batcher.clip_probs, outcomes)
    all_outcomes = outcomes + skipped
    reason = None if tasks else _why_no_result(task_bundles, all_outcomes, views)
    header = str(candidates[0].path) if candidates else (str(records[0].path) if records else None)
    return StudyAnalysis(study_uid, all_outcomes, tasks, view_filter, reason, header,
                         timings={k: round(v, 4) for k, v in timings.items()})


def _read_records(paths: Sequence[Path]) -> list[ObjectRecord]:
    """One bounded read per object, kept as a record of a few strings.

    The study's memory does not grow with what its headers carry. An object
    that no longer parses is logged and left out.
    """
    records: list[ObjectRecord] = []
    for path in paths:
        try:
            records.append(read_record(Path(path)))
        except Exception as exc:  # noqa: BLE001 - a stored object that no longer parses
            log.warning("pipeline.unreadable_header", path=str(path), error=type(exc).__name__)
    return records


def _decode_ahead(
    candidates: Sequence[ObjectRecord], configs: Sequence[PreprocessConfig], workers: int, timings: dict[str, float]
) -> Iterator[_Decoded]:
    """Decode ``candidates`` on ``workers`` threads, yielding them in order.

    ``timings`` gains the decode threads' busy time (``decode_s``) and the
    time spent waiting for a decoded video (``decode_wait_s``).

    Decoding runs ahead of inference by at most one object per thread (and
    one ready): a decoded video waiting for the model is held in memory, so
    an unbounded look-ahead would hold the whole study's.
    """
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        todo = iter(candidates)
        futures: collections.deque[cf.Future[_Decoded]] = collections.deque(
            pool.submit(_decode_one, r, configs, 1) for r in itertools.islice(todo, workers + 1)
        )
        try:
            while futures:
                t0 = time.perf_counter()
                decoded = futures.popleft().result()
                timings["decode_wait_s"] += time.perf_counter() - t0
                timings["decode_s"] += decoded.seconds
                following = next(todo, None)
                if following is not None:
                    futures.append(pool.submit(_decode_one, following, configs, 1))
                yield decoded
        finally:
            for fut in futures:
                fut.cancel()


def _keep_view(
    decoded: _Decoded, view_bundle: Bundle, views: Sequence[str], batch_size: int, timings: dict[str, float]
) -> bool:
    """Classify the video's view (recorded on its outcome); whether the task models see it."""
    assert decoded.frames is not None
    vcfg = preprocess_config(view_bundle)
    if vcfg not in decoded.frames:
        decoded.outcome.reason = f"view not classified: {decoded.refused[vcfg]}"
        return False
    clips = make_eval_clips(decoded.frames[vcfg], vcfg)
    t0 = time.perf_counter()
    vprobs = view_bundle.predict(clips, batch_size=batch_size)
    timings["infer_s"] += time.perf_counter() - t0
    mean = vprobs.mean(axis=0)
    best = int(np.argmax(mean))
    decoded.outcome.view = view_bundle.labels[best]
    decoded.outcome.view_probability = float(mean[best])
    if decoded.outcome.view not in views:
        decoded.outcome.reason = f"view {decoded.outcome.view} not in models.views"
        return False
    return True


class _ClipBatcher:
    """Clips of the used videos, batched across videos for each task model.

    ``clip_probs[task][video index]`` collects each clip's probability;
    ``timings["infer_s"]`` the seconds in the networks.
    """

    def __init__(
        self, task_bundles: Sequence[Bundle], configs: Sequence[PreprocessConfig], batch_size: int,
        timings: dict[str, float],
    ) -> None:
        self.timings = timings
        self.task_bundles = list(task_bundles)
        self.batch_size = batch_size
        # Only the preprocessings some task model needs (the view model's may differ).
        self.configs = [c for c in configs if any(preprocess_config(b) == c for b in self.task_bundles)]
        self.pending: dict[PreprocessConfig, list[tuple[int, np.ndarray]]] = {c: [] for c in self.configs}
        self.clip_probs: dict[str, dict[int, list[float]]] = {b.task: {} for b in self.task_bundles}

    def add(self, idx: int, frames: dict[PreprocessConfig, np.ndarray]) -> list[tuple[Bundle, PreprocessConfig]]:
        """Queue video ``idx``'s clips; run the models on every full batch.

        Returns the task models whose preprocessing the video lacks, with
        that preprocessing (they do not see the video).
        """
        for cfg in self.configs:
            if cfg in frames:
                self.pending[cfg].append((idx, make_eval_clips(frames[cfg], cfg)))
                self._flush(cfg, force=False)
        return [(b, preprocess_config(b)) for b in self.task_bundles if preprocess_config(b) not in frames]

    def finish(self) -> None:
        """Run the models on what is still queued."""
        for cfg in self.configs:
            self._flush(cfg, force=True)

    def _flush(self, cfg: PreprocessConfig, force: bool) -> None:
        queue = self.pending[cfg]
        n = sum(len(c) for _, c in queue)
        if not queue or (n < self.batch_size and not force):
            return
        owners = np.concatenate([np.full(len(c), i) for i, c in queue])
        clips = np.concatenate([c for _, c in queue])
        queue.clear()
        for b in self.task_bundles:
            if preprocess_config(b) != cfg:
                continue
            t0 = time.perf_counter()
            probs = b.predict(clips, batch_size=self.batch_size)
            self.timings["infer_s"] += time.perf_counter() - t0
            for owner, p in zip(owners.tolist(), probs.tolist(), strict=True):
                self.clip_probs[b.task].setdefault(owner, []).append(float(p))


def _task_outcomes(
    task_bundles: Sequence[Bundle], clip_probs: dict[str, dict[int, list[float]]], outcomes: list[VideoOutcome]
) -> dict[str, TaskOutcome]:
    """Video probabilities (mean of its clips) and study probabilities (mean of its videos), per task."""
    tasks: dict[str, TaskOutcome] = {}
    for b in task_bundles:
        per_video: dict[str, float] = {}
        for idx, probs in clip_probs[b.task].items():
            p = float(np.mean(probs))
            outcomes[idx].probabilities[b.task] = p
            per_video[outcomes[idx].sop_uid] = p
        if per_video:
            study_p = float(np.mean(list(per_video.values())))
            tasks[b.task] = TaskOutcome(b, study_p, study_p >= b.threshold, per_video)
    return tasks


def _why_no_result(task_bundles: Sequence[Bundle], outcomes: Sequence[VideoOutcome], views: Sequence[str]) -> str:
    """The reason a study has no task result."""
    if not task_bundles:
        return "no task model installed"
    if not any(v.usable for v in outcomes):
        reasons = sorted({v.reason or "" for v in outcomes})
        return "no usable video (" + "; ".join(reasons)[:300] + ")" if reasons else "no objects"
    used = [v for v in outcomes if v.used]
    if used:
        reasons = sorted({v.reason or "" for v in used})
        return "no video the task models could measure (" + "; ".join(reasons)[:300] + ")"
    return f"no video of view {', '.join(views)}"
