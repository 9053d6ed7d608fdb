"""Renderer C's scatterers and beamforming: from a posed heart to each frame's echo envelope.

Part of :mod:`train.synth.render_scatter` (see its independence rule).  Point
scatterers drawn over the sector and strings of specular reflectors move with
the heart; they are splatted onto the polar beam grid, attenuated along each
beam, convolved with the beam profile and the RF pulse, and demodulated, with
the acquisition's TGC, noise, clutter, rib shadow and dropout.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import contraction
from train.synth.geometry import Geometry
from train.synth.scatter.hearts import BLOOD, CHEST, LEAFLET, Cache, Heart, smooth

# Backscatter of each tissue relative to myocardium (dB), the log-normal spread
# of single scatterers' amplitudes (fibrous tissue is more heterogeneous, so it
# sparkles), and attenuation relative to soft tissue (blood and fluid little).
_BACKSCATTER_DB = np.array([-42.0, 0.0, 1.0, -12.0, -22.0, 9.0, -16.0, 5.0, 4.0])
_SPREAD = np.array([0.2, 0.35, 0.7, 0.5, 0.3, 0.6, 0.5, 0.6, 0.5])
_ATTEN_REL = np.array([0.12, 1.0, 1.1, 1.0, 0.4, 1.3, 1.0, 1.3, 1.5])

_SPEC_P = 6.0  # specular directivity: |cos(incidence)| ** p
_SPEC_STEP_CM = 0.02  # spacing of the coherent reflectors along an interface


def beam_grid(plan: VideoPlan, delta_cm: float, cols: int) -> tuple[int, int, float]:
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


def _smooth_noise(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """A smooth random profile of ``n`` values, unit variance, correlation length ``corr`` samples."""
    w = rng.standard_normal(n + 6 * int(corr) + 2)
    k = np.exp(-0.5 * (np.arange(-3 * int(corr), 3 * int(corr) + 1) / max(corr, 1e-3)) ** 2)
    y = np.convolve(w, k / np.sqrt((k**2).sum()), mode="valid")[:n]
    return y


class _Scatterers:
    """The tissue scatterers of one video: reference positions, class, two amplitude draws."""

    def __init__(self, heart: Heart, plan: VideoPlan, rng: np.random.Generator, density: float) -> None:
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



class Beamformer:
    """Forms the display-ready polar image of each frame (grey 0..1 on the beam grid)."""

    def __init__(self, heart: Heart, plan: VideoPlan, geo: Geometry, rng: np.random.Generator) -> None:
        self.heart, self.plan, self.geo = heart, plan, geo
        q = float(np.clip(plan.quality, 0.0, 1.0))
        self.q = q
        n_r, n_th, period = beam_grid(plan, geo.delta_cm, geo.cols)
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
            inside = smooth((w / 2 - np.abs(th - c)) / math.radians(2.0) + 0.5)
            r_rib = 0.55 * self.heart.an.chest_wall_cm + 0.35
            self.rib = (c, w, r_rib)
            below = smooth((r - r_rib) / 0.3)[:, None]
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
