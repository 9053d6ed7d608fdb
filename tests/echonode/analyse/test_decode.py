"""Tests for echonode.analyse.decode: both paths, every photometric, every refusal."""

from __future__ import annotations

import io
import subprocess
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from echonode.analyse.decode import (
    DecodedVideo,
    UnusableObject,
    choose_reduction,
    decode_video,
    frame_rate,
)
from tests.conftest import real_testfile
from tests.peers import DCMCONV, require_tool

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def _testfile(name: str) -> str:
    # The real files are the point of these tests: missing data fails, never skips.
    return str(real_testfile(name))


@pytest.fixture(scope="module")
def sonosite() -> str:
    """The real SonoSite cardiac loop (labelled "PLA" by the cart): 120 frames, 480x640, JPEG baseline YBR_FULL_422."""
    return _testfile("color3d_jpeg_baseline.dcm")


@pytest.fixture(scope="module")
def small_loop() -> str:
    """The same loop, 30 frames at 240x320."""
    return _testfile("examples_ybr_color.dcm")


def _reference_grey(path: str, n: int) -> np.ndarray:
    """pydicom's pixel data (converted to RGB, its default) -> cv2 grey."""
    ds = pydicom.dcmread(path)
    frames = pydicom.pixels.iter_pixels(ds, indices=range(n))
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


def _area(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])


# --------------------------------------------------------------------------
# Real loops: the fast path against pydicom


