"""Decode a stored DICOM object into greyscale video frames.

Every multi-frame object the node stores goes through :func:`decode_video`,
whatever its transfer syntax and photometric interpretation. What comes out is
always the same: ``(T, H, W)`` ``uint8`` greyscale frames plus the frame rate
and the UIDs the report needs. Anything that is not usable cine video (a single
frame, a Doppler or M-mode strip, an SR, a document, broken pixel data) raises
:class:`UnusableObject` with a human-readable reason and never any other
exception type, so the worker can log and skip the object without a traceback.

Two paths:

* **Fast path**, JPEG baseline (``1.2.840.10008.1.2.4.50``) and 8-bit JPEG
  extended (``.51``), which is what nearly every echo cart sends: the raw
  JPEG fragments are handed to OpenCV's ``imdecode``. Asking for a greyscale
  decode makes libjpeg skip the chroma planes and the colour transform (for
  YCbCr data the grey we want *is* the luma plane), and the
  ``IMREAD_REDUCED_*`` flags make libjpeg scale in the DCT domain (1/2, 1/4,
  1/8), so a 480x640 frame meant for a 112x112 model costs a fraction of a
  full decode. ``imdecode`` releases the GIL, so frames are decoded on a few
  threads.
* **Fallback**, everything else (RLE, JPEG 2000, JPEG lossless, native, palette
  colour, 16 bit): pydicom's decoders (pylibjpeg, gdcm, Pillow), asking for
  YBR data *unconverted* (taking the Y plane is cheaper than pydicom's
  YBR->RGB followed by RGB->grey), then conversion to grey and the same
  power-of-two reduction by area averaging, so both paths give frames of the
  same shape for the same object.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, as_pixel_options, get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import UID

from echonode.analyse.frametiming import (
    DEFAULT_FPS,
    ImplausibleTiming,
    frame_rate,
    frame_timing,
)
from echonode.analyse.regions import PixelSpacing, tissue_spacing
from echonode.analyse.values import as_float, as_int
from echonode.dicomfile import RETIRED_US_STORAGE, check_inflated_size
from echonode.header import deferred_past_end, read_for_decode

__all__ = [
    "DecodeOptions",
    "DEFAULT_FPS",
    "DEFAULT_MAX_DECODED_BYTES",
    "DecodedVideo",
    "UnusableObject",
    "choose_reduction",
    "decode_dataset",
    "decode_video",
    "frame_rate",
]

#: Refuse objects whose decoded pixels would need more than this (2 GiB).
DEFAULT_MAX_DECODED_BYTES = 2 * 1024**3

# Rows/Columns outside this range are not an ultrasound cine from any cart we
# know of; they are corrupt headers or something else entirely.
_MIN_SIDE = 16
_MAX_SIDE = 8192
_MAX_FRAMES_DECLARED = 100_000

_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
_FAST_PATH_SYNTAXES = frozenset({_JPEG_BASELINE, _JPEG_EXTENDED})
_FAST_PATH_PHOTOMETRIC = frozenset(
    {"YBR_FULL_422", "YBR_FULL", "RGB", "MONOCHROME2", "MONOCHROME1"}
)

# SOP classes that are never video, refused by class before anything else so
# the reason says what the object *is* rather than "no pixel data".
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_DOCUMENT_PREFIX = "1.2.840.10008.5.1.4.1.1.104."
# Ultrasound (multi-frame) image, enhanced US volume, secondary capture,
# visible light: image classes whose missing pixel data means a broken file.
_IMAGE_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.6.",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.77.1.",
)

_REDUCED_GREY_FLAGS = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


class UnusableObject(Exception):
    """The object is not usable cine video.

    Parameters
    ----------
    reason : str
        Human-readable explanation; never contains patient data.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedVideo:
    """Greyscale frames of one cine object and what is needed to report on it.

    Attributes
    ----------
    frames : numpy.ndarray
        ``(T, H, W)`` ``uint8`` greyscale frames.
    fps : float
        Frame rate by :mod:`echonode.analyse.frametiming`'s rules: FrameTime,
        FrameTimeVector (mean), per-frame functional group timing, CineRate;
        30 when the object states none.
    fps_source : str
        The element the rate came from (``"FrameTime"``, ...), ``"default"``
        when none.
    study_uid, series_uid, sop_uid, sop_class_uid : str
        Identifiers of the source object.
    source_rows, source_cols : int
        Size of the stored frames.
    scale : float
        Decoded size / source size (``1 / reduction``); 1.0 at full size.
    n_frames_declared : int
        NumberOfFrames of the object (``T`` can be smaller with ``max_frames``).
    photometric : str
        Photometric Interpretation as stored.
    transfer_syntax : str
        Transfer Syntax UID as stored.
    fast_path : bool
        True when the frames came from the OpenCV JPEG path.
    spacing : PixelSpacing or None
        Centimetres per pixel of ``frames`` (the decoded size) from the
        image's 2D tissue region; None when it states no believable one
        (:func:`echonode.analyse.regions.tissue_spacing`).
    """

    frames: np.ndarray
    fps: float
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    source_rows: int
    source_cols: int
    scale: float
    n_frames_declared: int = 0
    photometric: str = ""
    transfer_syntax: str = ""
    fast_path: bool = False
    fps_source: str = ""
    spacing: PixelSpacing | None = None


