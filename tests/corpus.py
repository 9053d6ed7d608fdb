"""A corpus of malformed DICOM objects for the bad-input and fuzz tests.

Each :class:`Bad` is a Part 10 file (preamble, a *valid* file meta group, then
a broken data set) so that a real SCU can send it byte for byte:
``pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True`` with a file path
sends the data set as stored, without decoding or re-encoding it. Every
object has its own Study Instance UID, so the node handles each as its own
study and each outcome can be read from the journal.

The objects are small (the largest is a few MB); what is "huge" is only what
their headers declare, or what they inflate to.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

from tests.factories import us_multiframe

#: Fuzz inputs tried in this run, by outcome; tests/conftest.py prints them at the end of the run.
FUZZ_OUTCOMES: Counter[str] = Counter()

#: What the node may do with an object of the corpus.
REFUSED = "refused"  # a C-STORE failure status
SKIPPED = "skipped"  # stored, then skipped by the worker with a reason
EITHER = "either"  # depends on how far a lenient parser gets; both are fine


@dataclass(frozen=True)
class Bad:
    """One malformed object.

    Attributes
    ----------
    name : str
        Short identifier (used as the test id and in docs/reliability.md).
    what : str
        What is wrong with it.
    expect : str
        ``REFUSED``, ``SKIPPED`` or ``EITHER``.
    data : bytes
        The whole Part 10 file.
    study_uid, sop_uid : str
        The UIDs its header carries (for reading the journal).
    """

    name: str
    what: str
    expect: str
    data: bytes
    study_uid: str
    sop_uid: str

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.dcm"
        path.write_bytes(self.data)
        return path


# -- encoding helpers --------------------------------------------------------------


def part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file, written as pydicom writes it."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dataset_offset(data: bytes) -> int:
    """Offset of the data set: after the preamble, 'DICM' and the file meta group."""
    # (0002,0000) UL, explicit VR LE: tag(4) VR(2) len(2) value(4)
    assert data[128:132] == b"DICM"
    (group_len,) = struct.unpack("<I", data[140:144])
    return 144 + group_len


def _elem_header(tag: int, vr: str) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()


def find_element(data: bytes, tag: int, vr: str) -> int:
    """Offset of an explicit VR LE element header in the data set of ``data``."""
    pos = data.find(_elem_header(tag, vr), dataset_offset(data))
    if pos < 0:
        raise KeyError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr} not found")
    return pos


def set_short_length(data: bytes, tag: int, vr: str, length: int) -> bytes:
    """Change the 2-byte length of a short-VR element (value bytes unchanged)."""
    pos = find_element(data, tag, vr)
    return data[: pos + 6] + struct.pack("<H", length) + data[pos + 8 :]


def set_short_value(data: bytes, tag: int, vr: str, value: bytes) -> bytes:
    """Replace the value of a short-VR element with raw ``value`` (even length)."""
    pos = find_element(data, tag, vr)
    (length,) = struct.unpack("<H", data[pos + 6 : pos + 8])
    return data[: pos + 6] + struct.pack("<H", len(value)) + value + data[pos + 8 + length :]


def set_vr(data: bytes, tag: int, vr: str, new_vr: bytes) -> bytes:
    pos = find_element(data, tag, vr)
    return data[: pos + 4] + new_vr + data[pos + 6 :]


def _base(**kw) -> Dataset:
    kw.setdefault("frames", 16)
    kw.setdefault("rows", 64)
    kw.setdefault("cols", 64)
    return us_multiframe(**kw)


def _jpeg_frames(frames: np.ndarray) -> list[bytes]:
    out = []
    for f in frames:
        ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    return out


def jpeg_dataset(frames: np.ndarray | None = None, fragments: list[bytes] | None = None,
                 photometric: str = "MONOCHROME2", rows: int = 64, cols: int = 64) -> Dataset:
    """A JPEG baseline US multi-frame object from grey ``frames`` or ready ``fragments``."""
    if fragments is None:
        assert frames is not None
        fragments = _jpeg_frames(frames)
    ds = _base(frames=len(fragments), rows=rows, cols=cols)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = photometric
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def good_object(seed: int = 0, study_uid: str | None = None) -> Dataset:
    """A well-formed object the worker can use (random speckle moves everywhere)."""
    return _base(seed=seed, study_uid=study_uid)


# -- the corpus ----------------------------------------------------------------------

TAG_ROWS = 0x00280010
TAG_COLUMNS = 0x00280011
TAG_FRAMES = 0x00280008
TAG_STUDY_DATE = 0x00080020
TAG_PATIENT_NAME = 0x00100010
TAG_PHOTOMETRIC = 0x00280004


def _entry(name: str, what: str, expect: str, make: Callable[[Dataset], bytes | Dataset],
           base: Dataset | None = None) -> Bad:
    ds = base if base is not None else _base()
    out = make(ds)
    data = part10(out) if isinstance(out, Dataset) else out
    return Bad(name, what, expect, data, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))


def _with(**attrs) -> Callable[[Dataset], Dataset]:
    def make(ds: Dataset) -> Dataset:
        for k, v in attrs.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        return ds

    return make


def _truncate_at(fraction: float) -> Callable[[Dataset], bytes]:
    def make(ds: Dataset) -> bytes:
        raw = part10(ds)
        start = dataset_offset(raw)
        return raw[: start + int((len(raw) - start) * fraction)]

    return make


def _truncate_to(n: int) -> Callable[[Dataset], bytes]:
    def make(ds: Dataset) -> bytes:
        raw = part10(ds)
        return raw[: dataset_offset(raw) + n]

    return make


def _deflate_bomb(inflated_bytes: int) -> Callable[[Dataset], bytes]:
    """Deflated Explicit VR LE whose data set inflates to ``inflated_bytes`` (zeros in an OB)."""

    def make(ds: Dataset) -> bytes:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        del ds.PixelData
        raw = part10(ds)  # header only, deflated by pydicom
        start = dataset_offset(raw)
        # Re-deflate: the header's elements, then a private OB full of zeros.
        plain = zlib.decompress(raw[start:], -zlib.MAX_WBITS)
        # After a full flush the compressor keeps no history, so the bytes
        # for one MiB of zeros are the same every time: repeat them.
        co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = co.compress(plain + _elem_header(0x00091010, "OB") + b"\x00\x00" + struct.pack("<I", inflated_bytes))
        body += co.flush(zlib.Z_FULL_FLUSH)
        mib = co.compress(bytes(1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)
        assert inflated_bytes % (1 << 20) == 0
        body += mib * (inflated_bytes >> 20) + b"\x03\x00"  # an empty final block
        return raw[:start] + body

    return make


def _jpeg_garbage(ds_unused: Dataset) -> Dataset:
    rng = np.random.default_rng(1)
    return jpeg_dataset(fragments=[rng.integers(0, 256, 2000, dtype=np.uint8).tobytes() for _ in range(16)])


def _jpeg_truncated_frames(ds_unused: Dataset) -> Dataset:
    frames = np.random.default_rng(2).integers(0, 256, (16, 64, 64), dtype=np.uint8)
    return jpeg_dataset(fragments=[f[: len(f) // 3] for f in _jpeg_frames(frames)])


def _jpeg_sof_bomb(ds_unused: Dataset) -> Dataset:
    """The header says 64x64; every JPEG frame says 8192x8192 (a 'decompression bomb')."""
    big = _jpeg_frames(np.zeros((1, 8192, 8192), np.uint8))[0]
    return jpeg_dataset(fragments=[big] * 8)


def _rle_bomb(ds: Dataset) -> Dataset:
    """RLE whose header declares 8192 x 8192 x 1000 frames of 8 bit: 62 GiB decoded."""
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows, ds.Columns, ds.NumberOfFrames = 8192, 8192, 1000
    # One RLE segment per frame: header (64 bytes) then runs of 128 zeros.
    seg = struct.pack("<16I", 1, 64, *([0] * 14)) + bytes([0x81, 0]) * 64
    ds.PixelData = encapsulate([seg] * 8)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def _ybr_on_mono(ds: Dataset) -> Dataset:
    ds.PhotometricInterpretation = "YBR_FULL_422"
    return ds


def _palette_without_lut(ds: Dataset) -> Dataset:
    ds.PhotometricInterpretation = "PALETTE COLOR"
    return ds


def _rgb_one_sample(ds: Dataset) -> Dataset:
    ds.PhotometricInterpretation = "RGB"
    return ds


def _rgb_short(ds: Dataset) -> Dataset:
    """Three samples per pixel declared, one sample's worth of data."""
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    return ds


