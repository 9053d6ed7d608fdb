"""The acoustics of renderer D on the Cartesian pixel grid.

A frame's echo is formed in four steps, all on the screen's own pixels:

1. *Scattering field*: complex scatterer amplitudes
   ``s = sqrt(P) * 10^(-L/20) * n``, where ``P`` is the tissue's
   backscattered power (its class, a static heterogeneity and a gamma
   "scatterer number" texture, which makes the envelope K-distributed
   rather than Rayleigh in sparse tissue), ``L`` the two-way attenuation
   integrated along the beam up to the pixel, and ``n`` unit complex Gaussian
   scatterers: looked up at the tissue's material coordinates for tissue
   (so speckle follows the muscle), drawn fresh every frame for blood, whose
   scatterers have moved on.
2. *Point-spread function*: the field is convolved with a PSF whose axial
   extent is the pulse length (1/frequency) and whose lateral width is the
   beam's, narrowest at the focus and wider before and after it, oriented
   along the local beam direction.  A spatially varying convolution is done
   as a bank: the field's spectrum times a few Gaussian PSFs (orientations
   across the sector x two beam widths), each transformed back, and every
   pixel blends the bank's outputs by its beam angle and depth.
3. *Envelope and receive chain*: modulus, time-gain compensation, gain,
   electronic noise (before the gain, so it grows with depth), stationary
   clutter haze and a reverberation ghost of the near field at twice its depth.
4. *Display*: log compression over the plan's dynamic range and a grey map
   of this renderer's own.

Attenuation is the one quantity integrated along beams; it is summed on a
coarse auxiliary grid of rays (it is smooth) and read back at every pixel,
with rib shadows, calcium shadows and dropout of poor windows added there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.geometry import Geometry

__all__ = ["Acoustics", "SectorGrid"]

_SPEED_CM_US = 0.154  # sound in soft tissue, cm per microsecond: wavelength = 0.154 / MHz
_APERTURE_CM = 1.9  # phased-array aperture
_PROBE_FACE_CM = 0.35  # the image starts this far from the virtual apex (a curved top)
_MID_DB = -25.0  # echo level (dB re the pericardium) shown at the middle of the display range


@dataclass
class SectorGrid:
    """The pixels inside the sector, in the sector's bounding box.

    Attributes
    ----------
    r0, c0 : int
        Upper-left corner of the box in the image.
    shape : tuple of int
        Box size (rows, cols).
    idx : numpy.ndarray
        Flat indices (into the box) of the pixels inside the sector.
    x, z, r, th : numpy.ndarray
        Their lateral and depth positions (cm from the apex), depth along the
        beam (cm) and beam angle (rad, 0 straight down).
    alpha : numpy.ndarray
        Coverage of each pixel by the sector (anti-aliased edges).
    """

    r0: int
    c0: int
    shape: tuple[int, int]
    idx: np.ndarray
    x: np.ndarray
    z: np.ndarray
    r: np.ndarray
    th: np.ndarray
    alpha: np.ndarray

    @classmethod
    def of(cls, geo: Geometry) -> SectorGrid:
        x0, y0, x1, y1 = geo.region_bounds()
        rr, cc = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        x = (cc - geo.apex_col) * geo.delta_cm
        z = (rr - geo.apex_row) * geo.delta_cm
        r, th = np.hypot(x, z), np.arctan2(x, z)
        half = math.radians(geo.angle_deg / 2)
        px = geo.delta_cm
        # Coverage: distance to the nearest edge (sides, curved top, bottom arc) in pixels.
        side = (half - np.abs(th)) * np.maximum(r, px) / px
        cover = np.clip(np.minimum.reduce([side, (r - _PROBE_FACE_CM) / px, (geo.depth_cm - r) / px]) + 0.5, 0, 1)
        keep = cover.ravel() > 0
        return cls(y0, x0, (int(rr.shape[0]), int(rr.shape[1])), np.flatnonzero(keep), x.ravel()[keep],
                   z.ravel()[keep], r.ravel()[keep], th.ravel()[keep], cover.ravel()[keep])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float, complex_: bool) -> np.ndarray:
    """Gaussian-filtered white noise of unit variance (FFT filter)."""
    w = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if complex_ else 0.0)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.fftfreq(shape[1])[None, :]
    filtered = np.fft.ifft2(np.fft.fft2(w) * np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (kx ** 2 + ky ** 2)))
    out: np.ndarray = filtered if complex_ else filtered.real
    return out / max(float(np.sqrt(np.mean(np.abs(out) ** 2))), 1e-12)


class Acoustics:
    """Everything about a video's beam and receive chain that does not change per frame.

    Parameters
    ----------
    plan : VideoPlan
        Frequency, depth, gain, TGC, dynamic range, grey map, image quality,
        clutter, reverberation and shadows, as the plan states them.
    geo : Geometry
        The sector on the screen.
    grid : SectorGrid
        Its pixels.
    rng : numpy.random.Generator
        Seeded by ``plan.noise_seed``: scatterers, clutter, noise, dropout.
    """

    def __init__(self, plan: VideoPlan, geo: Geometry, grid: SectorGrid, rng: np.random.Generator) -> None:
        self.plan, self.geo, self.grid = plan, geo, grid
        px = geo.delta_cm
        q = float(np.clip(plan.quality, 0.0, 1.0))
        self.half = math.radians(geo.angle_deg / 2)
        lam = _SPEED_CM_US / plan.freq_mhz
        v = plan.vendor
        # Pulse length and beam width (Gaussian sigmas, cm), scaled by the plan's PSF and the make's grain.
        sig_a = 0.9 * lam * plan.psf_scale * (v.psf_axial / 0.95)
        focus = 0.55 * geo.depth_cm
        sig_f = 0.4 * lam * focus / _APERTURE_CM * plan.psf_scale * (v.psf_lateral / 1.35)
        z_r = 3.5
        self.sig_l = sig_f * np.sqrt(1.0 + ((grid.r - focus) / z_r) ** 2)
        sig_wide = float(sig_f * math.sqrt(1.0 + (max(focus, geo.depth_cm - focus) / z_r) ** 2))
        sa = max(sig_a / px, 0.8)
        widths = (max(sig_f / px, sa), max(sig_wide / px, sa))
        # The bank: K orientations spanning the sector, two beam widths.
        self.k = 5 if geo.angle_deg > 70 else 4
        self.angles = np.linspace(-self.half, self.half, self.k)
        pad = int(math.ceil(3 * widths[1])) + 2
        h, w = grid.shape
        self.pad = pad
        self.fshape = (h + 2 * pad, w + 2 * pad)
        ky = np.fft.fftfreq(self.fshape[0])[:, None]
        kx = np.fft.fftfreq(self.fshape[1])[None, :]
        self.bank: list[np.ndarray] = []
        for a in self.angles:
            k_par = kx * math.sin(a) + ky * math.cos(a)
            k_per = kx * math.cos(a) - ky * math.sin(a)
            for wl in widths:
                hk = np.exp(-2.0 * np.pi ** 2 * (sa ** 2 * k_par ** 2 + wl ** 2 * k_per ** 2))
                hk /= math.sqrt(float(np.mean(hk ** 2)))  # unit energy: white input keeps its power
                self.bank.append(hk.astype(np.float32))
        # Per-pixel blend weights: angle between neighbouring orientations, width by depth.
        fa = (grid.th + self.half) / (2 * self.half) * (self.k - 1)
        ia = np.clip(np.floor(fa).astype(np.int64), 0, self.k - 2)
        wa = np.clip(fa - ia, 0.0, 1.0)
        wl_ = np.clip((self.sig_l / px - widths[0]) / max(widths[1] - widths[0], 1e-6), 0.0, 1.0)
        self.weights: dict[int, np.ndarray] = {}
        for j in range(self.k):
            wj = np.where(ia == j, 1 - wa, 0.0) + np.where(ia + 1 == j, wa, 0.0)
            if np.any(wj > 0):
                self.weights[2 * j] = (wj * (1 - wl_)).astype(np.float32)
                self.weights[2 * j + 1] = (wj * wl_).astype(np.float32)
        # Where the sector pixels sit in the padded FFT frame.
        rows, cols = np.unravel_index(grid.idx, grid.shape)
        self.fidx = np.ravel_multi_index((rows + pad, cols + pad), self.fshape)
        # Receive chain: TGC compensating the scanner's assumed attenuation, the sliders, gain.
        self.raw_db_per_cm = 1.0 * plan.freq_mhz  # two-way soft-tissue loss, 0.5 dB/cm/MHz each way
        comp = (self.raw_db_per_cm - plan.atten_db_per_cm) * grid.r
        knots = np.linspace(0.0, geo.depth_cm, len(plan.tgc_db))
        self.gain_db = comp + np.interp(grid.r, knots, np.asarray(plan.tgc_db)) + plan.gain_db
        # Electronic noise before the gain (it grows with depth after it), worse in a poor window.
        self.noise_power = 10 ** ((-92.0 + 8.0 * (1 - q)) / 10)
        # Clutter haze: stationary, smooth, strongest in the near field.
        cl_db = -50.0 + 12.0 * (1 - q) + 8.0 * plan.reverb - 1.6 * np.maximum(grid.r - 4.0, 0.0)
        self.clutter_power = (10 ** (cl_db / 10)).astype(np.float32)
        cl_sig = 0.3 / px
        self.clutter = [_smooth_noise(rng, grid.shape, cl_sig, True).ravel()[grid.idx] for _ in range(2)]
        self.clutter_hz = float(rng.uniform(0.3, 0.8))
        # Reverberation: the near field echoed once more between probe and skin, at twice the depth.
        self.reverb_gain = 10 ** ((-30.0 + 12.0 * plan.reverb) / 10)
        hx = geo.apex_col + 0.5 * grid.x / px - grid.c0
        hz = geo.apex_row + 0.5 * grid.z / px - grid.r0
        hcol = np.clip(np.rint(hx).astype(np.int64), 0, grid.shape[1] - 1)
        hrow = np.clip(np.rint(hz).astype(np.int64), 0, grid.shape[0] - 1)
        lookup = np.full(grid.shape[0] * grid.shape[1], -1, np.int64)
        lookup[grid.idx] = np.arange(grid.idx.size)
        self.half_idx = lookup[np.ravel_multi_index((hrow, hcol), grid.shape)]
        # Rays for the attenuation integral.
        self.blur_px = max(int(round(0.3 / px)) | 1, 1)
        self.n_th, self.n_r = 48, 96
        self.ray_th = np.linspace(-self.half, self.half, self.n_th)
        self.ray_r = np.linspace(0.0, geo.depth_cm, self.n_r)
        self.dr = self.ray_r[1] - self.ray_r[0]
        tt, rr_ = np.meshgrid(self.ray_th, self.ray_r, indexing="ij")
        rc = np.clip(np.rint(geo.apex_row + rr_ * np.cos(tt) / px - grid.r0).astype(np.int64), 0, grid.shape[0] - 1)
        cc = np.clip(np.rint(geo.apex_col + rr_ * np.sin(tt) / px - grid.c0).astype(np.int64), 0, grid.shape[1] - 1)
        self.ray_pix = np.ravel_multi_index((rc, cc), grid.shape)
        fi = (grid.th + self.half) / (2 * self.half) * (self.n_th - 1)
        fr = grid.r / self.dr
        self.ri0 = np.clip(np.floor(fi).astype(np.int64), 0, self.n_th - 2)
        self.rw = np.clip(fi - self.ri0, 0, 1)
        self.rj0 = np.clip(np.floor(fr).astype(np.int64), 0, self.n_r - 2)
        self.rv = np.clip(fr - self.rj0, 0, 1)
        # Static extra loss along rays: a rib shadow, and dropout bands of a poor window.
        self.extra_db = np.zeros((self.n_th, self.n_r))
        self.drop_db = np.zeros((self.n_th, self.n_r))
        if plan.shadow_width_deg > 0:
            d_ang = np.degrees(tt) - plan.shadow_deg
            onset = 1.0 / (1.0 + np.exp(-(rr_ - 1.5) / 0.3))
            self.extra_db += 16.0 * np.exp(-0.5 * (d_ang / (0.45 * plan.shadow_width_deg)) ** 2) * onset
        for _ in range(int(rng.poisson(3.0 * (1 - q)))):
            c_ang = rng.uniform(-self.half, self.half)
            width = math.radians(rng.uniform(3.0, 9.0))
            start = rng.uniform(2.0, 7.0)
            self.drop_db += rng.uniform(5.0, 14.0) * (1 - q + 0.3) * np.exp(-0.5 * ((tt - c_ang) / width) ** 2) \
                / (1.0 + np.exp(-(rr_ - start) / 0.5))
        # Persistence: scanners average each frame's echo power with the
        # previous ones, which smooths blood's flickering speckle into haze.
        self.persistence = float(rng.uniform(0.2, 0.45))
        self._held: np.ndarray | None = None
        self.drop_hz = float(rng.uniform(0.15, 0.4))
        self.drop_phase = float(rng.uniform(0, 2 * np.pi))

    def attenuation_db(self, atten_rel: np.ndarray, t_s: float) -> np.ndarray:
        """Two-way loss (dB) at every sector pixel, integrated along its beam."""
        img = np.ones(self.grid.shape[0] * self.grid.shape[1], np.float32)
        img[self.grid.idx] = atten_rel
        # A beam is wider than a leaflet: it loses what the tissue across its width absorbs.
        beam_avg: np.ndarray = cv2.blur(img.reshape(self.grid.shape), (self.blur_px, self.blur_px)).ravel()
        slope = self.raw_db_per_cm * beam_avg[self.ray_pix]
        # Loss on the way to a point: the path before it, half of its own step.
        loss = (np.cumsum(slope, axis=1) - 0.5 * slope) * self.dr + self.extra_db
        loss += self.drop_db * (0.75 + 0.25 * math.sin(2 * math.pi * self.drop_hz * t_s + self.drop_phase))
        i, w, j, v = self.ri0, self.rw, self.rj0, self.rv
        return ((1 - w) * ((1 - v) * loss[i, j] + v * loss[i, j + 1])
                + w * ((1 - v) * loss[i + 1, j] + v * loss[i + 1, j + 1]))

    def beamform(self, field: np.ndarray) -> np.ndarray:
        """Convolve the scattering field (at sector pixels) with the local PSF."""
        buf = np.zeros(self.fshape[0] * self.fshape[1], np.complex64)
        buf[self.fidx] = field
        spec = np.fft.fft2(buf.reshape(self.fshape))
        out = np.zeros(field.shape, np.complex64)
        for key, wgt in self.weights.items():
            img = np.fft.ifft2(spec * self.bank[key])
            out += wgt * img.ravel()[self.fidx]
        return out

    def display(self, echo: np.ndarray, t_s: float) -> np.ndarray:
        """Grey level in [0, 1] at every sector pixel from the beamformed echo."""
        plan = self.plan
        power = (echo.real ** 2 + echo.imag ** 2) * 10 ** (self.gain_db / 10)
        if self._held is not None:
            power = (1 - self.persistence) * power + self.persistence * self._held
        self._held = power
        ang = 2 * math.pi * self.clutter_hz * t_s
        cl = math.cos(ang) * self.clutter[0] + math.sin(ang) * self.clutter[1]
        power = power + self.clutter_power * (cl.real ** 2 + cl.imag ** 2)
        ghost = np.where(self.half_idx >= 0, power[np.maximum(self.half_idx, 0)], 0.0)
        power = power + self.reverb_gain * ghost
        db = 10 * np.log10(power + 1e-12)
        # The display range is centred on a fixed echo level (gain and TGC move
        # the echoes against it); a wider range lowers the contrast, not the brightness.
        v = np.clip(0.5 + (db - _MID_DB) / plan.dynamic_range_db, 0.0, 1.0)
        # This renderer's grey map: an expansive power law of the decibels set by
        # the plan's compression curve (speckle reads as bright grains on a
        # darker ground), with a soft knee that keeps the brightest echoes
        # from clipping flat.
        g = v ** (0.7 * plan.gamma)
        return (g * (1.0 - 0.18 * g * g) / 0.82).clip(0.0, 1.0) * self.grid.alpha
