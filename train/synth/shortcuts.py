"""Shortcut check: no simple non-anatomical statistic of an archive separates a label.

For every study of a written archive, statistics a model could latch onto
without looking at the heart: mean brightness of the frames, file size, frame
count, frame rate, sector geometry (depth, pixel size, region width), heart
rate, the scanner make (one indicator per make) and the order of the UIDs and
accession numbers.  Each is scored as a predictor of each label with
:func:`train.metrics.auroc`; a shortcut-free archive keeps every AUROC near
0.5 (``bench/synth_shortcuts.py`` asks for 0.40-0.60 on a large archive).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.encaps import generate_frames

from train.metrics import auroc

__all__ = ["ShortcutScore", "score_shortcuts", "shortcuts_found", "study_statistics"]

TASKS = ("lvh", "severe_as")


@dataclass(frozen=True)
class ShortcutScore:
    """One statistic scored against one label."""

    statistic: str
    task: str
    auroc: float
    n_pos: int
    n_neg: int

    @property
    def standard_error(self) -> float:
        """Hanley-McNeil standard error of the AUROC under the null (0.5)."""
        n1, n0 = max(self.n_pos, 1), max(self.n_neg, 1)
        return math.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0))


def _first_frame_mean(ds: pydicom.Dataset) -> float:
    """Mean luma of the first frame, decoded from its JPEG bytes (no colour conversion)."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    img = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_GRAYSCALE)
    return float(img.mean()) if img is not None else float("nan")


def study_statistics(archive: Path) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """Labels and non-anatomical statistics per study of a synth archive.

    Parameters
    ----------
    archive : pathlib.Path
        A folder written by :func:`train.synth.generate_archive`.

    Returns
    -------
    labels : dict
        ``study_uid -> {"lvh": 0/1, "severe_as": 0/1}``.
    stats : dict
        ``statistic -> {study_uid -> value}`` (study mean over its videos).
    """
    archive = Path(archive)
    with open(archive / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = {r["study_uid"]: {t: int(r[t]) for t in TASKS} for r in rows}
    acc_rank = {r["study_uid"]: i for i, r in enumerate(sorted(rows, key=lambda r: r["accession_number"]))}
    uid_rank = {u: i for i, u in enumerate(sorted(labels))}
    per_video: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    makes: set[str] = set()
    with open(archive / "videos.csv", newline="") as fh:
        videos = list(csv.DictReader(fh))
    for v in videos:
        path = archive / v["path"]
        ds = pydicom.dcmread(path)
        region = ds.SequenceOfUltrasoundRegions[0]
        s = per_video[v["study_uid"]]
        s["brightness"].append(_first_frame_mean(ds))
        s["file_size"].append(float(path.stat().st_size))
        s["frames"].append(float(ds.NumberOfFrames))
        s["fps"].append(float(ds.CineRate))
        s["heart_rate"].append(float(ds.HeartRate))
        s["pixel_size"].append(float(region.PhysicalDeltaY))
        s["depth"].append(float((region.RegionLocationMaxY1 - region.RegionLocationMinY0) * region.PhysicalDeltaY))
        s["region_width"].append(float(region.RegionLocationMaxX1 - region.RegionLocationMinX0))
        s["videos"].append(1.0)
        s["sop_uid_order"].append(float(int(ds.SOPInstanceUID.replace(".", "")[-12:])))
        s["make:" + str(ds.Manufacturer)].append(1.0)
        makes.add("make:" + str(ds.Manufacturer))
    stats: dict[str, dict[str, float]] = defaultdict(dict)
    for study, s in per_video.items():
        for name, values in s.items():
            stats[name][study] = float(np.sum(values) if name == "videos" else np.mean(values))
        for make in makes:
            stats[make].setdefault(study, 0.0)
        stats["study_uid_order"][study] = float(uid_rank[study])
        stats["accession_order"][study] = float(acc_rank[study])
    return labels, dict(stats)


def score_shortcuts(archive: Path) -> list[ShortcutScore]:
    """AUROC of every statistic of :func:`study_statistics` for every label.

    Parameters
    ----------
    archive : pathlib.Path
        A folder written by :func:`train.synth.generate_archive`.

    Returns
    -------
    list of ShortcutScore
        One per (statistic, task) with both classes present.
    """
    labels, stats = study_statistics(archive)
    out = []
    for name in sorted(stats):
        studies = sorted(stats[name])
        x = np.array([stats[name][s] for s in studies])
        for task in TASKS:
            y = np.array([labels[s][task] for s in studies])
            if 0 < y.sum() < len(y):
                out.append(ShortcutScore(name, task, auroc(y, x), int(y.sum()), int(len(y) - y.sum())))
    return out


def shortcuts_found(scores: list[ShortcutScore], *, band: float = 0.10, z: float = 0.0) -> list[ShortcutScore]:
    """The scores whose AUROC leaves ``0.5 +/- (band + z * standard error)``.

    ``z = 0`` is the plain band (0.40-0.60 by default) for a large archive; a
    small archive (a test) widens it by its sampling error.
    """
    return [s for s in scores if abs(s.auroc - 0.5) > band + z * s.standard_error]