def choose_reduction(rows: int, cols: int, target_side: int | None) -> int:
    """Largest power-of-two reduction (1, 2, 4, 8) that keeps the short side.

    Parameters
    ----------
    rows, cols : int
        Source frame size.
    target_side : int or None
        The decoded short side must stay ``>= target_side``; None means full
        size.

    Returns
    -------
    int
        1, 2, 4 or 8. libjpeg rounds reduced sizes up, so ``ceil(side / r)``
        is what the decoder produces and what is compared here.

    Examples
    --------
    >>> choose_reduction(480, 640, 112)
    4
    """
    if target_side is None or target_side <= 0:
        return 1
    short = min(rows, cols)
    for r in (8, 4, 2):
        if math.ceil(short / r) >= target_side:
            return r
    return 1


@dataclass(frozen=True)
class DecodeOptions:
    """How :func:`decode_video` reads an object.

    Attributes
    ----------
    target_side : int or None
        Decode at a reduced size (1/2, 1/4 or 1/8) as long as the short side
        stays ``>= target_side``. None: full size.
    max_frames : int or None
        Keep only the first ``max_frames`` frames; the rest are not decoded.
    min_frames : int
        Objects with fewer declared frames are refused.
    min_fps : float
        Objects slower than this are refused (Doppler and M-mode strips).
    max_decoded_bytes : int
        Refuse, before decoding, objects whose decoded pixels
        (Rows x Columns x frames to decode x Samples x bytes per sample)
        would exceed this.
    threads : int or None
        Threads for the JPEG fast path; default ``min(4, os.cpu_count())``.
    prefer_fast : bool
        Use the OpenCV JPEG path where it applies (default). False forces
        pydicom's decoders, for comparison and debugging.
    max_pixel_cm : float or None
        With a calibrated image, reduce no further than a decoded pixel of
        this many cm (a ``physical`` framing's input pixel), so that a
        window in cm is never enlarged from coarser pixels.
    """

    target_side: int | None = None
    max_frames: int | None = None
    min_frames: int = 8
    min_fps: float = 25.0
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    threads: int | None = None
    prefer_fast: bool = True
    max_pixel_cm: float | None = None


