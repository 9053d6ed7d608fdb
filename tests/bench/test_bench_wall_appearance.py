"""bench/wall_appearance.py: where each renderer draws a wall's edges."""

from __future__ import annotations

import cv2
import numpy as np

from bench import wall_appearance


def test_a_band_is_measured_at_half_grey_between_cavity_and_wall() -> None:
    v = np.arange(-3.0, 0.0, wall_appearance._STEP_CM)
    wall, cavity = (-2.2, -1.0), (-1.0, 0.0)
    band = np.where((v > wall[0]) & (v < wall[1]), 200.0, 10.0).astype(np.float32)
    # A symmetric blur leaves the half-grey edges where they were.
    blurred = cv2.GaussianBlur(band[None, :], (0, 0), sigmaX=6, sigmaY=0.1)[0]
    assert abs(wall_appearance.apparent_thickness(blurred, v, wall, cavity) - 1.2) < 0.03
    # A band drawn wider by 0.1 cm on each side reads 0.2 cm thicker.
    wide = np.where((v > wall[0] - 0.1) & (v < wall[1] + 0.1), 200.0, 10.0)
    assert abs(wall_appearance.apparent_thickness(wide, v, wall, cavity) - 1.4) < 0.03
    # A wall no brighter than the cavity, or one dark at its centre, has no band to measure.
    assert wall_appearance.apparent_thickness(np.full_like(v, 10.0), v, wall, cavity) == 0.0
    notched = np.where(np.abs(v + 1.6) < 0.05, 10.0, band)
    assert wall_appearance.apparent_thickness(notched, v, wall, cavity) == 0.0


def test_renderer_a_varied_look_draws_walls_where_they_are(capsys) -> None:
    """Boundaries blended in decibels centre the varied look on the true wall; the power blend blooms."""
    varied = wall_appearance.measure(4, "varied")
    power = wall_appearance.measure(4, "varied", edges="power")
    septa = np.asarray(wall_appearance.SEPTA_CM)[None, :]
    excess_db = float(np.median(varied["A"] - septa))
    excess_power = float(np.median(power["A"] - septa))
    assert abs(excess_db) < 0.12, excess_db
    assert excess_power > excess_db + 0.05, (excess_power, excess_db)
    # Renderer B is the same whatever A's look, and every wall is found.
    assert np.array_equal(varied["B"], power["B"])
    assert np.all(varied["B"] > 0) and np.all(varied["A"] > 0)
    assert wall_appearance.main(["--acquisitions", "1"]) == 0
    assert "| B: apparent - true" in capsys.readouterr().out
