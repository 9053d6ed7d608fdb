"""Frame rate: the METHOD.md rule, implausible rates refused, Enhanced US per-frame timing read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from echonode.analyse.decode import UnusableObject, decode_video
from tests.conftest import real_testfile
from tests.factories import us_multiframe, write

ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"


def _rate(**attrs: object) -> float:
    from echonode.analyse.frametiming import frame_rate

    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return frame_rate(ds)


def _decode_with(tmp_path: Path, **attrs: object):
    ds = us_multiframe(frames=16, rows=64, cols=64)
    del ds.FrameTime
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return decode_video(write(ds, tmp_path / "loop.dcm"))


# --------------------------------------------------------------------------
# Implausible rates


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"FrameTime": "0.001"}, "FrameTime 0.001 ms implies 1000000 frames/s, over the 1000"),
        ({"FrameTime": "0.5"}, "FrameTime 0.5 ms implies 2000 frames/s"),
        ({"FrameTimeVector": ["0", "0.002", "0.002", "0.002"]},
         "FrameTimeVector (mean increment 0.002 ms) implies 500000 frames/s"),
        ({"CineRate": 5000}, "CineRate 5000 implies 5000 frames/s"),
    ],
)
def test_a_rate_over_1000_fps_makes_the_video_unusable(tmp_path: Path, attrs: dict, reason: str) -> None:
    """FrameTime 0.001 ms was read as 1,000,000 frames/s and the loop used as such."""
    with pytest.raises(UnusableObject) as info:
        _decode_with(tmp_path, **attrs)
    assert reason in info.value.reason
    assert "(corrupt timing)" in info.value.reason


def test_an_implausible_frame_time_is_not_replaced_by_cine_rate_or_the_default(tmp_path: Path) -> None:
    """The header states a corrupt rate: no other element, and no default, stands in for it."""
    with pytest.raises(UnusableObject, match="FrameTime 0.001 ms implies"):
        _decode_with(tmp_path, FrameTime="0.001", CineRate=30)


@pytest.mark.parametrize(
    ("attrs", "fps"),
    [
        ({"FrameTime": "1"}, 1000.0),  # the bound itself is plausible
        ({"CineRate": 1000}, 1000.0),
        ({"FrameTime": "33.333"}, 30.0),
        ({"FrameTimeVector": ["0", "20", "20", "20"]}, 50.0),
        # Zero, negative or empty states nothing: the next element, then 30.
        ({"FrameTime": "0", "CineRate": 45}, 45.0),
        ({"FrameTime": "-5", "CineRate": 45}, 45.0),
        ({"FrameTime": "", "FrameTimeVector": ["0", "0"]}, 30.0),
        ({}, 30.0),
    ],
)
def test_plausible_and_unstated_rates(attrs: dict, fps: float) -> None:
    assert _rate(**attrs) == pytest.approx(fps, abs=0.01)


# --------------------------------------------------------------------------
# Enhanced US: timing in the functional groups


def _enhanced_us(
    per_frame: list[dict[str, dict[str, object]]],
    *,
    shared: dict[str, dict[str, object]] | None = None,
    rows: int = 64,
    cols: int = 64,
) -> Dataset:
    """An Enhanced US Volume object, native MONOCHROME2, one frame per ``per_frame`` entry:
    each entry maps a functional group sequence to the attributes of its item."""
    n = len(per_frame)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_US_VOLUME
    ds.SOPClassUID = ENHANCED_US_VOLUME
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TEST^ENHANCED", "E1", "US"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0

    def group(spec: dict[str, dict[str, object]]) -> Dataset:
        item = Dataset()
        for sequence, attrs in spec.items():
            inner = Dataset()
            for keyword, value in attrs.items():
                setattr(inner, keyword, value)
            setattr(item, sequence, Sequence([inner]))
        return item

    ds.SharedFunctionalGroupsSequence = Sequence([group(shared or {})])
    ds.PerFrameFunctionalGroupsSequence = Sequence([group(spec) for spec in per_frame])
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8).tobytes()
    return ds


def _frame_content(times: list[str], keyword: str = "FrameReferenceDateTime") -> list[dict]:
    return [{"FrameContentSequence": {keyword: t, "TemporalPositionIndex": i + 1}} for i, t in enumerate(times)]


def _datetimes(n: int, step_us: int, start: str = "20260101120000") -> list[str]:
    return [f"{start}.{i * step_us:06d}" for i in range(n)]


def test_enhanced_us_frame_content_timing_gives_the_rate(tmp_path: Path) -> None:
    """An Enhanced US Volume has no Frame Time: its frames' times are in the functional
    groups. It was decoded at the 30 fps default whatever its real rate."""
    ds = _enhanced_us(_frame_content(_datetimes(16, 20_000)))  # 20 ms apart
    video = decode_video(write(ds, tmp_path / "enhanced.dcm"))
    assert video.fps == pytest.approx(50.0)
    assert video.fps_source == "FrameReferenceDateTime"
    assert video.frames.shape == (16, 64, 64)


@pytest.mark.parametrize(
    ("per_frame", "fps", "source"),
    [
        # Every frame at one time point (a single volume): nothing said about the rate.
        (_frame_content(["20260101120000"] * 12), None, None),
        # Frame Acquisition DateTime when there is no Frame Reference DateTime,
        # with a time zone offset.
        (_frame_content([f"20260101120000.{40_000 * i:06d}+0100" for i in range(12)], "FrameAcquisitionDateTime"),
         25.0, "FrameAcquisitionDateTime"),
        ([{"TemporalPositionSequence": {"TemporalPositionTimeOffset": 0.0125 * i}} for i in range(12)],
         80.0, "TemporalPositionTimeOffset"),
        ([{"CardiacSynchronizationSequence": {"NominalCardiacTriggerDelayTime": 25.0 * i}} for i in range(12)],
         40.0, "NominalCardiacTriggerDelayTime"),
        # A volume series: 3 frames (slices) per time point; the rate is the volume rate.
        (_frame_content([t for t in _datetimes(4, 50_000) for _ in range(3)]), 20.0, "FrameReferenceDateTime"),
    ],
)
def test_per_frame_timing_sources(per_frame: list[dict], fps: float | None, source: str | None) -> None:
    from echonode.analyse.frametiming import DEFAULT_FPS, frame_timing

    rate, where = frame_timing(_enhanced_us(per_frame))
    if fps is None:
        assert (rate, where) == (DEFAULT_FPS, "default")
    else:
        assert rate == pytest.approx(fps)
        assert where == source


def test_frame_time_crosses_midnight_and_the_order_of_frames_does_not_matter() -> None:
    from echonode.analyse.frametiming import frame_rate

    times = ["20260101235959.950000", "20260102000000.000000", "20260101235959.900000", "20260102000000.050000"]
    assert frame_rate(_enhanced_us(_frame_content(times))) == pytest.approx(20.0)


def test_timing_in_the_shared_group_says_nothing_about_the_rate() -> None:
    from echonode.analyse.frametiming import frame_timing

    ds = _enhanced_us([{}] * 12, shared={"FrameContentSequence": {"FrameReferenceDateTime": "20260101120000"}})
    assert frame_timing(ds) == (30.0, "default")
    ds.CineRate = 60
    assert frame_timing(ds) == (60.0, "CineRate")


def test_frame_time_comes_before_the_functional_groups() -> None:
    from echonode.analyse.frametiming import frame_timing

    ds = _enhanced_us(_frame_content(_datetimes(8, 20_000)))
    ds.FrameTime = "40"
    assert frame_timing(ds) == (25.0, "FrameTime")


def test_implausible_per_frame_timing_is_refused(tmp_path: Path) -> None:
    ds = _enhanced_us(_frame_content(_datetimes(16, 1)))  # 1 microsecond apart
    with pytest.raises(UnusableObject) as info:
        decode_video(write(ds, tmp_path / "enhanced.dcm"))
    assert info.value.reason.startswith("per-frame FrameReferenceDateTime (0.001 ms a frame) implies 1000000 frames/s")


def test_unreadable_per_frame_times_are_skipped() -> None:
    from echonode.analyse.frametiming import frame_timing

    per_frame = _frame_content(["not a date", "2026-01-01", ""] * 4)
    for i, spec in enumerate(per_frame):
        spec["CardiacSynchronizationSequence"] = {"NominalCardiacTriggerDelayTime": 30.0 * i}
    rate, where = frame_timing(_enhanced_us(per_frame))
    assert where == "NominalCardiacTriggerDelayTime"
    assert rate == pytest.approx(1000 / 30)


def test_a_real_enhanced_object_without_frame_timing_gets_the_default() -> None:
    """pydicom-data has no Enhanced US file; its Enhanced CT carries functional groups
    (Frame Content without any time): read, and the default applies."""
    from echonode.analyse.frametiming import frame_timing

    ds = pydicom.dcmread(real_testfile("eCT_Supplemental.dcm"), stop_before_pixels=True)
    assert "PerFrameFunctionalGroupsSequence" in ds
    assert frame_timing(ds) == (30.0, "default")
