"""Renderer D ("fieldwarp"): shapes, determinism, geometry, exact anatomy, no label leaks."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.synth.acquisition import VENDORS, VIEWS, VideoPlan
from train.synth.anatomy import MID_SYSTOLE_PHASE, Anatomy
from train.synth.archive import RENDERERS
from train.synth.fieldwarp.scene import AORTIC_CUSP, BLOOD, MYOCARDIUM, OUTSIDE
from train.synth.render_fieldwarp import frame_phases, render_video, scene_of, sector_geometry, tissue_map
from train.synth.truth import StudyTruth

ROWS, COLS = 120, 160


def _anatomy(**truth: float | str) -> Anatomy:
    base: dict = dict(ivs_cm=0.9, lvpw_cm=0.9, lvid_cm=4.8, av_cusp_sep_cm=1.8, av_leaflet_cm=0.12,
                      ao_root_cm=3.0, av_calcification=0.1, av_state="normal")
    base.update(truth)
    return Anatomy(truth=StudyTruth(**base), chest_wall_cm=1.2, rv_cm=2.2, la_cm=3.4, lv_length_cm=8.2,
                   fractional_shortening=0.34, pericardial_gap_cm=0.45)


def _plan(view: str = "plax", frames: int = 3, **kw: object) -> VideoPlan:
    plan = VideoPlan(view=view, series_number=1, vendor=VENDORS[0], depth_cm=18.0, angle_deg=80.0, tilt_deg=-3.0,
                     shift_x_cm=0.2, shift_z_cm=0.1, heart_rate_bpm=72.0, fps=40, phase0=0.3, frames=frames,
                     gain_db=0.0, tgc_db=(0.0, 1.0, -1.0, 0.5, 0.0), atten_db_per_cm=0.6, freq_mhz=2.5,
                     noise_seed=1234, quality=0.8, reverb=0.2)
    return dataclasses.replace(plan, **kw)  # type: ignore[arg-type]


def _luma(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64).mean(axis=2)


def _pixels(plan: VideoPlan, x_cm: np.ndarray, z_cm: np.ndarray, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """(col, row) image points of screen positions in cm from the apex."""
    geo = sector_geometry(plan, rows, cols)
    return np.stack([geo.apex_col + x_cm / geo.delta_cm, geo.apex_row + z_cm / geo.delta_cm], axis=1)


def _measuring_line(an: Anatomy, plan: VideoPlan, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o, d = scene_of(an, plan).measuring_line()
    return o[0] + s * d[0], o[1] + s * d[1]


def _runs(cls: np.ndarray) -> list[tuple[int, int, int]]:
    """(class, first index, last index) of each run of equal classes."""
    edges = np.flatnonzero(np.diff(cls)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges - 1, [cls.size - 1]])
    return [(int(cls[a]), int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def test_registered() -> None:
    assert RENDERERS["fieldwarp"] is render_video


@pytest.mark.parametrize("view", VIEWS)
def test_shapes_dtype_and_phases(view: str) -> None:
    plan = _plan(view)
    frames, geo, phases = render_video(_anatomy(), plan, ROWS, COLS, {"initials": "AB", "date": "01/02/2020"})
    assert frames.shape == (3, ROWS, COLS, 3) and frames.dtype == np.uint8
    assert phases.shape == (3,) and phases.dtype == np.float64
    np.testing.assert_allclose(phases, (0.3 + np.arange(3) / 40 * 72 / 60) % 1.0)
    np.testing.assert_allclose(phases, frame_phases(plan))
    assert (geo.rows, geo.cols) == (ROWS, COLS)
    assert frames.max() > 100  # something is drawn


def test_deterministic_by_noise_seed() -> None:
    an, plan = _anatomy(), _plan(frames=2)
    a, _, _ = render_video(an, plan, ROWS, COLS)
    b, _, _ = render_video(an, plan, ROWS, COLS)
    c, _, _ = render_video(an, dataclasses.replace(plan, noise_seed=99), ROWS, COLS)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.abs(a.astype(int) - c.astype(int))) > 2.0


def test_geometry_is_the_drawn_sector() -> None:
    plan = _plan(frames=1)
    frames, geo, _ = render_video(_anatomy(), plan, ROWS, COLS)
    assert geo == sector_geometry(plan, ROWS, COLS)
    assert 0 <= geo.apex_row < ROWS and 0 <= geo.apex_col < COLS
    assert math.isclose(geo.depth_cm, plan.depth_cm) and math.isclose(geo.angle_deg, plan.angle_deg)
    r_cm, th = geo.polar()
    half = math.radians(geo.angle_deg / 2)
    inside = (r_cm < geo.depth_cm - 2 * geo.delta_cm) & (np.abs(th) < half - 0.05) & (r_cm > 1.0)
    # A ring just past the sector's bottom, above the ECG strip: black.
    rows_ = np.arange(ROWS)[:, None] * np.ones((1, COLS))
    beyond = (r_cm > geo.depth_cm + 1.5 * geo.delta_cm) & (r_cm < geo.depth_cm + 4 * geo.delta_cm) & \
        (np.abs(th) < half - 0.1) & (rows_ < 0.88 * ROWS)
    luma = _luma(frames[0])
    assert (luma[inside] > 0).mean() > 0.9
    assert luma[beyond].max() == 0
    x0, y0, x1, y1 = geo.region_bounds()
    assert 0 <= x0 < geo.apex_col < x1 < COLS and y1 < ROWS
    # tissue_map's sector is the same one.
    tm = tissue_map(_anatomy(), plan, ROWS, COLS)
    assert (tm[inside] != OUTSIDE).all() and (tm[beyond] == OUTSIDE).all()


@pytest.mark.parametrize(("ivs", "lvpw", "lvid", "tilt"), [
    (0.62, 0.9, 4.8, -3.0), (1.2, 1.0, 5.5, 4.0), (1.7, 2.05, 3.9, -12.0), (0.95, 1.45, 6.0, 6.0)])
def test_plax_end_diastolic_walls_exact(ivs: float, lvpw: float, lvid: float, tilt: float) -> None:
    an = _anatomy(ivs_cm=ivs, lvpw_cm=lvpw, lvid_cm=lvid)
    plan = _plan(tilt_deg=tilt, depth_cm=20.0)
    step = 0.002
    s = np.arange(-lvid / 2 - ivs - 0.5, lvid / 2 + lvpw + 0.3, step)
    x, z = _measuring_line(an, plan, s)
    cls = tissue_map(an, plan, ROWS, COLS, phase=0.0, points=_pixels(plan, x, z))
    runs = _runs(cls)
    k = next(i for i, (c, a, b) in enumerate(runs) if c == BLOOD and s[a] < 0 < s[b])
    (_, sa, sb), (c_sep, ia, _), (c_post, _, pb) = runs[k], runs[k - 1], runs[k + 1]
    assert c_sep == MYOCARDIUM and c_post == MYOCARDIUM
    assert abs((s[sb] - s[sa] + step) - lvid) < 0.01
    assert abs((s[sa] - s[ia]) - ivs) < 0.01
    assert abs((s[pb] - s[sb]) - lvpw) < 0.01


@pytest.mark.parametrize("sep", [0.4, 0.75, 1.2, 2.1])
def test_mid_systolic_cusp_separation_exact(sep: float) -> None:
    an = _anatomy(av_cusp_sep_cm=sep, av_leaflet_cm=0.25 if sep < 0.8 else 0.12, ao_root_cm=3.2)
    plan = _plan(depth_cm=16.0)
    o, u, n = scene_of(an, plan).root_frame()
    ss, qq = np.meshgrid(np.arange(0.0, 2.5, 0.02), np.arange(-1.9, 1.9, 0.002))
    x, z = o[0] + ss * u[0] + qq * n[0], o[1] + ss * u[1] + qq * n[1]
    cls = tissue_map(an, plan, ROWS, COLS, phase=MID_SYSTOLE_PHASE, points=_pixels(plan, x.ravel(), z.ravel()))
    q = qq.ravel()[cls == AORTIC_CUSP]
    assert (q > 0).any() and (q < 0).any()
    assert abs((q[q > 0].min() - q[q < 0].max()) - sep) < 0.012
    # Closed at end-diastole: the cusps meet in the middle.
    closed = tissue_map(an, plan, ROWS, COLS, phase=0.0, points=_pixels(plan, x.ravel(), z.ravel()))
    qc = qq.ravel()[closed == AORTIC_CUSP]
    assert qc[qc > 0].min() - qc[qc < 0].max() < 0.01


def test_label_fields_do_not_change_pixels() -> None:
    plan = _plan(frames=2)
    a, _, _ = render_video(_anatomy(av_state="normal"), plan, ROWS, COLS)
    b, _, _ = render_video(_anatomy(av_state="severe"), plan, ROWS, COLS)
    np.testing.assert_array_equal(a, b)


def test_calcification_brightens_the_cusps() -> None:
    rows, cols = 240, 320
    plan = _plan(frames=1, phase0=0.0, depth_cm=14.0, quality=1.0, reverb=0.1)
    levels = []
    for calc in (0.0, 0.9):
        an = _anatomy(av_calcification=calc, av_leaflet_cm=0.25)
        frame = render_video(an, plan, rows, cols)[0][0]
        mask = tissue_map(an, plan, rows, cols, phase=0.0) == AORTIC_CUSP
        assert mask.sum() > 10
        levels.append(_luma(frame)[mask].mean())
    assert levels[1] > levels[0] + 25


def test_thicker_septum_draws_a_wider_bright_band() -> None:
    rows, cols = 240, 320
    plan = _plan(frames=1, phase0=0.0, depth_cm=16.0, quality=1.0, reverb=0.1, tilt_deg=0.0)
    widths = []
    for ivs in (0.7, 1.6):
        an = _anatomy(ivs_cm=ivs)
        frame = render_video(an, plan, rows, cols)[0][0]
        s = np.arange(-2.4 - ivs - 1.2, -1.4, 0.01)
        x, z = _measuring_line(an, plan, s)
        pts = _pixels(plan, x, z, rows, cols)
        # Luma along the line, averaged over a few parallel lines to beat speckle.
        prof = np.zeros(s.size)
        for dx in (-6, -3, 0, 3, 6):
            c = np.clip(np.rint(pts[:, 0] + dx).astype(int), 0, cols - 1)
            prof += _luma(frame)[np.clip(np.rint(pts[:, 1]).astype(int), 0, rows - 1), c]
        prof /= 5
        bright = prof > 0.5 * (np.median(prof) + prof.max()) * 0.6
        centre = int(np.argmin(np.abs(s - (-2.4 - ivs / 2))))
        lo = hi = centre
        while lo > 0 and bright[lo - 1]:
            lo -= 1
        while hi < s.size - 1 and bright[hi + 1]:
            hi += 1
        assert bright[centre]
        widths.append(s[hi] - s[lo])
    assert widths[1] - widths[0] > 0.5


def test_synth_cli_end_to_end(tmp_path: Path) -> None:
    out, cache = tmp_path / "x", tmp_path / "xc"
    run = [sys.executable, "-m", "train", "synth", "--out", str(out), "--patients", "2", "--renderer", "fieldwarp",
           "--views", "plax", "--rows", "120", "--cols", "160", "--frames", "4", "--no-reports"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "renderer fieldwarp" in done.stdout
    dicoms = list((out / "dicom").rglob("*.dcm"))
    assert dicoms
    idx = [sys.executable, "-m", "train", "index", str(out), "--out", str(cache), "--preset", "tiny", "--size", "32",
           "--workers", "1"]
    done = subprocess.run(idx, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(cache.iterdir())


def _archive_plax_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patients: int,
                        seed: int) -> list[tuple[Anatomy, VideoPlan]]:
    """The hearts and PLAX plans the archive's own sampler draws (renderer stubbed out)."""
    from train.synth import archive

    caught: list[tuple[Anatomy, VideoPlan]] = []

    def record(an: Anatomy, plan: VideoPlan, rows: int, cols: int,
               header: dict[str, str] | None = None) -> tuple[np.ndarray, object, np.ndarray]:
        caught.append((an, plan))
        return (np.zeros((plan.frames, rows, cols, 3), np.uint8), sector_geometry(plan, rows, cols),
                np.zeros(plan.frames))

    monkeypatch.setitem(archive.RENDERERS, "fieldwarp", record)
    archive.generate_archive(tmp_path / "arch", patients, seed, frames=1, rows=120, cols=160, renderer="fieldwarp",
                             views=["plax"], reports=False)
    return caught


