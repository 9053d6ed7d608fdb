"""Where an ultrasound sector lies in the image, and its DICOM region.

Every synthetic video has one Sequence of Ultrasound Regions item: physical
units in cm, an isotropic pixel size, the transducer apex as the reference
pixel.  :class:`Geometry` carries that; each renderer lays its sector out in
its own way (:func:`train.synth.render.sector_geometry`,
:func:`train.synth.render_alt.sector_geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Geometry"]


@dataclass
class Geometry:
    """Where the sector lies in the image and how pixels map to centimetres.

    Attributes
    ----------
    rows, cols : int
        Image size.
    apex_row, apex_col : int
        The transducer apex (depth 0, lateral 0), inside the image.
    depth_cm, angle_deg : float
        Sector depth and opening angle.
    delta_cm : float
        Isotropic pixel size, cm per pixel.
    n_r, n_th : int
        The polar grid of a renderer that forms its image along beams
        (0 for one that does not).
    """

    rows: int
    cols: int
    apex_row: int
    apex_col: int
    depth_cm: float
    angle_deg: float
    delta_cm: float
    n_r: int = 0
    n_th: int = 0

    @property
    def sector_px(self) -> float:
        """Sector depth in pixels."""
        return self.depth_cm / self.delta_cm

    @property
    def half_width_px(self) -> float:
        """Half the sector's width at full depth, in pixels."""
        return self.sector_px * math.sin(math.radians(self.angle_deg / 2))

    def region_bounds(self) -> tuple[int, int, int, int]:
        """``(min_x0, min_y0, max_x1, max_y1)``, inclusive, inside the image."""
        x0 = max(0, int(math.floor(self.apex_col - self.half_width_px)))
        x1 = min(self.cols - 1, int(math.ceil(self.apex_col + self.half_width_px)))
        y1 = min(self.rows - 1, int(math.ceil(self.apex_row + self.sector_px)))
        return x0, self.apex_row, x1, y1

    def to_pixel(self, x_cm: np.ndarray, z_cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (col, row) of points given in cm relative to the apex."""
        return self.apex_col + x_cm / self.delta_cm, self.apex_row + z_cm / self.delta_cm

    def polar(self) -> tuple[np.ndarray, np.ndarray]:
        """Depth (cm) and beam angle (rad, 0 = straight down) of every pixel."""
        cc, rr = np.meshgrid(np.arange(self.cols, dtype=np.float32), np.arange(self.rows, dtype=np.float32))
        x = (cc - self.apex_col) * self.delta_cm
        z = (rr - self.apex_row) * self.delta_cm
        return np.hypot(x, z), np.arctan2(x, z)