def _odd_pixel_length(ds: Dataset) -> bytes:
    raw = part10(ds)
    pos = find_element(raw, 0x7FE00010, "OB") if b"\xe0\x7f\x10\x00OB" in raw else find_element(raw, 0x7FE00010, "OW")
    (length,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
    return raw[: pos + 8] + struct.pack("<I", length - 1) + raw[pos + 12 : -1]


def _pixel_length_past_end(ds: Dataset) -> bytes:
    raw = part10(ds)
    pos = find_element(raw, 0x7FE00010, "OB") if b"\xe0\x7f\x10\x00OB" in raw else find_element(raw, 0x7FE00010, "OW")
    return raw[: pos + 8] + struct.pack("<I", 0x7FFFFFF0) + raw[pos + 12 :]


def _sequence_garbage(ds: Dataset) -> bytes:
    """A sequence item with an undefined length that never ends."""
    raw = part10(ds)
    start = dataset_offset(raw)
    seq = _elem_header(0x00082112, "SQ") + b"\x00\x00" + b"\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    # insert right after the meta: a never-closed sequence swallowing the rest
    return raw[:start] + seq + raw[start:]


def corpus() -> list[Bad]:
    """Every malformed object, fresh UIDs on every call."""
    out = [
        _entry("empty_dataset", "file meta, then nothing", REFUSED, lambda ds: part10(ds)[: dataset_offset(part10(ds))]),
        _entry("truncated_header", "cut after 40 bytes of the data set", REFUSED, _truncate_to(40)),
        _entry("truncated_in_pixels", "cut half-way through the pixel data", REFUSED, _truncate_at(0.5)),
        _entry("truncated_last_byte", "one byte short", REFUSED, lambda ds: part10(ds)[:-1]),
        _entry("wrong_length_date", "StudyDate declares 12 bytes for 8 (the parser desynchronises)", EITHER,
               lambda ds: set_short_length(part10(ds), TAG_STUDY_DATE, "DA", 12)),
        _entry("wrong_length_rows", "Rows (US) declares 3 bytes", EITHER,
               lambda ds: set_short_length(part10(ds), TAG_ROWS, "US", 3)),
        _entry("wrong_length_name", "PatientName declares 0xFFF0 bytes", EITHER,
               lambda ds: set_short_length(part10(ds), TAG_PATIENT_NAME, "PN", 0xFFF0)),
        _entry("odd_pixel_length", "pixel data one byte short, odd length", EITHER, _odd_pixel_length),
        _entry("pixel_length_past_end", "pixel data declares 2 GiB", REFUSED, _pixel_length_past_end),
        _entry("bad_vr_rows", "Rows with VR 'ZZ'", EITHER, lambda ds: set_vr(part10(ds), TAG_ROWS, "US", b"ZZ")),
        _entry("bad_vr_nul", "Columns with VR '\\0\\0'", EITHER,
               lambda ds: set_vr(part10(ds), TAG_COLUMNS, "US", b"\x00\x00")),
        _entry("bad_vr_uid", "SeriesInstanceUID with VR 'U\\0' (found by the fuzzer)", REFUSED,
               lambda ds: set_vr(part10(ds), 0x0020000E, "UI", b"U\x00")),
        _entry("bad_vr_sq", "PhotometricInterpretation claims VR SQ", EITHER,
               lambda ds: set_vr(part10(ds), TAG_PHOTOMETRIC, "CS", b"SQ")),
        _entry("frames_not_a_number", "NumberOfFrames 'ab'", SKIPPED,
               lambda ds: set_short_value(part10(ds), TAG_FRAMES, "IS", b"ab")),
        _entry("huge_rows_cols", "Rows and Columns 65535", SKIPPED, _with(Rows=65535, Columns=65535)),
        _entry("huge_frames", "NumberOfFrames 2147483647", SKIPPED, _with(NumberOfFrames=2147483647)),
        _entry("huge_decoded", "8192 x 8192 x 99999 frames declared, 64 KiB stored", SKIPPED,
               _with(Rows=8192, Columns=8192, NumberOfFrames=99999)),
        _entry("zero_rows", "Rows 0", SKIPPED, _with(Rows=0)),
        _entry("negative_frames", "NumberOfFrames -5", SKIPPED, lambda ds: set_short_value(part10(ds), TAG_FRAMES, "IS", b"-5")),
        _entry("missing_pixel_data", "no (7FE0,0010)", SKIPPED, _with(PixelData=None)),
        _entry("short_pixel_data", "a quarter of the declared pixel data", SKIPPED,
               lambda ds: _with(PixelData=ds.PixelData[: len(ds.PixelData) // 4])(ds)),
        _entry("empty_pixel_data", "zero-length pixel data", SKIPPED, _with(PixelData=b"")),
        _entry("bits_allocated_12", "BitsAllocated 12", SKIPPED, _with(BitsAllocated=12)),
        _entry("samples_4", "SamplesPerPixel 4", SKIPPED, _with(SamplesPerPixel=4)),
        _entry("photometric_rgb_1_sample", "RGB with one sample per pixel", EITHER, _rgb_one_sample),
        _entry("photometric_rgb_short", "RGB, 3 samples declared, 1 sample of data", SKIPPED, _rgb_short),
        _entry("photometric_ybr_on_mono", "YBR_FULL_422 over monochrome native data", EITHER, _ybr_on_mono),
        _entry("photometric_palette_no_lut", "PALETTE COLOR without a lookup table", SKIPPED, _palette_without_lut),
        _entry("photometric_unknown", "PhotometricInterpretation 'FOO'", EITHER, _with(PhotometricInterpretation="FOO")),
        _entry("frame_time_zero_ish", "FrameTime 1e9 ms (Doppler-like rate)", SKIPPED, _with(FrameTime=1e9)),
        _entry("jpeg_garbage", "JPEG baseline fragments of random bytes", SKIPPED, _jpeg_garbage),
        _entry("jpeg_truncated_frames", "JPEG frames cut to a third", SKIPPED, _jpeg_truncated_frames),
        _entry("jpeg_sof_bomb", "64x64 header, 8192x8192 JPEG frames (decompression bomb)", SKIPPED, _jpeg_sof_bomb),
        _entry("rle_bomb", "RLE, 8192x8192x1000 declared (62 GiB decoded)", SKIPPED, _rle_bomb),
        _entry("never_closed_sequence", "an undefined-length sequence item that never ends", EITHER, _sequence_garbage),
        _entry("deflate_bomb", "3 MB deflated data set inflating to 3 GiB of zeros", REFUSED,
               _deflate_bomb(3072 * 2**20)),
    ]
    # The JPEG-built entries made their own data set: read their UIDs back.
    import pydicom

    fixed = []
    for b in out:
        if b.name == "deflate_bomb":  # do not inflate it here
            fixed.append(b)
            continue
        try:
            hdr = pydicom.dcmread(io.BytesIO(b.data), stop_before_pixels=True,
                                  specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
            study, sop = str(hdr.get("StudyInstanceUID", b.study_uid)), str(hdr.get("SOPInstanceUID", b.sop_uid))
        except Exception:  # noqa: BLE001 - unreadable by design: keep the base's UIDs
            study, sop = b.study_uid, b.sop_uid
        fixed.append(Bad(b.name, b.what, b.expect, b.data, study, sop))
    return fixed


__all__ = ["EITHER", "REFUSED", "SKIPPED", "Bad", "corpus", "dataset_offset", "good_object", "jpeg_dataset",
           "part10"]
