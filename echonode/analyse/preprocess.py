"""Turn decoded greyscale video into model-ready clips (METHOD.md, "Input").

One implementation for the node and for ``train/``; training adds
augmentation on top of :func:`training_clip` and nothing else.

The steps (METHOD.md's, with the framing choice below):

1. keep the first ``max_frames`` (100) native frames. EchoCLR does *not*
   resample in time: it drops videos under 25 fps (mostly Doppler; done by
   :func:`echonode.analyse.decode.decode_video` through ``min_fps``) and keeps native
   frames. ``PreprocessConfig.target_fps`` optionally resamples to a fixed
   rate (nearest frame); it is off by default so results match the method;
2. mask everything outside the ultrasound sector (:func:`sector_mask`);
3. frame the square input (``PreprocessConfig.framing``): ``sector`` (the
   default) crops to the sector's bounding box and pads to a centred square,
   keeping the aspect ratio; ``frame`` resizes the whole masked frame to the
   square, as the EchoCLR authors' code does (aspect not kept); ``physical``
   takes a window of ``field_cm`` centimetres hung from the transducer face
   on the beam axis where the calibration states them (else from the moving
   sector's top, centred on it), at the pixel size the image's calibrated
   region states, so one
   input pixel is the same size in every video (a video without a
   believable calibration is refused). Each way to ``size`` x ``size`` with
   area interpolation;
4. cut clips: 4 evenly spaced 16-frame clips for evaluation
   (:func:`make_eval_clips`), one random clip for training
   (:func:`training_clip`); per-clip min-max normalisation to [0, 1]; the
   single grey channel repeated to 3.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import cv2
import numpy as np

from echonode.analyse.decode import (
    DecodedVideo,
    DecodeOptions,
    UnusableObject,
    decode_video,
)
from echonode.analyse.preprocess_config import MASK_MIN_SIDE, SECTOR_MASK_RULE, PreprocessConfig

__all__ = [
    "SECTOR_MASK_RULE",
    "PreprocessConfig",
    "decode_options_for",
    "eval_clip_starts",
    "make_eval_clips",
    "normalise_clip",
    "preprocess_file",
    "preprocess_video",
    "resample_fps",
    "sector_mask",
    "training_clip",
]


# --------------------------------------------------------------------------
# Sector mask

# SECTOR_MASK_RULE (the version of sector_mask's rule) lives in
# preprocess_config, which the node reads without loading image code.

# A pixel whose grey level changes by more than this over the first frames is
# live image. Speckle in the darkest part of a sector still moves by tens of
# levels; burned-in text and icons move by 0 (JPEG leaves static areas
# static frame to frame), so the threshold only has to clear coding noise.
_MOTION_THRESHOLD = 3
# Static fallback (one frame, or a frozen loop): binarise the intensity.
_INTENSITY_THRESHOLD = 10
# A mask smaller than this fraction of the frame is not a sector.
_MIN_SECTOR_FRACTION = 0.02
# A moving region at least this share of the largest one is part of the sector
# too, when it is tissue (see _hull_of_moving_sector).
_PART_OF_LARGEST = 0.1


def sector_mask(frames: np.ndarray, *, n_frames: int = 32) -> np.ndarray:
    """Boolean mask of the ultrasound sector.

    METHOD.md's recipe is the convex hull of the largest connected component
    of the binarised first frame. On real carts that component often swallows
    burned-in text, the depth scale or a menu bar that touch or nearly touch
    the sector. Those overlays are static while the sector is alive with
    speckle, so with several frames the binarised image is the *temporal
    range* (max - min) over the first ``n_frames`` frames instead; a
    morphological opening then cuts thin bridges (an ECG trace, tick marks).
    Blood pools are black and still, and a chamber that spans the sector
    (a PLAX right ventricle, a dilated LV) cuts the moving tissue into
    bands, so the mask is the filled convex hull of the largest moving
    region and of every other at least a tenth its size that is tissue (its
    typical pixel is grey most of the time; an ECG trace sweeping a band
    lights each pixel only now and then), not of the largest alone, which
    would crop the picture to one band and change its scale from video to
    video. A single frame, or a loop without motion, falls back to
    METHOD's intensity threshold on the first frame, largest component only
    (static overlays are in that image too).

    Parameters
    ----------
    frames : numpy.ndarray
        ``(H, W)`` single frame or ``(T, H, W)`` video, ``uint8``.
    n_frames : int
        Frames used for the temporal range.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool. All False when no sector-like region is found.
    """
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f'Argument "frames" must be (H, W) or (T, H, W), got shape {frames.shape}.')
    h, w = frames.shape[1:]
    # Opening kernel ~1/60 of the short side: 9 px at 480x640, 3 px at
    # 120x160; wide enough to cut 1-3 px lines and text strokes, narrow
    # enough to keep the sector's apex.
    k = max(3, int(round(min(h, w) / 60))) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))

    mask = np.zeros((h, w), dtype=bool)
    if frames.shape[0] >= 2:
        head = frames[: max(2, n_frames)]
        motion = cv2.subtract(head.max(axis=0), head.min(axis=0)) > _MOTION_THRESHOLD
        mask = _hull_of_moving_sector(motion, head, kernel)
    if mask.sum() < _MIN_SECTOR_FRACTION * h * w:
        mask = _hull_of_largest(frames[0] > _INTENSITY_THRESHOLD, kernel)
    if mask.sum() < _MIN_SECTOR_FRACTION * h * w:
        return np.zeros((h, w), dtype=bool)
    return mask


def _hull_of_moving_sector(motion: np.ndarray, head: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filled convex hull of the largest moving component after opening and of
    the other large ones whose pixels are grey most of the time (tissue)."""
    b = cv2.morphologyEx(motion.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(b, connectivity=8)
    if n < 2:
        return np.zeros(motion.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = 1 + int(np.argmax(areas))
    parts = [largest]
    for label in 1 + np.flatnonzero(areas >= _PART_OF_LARGEST * areas.max()):
        if label == largest:
            continue
        ys, xs = np.nonzero(labels == label)
        if np.median(np.median(head[:, ys, xs], axis=0)) > _INTENSITY_THRESHOLD:
            parts.append(int(label))
    return _filled_hull(np.isin(labels, parts))


def _hull_of_largest(binary: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filled convex hull of the largest 8-connected component after opening."""
    b = cv2.morphologyEx(binary.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(b, connectivity=8)
    if n < 2:
        return np.zeros(binary.shape, dtype=bool)
    return _filled_hull(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))


def _filled_hull(region: np.ndarray) -> np.ndarray:
    """The filled convex hull of a non-empty boolean region."""
    out = np.zeros(region.shape, dtype=np.uint8)
    points = cv2.findNonZero(region.astype(np.uint8))
    cv2.fillConvexPoly(out, cv2.convexHull(points), 1)
    return out.astype(bool)


# --------------------------------------------------------------------------
# Video -> (T, size, size)


def resample_fps(frames: np.ndarray, fps: float, target_fps: float) -> np.ndarray:
    """Resample frames in time to ``target_fps`` by nearest frame.

    Parameters
    ----------
    frames : numpy.ndarray
        ``(T, ...)`` frames at ``fps``.
    fps, target_fps : float
        Source and wanted frame rates.

    Returns
    -------
    numpy.ndarray
        ``(T', ...)`` with ``T' = floor((T - 1) * target_fps / fps) + 1``.
    """
    if fps <= 0 or target_fps <= 0:
        raise ValueError("Frame rates must be positive.")
    n = frames.shape[0]
    if n == 0 or math.isclose(fps, target_fps, rel_tol=1e-3):
        return frames
    n_out = int(math.floor((n - 1) * target_fps / fps + 1e-9)) + 1
    # floor(x + 0.5), not np.round: banker's rounding would alternate the
    # direction of ties and make the frame spacing uneven.
    idx = np.floor(np.arange(n_out) * (fps / target_fps) + 0.5).astype(int)
    idx = np.minimum(idx, n - 1)
    return frames[idx]


def preprocess_video(video: DecodedVideo, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Masked, framed (``cfg.framing``), square, resized greyscale frames.

    Parameters
    ----------
    video : DecodedVideo
        Output of :func:`echonode.analyse.decode.decode_video`.
    cfg : PreprocessConfig, optional
        Defaults to ``PreprocessConfig()``.

    Returns
    -------
    numpy.ndarray
        ``(T, size, size)`` ``uint8``, ``T <= cfg.max_frames``.

    Raises
    ------
    UnusableObject
        When no ultrasound sector is found (a blank or static-black video);
        with ``physical`` framing, when the video states no believable pixel
        size or its window would be far larger than the image.
    """
    cfg = cfg or PreprocessConfig()
    if cfg.framing == "physical" and video.spacing is None:
        # Checked before any image work: the answer does not depend on the pixels.
        raise UnusableObject("no calibrated 2D tissue region (Sequence of Ultrasound Regions) to measure in cm")
    frames = video.frames
    if cfg.target_fps is not None:
        frames = resample_fps(frames, video.fps, cfg.target_fps)
    frames = frames[: cfg.max_frames]
    if frames.shape[0] == 0:
        raise UnusableObject("no frames")

    mask = sector_mask(frames, n_frames=cfg.mask_frames)
    if not mask.any():
        raise UnusableObject("no ultrasound sector found")
    if cfg.framing == "frame":
        return _resize_whole(frames * mask, cfg.size)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if cfg.framing == "physical":
        assert video.spacing is not None  # checked above
        # The window hangs from the transducer face on the beam axis where the
        # calibration says where they are; otherwise from the top of the
        # moving sector, centred on it (a still near field moves that down).
        top, centre = video.spacing.origin or (float(y0), (x0 + x1) / 2.0)
        return _physical_window(frames * mask, top, centre,
                                video.spacing.row_cm, video.spacing.col_cm, cfg.field_cm, cfg.size)
    crop = frames[:, y0:y1, x0:x1] * mask[y0:y1, x0:x1]
    return _square_resize(crop, cfg.size)


#: A physical window more than this many times the image's larger side means
#: a pixel size that cannot be this image's (a calibration in other units).
_MAX_WINDOW_RATIO = 4.0


def _physical_window(
    frames: np.ndarray, top: float, centre_col: float, row_cm: float, col_cm: float, field_cm: float, size: int
) -> np.ndarray:
    """A ``field_cm`` square window from row ``top``, centred on ``centre_col``, resized to ``size``.

    The part of the window inside the image is resized to its share of the
    output and pasted into a zero canvas, which is the same as padding the
    window first and cheaper.
    """
    t, rows, cols = frames.shape
    win_h, win_w = field_cm / row_cm, field_cm / col_cm
    if max(win_h, win_w) > _MAX_WINDOW_RATIO * max(rows, cols):
        raise UnusableObject(
            f"a {field_cm:g} cm window is {max(win_h, win_w):.0f} pixels at the stated pixel size, "
            f"beyond {_MAX_WINDOW_RATIO:g} x this {rows}x{cols} image: implausible calibration"
        )
    left = centre_col - win_w / 2.0
    r0, r1 = max(0, int(round(top))), min(rows, int(round(top + win_h)))
    c0, c1 = max(0, int(round(left))), min(cols, int(round(left + win_w)))
    sy, sx = size / win_h, size / win_w
    oy0, oy1 = max(0, int(round((r0 - top) * sy))), min(size, int(round((r1 - top) * sy)))
    ox0, ox1 = max(0, int(round((c0 - left) * sx))), min(size, int(round((c1 - left) * sx)))
    out = np.zeros((t, size, size), dtype=np.uint8)
    if oy1 <= oy0 or ox1 <= ox0 or r1 <= r0 or c1 <= c0:
        return out
    for i in range(t):
        out[i, oy0:oy1, ox0:ox1] = cv2.resize(
            frames[i, r0:r1, c0:c1], (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA
        )
    return out


def _resize_whole(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize every ``(h, w)`` frame to ``size`` x ``size`` (aspect not kept)."""
    out = np.empty((frames.shape[0], size, size), dtype=np.uint8)
    for i in range(frames.shape[0]):
        out[i] = cv2.resize(frames[i], (size, size), interpolation=cv2.INTER_AREA)
    return out


def _square_resize(crop: np.ndarray, size: int) -> np.ndarray:
    """Pad ``(T, h, w)`` to a centred square and resize to ``size``.

    Resizing the crop to its share of the square and pasting it into a zero
    canvas is the same as padding first and resizing, and cheaper.
    """
    t, h, w = crop.shape
    side = max(h, w)
    new_h = max(1, int(round(h * size / side)))
    new_w = max(1, int(round(w * size / side)))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out = np.zeros((t, size, size), dtype=np.uint8)
    for i in range(t):
        out[i, top : top + new_h, left : left + new_w] = cv2.resize(
            crop[i], (new_w, new_h), interpolation=cv2.INTER_AREA
        )
    return out


def preprocess_file(
    path: str | os.PathLike[str], cfg: PreprocessConfig | None = None, options: DecodeOptions | None = None
) -> tuple[DecodedVideo, np.ndarray]:
    """Decode a stored object and preprocess it in one call.

    The decode is asked for the smallest JPEG reduction that still gives
    ``cfg.size`` pixels on the short side, and for only the frames kept.

    Parameters
    ----------
    path : str or os.PathLike
        The stored object.
    cfg : PreprocessConfig, optional
        Defaults to ``PreprocessConfig()``.
    options : DecodeOptions, optional
        Decoding settings (threads, limits); their size, frame and frame
        rate fields are replaced by what ``cfg`` needs.

    Returns
    -------
    tuple of (DecodedVideo, numpy.ndarray)
        The decoded video and its ``(T, size, size)`` ``uint8`` frames.

    Raises
    ------
    UnusableObject
        As :func:`echonode.analyse.decode.decode_video` and :func:`preprocess_video`.
    """
    cfg = cfg or PreprocessConfig()
    video = decode_video(path, decode_options_for([cfg], options))
    return video, preprocess_video(video, cfg)


def decode_options_for(configs: Sequence[PreprocessConfig], base: DecodeOptions | None = None) -> DecodeOptions:
    """The decoding that serves every one of ``configs`` at once.

    The largest side and frame count any of them needs, the lowest frame
    rate any accepts. With resampling the number of source frames needed
    depends on the frame rate, known only after reading the header: all
    frames are decoded then. A ``physical`` framing bounds the decoded pixel
    size by its input pixel's. Frames are never decoded under
    :data:`~echonode.analyse.preprocess_config.MASK_MIN_SIDE` on the short
    side: the sector mask needs them.
    """
    if not configs:
        raise ValueError('Argument "configs" must hold at least one PreprocessConfig.')
    resampling = any(c.target_fps is not None for c in configs)
    physical = [c.field_cm / c.size for c in configs if c.framing == "physical"]
    return dataclasses.replace(
        base or DecodeOptions(),
        target_side=max(MASK_MIN_SIDE, *(c.size for c in configs)),
        max_frames=None if resampling else max(c.max_frames for c in configs),
        min_fps=min(c.min_fps for c in configs),
        max_pixel_cm=min(physical) if physical else None,
    )


# --------------------------------------------------------------------------
# Clips


def eval_clip_starts(n_frames: int, clip_frames: int, n_clips: int) -> list[int]:
    """Evenly spaced clip starts, first at 0 and last ending at the last frame.

    Parameters
    ----------
    n_frames : int
        Frames in the video.
    clip_frames : int
        Frames per clip.
    n_clips : int
        Number of clips.

    Returns
    -------
    list of int
        ``n_clips`` starts; all 0 when the video is not longer than a clip
        (the clips are then zero-padded).

    Examples
    --------
    >>> eval_clip_starts(100, 16, 4)
    [0, 28, 56, 84]
    """
    if n_clips < 1 or clip_frames < 1:
        raise ValueError('Arguments "clip_frames" and "n_clips" must be positive.')
    last = max(0, n_frames - clip_frames)
    return [int(round(s)) for s in np.linspace(0, last, n_clips)]


def normalise_clip(clip_u8: np.ndarray) -> np.ndarray:
    """Per-clip min-max normalisation to [0, 1] as float32.

    A constant clip gives zeros (not NaN).

    Parameters
    ----------
    clip_u8 : numpy.ndarray
        Any shape, any real dtype.

    Returns
    -------
    numpy.ndarray
        float32, same shape, in [0, 1].
    """
    a = np.asarray(clip_u8, dtype=np.float32)
    if a.size == 0:
        return a
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a)
    return (a - lo) * np.float32(1.0 / (hi - lo))


def _clip_at(frames_u8: np.ndarray, start: int, clip_frames: int) -> np.ndarray:
    """Normalised ``(clip_frames, S, S)`` clip; frames past the end are zeros."""
    real = frames_u8[start : start + clip_frames]
    out = np.zeros((clip_frames,) + frames_u8.shape[1:], dtype=np.float32)
    out[: real.shape[0]] = normalise_clip(real)
    return out


def make_eval_clips(frames_u8: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Evaluation clips, model-ready.

    Parameters
    ----------
    frames_u8 : numpy.ndarray
        ``(T, S, S)`` ``uint8`` from :func:`preprocess_video`.
    cfg : PreprocessConfig, optional
        Defaults to ``PreprocessConfig()``.

    Returns
    -------
    numpy.ndarray
        ``(eval_clips, 3, clip_frames, S, S)`` float32 in [0, 1]; the grey
        channel repeated to 3; each clip normalised on its real frames, then
        zero-padded to ``clip_frames``.
    """
    cfg = cfg or PreprocessConfig()
    frames_u8 = np.asarray(frames_u8)
    if frames_u8.ndim != 3:
        raise ValueError(f'Argument "frames_u8" must be (T, S, S), got shape {frames_u8.shape}.')
    starts = eval_clip_starts(frames_u8.shape[0], cfg.clip_frames, cfg.eval_clips)
    out = np.empty((len(starts), 3, cfg.clip_frames) + frames_u8.shape[1:], dtype=np.float32)
    for i, s in enumerate(starts):
        out[i, :] = _clip_at(frames_u8, s, cfg.clip_frames)  # broadcast to 3 channels
    return out


def training_clip(
    frames: np.ndarray, clip_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """One clip from a uniformly random start, zero-padded, still ``uint8``.

    Training applies its augmentation to the ``uint8`` clip and then calls
    :func:`normalise_clip`.

    Parameters
    ----------
    frames : numpy.ndarray
        ``(T, S, S)`` frames.
    clip_frames : int
        Frames per clip (4 for pretraining, 16 for fine-tuning).
    rng : numpy.random.Generator
        Source of the start.

    Returns
    -------
    numpy.ndarray
        ``(clip_frames, S, S)``, same dtype as ``frames``.
    """
    n = frames.shape[0]
    start = int(rng.integers(0, max(0, n - clip_frames) + 1))
    out = np.zeros((clip_frames,) + frames.shape[1:], dtype=frames.dtype)
    real = frames[start : start + clip_frames]
    out[: real.shape[0]] = real
    return out
