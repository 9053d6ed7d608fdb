"""Renderer C's heart models: each view's tissue boundaries, motion, valves and pose.

Part of :mod:`train.synth.render_scatter` (see its independence rule).  A view
is an analytic heart in its own frame (long axis ``s``, perpendicular ``n``,
in cm) placed in the image; it classifies points into the tissue classes of
:data:`TISSUES` at end-diastole, moves them through the cardiac cycle and
poses the valve leaflets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import Anatomy, av_open, contraction, mv_open

TISSUES = ("blood", "myocardium", "chest_wall", "surround", "pericardial_space", "pericardium", "deep",
           "fibrous", "leaflet")
"""Tissue classes of :func:`train.synth.render_scatter.tissue_map`, by index."""
BLOOD, MYO, CHEST, SURROUND, GAP, PERI, DEEP, FIBROUS, LEAFLET = range(9)
"""Indices into :data:`TISSUES` of each tissue class."""

MEASURE_LEVEL_CM = 2.6
"""PLAX: distance from the mitral annulus toward the apex where the walls are measured."""

Leaflet = tuple[float, float, float, float, float, float]
"""A posed valve leaflet: hinge ``s, n``, direction angle (rad, in the ``s, n`` plane),
length, half thickness (cm), extra echogenicity (dB)."""


def smooth(t: np.ndarray) -> np.ndarray:
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


class Heart:
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


class Plax(Heart):
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
        sm = smooth((sg + 1.5) / (self.s_av + 1.5))  # LVOT: septum turns into the root wall
        n_ae = np.where(sg < -1.5, hb, b + (n_top - b) * sm) + bulge
        n_ao_out = np.where(sg < -1.5, ba, (b + t.ivs_cm) + (n_top + self.w_ao - b - t.ivs_cm) * sm) + bulge
        # Posterior LV wall: straight to 1.2 cm from the annulus, then down into the AV groove.
        self.n_ah = n_bot - self.w_ao / 2  # anterior mitral hinge (aorto-mitral continuity)
        self.n_ph = min(-b, max(-b - 0.9, self.n_ah - 2.8))  # posterior mitral hinge
        dip = (self.n_ph + b) * smooth((sg + 1.2) / 1.2)
        n_pe = np.where(sg < self.s_cap, -hb, -b + dip)
        taper = 1.0 - 0.45 * smooth((sg + 0.6) / 0.6) * (1.0 - 0.4 / max(t.lvpw_cm, 0.4))
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
            wlv = (1.0 - smooth((s + 1.5) / 1.8)) * (s >= self.s_apex - self.t_apex - 0.5)
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


class _A4c(Heart):
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
            wlv = (1.0 - 0.7 * smooth((s + 0.6) / 0.9)) * (s >= self.s_apex - self.t_apex - 0.5)
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


class _Psax(Heart):
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


_VIEWS: dict[str, type[Heart]] = {"plax": Plax, "a4c": _A4c, "psax": _Psax}


def heart(an: Anatomy, plan: VideoPlan) -> Heart:
    """The heart model of ``plan.view`` (``plax``, ``a4c`` or ``psax``) for ``an``, posed by ``plan``."""
    if plan.view not in _VIEWS:
        raise ValueError(f'Argument "plan.view" must be one of {", ".join(_VIEWS)}, got {plan.view!r}')
    return _VIEWS[plan.view](an, plan)
