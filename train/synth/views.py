"""Renderer A's anatomy: tissue reflectivity of each view, in view-local cm.

Each view is a function ``(u, v, bg, anatomy, phase, e) -> reflectivity``
that paints blood, myocardium, valves and pericardium over a background
texture, evaluated at any set of points (the renderer passes its polar
samples).  Boundaries are soft, ``e`` cm wide.  The labels are drawn
exactly: in PLAX between ``u = -4.5`` and ``u = -1.5`` the walls are
``ivs_cm`` / ``lvpw_cm`` thick at end-diastole, and at mid-systole the inner
edges of the aortic cusps are ``av_cusp_sep_cm`` apart
(:func:`av_leaflet_tips`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from train.synth.anatomy import Anatomy, av_open, contraction, mv_open

__all__ = ["AV_U_CM", "MEASURE_U_CM", "MYOCARDIUM_REFLECTIVITY", "STANDARD_LEAFLETS", "VIEW_FIELDS", "VIEW_VALVES",
           "LeafletLook", "av_leaflet_tips"]

# Tissue reflectivities (linear power, relative).  Blood sits ~30 dB under
# myocardium, which is what makes chambers black on a real scanner.
_R_BLOOD = 0.0006
_R_MYO = 0.30
_R_TISSUE = 0.12
_R_WALL = 0.9  # fibrous aortic walls, annulus
_R_PERI = 2.5  # pericardium: the brightest specular line in PLAX
_R_LEAFLET = 0.7
_R_CALCIFIED = 4.0
MYOCARDIUM_REFLECTIVITY = _R_MYO
"""The level that a look's contrast (:class:`~train.synth.acquisition.Look`) scales around."""

def _clamp01(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0.0, 1.0, out=a)


def _between(a: np.ndarray, lo, hi, e: float) -> np.ndarray:
    """Soft membership of ``lo < a < hi`` with edges ``e`` wide (anti-aliasing)."""
    return _clamp01((a - lo) / e + 0.5) * _clamp01((hi - a) / e + 0.5)


def _paint(refl: np.ndarray, m: np.ndarray, value) -> None:
    """Lay ``value`` over ``refl`` where the membership ``m`` is set."""
    refl += m * (value - refl)


def _segment_dist(u: np.ndarray, v: np.ndarray, p0, p1) -> tuple[np.ndarray, np.ndarray]:
    """Distance from points to the segment p0-p1 and the position along it."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    ll = du * du + dv * dv + 1e-12
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / ll, 0.0, 1.0)
    return np.hypot(u - p0[0] - t * du, v - p0[1] - t * dv), t


class LeafletLook(NamedTuple):
    """How the valve leaflets of one video are drawn (never a label).

    Attributes
    ----------
    gain : float
        Multiplies every leaflet's reflectivity (power).
    calcium_scale : float
        Multiplies a calcified cusp's extra brightness in dB over a normal
        cusp (an exponent on the ratio of their reflectivities).
    bloom_cm : float
        Added to every leaflet's drawn thickness (cm).
    """

    gain: float = 1.0
    calcium_scale: float = 1.0
    bloom_cm: float = 0.0


STANDARD_LEAFLETS = LeafletLook()
"""Renderer A's own leaflets."""


def _leaflet(refl, u, v, hinge, tip, thick, value, e, leaf: LeafletLook = STANDARD_LEAFLETS) -> None:
    d, t = _segment_dist(u, v, hinge, tip)
    _paint(refl, _clamp01(((thick + leaf.bloom_cm) / 2 - d) / e + 0.5), value * leaf.gain)


def _thickened(inner_ed: float, wall_ed: float, inner_now: np.ndarray | float):
    """Outer radius keeping the wall's cross-section area (myocardium is incompressible)."""
    return np.sqrt(np.square(inner_now) + (inner_ed + wall_ed) ** 2 - inner_ed ** 2)


def _ao_geometry(an: Anatomy, s: float) -> tuple[float, float]:
    """Anterior and posterior inner wall of the aortic root (v, cm) in PLAX.

    The anterior aortic wall continues the septum (aorto-septal continuity),
    so the root starts halfway into the septum's end-diastolic thickness.
    """
    h_base = an.truth.lvid_cm / 2 * (1 - an.fractional_shortening * s * 0.35)
    v_a = -h_base - 0.5 * an.truth.ivs_cm
    return v_a, v_a + an.truth.ao_root_cm


def _mitral_posterior(an: Anatomy, s: float) -> float:
    """Depth (v) of the posterior mitral annulus: at least 2.3 cm below the aortic root."""
    h_base = an.truth.lvid_cm / 2 * (1 - an.fractional_shortening * s * 0.35)
    return max(h_base + 0.1, _ao_geometry(an, s)[1] + 2.3)