def decode_video(
    path: str | os.PathLike[str] | BinaryIO, options: DecodeOptions | None = None, **changes: Any
) -> DecodedVideo:
    """Read a stored DICOM object as greyscale video.

    Parameters
    ----------
    path : str, os.PathLike or binary file
        The stored object.
    options : DecodeOptions, optional
        How to decode; defaults to ``DecodeOptions()``.
    **changes
        Fields of :class:`DecodeOptions` to change from ``options``
        (``decode_video(path, max_frames=10)``).

    Returns
    -------
    DecodedVideo

    Raises
    ------
    UnusableObject
        For anything that is not usable video, including unreadable files and
        pixel data that fails to decode. No other exception type escapes.
    """
    opts = dataclasses.replace(options or DecodeOptions(), **changes)
    try:
        if isinstance(path, (str, os.PathLike)):
            check_inflated_size(Path(path), opts.max_decoded_bytes)
            with open(path, "rb") as fp:
                ds, stopped_at, size = _read_whole(fp)
        else:
            ds, stopped_at, size = _read_whole(path)
    except Exception as exc:  # pydicom raises many types for bad input
        raise UnusableObject(f"not a readable DICOM file ({_short(exc)})") from exc
    if stopped_at < size and "PixelData" not in ds:
        # Stopping short matters only when it cost the pixel data: GE writes
        # a stray top-level Item Delimitation Item, where pydicom stops
        # reading a complete file (padding after it is then left unread).
        raise UnusableObject(
            f"file is truncated (reading stopped at byte {stopped_at} of {size})"
        )
    cut = deferred_past_end(ds, size)
    if cut is not None:
        # A deferred element is skipped by a seek, which passes the end of
        # a file cut short without a word.
        raise UnusableObject(f"file is truncated (element {BaseTag(cut)} runs past its end, byte {size})")
    return decode_dataset(ds, opts)


def _read_whole(fp: BinaryIO) -> tuple[Dataset, int, int]:
    """Read a data set for decoding; also return where reading stopped and where the file ends.

    :func:`echonode.header.read_for_decode`: up to the pixel data, every
    element over :data:`echonode.header.MAX_ELEMENT_BYTES` deferred, so a
    large private element (a cart's raw data) is never read; the pixel data
    is read when it is decoded.

    pydicom meets a file cut short inside an undefined-length element (the
    encapsulated pixel data, a sequence) with a warning, rewinds to that
    element and drops it and everything after it, so the reason would say
    "no pixel data". A complete read leaves the file at its end or past the
    pixel data; stopping short of it is how the truncation shows without
    the warning. Warnings are not caught on purpose:
    ``warnings.catch_warnings`` swaps process-wide state, and the pipeline
    decodes on several threads, where interleaved swaps left a recorder
    installed that swallowed (and kept) every later warning of the process.
    """
    return read_for_decode(fp)


def decode_dataset(ds: Dataset, options: DecodeOptions | None = None) -> DecodedVideo:
    """Decode an already-read dataset; see :func:`decode_video`.

    Raises
    ------
    UnusableObject
        As :func:`decode_video`.
    """
    try:
        return _decode(ds, options or DecodeOptions())
    except UnusableObject:
        raise
    except MemoryError as exc:
        raise UnusableObject("not enough memory to decode the pixel data") from exc
    except Exception as exc:  # decoder plugins raise anything; the contract is one type
        raise UnusableObject(f"pixel data does not decode ({_short(exc)})") from exc


# --------------------------------------------------------------------------
# Implementation


@dataclass(frozen=True)
class _PixelFormat:
    """What the header says of the pixels, checked to be decodable video."""

    transfer_syntax: str
    rows: int
    cols: int
    samples: int
    bits: int
    n_frames: int
    photometric: str


