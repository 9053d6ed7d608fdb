"""The physical size of an ultrasound image's pixels, from its calibrated regions.

An ultrasound image states its calibration in the Sequence of Ultrasound
Regions (PS3.3 C.8.5.5): each region gives its bounds in the image, what it
shows (2D tissue, Doppler, M-mode, ...), and the physical size of one pixel.
A model that measures in centimetres (a wall's thickness, a valve's opening)
needs that size: the sector's depth changes from study to study, so the same
heart covers a different number of pixels.

Only a region that shows 2D tissue in centimetres, lies inside the image and
states a plausible pixel size is believed. A file resized after the cart
wrote it often keeps the cart's regions, whose bounds then lie outside the
image; such a calibration describes another image and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from echonode.analyse.values import as_float, as_int

__all__ = ["PixelSpacing", "tissue_spacing"]

# PS3.3 C.8.5.5.1.1 and .2: Region Spatial Format 1 = 2D, Region Data Type 1 = tissue.
_SPATIAL_2D = 1
_DATA_TISSUE = 1
# PS3.3 C.8.5.5.1.15: Physical Units 3 = cm.
_UNITS_CM = 3
# A pixel of a cardiac image is tens of micrometres to a few millimetres;
# outside this range the value is in other units or corrupt.
_MIN_CM, _MAX_CM = 1e-3, 0.5


@dataclass(frozen=True)
class PixelSpacing:
    """Centimetres per pixel of the stored image, and the region they come from.

    Attributes
    ----------
    row_cm, col_cm : float
        Size of one pixel down the rows (PhysicalDeltaY) and along them
        (PhysicalDeltaX), in cm.
    region : tuple of int
        The region's bounds ``(x0, y0, x1, y1)`` in stored pixels, inclusive.
    origin : tuple of float or None
        ``(row, col)`` of the physical origin, where depth and lateral
        offset are 0 (the transducer face on the beam axis of a sector
        probe), in pixels of this image; None when the region does not
        state its reference pixel, or states one far outside the image.
    """

    row_cm: float
    col_cm: float
    region: tuple[int, int, int, int]
    origin: tuple[float, float] | None = None

    def scaled(self, scale: float) -> PixelSpacing:
        """The spacing of the image resized by ``scale`` (decoded / stored size)."""
        if not scale > 0:
            raise ValueError(f'Argument "scale" must be positive, got {scale!r}.')
        origin = None if self.origin is None else (self.origin[0] * scale, self.origin[1] * scale)
        return PixelSpacing(self.row_cm / scale, self.col_cm / scale, self.region, origin)


def tissue_spacing(ds: Dataset) -> PixelSpacing | None:
    """The pixel size of the largest believable 2D tissue region of an image.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The image's header (its Rows and Columns bound the regions).

    Returns
    -------
    PixelSpacing or None
        None when the image states no region that shows 2D tissue in cm
        inside the image with a plausible pixel size.
    """
    rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not rows or not cols or not regions:
        return None
    best: tuple[int, PixelSpacing] | None = None
    for region in regions:
        spacing = _believable(region, rows, cols)
        if spacing is None:
            continue
        x0, y0, x1, y1 = spacing.region
        area = (x1 - x0 + 1) * (y1 - y0 + 1)
        if best is None or area > best[0]:
            best = (area, spacing)
    return None if best is None else best[1]


def _believable(region: Dataset, rows: int, cols: int) -> PixelSpacing | None:
    """The region's spacing when it shows 2D tissue in cm, inside the image, else None."""
    if as_int(region.get("RegionSpatialFormat")) != _SPATIAL_2D:
        return None
    if as_int(region.get("RegionDataType")) != _DATA_TISSUE:
        return None
    if (as_int(region.get("PhysicalUnitsXDirection")) != _UNITS_CM
            or as_int(region.get("PhysicalUnitsYDirection")) != _UNITS_CM):
        return None
    bounds = [as_int(region.get(k)) for k in
              ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")]
    if any(b is None for b in bounds):
        return None
    x0, y0, x1, y1 = (int(b) for b in bounds)  # type: ignore[arg-type]
    if not (0 <= x0 < x1 < cols and 0 <= y0 < y1 < rows):
        return None
    dx, dy = as_float(region.get("PhysicalDeltaX")), as_float(region.get("PhysicalDeltaY"))
    if dx is None or dy is None or not (_MIN_CM <= abs(dx) <= _MAX_CM and _MIN_CM <= abs(dy) <= _MAX_CM):
        return None
    origin = _origin(region, (x0, y0), (dx, dy), rows, cols)
    # The sign says which way the axis runs; the size is what is wanted.
    return PixelSpacing(row_cm=abs(dy), col_cm=abs(dx), region=(x0, y0, x1, y1), origin=origin)


def _origin(region: Dataset, corner: tuple[int, int], delta: tuple[float, float], rows: int,
            cols: int) -> tuple[float, float] | None:
    """``(row, col)`` where the region's physical coordinates are 0, or None.

    The reference pixel is given relative to the region's upper-left corner
    (PS3.3 C.8.5.5.1.12) together with its physical value; the origin is
    that many pixels of ``delta`` away from it.
    """
    ref = [as_int(region.get(k)) for k in ("ReferencePixelX0", "ReferencePixelY0")]
    if ref[0] is None or ref[1] is None:
        return None
    value_x = as_float(region.get("ReferencePixelPhysicalValueX")) or 0.0
    value_y = as_float(region.get("ReferencePixelPhysicalValueY")) or 0.0
    col = corner[0] + ref[0] - value_x / delta[0]
    row = corner[1] + ref[1] - value_y / delta[1]
    # A transducer face a little above the image is common (the top of the
    # sector cut off); one far outside it is a wrong reference.
    if not (-rows <= row <= rows and -cols / 2 <= col <= 1.5 * cols):
        return None
    return (row, col)