def av_leaflet_tips(an: Anatomy, ph: float) -> tuple[tuple[float, float], ...]:
    """Hinges and tips of the two aortic cusps in PLAX local coordinates.

    Returns ``(hinge_a, tip_a, hinge_p, tip_p)``; at full opening the inner
    edges of the cusps are exactly ``av_cusp_sep_cm`` apart.
    """
    tr = an.truth
    s = contraction(ph)
    o = av_open(ph)
    v_a, v_p = _ao_geometry(an, s)
    u_av = AV_U_CM
    ha, hp = (u_av, v_a + 0.08), (u_av, v_p - 0.08)
    vc = 0.5 * (ha[1] + hp[1])
    r = 0.5 * (hp[1] - ha[1])
    ell = math.hypot(r, 0.35)
    tips = []
    for hinge, sign in ((ha, -1.0), (hp, 1.0)):
        closed = math.atan2(vc - hinge[1], 0.35)
        v_tip = vc + sign * (tr.av_cusp_sep_cm / 2 + tr.av_leaflet_cm / 2)
        opened = math.asin(max(-1.0, min(1.0, (v_tip - hinge[1]) / ell)))
        ang = closed + (opened - closed) * o
        tips.append((hinge[0] + ell * math.cos(ang), hinge[1] + ell * math.sin(ang)))
    return ha, tips[0], hp, tips[1]


AV_U_CM = 0.9
"""Position of the aortic annulus along the PLAX long axis (cm past the mitral annulus)."""
MEASURE_U_CM = -2.5
"""Where along the PLAX long axis wall thickness is measured (clear of base and apex)."""


def _smooth(a: np.ndarray) -> np.ndarray:
    a = np.clip(a, 0.0, 1.0)
    return a * a * (3 - 2 * a)


def _plax(u: np.ndarray, v: np.ndarray, bg: np.ndarray, an: Anatomy, ph: float, e: float,
          valves: bool = True) -> np.ndarray:
    """Parasternal long axis: RV, septum, LV, posterior wall, aortic root, LA.

    ``u`` runs along the LV long axis toward the aorta (screen right), ``v``
    across it, deeper positive; origin at the LV centre at the mitral annulus.
    Between ``u = -4.5`` and ``u = -1.5`` the walls are parallel and exactly
    ``ivs_cm`` / ``lvpw_cm`` thick at end-diastole (where one measures them).
    """
    tr = an.truth
    s = contraction(ph)
    fs = an.fractional_shortening
    h0 = tr.lvid_cm / 2
    # The base moves less than the mid-ventricle; motion fades toward the annulus.
    w = np.clip(-u / 1.5, 0.35, 1.0)
    h = h0 * (1 - fs * s * w)
    # Apex: the cavity and the walls round off past 4.5 cm from the base.
    apex = np.sqrt(np.clip(1 - np.square(np.minimum(u + 4.5, 0) / (an.lv_length_cm - 4.5)), 0, 1))
    apex_o = np.sqrt(np.clip(1 - np.square(np.minimum(u + 4.5, 0) / (an.lv_length_cm - 3.6)), 0, 1))
    sep_o = _thickened(h0, tr.ivs_cm, h) - h
    pw_o = _thickened(h0, tr.lvpw_cm, h) - h
    v_a, v_p = _ao_geometry(an, s)
    v_pa = _mitral_posterior(an, s)
    # Toward the base the septum turns into the anterior aortic wall and the
    # posterior wall dips to the posterior mitral annulus.
    b_top = _smooth((u + 0.8) / 1.0)
    b_bot = _smooth((u + 1.5) / 1.8)
    cav_hi = -h * apex * (1 - b_top) + v_a * b_top
    cav_lo = (h * apex) * (1 - b_bot) + v_pa * b_bot
    sep_top = (-(h + sep_o) * apex_o) * (1 - b_top) + (v_a - 0.25) * b_top
    pw_bot = (h + pw_o) * apex_o * (1 - b_bot) + (v_pa + pw_o) * b_bot
    la_top = v_p + 0.3
    la_half = (an.la_cm / 2 + 0.6, an.la_cm / 2)
    la_c = (0.5 + la_half[0], la_top + la_half[1])
    la_bot = la_top + an.la_cm
    gap = an.pericardial_gap_cm
    peri = pw_bot + gap + _smooth(u / 1.2) * np.maximum(la_bot + 0.3 - pw_bot - gap, 0)
    rv_top = -(h0 + tr.ivs_cm + an.rv_cm)

    refl = bg.copy()
    # Pericardium (bright) and the descending aorta behind the AV groove.
    _paint(refl, _between(v, peri, peri + 0.35, e), _R_PERI)
    da = np.hypot(u - 0.6, v - (la_bot + 1.6)) - 0.9
    _paint(refl, _clamp01(0.5 - da / e), _R_BLOOD)
    # RV free wall, then RV (and RVOT, anterior to the aorta) blood.
    _paint(refl, _between(v, rv_top - 0.4, rv_top, e), _R_MYO)
    _paint(refl, _between(v, rv_top, np.where(u <= 0.3, peri, v_a - 0.2), e), _R_BLOOD)
    # LV myocardium block, then the cavity.
    lv_zone = _clamp01((0.3 - u) / e + 0.5) * (apex_o > 0)
    _paint(refl, lv_zone * _between(v, sep_top, pw_bot, e), _R_MYO)
    _paint(refl, lv_zone * _between(v, cav_hi, cav_lo, e), _R_BLOOD)
    # Aortic root: bright walls, blood lumen, sinus bulge just above the valve.
    ao_zone = _clamp01(u / e + 0.5)
    bulge = 0.25 * np.exp(-np.square((u - AV_U_CM - 0.9) / 0.8))
    _paint(refl, ao_zone * _between(v, v_a - 0.25 - bulge, v_p + 0.25 + bulge, e), _R_WALL)
    _paint(refl, ao_zone * _between(v, v_a - bulge, v_p + bulge, e), _R_BLOOD)
    # Left atrium with a thin wall, open to the LV through the mitral orifice.
    la_d = np.hypot((u - la_c[0]) / la_half[0], (v - la_c[1]) / la_half[1])
    _paint(refl, _clamp01((1.08 - la_d) / 0.03) * (u > 0.3), _R_MYO)
    _paint(refl, _clamp01((1.0 - la_d) / 0.03) * (u > 0.3), _R_BLOOD)
    _paint(refl, _between(u, -0.5, la_c[0], e) * _between(v, v_p + 0.25, v_pa, e), _R_BLOOD)
    if valves:
        _plax_valves(refl, u, v, an, ph, e)
    return refl


