"""Pixel size from the Sequence of Ultrasound Regions: what is believed and what is not."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from echonode.analyse.decode import decode_video
from echonode.analyse.regions import PixelSpacing, tissue_spacing
from tests.conftest import real_testfile


def _region(x0: int = 10, y0: int = 5, x1: int = 300, y1: int = 230, *, dx: object = 0.07, dy: object = 0.07,
            units: int = 3, data_type: int = 1, spatial: int = 1) -> Dataset:
    r = Dataset()
    r.RegionSpatialFormat = spatial
    r.RegionDataType = data_type
    r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1, y1
    r.PhysicalUnitsXDirection = units
    r.PhysicalUnitsYDirection = units
    r.PhysicalDeltaX = dx
    r.PhysicalDeltaY = dy
    return r


def _image(*regions: Dataset, rows: int = 240, cols: int = 320) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = rows, cols
    if regions:
        ds.SequenceOfUltrasoundRegions = Sequence(list(regions))
    return ds


def test_a_2d_tissue_region_in_cm_gives_its_pixel_size() -> None:
    got = tissue_spacing(_image(_region(dx=0.05, dy=0.06)))
    assert got == PixelSpacing(row_cm=0.06, col_cm=0.05, region=(10, 5, 300, 230))


def test_the_largest_believable_tissue_region_wins_and_others_are_ignored() -> None:
    doppler = _region(0, 150, 319, 239, dx=0.2, dy=0.2, data_type=3)  # spectral Doppler strip
    small = _region(200, 10, 260, 60, dx=0.03, dy=0.03)  # a zoom box
    large = _region(20, 10, 310, 200, dx=0.08, dy=0.08)
    mmode = _region(0, 0, 319, 239, dx=0.1, dy=0.1, spatial=2)
    got = tissue_spacing(_image(doppler, small, mmode, large))
    assert got is not None and got.col_cm == 0.08 and got.region == (20, 10, 310, 200)


def test_a_negative_delta_is_a_direction_not_a_size() -> None:
    got = tissue_spacing(_image(_region(dx=-0.07, dy=0.07)))
    assert got is not None and got.col_cm == pytest.approx(0.07)


@pytest.mark.parametrize("region", [
    _region(units=4),  # seconds, not cm
    _region(units=0),  # none
    _region(dx=0.0),
    _region(dx=2.5, dy=2.5),  # mm written as cm? too large for a pixel
    _region(dx=None, dy=None),
    _region(x1=400),  # beyond the image: the regions of another (resized) image
    _region(y0=250, y1=260),
    _region(x0=300, x1=10),  # inverted
])
def test_unbelievable_regions_give_no_calibration(region: Dataset) -> None:
    assert tissue_spacing(_image(region)) is None


def test_no_regions_or_no_size_give_no_calibration() -> None:
    assert tissue_spacing(_image()) is None
    ds = _image(_region())
    del ds.Rows
    assert tissue_spacing(ds) is None


def test_real_loop_calibration_follows_the_decoded_size() -> None:
    # The SonoSite loop's cart wrote one 2D tissue region at 0.051 cm a pixel.
    path = real_testfile("color3d_jpeg_baseline.dcm")
    full = decode_video(path, max_frames=2)
    assert full.spacing is not None
    assert full.spacing.row_cm == pytest.approx(0.05105, abs=1e-4)
    reduced = decode_video(path, max_frames=2, target_side=112)
    assert reduced.scale < 1 and reduced.spacing is not None
    assert reduced.spacing.row_cm == pytest.approx(full.spacing.row_cm / reduced.scale)


def test_a_resized_copy_that_kept_the_carts_regions_is_not_believed() -> None:
    # pydicom's examples_ybr_color.dcm is the same loop at half size with the
    # full-size regions: their bounds lie outside its 240x320 pixels.
    path = real_testfile("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SequenceOfUltrasoundRegions[0].RegionLocationMaxX1 >= ds.Columns
    assert tissue_spacing(ds) is None
    assert decode_video(path, max_frames=2).spacing is None


def test_the_origin_is_where_the_regions_physical_coordinates_are_zero() -> None:
    region = _region(10, 5, 300, 230, dx=0.1, dy=0.1)
    region.ReferencePixelX0, region.ReferencePixelY0 = 145, 0  # the apex, at the region's top edge
    region.ReferencePixelPhysicalValueX, region.ReferencePixelPhysicalValueY = 0.0, 0.0
    got = tissue_spacing(_image(region))
    assert got is not None and got.origin == (5.0, 155.0)
    # A zoomed image: the reference pixel is 4 cm deep, so the face lies 40 pixels above the region.
    region.ReferencePixelY0, region.ReferencePixelPhysicalValueY = 0, 4.0
    got = tissue_spacing(_image(region))
    assert got is not None and got.origin == (-35.0, 155.0)
    assert got.scaled(0.5).origin == (-17.5, 77.5)
    # Far outside the image: a wrong reference, not believed (the spacing still is).
    region.ReferencePixelPhysicalValueY = 90.0
    got = tissue_spacing(_image(region))
    assert got is not None and got.origin is None and got.row_cm == 0.1
    del region.ReferencePixelX0
    assert tissue_spacing(_image(region)).origin is None  # type: ignore[union-attr]


def test_a_region_sequence_that_cannot_be_read_is_no_calibration_not_a_failed_decode(monkeypatch) -> None:
    import echonode.analyse.decode as decode

    def unreadable(ds: Dataset) -> None:
        raise ValueError("a sequence pydicom cannot parse")

    monkeypatch.setattr(decode, "tissue_spacing", unreadable)
    video = decode_video(real_testfile("color3d_jpeg_baseline.dcm"), max_frames=2)
    assert video.spacing is None and video.frames.shape[0] == 2
