"""Tests for renderer C (train/synth/render_scatter.py and train/synth/scatter/).

Small images and few frames keep the module to a few seconds.  The label
sizes are measured back from the drawn tissue (:func:`tissue_map` sampled
along the standard measuring lines, in pixels scaled by the geometry), and
the wall's effect on the pixels from a clean rendering's brightness profile.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from train.synth import acquisition, anatomy
from train.synth import render_scatter as rs
from train.synth.scatter import hearts
from train.synth.truth import StudyTruth

ROWS, COLS = 120, 160


def _anatomy(ivs: float = 1.0, lvpw: float = 0.9, sep: float = 1.8, state: str = "normal",
             calc: float = 0.1) -> anatomy.Anatomy:
    truth = StudyTruth(ivs_cm=ivs, lvpw_cm=lvpw, lvid_cm=4.8, av_cusp_sep_cm=sep, av_leaflet_cm=0.12,
                       ao_root_cm=3.0, av_calcification=calc, av_state=state)
    return anatomy.Anatomy(truth=truth, chest_wall_cm=1.4, rv_cm=2.2, la_cm=3.4, lv_length_cm=8.2,
                           fractional_shortening=0.33, pericardial_gap_cm=0.45)


def _plan(view: str = "plax", frames: int = 3, seed: int = 11, **kw: object) -> acquisition.VideoPlan:
    plan = acquisition.VideoPlan(
        view=view, series_number=1, vendor=acquisition.VENDORS[1], depth_cm=16.0, angle_deg=80.0, tilt_deg=-4.0,
        shift_x_cm=0.3, shift_z_cm=-0.2, heart_rate_bpm=72.0, fps=40, phase0=0.0, frames=frames, gain_db=0.0,
        tgc_db=(0.0, 1.0, -1.0, 0.5, 0.0), atten_db_per_cm=0.6, freq_mhz=2.5, noise_seed=seed,
        dynamic_range_db=58.0, gamma=2.2, quality=0.8, psf_scale=1.0, reverb=0.3,
    )
    return dataclasses.replace(plan, **kw)  # type: ignore[arg-type]


def _runs(classes: np.ndarray) -> list[tuple[int, int]]:
    """Run-length encoding: (class, length) along a line."""
    edges = np.flatnonzero(np.diff(classes)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(classes)]])
    return [(int(classes[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


@pytest.mark.parametrize("view", acquisition.VIEWS)
def test_shapes_dtype_and_phases(view: str) -> None:
    plan = _plan(view, frames=3, phase0=0.9)
    frames, geo, phases = rs.render_video(_anatomy(), plan, ROWS, COLS)
    assert frames.shape == (3, ROWS, COLS, 3) and frames.dtype == np.uint8
    t = np.arange(3) / plan.fps
    np.testing.assert_allclose(phases, (0.9 + t * plan.heart_rate_bpm / 60) % 1.0)
    assert (geo.rows, geo.cols, geo.depth_cm, geo.angle_deg) == (ROWS, COLS, 16.0, 80.0)
    assert geo.n_r > 0 and geo.n_th > 0
    assert 0 <= geo.apex_row < ROWS and 0 <= geo.apex_col < COLS
    # Dark blood, bright structures: a mostly dark sector, as in real echo.
    inside = rs.tissue_map(_anatomy(), plan, ROWS, COLS) >= 0
    mean = frames[0][..., 0][inside].mean() / 255
    assert 0.05 < mean < 0.3, mean


def test_deterministic_by_noise_seed() -> None:
    an = _anatomy()
    a, _, _ = rs.render_video(an, _plan(seed=5), ROWS, COLS)
    b, _, _ = rs.render_video(an, _plan(seed=5), ROWS, COLS)
    c, _, _ = rs.render_video(an, _plan(seed=6), ROWS, COLS)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Speckle, not a different drawing: the frames differ a lot pixel by pixel but not on average.
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 3
    assert abs(float(a.mean()) - float(c.mean())) < 3


def test_geometry_matches_drawn_sector() -> None:
    plan = _plan(angle_deg=70.0, depth_cm=14.0, frames=1)
    rows, cols = 240, 320
    frames, geo, _ = rs.render_video(_anatomy(), plan, rows, cols)
    img = frames[0].max(axis=2)
    r_px, th = (np.hypot(*np.meshgrid(np.arange(cols) - geo.apex_col, np.arange(rows) - geo.apex_row)),
                np.arctan2(*np.meshgrid(np.arange(cols) - geo.apex_col, np.arange(rows) - geo.apex_row)))
    half = math.radians(geo.angle_deg / 2)
    edge_px = np.minimum(geo.sector_px - r_px, (half - np.abs(th)) * r_px)
    # Burned-in text (top band), the depth ruler (right of the sector) and the ECG strip (bottom).
    overlay = np.zeros((rows, cols), bool)
    overlay[: int(0.14 * rows)] = True
    overlay[int(0.9 * rows):] = True
    overlay[:, int(geo.apex_col + geo.half_width_px) + 2:] = True
    outside = (edge_px < -1.5) & ~overlay
    assert img[outside].max() == 0
    # The sector itself is drawn up to its geometric edges: tissue (not blood) there is not black.
    tissue = np.isin(rs.tissue_map(_anatomy(), plan, rows, cols),
                     [hearts.MYO, hearts.CHEST, hearts.SURROUND, hearts.PERI, hearts.DEEP])
    sides = (edge_px > 1) & (edge_px < 4) & (r_px * geo.delta_cm > 0.6) & tissue
    assert sides.sum() > 100 and (img[sides] > 0).mean() > 0.9
    far = (np.abs(th) < half - 0.05) & (np.abs(r_px - geo.sector_px) < 3) & (r_px < geo.sector_px - 1)
    assert (img[far] > 0).mean() > 0.9
    assert geo.region_bounds()[3] <= rows - 1
    assert geo.apex_row + geo.sector_px < 0.91 * rows


@pytest.mark.parametrize(("ivs", "lvpw"), [(0.8, 1.0), (1.2, 0.7), (1.8, 1.5)])
def test_plax_end_diastolic_walls_are_exact(ivs: float, lvpw: float) -> None:
    an = _anatomy(ivs=ivs, lvpw=lvpw)
    plan = _plan(tilt_deg=4.0, shift_x_cm=-0.5)
    rows, cols = 240, 320
    geo = rs.sector_geometry(plan, rows, cols)
    cls = rs.tissue_map(an, plan, rows, cols, 0.0, points=rs.plax_measure_line(an, plan, rows, cols))
    runs = _runs(cls)
    step = geo.delta_cm / 8
    # From the front: ... RV blood, septum, LV cavity, posterior wall, pericardial space.
    i = max(range(len(runs)), key=lambda k: runs[k][1] if runs[k][0] == hearts.BLOOD else -1)  # the LV cavity
    assert runs[i - 1][0] == hearts.MYO and runs[i - 2][0] == hearts.BLOOD and runs[i + 1][0] == hearts.MYO
    assert runs[i + 2][0] == hearts.GAP
    assert abs(runs[i - 1][1] * step - ivs) <= geo.delta_cm
    assert abs(runs[i + 1][1] * step - lvpw) <= geo.delta_cm
    assert abs(runs[i][1] * step - an.truth.lvid_cm) <= geo.delta_cm


@pytest.mark.parametrize("sep", [0.5, 0.8, 1.6])
def test_plax_mid_systolic_cusp_separation_is_exact(sep: float) -> None:
    an = _anatomy(sep=sep)
    plan = _plan()
    rows, cols = 240, 320
    geo = rs.sector_geometry(plan, rows, cols)
    pts = rs.plax_valve_line(an, plan, rows, cols)
    cls = rs.tissue_map(an, plan, rows, cols, anatomy.MID_SYSTOLE_PHASE, points=pts)
    leaf = np.flatnonzero(cls == hearts.LEAFLET)
    # The gap between the two cusps (anterior run, posterior run) along the line.
    jumps = np.flatnonzero(np.diff(leaf) > 1)
    assert len(jumps) == 1
    gap = (leaf[jumps[0] + 1] - leaf[jumps[0]] - 1) * geo.delta_cm / 8
    assert abs(gap - sep) <= geo.delta_cm
    # Closed at end-diastole: the cusps meet near the root's centre.
    closed = rs.tissue_map(an, plan, rows, cols, 0.0, points=rs.plax_valve_line(an, plan, rows, cols, 0.0))
    leaf0 = np.flatnonzero(closed == hearts.LEAFLET)
    centre = (0.5 + an.truth.ao_root_cm / 2) / (geo.delta_cm / 8)  # the line starts 0.5 cm in front of the root
    assert len(leaf0) and np.abs(leaf0 - centre).min() * geo.delta_cm / 8 < 0.2


def _septal_band_px(ivs: float) -> float:
    """Width (px) of the bright band between the RV and LV cavities on a clean end-diastolic frame."""
    an = _anatomy(ivs=ivs, lvpw=0.9)
    plan = _plan(frames=1, quality=1.0, psf_scale=0.9, reverb=0.05)
    rows, cols = 240, 320
    frames, geo, _ = rs.render_video(an, plan, rows, cols)
    img = frames[0][..., 0].astype(float)
    heart = hearts.heart(an, plan)
    # Average the profile over parallel lines 1.2 cm either side of the measuring level.
    profiles = []
    for ds in np.linspace(-0.6, 0.6, 13):
        n = np.arange(heart.b + ivs + 1.2, 0.0, -geo.delta_cm)
        x, z = heart.to_image(np.full_like(n, -rs.MEASURE_LEVEL_CM + ds), n)
        c, r = geo.to_pixel(x, z)
        profiles.append(img[np.round(r).astype(int), np.round(c).astype(int)])
    prof = np.convolve(np.mean(profiles, axis=0), np.ones(3) / 3, mode="same")
    return float((prof > 0.5 * prof.max()).sum())


def test_thicker_septum_draws_a_wider_bright_band() -> None:
    widths = [_septal_band_px(v) for v in (0.8, 1.3, 1.8)]
    assert widths[0] < widths[1] < widths[2], widths


def test_label_irrelevant_fields_do_not_change_pixels() -> None:
    plan = _plan(frames=2, phase0=0.1)
    a, _, _ = rs.render_video(_anatomy(sep=0.7, state="severe"), plan, ROWS, COLS)
    b, _, _ = rs.render_video(_anatomy(sep=0.7, state="normal"), plan, ROWS, COLS)
    assert np.array_equal(a, b)


def test_calcification_brightens_the_cusps() -> None:
    plan = _plan(frames=1, phase0=anatomy.MID_SYSTOLE_PHASE, quality=1.0)
    rows, cols = 240, 320
    lo, _, _ = rs.render_video(_anatomy(calc=0.0), plan, rows, cols)
    hi, _, _ = rs.render_video(_anatomy(calc=1.0), plan, rows, cols)
    cusp = rs.tissue_map(_anatomy(), plan, rows, cols, anatomy.MID_SYSTOLE_PHASE) == hearts.LEAFLET
    assert hi[0][..., 0][cusp].mean() > lo[0][..., 0][cusp].mean() + 20