def _plax_valves(refl: np.ndarray, u: np.ndarray, v: np.ndarray, an: Anatomy, ph: float, e: float,
                 leaf: LeafletLook = STANDARD_LEAFLETS) -> None:
    """Paint PLAX's mitral leaflets and aortic cusps over ``refl`` (in place)."""
    tr = an.truth
    s = contraction(ph)
    m_open = mv_open(ph)
    v_a, v_p = _ao_geometry(an, s)
    v_pa = _mitral_posterior(an, s)
    # Mitral leaflets: open toward the septum in diastole, coapt in systole.
    ha, hp = (0.1, v_p + 0.15), (0.35, v_pa + 0.05)
    closed = (-0.8, v_p + 0.25 + 0.65 * (v_pa - v_p - 0.25))
    for hinge, length, open_tip in ((ha, 2.2, (-1.9, v_a + 0.9)), (hp, 1.3, (-0.7, v_pa + 0.6))):
        tip = (closed[0] + (open_tip[0] - closed[0]) * m_open, closed[1] + (open_tip[1] - closed[1]) * m_open)
        du, dv = tip[0] - hinge[0], tip[1] - hinge[1]
        k = length / max(math.hypot(du, dv), 1e-6)
        _leaflet(refl, u, v, hinge, (hinge[0] + du * k, hinge[1] + dv * k), 0.12, _R_LEAFLET, e, leaf)
    # Aortic cusps: thin in normal valves, thicker and brighter in diseased ones.
    ha_, ta, hp_, tp = av_leaflet_tips(an, ph)
    # Brightness follows calcification, which every diseased valve may have
    # (sclerosis and moderate AS too): it never says "severe" by itself.
    value = _R_LEAFLET + (_R_CALCIFIED - _R_LEAFLET) * tr.av_calcification
    if leaf.calcium_scale != 1.0:
        value = _R_LEAFLET * (value / _R_LEAFLET) ** leaf.calcium_scale
    _leaflet(refl, u, v, ha_, ta, tr.av_leaflet_cm, value, e, leaf)
    _leaflet(refl, u, v, hp_, tp, tr.av_leaflet_cm, value, e, leaf)


