"""Renderer C ("scatter"): echo videos formed from moving point scatterers.

The third renderer of the synthetic archive, written to measure transfer on
a rendering that nobody tuned anything against.  **Independence rule:** it was
written from the anatomy's definitions (:mod:`train.synth.anatomy`,
:mod:`train.synth.truth`), the acquisition plan
(:mod:`train.synth.acquisition`), the geometry contract
(:mod:`train.synth.geometry`) and ultrasound physics, without reading renderer
A's or B's drawing code (``render.py``, ``views.py``, ``render_alt.py``,
``look.py``, ``overlay.py``) or the notes on how they look; keep it that way
when changing it.

How it forms an image, in principle unlike a renderer that paints tissue
brightness and adds texture:

* **Tissue as scatterers.**  The heart of a view is a set of analytic
  boundaries in a heart frame (long axis ``s``, perpendicular ``n``, in cm).
  Random point scatterers are drawn continuously over the sector, classified
  by the tissue they fall in at end-diastole, and given amplitudes from that
  tissue's distribution (blood very weak, myocardium moderate, pericardium,
  fibrous tissue and valves strong, calcium stronger).  They are attached to
  the tissue: a deformation of the heart frame (radial contraction with
  wall thickening at constant cross-section, descent of the base) moves them
  from frame to frame, so the speckle moves with the heart; blood scatterers
  also jitter (flow) and every amplitude decorrelates partly with the
  contraction (out-of-plane motion).  Valve leaflets carry their own
  scatterers, posed every frame from the valve opening.
* **Specular interfaces.**  Tissue boundaries (endocardium, epicardium,
  pericardium, root walls, leaflets, chest wall layers) are also strings of
  coherent reflectors whose strength falls with the angle between the beam
  and the interface normal (``|cos|**p``): a boundary perpendicular to the
  beam is a bright line, one parallel to it fades (lateral dropout).
* **Beamforming.**  Scatterers are splatted onto a polar beam grid; the echo
  lines are the scatter map convolved with a real RF pulse (Gaussian-windowed
  carrier from ``plan.freq_mhz``, simulated at a reduced frequency for speed)
  along depth and with a two-way ``sinc**2`` beam profile (side lobes) that
  widens away from the focus across beams.  The envelope is the modulus of
  the analytic signal (FFT Hilbert transform along depth).
* **Propagation.**  Attenuation is integrated along each beam through the
  tissue actually crossed (blood attenuates little, so the far side of a
  cavity is brighter; calcified cusps attenuate and shadow), time-gain
  compensation undoes most of the nominal loss, electronic noise enters
  before the TGC (so the floor rises with depth), near-field clutter and
  reverberation arcs are fixed to the probe, a rib shadow blocks a wedge of
  beams, and a poor window adds haze and beam dropout.
* **Display.**  Log compression over ``plan.dynamic_range_db`` through a grey
  map of its own: piecewise linear with a knee and a shoulder, rounded, the
  knee placed from ``plan.gamma`` (never ``x ** gamma``); scan conversion to
  a sector with a small curved top; a depth ruler with a focus marker, an
  ECG sweep and burned-in text in its own layout; a mild warm tint.

The label-defining sizes are exact in the drawn anatomy at end-diastole: in
PLAX the septum, LV cavity and posterior wall span ``ivs_cm``, ``lvid_cm`` and
``lvpw_cm`` perpendicular to the LV long axis at the measuring level (2.6 cm
apical to the mitral annulus, beyond the leaflet tips), and at mid-systole the
aortic cusps' free edges are ``av_cusp_sep_cm`` apart.  No label property
(``lvh``, ``severe_as``, ``av_state``) is read; calcification acts only as
leaflet echogenicity and attenuation.  :func:`tissue_map` returns the drawn
tissue classes for checking that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import MID_SYSTOLE_PHASE, Anatomy, av_open, contraction, ecg_wave, mv_open
from train.synth.geometry import Geometry

__all__ = [
    "MEASURE_LEVEL_CM",
    "TISSUES",
    "plax_measure_line",
    "plax_valve_line",
    "render_video",
    "sector_geometry",
    "tissue_map",
]

TISSUES = ("blood", "myocardium", "chest_wall", "surround", "pericardial_space", "pericardium", "deep",
           "fibrous", "leaflet")
"""Tissue classes of :func:`tissue_map`, by index."""
BLOOD, MYO, CHEST, SURROUND, GAP, PERI, DEEP, FIBROUS, LEAFLET = range(9)

MEASURE_LEVEL_CM = 2.6
"""PLAX: distance from the mitral annulus toward the apex where the walls are measured."""

# Backscatter of each tissue relative to myocardium (dB), the log-normal spread
# of single scatterers' amplitudes (fibrous tissue is more heterogeneous, so it
# sparkles), and attenuation relative to soft tissue (blood and fluid little).
_BACKSCATTER_DB = np.array([-42.0, 0.0, 1.0, -12.0, -22.0, 9.0, -16.0, 5.0, 4.0])
_SPREAD = np.array([0.2, 0.35, 0.7, 0.5, 0.3, 0.6, 0.5, 0.6, 0.5])
_ATTEN_REL = np.array([0.12, 1.0, 1.1, 1.0, 0.4, 1.3, 1.0, 1.3, 1.5])

_SEED_SALT = 0x5CA77E2C  # renderer C's own derivation of its random stream from plan.noise_seed
_R_TOP_CM = 0.3  # the sector's curved top: the transducer face below the virtual apex
_SPEC_P = 6.0  # specular directivity: |cos(incidence)| ** p
_SPEC_STEP_CM = 0.02  # spacing of the coherent reflectors along an interface
_DEFAULT_HEADER = {"initials": "S.P.", "date": "01/01/2020"}

Leaflet = tuple[float, float, float, float, float, float]
"""A posed valve leaflet: hinge ``s, n``, direction angle (rad, in the ``s, n`` plane),
length, half thickness (cm), extra echogenicity (dB)."""


def _smooth(t: np.ndarray) -> np.ndarray:
    """Cubic smoothstep of ``t`` clipped to [0, 1]."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse_half(s: np.ndarray, s0: float, a: float, h: float) -> np.ndarray:
    """Half-width ``h * sqrt(1 - ((s - s0) / a)**2)`` of an ellipse's cap (0 outside it)."""
    return h * np.sqrt(np.clip(1.0 - ((s - s0) / a) ** 2, 0.0, 1.0))


