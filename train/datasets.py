"""Torch datasets over a clip cache: contrastive pairs and labelled clips.

Both read frames from a :class:`train.cache.ClipCache` (memory-mapped, one
``.npy`` per video) and cut clips with the node's own code
(:mod:`echonode.analyse.preprocess`), so training and evaluation see the
pixels the node sees at inference.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from echonode.analyse.preprocess import PreprocessConfig, make_eval_clips, training_clip
from train.augment import AugmentConfig, augment_clip
from train.cache import ClipCache
from train.losses import NUM_PERMUTATIONS, REORDER_FRAMES, permute_clip

__all__ = ["METHODS", "ClipDataset", "PairDataset"]

METHODS: tuple[str, ...] = ("echoclr", "mi-simclr", "simclr")


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
