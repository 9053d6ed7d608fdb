"""Where each tissue lies in every view, and how the heart deforms (renderer D).

A view is a set of shapes in a *heart frame* (centimetres): for the long-axis
views (PLAX, A4C) ``xi`` runs along the LV long axis from the apex toward the
base and ``eta`` across it (``eta < 0`` the septum, ``eta > 0`` the posterior
or lateral wall), its origin the centre of the LV cavity on the measuring
line (the level just beyond the mitral leaflet tips, where IVS, LVID and
LVPW are measured); for PSAX the origin is the centre of the LV ring.  A
:class:`Pose` puts the frame in the sector (tilt, shift, mirror).

Motion is a *deformation field*, not a redrawing: each frame maps every
pixel back to the point of end-diastolic tissue now under it (its
material coordinate).  The walls are drawn at those coordinates, so at
end-diastole (contraction 0, the identity map) they are exactly the
anatomy's, and the scatterers of :mod:`~train.synth.fieldwarp.beam` are
looked up at the same coordinates, so speckle travels with the muscle.  The
map conserves wall area across the short axis (the wall thickens as the
cavity shrinks), shortens the long axis toward a fixed apex and moves the
base (annulus, valves, aortic root) as one rigid piece, which keeps the
aortic cusps' geometry exact in every frame.  Valve leaflets are posed per
phase in that rigid base frame.

Tissue classes are this renderer's own (:data:`CLASS_NAMES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import Anatomy, av_open, contraction, mv_open

__all__ = [
    "AORTIC_CUSP",
    "BLOOD",
    "CHEST",
    "CLASS_NAMES",
    "FLUID",
    "LEAFLET",
    "MYOCARDIUM",
    "OUTSIDE",
    "PERICARDIUM",
    "SURROUND",
    "TISSUES",
    "VESSEL",
    "Painted",
    "Pose",
    "Scene",
    "Tissue",
    "build_scene",
]

OUTSIDE, SURROUND, BLOOD, MYOCARDIUM, PERICARDIUM, LEAFLET, AORTIC_CUSP, VESSEL, FLUID, CHEST = range(-1, 9)
CLASS_NAMES = {OUTSIDE: "outside", SURROUND: "surround", BLOOD: "blood", MYOCARDIUM: "myocardium",
               PERICARDIUM: "pericardium", LEAFLET: "atrioventricular leaflet", AORTIC_CUSP: "aortic cusp",
               VESSEL: "vessel wall", FLUID: "pericardial fluid/fat", CHEST: "chest wall"}
"""The int8 tissue classes of :func:`train.synth.render_fieldwarp.tissue_map`."""


@dataclass(frozen=True)
class Tissue:
    """How one tissue scatters.

    Attributes
    ----------
    db : float
        Backscattered power in dB relative to the pericardium.
    moving : float
        1 for scatterers that decorrelate from frame to frame (blood).
    tex : float
        Weight of the tissue's static heterogeneity (fibres, fat lobules).
    atten : float
        Attenuation relative to soft tissue.
    """

    db: float
    moving: float
    tex: float
    atten: float


TISSUES = {
    SURROUND: Tissue(-32.0, 0.0, 1.0, 1.0),
    BLOOD: Tissue(-64.0, 1.0, 0.0, 0.35),
    MYOCARDIUM: Tissue(-24.0, 0.0, 0.7, 1.0),
    PERICARDIUM: Tissue(-3.0, 0.0, 0.4, 1.6),
    LEAFLET: Tissue(-16.0, 0.0, 0.0, 1.3),
    AORTIC_CUSP: Tissue(-16.0, 0.0, 0.0, 1.3),
    VESSEL: Tissue(-15.0, 0.0, 0.3, 1.3),
    FLUID: Tissue(-46.0, 0.0, 0.2, 0.3),
    CHEST: Tissue(-21.0, 0.0, 1.0, 1.2),
}
"""Echo strength, motion and attenuation of each class (:class:`Tissue`)."""

CUSP_CALCIUM_DB = 16.0
"""Extra echo of a fully calcified aortic cusp (anatomy's calcification 1)."""
CUSP_CALCIUM_ATTEN = 3.0
"""Extra relative attenuation of a fully calcified cusp (acoustic shadow)."""

_WALL_DECAY_CM = 1.2  # how far outside the epicardium the wall's motion fades
_RIGID_XI = 1.2  # heart-frame xi beyond which the base moves as one rigid piece
_MV_TIP_XI = 0.32  # open mitral tips: just on the base side of the measuring line (xi = 0)


@dataclass(frozen=True)
class Pose:
    """The heart frame in the sector: origin (cm from the apex), rotation, mirror."""

    ox: float
    oz: float
    phi: float  # rotation of the xi axis from the screen's x axis (radians, toward depth)
    mirror: float  # +1, or -1 to flip eta (A4C draws the LV on the screen's right)

    def to_heart(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heart-frame (xi, eta) of screen points (x lateral, z depth, cm from the apex)."""
        c, s = math.cos(self.phi), math.sin(self.phi)
        dx, dz = x - self.ox, z - self.oz
        return dx * c + dz * s, self.mirror * (-dx * s + dz * c)

    def to_screen(self, xi: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Screen (x, z) in cm of heart-frame points."""
        c, s = math.cos(self.phi), math.sin(self.phi)
        e = self.mirror * eta
        return self.ox + xi * c - e * s, self.oz + xi * s + e * c


@dataclass
class Painted:
    """Per-pixel tissue of one frame (flat arrays over the pixels asked for)."""

    cls: np.ndarray  # int8 class
    db: np.ndarray  # echo strength (dB), boundaries softened over the edge width
    moving: np.ndarray  # share of blood-like scatterers
    tex: np.ndarray  # weight of static heterogeneity
    atten: np.ndarray  # relative attenuation
    mat_x: np.ndarray  # material (end-diastolic screen) coordinates of the tissue, cm
    mat_z: np.ndarray
    soft_cm: float = 0.1

    @classmethod
    def blank(cls, n: int, soft_cm: float) -> Painted:
        t = TISSUES[SURROUND]
        return cls(np.full(n, SURROUND, np.int8), np.full(n, t.db), np.zeros(n), np.full(n, t.tex),
                   np.full(n, t.atten), np.zeros(n), np.zeros(n), soft_cm)

    def paint(self, kind: int, sd: np.ndarray, idx: np.ndarray | None = None, db: float | np.ndarray | None = None,
              atten: float | None = None) -> None:
        """Lay tissue ``kind`` where the signed distance ``sd`` (cm) is negative.

        The class switches exactly at ``sd = 0`` (what :func:`tissue_map`
        reports); the echo strength blends over ``soft_cm`` around it, so a
        wall's intensity profile carries its sub-pixel position.
        """
        t = TISSUES[kind]
        sel = slice(None) if idx is None else idx
        cls = self.cls[sel]
        cls[sd < 0] = kind
        self.cls[sel] = cls
        a = np.clip(0.5 - sd / self.soft_cm, 0.0, 1.0)
        level = t.db if db is None else db
        for arr, val in ((self.db, level), (self.moving, t.moving), (self.tex, t.tex),
                         (self.atten, t.atten if atten is None else atten)):
            cur = arr[sel]
            arr[sel] = cur + a * (val - cur)


def _ramp_down(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """1 below ``lo``, 0 above ``hi``, a cosine in between."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return 0.5 + 0.5 * np.cos(np.pi * t)


def _polyline_distance(px: np.ndarray, py: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance from points to a polyline (``pts``: (k, 2))."""
    best = np.full(px.shape, np.inf)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        vx, vy = bx - ax, by - ay
        ll = vx * vx + vy * vy
        t = np.clip(((px - ax) * vx + (py - ay) * vy) / max(ll, 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.hypot(px - ax - t * vx, py - ay - t * vy))
    return best


def _bezier(p0: np.ndarray, c: np.ndarray, p1: np.ndarray, n: int = 9) -> np.ndarray:
    """Points of the quadratic Bezier curve p0 -> p1 with control point ``c``."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * c + t ** 2 * p1


@dataclass
class _LV:
    """The left ventricle of a long-axis or short-axis view (cm)."""

    h: float  # cavity half-width at the measuring level (LVID / 2)
    t_sep: float  # septum (eta < 0)
    t_post: float  # posterior (PLAX), lateral (A4C) or inferolateral (PSAX) wall
    a: float  # semi-length of the apical cap
    xi0: float = -1.2  # where the cap begins (walls parallel from here to the base)
    fs: float = 0.33  # fractional shortening at full contraction
    k_long: float = 0.08  # long-axis shortening at full contraction

    @property
    def xi_apex(self) -> float:
        return self.xi0 - self.a

    def thickness(self, eta: np.ndarray) -> np.ndarray:
        return np.where(eta < 0, self.t_sep, self.t_post)

    def ellipse_sd(self, xi: np.ndarray, eta: np.ndarray, grow: np.ndarray | float) -> np.ndarray:
        """Signed distance (exact on the parallel part) to the cavity grown by ``grow`` cm."""
        xp = np.minimum(xi - self.xi0, 0.0)
        ha, hh = self.a + grow, self.h + grow
        return (np.sqrt((xp / ha) ** 2 + (eta / hh) ** 2) - 1.0) * hh

    def base_shift(self, c: float) -> float:
        """How far the rigid base has moved toward the apex at contraction ``c``."""
        return self.k_long * c * (_RIGID_XI - self.xi_apex)

    def unwarp_across(self, ae: np.ndarray, t: np.ndarray, hs: np.ndarray) -> np.ndarray:
        """Material distance from the axis (or centre) of screen distance ``ae``.

        Inside the cavity a uniform scale; in the wall the area between the
        endocardium and a point is conserved (``r_m^2 - h_m^2 = r_s^2 -
        h_s^2``), so the wall thickens as the cavity shrinks; outside it the
        epicardium's displacement fades over :data:`_WALL_DECAY_CM`.
        """
        hm = self.h
        es = np.sqrt((hm + t) ** 2 - hm ** 2 + hs ** 2)
        inner = ae * hm / hs
        wall = np.sqrt(np.maximum(ae ** 2 - hs ** 2 + hm ** 2, 0.0))
        outer = ae + (hm + t - es) * np.exp(-np.maximum(ae - es, 0.0) / _WALL_DECAY_CM)
        return np.where(ae <= hs, inner, np.where(ae <= es, wall, outer))

    def unwarp_long(self, xi: np.ndarray, eta: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        """Material (xi, eta) of screen heart-frame points at contraction ``c``."""
        if c <= 0.0:
            return xi, eta
        d = self.k_long * c * (np.clip(xi, self.xi_apex, _RIGID_XI) - self.xi_apex)
        xim = xi + d
        # Only the muscular part contracts across; the fibrous base does not.
        hs = self.h * (1.0 - self.fs * c * _ramp_down(xim, 0.8, 1.9))
        am = self.unwarp_across(np.abs(eta), self.thickness(eta), hs)
        return xim, np.sign(eta) * am


Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Scene:
    """One view of one heart, ready to be painted at any phase."""

    view: str
    pose: Pose
    lv: _LV
    an: Anatomy
    chest_cm: float
    layers: list[tuple[int, Shape, float | None]] = field(default_factory=list)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # Atrioventricular leaflets: (hinge, open tip, closed tip, bow) in the base frame.
    leaflets: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = field(default_factory=list)

    # -- geometry a test or a caller may want -------------------------------------------------
    def measuring_line(self) -> tuple[np.ndarray, np.ndarray]:
        """Screen (x, z) in cm of the measuring line's origin and its unit direction (toward posterior)."""
        x0, z0 = self.pose.to_screen(np.array(0.0), np.array(0.0))
        x1, z1 = self.pose.to_screen(np.array(0.0), np.array(1.0))
        return np.array([float(x0), float(z0)]), np.array([float(x1 - x0), float(z1 - z0)])

    def root_frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Screen (x, z) in cm of the aortic annulus centre, the root's axis and its normal (PLAX)."""
        a0, u, n = self.extras["root_a0"], self.extras["root_u"], self.extras["root_n"]
        o = np.array([float(v) for v in self.pose.to_screen(a0[0], a0[1])])
        pu = np.array([float(v) for v in self.pose.to_screen(a0[0] + u[0], a0[1] + u[1])]) - o
        pn = np.array([float(v) for v in self.pose.to_screen(a0[0] + n[0], a0[1] + n[1])]) - o
        return o, pu, pn

    # -- painting -----------------------------------------------------------------------------
    def material(self, xi: np.ndarray, eta: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        """Material heart-frame coordinates of screen heart-frame points at contraction ``c``."""
        if self.view == "psax":
            return self._unwarp_radial(xi, eta, c)
        return self.lv.unwarp_long(xi, eta, c)

    def _unwarp_radial(self, u: np.ndarray, v: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        if c <= 0.0:
            return u, v
        r = np.hypot(u, v)
        t = self._psax_thickness(u, v, r)
        rm = self.lv.unwarp_across(r, t, np.full_like(r, self.lv.h * (1.0 - self.lv.fs * c)))
        # Systolic twist: the ring rotates a few degrees, less farther out.
        tw = math.radians(6.0) * c * np.exp(-np.maximum(r - self.lv.h, 0.0) / 2.0)
        scale = np.divide(rm, r, out=np.ones_like(r), where=r > 1e-9)
        cs, sn = np.cos(tw), np.sin(tw)
        return (u * cs - v * sn) * scale, (u * sn + v * cs) * scale

    def _psax_thickness(self, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
        ds = self.extras["psax_dsep"]
        cosang = np.divide(u * ds[0] + v * ds[1], r, out=np.zeros_like(r), where=r > 1e-9)
        return 0.5 * (self.lv.t_sep + self.lv.t_post) + 0.5 * (self.lv.t_sep - self.lv.t_post) * cosang

    def paint(self, x: np.ndarray, z: np.ndarray, phase: float, walls_phase: float | None = None,
              soft_cm: float = 0.1) -> Painted:
        """Tissue at screen points (cm from the apex) at cardiac ``phase``.

        ``walls_phase`` poses the walls (default ``phase``); leaflets are
        posed at ``phase``.  With ``walls_phase = 0`` the walls are the
        end-diastolic anatomy exactly.
        """
        wp = phase if walls_phase is None else walls_phase
        c = contraction(wp)
        xi, eta = self.pose.to_heart(x, z)
        xim, etam = self.material(xi, eta, c)
        out = Painted.blank(x.size, soft_cm)
        out.mat_x, out.mat_z = self.pose.to_screen(xim, etam)
        for kind, shape, db in self.layers:
            out.paint(kind, shape(xim, etam), db=db)
        # Leaflets move with the rigid base as it is at ``phase`` (where the video draws them,
        # also when the walls are posed at another phase): base-frame coordinates.
        xib = xi + (self.lv.base_shift(contraction(phase)) if self.view != "psax" else 0.0)
        self._leaflets(out, xib, eta, phase)
        r = np.hypot(x, z)
        out.paint(CHEST, r - self.chest_cm, db=TISSUES[CHEST].db + self.extras["chest_bands"][
            np.clip((r / 0.05).astype(np.int64), 0, len(self.extras["chest_bands"]) - 1)])
        return out

    def _leaflet(self, out: Painted, xi: np.ndarray, eta: np.ndarray, pts: np.ndarray, half: float, kind: int,
                 db: float | None = None, atten: float | None = None) -> None:
        lo, hi = pts.min(axis=0) - half - 0.3, pts.max(axis=0) + half + 0.3
        idx = np.flatnonzero((xi > lo[0]) & (xi < hi[0]) & (eta > lo[1]) & (eta < hi[1]))
        if idx.size:
            out.paint(kind, _polyline_distance(xi[idx], eta[idx], pts) - half, idx=idx, db=db, atten=atten)

    def _leaflets(self, out: Painted, xi: np.ndarray, eta: np.ndarray, phase: float) -> None:
        if self.view in ("plax", "a4c"):
            o = mv_open(phase)
            for hinge, tip_open, tip_closed, bow in self.leaflets:
                tip = tip_closed + o * (tip_open - tip_closed)
                mid = 0.5 * (hinge + tip)
                d = tip - hinge
                ctrl = mid + bow * np.array([-d[1], d[0]])
                self._leaflet(out, xi, eta, _bezier(hinge, ctrl, tip), 0.055, LEAFLET)
        if self.view == "plax":
            self._aortic_cusps(out, xi, eta, phase)

    def _aortic_cusps(self, out: Painted, xi: np.ndarray, eta: np.ndarray, phase: float) -> None:
        """The two cusps PLAX cuts: right coronary (anterior) and non-coronary (posterior).

        Each is a thick quadratic curve from its hinge on the annulus to its
        free edge.  Fully open (mid-systole) the curve's tangent at the free
        edge is parallel to the root's axis, so the free edges' inner
        surfaces are exactly ``av_cusp_sep_cm`` apart.
        """
        tr = self.an.truth
        ex = self.extras
        a0, u, n = ex["root_a0"], ex["root_u"], ex["root_n"]
        ra = float(ex["root_ra"][0])
        half = 0.5 * tr.av_leaflet_cm
        o = av_open(phase)
        q_tip = half + o * 0.5 * tr.av_cusp_sep_cm
        s_open = math.sqrt(max((1.05 * ra) ** 2 - (ra - 0.5 * tr.av_cusp_sep_cm - half) ** 2, 0.3 ** 2))
        s_tip = 0.3 + o * (s_open - 0.3)
        s_ctrl = 0.12 + o * (0.5 * s_open - 0.12)
        q_ctrl = 0.5 * ra + o * (q_tip - 0.5 * ra)
        db = TISSUES[AORTIC_CUSP].db + CUSP_CALCIUM_DB * tr.av_calcification
        att = TISSUES[AORTIC_CUSP].atten + CUSP_CALCIUM_ATTEN * tr.av_calcification
        for side in (-1.0, 1.0):
            pts_root = [(0.0, side * ra), (s_ctrl, side * q_ctrl), (s_tip, side * q_tip)]
            p = [a0 + s * u + q * n for s, q in pts_root]
            self._leaflet(out, xi, eta, _bezier(p[0], p[1], p[2]), half, AORTIC_CUSP, db=db, atten=att)


# -- the views ------------------------------------------------------------------------------------------

def _band(lo: float | np.ndarray, hi: float | np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance to the band lo <= v <= hi."""
    return np.maximum(lo - v, v - hi)


def _disc(cx: float, cy: float, r: float, ax: float | None = None) -> Shape:
    """An ellipse (semi-axes ``ax`` along xi, ``r`` across; a circle without ``ax``)."""
    sa = r if ax is None else ax

    def sd(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        return (np.sqrt(((xi - cx) / sa) ** 2 + ((eta - cy) / r) ** 2) - 1.0) * min(sa, r)
    return sd


def _lv_model(an: Anatomy, lateral_cm: float) -> _LV:
    tr = an.truth
    return _LV(h=0.5 * tr.lvid_cm, t_sep=tr.ivs_cm, t_post=lateral_cm, a=max(an.lv_length_cm - 3.2, 2.5),
               fs=an.fractional_shortening, k_long=0.25 * an.fractional_shortening)


def _pose_at(xi: float, eta: float, target: tuple[float, float], phi: float, mirror: float) -> Pose:
    """The pose that puts heart point (xi, eta) at screen ``target``."""
    p = Pose(0.0, 0.0, phi, mirror)
    x, z = p.to_screen(np.array(xi), np.array(eta))
    return Pose(target[0] - float(x), target[1] - float(z), phi, mirror)


def _plax(an: Anatomy, plan: VideoPlan, lv: _LV) -> Scene:
    tr = an.truth
    h, ts, tp, g = lv.h, lv.t_sep, lv.t_post, an.pericardial_gap_cm
    rv = an.rv_cm
    front = -h - ts - rv - 0.42  # anterior surface of the RV free wall
    # Base: posterior mitral annulus, aorto-mitral continuity, aortic root.
    ph = np.array([2.0, h])
    lvot = float(np.clip(0.35 * tr.lvid_cm + 0.3, 1.6, 2.4))
    ah = np.array([2.6, -h + lvot])
    beta = math.radians(-8.0)
    u = np.array([math.cos(beta), math.sin(beta)])
    n = np.array([-math.sin(beta), math.cos(beta)])
    big_r = 0.5 * tr.ao_root_cm
    ra, wv = 0.82 * big_r, 0.24
    a0 = ah - (wv + ra) * n
    # Centred between the measuring level and the aortic annulus, as a sonographer centres a PLAX on
    # the walls and the valve: pinned farther toward the apex, the valve fell near or beyond the
    # sector's edge in about one video in ten, where the sector is narrow. Placed by label-free
    # points only (never the cusp tips), so the framing cannot follow the severity.
    hung = _pose_at(0.0, front - 0.45, (0.0, an.chest_wall_cm + plan.shift_z_cm),
                    math.radians(-4.0 + plan.tilt_deg), 1.0)  # the RV's front under the chest wall
    mid_x, _ = hung.to_screen(np.array(0.5 * a0[0]), np.array(0.5 * a0[1]))
    pose = Pose(hung.ox - float(mid_x) + plan.shift_x_cm, hung.oz, hung.phi, hung.mirror)
    sept_end = float((a0 - ra * n)[0]) + 0.15

    def root_radius(s: np.ndarray) -> np.ndarray:
        far = np.where(s <= 1.0, ra, 0.86 * big_r)
        return far + (big_r - far) * np.exp(-(((s - 1.0) / 0.7) ** 2))

    def root_sd(grow: float, s_min: float) -> Shape:
        def sd(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
            s = (xi - a0[0]) * u[0] + (eta - a0[1]) * u[1]
            q = (xi - a0[0]) * n[0] + (eta - a0[1]) * n[1]
            return np.maximum(np.abs(q) - root_radius(s) - grow, s_min - s)
        return sd

    la = an.la_cm
    la_c = (float(ah[0]) + 0.5 + 0.3 * la, float(ah[1]) + wv + 0.15 + 0.5 * la)
    la_ax = 0.55 * la + 0.5
    post_out = h + tp + g + 0.22
    mid = 0.5 * (ah + ph)

    def lv_outer(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        end = np.where(eta < 0, sept_end, float(ph[0]) + 0.35)
        return np.maximum(lv.ellipse_sd(xi, eta, lv.thickness(eta)), xi - end)

    def lv_cavity(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        return np.maximum(lv.ellipse_sd(xi, eta, 0.0), xi - float(ah[0]) - 0.2)

    def channel(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        pts = np.array([mid, [la_c[0], la_c[1]]])
        return _polyline_distance(xi, eta, pts) - 0.42 * float(np.hypot(*(ah - ph)))

    rv_start = lv.xi0 - 0.55 * lv.a
    layers: list[tuple[int, Shape, float | None]] = [
        (VESSEL, _disc(float(ph[0]) + 1.6, post_out + 1.25, 1.05), None),  # descending aorta
        (BLOOD, _disc(float(ph[0]) + 1.6, post_out + 1.25, 0.85), None),
        (PERICARDIUM, lambda xi, eta: lv.ellipse_sd(xi, eta, lv.thickness(eta) + g + 0.22), None),
        (FLUID, lambda xi, eta: lv.ellipse_sd(xi, eta, lv.thickness(eta) + g), None),
        (PERICARDIUM, lambda xi, eta: _band(front - 0.45, front - 0.25, eta), None),
        (FLUID, lambda xi, eta: _band(front - 0.25, front, eta), None),
        (MYOCARDIUM, lambda xi, eta: np.maximum(_band(front, front + 0.52, eta), rv_start - xi), None),
        (BLOOD, lambda xi, eta: np.maximum(_band(front + 0.42, -h - ts + 0.3, eta), rv_start + 0.4 - xi), None),
        (MYOCARDIUM, lv_outer, None),
        (BLOOD, lv_cavity, None),
        (MYOCARDIUM, _disc(la_c[0], la_c[1], 0.5 * la + 0.22, la_ax + 0.22), None),
        (BLOOD, _disc(la_c[0], la_c[1], 0.5 * la, la_ax), None),
        (BLOOD, channel, None),
        (VESSEL, root_sd(wv, -0.35), None),
        (BLOOD, root_sd(0.0, -0.8), None),
    ]
    bow = 0.12
    mitral = [
        (ah + 0.0, np.array([_MV_TIP_XI, -h + 0.55 * lvot]), mid + np.array([-0.35, -0.12]), -bow),
        (ph + np.array([0.0, -0.05]), np.array([_MV_TIP_XI + 0.2, h - 0.5]), mid + np.array([-0.35, 0.12]), bow),
    ]
    extras = {"root_a0": a0, "root_u": u, "root_n": n, "root_ra": np.array([ra])}
    return Scene("plax", pose, lv, an, an.chest_wall_cm, layers, extras, mitral)


def _a4c(an: Anatomy, plan: VideoPlan, lv: _LV) -> Scene:
    h, ts, tp, g = lv.h, lv.t_sep, lv.t_post, an.pericardial_gap_cm
    rv = an.rv_cm
    t_ap = 0.5 * (ts + tp)
    pose = _pose_at(lv.xi_apex - t_ap - g - 0.22, -0.25 * h,
                    (0.35 + plan.shift_x_cm, an.chest_wall_cm + 0.3 + plan.shift_z_cm),
                    math.radians(90.0 + plan.tilt_deg), -1.0)
    xa = 2.0  # mitral annulus
    xt = 1.45  # tricuspid annulus (more apical)
    rvc, arv, wrv = -0.6, 0.72 * lv.a, 1.15 * rv
    sep_out = -h - ts

    def rv_width(xi: np.ndarray, extra: float) -> np.ndarray:
        k = np.clip((xi - rvc) / (arv + extra), -1.0, 0.0)
        return (wrv + extra) * np.sqrt(1.0 - k * k)

    def rv_cavity(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        return np.maximum.reduce([sep_out - rv_width(xi, 0.0) - eta, eta - sep_out - 0.3, xi - xt - 0.25,
                                  rvc - arv - xi])

    def rv_wall(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        return np.maximum.reduce([sep_out - rv_width(xi, 0.42) - eta, eta - sep_out - 0.2, xi - xt - 0.45,
                                  rvc - arv - 0.42 - xi])

    def rv_peri(grow: float) -> Shape:
        def sd(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
            return np.maximum.reduce([sep_out - rv_width(xi, 0.42 + grow) - eta, xi - xt - 0.5,
                                      rvc - arv - 0.42 - grow - xi, eta - sep_out - 0.2])
        return sd

    def lv_outer(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        return np.maximum(lv.ellipse_sd(xi, eta, lv.thickness(eta)), xi - xa - 0.3)

    def lv_cavity(xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        return np.maximum(lv.ellipse_sd(xi, eta, 0.0), xi - xa - 0.6)

    la = an.la_cm
    la_c, la_ax, la_r = (xa + 0.35 + 0.55 * la, 0.25 * h), 0.55 * la, min(h + 0.2, 0.5 * la + 0.5)
    ra_c, ra_ax, ra_r = (xt + 0.35 + 0.5 * la, sep_out - 0.55 * wrv - 0.1), 0.5 * la, 0.5 * wrv + 0.5
    layers: list[tuple[int, Shape, float | None]] = [
        (VESSEL, _disc(la_c[0] + la_ax + 1.0, 0.6 * h, 0.95), None),  # descending aorta behind the LA
        (BLOOD, _disc(la_c[0] + la_ax + 1.0, 0.6 * h, 0.75), None),
        (PERICARDIUM, lambda xi, eta: lv.ellipse_sd(xi, eta, lv.thickness(eta) + g + 0.22), None),
        (FLUID, lambda xi, eta: lv.ellipse_sd(xi, eta, lv.thickness(eta) + g), None),
        (PERICARDIUM, rv_peri(g + 0.22), None),
        (FLUID, rv_peri(g), None),
        (MYOCARDIUM, rv_wall, None),
        (BLOOD, rv_cavity, None),
        (MYOCARDIUM, _disc(ra_c[0], ra_c[1], ra_r + 0.2, ra_ax + 0.2), None),
        (MYOCARDIUM, _disc(la_c[0], la_c[1], la_r + 0.2, la_ax + 0.2), None),
        (BLOOD, _disc(ra_c[0], ra_c[1], ra_r, ra_ax), None),
        (BLOOD, _disc(la_c[0], la_c[1], la_r, la_ax), None),
        (MYOCARDIUM, lv_outer, None),
        (BLOOD, lv_cavity, None),
    ]
    mv_mid = np.array([xa - 0.35, 0.05 * h])
    tv_mid = np.array([xt - 0.3, sep_out - 0.5 * wrv])
    mitral = [
        (np.array([xa, -h]), np.array([_MV_TIP_XI, -h + 0.7]), mv_mid + np.array([0.0, -0.06]), -0.1),
        (np.array([xa, h]), np.array([_MV_TIP_XI + 0.2, h - 0.55]), mv_mid + np.array([0.0, 0.06]), 0.1),
        (np.array([xt, sep_out - 0.05]), np.array([xt - 1.3, sep_out - 0.35]), tv_mid + np.array([0.0, 0.06]), 0.1),
        (np.array([xt, sep_out - wrv]), np.array([xt - 1.5, sep_out - wrv + 0.45]), tv_mid - np.array([0.0, 0.06]),
         -0.1),
    ]
    return Scene("a4c", pose, lv, an, an.chest_wall_cm, layers, {}, mitral)


def _psax(an: Anatomy, plan: VideoPlan, lv: _LV) -> Scene:
    h, ts, g = lv.h, lv.t_sep, an.pericardial_gap_cm
    rv = an.rv_cm
    dsep = np.array([-0.6, -0.8])
    reach = h + ts + rv + 0.42
    pose = _pose_at(0.0, 0.0, (0.4 + plan.shift_x_cm, an.chest_wall_cm + 0.45 + 0.8 * reach + plan.shift_z_cm),
                    math.radians(plan.tilt_deg), 1.0)
    # The RV: a circle well off the LV's centre toward the septum, so that
    # what the LV does not cover of it is a crescent over the septum.
    crv = dsep * 0.9 * (h + ts)
    rrv = h + ts + rv - 0.9 * (h + ts)
    sc = Scene("psax", pose, lv, an, an.chest_wall_cm, [], {"psax_dsep": dsep})

    def lv_ring(grow: float) -> Shape:
        def sd(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            r = np.hypot(u, v)
            return r - h - sc._psax_thickness(u, v, r) - grow
        return sd

    rp = 0.42 * min(h / 2.4, 1.2)
    pm = [np.array([0.95, 0.3]), np.array([-0.35, 0.94])]
    sc.layers = [
        (PERICARDIUM, lv_ring(g + 0.22), None),
        (PERICARDIUM, _disc(float(crv[0]), float(crv[1]), rrv + 0.42 + g + 0.22), None),
        (FLUID, lv_ring(g), None),
        (FLUID, _disc(float(crv[0]), float(crv[1]), rrv + 0.42 + g), None),
        (MYOCARDIUM, _disc(float(crv[0]), float(crv[1]), rrv + 0.42), None),
        (BLOOD, _disc(float(crv[0]), float(crv[1]), rrv), None),
        (MYOCARDIUM, lv_ring(0.0), None),
        (BLOOD, lambda u, v: np.hypot(u, v) - h, None),
        *[(MYOCARDIUM, _disc(float(d[0] * (h - 0.6 * rp)), float(d[1] * (h - 0.6 * rp)), rp), None) for d in pm],
    ]
    return sc


def build_scene(an: Anatomy, plan: VideoPlan, rng: np.random.Generator) -> Scene:
    """The scene of ``plan.view`` for anatomy ``an``.

    Parameters
    ----------
    an : Anatomy
        Sizes in cm; only the label-defining *sizes* and label-free anatomy
        are read, never a label.
    plan : VideoPlan
        Its view, tilt and shifts place the heart in the sector.
    rng : numpy.random.Generator
        Draws the chest wall's layering (nothing anatomical).

    Returns
    -------
    Scene

    Raises
    ------
    ValueError
        If the view is not one this renderer draws.
    """
    if plan.view not in ("plax", "a4c", "psax"):
        raise ValueError(f'Argument "plan.view" must be one of plax, a4c, psax, got {plan.view!r}.')
    lv = _lv_model(an, an.truth.lvpw_cm)
    sc = {"plax": _plax, "a4c": _a4c, "psax": _psax}[plan.view](an, plan, lv)
    # Skin, fat and muscle layers: a banded echo profile along depth (0.05 cm steps).
    bands = np.convolve(rng.normal(0.0, 4.0, 80), np.ones(3) / 3.0, mode="same")
    sc.extras["chest_bands"] = bands
    return sc