@pytest.mark.parametrize("which", ["sonosite", "small_loop"])
def test_fast_path_matches_pydicom_at_full_size(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    video = decode_video(path, max_frames=10)
    assert video.fast_path
    assert video.frames.dtype == np.uint8 and video.frames.shape[0] == 10
    ref = _reference_grey(path, 10)
    assert video.frames.shape == ref.shape
    diff = np.abs(video.frames.astype(int) - ref.astype(int))
    # libjpeg's luma versus pydicom's YBR->RGB->grey round trip: rounding only.
    assert diff.mean() < 0.5


@pytest.mark.parametrize("which", ["sonosite", "small_loop"])
def test_reduced_fast_path_matches_pydicom_resized(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    video = decode_video(path, target_side=112, max_frames=10)
    ds = pydicom.dcmread(path)
    r = choose_reduction(ds.Rows, ds.Columns, 112)
    assert video.scale == pytest.approx(1 / r)
    assert min(video.frames.shape[1:]) >= 112
    ref = _area(_reference_grey(path, 10), video.frames.shape[1:])
    # DCT-domain scaling versus area averaging, compared after resizing both
    # to the model's 112.
    a = _area(video.frames, (112, 112)).astype(int)
    b = _area(ref, (112, 112)).astype(int)
    assert np.abs(a - b).mean() < 2.0


@pytest.mark.parametrize("target", [None, 112])
def test_fast_and_fallback_paths_agree(small_loop: str, target: int | None) -> None:
    fast = decode_video(small_loop, target_side=target, max_frames=8)
    slow = decode_video(small_loop, target_side=target, max_frames=8, prefer_fast=False)
    assert fast.fast_path and not slow.fast_path
    assert fast.frames.shape == slow.frames.shape
    assert np.abs(fast.frames.astype(int) - slow.frames.astype(int)).mean() < 2.0


def test_sonosite_metadata(sonosite: str) -> None:
    video = decode_video(sonosite, target_side=112, max_frames=100)
    assert isinstance(video, DecodedVideo)
    assert video.frames.shape == (100, 120, 160)  # 480x640 reduced 4
    assert video.fps == pytest.approx(30.0, abs=0.01)  # FrameTime 33.333 ms
    assert (video.source_rows, video.source_cols) == (480, 640)
    assert video.n_frames_declared == 120
    assert video.photometric == "YBR_FULL_422"
    assert video.sop_uid and video.study_uid and video.series_uid
    assert video.sop_class_uid == US_MULTIFRAME


def test_thread_count_does_not_change_pixels(small_loop: str) -> None:
    one = decode_video(small_loop, threads=1)
    two = decode_video(small_loop, threads=2)
    assert np.array_equal(one.frames, two.frames)


@pytest.mark.parametrize(
    ("rows", "cols", "target", "expected"),
    [(480, 640, 112, 4), (240, 320, 112, 2), (600, 800, 112, 4), (1080, 1920, 112, 8),
     (100, 100, 112, 1), (480, 640, None, 1), (224, 300, 112, 2)],
)
def test_choose_reduction(rows: int, cols: int, target: int | None, expected: int) -> None:
    assert choose_reduction(rows, cols, target) == expected


# --------------------------------------------------------------------------
# Frame timing


def _timing(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("kw", "fps"),
    [
        ({"FrameTime": "33.333"}, 30.0),
        ({"FrameTime": "20"}, 50.0),
        ({"FrameTimeVector": ["0", "40", "40", "40"]}, 25.0),
        ({"CineRate": 60}, 60.0),
        ({}, 30.0),
        ({"FrameTime": "0", "CineRate": 45}, 45.0),
    ],
)
def test_frame_rate(kw: dict[str, object], fps: float) -> None:
    assert frame_rate(_timing(**kw)) == pytest.approx(fps, abs=0.01)


# --------------------------------------------------------------------------
# Objects built here: every photometric interpretation, both bit depths


def _ramp_video(n: int = 10, rows: int = 64, cols: int = 80) -> np.ndarray:
    """(n, rows, cols) uint8 with structure that moves frame to frame."""
    y, x = np.mgrid[0:rows, 0:cols]
    return np.stack([((x * 3 + y * 2 + 7 * t) % 256).astype(np.uint8) for t in range(n)])


def _dataset(
    pixels: bytes,
    *,
    rows: int,
    cols: int,
    frames: int,
    photometric: str,
    samples: int = 1,
    bits: int = 8,
    tsyntax: str = ExplicitVRLittleEndian,
    frame_time: str | None = "33.333",
    sop_class: str = US_MULTIFRAME,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tsyntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frame_time is not None:
        ds.FrameTime = frame_time
    ds.PixelData = pixels
    if tsyntax != ExplicitVRLittleEndian:
        ds["PixelData"].VR = "OB"
    return ds


def _save(ds: Dataset, tmp_path: Path, name: str = "obj.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome2_native(tmp_path: Path) -> None:
    vid = _ramp_video()
    ds = _dataset(vid.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2")
    out = decode_video(_save(ds, tmp_path))
    assert not out.fast_path
    assert np.array_equal(out.frames, vid)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    vid = _ramp_video()
    ds = _dataset(vid.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME1")
    out = decode_video(_save(ds, tmp_path))
    assert np.array_equal(out.frames, 255 - vid)


def test_rgb_native_to_luma(tmp_path: Path) -> None:
    vid = _ramp_video()
    rgb = np.stack([vid, 255 - vid, vid // 2], axis=-1)
    ds = _dataset(rgb.tobytes(), rows=64, cols=80, frames=10, photometric="RGB", samples=3)
    out = decode_video(_save(ds, tmp_path))
    expected = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])
    assert np.array_equal(out.frames, expected)


def test_ybr_full_native_takes_y(tmp_path: Path) -> None:
    vid = _ramp_video()
    ybr = np.stack([vid, np.full_like(vid, 90), np.full_like(vid, 200)], axis=-1)
    ds = _dataset(ybr.tobytes(), rows=64, cols=80, frames=10, photometric="YBR_FULL", samples=3)
    out = decode_video(_save(ds, tmp_path))
    assert np.array_equal(out.frames, vid)


def test_ybr_full_422_native_takes_y(tmp_path: Path) -> None:
    """Native YBR_FULL_422: pairs of pixels stored as Y0 Y1 Cb Cr."""
    vid = _ramp_video(cols=80)
    packed = np.empty((10, 64, 40, 4), dtype=np.uint8)
    packed[..., 0], packed[..., 1] = vid[..., 0::2], vid[..., 1::2]
    packed[..., 2], packed[..., 3] = 100, 150
    ds = _dataset(packed.tobytes(), rows=64, cols=80, frames=10, photometric="YBR_FULL_422",
                  samples=3)
    out = decode_video(_save(ds, tmp_path))
    assert np.array_equal(out.frames, vid)


def test_rle_multiframe(tmp_path: Path) -> None:
    vid = _ramp_video()
    ds = _dataset(vid.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2")
    ds.compress(RLELossless)
    out = decode_video(_save(ds, tmp_path))
    assert out.transfer_syntax == RLELossless
    assert np.array_equal(out.frames, vid)


def _palette_dataset(vid: np.ndarray, **kw: object) -> tuple[Dataset, np.ndarray]:
    """8-bit indices with a 16-bit colour LUT; returns the dataset and the expected grey."""
    n, rows, cols = vid.shape
    idx = np.arange(256)
    red, green, blue = (idx * 257) % 65536, ((255 - idx) * 257), (idx // 2) * 257
    ds = _dataset(vid.tobytes(), rows=rows, cols=cols, frames=n, photometric="PALETTE COLOR", **kw)
    for colour, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    rgb8 = np.stack([idx, 255 - idx, idx // 2], axis=-1).astype(np.uint8)[vid]
    expected = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb8])
    return ds, expected


def test_palette_colour(tmp_path: Path) -> None:
    ds, expected = _palette_dataset(_ramp_video())
    out = decode_video(_save(ds, tmp_path))
    assert np.abs(out.frames.astype(int) - expected).max() <= 1


def test_palette_colour_rle(tmp_path: Path) -> None:
    ds, expected = _palette_dataset(_ramp_video())
    ds.compress(RLELossless)
    out = decode_video(_save(ds, tmp_path))
    assert np.abs(out.frames.astype(int) - expected).max() <= 1


def test_palette_sixteen_bit_entries_holding_eight_bit_values(tmp_path: Path) -> None:
    """LUT Descriptor says 16 bits, the entries are 0-255 (PS3.3 C.7.6.3.1.5's note): not black."""
    ds, expected = _palette_dataset(_ramp_video())
    idx = np.arange(256)
    for colour, lut in (("Red", idx), ("Green", 255 - idx), ("Blue", idx // 2)):
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    out = decode_video(_save(ds, tmp_path))
    assert np.abs(out.frames.astype(int) - expected).max() <= 1


def test_palette_eight_bit_lut_in_big_endian(tmp_path: Path) -> None:
    """8-bit LUT entries packed two to an OW word: Big Endian swaps each pair (dcmtk writes it)."""
    require_tool(DCMCONV)
    vid = _ramp_video()
    n, rows, cols = vid.shape
    idx = np.arange(256)
    red = green = blue = np.where(idx % 2 == 0, 0, 255)  # alternating: a swapped pair inverts it
    ds = _dataset(vid.tobytes(), rows=rows, cols=cols, frames=n, photometric="PALETTE COLOR")
    for colour, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype(np.uint8).tobytes())
    little = _save(ds, tmp_path, "little.dcm")
    big = tmp_path / "big.dcm"
    subprocess.run([DCMCONV, "+tb", str(little), str(big)], check=True, capture_output=True)
    expected = red.astype(np.uint8)[vid]
    out_little, out_big = decode_video(little), decode_video(big)
    assert out_big.transfer_syntax == "1.2.840.10008.1.2.2"
    assert np.array_equal(out_little.frames, expected)
    assert np.array_equal(out_big.frames, expected)


def _as_loop(name: str, tmp_path: Path, n: int = 10, **attrs: object) -> Path:
    """A real single-frame object made an ``n``-frame loop (the frame repeated).

    ``attrs`` are set on the data set; an attribute set to None is deleted.
    """
    ds = pydicom.dcmread(_testfile(name))
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame] * n)
    else:
        ds.PixelData = ds.PixelData * n
    ds.NumberOfFrames = n
    ds.FrameTime = "33.3"
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _save(ds, tmp_path, f"loop_{name}")


def test_palette_colour_big_endian_matches_little_endian(tmp_path: Path) -> None:
    """OBXXXX1A in Explicit VR Big Endian: the 16-bit LUT Data is big-endian too.

    pydicom reads that LUT Data in the machine's byte order; taken as is,
    every entry was byte-swapped (0xFF00 read as 0x00FF) and the loop
    decoded black.
    """
    little = decode_video(_as_loop("OBXXXX1A.dcm", tmp_path))
    big = decode_video(_as_loop("OBXXXX1A_expb.dcm", tmp_path))
    assert big.transfer_syntax == "1.2.840.10008.1.2.2"
    assert little.frames.max() > 200  # the little-endian original is a real image
    assert np.array_equal(big.frames, little.frames)


def test_sixteen_bit_palette_matches_pydicom_lut_per_frame(tmp_path: Path) -> None:
    """The real gdcm-US-ALOKA-16 (16-bit stored values, segmented 16-bit LUTs) as a loop.

    The decoder looks each stored value up once per video; the reference maps
    every pixel through pydicom's apply_color_lut, then to grey.
    """
    from pydicom.pixels import apply_color_lut

    path = _as_loop("gdcm-US-ALOKA-16.dcm", tmp_path, n=3)
    out = decode_video(path, min_frames=1)
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float32) * (255.0 / 65535.0)
    expected = np.stack([cv2.cvtColor(f.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY) for f in rgb])
    assert ds.BitsAllocated == 16 and out.frames.shape == expected.shape
    assert out.frames.max() > 100  # a real image, not a black one
    assert np.array_equal(out.frames, expected)


def test_sixteen_bit_monochrome2_min_max(tmp_path: Path) -> None:
    vid16 = (_ramp_video().astype(np.uint16) * 16 + 100).astype(np.uint16)
    ds = _dataset(vid16.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2", bits=16)
    out = decode_video(_save(ds, tmp_path))
    assert out.frames.dtype == np.uint8
    assert out.frames.min() == 0 and out.frames.max() == 255
    # Monotonic: the brightest input stays the brightest output.
    assert out.frames.flat[np.argmax(vid16)] == 255


def test_sixteen_bit_monochrome2_window(tmp_path: Path) -> None:
    vid16 = np.full((10, 64, 80), 1000, dtype=np.uint16)
    vid16[:, :, 40:] = 3000
    vid16[:, 0, 0] = 0
    ds = _dataset(vid16.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2", bits=16)
    ds.WindowCenter, ds.WindowWidth = 2000, 4001
    out = decode_video(_save(ds, tmp_path))
    assert out.frames[0, 10, 10] == pytest.approx(64, abs=1)  # ((1000 - 1999.5) / 4000 + 0.5) * 255
    assert out.frames[0, 10, 60] == pytest.approx(191, abs=1)
    assert out.frames[0, 0, 0] == 0


def _jpeg(img: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def test_jpeg_adobe_rgb_marked(tmp_path: Path) -> None:
    """JPEG frames stored as RGB components (APP14 Adobe, transform 0)."""
    vid = _ramp_video(n=8, rows=64, cols=96)
    rgb = np.stack([vid, 255 - vid, np.full_like(vid, 60)], axis=-1)
    frames = [_jpeg(f, keep_rgb=True) for f in rgb]
    assert b"Adobe" in frames[0][:200]
    ds = _dataset(encapsulate(frames), rows=64, cols=96, frames=8, photometric="RGB",
                  samples=3, tsyntax=JPEGBaseline8Bit)
    path = _save(ds, tmp_path)
    fast = decode_video(path)
    slow = decode_video(path, prefer_fast=False)
    assert fast.fast_path and not slow.fast_path
    expected = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]).astype(int)
    assert np.abs(fast.frames.astype(int) - expected).mean() < 2.0
    assert np.abs(fast.frames.astype(int) - slow.frames.astype(int)).mean() < 1.0


@pytest.mark.parametrize("planar", [1, None])
def test_jpeg2000_colour_ignores_planar_configuration(tmp_path: Path, planar: int | None) -> None:
    """Compressed colour is decoded as its codestream says (PS3.5 8.2).

    A JPEG 2000 loop marked Planar Configuration 1 was read as planes and
    scrambled; one without the element was refused.
    """
    path = _as_loop("US1_J2KR.dcm", tmp_path, PlanarConfiguration=planar)
    out = decode_video(path)
    expected = _reference_grey(_testfile("US1_J2KR.dcm"), 1)[0]
    assert out.frames.shape == (10,) + expected.shape
    assert np.array_equal(out.frames[3], expected)


def test_jpeg_planar_configuration_one_on_the_fallback_path(tmp_path: Path) -> None:
    vid = _ramp_video(n=8, rows=64, cols=96)
    rgb = np.stack([vid, 255 - vid, np.full_like(vid, 60)], axis=-1)
    ds = _dataset(encapsulate([_jpeg(f) for f in rgb]), rows=64, cols=96, frames=8,
                  photometric="YBR_FULL_422", samples=3, tsyntax=JPEGBaseline8Bit)
    ds.PlanarConfiguration = 1
    path = _save(ds, tmp_path)
    fast = decode_video(path)
    slow = decode_video(path, prefer_fast=False)
    assert np.abs(fast.frames.astype(int) - slow.frames.astype(int)).mean() < 1.0


def test_jpeg_monochrome_fast_path(tmp_path: Path) -> None:
    vid = _ramp_video(n=8, rows=64, cols=96)
    ds = _dataset(encapsulate([_jpeg(f) for f in vid]), rows=64, cols=96, frames=8,
                  photometric="MONOCHROME2", tsyntax=JPEGBaseline8Bit)
    out = decode_video(_save(ds, tmp_path))
    assert out.fast_path
    assert np.abs(out.frames.astype(int) - vid.astype(int)).mean() < 2.0


# --------------------------------------------------------------------------
# Refusals: always UnusableObject with a reason


def _assert_unusable(path: str | Path, fragment: str, **kw: object) -> None:
    with pytest.raises(UnusableObject) as info:
        decode_video(path, **kw)  # type: ignore[arg-type]
    assert fragment in info.value.reason, info.value.reason


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "US1_J2KR.dcm"])
def test_single_frame_files(name: str) -> None:
    _assert_unusable(_testfile(name), "single frame")


def test_too_few_frames() -> None:
    _assert_unusable(_testfile("OBXXXX1A_2frame.dcm"), "only 2 frames")


def test_structured_report(tmp_path: Path) -> None:
    sr_class = "1.2.840.10008.5.1.4.1.1.88.33"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sr_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sr_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    _assert_unusable(_save(ds, tmp_path), "structured report")


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = _dataset(b"", rows=64, cols=80, frames=10, photometric="MONOCHROME2")
    del ds.PixelData
    _assert_unusable(_save(ds, tmp_path), "no pixel data")


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.3"])
def test_image_class_without_pixels_hints_at_truncation(sop_class: str, tmp_path: Path) -> None:
    """Current and retired US Multi-frame alike: an image class with no pixels is a cut-off file."""
    ds = _dataset(b"", rows=64, cols=80, frames=10, photometric="MONOCHROME2")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = sop_class
    _assert_unusable(_save(ds, tmp_path), "no pixel data (an image object: file truncated?)")


def test_empty_pixel_data(tmp_path: Path) -> None:
    ds = _dataset(b"", rows=64, cols=80, frames=10, photometric="MONOCHROME2")
    _assert_unusable(_save(ds, tmp_path), "pixel data element is empty")


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.99])
def test_truncated_file(tmp_path: Path, small_loop: str, fraction: float) -> None:
    data = Path(small_loop).read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: int(len(data) * fraction)])
    _assert_unusable(path, "truncated")


def test_stray_item_delimiter_after_the_pixel_data_is_not_truncation(tmp_path: Path, small_loop: str) -> None:
    """A top-level (FFFE,E00D) then trailing padding, as some GE files end: pydicom
    stops at the delimiter with the pixel data read in full."""
    path = tmp_path / "stray.dcm"
    padding = b"\xfc\xff\xfc\xff" + b"OB\x00\x00" + (16).to_bytes(4, "little") + b"\x00" * 16
    path.write_bytes(Path(small_loop).read_bytes() + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + padding)
    out = decode_video(path)
    assert np.array_equal(out.frames, decode_video(small_loop).frames)


def test_truncated_native_pixel_data(tmp_path: Path) -> None:
    vid = _ramp_video()
    ds = _dataset(vid.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2")
    path = _save(ds, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(UnusableObject):
        decode_video(path)


def test_truncated_inside_pixel_data_read_on_demand(tmp_path: Path) -> None:
    """Pixel data over the decoder's element limit is skipped by a seek at first and read
    when decoded; a file cut inside it is found by where the element would end."""
    vid = np.zeros((20, 256, 256), np.uint8)  # 1.25 MiB of pixel data
    ds = _dataset(vid.tobytes(), rows=256, cols=256, frames=20, photometric="MONOCHROME2")
    path = _save(ds, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    _assert_unusable(path, f"file is truncated (element (7FE0,0010) runs past its end, byte {len(data) - 3000})")


def test_corrupt_jpeg_frame(tmp_path: Path) -> None:
    vid = _ramp_video(n=8, rows=64, cols=96)
    frames = [_jpeg(f) for f in vid]
    frames[5] = b"\xff\xd8" + b"\x00" * 300 + b"\xff\xd9"
    ds = _dataset(encapsulate(frames), rows=64, cols=96, frames=8,
                  photometric="MONOCHROME2", tsyntax=JPEGBaseline8Bit)
    path = _save(ds, tmp_path)
    _assert_unusable(path, "frame 5")
    # The pydicom path wraps its decoder's exception the same way.
    with pytest.raises(UnusableObject):
        decode_video(path, prefer_fast=False)


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, not a DICOM file" * 10)
    _assert_unusable(path, "not a readable DICOM file")


def test_under_min_fps(tmp_path: Path) -> None:
    vid = _ramp_video()
    ds = _dataset(vid.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2",
                  frame_time="100")
    _assert_unusable(_save(ds, tmp_path), "10.0 frames/s")


def test_sixteen_bit_over_memory_cap(tmp_path: Path) -> None:
    vid16 = _ramp_video().astype(np.uint16)
    ds = _dataset(vid16.tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2", bits=16)
    path = _save(ds, tmp_path)
    _assert_unusable(path, "exceeds the cap", max_decoded_bytes=64 * 80 * 10 * 2 - 1)
    # Keeping fewer frames brings it under the cap: only decoded frames count.
    assert decode_video(path, max_frames=8, max_decoded_bytes=64 * 80 * 10 * 2 - 1).frames.shape[0] == 8


@pytest.mark.parametrize(("rows", "cols"), [(0, 80), (64, 60_000)])
def test_absurd_dimensions(tmp_path: Path, rows: int, cols: int) -> None:
    ds = _dataset(b"\x00" * 16, rows=rows, cols=cols, frames=10, photometric="MONOCHROME2")
    _assert_unusable(_save(ds, tmp_path), "implausible frame size")


def test_declared_frames_missing_from_pixel_data(tmp_path: Path) -> None:
    vid = _ramp_video()
    ds = _dataset(vid[:5].tobytes(), rows=64, cols=80, frames=10, photometric="MONOCHROME2")
    with pytest.raises(UnusableObject):
        decode_video(_save(ds, tmp_path))


# --------------------------------------------------------------------------
# Concurrency: the pipeline decodes on several threads


def test_concurrent_reads_leave_the_warning_machinery_alone(
    small_loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two decodes whose reads overlap must not swap the process's warning state.

    ``warnings.catch_warnings`` is process-wide: entered by thread A, then B,
    left by A, then B, it leaves A's recorder installed, which swallows and
    keeps every later warning of a long-running worker. The fake read (the
    decoder's pydicom call) forces exactly that interleaving.
    """
    import echonode.header

    real_dcmread = echonode.header.read_partial
    a_reading, b_reading, a_done = threading.Event(), threading.Event(), threading.Event()
    lock = threading.Lock()
    calls: list[str] = []

    def dcmread(*args: object, **kwargs: object) -> Dataset:
        with lock:
            role = "a" if not calls else "b"
            calls.append(role)
        if role == "a":
            a_reading.set()
            b_reading.wait(10)  # B starts reading while A is inside its read
        else:
            b_reading.set()
            a_done.wait(10)  # A finishes its whole decode before B's read returns
        return real_dcmread(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(echonode.header, "read_partial", dcmread)
    filters, show, impl = list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl  # type: ignore[attr-defined]
    results: dict[str, DecodedVideo] = {}

    def decode(role: str) -> None:
        results[role] = decode_video(small_loop, max_frames=8, threads=1)
        if role == "a":
            a_done.set()

    a = threading.Thread(target=decode, args=("a",))
    a.start()
    assert a_reading.wait(10)
    b = threading.Thread(target=decode, args=("b",))
    b.start()
    a.join(20)
    b.join(20)
    assert calls == ["a", "b"] and set(results) == {"a", "b"}
    assert warnings.filters == filters
    assert warnings.showwarning is show
    assert warnings._showwarnmsg_impl is impl  # type: ignore[attr-defined]


def test_truncated_reason_from_a_file_object(small_loop: str) -> None:
    data = Path(small_loop).read_bytes()
    with pytest.raises(UnusableObject) as info:
        decode_video(io.BytesIO(data[: len(data) // 2]))
    assert "truncated" in info.value.reason
    assert f"of {len(data) // 2})" in info.value.reason
