"""The frame rate of a multi-frame object, from whichever timing it carries.

METHOD.md: frame rate from Frame Time (0018,1063) or Cine Rate (0018,0040),
30 fps when the object says nothing. The rules, in order; the first source
the object states decides:

1. Frame Time (0018,1063), ms between frames.
2. Frame Time Vector (0018,1065): the mean of its positive increments (its
   first entry is the zero before frame 1).
3. The functional groups of an enhanced multi-frame object (Enhanced US
   Volume, PS3.3 A.59; any object with Shared or Per-frame Functional
   Groups), which carry no Frame Time: per frame, Temporal Position Time
   Offset (0020,930D, s; Temporal Position Sequence), else Frame Reference
   DateTime (0018,9151) or Frame Acquisition DateTime (0018,9074) (Frame
   Content Sequence), else Nominal Cardiac Trigger Delay Time (0020,9153,
   ms; Cardiac Synchronization Sequence). The rate is the number of
   distinct time points less one over the time they span, so the frames of
   one volume (same time) count once: for a volume series it is the volume
   rate. A value in the Shared group is the same for every frame and says
   nothing about the rate.
4. Cine Rate (0018,0040), frames per second.
5. 30 fps.

A value of zero (or an empty, negative or unreadable one) states nothing:
writers put 0 where they do not know, and the next source is used.

A stated rate over :data:`MAX_PLAUSIBLE_FPS` is refused, not replaced:
:class:`ImplausibleTiming` names the element and the rate it implies. No
echo system records above about 1,000 frames/s (high-frame-rate research
scanners aside), so such a value is corrupt timing (Frame Time 0.001 ms
read as 1,000,000 fps), and an object whose header is known to be damaged
is not given a guessed rate: the rate decides whether a video is a Doppler
or M-mode strip (``min_fps``) and how it is resampled in time, and the
default 30 fps would pass a strip as cine. The video is listed unusable
with the reason; the study goes on with its other videos.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from echonode.analyse.values import as_float

__all__ = ["DEFAULT_FPS", "MAX_PLAUSIBLE_FPS", "ImplausibleTiming", "frame_rate", "frame_timing"]

#: Frame rate assumed when the object says nothing (METHOD.md).
DEFAULT_FPS = 30.0

#: A stated rate above this (frames per second) is corrupt timing.
MAX_PLAUSIBLE_FPS = 1000.0


class ImplausibleTiming(ValueError):
    """The object states a frame rate no ultrasound cine has.

    Parameters
    ----------
    reason : str
        Names the element and the rate it implies; never patient data.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def frame_rate(ds: Dataset) -> float:
    """Frame rate of a cine object in frames per second (see the module's rules).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The object's header.

    Returns
    -------
    float
        Frames per second, positive and at most :data:`MAX_PLAUSIBLE_FPS`.

    Raises
    ------
    ImplausibleTiming
        When the first timing the object states implies more than
        :data:`MAX_PLAUSIBLE_FPS`.
    """
    return frame_timing(ds)[0]


def frame_timing(ds: Dataset) -> tuple[float, str]:
    """Frame rate and the element it came from (``"default"`` when none).

    Raises
    ------
    ImplausibleTiming
        As :func:`frame_rate`.
    """
    ft = as_float(ds.get("FrameTime"))
    if ft is not None and ft > 0:
        return _plausible(1000.0 / ft, f"FrameTime {ft:g} ms"), "FrameTime"
    pos = [v for v in (as_float(x) for x in _values(ds.get("FrameTimeVector"))) if v is not None and v > 0]
    if pos:
        mean = sum(pos) / len(pos)
        return _plausible(1000.0 / mean, f"FrameTimeVector (mean increment {mean:g} ms)"), "FrameTimeVector"
    found = _functional_group_timing(ds)
    if found is not None:
        seconds_per_step, source = found
        return _plausible(1.0 / seconds_per_step, f"per-frame {source} ({seconds_per_step * 1000:g} ms a frame)"), source
    cine = as_float(ds.get("CineRate"))
    if cine is not None and cine > 0:
        return _plausible(cine, f"CineRate {cine:g}"), "CineRate"
    return DEFAULT_FPS, "default"


def _plausible(fps: float, stated: str) -> float:
    if not math.isfinite(fps) or fps > MAX_PLAUSIBLE_FPS:
        shown = f"{fps:.0f}" if math.isfinite(fps) else "unbounded"
        raise ImplausibleTiming(
            f"{stated} implies {shown} frames/s, over the {MAX_PLAUSIBLE_FPS:.0f} any ultrasound cine has"
            " (corrupt timing)"
        )
    return fps


# --------------------------------------------------------------------------
# Functional groups

#: (functional group sequence, attribute, its unit), in the order they are tried.
_FG_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("TemporalPositionSequence", "TemporalPositionTimeOffset", "seconds"),
    ("FrameContentSequence", "FrameReferenceDateTime", "datetime"),
    ("FrameContentSequence", "FrameAcquisitionDateTime", "datetime"),
    ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime", "ms"),
)


def _functional_group_timing(ds: Dataset) -> tuple[float, str] | None:
    """Seconds between distinct time points of the frames, and the attribute; None when not stated."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        # Only per-frame values can differ between frames; a Shared value
        # is one time point for the whole object.
        return None
    for group, attribute, unit in _FG_SOURCES:
        times = sorted({t for t in (_as_microseconds(v, unit) for v in _per_frame_values(per_frame, group, attribute))
                        if t is not None})
        if len(times) < 2:
            continue
        step = (times[-1] - times[0]) / (len(times) - 1) / 1_000_000.0
        if step > 0:
            return step, attribute
    return None


def _per_frame_values(per_frame: Any, group: str, attribute: str) -> Iterator[Any]:
    """The value of ``attribute`` in each frame's ``group`` item, where present."""
    for item in per_frame:
        seq = item.get(group) if isinstance(item, Dataset) else None
        if seq:
            first = seq[0]
            if isinstance(first, Dataset) and attribute in first:
                yield first.get(attribute)


_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _as_microseconds(value: Any, unit: str) -> float | None:
    """A time point in microseconds; None when absent or unreadable.

    Date-times are counted in whole microseconds (exact as a float up to
    the year 2255), so a difference of 1 us between two frames of today is
    not lost in the rounding of seconds since 1970.
    """
    if unit == "datetime":
        if value in (None, ""):
            return None
        try:
            dt: datetime = value if isinstance(value, pydicom.valuerep.DT) else pydicom.valuerep.DT(str(value))
            # A DT without an offset is in the object's own time zone, the
            # same for every frame: counted as UTC, so that no daylight
            # saving change of this machine's zone enters a difference.
            since = dt - (_EPOCH_UTC if dt.tzinfo is not None else _EPOCH)
            return float(since // _MICROSECOND)
        except (ValueError, TypeError, OverflowError):
            return None
    f = as_float(value)
    if f is None:
        return None
    return f * 1000.0 if unit == "ms" else f * 1_000_000.0


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]

