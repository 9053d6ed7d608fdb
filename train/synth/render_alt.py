"""Renderer B ("raster"): the same anatomy, drawn another way.

Written apart from renderer A (:mod:`train.synth.render`, :mod:`train.synth.views`)
to measure whether a model trained on one rendering of the anatomy holds up on
another.  It shares only the anatomy (:class:`~train.synth.anatomy.Anatomy`,
the cardiac cycle) and the acquisition plan; everything that makes pixels is
different:

* geometry: explicit outlines (polygons, ellipses, thick line segments) in
  view-local cm, rasterised straight into the image (no beam grid, no scan
  conversion), with the view placed by its own rule;
* sector: blunted apex (the image starts 0.5-0.9 cm deep, as a curved
  footprint), a flat-bottomed or rounded far edge, no ECG band, the sector
  shifted sideways on the screen;
* speckle: multiplicative gamma-distributed (Nakagami-like) texture on a
  coarser half-resolution grid, smoothed by a box kernel that is wider across
  than along depth in *image* axes (not along beams);
* grey map: a logistic curve in dB instead of a power law, a tinted colour map
  (bronze, blue-grey or green-grey), its own haze, dropout and shadowing.

The label-defining sizes are exact here too: at end-diastole the PLAX walls
are ``ivs_cm`` / ``lvpw_cm`` thick; at mid-systole the inner edges of the
aortic cusps are ``av_cusp_sep_cm`` apart.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import Anatomy, av_open, contraction, mv_open
from train.synth.geometry import Geometry

__all__ = ["av_cusp_bars", "render_video", "sector_geometry", "view_pose"]

# Echo strength per tissue (dB over myocardium): blood far below, pericardium
# above, the tissue around the heart about as echogenic as the myocardium (as
# in real echo). A much darker surround made thick walls brighten the whole
# image, so mean brightness alone told LVH apart (AUROC 0.61-0.63); wall
# thickness stays visible against the blood and the pericardium.
_DB = {"blood": -34.0, "myo": 0.0, "fat": -1.0, "wall": 6.0, "peri": 12.0, "valve": 3.0}
_TINTS = ((1.0, 0.92, 0.78), (0.86, 0.93, 1.0), (0.9, 1.0, 0.9), (1.0, 1.0, 1.0))


def sector_geometry(rows: int, cols: int, depth_cm: float, angle_deg: float, plan: VideoPlan) -> Geometry:
    """Renderer B's layout: no ECG band, the apex off centre by a vendor-chosen offset."""
    apex_row = int(round(rows * 0.10))
    shift = int(round(cols * (0.04 if plan.vendor.text_left else -0.04)))
    half = math.sin(math.radians(angle_deg / 2))
    usable_half = min(cols / 2 + shift, cols / 2 - shift) - 6
    sector_px = min(rows - apex_row - 6, usable_half / half)
    return Geometry(rows, cols, apex_row, cols // 2 + shift, depth_cm, angle_deg, depth_cm / sector_px)


class _Canvas:
    """Paints tissue levels (dB) given in view-local cm onto the image grid."""

    def __init__(self, geo: Geometry, centre: tuple[float, float], rot_deg: float, base_db: float) -> None:
        self.geo = geo
        self.centre = centre
        self.rot = math.radians(rot_deg)
        self.img = np.full((geo.rows, geo.cols), base_db, np.float32)

    def px(self, pts: np.ndarray) -> np.ndarray:
        """View-local (u, v) cm to image (col, row) in 1/16 pixel fixed point."""
        c, s = math.cos(self.rot), math.sin(self.rot)
        u, v = pts[:, 0], pts[:, 1]
        x = self.centre[0] + c * u - s * v
        z = self.centre[1] + s * u + c * v
        col = self.geo.apex_col + x / self.geo.delta_cm
        row = self.geo.apex_row + z / self.geo.delta_cm
        return np.round(np.stack([col, row], 1) * 16).astype(np.int32)

    def poly(self, pts: npt.ArrayLike, level: float) -> None:
        cv2.fillPoly(self.img, [self.px(np.asarray(pts, np.float64))], float(level), cv2.LINE_8, shift=4)

    def ellipse(self, cu: float, cv: float, au: float, av: float, level: float) -> None:
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        self.poly(np.stack([cu + au * np.cos(t), cv + av * np.sin(t)], 1), level)

    def bar(self, p0: tuple[float, float], p1: tuple[float, float], width_cm: float, level: float) -> None:
        """A straight band ``width_cm`` wide from p0 to p1 (a leaflet, a thin wall)."""
        d = np.subtract(p1, p0)
        n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * width_cm / 2
        self.poly(np.array([np.add(p0, n), np.add(p1, n), np.subtract(p1, n), np.subtract(p0, n)]), level)


def _plax(cv_: _Canvas, an: Anatomy, ph: float, calc_db: float) -> None:
    """PLAX as outlines: u toward the aorta (screen right), v deeper; LV centre at the origin."""
    tr = an.truth
    s = contraction(ph)
    h = tr.lvid_cm / 2 * (1 - an.fractional_shortening * s)
    # Wall thickness at any phase keeps the end-diastolic cross-section.
    ivs = math.sqrt(h * h + (tr.lvid_cm / 2 + tr.ivs_cm) ** 2 - (tr.lvid_cm / 2) ** 2) - h
    pw = math.sqrt(h * h + (tr.lvid_cm / 2 + tr.lvpw_cm) ** 2 - (tr.lvid_cm / 2) ** 2) - h
    apex_u = -an.lv_length_cm
    base_u = 0.0
    cv_.poly([(apex_u - 1, -h - ivs - an.rv_cm - 0.5), (4.5, -h - ivs - an.rv_cm - 0.5),
              (4.5, -h - ivs - an.rv_cm), (apex_u - 1, -h - ivs - an.rv_cm)], _DB["myo"] - 2)
    cv_.poly([(apex_u + 1.5, -h - ivs - an.rv_cm), (4.5, -h - ivs - an.rv_cm), (4.5, -h - ivs),
              (apex_u + 1.5, -h - ivs)], _DB["blood"])
    # Septum and posterior wall: bands of exact thickness over the LV body.
    cv_.poly([(apex_u + 0.6, -h - ivs), (base_u - 0.2, -h - ivs), (base_u - 0.2, -h), (apex_u + 0.6, -h)], _DB["myo"])
    cv_.poly([(apex_u + 0.6, h), (base_u + 0.6, h), (base_u + 0.6, h + pw), (apex_u + 0.6, h + pw)], _DB["myo"])
    cv_.ellipse(apex_u + 0.9, 0.0, 1.1, h + max(ivs, pw) * 0.9, _DB["myo"])
    cv_.poly([(apex_u + 0.9, -h), (base_u + 0.3, -h), (base_u + 0.3, h), (apex_u + 0.9, h)], _DB["blood"])
    cv_.ellipse(apex_u + 0.9, 0.0, 0.8, h, _DB["blood"])
    gap = an.pericardial_gap_cm
    cv_.bar((apex_u + 0.5, h + pw + gap + 0.15), (5.0, h + pw + gap + 0.15), 0.3, _DB["peri"])
    # Aortic root: walls continue from the septum, lumen of the root diameter.
    v_a = -h - 0.5 * ivs
    v_p = v_a + tr.ao_root_cm
    cv_.poly([(base_u - 0.2, v_a - 0.22), (4.5, v_a - 0.22), (4.5, v_p + 0.22), (base_u - 0.2, v_p + 0.22)], _DB["wall"])
    cv_.poly([(base_u - 0.2, v_a), (4.5, v_a), (4.5, v_p), (base_u - 0.2, v_p)], _DB["blood"])
    # Left atrium behind the root, open to the LV through the mitral orifice.
    la_v = v_p + 0.3 + an.la_cm / 2
    cv_.ellipse(2.3, la_v, an.la_cm / 2 + 0.8, an.la_cm / 2 + 0.12, _DB["myo"] - 3)
    cv_.ellipse(2.3, la_v, an.la_cm / 2 + 0.7, an.la_cm / 2, _DB["blood"])
    cv_.poly([(base_u - 0.5, v_p + 0.2), (1.0, v_p + 0.2), (1.0, h), (base_u - 0.5, h)], _DB["blood"])
    # Mitral leaflets swing toward the septum in diastole.
    m = mv_open(ph)
    for hinge, length, sign in (((0.3, v_p + 0.2), 2.0, -1.0), ((0.6, h + 0.05), 1.2, 1.0)):
        ang = math.radians(180 + sign * (20 + 55 * m))
        tip = (hinge[0] + length * math.cos(ang), hinge[1] - sign * length * abs(math.sin(ang)))
        cv_.bar(hinge, tip, 0.12, _DB["valve"])
    _aortic_cusps(cv_, an, ph, calc_db)


def av_cusp_bars(an: Anatomy, ph: float) -> tuple[tuple[tuple[float, float], tuple[float, float]], ...]:
    """Hinge and tip (view-local u, v cm) of the anterior and posterior aortic cusp at phase ``ph``.

    Two cusps hinged on the root walls; their tips slide from the midline to
    ``sep / 2`` from it (inner edges ``av_cusp_sep_cm`` apart) at full opening.
    Each is drawn as a band ``av_leaflet_cm`` wide along hinge to tip.
    """
    tr = an.truth
    h = tr.lvid_cm / 2 * (1 - an.fractional_shortening * contraction(ph))
    ivs = math.sqrt(h * h + (tr.lvid_cm / 2 + tr.ivs_cm) ** 2 - (tr.lvid_cm / 2) ** 2) - h
    v_a = -h - 0.5 * ivs
    v_p = v_a + tr.ao_root_cm
    u_hinge = 1.0
    vc = 0.5 * (v_a + v_p)
    o = av_open(ph)
    cusp = 0.5 * tr.ao_root_cm + 0.2
    bars = []
    for v_h, sign in ((v_a, -1.0), (v_p, 1.0)):
        closed = (u_hinge + 0.35, vc + sign * tr.av_leaflet_cm / 2)
        v_open = vc + sign * (tr.av_cusp_sep_cm / 2 + tr.av_leaflet_cm / 2)
        du = math.sqrt(max(cusp ** 2 - (v_open - v_h) ** 2, 0.04))
        opened = (u_hinge + du, v_open)
        tip = (closed[0] + (opened[0] - closed[0]) * o, closed[1] + (opened[1] - closed[1]) * o)
        bars.append(((u_hinge, v_h), tip))
    return bars[0], bars[1]


def _aortic_cusps(cv_: _Canvas, an: Anatomy, ph: float, calc_db: float) -> None:
    for hinge, tip in av_cusp_bars(an, ph):
        cv_.bar(hinge, tip, an.truth.av_leaflet_cm, _DB["valve"] + calc_db)


def _a4c(cv_: _Canvas, an: Anatomy, ph: float) -> None:
    """A4C as outlines: x across (LV on screen right), z from the apex down."""
    tr = an.truth
    s = contraction(ph)
    h = tr.lvid_cm / 2 * (1 - an.fractional_shortening * s)
    length = an.lv_length_cm - 1.0 * s
    ivs, lat = tr.ivs_cm * (1 + 0.4 * s), tr.lvpw_cm * (1 + 0.4 * s)
    xc = ivs + h
    cv_.ellipse(xc, 0.45 * length, h + lat + 0.1, 0.45 * length + 0.9, _DB["myo"])
    cv_.poly([(0, 0.45 * length), (xc + h + lat, 0.45 * length), (xc + h + lat, length), (0, length)], _DB["myo"])
    cv_.ellipse(xc, 0.45 * length, h, 0.45 * length, _DB["blood"])
    cv_.poly([(ivs, 0.45 * length), (xc + h, 0.45 * length), (xc + h, length + 0.3), (ivs, length + 0.3)], _DB["blood"])
    rv = 1.3 * an.rv_cm * (1 - 0.2 * s)
    cv_.poly([(-rv - 0.3, 0.25 * length), (0, 0.1 * length), (0, length - 0.5), (-rv - 0.3, length - 0.5)], _DB["myo"])
    cv_.poly([(-rv, 0.3 * length), (0, 0.18 * length), (0, length - 0.6), (-rv, length - 0.6)], _DB["blood"])
    cv_.ellipse(xc, length + 0.4 + an.la_cm * 0.6, 2.0, an.la_cm * 0.65, _DB["blood"])
    cv_.ellipse(-rv / 2, length + an.la_cm * 0.6, 1.7, an.la_cm * 0.6, _DB["blood"])
    m = mv_open(ph)
    for x0, x1, z in ((ivs, xc + h, length), (-rv, 0.0, length - 0.6)):
        mid = 0.5 * (x0 + x1)
        for hx, sgn in ((x0, 1.0), (x1, -1.0)):
            tip = (mid + (hx + sgn * 0.3 - mid) * m, z - 0.4 - 0.9 * m)
            cv_.bar((hx, z), tip, 0.12, _DB["valve"])


def _psax(cv_: _Canvas, an: Anatomy, ph: float) -> None:
    """PSAX as rings: septal half of the ring IVS thick, posterior half LVPW thick."""
    tr = an.truth
    s = contraction(ph)
    h = tr.lvid_cm / 2 * (1 - an.fractional_shortening * s)
    k = 1 + 0.45 * s
    cv_.ellipse(-1.2, -h - 1.2, h + 1.6, 0.8 * an.rv_cm + 0.4, _DB["myo"] - 2)
    cv_.ellipse(-1.2, -h - 1.1, h + 1.3, 0.8 * an.rv_cm, _DB["blood"])
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    wall = np.where(np.sin(t) < 0, tr.ivs_cm, tr.lvpw_cm) * k
    ring = np.stack([(h + wall) * np.cos(t), (h + wall) * np.sin(t)], 1)
    cv_.poly(ring, _DB["myo"])
    cv_.ellipse(0.0, 0.0, h, h, _DB["blood"])
    for ang in (0.6, 2.3):
        cv_.ellipse((h - 0.4) * math.cos(ang), (h - 0.4) * math.sin(ang), 0.45, 0.35, _DB["myo"])
    cv_.bar((-h - 2, h + tr.lvpw_cm * k + an.pericardial_gap_cm), (h + 2, h + tr.lvpw_cm * k + an.pericardial_gap_cm),
            0.3, _DB["peri"])


def _view_centre(an: Anatomy, plan: VideoPlan) -> tuple[tuple[float, float], float]:
    """Where renderer B puts each view's local origin (x, z cm from the apex) and its rotation."""
    tr = an.truth
    z = an.chest_wall_cm + 0.3
    if plan.view == "plax":
        return (0.3 + plan.shift_x_cm, z + an.rv_cm + tr.ivs_cm + tr.lvid_cm / 2 + 0.2 + plan.shift_z_cm), plan.tilt_deg
    if plan.view == "a4c":
        return (-tr.ivs_cm - tr.lvid_cm / 2 + 0.5 + plan.shift_x_cm, z + 0.6 + plan.shift_z_cm), plan.tilt_deg
    return (plan.shift_x_cm, z + an.rv_cm + tr.lvid_cm / 2 + 0.6 + plan.shift_z_cm), plan.tilt_deg


def view_pose(an: Anatomy, plan: VideoPlan) -> tuple[float, float, float]:
    """Centre (x, z cm from the apex) and rotation (radians) of the view's local frame.

    The same convention as :func:`train.synth.render.view_pose`, so
    :func:`train.synth.render.local_to_pixel` places view-local points in
    either renderer's image.
    """
    centre, rot_deg = _view_centre(an, plan)
    return centre[0], centre[1], math.radians(rot_deg)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], grain: int, order: float) -> np.ndarray:
    """Gamma-distributed texture (mean 1) on a half-resolution grid, box-smoothed."""
    g: np.ndarray = rng.gamma(order, 1.0 / order, size=((shape[0] + 1) // 2, (shape[1] + 1) // 2)).astype(np.float32)
    g = cv2.blur(g, (grain + 1, max(1, grain // 2)))
    g = g / (g.mean() + 1e-6)
    return cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def _frame_db(an: Anatomy, plan: VideoPlan, geo: Geometry, ph: float, base: np.ndarray, calc_db: float) -> np.ndarray:
    centre, rot = _view_centre(an, plan)
    cv_ = _Canvas(geo, centre, rot, 0.0)
    cv_.img[...] = base
    {"plax": lambda: _plax(cv_, an, ph, calc_db), "a4c": lambda: _a4c(cv_, an, ph),
     "psax": lambda: _psax(cv_, an, ph)}[plan.view]()
    return cv_.img


def render_video(an: Anatomy, plan: VideoPlan, rows: int = 480, cols: int = 640,
                 header: dict[str, str] | None = None) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Render a video as RGB frames with renderer B.

    Parameters
    ----------
    an : Anatomy
        The anatomy to draw.
    plan : VideoPlan
        Acquisition parameters (depth, angle, timing, image quality).
    rows, cols : int
        Image size.
    header : dict, optional
        ``initials`` and ``date`` strings for the burned-in text.

    Returns
    -------
    frames : numpy.ndarray
        (T, rows, cols, 3) uint8 RGB.
    geometry : Geometry
        Sector placement and pixel size.
    phases : numpy.ndarray
        Cardiac phase of each frame (0 = end-diastole).
    """
    rng = np.random.default_rng(plan.noise_seed ^ 0x5EED)
    geo = sector_geometry(rows, cols, plan.depth_cm, plan.angle_deg, plan)
    r, th = geo.polar()
    half = math.radians(plan.angle_deg / 2)
    top_cm = float(rng.uniform(0.5, 0.9))
    rounded = rng.random() < 0.5
    inside = (np.abs(th) <= half) & (r >= top_cm) & (np.arange(rows)[:, None] >= geo.apex_row)
    if rounded:
        inside &= r <= plan.depth_cm
    else:
        inside &= (r * np.cos(th) <= plan.depth_cm * math.cos(half) * 1.04) & (r <= plan.depth_cm * 1.04)
    # Static background: dim textured tissue, bright layered chest wall.
    tex: np.ndarray = cv2.GaussianBlur(rng.standard_normal((rows, cols)).astype(np.float32), (0, 0), 9)
    tex /= tex.std() + 1e-6
    base = _DB["fat"] + 5.0 * tex + 10.0 * (r < an.chest_wall_cm) * (0.5 + 0.5 * np.cos(r * 11.0))
    base -= 10.0 * np.clip(r - an.chest_wall_cm - 12.0, 0, None)
    base = base.astype(np.float32)
    poor = 1.0 - plan.quality
    haze = cv2.GaussianBlur(rng.standard_normal((rows, cols)).astype(np.float32), (0, 0), 20)
    haze_db = -30.0 + 18.0 * poor + 6.0 * haze / (haze.std() + 1e-6)
    near_lin = 2.0 * np.exp(-r / (0.8 + 1.5 * poor))  # clutter under the probe
    atten = (-0.5 * plan.atten_db_per_cm * r).astype(np.float32)  # what an automatic TGC leaves of the attenuation
    if plan.shadow_width_deg > 0:
        atten += -16.0 * np.exp(-np.square((np.degrees(th) - plan.shadow_deg) / plan.shadow_width_deg))
    calc_db = 10.0 * an.truth.av_calcification
    blur = max(0.6, plan.edge_cm / geo.delta_cm * 0.6)
    grain = max(2, int(round(3 * plan.psf_scale * rows / 480)))
    order = 1.0 + 1.5 * plan.quality
    width = plan.dynamic_range_db / 9.0
    mid = 6.0 - plan.gain_db * 0.8
    tint = np.array(_TINTS[int(rng.integers(0, len(_TINTS)))], np.float32)
    t = np.arange(plan.frames) / plan.fps
    phases = (plan.phase0 + t * plan.heart_rate_bpm / 60.0) % 1.0
    out = np.zeros((plan.frames, rows, cols, 3), np.uint8)
    sp = _speckle(rng, (rows, cols), grain, order)
    static_lin = (10 ** (haze_db / 10) + near_lin).astype(np.float32)
    for i, ph in enumerate(phases):
        tissue = _frame_db(an, plan, geo, float(ph), base, calc_db)
        tissue = cv2.GaussianBlur(tissue, (0, 0), blur)
        lin = np.power(np.float32(10.0), tissue * np.float32(0.1)) + static_lin
        sp = 0.75 * sp + 0.25 * _speckle(rng, (rows, cols), grain, order)
        db = 10 * np.log10(lin * sp + 1e-6) + atten
        grey = np.float32(255.0) / (1.0 + np.exp((mid - db) * np.float32(1.0 / width)))
        grey *= inside
        out[i] = (grey[..., None] * tint).astype(np.uint8)
    _annotate(out, plan, geo, header or {"initials": "S.P.", "date": "01/01/2020"})
    return out, geo, phases


def _annotate(frames: np.ndarray, plan: VideoPlan, geo: Geometry, header: dict[str, str]) -> None:
    """Renderer B's screen: one text line across the top, a depth ruler on the left."""
    rows, cols = geo.rows, geo.cols
    sc = rows / 480.0
    line = f"{plan.vendor.model}  {header['initials']}  {header['date']}  {plan.freq_mhz:.1f}MHz  {plan.fps}fps"
    canvas = np.zeros((rows, cols, 3), np.uint8)
    cv2.putText(canvas, line, (int(4 * sc), int(14 * sc)), cv2.FONT_HERSHEY_PLAIN, 0.9 * sc, (210, 210, 170), 1)
    x = max(2, int(geo.apex_col - geo.half_width_px - 18 * sc))
    for d in range(0, int(geo.depth_cm) + 1, 2):
        y = int(round(geo.apex_row + d / geo.delta_cm))
        if y < rows:
            cv2.rectangle(canvas, (x, y), (x + int(5 * sc), y + 1), (150, 200, 255), -1)
    on = canvas.any(axis=2)
    frames[:, on] = canvas[on]
