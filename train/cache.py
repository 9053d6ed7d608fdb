"""Reading a clip cache: its manifest, its videos' frames, its patient split.

Cache layout (written by :mod:`train.index`)::

    CACHE/manifest.json          what is cached, how, and what was refused
    CACHE/videos/<sop_uid>.npy   (T, S, S) uint8 frames of one video

Frames are read with ``mmap_mode="r"``, so a data-loader worker touches only
the frames of the clip it cuts. The manifest holds no patient identifiers:
patients are a pseudonymous ``patient_key`` (:func:`train.splits.patient_key`),
enough to split by patient.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from train.splits import split_by_patient

__all__ = [
    "MANIFEST",
    "MANIFEST_VERSION",
    "CacheDirs",
    "ClipCache",
    "cache_argument",
    "load_manifest",
    "load_study_labels",
    "manifest_hash",
    "split_cache",
]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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


def _study_patient_keys(videos: Iterable[Mapping]) -> dict[str, set[str]]:
    """Study UID -> the patient keys its videos carry (one, unless a study
    was filed under two patients)."""
    keys: dict[str, set[str]] = defaultdict(set)
    for v in videos:
        keys[v["study_uid"]].add(v["patient_key"])
    return keys


CacheDirs = str | os.PathLike | Sequence[str | os.PathLike]


def cache_argument(values: Sequence[str]) -> str | tuple[str, ...]:
    """``--data``'s values as a run's configuration stores them: one cache
    as its path (as runs made before several caches could be given have
    it), several as a tuple."""
    return str(values[0]) if len(values) == 1 else tuple(str(v) for v in values)


class ClipCache:
    """Read access to a clip cache, or to several read as one.

    Several caches are typically the shards of one archive, each indexed on
    another machine (``echonode-train index --shard I/N``); their manifests
    are merged: the videos of all, in the order one cache of the whole
    archive would list them. A video (SOP Instance UID) in two caches is
    read from the first named and counted in :attr:`duplicates`.

    Parameters
    ----------
    cache_dirs : path or sequence of paths
        Folders written by :func:`train.index.build_index`, all with the
        same preprocessing settings.

    Raises
    ------
    FileNotFoundError
        If a folder holds no cache.
    ValueError
        If no folder is given, or the caches were preprocessed differently.
    """

    def __init__(self, cache_dirs: CacheDirs) -> None:
        roots = [Path(cache_dirs)] if isinstance(cache_dirs, (str, os.PathLike)) else [Path(d) for d in cache_dirs]
        if not roots:
            raise ValueError('Argument "cache_dirs" must name at least one cache.')
        manifests = [load_manifest(root) for root in roots]
        for root, manifest in zip(roots[1:], manifests[1:], strict=True):
            if manifest.get("preprocess") != manifests[0].get("preprocess"):
                raise ValueError(
                    f"{root}: preprocessed with {manifest.get('preprocess')}, {roots[0]} with "
                    f"{manifests[0].get('preprocess')}; caches read together must share their settings"
                )
        #: The caches, in the order given; :attr:`root` is the first.
        self.roots: tuple[Path, ...] = tuple(roots)
        self.root = roots[0]
        self._root_of: dict[str, Path] = {}
        #: Videos found in more than one cache (read from the first).
        self.duplicates = 0
        videos: list[dict] = []
        for root, manifest in zip(roots, manifests, strict=True):
            for v in manifest["videos"]:
                if v["sop_uid"] in self._root_of:
                    self.duplicates += 1
                    continue
                self._root_of[v["sop_uid"]] = root
                videos.append(v)
        if len(roots) == 1:
            self.manifest = manifests[0]
        else:
            videos.sort(key=lambda v: (v["study_uid"], v["series_uid"], v["sop_uid"]))
            self.manifest = {
                "version": manifests[0].get("version"), "preprocess": manifests[0]["preprocess"], "videos": videos,
                "unusable": sorted((u for m in manifests for u in m["unusable"]), key=lambda u: u["source"]["path"]),
                "caches": [str(root) for root in roots],
            }  # fmt: skip
        self.videos: list[dict] = list(videos)
        self.by_sop: dict[str, dict] = {v["sop_uid"]: v for v in self.videos}
        self.size = int(self.manifest["preprocess"]["size"])
        #: The sector-mask rule its frames were masked with
        #: (:data:`echonode.analyse.preprocess.SECTOR_MASK_RULE`); 1 for a
        #: cache made before the rule was recorded.
        self.sector_mask_rule = int(self.manifest["preprocess"].get("sector_mask", 1))
        #: Identifies the training data in provenance: the manifest's SHA-256
        #: for one cache; for several, the SHA-256 of theirs in the order given.
        self.manifest_sha256 = (
            manifest_hash(self.root) if len(roots) == 1
            else hashlib.sha256("\n".join(manifest_hash(root) for root in roots).encode()).hexdigest()
        )  # fmt: skip

    def frames(self, sop_uid: str) -> np.ndarray:
        """``(T, S, S)`` uint8 frames, memory-mapped (read-only)."""
        return np.load(self._root_of[sop_uid] / self.by_sop[sop_uid]["file"], mmap_mode="r")

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