class _A4CFrame(NamedTuple):
    """A4C's chamber layout at one phase (cm), shared by the walls and the valves."""

    s: float  # contraction, 0 at end-diastole
    h: float  # LV cavity half-width
    sep_t: float  # septal thickness
    lat_t: float  # lateral wall thickness
    length: float  # apex to mitral annulus
    tv_len: float  # apex to tricuspid annulus
    x_rv_sep: float  # the septum's RV side
    xc: float  # the LV cavity's centre line


def _a4c_frame(an: Anatomy, ph: float) -> _A4CFrame:
    tr = an.truth
    s = contraction(ph)
    h0 = tr.lvid_cm / 2
    h = h0 * (1 - an.fractional_shortening * s)
    sep_t = float(_thickened(h0, tr.ivs_cm, h) - h)
    lat_t = float(_thickened(h0, tr.lvpw_cm, h) - h)
    length = an.lv_length_cm - 1.1 * s  # the mitral annulus descends toward the apex
    tv_len = length - 0.7 - 0.6 * s  # tricuspid annulus: more apical, moves more
    x_rv_sep = -tr.ivs_cm / 2
    return _A4CFrame(s, h, sep_t, lat_t, length, tv_len, x_rv_sep, x_rv_sep + sep_t + h)


def _a4c(x: np.ndarray, z: np.ndarray, bg: np.ndarray, an: Anatomy, ph: float, e: float,
         valves: bool = True) -> np.ndarray:
    """Apical four chamber: ventricles on top (LV screen right), atria below.

    ``z`` runs from the LV endocardial apex toward the atria, ``x`` across,
    positive toward the LV lateral wall; the septum is centred on ``x = 0``.
    """
    s, h, sep_t, lat_t, length, tv_len, x_rv_sep, xc = _a4c_frame(an, ph)
    zm = 0.45 * length

    def profile(zz: np.ndarray, half: float, z0: float) -> np.ndarray:
        # Bullet: elliptical cap from z0 to zm, then a straight wall.
        f = np.clip((zz - z0) / max(zm - z0, 1e-3), 0, 1)
        return half * np.sqrt(1 - np.square(1 - f))

    refl = bg.copy()
    # Atria (blood) with walls, below the annuli.
    la_c = (xc + 0.2, length + 0.3 + an.la_cm * 0.65)
    ra_c = (x_rv_sep - 1.9, tv_len + 0.3 + an.la_cm * 0.6)
    for c, rx, rz in ((la_c, 2.0, an.la_cm * 0.7), (ra_c, 1.8, an.la_cm * 0.65)):
        d = np.hypot((x - c[0]) / rx, (z - c[1]) / rz)
        _paint(refl, _clamp01((1.12 - d) / 0.03), _R_MYO)
    for c, rx, rz in ((la_c, 2.0, an.la_cm * 0.7), (ra_c, 1.8, an.la_cm * 0.65)):
        d = np.hypot((x - c[0]) / rx, (z - c[1]) / rz)
        _paint(refl, _clamp01((1.0 - d) / 0.03), _R_BLOOD)
    # The interatrial septum is thin and drops out: leave a faint band only.
    _paint(refl, _between(x, x_rv_sep - 0.1, x_rv_sep + 0.1, e) * _between(z, length + 0.8, length + 4.0, e), _R_TISSUE)
    # Pericardium along the lateral wall.
    xo = xc + profile(z, h + lat_t + 0.35, -1.2)
    _paint(refl, _between(x - xo, 0.0, 0.3, e) * _between(z, 1.0, length + 1.0, e), _R_PERI * 0.5)
    # LV myocardium (septum on the left, lateral wall on the right) and cavity.
    left = xc - profile(z, h + sep_t, -0.9)
    right = xc + profile(z, h + lat_t, -0.9)
    zone = _between(z, -0.9, length, e)
    _paint(refl, zone * _between(x, left, right, e), _R_MYO)
    _paint(refl, _between(z, 0.0, length + 0.3, e) * (np.abs(x - xc) < profile(z, h, 0.0)), _R_BLOOD)
    # RV: shorter and crescent-like, left of the septum, thin free wall.
    rv_w = 1.4 * an.rv_cm * (1 - 0.2 * s) * np.sqrt(np.clip((z - 0.15 * length) / (0.55 * length), 0, 1))
    rv_zone = _between(z, 0.15 * length - 0.4, tv_len, e)
    _paint(refl, rv_zone * _between(x, x_rv_sep - rv_w - 0.4, x_rv_sep, e) * (rv_w > 0.05), _R_MYO)
    _paint(refl, _between(z, 0.15 * length, tv_len + 0.3, e) * _between(x, x_rv_sep - rv_w, x_rv_sep, e), _R_BLOOD)
    if valves:
        _a4c_valves(refl, x, z, an, ph, e)
    return refl


