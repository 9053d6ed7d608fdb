"""Calibration clips stored with a bundle: inputs that look like the bundle's own.

The node chooses an inference runtime for each bundle by measuring it
(:mod:`echonode.bundles.runtime_select`): each candidate's probabilities are compared
with the eager fp32 network's on *calibration clips*. Uniform noise or
cartoon clips do not move a trained network the way real echoes do, so
training writes a few of its own preprocessed evaluation clips into the
bundle as ``calibration.npz``:

``clips``
    ``float16`` ``(N, clip_frames, size, size)`` in [0, 1]: the grey channel
    of clips exactly as :meth:`echonode.bundles.weights.Bundle.predict` receives them
    (per-clip min-max scaled, before the bundle's normalisation; the network
    sees the grey frame repeated to three channels).
``source``
    A short text: where they come from (``"validation:6,training:2"`` for a
    fine-tuning run's clips, ``"synthetic"`` for echo-like clips drawn by
    :func:`echonode.bundles.runtime.synthetic_clips` when no data was at hand).
``format``
    Integer layout version (1).

The file holds pixels of the training archive (a few low-resolution grey
clips, no DICOM header, no identifiers); a site that may not share them
trains with ``--calibration-clips 0`` and the node falls back to synthetic
clips with a warning.

This module needs numpy only (the node process reads nothing here; the
worker and ``train`` do).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

__all__ = [
    "CALIBRATION_FILE",
    "CALIBRATION_FORMAT",
    "DEFAULT_CALIBRATION_CLIPS",
    "CalibrationError",
    "encode_calibration",
    "read_calibration",
]

#: The file's name inside a bundle folder.
CALIBRATION_FILE = "calibration.npz"
#: Layout version written and read.
CALIBRATION_FORMAT = 1
#: Clips training writes by default: enough for the accuracy check to see
#: several decisions, few enough that a check costs seconds.
DEFAULT_CALIBRATION_CLIPS = 8
# Larger stores are refused on read: the check never needs more, and a
# bundle is loaded into memory.
_MAX_CLIPS = 256


class CalibrationError(ValueError):
    """A ``calibration.npz`` that cannot be used; the message says why."""


def encode_calibration(clips: np.ndarray, source: str) -> bytes:
    """The bytes of a ``calibration.npz``.

    Parameters
    ----------
    clips : numpy.ndarray
        ``(N, T, S, S)`` grey clips in [0, 1], or ``(N, C, T, S, S)`` whose
        first channel is kept (the channels of an echo clip are copies).
    source : str
        Where the clips come from (stored as is).

    Returns
    -------
    bytes
        A compressed ``.npz`` for :func:`echonode.bundles.weights.save_bundle`'s
        ``extra_files``.

    Raises
    ------
    CalibrationError
        For a wrong shape, no clips, or values outside [0, 1].
    """
    array = np.asarray(clips, dtype=np.float32)
    if array.ndim == 5:
        array = array[:, 0]
    if array.ndim != 4 or array.shape[0] < 1 or array.shape[2] != array.shape[3]:
        raise CalibrationError(f"calibration clips must be (N, T, S, S) with N >= 1; got {tuple(np.shape(clips))}")
    if array.shape[0] > _MAX_CLIPS:
        raise CalibrationError(f"at most {_MAX_CLIPS} calibration clips; got {array.shape[0]}")
    if not np.isfinite(array).all() or float(array.min()) < 0.0 or float(array.max()) > 1.0:
        raise CalibrationError("calibration clips must be finite and in [0, 1] (per-clip min-max scaled)")
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        clips=array.astype(np.float16),
        source=np.array(str(source)),
        format=np.array(CALIBRATION_FORMAT),
    )
    return buffer.getvalue()


def read_calibration(folder: str | os.PathLike[str], clip_frames: int, size: int) -> tuple[np.ndarray, str]:
    """Read a bundle's calibration clips.

    Parameters
    ----------
    folder : str or path-like
        The bundle folder.
    clip_frames, size : int
        The bundle's clip shape; stored clips of another shape are refused.

    Returns
    -------
    clips : numpy.ndarray
        ``(N, 3, clip_frames, size, size)`` float32 in [0, 1], ready for the
        bundle's normalisation.
    source : str
        The stored ``source``.

    Raises
    ------
    FileNotFoundError
        When the bundle has no calibration file.
    CalibrationError
        When the file is unreadable or of the wrong layout or shape.
    """
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        # allow_pickle=False: a bundle is data; an object array is refused.
        with np.load(path, allow_pickle=False) as data:
            fmt = int(data["format"]) if "format" in data.files else -1
            if fmt != CALIBRATION_FORMAT:
                raise CalibrationError(f"{path}: format {fmt} is not {CALIBRATION_FORMAT}")
            clips = np.asarray(data["clips"], dtype=np.float32)
            source = str(data["source"]) if "source" in data.files else "unknown"
    except CalibrationError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, KeyError, ValueError (pickled arrays), OSError ...
        raise CalibrationError(f"{path}: unreadable ({type(exc).__name__})") from None
    want = (clip_frames, size, size)
    if clips.ndim != 4 or clips.shape[0] < 1 or tuple(clips.shape[1:]) != want:
        raise CalibrationError(f"{path}: clips of shape {clips.shape}, the bundle needs (N, {clip_frames}, {size}, {size})")
    if clips.shape[0] > _MAX_CLIPS:
        raise CalibrationError(f"{path}: {clips.shape[0]} clips, at most {_MAX_CLIPS} are read")
    if not np.isfinite(clips).all() or float(clips.min()) < 0.0 or float(clips.max()) > 1.0:
        raise CalibrationError(f"{path}: values outside [0, 1]")
    return np.repeat(clips[:, None], 3, axis=1), source