def _decode(ds: Dataset, opts: DecodeOptions) -> DecodedVideo:
    sop_class = _check_image(ds)
    fmt = _pixel_format(ds, opts)
    try:
        fps, fps_source = frame_timing(ds)
    except ImplausibleTiming as exc:
        raise UnusableObject(exc.reason) from exc
    if fps < opts.min_fps:
        raise UnusableObject(f"{fps:.1f} frames/s is under {opts.min_fps:g} (Doppler or M-mode strip?)")

    n_keep = fmt.n_frames if opts.max_frames is None else max(1, min(fmt.n_frames, opts.max_frames))
    decoded_bytes = fmt.rows * fmt.cols * n_keep * fmt.samples * (fmt.bits // 8)
    if decoded_bytes > opts.max_decoded_bytes:
        raise UnusableObject(
            f"decoded size {decoded_bytes / 2**20:.0f} MiB exceeds the cap of "
            f"{opts.max_decoded_bytes / 2**20:.0f} MiB"
        )

    reduction = choose_reduction(fmt.rows, fmt.cols, opts.target_side)
    spacing = _spacing(ds)
    if opts.max_pixel_cm is not None and spacing is not None:
        while reduction > 1 and max(spacing.row_cm, spacing.col_cm) * reduction > opts.max_pixel_cm:
            reduction //= 2
    use_fast = (
        opts.prefer_fast
        and fmt.transfer_syntax in _FAST_PATH_SYNTAXES
        and fmt.bits == 8
        and (as_int(ds.get("BitsStored")) or 8) == 8
        and fmt.photometric in _FAST_PATH_PHOTOMETRIC
    )
    if use_fast:
        frames = _decode_jpeg_fast(ds, fmt.n_frames, n_keep, fmt.rows, fmt.cols, reduction, opts.threads)
        if fmt.photometric == "MONOCHROME1":
            np.subtract(255, frames, out=frames)
    else:
        frames = _decode_pydicom(ds, fmt.transfer_syntax, n_keep, reduction)

    return DecodedVideo(
        frames=frames,
        fps=float(fps),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=sop_class,
        source_rows=fmt.rows,
        source_cols=fmt.cols,
        scale=1.0 / reduction,
        n_frames_declared=fmt.n_frames,
        photometric=fmt.photometric,
        transfer_syntax=fmt.transfer_syntax,
        fast_path=use_fast,
        fps_source=fps_source,
        spacing=None if spacing is None else spacing.scaled(1.0 / reduction),
    )


def _spacing(ds: Dataset) -> PixelSpacing | None:
    """The stored frames' pixel size; a malformed region sequence is no calibration, not an error."""
    try:
        return tissue_spacing(ds)
    except Exception:  # noqa: BLE001 - a region sequence pydicom cannot parse
        return None


def _check_image(ds: Dataset) -> str:
    """Refuse objects that are not images with pixel data; return the SOP class."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class.startswith(_SR_PREFIX):
        raise UnusableObject("structured report, not an image")
    if sop_class.startswith(_DOCUMENT_PREFIX):
        raise UnusableObject("encapsulated document, not an image")
    if "PixelData" not in ds:
        # An image header without pixel data is almost always a file cut
        # short before the pixel data (pydicom stops there without a warning).
        image_like = "Rows" in ds or sop_class in RETIRED_US_STORAGE or sop_class.startswith(_IMAGE_CLASS_PREFIXES)
        hint = " (an image object: file truncated?)" if image_like else ""
        raise UnusableObject("no pixel data" + hint)
    if not ds.PixelData:
        # A zero-length element reads as None; left alone, it surfaced as a
        # TypeError from the decoder.
        raise UnusableObject("pixel data element is empty")
    return sop_class


def _pixel_format(ds: Dataset, opts: DecodeOptions) -> _PixelFormat:
    """The header's pixel description, refused when it is not a decodable cine loop."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not tsyntax:
        raise UnusableObject("no transfer syntax in the file meta information")
    rows = as_int(ds.get("Rows"))
    cols = as_int(ds.get("Columns"))
    samples = as_int(ds.get("SamplesPerPixel")) or 1
    bits = as_int(ds.get("BitsAllocated"))
    n_frames = as_int(ds.get("NumberOfFrames")) or 1
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if rows is None or cols is None or not (_MIN_SIDE <= rows <= _MAX_SIDE and _MIN_SIDE <= cols <= _MAX_SIDE):
        raise UnusableObject(f"implausible frame size {rows}x{cols}")
    if samples not in (1, 3) or bits not in (8, 16):
        raise UnusableObject(f"unsupported pixel format ({samples} samples, {bits} bits allocated)")
    if not 0 < n_frames <= _MAX_FRAMES_DECLARED:
        raise UnusableObject(f"implausible number of frames {n_frames}")
    if n_frames < 2:
        raise UnusableObject("single frame, not a cine loop")
    if n_frames < opts.min_frames:
        raise UnusableObject(f"only {n_frames} frames (minimum {opts.min_frames})")
    assert bits is not None
    return _PixelFormat(tsyntax, rows, cols, samples, bits, n_frames, photometric)


def _decode_jpeg_fast(
    ds: Dataset,
    n_frames: int,
    n_keep: int,
    rows: int,
    cols: int,
    reduction: int,
    threads: int | None,
) -> np.ndarray:
    """Decode JPEG fragments with OpenCV straight to reduced-size grey."""
    fragments: list[bytes] = []
    # generate_frames is lazy: stopping after n_keep frames leaves the rest
    # of the pixel data untouched.
    for i, frag in enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames)):
        if i >= n_keep:
            break
        fragments.append(frag)
    if len(fragments) < n_keep:
        raise UnusableObject(
            f"pixel data holds {len(fragments)} frames, {n_keep} expected (truncated?)"
        )

    out_h, out_w = math.ceil(rows / reduction), math.ceil(cols / reduction)
    out = np.empty((n_keep, out_h, out_w), dtype=np.uint8)
    # IMREAD_IGNORE_ORIENTATION: DICOM JPEG frames carry no EXIF, and skipping
    # the lookup avoids a parse per frame.
    flag = _REDUCED_GREY_FLAGS[reduction] | cv2.IMREAD_IGNORE_ORIENTATION

    def work(lo: int, hi: int) -> int | None:
        """Decode frames [lo, hi) into ``out``; return the first bad index."""
        for i in range(lo, hi):
            img = cv2.imdecode(np.frombuffer(fragments[i], np.uint8), flag)
            if img is None or img.shape != (out_h, out_w):
                return i
            out[i] = img
        return None

    n_threads = threads if threads is not None else min(4, os.cpu_count() or 1)
    n_threads = max(1, min(n_threads, n_keep // 8 or 1))
    if n_threads == 1:
        bad = [work(0, n_keep)]
    else:
        # Contiguous chunks, one per thread: per-frame futures cost about as
        # much as a reduced decode.
        bounds = np.linspace(0, n_keep, n_threads + 1).astype(int)
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            bad = list(pool.map(work, bounds[:-1], bounds[1:]))
    failed = [b for b in bad if b is not None]
    if failed:
        raise UnusableObject(f"JPEG frame {min(failed)} does not decode to {rows}x{cols}")
    return out


def _decode_pydicom(ds: Dataset, tsyntax: str, n_keep: int, reduction: int) -> np.ndarray:
    """Decode with pydicom's plugins, frame by frame, to reduced-size grey."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnusableObject(f"transfer syntax {tsyntax} is not supported") from exc

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "YBR_FULL_422" and not UID(tsyntax).is_encapsulated:
        # pydicom 3.0's per-frame iterator miscounts the frame length of
        # native YBR_FULL_422 ("insufficient pixel data"); the luma is just
        # bytes 0 and 1 of every 4 (Y0 Y1 Cb Cr), so read it directly.
        luma = _native_ybr422_luma(ds, n_keep)
        if reduction > 1:
            luma = _area_reduce(luma, reduction)
        return luma

    # as_rgb=False: keep YBR as decoded; the Y plane is the grey we want and
    # pydicom's YBR->RGB is the single most expensive step of pixel_array.
    opts = as_pixel_options(ds, as_rgb=False)
    if UID(tsyntax).is_encapsulated and (as_int(ds.get("SamplesPerPixel")) or 1) > 1:
        # PS3.5 8.2: compressed pixel data is decoded as its codestream says,
        # whatever Planar Configuration claims, and the codecs hand back
        # interleaved samples. Vendors do write 1 (or omit the Type 1C
        # element) on JPEG and JPEG 2000 colour: taken at its word, pydicom
        # scrambled the frames (1) or refused them (missing).
        opts["planar_configuration"] = 0
    iterator: Iterator[tuple[np.ndarray, dict[str, Any]]] = decoder.iter_array(
        ds, indices=range(n_keep), validate=True, raw=False, **opts
    )
    luts = _palette_luts(ds, tsyntax) if photometric == "PALETTE COLOR" else ds
    greys: list[np.ndarray] = []
    grey_of: np.ndarray | None = None
    for arr, info in iterator:
        frame_pi = str(info.get("photometric_interpretation", "")).upper()
        if frame_pi == "PALETTE COLOR" and arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16):
            # The palette maps each stored value to one grey: look it up once
            # per video, not through the colour LUTs for every pixel of every
            # frame (33 ms a 16-bit frame that way).
            if grey_of is None:
                grey_of = _palette_grey_table(arr.dtype, luts)
            greys.append(grey_of[arr])
            continue
        greys.append(_to_grey(arr, frame_pi, luts))
    if len(greys) < n_keep:
        raise UnusableObject(f"pixel data holds {len(greys)} frames, {n_keep} expected")

    stack = _to_uint8(np.stack(greys), ds)
    if reduction > 1:
        stack = _area_reduce(stack, reduction)
    return np.ascontiguousarray(stack)


def _area_reduce(stack: np.ndarray, reduction: int) -> np.ndarray:
    """Area-average each frame to ``ceil(side / reduction)``, as libjpeg sizes it."""
    h, w = stack.shape[1:]
    size = (math.ceil(w / reduction), math.ceil(h / reduction))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in stack])


def _native_ybr422_luma(ds: Dataset, n_keep: int) -> np.ndarray:
    """Y plane of native 8-bit YBR_FULL_422 pixel data (PS3.3 C.7.6.3.1.2)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if int(ds.BitsAllocated) != 8 or cols % 2:
        raise UnusableObject("native YBR_FULL_422 needs 8 bits and an even number of columns")
    frame_bytes = rows * cols * 2
    data = ds.PixelData
    if len(data) < frame_bytes * n_keep:
        raise UnusableObject(
            f"pixel data holds {len(data) // frame_bytes} frames, {n_keep} expected"
        )
    quads = np.frombuffer(data, np.uint8, count=frame_bytes * n_keep)
    quads = quads.reshape(n_keep, rows, cols // 2, 4)
    return np.ascontiguousarray(quads[..., :2]).reshape(n_keep, rows, cols)


def _palette_luts(ds: Dataset, tsyntax: str) -> Dataset:
    """The object's palette colour LUTs, as :func:`apply_color_lut` reads them right.

    pydicom 3.0 reads non-segmented 16-bit LUT Data in the machine's byte
    order whatever the transfer syntax (segmented LUT Data it reads right).
    In an Explicit VR Big Endian object, which older carts send, every entry
    comes out byte-swapped: a grey ramp 0x0100..0xFF00 becomes 1..255 and
    the video decodes black. Such LUT Data is handed over little-endian.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A PALETTE COLOR object.
    tsyntax : str
        Its transfer syntax UID.

    Returns
    -------
    pydicom.dataset.Dataset
        ``ds`` itself, or a data set holding only its LUT descriptors and
        the byte-swapped LUT Data.
    """
    if UID(tsyntax).is_little_endian or "RedPaletteColorLookupTableData" not in ds:
        return ds
    out = Dataset()
    if "PixelPresentation" in ds:
        out.PixelPresentation = ds.PixelPresentation
    for colour in ("Red", "Green", "Blue", "Alpha"):
        desc_kw = f"{colour}PaletteColorLookupTableDescriptor"
        data_kw = f"{colour}PaletteColorLookupTableData"
        if desc_kw in ds:
            setattr(out, desc_kw, ds[desc_kw].value)
        if data_kw not in ds:
            continue
        data = bytes(ds[data_kw].value)
        if len(data) % 2 == 0:
            # LUT Data is OW: in Big Endian every 16-bit word is swapped,
            # whether it holds one 16-bit entry or two packed 8-bit ones.
            data = np.frombuffer(data, ">u2").astype("<u2").tobytes()
        setattr(out, data_kw, data)
    return out


def _palette_grey_table(dtype: np.dtype, luts: Dataset) -> np.ndarray:
    """The grey :func:`_to_grey` gives each possible stored value of a PALETTE COLOR frame.

    Parameters
    ----------
    dtype : numpy.dtype
        ``uint8`` or ``uint16``, the decoded frames' type.
    luts : pydicom.dataset.Dataset
        The LUT module, as :func:`_palette_luts` returns it.

    Returns
    -------
    numpy.ndarray
        ``uint8`` table of 256 or 65536 entries, indexed by stored value.
    """
    n = 256 if np.dtype(dtype) == np.uint8 else 65536
    # A 256-wide image: OpenCV's colour conversion wants a plain 2-D frame.
    values = np.arange(n, dtype=dtype).reshape(-1, 256)
    rgb = apply_color_lut(values, luts)
    if rgb.dtype != np.uint8 and rgb.max() <= 255:
        # 16-bit LUT entries that hold 8-bit values, a quirk PS3.3 C.7.6.3.1.5
        # notes in older implementations: scaled as 16-bit they would give a
        # black video. No real 16-bit palette tops out at 255 of 65535.
        rgb = rgb.astype(np.uint8)
    return _to_grey_rgb(rgb, luts).reshape(-1)


def _to_grey_rgb(rgb: np.ndarray, luts: Dataset) -> np.ndarray:
    """Palette colours (8 or 16 bits an entry) -> 8-bit grey."""
    if rgb.dtype != np.uint8:
        # The LUT descriptor's third value is the entry bit depth (8 or 16);
        # scaling by it, not by the frame's maximum, keeps one mapping for
        # the whole video.
        desc = luts.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        depth = as_int(desc[2]) or 16
        top = float(2**depth - 1)
        rgb = (rgb.astype(np.float32) * (255.0 / top)).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _to_grey(arr: np.ndarray, photometric: str, ds: Dataset) -> np.ndarray:
    """One decoded frame -> single-channel grey in its own bit depth.

    The result is ``uint8`` for 8-bit data, float32 or uint16 otherwise;
    :func:`_to_uint8` maps the whole stack to 8 bit afterwards so that
    windowing is the same for every frame. For PALETTE COLOR, ``ds`` only
    needs the LUT module (:func:`_palette_luts`).
    """
    pi = photometric.upper()
    if pi == "PALETTE COLOR":
        return _to_grey_rgb(apply_color_lut(arr, ds), ds)
    if arr.ndim == 3:
        if pi.startswith("YBR"):
            # YBR_FULL / YBR_FULL_422 (already upsampled by the decoder):
            # channel 0 is luma.
            return np.ascontiguousarray(arr[..., 0])
        # RGB (also what JPEG 2000 YBR_ICT/RCT decode to).
        if arr.dtype == np.uint8:
            return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
        a = arr.astype(np.float32)
        return 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
    return arr


def _to_uint8(stack: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map a grey stack to uint8: window >8-bit data, invert MONOCHROME1."""
    mono1 = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if stack.dtype == np.uint8:
        out = stack
    else:
        a = stack.astype(np.float32)
        slope = as_float(ds.get("RescaleSlope")) or 1.0
        intercept = as_float(ds.get("RescaleIntercept")) or 0.0
        if slope != 1.0 or intercept != 0.0:
            a = a * slope + intercept
        centre = as_float(_first(ds.get("WindowCenter")))
        width = as_float(_first(ds.get("WindowWidth")))
        if centre is not None and width is not None and width >= 1:
            # DICOM PS3.3 C.11.2.1.2.1 linear VOI function.
            a = ((a - (centre - 0.5)) / (width - 1) + 0.5) * 255.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        out = np.clip(a, 0, 255).round().astype(np.uint8)
    if mono1:
        out = 255 - out
    return out


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0] if len(value) else None
    return value




def _short(exc: BaseException) -> str:
    """Exception summary for a reason string: type and first line, bounded."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__