def _segments(n: np.ndarray, knots: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Which knot interval each ``n`` falls in, and where in it (per-point increasing knots).

    Below the first knot the position is 0 in the first interval, above the
    last one 1 in the last: the interpolated value is held constant outside.
    """
    k = np.stack(knots)
    idx = np.clip((n[None, :] > k).sum(axis=0) - 1, 0, len(knots) - 2)
    cols = np.arange(n.size)
    lo, hi = k[idx, cols], k[idx + 1, cols]
    return idx, np.clip((n - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)


def _interp_segments(seg: tuple[np.ndarray, np.ndarray], values: list[np.ndarray]) -> np.ndarray:
    """Piecewise-linear values at the positions found by :func:`_segments`."""
    idx, t = seg
    v = np.stack(values)
    cols = np.arange(idx.size)
    v0 = v[idx, cols]
    return v0 + t * (v[idx + 1, cols] - v0)


Cache = dict[str, object]
"""Per-point quantities of a fixed set of material points, computed once for every frame."""


class _Heart:
    """One view of the heart: tissue boundaries, motion, valves, pose.

    Subclasses define the view; heart coordinates are ``s`` (along the LV long
    axis, apex negative, mitral annulus 0) and ``n`` (perpendicular), in cm.
    """

    def __init__(self, an: Anatomy, plan: VideoPlan) -> None:
        self.an, self.plan = an, plan
        t = an.truth
        self.b = t.lvid_cm / 2.0
        self.L = an.lv_length_cm
        self.s_apex = -self.L
        self.a_cap = 0.5 * self.L  # apical cap: ellipse over the apical half
        self.s_cap = self.s_apex + self.a_cap
        self.t_apex = 0.3 + 0.35 * 0.5 * (t.ivs_cm + t.lvpw_cm)
        self.fs = an.fractional_shortening
        self.sg = np.arange(-16.0, 14.0, 0.01)
        self.x0, self.z0 = 0.0, 0.0  # pose, set by subclasses
        self.es = (1.0, 0.0)
        self.en = (0.0, -1.0)

    # -- pose --
    def set_pose(self, x0: float, z0: float, es: tuple[float, float], en: tuple[float, float]) -> None:
        """Place the heart frame in the image (cm from the apex, depth down)."""
        self.x0, self.z0, self.es, self.en = x0, z0, es, en

    def to_image(self, s: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image ``x, z`` (cm) of heart coordinates."""
        return self.x0 + s * self.es[0] + n * self.en[0], self.z0 + s * self.es[1] + n * self.en[1]

    def from_image(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heart coordinates of image ``x, z`` (the frame is orthonormal)."""
        dx, dz = x - self.x0, z - self.z0
        return dx * self.es[0] + dz * self.es[1], dx * self.en[0] + dz * self.en[1]

    def lv_halfwidths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tables over ``sg``: cavity half-width and the two epicardial half-widths."""
        t = self.an.truth
        sg = self.sg
        hb = np.where(sg >= self.s_cap, self.b, _ellipse_half(sg, self.s_cap, self.a_cap, self.b))
        a_out = self.a_cap + self.t_apex
        ba = np.where(sg >= self.s_cap, self.b + t.ivs_cm, _ellipse_half(sg, self.s_cap, a_out, self.b + t.ivs_cm))
        bp = np.where(sg >= self.s_cap, self.b + t.lvpw_cm,
                      _ellipse_half(sg, self.s_cap, a_out, self.b + t.lvpw_cm))
        return hb, ba, bp

    def tab(self, name: str, s: np.ndarray) -> np.ndarray:
        """A boundary table evaluated at ``s``."""
        return np.interp(s, self.sg, self.tables[name])

    tables: dict[str, np.ndarray]

    # -- to be defined by each view --
    def classify(self, s: np.ndarray, n: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Tissue class at end-diastole of heart points (``z`` = image depth)."""
        raise NotImplementedError

    def motion(self, s: np.ndarray, n: np.ndarray, ph: float, cache: Cache | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Where the tissue at ``s, n`` (end-diastole) is at phase ``ph``.

        ``cache`` (a dict kept by the caller for one fixed set of points) holds
        what does not depend on the phase, so moving the same scatterers in
        every frame costs a few array operations.
        """
        raise NotImplementedError

    def leaflets(self, ph: float) -> list[Leaflet]:
        """Valve leaflets posed at phase ``ph`` (heart coordinates of the current frame)."""
        return []

    def interfaces(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Specular interfaces at end-diastole: polylines ``(s, n)`` and strength (dB)."""
        return []

    @staticmethod
    def cached(cache: Cache | None, key: str, fn: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``fn()``, memoised in ``cache`` under ``key`` when a cache is given."""
        if cache is None:
            return fn()
        if key not in cache:
            cache[key] = fn()
        return cache[key]  # type: ignore[return-value]

    def lv_prep(self, s: np.ndarray, n: np.ndarray, wlv: np.ndarray, ae: np.ndarray, ao: np.ndarray,
                pe: np.ndarray, po: np.ndarray, outer_ant: np.ndarray, outer_post: np.ndarray) -> dict[str, np.ndarray]:
        """The phase-independent part of :meth:`lv_motion` for points ``s, n``."""
        zero = np.zeros_like(s)
        knots = [outer_post - 3.0, outer_post, po, pe, zero, ae, ao, outer_ant, outer_ant + 3.0]
        knots = list(np.maximum.accumulate(np.stack(knots), axis=0) + np.arange(len(knots))[:, None] * 1e-4)
        idx, t = _segments(n, knots)
        return {"wlv": wlv, "ae": ae, "ao": ao, "pe": pe, "po": po, "idx": idx, "t": t}

    def lv_motion(self, pre: dict[str, np.ndarray], ph: float) -> np.ndarray:
        """Perpendicular displacement of an LV-centred radial contraction.

        The endocardium moves in by ``FS * contraction`` (weighted by ``wlv``)
        and the epicardium by what keeps ``outer**2 - inner**2`` (the wall's
        cross-section) constant, so walls thicken in systole; the structures
        outside (RV free wall, pericardium) follow at 0.3 and fade out.
        """
        k = self.fs * contraction(ph) * pre["wlv"]
        ae, ao, pe, po = pre["ae"], pre["ao"], pre["pe"], pre["po"]  # pe, po negative
        ae2 = ae * (1.0 - k)
        ao2 = np.sqrt(np.maximum(ao**2 - ae**2 + ae2**2, 0.0))
        pe2 = pe * (1.0 - k)
        po2 = -np.sqrt(np.maximum(po**2 - pe**2 + pe2**2, 0.0))
        d_ae, d_ao, d_pe, d_po = ae2 - ae, ao2 - ao, pe2 - pe, po2 - po
        zero = np.zeros_like(ae)
        vals = [zero, 0.3 * d_po, d_po, d_pe, zero, d_ae, d_ao, 0.3 * d_ao, zero]
        return _interp_segments((pre["idx"], pre["t"]), vals)

    def descent_profile(self, s: np.ndarray) -> np.ndarray:
        """How much of the base's descent the tissue at ``s`` shares (apex 0, annulus 1)."""
        return np.where(s <= 0.0, np.clip((s - self.s_apex) / self.L, 0.0, 1.0), np.clip(1.0 - s / 6.0, 0.0, 1.0))

    def descent(self, ph: float) -> float:
        """Systolic descent of the base toward the fixed apex (cm)."""
        return -0.11 * self.L * (self.fs / 0.34) * contraction(ph)


class _Plax(_Heart):
    """Parasternal long axis: RV, septum, LV, posterior wall; LVOT, aortic root, LA."""

    def __init__(self, an: Anatomy, plan: VideoPlan) -> None:
        super().__init__(an, plan)
        t = an.truth
        sg, b = self.sg, self.b
        hb, ba, bp = self.lv_halfwidths()
        self.D = t.ao_root_cm
        self.w_ao = 0.25
        self.s_av = 0.4  # aortic annulus (cusp hinges); anterior mitral hinge at s = 0
        n_top = b + 0.1  # inner anterior root wall: in line with the septal endocardium
        n_bot = n_top - self.D
        self.n_ao_c = n_top - self.D / 2
        # Sinuses of Valsalva: the root bulges just past the annulus.
        bulge = 0.12 * self.D * np.sin(np.pi * np.clip((sg - self.s_av) / 2.4, 0.0, 1.0))
        sm = _smooth((sg + 1.5) / (self.s_av + 1.5))  # LVOT: septum turns into the root wall
        n_ae = np.where(sg < -1.5, hb, b + (n_top - b) * sm) + bulge
        n_ao_out = np.where(sg < -1.5, ba, (b + t.ivs_cm) + (n_top + self.w_ao - b - t.ivs_cm) * sm) + bulge
        # Posterior LV wall: straight to 1.2 cm from the annulus, then down into the AV groove.
        self.n_ah = n_bot - self.w_ao / 2  # anterior mitral hinge (aorto-mitral continuity)
        self.n_ph = min(-b, max(-b - 0.9, self.n_ah - 2.8))  # posterior mitral hinge
        dip = (self.n_ph + b) * _smooth((sg + 1.2) / 1.2)
        n_pe = np.where(sg < self.s_cap, -hb, -b + dip)
        taper = 1.0 - 0.45 * _smooth((sg + 0.6) / 0.6) * (1.0 - 0.4 / max(t.lvpw_cm, 0.4))
        n_po = np.where(sg < self.s_cap, -bp, n_pe - t.lvpw_cm * taper)
        n_apl = n_bot - bulge  # posterior root lumen
        # LA behind the root, its anteroposterior size la_cm from the root's posterior wall.
        la = an.la_cm
        self.a_la = 0.5 * (1.25 * la + 0.5)
        n_roof = n_bot - self.w_ao
        floor = n_roof - _ellipse_half(sg, self.a_la, self.a_la, la)
        floor = np.where((sg >= 0.0) & (sg <= self.a_la), np.minimum(floor, self.n_ph), floor)
        # The heart's posterior outline, pericardium a gap behind it (narrow behind the LA).
        outline = np.where(sg <= 0.0, n_po, np.where(sg <= 2 * self.a_la, floor - 0.25, n_roof - 0.6))
        gap = np.where(sg <= -0.5, an.pericardial_gap_cm, 0.18)
        k = np.ones(61) / 61.0
        peri = np.convolve(np.pad(outline - gap, 30, mode="edge"), k, mode="valid")
        peri = np.minimum(peri, outline - 0.12)
        # RV: its free wall parallel to the LV axis, la_cm-independent; it closes over the apical LV.
        self.n_rv0 = b + t.ivs_cm + an.rv_cm
        s_rvl = self.s_cap + 0.3
        n_rv_in = np.maximum(self.n_rv0 - np.clip(s_rvl - sg, 0.0, None) * 0.9, n_ao_out)
        self.tables = {"hb": hb, "ae": n_ae, "ao": n_ao_out, "pe": n_pe, "po": n_po, "apl": n_apl,
                       "floor": floor, "roof": np.full_like(sg, n_roof), "peri": peri, "rv": n_rv_in}
        self.n_bot, self.n_top = n_bot, n_top
        # Descending aorta behind the AV groove.
        self.dao = (0.8, float(np.interp(0.8, sg, peri)) - 1.2, 0.9)
        # Pose: the RV free wall touches the chest wall at the measuring level, long axis
        # sloping down toward the apex.
        alpha = math.radians(10.0 + 0.8 * plan.tilt_deg)
        es = (math.cos(alpha), -math.sin(alpha))
        en = (-math.sin(alpha), -math.cos(alpha))
        s_m = -MEASURE_LEVEL_CM
        n_out = self.n_rv0 + 0.45
        z_target = an.chest_wall_cm + 0.25 + plan.shift_z_cm
        x_target = -1.2 + plan.shift_x_cm  # measuring point a little left of the centre line
        self.set_pose(x_target - s_m * es[0] - n_out * en[0], z_target - s_m * es[1] - n_out * en[1], es, en)

    def classify(self, s: np.ndarray, n: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Tissue class at end-diastole."""
        tab = self.tab
        ae, ao, pe, po, apl = tab("ae", s), tab("ao", s), tab("pe", s), tab("po", s), tab("apl", s)
        floor, roof, peri, rv = tab("floor", s), tab("roof", s), tab("peri", s), tab("rv", s)
        cls = np.full(s.shape, SURROUND, np.int8)
        s_apex_out = self.s_apex - self.t_apex
        heartish = s >= s_apex_out - 0.3
        cls[(n < peri - 0.2) & heartish] = DEEP
        cls[(n >= peri - 0.2) & (n < peri) & heartish] = PERI
        cls[(n >= peri) & (n < po) & heartish & (s <= 2 * self.a_la + 1.0)] = GAP
        # RV cavity and free wall.
        rv_on = s >= self.s_cap - 1.0
        cls[rv_on & (n >= ao) & (n < rv)] = BLOOD
        cls[rv_on & (n >= rv) & (n < rv + 0.45)] = MYO
        # Septum (myocardium) turning into the anterior root wall (fibrous).
        ant = (n >= ae) & (n < ao) & (s >= s_apex_out)
        cls[ant] = np.where(s[ant] < -0.4, MYO, FIBROUS)
        # LV: cavity and posterior wall up to the annulus.
        lv = (s >= s_apex_out) & (s <= 0.0)
        cls[lv & (n >= po) & (n < pe)] = MYO
        cls[lv & (n >= pe) & (n < ae)] = BLOOD
        # Root lumen, posterior root wall, LA and its wall.
        root = s > 0.0
        cls[root & (n >= apl) & (n < ae)] = BLOOD
        cls[root & (n >= roof) & (n < apl)] = FIBROUS
        la = root & (s <= 2 * self.a_la + 0.25)
        cls[la & (n >= floor - 0.25) & (n < floor)] = MYO
        cls[la & (n >= floor) & (n < roof)] = BLOOD
        # Descending aorta.
        ds, dn, dr = self.dao
        d = np.hypot(s - ds, n - dn)
        cls[d < dr + 0.15] = FIBROUS
        cls[d < dr] = BLOOD
        cls[z < self.an.chest_wall_cm] = CHEST
        return cls

    def motion(self, s: np.ndarray, n: np.ndarray, ph: float, cache: Cache | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Radial LV contraction with wall thickening, base descent."""

        def prep() -> dict[str, np.ndarray]:
            tab = self.tab
            wlv = (1.0 - _smooth((s + 1.5) / 1.8)) * (s >= self.s_apex - self.t_apex - 0.5)
            peri, rv = tab("peri", s), tab("rv", s)
            pre = self.lv_prep(s, n, wlv, np.maximum(tab("ae", s), 1e-3), tab("ao", s),
                               np.minimum(tab("pe", s), -1e-3), tab("po", s), rv, peri)
            outside = np.maximum(peri - n, n - rv - 0.45).clip(0.0)
            pre["g"] = self.descent_profile(s) * np.clip(1.0 - outside / 2.5, 0.2, 1.0)
            return pre

        pre = self.cached(cache, "plax", prep)
        return s + self.descent(ph) * pre["g"], n + self.lv_motion(pre, ph)

    def leaflets(self, ph: float) -> list[Leaflet]:
        """Aortic cusps (RCC anterior, NCC posterior) and mitral leaflets."""
        t = self.an.truth
        h = t.av_leaflet_cm / 2.0
        calc_db = 16.0 * t.av_calcification
        # Aortic cusps: rigid, hinged at the root walls.  At full opening their
        # free (inner) edges are av_cusp_sep_cm apart; closed they meet in the middle.
        half = self.D / 2.0
        ell = (half - h) * 1.03
        phi_c = math.pi - math.asin(min((half - h) / ell, 1.0))
        phi_o = math.asin(float(np.clip((half - t.av_cusp_sep_cm / 2.0 - h) / ell, 0.0, 1.0)))
        phi = phi_c + (phi_o - phi_c) * av_open(ph)
        hs = np.array([self.s_av, self.s_av])
        hn = np.array([self.n_top, self.n_bot])
        s2, n2 = self.motion(hs, hn, ph)
        dn = float(np.mean(n2 - hn))  # the root moves as a whole: the separation is kept
        ds = float(np.mean(s2 - hs))
        out: list[Leaflet] = [
            (self.s_av + ds, self.n_top + dn, -phi, ell, h, 4.0 + calc_db),
            (self.s_av + ds, self.n_bot + dn, phi, ell, h, 4.0 + calc_db),
        ]
        # Mitral: anterior leaflet from the posterior root wall, posterior from the AV groove.
        mo = mv_open(ph)
        la_, lp = 0.42 * self.an.truth.lvid_cm + 0.3, 0.55 * (0.42 * self.an.truth.lvid_cm + 0.3)
        ha = self.motion(np.array([0.0]), np.array([self.n_ah]), ph)
        hp = self.motion(np.array([0.0]), np.array([self.n_ph]), ph)
        coapt = (-0.9, self.n_ph + 0.35 * (self.n_ah - self.n_ph))
        a_closed = math.atan2(coapt[1] - self.n_ah, coapt[0])
        reach = (self.b - 0.7 - self.n_ah) / la_
        a_open = math.pi - math.asin(float(np.clip(reach, -0.2, 0.95)))
        p_closed = math.atan2(coapt[1] - self.n_ph, coapt[0])
        p_open = math.pi + math.radians(35.0)
        out.append((float(ha[0][0]), float(ha[1][0]), a_closed + (a_open - a_closed) * mo, la_, 0.05, 3.0))
        out.append((float(hp[0][0]), float(hp[1][0]), p_closed + (p_open - p_closed) * mo, lp, 0.05, 3.0))
        return out

    def interfaces(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Endocardium, epicardium, pericardium, root and LA walls, RV free wall."""
        sg, tb = self.sg, self.tables
        s_ap = self.s_apex - self.t_apex

        def seg(name: str, lo: float, hi: float, db: float, off: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
            m = (sg >= lo) & (sg <= hi)
            return sg[m], tb[name][m] + off, db

        return [
            seg("ae", self.s_apex, 6.0, -5.0), seg("ao", s_ap, 6.0, 3.0), seg("pe", self.s_apex, 0.0, -5.0),
            seg("po", s_ap, 0.0, 4.0), seg("peri", s_ap, 2 * self.a_la + 1.0, 15.0),
            seg("peri", s_ap, 2 * self.a_la + 1.0, 4.0, -0.2), seg("apl", 0.0, 6.0, 3.0),
            seg("roof", 0.2, 2 * self.a_la, 0.0), seg("floor", 0.05, 2 * self.a_la, 3.0),
            seg("rv", self.s_cap - 0.5, 6.0, -2.0), seg("rv", self.s_cap - 0.5, 6.0, 4.0, 0.45),
        ]


class _A4c(_Heart):
    """Apical four chamber: apex up, LV on the right, RV left, atria below."""

    def __init__(self, an: Anatomy, plan: VideoPlan) -> None:
        super().__init__(an, plan)
        t, sg, b = an.truth, self.sg, self.b
        hb, ba, bp = self.lv_halfwidths()
        lv = sg <= 0.0
        self.w_rv = 1.4 * an.rv_cm
        self.s_rvb = -0.45  # tricuspid annulus sits apical to the mitral one
        s_rv_apex = self.s_apex + 0.28 * self.L
        a_rv = 0.45 * self.L
        rv_w = np.where(sg >= s_rv_apex + a_rv, self.w_rv, _ellipse_half(sg, s_rv_apex + a_rv, a_rv, self.w_rv))
        rv_in = np.where(sg <= self.s_rvb, ba + rv_w, ba + self.w_rv)
        la_len = 1.1 * an.la_cm + 1.2
        s0 = 0.25
        self.atria = (s0, la_len)
        n_ias = b + 0.5 * t.ivs_cm
        lat = -b - 0.15
        self.tables = {"hb": np.where(lv, hb, 0.0), "ae": hb, "ao": ba, "pe": -hb, "po": -bp, "rvw": rv_w,
                       "rv": rv_in, "peri": -bp - an.pericardial_gap_cm}
        self.n_ias, self.lat = n_ias, lat
        alpha = math.radians(0.6 * plan.tilt_deg)
        es = (math.sin(alpha), math.cos(alpha))
        en = (-math.cos(alpha), math.sin(alpha))
        s_top = self.s_apex - self.t_apex
        z_apex = an.chest_wall_cm + 0.5 + plan.shift_z_cm
        x_apex = 0.9 + plan.shift_x_cm
        self.set_pose(x_apex - s_top * es[0], z_apex - s_top * es[1], es, en)

    def classify(self, s: np.ndarray, n: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Tissue class at end-diastole."""
        tab, b = self.tab, self.b
        ae, ao, pe, po, rv, rvw = tab("ae", s), tab("ao", s), tab("pe", s), tab("po", s), tab("rv", s), tab("rvw", s)
        cls = np.full(s.shape, SURROUND, np.int8)
        s_top = self.s_apex - self.t_apex
        s0, la_len = self.atria
        a = la_len / 2.0
        body = (s >= s_top - 0.3) & (s <= s0 + la_len + 0.6)
        peri = np.where(s <= 0.0, po, -b - 0.4) - self.an.pericardial_gap_cm
        cls[body & (n < peri - 0.2)] = DEEP
        cls[body & (n >= peri - 0.2) & (n < peri)] = PERI
        cls[body & (n >= peri) & (n < -b)] = GAP
        # Ventricles (s <= 0): LV walls and cavity, RV cavity and free wall.
        v = (s >= s_top) & (s <= 0.0)
        cls[v & (n >= po) & (n < ao)] = MYO
        cls[v & (n >= pe) & (n < ae)] = BLOOD
        rv_on = (s <= self.s_rvb) & (rvw > 0.05)
        cls[v & rv_on & (n >= ao) & (n < rv)] = BLOOD
        cls[v & (rvw > 0.05) & (n >= rv) & (n < rv + 0.4)] = MYO
        cls[v & (s > self.s_rvb) & (n >= ao) & (n < ao + self.w_rv + 0.4)] = FIBROUS  # tricuspid annulus
        # Atria: ellipses below the annuli, the interatrial septum between them.
        ra_w = self.w_rv + self.an.truth.ivs_cm * 0.5
        la_c, la_h = 0.5 * (self.lat + self.n_ias), 0.5 * (self.n_ias - self.lat)
        ra_c, ra_h = self.n_ias + 0.15 + ra_w / 2, ra_w / 2
        for c, hh, aa in ((la_c, la_h, a), (ra_c, ra_h, 0.85 * a)):
            cen = s0 + aa
            r_in = np.hypot((s - cen) / aa, (n - c) / hh)
            r_in = np.where(s < cen, np.abs(n - c) / hh, r_in)  # flat toward the annulus
            r_out = np.hypot((s - cen) / (aa + 0.25), (n - c) / (hh + 0.25))
            r_out = np.where(s < cen, np.abs(n - c) / (hh + 0.25), r_out)
            at = (s > 0.0) & (s < cen + aa + 0.3)
            cls[at & (r_out < 1.0) & (cls != BLOOD)] = MYO
            cls[at & (r_in < 1.0)] = BLOOD
        cls[(s > -0.1) & (s <= 0.12) & (n >= pe - 0.3) & (n < ae + 0.3) & (cls != BLOOD)] = FIBROUS
        cls[z < self.an.chest_wall_cm] = CHEST
        return cls

    def motion(self, s: np.ndarray, n: np.ndarray, ph: float, cache: Cache | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Radial LV contraction with wall thickening, base descent toward the apex."""

        def prep() -> dict[str, np.ndarray]:
            tab = self.tab
            wlv = (1.0 - 0.7 * _smooth((s + 0.6) / 0.9)) * (s >= self.s_apex - self.t_apex - 0.5)
            pre = self.lv_prep(s, n, wlv, np.maximum(tab("ae", s), 1e-3), tab("ao", s),
                               np.minimum(tab("pe", s), -1e-3), tab("po", s), tab("rv", s) + 0.4,
                               tab("po", s) - self.an.pericardial_gap_cm)
            pre["g"] = self.descent_profile(s)
            return pre

        pre = self.cached(cache, "a4c", prep)
        return s + self.descent(ph) * pre["g"], n + self.lv_motion(pre, ph)

    def leaflets(self, ph: float) -> list[Leaflet]:
        """Mitral (septal-anterior and lateral-posterior) and tricuspid leaflets."""
        b, mo = self.b, mv_open(ph)
        la_ = 0.42 * self.an.truth.lvid_cm + 0.3
        out: list[Leaflet] = []
        ao_rv = float(self.tab("ao", np.array([self.s_rvb]))[0])
        hinges = [(0.0, b - 0.05, la_, 1.0), (0.0, -b + 0.05, 0.6 * la_, -1.0),
                  (self.s_rvb, ao_rv + 0.1, 0.8 * la_, -1.0), (self.s_rvb, ao_rv + self.w_rv - 0.1, 0.8 * la_, 1.0)]
        for hs, hn, ell, side in hinges:
            h2 = self.motion(np.array([hs]), np.array([hn]), ph)
            closed = math.pi + side * math.radians(70.0)  # pointing across the orifice
            opened = math.pi - side * math.radians(10.0)  # swung apically against the walls
            out.append((float(h2[0][0]), float(h2[1][0]), closed + (opened - closed) * mo, ell, 0.05, 3.0))
        return out

    def interfaces(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Endocardium, epicardium, pericardium, RV free wall."""
        sg, tb = self.sg, self.tables
        s_ap = self.s_apex - self.t_apex
        m = (sg >= s_ap) & (sg <= 0.0)
        mr = m & (tb["rvw"] > 0.05)
        mi = (sg >= 0.3) & (sg <= 0.3 + self.atria[1])
        return [
            (sg[m], tb["ae"][m], -5.0), (sg[m], tb["pe"][m], -5.0), (sg[m], tb["ao"][m], 2.0),
            (sg[m], tb["po"][m], 4.0), (sg[m], tb["peri"][m], 14.0), (sg[mr], tb["rv"][mr], -2.0),
            (sg[mr], tb["rv"][mr] + 0.4, 4.0), (sg[mi], np.full(mi.sum(), self.n_ias), 0.0),
        ]


class _Psax(_Heart):
    """Parasternal short axis at the papillary muscles: LV ring, RV crescent."""

    def __init__(self, an: Anatomy, plan: VideoPlan) -> None:
        super().__init__(an, plan)
        t = an.truth
        self.psi_sep = math.radians(130.0)
        self.tables = {}
        self.r_lv_sep = self.b + t.ivs_cm
        u = (math.cos(self.psi_sep), math.sin(self.psi_sep))
        d = 0.35 * self.r_lv_sep
        self.rv_c = (u[0] * d, u[1] * d)
        self.rv_r1 = self.r_lv_sep + an.rv_cm - d
        self.rv_r2 = 1.15 * self.r_lv_sep
        rot = math.radians(0.5 * plan.tilt_deg)
        es = (math.cos(rot), math.sin(rot))
        en = (math.sin(rot), -math.cos(rot))
        top = self.rv_c[1] + self.rv_r1 * 0.95 + 0.4
        x_c = 0.4 + plan.shift_x_cm
        z_c = an.chest_wall_cm + 0.3 + plan.shift_z_cm + top
        self.set_pose(x_c, z_c, es, en)

    def thickness(self, psi: np.ndarray) -> np.ndarray:
        """Wall thickness around the ring: ivs at the septum, lvpw at the inferolateral wall."""
        t = self.an.truth
        return t.lvpw_cm + (t.ivs_cm - t.lvpw_cm) * 0.5 * (1.0 + np.cos(psi - self.psi_sep))

    def _rv_r(self, s: np.ndarray, n: np.ndarray, grow: float) -> np.ndarray:
        u = (math.cos(self.psi_sep), math.sin(self.psi_sep))
        ds, dn = s - self.rv_c[0], n - self.rv_c[1]
        along, across = ds * u[0] + dn * u[1], -ds * u[1] + dn * u[0]
        return np.hypot(along / (self.rv_r1 + grow), across / (self.rv_r2 + grow))

    def classify(self, s: np.ndarray, n: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Tissue class at end-diastole."""
        rho, psi = np.hypot(s, n), np.arctan2(n, s)
        tk = self.thickness(psi)
        outer = self.b + tk
        gap = self.an.pericardial_gap_cm
        cls = np.full(s.shape, SURROUND, np.int8)
        rv_in, rv_out = self._rv_r(s, n, 0.0), self._rv_r(s, n, 0.4)
        peri = outer + gap
        cls[(rho >= peri + 0.2) & (n < 0.3 * self.b)] = DEEP
        cls[(rho >= outer) & (rho < peri)] = GAP
        cls[(rho >= peri) & (rho < peri + 0.2)] = PERI
        cls[rv_out < 1.0] = MYO
        cls[(rv_in < 1.0) & (rho >= outer)] = BLOOD
        cls[rho < outer] = MYO
        cls[rho < self.b] = BLOOD
        # Papillary muscles, against the wall at about 4 and 8 o'clock.
        rp = 0.2 * self.b + 0.15
        for ang in (-20.0, -140.0):
            a = math.radians(ang)
            c = (self.b - 0.6 * rp) * math.cos(a), (self.b - 0.6 * rp) * math.sin(a)
            cls[np.hypot(s - c[0], n - c[1]) < rp] = MYO
        cls[z < self.an.chest_wall_cm] = CHEST
        return cls

    def motion(self, s: np.ndarray, n: np.ndarray, ph: float, cache: Cache | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Concentric contraction with thickening and a small systolic twist."""
        gap = self.an.pericardial_gap_cm

        def prep() -> dict[str, np.ndarray]:
            rho, psi = np.hypot(s, n), np.arctan2(n, s)
            outer = self.b + self.thickness(psi)
            zero = np.zeros_like(rho)
            idx, t = _segments(rho, [zero, zero + self.b, outer, outer + gap, outer + gap + 3.0])
            twist = np.clip(1.0 - (rho - outer).clip(0.0) / 2.0, 0.0, 1.0)
            return {"rho": rho, "psi": psi, "outer": outer, "idx": idx, "t": t, "twist": twist}

        pre = self.cached(cache, "psax", prep)
        c = contraction(ph)
        rho, psi, outer = pre["rho"], pre["psi"], pre["outer"]
        b2 = self.b * (1.0 - self.fs * c)
        o2 = np.sqrt(outer**2 - self.b**2 + b2**2)
        zero = np.zeros_like(rho)
        vals = [zero, zero + (b2 - self.b), o2 - outer, 0.3 * (o2 - outer), zero]
        rho2 = rho + _interp_segments((pre["idx"], pre["t"]), vals)
        ang = psi + math.radians(4.0) * c * pre["twist"]
        return rho2 * np.cos(ang), rho2 * np.sin(ang)

    def interfaces(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Endocardium, epicardium, pericardium, RV free wall."""
        psi = np.linspace(-math.pi, math.pi, 721)
        out = self.b + self.thickness(psi)
        gap = self.an.pericardial_gap_cm
        res = [(self.b * np.cos(psi), self.b * np.sin(psi), -5.0), (out * np.cos(psi), out * np.sin(psi), 3.0),
               ((out + gap) * np.cos(psi), (out + gap) * np.sin(psi), 14.0)]
        u = (math.cos(self.psi_sep), math.sin(self.psi_sep))
        for grow, db in ((0.0, -2.0), (0.4, 4.0)):
            ca, sa = np.cos(psi) * (self.rv_r1 + grow), np.sin(psi) * (self.rv_r2 + grow)
            s = self.rv_c[0] + ca * u[0] - sa * u[1]
            n = self.rv_c[1] + ca * u[1] + sa * u[0]
            keep = np.hypot(s, n) > self.b + self.thickness(np.arctan2(n, s)) + 0.1
            res.append((s[keep], n[keep], db))
        return res


_VIEWS: dict[str, type[_Heart]] = {"plax": _Plax, "a4c": _A4c, "psax": _Psax}


def _heart(an: Anatomy, plan: VideoPlan) -> _Heart:
    if plan.view not in _VIEWS:
        raise ValueError(f'Argument "plan.view" must be one of {", ".join(_VIEWS)}, got {plan.view!r}')
    return _VIEWS[plan.view](an, plan)


def sector_geometry(plan: VideoPlan, rows: int, cols: int) -> Geometry:
    """Renderer C's sector layout: apex near the top centre, room for an ECG strip.

    Parameters
    ----------
    plan : VideoPlan
        Depth and sector angle.
    rows, cols : int
        Image size.

    Returns
    -------
    Geometry
        Isotropic pixel size chosen so that the whole sector fits; the beam
        grid (``n_r``, ``n_th``) is the one :func:`render_video` forms.
    """
    half = math.radians(plan.angle_deg / 2.0)
    sector_px = min(0.86 * rows, 0.47 * cols / math.sin(half))
    delta = plan.depth_cm / sector_px
    n_r, n_th, _ = _beam_grid(plan, delta, cols)
    return Geometry(rows=rows, cols=cols, apex_row=int(round(0.045 * rows)), apex_col=cols // 2,
                    depth_cm=plan.depth_cm, angle_deg=plan.angle_deg, delta_cm=delta, n_r=n_r, n_th=n_th)


def _beam_grid(plan: VideoPlan, delta_cm: float, cols: int) -> tuple[int, int, float]:
    """Samples per beam, beams, and the simulated RF period (cm of depth).

    The echo's depth period is half a wavelength (0.031 cm at 2.5 MHz).  It is
    simulated at a lower frequency (2.4 times the period, and never under 1.35
    pixels) so that speckle survives scan conversion and the sampling stays
    cheap; 3.2 samples per period keep the pulse's band under Nyquist.
    """
    period = max(2.4 * 0.0308 * 2.5 / plan.freq_mhz, 1.35 * delta_cm)
    n_r = int(math.ceil(plan.depth_cm / (period / 3.2)))
    n_th = int(np.clip(round(cols * 0.3 * plan.angle_deg / 80.0), 64, 256))
    return n_r, n_th, period


def _grey_lut(plan: VideoPlan) -> np.ndarray:
    """Renderer C's grey map on [0, 1] (1024 entries): a rounded knee and shoulder.

    Piecewise linear: a dark toe up to the knee (placed from ``plan.gamma``: a
    harder map has its knee further right and lower), a steep mid-range, a
    soft shoulder; then smoothed so the corners are rounded.
    """
    g = float(np.clip(plan.gamma, 1.2, 3.5))
    kx = 0.30 + 0.09 * (g - 2.2)
    ky = 0.075 - 0.025 * (g - 2.2)
    sx, sy = 0.90, 0.93
    x = np.linspace(0.0, 1.0, 1024)
    y = np.interp(x, [0.0, kx, sx, 1.0], [0.0, ky, sy, 1.0])
    k = np.ones(41) / 41.0
    y = np.convolve(np.pad(y, 20, mode="edge"), k, mode="valid")
    y[0] = 0.0
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """A smooth random profile of ``n`` values, unit variance, correlation length ``corr`` samples."""
    w = rng.standard_normal(n + 6 * int(corr) + 2)
    k = np.exp(-0.5 * (np.arange(-3 * int(corr), 3 * int(corr) + 1) / max(corr, 1e-3)) ** 2)
    y = np.convolve(w, k / np.sqrt((k**2).sum()), mode="valid")[:n]
    return y


class _Scatterers:
    """The tissue scatterers of one video: reference positions, class, two amplitude draws."""

    def __init__(self, heart: _Heart, plan: VideoPlan, rng: np.random.Generator, density: float) -> None:
        half = math.radians(plan.angle_deg / 2.0) + math.radians(4.0)
        area = half * plan.depth_cm**2
        count = int(density * area)
        # Uniform in area over the sector (plus a lateral margin): r ~ depth*sqrt(u).
        r = plan.depth_cm * np.sqrt(rng.random(count))
        th = rng.uniform(-half, half, count)
        x, z = r * np.sin(th), r * np.cos(th)
        s, n = heart.from_image(x, z)
        cls = heart.classify(s, n, z)
        db = _BACKSCATTER_DB[cls]
        spread = _SPREAD[cls]
        sigma = 10.0 ** (db / 20.0)
        a1 = sigma * np.exp(spread * rng.standard_normal(count)) * rng.choice([-1.0, 1.0], count)
        a2 = sigma * np.exp(spread * rng.standard_normal(count)) * rng.choice([-1.0, 1.0], count)
        self.s, self.n, self.cls, self.a1, self.a2 = s, n, cls, a1, a2
        self.atten = _ATTEN_REL[cls]
        self.blood = cls == BLOOD
        self.static = (cls == CHEST) | (z < 0.6)  # fixed to the probe
        self.x0, self.z0 = x, z


def render_video(an: Anatomy, plan: VideoPlan, rows: int = 480, cols: int = 640,
                 header: dict[str, str] | None = None) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Render one video with renderer C (moving scatterers, beamformed RF).

    Parameters
    ----------
    an : Anatomy
        The heart; only sizes are read from its truth (and calcification as
        leaflet echogenicity), never a label.
    plan : VideoPlan
        View, geometry, timing and image quality.
    rows, cols : int
        Image size.
    header : dict of str to str, optional
        ``initials`` and ``date`` burned into the image.

    Returns
    -------
    frames : numpy.ndarray
        ``(plan.frames, rows, cols, 3)`` uint8 RGB.
    geometry : Geometry
        The sector as drawn (apex pixel, isotropic cm per pixel).
    phases : numpy.ndarray
        ``(plan.frames,)`` cardiac phase of each frame, 0 = end-diastole.
    """
    header = {**_DEFAULT_HEADER, **(header or {})}
    geo = sector_geometry(plan, rows, cols)
    heart = _heart(an, plan)
    seq = np.random.SeedSequence([(plan.noise_seed ^ _SEED_SALT) & 0xFFFFFFFF, (plan.noise_seed >> 32) & 0xFFFFFFFF,
                                  0xC])
    rng = np.random.default_rng(seq)
    times = np.arange(plan.frames) / plan.fps
    phases = (plan.phase0 + times * plan.heart_rate_bpm / 60.0) % 1.0
    beams = _Beamformer(heart, plan, geo, rng)
    polar = np.stack([beams.frame(float(ph), k) for k, ph in enumerate(phases)])
    frames = _scan_convert(polar, plan, geo)
    _overlay(frames, plan, geo, header, times, phases)
    return frames, geo, phases.astype(np.float64)


class _Beamformer:
    """Forms the display-ready polar image of each frame (grey 0..1 on the beam grid)."""

    def __init__(self, heart: _Heart, plan: VideoPlan, geo: Geometry, rng: np.random.Generator) -> None:
        self.heart, self.plan, self.geo = heart, plan, geo
        q = float(np.clip(plan.quality, 0.0, 1.0))
        self.q = q
        n_r, n_th, period = _beam_grid(plan, geo.delta_cm, geo.cols)
        self.n_r, self.n_th, self.period = n_r, n_th, period
        self.dr = plan.depth_cm / (n_r - 1)
        self.half = math.radians(plan.angle_deg / 2.0)
        self.dth = 2.0 * self.half / (n_th - 1)
        self.pad = 14
        self.r = np.arange(n_r) * self.dr
        psf = max(plan.psf_scale, 0.3)
        # Scatterers: about 7 per axial-lateral resolution cell at the focus.
        w_focus = 0.26 * psf * math.sqrt(2.5 / plan.freq_mhz) * (period / 0.074) ** 0.5
        self.w_focus = w_focus
        density = 7.0 / (w_focus * 1.2 * period * psf)
        self.density = density
        self.sc = _Scatterers(heart, plan, rng, density)
        self.rng = rng
        self.leaf_uv = [(rng.random(260), rng.random(260) - 0.5, rng.standard_normal(260)) for _ in range(4)]
        self.sc_cache: Cache = {}
        spec = self._interfaces(rng)
        self.spec_s = np.concatenate([p[0] for p in spec])
        self.spec_n = np.concatenate([p[1] for p in spec])
        self.spec_amp = np.concatenate([p[2] for p in spec])
        # The tangent is taken along the concatenated strings: mute the joints.
        self.spec_join = np.ones(len(self.spec_s))
        ends = np.cumsum([len(p[0]) for p in spec])
        self.spec_join[np.clip(np.concatenate([ends - 1, ends[:-1]]), 0, len(self.spec_s) - 1)] = 0.0
        self.spec_cache: Cache = {}
        self._kernels(psf)
        self._pulse(psf)
        self._propagation(rng)

    # -- set-up --
    def _interfaces(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Resample each interface at equal arc steps, with per-point roughness."""
        out = []
        for s, n, db in self.heart.interfaces():
            if len(s) < 2:
                continue
            seg = np.hypot(np.diff(s), np.diff(n))
            arc = np.concatenate([[0.0], np.cumsum(seg)])
            m = max(int(arc[-1] / _SPEC_STEP_CM), 2)
            a = np.linspace(0.0, arc[-1], m)
            ss, nn = np.interp(a, arc, s), np.interp(a, arc, n)
            amp = 10.0 ** (db / 20.0) * np.exp(0.35 * rng.standard_normal(m))
            nn = nn + 0.012 * rng.standard_normal(m)  # rough surface: partly coherent
            out.append((ss, nn, amp))
        return out

    def _kernels(self, psf: float) -> None:
        """Two-way sinc**2 beam profiles for a few depths; width grows off the focus."""
        plan = self.plan
        self.r_focus = 0.55 * plan.depth_cm
        z_r = 3.2 + 1.5 * plan.freq_mhz / 2.5
        centres = np.geomspace(1.0, plan.depth_cm, 6)
        ks = []
        for rc in centres:
            w = self.w_focus * math.sqrt(1.0 + ((rc - self.r_focus) / z_r) ** 2)
            w_beams = w / (rc * self.dth)
            j = np.arange(-self.pad, self.pad + 1)
            # Two-way response of a uniform aperture: sinc**2, first side lobes at -26 dB
            # (a poor window widens it through plan.psf_scale).
            k = np.sinc(j / max(w_beams, 0.7)) ** 2
            ks.append((k / np.sqrt((k**2).sum())).astype(np.float32))
        self.k_centres, self.k_lat = centres, ks
        idx = np.interp(self.r, centres, np.arange(len(centres)))
        self.k_w = [np.clip(1.0 - np.abs(idx - i), 0.0, 1.0).astype(np.float32)[:, None] for i in range(len(ks))]

    def _pulse(self, psf: float) -> None:
        """Spectrum of the real RF pulse times the analytic-signal mask."""
        p = self.period
        sigma = 0.62 * p * psf * (1.25 - 0.25 * self.q)
        n_fft = cv2.getOptimalDFTSize(self.n_r + int(4 * sigma / self.dr) + 4)  # the pulse's tail must not wrap
        self.n_fft = n_fft
        x = (np.arange(n_fft) - n_fft // 2) * self.dr
        pulse = np.exp(-0.5 * (x / sigma) ** 2) * np.cos(2.0 * math.pi * x / p)
        spec = np.fft.fft(np.fft.ifftshift(pulse))
        mask = np.zeros(n_fft)
        mask[0] = 1.0
        mask[1:n_fft // 2] = 2.0
        mask[n_fft // 2] = 1.0
        self.h_axial = (spec * mask).astype(np.complex64)[:, None]
        # Expected envelope of unit myocardium: normalises depth (diffraction compensation).
        e_ax = float((np.abs(np.fft.ifft(spec * mask)) ** 2).sum())
        e_lat = sum(w[:, 0] * float((k**2).sum()) for w, k in zip(self.k_w, self.k_lat, strict=True))
        cell = self.density * np.maximum(self.r, 0.3) * self.dr * self.dth
        self.ref = np.sqrt(cell * e_ax * e_lat).astype(np.float32)[:, None]

    def _propagation(self, rng: np.random.Generator) -> None:
        """Depth/beam gains fixed for the video: TGC, gain, rib shadow, dropout, clutter."""
        plan, r, q = self.plan, self.r, self.q
        # A coherent string of reflectors this strong per point matches diffuse myocardium at 0 dB.
        self.spec_unit = _SPEC_STEP_CM * math.sqrt(self.density * self.period / self.w_focus) * 0.5
        th = -self.half + np.arange(self.n_th) * self.dth
        self.th = th
        self.ff = (plan.freq_mhz / 2.5) ** 0.5
        loss_nominal = 2.0 * plan.atten_db_per_cm * self.ff * r
        knots = np.linspace(0.0, plan.depth_cm, len(plan.tgc_db)) if plan.tgc_db else np.array([0.0])
        tgc_knots = np.interp(r, knots, np.asarray(plan.tgc_db or (0.0,), dtype=float))
        self.tgc_db = (0.85 * loss_nominal + tgc_knots + plan.gain_db).astype(np.float32)
        # Element directivity: edge beams are weaker.
        directivity = np.cos(th) ** 1.5
        # Dropout with a poor window: smooth dips across the beams.
        dip = np.clip(_smooth_noise(rng, self.n_th, self.n_th / 14) - 0.3, 0.0, None)
        drop_db = -14.0 * (1.0 - q) ** 1.5 * dip
        beam_db = 20 * np.log10(directivity) + drop_db
        # Rib shadow: a wedge of beams blocked under the rib, soft-edged.
        self.rib: tuple[float, float, float] | None = None
        shadow = np.zeros((self.n_r, self.n_th), np.float32)
        if plan.shadow_width_deg > 0.0:
            c, w = math.radians(plan.shadow_deg), math.radians(plan.shadow_width_deg)
            inside = _smooth((w / 2 - np.abs(th - c)) / math.radians(2.0) + 0.5)
            r_rib = 0.55 * self.heart.an.chest_wall_cm + 0.35
            self.rib = (c, w, r_rib)
            below = _smooth((r - r_rib) / 0.3)[:, None]
            shadow = (-22.0 * below * inside[None, :]).astype(np.float32)
        self.static_db = np.pad(shadow + beam_db[None, :].astype(np.float32), ((0, 0), (self.pad, self.pad)),
                                mode="edge")
        self.tgc_lin = (10.0 ** (self.tgc_db / 20.0)).astype(np.float32)[:, None]
        self.expected = (self.density * np.maximum(self.r, 1.2)[:, None] * self.dr * self.dth).astype(np.float32)
        self.noise_level = 10.0 ** ((-plan.dynamic_range_db + 14.0 - 6.0 * q - 0.6 * plan.gain_db) / 20.0)
        # Clutter scatterers fixed to the probe: near-field haze, worse in a poor window.
        n_h = int(0.35 * self.density * self.half * plan.depth_cm**2)
        rh = plan.depth_cm * np.sqrt(rng.random(n_h))
        haze_db = -26.0 + 13.0 * (1.0 - q) + 6.0 * plan.reverb - 1.2 * rh * (0.6 + 0.6 * q)
        self.haze = (rh, rng.uniform(-self.half - 0.05, self.half + 0.05, n_h),
                     10.0 ** (haze_db / 20.0) * rng.standard_normal(n_h), rng.standard_normal(n_h))
        # Reverberation arcs: multiples of the strong fascia interface in the chest wall.
        d0 = 0.6 * self.heart.an.chest_wall_cm + 0.2
        arcs = []
        for k in range(1, 6):
            m = int(2 * self.half * k * d0 / _SPEC_STEP_CM) + 2
            tha = np.linspace(-self.half, self.half, m)
            mod = np.exp(0.8 * _smooth_noise(rng, m, m / 8))
            amp_db = 10.0 if k == 1 else 10.0 + 20 * math.log10(max(plan.reverb, 0.02)) - 4.5 * (k - 1)
            arcs.append((k * d0 + 0.02 * rng.standard_normal(m), tha, 10.0 ** (amp_db / 20.0) * mod))
        # Chest wall layers (skin, fat, muscle): static, gently wavy, specular.
        for frac in (0.15, 0.45, 0.85):
            m = int(2 * self.half * frac * 3.0 / _SPEC_STEP_CM) + 40
            tha = np.linspace(-self.half - 0.05, self.half + 0.05, m)
            depth = frac * self.heart.an.chest_wall_cm + 0.08 * _smooth_noise(rng, m, m / 6)
            arcs.append((depth / np.maximum(np.cos(tha), 0.3), tha, 10.0 ** (6.0 / 20.0) * np.exp(
                0.5 * _smooth_noise(rng, m, 6.0))))
        if self.rib is not None:
            c, w, r_rib = self.rib
            m = int(w * r_rib / _SPEC_STEP_CM) + 2
            tha = np.linspace(c - w / 2, c + w / 2, m)
            arcs.append((r_rib + 0.05 * np.cos((tha - c) / w * math.pi), tha, np.full(m, 10.0 ** (16.0 / 20.0))))
        self.arc_r = np.concatenate([a[0] for a in arcs])
        self.arc_th = np.concatenate([a[1] for a in arcs])
        self.arc_a = np.concatenate([a[2] for a in arcs]) * self.spec_unit

    # -- per frame --
    def _splat(self, r: np.ndarray, th: np.ndarray, amp: np.ndarray) -> np.ndarray:
        """Bilinear splat of point echoes onto the padded beam grid."""
        w_cols = self.n_th + 2 * self.pad
        fr = r / self.dr
        ft = (th + self.half) / self.dth + self.pad
        ok = (fr >= 0) & (fr < self.n_r - 1) & (ft >= 0) & (ft < w_cols - 1)
        fr, ft, amp = fr[ok], ft[ok], amp[ok]
        i, j = fr.astype(np.int64), ft.astype(np.int64)
        a, b = fr - i, ft - j
        base = i * w_cols + j
        idx = np.concatenate([base, base + 1, base + w_cols, base + w_cols + 1])
        wts = np.concatenate([(1 - a) * (1 - b) * amp, (1 - a) * b * amp, a * (1 - b) * amp, a * b * amp])
        return np.bincount(idx, wts, minlength=self.n_r * w_cols).reshape(self.n_r, w_cols).astype(np.float32)

    def _spec_amp(self, x: np.ndarray, z: np.ndarray, amp: np.ndarray) -> np.ndarray:
        """Angle-dependent specular amplitude of an ordered string of interface points."""
        tx, tz = np.gradient(x), np.gradient(z)
        tl = np.hypot(tx, tz) + 1e-9
        rr = np.hypot(x, z) + 1e-9
        # |cos| between the beam and the interface normal = |sin| between beam and tangent.
        cos_n = np.abs(tx * z - tz * x) / (tl * rr)
        return amp * cos_n**_SPEC_P * self.spec_unit

    def frame(self, ph: float, k: int) -> np.ndarray:
        """The envelope (n_r, n_th) of the frame at phase ``ph``, after TGC."""
        heart, sc, plan = self.heart, self.sc, self.plan
        c = contraction(ph)
        s, n = heart.motion(sc.s, sc.n, ph, self.sc_cache)
        # Blood flows: its scatterers jitter from frame to frame.
        nb = int(sc.blood.sum())
        s, n = s.copy(), n.copy()
        s[sc.blood] += 0.05 * self.rng.standard_normal(nb)
        n[sc.blood] += 0.05 * self.rng.standard_normal(nb)
        x, z = heart.to_image(s, n)
        x = np.where(sc.static, sc.x0, x)
        z = np.where(sc.static, sc.z0, z)
        # Out-of-plane motion: amplitudes decorrelate partly with the contraction.
        a = 0.9 * c
        echo_r, echo_th, echo_a = [np.hypot(x, z)], [np.arctan2(x, z)], [sc.a1 * math.cos(a) + sc.a2 * math.sin(a)]
        att_r, att_th, att_a = [echo_r[0]], [echo_th[0]], [sc.atten]
        # Valve leaflets: scatterers on the posed leaflet plus specular faces.
        calc = heart.an.truth.av_calcification
        for li, (hs, hn, ang, ell, hh, db) in enumerate(heart.leaflets(ph)):
            u, v, g = self.leaf_uv[li % 4]
            cu, su = math.cos(ang), math.sin(ang)
            lx, lz = heart.to_image(hs + u * ell * cu - v * 2 * hh * su, hn + u * ell * su + v * 2 * hh * cu)
            cnt = self.density * ell * 2 * hh
            lr, lt = np.hypot(lx, lz), np.arctan2(lx, lz)
            echo_r.append(lr)
            echo_th.append(lt)
            echo_a.append(10.0 ** (db / 20.0) * math.sqrt(max(cnt, 1.0) / len(u)) * g)
            # Calcium is dense and attenuating: a calcified cusp shadows a little.
            is_av = li < 2 and plan.view == "plax"
            a_rel = _ATTEN_REL[LEAFLET] * (1.0 + (25.0 * calc if is_av else 0.0))
            att_r.append(lr)
            att_th.append(lt)
            att_a.append(np.full(len(u), a_rel * cnt / len(u)))
            m = max(int(ell / _SPEC_STEP_CM), 2)
            uu = np.linspace(0.0, 1.0, m)
            for side in (-1.0, 1.0):
                fx, fz = heart.to_image(hs + uu * ell * cu - side * hh * su, hn + uu * ell * su + side * hh * cu)
                echo_r.append(np.hypot(fx, fz))
                echo_th.append(np.arctan2(fx, fz))
                echo_a.append(self._spec_amp(fx, fz, np.full(m, 10.0 ** ((db + 2.0) / 20.0))))
        # Specular interfaces of the tissue, moved with it.
        s2, n2 = heart.motion(self.spec_s, self.spec_n, ph, self.spec_cache)
        fx, fz = heart.to_image(s2, n2)
        echo_r.append(np.hypot(fx, fz))
        echo_th.append(np.arctan2(fx, fz))
        echo_a.append(self._spec_amp(fx, fz, self.spec_amp) * self.spec_join)
        # Probe-fixed clutter, slowly decorrelating, and reverberation arcs.
        rh, thh, ah, bh = self.haze
        drift = 0.15 * k
        echo_r += [rh, self.arc_r]
        echo_th += [thh, self.arc_th]
        echo_a += [ah * math.cos(drift) + np.abs(ah) * bh * math.sin(drift), self.arc_a]
        grid = self._splat(np.concatenate(echo_r), np.concatenate(echo_th), np.concatenate(echo_a))
        att = self._splat(np.concatenate(att_r), np.concatenate(att_th), np.concatenate(att_a))
        # Attenuation integrated along each beam through the tissue crossed.
        frac = np.clip(att / self.expected, 0.0, 40.0)
        frac = cv2.blur(frac, (5, 9))
        loss = (2.0 * plan.atten_db_per_cm * self.ff * self.dr) * np.cumsum(frac, axis=0)
        grid *= (10.0 ** ((self.static_db - loss) / 20.0)).astype(np.float32)
        # Lateral beam profile (depth-dependent sinc**2), then pulse + Hilbert along depth.
        lat = np.zeros_like(grid)
        for w, kern in zip(self.k_w, self.k_lat, strict=True):
            lat += w * cv2.filter2D(grid, -1, kern[None, :], borderType=cv2.BORDER_CONSTANT)
        lat = lat[:, self.pad:self.pad + self.n_th]
        spec = np.fft.rfft(lat, n=self.n_fft, axis=0)
        full = np.zeros((self.n_fft, self.n_th), np.complex64)
        full[: spec.shape[0]] = spec * self.h_axial[: spec.shape[0]]
        analytic = np.fft.ifft(full, axis=0)[: self.n_r] / self.ref
        noise = self.noise_level * (self.rng.standard_normal(analytic.shape, np.float32)
                                    + 1j * self.rng.standard_normal(analytic.shape, np.float32))
        env = np.abs(analytic + noise) * self.tgc_lin
        return env.astype(np.float32)



def _scan_convert(env: np.ndarray, plan: VideoPlan, geo: Geometry) -> np.ndarray:
    """Log-compress, grey-map and scan-convert envelope frames to RGB images."""
    t, n_r, n_th = env.shape
    rows, cols = geo.rows, geo.cols
    # Decimate along depth to about 1.3 samples per pixel before interpolating.
    n_d = int(min(n_r, max(16, round(1.3 * geo.sector_px))))
    lut = _grey_lut(plan)
    dr_db = float(plan.dynamic_range_db)
    top_db = 25.0
    cc, rr = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    x = (cc - geo.apex_col) * geo.delta_cm
    z = (rr - geo.apex_row) * geo.delta_cm
    r = np.hypot(x, z)
    th = np.arctan2(x, z)
    half = math.radians(plan.angle_deg / 2.0)
    map_y = (r / plan.depth_cm * (n_d - 1)).astype(np.float32)
    map_x = ((th + half) / (2 * half) * (n_th - 1)).astype(np.float32)
    # Antialiased sector mask: a curved top at the transducer face, sharp sides.
    px = geo.delta_cm
    inside = np.minimum.reduce([
        (plan.depth_cm - r) / px, (r - _R_TOP_CM) / px, (half - np.abs(th)) * r / px,
    ])
    mask = np.clip(inside + 0.5, 0.0, 1.0).astype(np.float32)
    tint = np.array([1.0, 0.965, 0.9], np.float32)
    out = np.empty((t, rows, cols, 3), np.uint8)
    for k in range(t):
        e = cv2.resize(env[k], (n_th, n_d), interpolation=cv2.INTER_AREA)
        db = 20.0 * np.log10(e + 1e-6)
        xg = np.clip((db - (top_db - dr_db)) / dr_db, 0.0, 1.0)
        g = lut[(xg * 1023).astype(np.int32)]
        img = cv2.remap(g, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        img *= mask
        out[k] = np.clip(img[..., None] * tint * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _overlay(frames: np.ndarray, plan: VideoPlan, geo: Geometry, header: dict[str, str], times: np.ndarray,
             phases: np.ndarray) -> None:
    """Burn in text, a depth ruler with the focus marker, and an ECG sweep (in place)."""
    t, rows, cols, _ = frames.shape
    scale = rows / 480.0
    fs = 0.85 * scale
    th = max(1, int(round(scale)))
    col = tuple(int(c) for c in plan.vendor.text_rgb)
    dim = tuple(int(0.7 * c) for c in col)
    # Text layout: scanner and study top-left, patient top-right, settings under them.
    lines_l = [plan.vendor.model, f"{plan.freq_mhz:.1f}MHz  {plan.fps}Hz"]
    lines_r = [header["initials"], header["date"]]
    ruler_x = min(cols - 1 - int(10 * scale) - 4, int(geo.apex_col + geo.half_width_px + 8 * scale) + 3)
    static = np.zeros((rows, cols, 3), np.uint8)
    y = int(16 * scale) + 2
    for i, s in enumerate(lines_l):
        cv2.putText(static, s, (int(6 * scale), y + int(i * 15 * scale)), cv2.FONT_HERSHEY_PLAIN, fs, col, th,
                    cv2.LINE_AA)
    for i, s in enumerate(lines_r):
        (w, _), _ = cv2.getTextSize(s, cv2.FONT_HERSHEY_PLAIN, fs, th)
        cv2.putText(static, s, (cols - w - int(6 * scale), y + int(i * 15 * scale)), cv2.FONT_HERSHEY_PLAIN, fs,
                    col, th, cv2.LINE_AA)
    # Depth ruler: a dot each cm, a bar each 5 cm, a small triangle at the focus.
    for d in range(0, int(plan.depth_cm) + 1):
        yy = int(round(geo.apex_row + d / geo.delta_cm))
        if yy >= rows:
            break
        rad = max(1, int(round(1.5 * scale))) if d % 5 else max(2, int(round(2.5 * scale)))
        cv2.circle(static, (ruler_x, yy), rad, dim, -1)
    yf = int(round(geo.apex_row + 0.55 * plan.depth_cm / geo.delta_cm))
    tri = np.array([[ruler_x + 3, yf], [ruler_x + 3 + int(7 * scale) + 2, yf - int(4 * scale) - 1],
                    [ruler_x + 3 + int(7 * scale) + 2, yf + int(4 * scale) + 1]], np.int32)
    cv2.fillConvexPoly(static, tri, col, cv2.LINE_AA)
    text_mask = static.max(axis=2) > 0
    frames[:, text_mask] = static[text_mask]
    # ECG sweep along the bottom: 2.5 s across, erased just ahead of the cursor.
    y0, amp = int(rows * 0.955), rows * 0.03
    x0, x1 = int(cols * 0.08), int(cols * 0.92)
    span = 2.5
    xs = np.arange(x0, x1)
    ecg_col = tuple(int(c) for c in plan.vendor.ecg_rgb)
    rate = plan.heart_rate_bpm / 60.0
    for k in range(t):
        tk = float(times[k])
        sweep0 = math.floor(tk / span) * span
        tx = sweep0 + (xs - x0) / (x1 - x0) * span
        tx = np.where(tx > tk, tx - span, tx)  # right of the cursor: the previous sweep
        keep = np.abs(tx - (tk - span)) > 0.06 * span
        ph = (plan.phase0 + tx * rate) % 1.0
        yv = y0 - amp * ecg_wave(ph)
        pts = np.stack([xs, yv], axis=1).astype(np.int32)
        seg_start = 0
        for i in range(1, len(xs) + 1):
            if i == len(xs) or keep[i] != keep[seg_start]:
                if keep[seg_start] and i - seg_start > 1:
                    cv2.polylines(frames[k], [pts[seg_start:i]], False, ecg_col, th, cv2.LINE_AA)
                seg_start = i


def plax_measure_line(an: Anatomy, plan: VideoPlan, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Image points (col, row) of the PLAX wall-measuring line, 1/8 pixel apart.

    The line crosses the LV long axis perpendicularly at :data:`MEASURE_LEVEL_CM`
    from the annulus, from 3 cm in front of the septum to 3 cm behind the
    posterior wall; it goes from anterior to posterior.
    """
    heart = _heart(an, plan)
    geo = sector_geometry(plan, rows, cols)
    t = an.truth
    top = heart.b + t.ivs_cm + 3.0
    bottom = -heart.b - t.lvpw_cm - 3.0
    n = np.arange(top, bottom, -geo.delta_cm / 8.0)
    s = np.full_like(n, -MEASURE_LEVEL_CM)
    x, z = heart.to_image(s, n)
    return geo.to_pixel(x, z)


def plax_valve_line(an: Anatomy, plan: VideoPlan, rows: int, cols: int,
                    phase: float = MID_SYSTOLE_PHASE) -> tuple[np.ndarray, np.ndarray]:
    """Image points (col, row) across the aortic root through the cusps' free edges.

    Perpendicular to the root at the level of the cusp tips at ``phase``,
    from the anterior root wall to the posterior one, 1/8 pixel apart.
    """
    heart = _heart(an, plan)
    if not isinstance(heart, _Plax):
        raise ValueError(f'Argument "plan.view" must be "plax", got {plan.view!r}')
    geo = sector_geometry(plan, rows, cols)
    hs, _, ang, ell, _, _ = heart.leaflets(phase)[0]
    s_tip = hs + ell * math.cos(ang)
    n = np.arange(heart.n_top + 0.5, heart.n_bot - 0.5, -geo.delta_cm / 8.0)
    x, z = heart.to_image(np.full_like(n, s_tip), n)
    return geo.to_pixel(x, z)


def tissue_map(an: Anatomy, plan: VideoPlan, rows: int, cols: int, phase: float = 0.0,
               points: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The tissue class (index into :data:`TISSUES`) renderer C draws at each pixel.

    The tissue is the end-diastolic one (exact at phase 0, the frame the wall
    labels are defined in); the valve leaflets are posed at ``phase``, so the
    cusp separation can be read at mid-systole.

    Parameters
    ----------
    an, plan : Anatomy, VideoPlan
        As for :func:`render_video`.
    rows, cols : int
        Image size.
    phase : float
        Cardiac phase of the leaflets.
    points : tuple of numpy.ndarray, optional
        Image ``(col, row)`` coordinates to classify instead of every pixel centre.

    Returns
    -------
    numpy.ndarray
        int8 classes, ``(rows, cols)`` or the shape of ``points``; -1 outside the sector.
    """
    heart = _heart(an, plan)
    geo = sector_geometry(plan, rows, cols)
    if points is None:
        cc, rr = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float))
    else:
        cc, rr = np.asarray(points[0], float), np.asarray(points[1], float)
    x, z = (cc - geo.apex_col) * geo.delta_cm, (rr - geo.apex_row) * geo.delta_cm
    s, n = heart.from_image(x, z)
    cls = heart.classify(s, n, z)
    for hs, hn, ang, ell, hh, _ in heart.leaflets(phase):
        d = np.array([math.cos(ang), math.sin(ang)])
        u = np.clip((s - hs) * d[0] + (n - hn) * d[1], 0.0, ell)
        dist = np.hypot(s - hs - u * d[0], n - hn - u * d[1])
        cls[dist <= hh] = LEAFLET
    r, th = np.hypot(x, z), np.arctan2(x, z)
    outside = (r > plan.depth_cm) | (r < _R_TOP_CM) | (np.abs(th) > math.radians(plan.angle_deg / 2))
    cls[outside] = -1
    return cls