def _outside_sector(plan: VideoPlan, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    r, th = np.hypot(x, z), np.arctan2(x, z)
    return (r > plan.depth_cm) | (np.abs(th) > math.radians(plan.angle_deg / 2))


def test_plax_framing_keeps_the_aortic_valve_and_the_walls_in_the_sector(tmp_path, monkeypatch) -> None:
    """Over the plans the archive draws, the opening cusps at mid-systole and the measured walls at
    end-diastole lie inside the sector in nearly every PLAX video: a valve the sector cuts shows no
    opening, and wider openings reach farther, so cut valves would fall mostly on one label."""
    pairs = _archive_plax_pairs(tmp_path, monkeypatch, patients=60, seed=5)
    assert len(pairs) >= 150
    valve_cut = walls_cut = 0
    for an, plan in pairs:
        scene = scene_of(an, plan)
        o, u, n = scene.root_frame()
        ss, qq = np.meshgrid(np.arange(0.0, 2.6, 0.03), np.arange(-1.9, 1.9, 0.03))
        x, z = o[0] + ss * u[0] + qq * n[0], o[1] + ss * u[1] + qq * n[1]
        cusp = scene.paint(x.ravel(), z.ravel(), MID_SYSTOLE_PHASE).cls == AORTIC_CUSP
        # The free edges: each cusp's points farthest along the root, where the opening is read.
        s_cusp, q_cusp, x_cusp, z_cusp = ss.ravel()[cusp], qq.ravel()[cusp], x.ravel()[cusp], z.ravel()[cusp]
        edges = [np.flatnonzero(side)[np.argsort(s_cusp[side])[-3:]] for side in (q_cusp < 0, q_cusp > 0)]
        assert all(len(e) for e in edges)
        free_edges = np.concatenate(edges)
        valve_cut += bool(_outside_sector(plan, x_cusp[free_edges], z_cusp[free_edges]).any())
        tr = an.truth
        s = np.linspace(-0.5 * tr.lvid_cm - tr.ivs_cm, 0.5 * tr.lvid_cm + tr.lvpw_cm, 40)
        (ox, oz), d = scene.measuring_line()
        walls_cut += bool(_outside_sector(plan, ox + s * d[0], oz + s * d[1]).any())
    print({"videos": len(pairs), "valve_cut": valve_cut, "walls_cut": walls_cut})
    assert valve_cut / len(pairs) <= 0.025, (valve_cut, len(pairs))
    assert walls_cut / len(pairs) <= 0.025, (walls_cut, len(pairs))