def _a4c_valves(refl: np.ndarray, x: np.ndarray, z: np.ndarray, an: Anatomy, ph: float, e: float,
                leaf: LeafletLook = STANDARD_LEAFLETS) -> None:
    """Paint A4C's mitral and tricuspid leaflets over ``refl`` (in place)."""
    m_open = mv_open(ph)
    _, h, sep_t, _, length, tv_len, x_rv_sep, xc = _a4c_frame(an, ph)
    x_lv_sep = x_rv_sep + sep_t
    # AV valves: hinged at the annuli, open toward the apex in diastole.
    for hinge_l, hinge_r, zz in (((x_lv_sep, length), (xc + h, length), length),
                                 ((x_rv_sep - 1.4 * an.rv_cm, tv_len), (x_rv_sep, tv_len), tv_len)):
        mid = 0.5 * (hinge_l[0] + hinge_r[0])
        half = 0.5 * (hinge_r[0] - hinge_l[0])
        for hinge, sgn in ((hinge_l, 1.0), (hinge_r, -1.0)):
            closed = (mid, zz - 0.5)
            opened = (hinge[0] + sgn * 0.25 * half, zz - 0.95 * half)
            tip = (closed[0] + (opened[0] - closed[0]) * m_open, closed[1] + (opened[1] - closed[1]) * m_open)
            _leaflet(refl, x, z, hinge, tip, 0.12, _R_LEAFLET, e, leaf)


def _psax(x: np.ndarray, z: np.ndarray, bg: np.ndarray, an: Anatomy, ph: float, e: float,
          valves: bool = True) -> np.ndarray:
    """Parasternal short axis at the papillary muscles: a round LV ring.

    Origin at the LV centre; the septum faces up-left (toward the RV), the
    posterior wall down.  Ring thickness blends IVS (septal) and LVPW.
    """
    tr = an.truth
    s = contraction(ph)
    h0 = tr.lvid_cm / 2
    h = h0 * (1 - an.fractional_shortening * s)
    phi = np.arctan2(z, x)
    sep_dir = math.atan2(-0.75, -0.66)
    f_sep = 0.5 * (1 + np.cos(phi - sep_dir))
    wall0 = tr.lvpw_cm + (tr.ivs_cm - tr.lvpw_cm) * f_sep
    outer = _thickened(h0, wall0, h)
    r = np.hypot(x, z * 1.05)
    refl = bg.copy()
    # Pericardium below the posterior wall.
    low = _clamp01(z / (h0 + 0.5))
    gap = an.pericardial_gap_cm
    _paint(refl, low * _between(r - outer, gap, gap + 0.35, e), _R_PERI)
    # RV crescent anterior-left: a circle offset toward the septum, minus the LV.
    r_out = h0 + tr.ivs_cm
    d_off = 0.6 * r_out
    rv_c = (d_off * math.cos(sep_dir), d_off * math.sin(sep_dir))
    r_rv = r_out - d_off + 0.75 * an.rv_cm
    rv_d = np.hypot(x - rv_c[0], z - rv_c[1])
    rv_cap = _clamp01((0.3 * h0 - z) / 0.5)
    _paint(refl, rv_cap * _clamp01((r_rv + 0.4 - rv_d) / e + 0.5), _R_MYO)
    _paint(refl, rv_cap * _clamp01((r_rv - rv_d) / e + 0.5), _R_BLOOD)
    _paint(refl, _clamp01((outer - r) / e + 0.5), _R_MYO)
    _paint(refl, _clamp01((h - r) / e + 0.5), _R_BLOOD)
    # Papillary muscles (antero-lateral and postero-medial), attached to the wall.
    for ang in (math.radians(30), math.radians(130)):
        px, pz = (h - 0.45) * math.cos(ang), (h - 0.45) * math.sin(ang)
        d = np.hypot(x - px, z - pz)
        _paint(refl, _clamp01((0.5 + 0.15 * s - d) / e + 0.5), _R_MYO * 1.2)
    return refl


VIEW_FIELDS = {"plax": _plax, "a4c": _a4c, "psax": _psax}
"""Each view's reflectivity field ``f(u, v, bg, anatomy, phase, edge_cm, valves=True)``;
``valves=False`` leaves out the valve leaflets (:data:`VIEW_VALVES` paints them)."""
VIEW_VALVES = {"plax": _plax_valves, "a4c": _a4c_valves}
"""Each view's valve leaflets, ``f(refl, u, v, anatomy, phase, edge_cm, leaf=STANDARD_LEAFLETS)``
painted in place (a view without leaflets has no entry)."""
