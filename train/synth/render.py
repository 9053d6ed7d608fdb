"""Renderer A ("polar"): beam-formed image along scan lines, then scan-converted.

Image formation mimics a phased-array scanner cheaply:

1. tissue reflectivity (:mod:`train.synth.views`) is evaluated on a polar
   (depth x beam) grid with soft boundaries;
2. stationary clutter (near-field haze, diffuse haze that grows as the
   acoustic window worsens) and reverberation (a faint copy of the near field
   at twice its depth) are added;
3. the echo field is complex random scatterers (frame-to-frame correlated)
   times the square root of the reflectivity, blurred by an anisotropic
   Gaussian point-spread function: spatially correlated Rayleigh speckle;
4. attenuation with depth, time-gain compensation, overall gain, rib shadow
   and patchy dropout scale the intensity; an electronic noise floor is added;
5. log compression over the video's dynamic range through its grey map, then
   scan conversion into the sector.

A video's :class:`~train.synth.acquisition.Look` (``synth --look varied``)
shifts the surround's level in step 1, softens its boundaries in decibels
rather than in power (``log_edges``), moves tissue edges in or out before
that (``edge_bias_cm``), scales every tissue's contrast to the myocardium
after it, and smooths the detected echo after step 3 (speckle reduction).
Every look parameter comes from the :class:`~train.synth.acquisition.VideoPlan`,
never from a label.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from train.synth.acquisition import Vendor, VideoPlan
from train.synth.anatomy import Anatomy
from train.synth.geometry import Geometry
from train.synth.overlay import compose
from train.synth.views import MYOCARDIUM_REFLECTIVITY, VIEW_FIELDS, VIEW_VALVES, LeafletLook

__all__ = ["local_to_pixel", "render_video", "sector_geometry", "view_pose"]

_R_TISSUE = 0.015
# Displayed level (dB over a reflectivity of 1) at the top of the grey map.
_TOP_DB = 15.0
# Frame-to-frame correlation of the scatterers (tissue moves, speckle decorrelates).
_SPECKLE_RHO = 0.9


def sector_geometry(rows: int, cols: int, depth_cm: float, angle_deg: float, vendor: Vendor) -> Geometry:
    """Renderer A's layout: apex near the top centre, sector above an ECG band."""
    apex_row = int(round(rows * (0.07 if vendor.text_left else 0.08)))
    ecg_band = int(round(rows * 0.13))
    margin = max(24, int(cols * 0.07))
    half = math.sin(math.radians(angle_deg / 2))
    sector_px = min(rows - apex_row - ecg_band, (cols / 2 - margin) / half)
    delta = depth_cm / sector_px
    # Polar grid: ~0.6 samples per output pixel in depth is enough once the
    # PSF blur is applied, and keeps the per-frame cost low.
    n_r = int(max(96, round(sector_px * 0.6)))
    n_th = int(max(64, round(angle_deg * 1.5)))
    return Geometry(rows, cols, apex_row, cols // 2, depth_cm, angle_deg, delta, n_r, n_th)


def view_pose(view: str, an: Anatomy, plan: VideoPlan) -> tuple[float, float, float]:
    """Centre (x, z in cm from the apex) and rotation of the view's local frame."""
    tr = an.truth
    if view == "plax":
        z = an.chest_wall_cm + 0.4 + an.rv_cm + tr.ivs_cm + tr.lvid_cm / 2
        x = 0.6
    elif view == "a4c":
        z = an.chest_wall_cm + 0.9
        x = -0.3
    else:
        z = an.chest_wall_cm + 0.4 + an.rv_cm * 0.8 + tr.ivs_cm + tr.lvid_cm / 2
        x = 0.2
    return x + plan.shift_x_cm, z + plan.shift_z_cm, math.radians(plan.tilt_deg)


def _local_coords(geo: Geometry, pose: tuple[float, float, float]):
    """View-local coordinates of every polar sample, its depth and beam angle."""
    r = (np.arange(geo.n_r, dtype=np.float32) + 0.5) * (geo.depth_cm / geo.n_r)
    half = math.radians(geo.angle_deg / 2)
    th = -half + (np.arange(geo.n_th, dtype=np.float32) + 0.5) * (2 * half / geo.n_th)
    rr, tt = np.meshgrid(r, th, indexing="ij")
    xx, zz = rr * np.sin(tt), rr * np.cos(tt)
    cx, cz, rot = pose
    c, s = math.cos(rot), math.sin(rot)
    u = c * (xx - cx) + s * (zz - cz)
    v = -s * (xx - cx) + c * (zz - cz)
    return u.astype(np.float32), v.astype(np.float32), rr, tt


def local_to_pixel(geo: Geometry, pose: tuple[float, float, float], u, v):
    """Image (col, row) of view-local points (cm); used by tests to place scan lines."""
    cx, cz, rot = pose
    c, s = math.cos(rot), math.sin(rot)
    x = cx + c * np.asarray(u) - s * np.asarray(v)
    z = cz + s * np.asarray(u) + c * np.asarray(v)
    return geo.to_pixel(x, z)


def _scan_maps(geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps from image pixels to polar samples."""
    r, th = geo.polar()
    half = math.radians(geo.angle_deg / 2)
    map_y = (r / geo.depth_cm * geo.n_r - 0.5).astype(np.float32)
    map_x = ((th + half) / (2 * half) * geo.n_th - 0.5).astype(np.float32)
    rows = np.arange(geo.rows)[:, None]
    mask = (r <= geo.depth_cm) & (np.abs(th) <= half) & (rows >= geo.apex_row)
    # Pixels outside the sector sample far outside the polar grid, so remap's
    # constant border blacks them out without a per-frame masking pass.
    map_x[~mask] = -100.0
    map_y[~mask] = -100.0
    return map_x, map_y


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sy: float, sx: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed to blobs of about (sy, sx) samples."""
    tex = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=sx, sigmaY=sy)
    return tex / (tex.std() + 1e-6)


def _background(rng: np.random.Generator, rr: np.ndarray, an: Anatomy, plan: VideoPlan) -> np.ndarray:
    """Static non-cardiac tissue: layered chest wall and a dim, textured lung/mediastinum."""
    tex = _smooth_noise(rng, rr.shape, 8, 6)
    bg = _R_TISSUE * np.exp(0.7 * tex - 0.6)
    layers = 1 + 0.9 * np.sin(rr * 9.0 + tex) * (rr < an.chest_wall_cm)
    bg *= layers
    # Past the heart the image fades (lung, far field): a smooth fall-off.
    bg *= np.exp(-np.clip(rr - an.chest_wall_cm - 11.0, 0, None) / 2.0)
    return bg.astype(np.float32)


def _clutter(rng: np.random.Generator, rr: np.ndarray, plan: VideoPlan) -> np.ndarray:
    """Stationary haze (linear power) that a poor acoustic window lays over the heart."""
    poor = 1.0 - plan.quality
    near = (0.3 + 1.2 * poor) * np.exp(-rr / (0.6 + 1.2 * poor))
    haze = (0.0004 + 0.012 * poor ** 1.5) * np.exp(0.9 * _smooth_noise(rng, rr.shape, 12, 10))
    return (near + haze).astype(np.float32)


def _gain_map(rng: np.random.Generator, rr: np.ndarray, tt: np.ndarray, geo: Geometry,
              plan: VideoPlan) -> np.ndarray:
    """Linear intensity gain per polar sample: attenuation, TGC, gain, edges, shadow, dropout."""
    knots_r = np.linspace(0, geo.depth_cm, len(plan.tgc_db))
    net_db = -plan.atten_db_per_cm * rr + np.interp(rr, knots_r, plan.tgc_db) + plan.gain_db
    half = math.radians(geo.angle_deg / 2)
    net_db += -8.0 * np.clip((np.abs(tt) - 0.75 * half) / (0.25 * half), 0, 1) ** 2
    if plan.shadow_width_deg > 0:
        d = np.degrees(tt) - plan.shadow_deg
        net_db += -18.0 * np.exp(-np.square(d / plan.shadow_width_deg)) * (rr > 1.0)
    # Patchy dropout: smooth blobs where the signal sinks, more of them in a poor window.
    patch = _smooth_noise(rng, rr.shape, 14, 6)
    net_db += -10.0 * (1.0 - plan.quality) * np.clip(patch - 0.3, 0, None)
    return (10 ** (net_db / 10)).astype(np.float32)


def _grey_lut(plan: VideoPlan) -> tuple[np.ndarray, float]:
    """Grey map in 0.1 dB steps from the bottom of the dynamic range, and that bottom (dB)."""
    lo_db = _TOP_DB - plan.dynamic_range_db
    steps = np.arange(int(plan.dynamic_range_db * 10) + 1) / (plan.dynamic_range_db * 10)
    return np.round(steps ** plan.gamma * 255).astype(np.uint8), lo_db


def _shifted_edges(refl: np.ndarray, bias_cm: float, sample_cm: tuple[float, float]) -> np.ndarray:
    """``refl`` with bright tissue dilated (``bias_cm`` > 0) or eroded (< 0) by ``|bias_cm|`` cm a side.

    A grey-scale dilation or erosion with an elliptical kernel on the polar
    grid (``sample_cm``: a sample's size across and along the beam).  The
    grid is coarse (0.05-0.1 cm), so a fractional radius blends, in
    decibels, the fields moved by the whole samples either side of it: after
    the boundaries are softened the edge then moves smoothly with the bias.
    """
    op = cv2.dilate if bias_cm > 0 else cv2.erode
    radius = abs(bias_cm) / sample_cm[1]  # along the beam, where walls across it are measured
    across = sample_cm[1] / sample_cm[0]  # the same distance across the beam, in its samples

    def moved(k: int) -> np.ndarray:
        if k == 0:
            return refl
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * round(k * across) + 1, 2 * k + 1))
        return op(refl, kernel)

    whole = int(math.floor(radius))
    frac = radius - whole
    if frac < 1e-3:
        return moved(whole)
    lo, hi = moved(whole), moved(whole + 1)
    return np.exp((1 - frac) * np.log(lo) + frac * np.log(hi)).astype(np.float32)


def _render_frames(an: Anatomy, plan: VideoPlan, geo: Geometry, phases: np.ndarray) -> np.ndarray:
    """Greyscale sector images (T, rows, cols) uint8 for the given phases."""
    rng = np.random.default_rng(plan.noise_seed)
    pose = view_pose(plan.view, an, plan)
    u, v, rr, tt = _local_coords(geo, pose)
    bg = _background(rng, rr, an, plan)
    look = plan.look
    if look.surround_db:
        bg *= np.float32(10 ** (look.surround_db / 10))
    clutter = _clutter(rng, rr, plan)
    gain = _gain_map(rng, rr, tt, geo, plan)
    view_fn = VIEW_FIELDS[plan.view]
    map_x, map_y = _scan_maps(geo)
    lut, lo_db = _grey_lut(plan)
    # Reverberation: the near field echoes again at twice its depth.
    rev_rows = np.arange(geo.n_r) // 2
    rev_gain = 0.05 * plan.reverb * np.exp(-rr / 4.0)
    scat = rng.standard_normal((geo.n_r, geo.n_th, 2), dtype=np.float32)
    k = math.sqrt(1 - _SPECKLE_RHO ** 2)
    sig = (plan.vendor.psf_lateral * plan.psf_scale, plan.vendor.psf_axial * plan.psf_scale)
    psf_energy = 1.0 / (4 * math.pi * sig[0] * sig[1])
    # A polar sample's size across the beam (at mid-depth) and along it.
    sample_cm = (0.5 * geo.depth_cm * math.radians(geo.angle_deg) / geo.n_th, geo.depth_cm / geo.n_r)
    e = valve_e = max(plan.edge_cm, sample_cm[1])
    valves = VIEW_VALVES.get(plan.view)
    leaf = LeafletLook(gain=10 ** (look.leaflet_db / 10), calcium_scale=look.calcium_scale,
                       bloom_cm=look.leaflet_bloom_cm)
    if look.log_edges:
        # The views draw sharp boundaries; a Gaussian in decibels then
        # softens them, its 10-90 % rise spanning the edge width e (the
        # linear blend's 10-90 % rise is 0.8 e).  Valve leaflets are thinner
        # than that blur: in decibels it would all but erase them (a 0.1 cm
        # cusp under a 0.3 cm edge falls from about 30 dB over the blood to
        # about 9), so they are laid over the blurred field afterwards,
        # blended in power like any structure thinner than the beam.
        log_blur = (e / 2.56 / sample_cm[0], e / 2.56 / sample_cm[1])
        e = sample_cm[1]
    out = np.empty((len(phases), geo.rows, geo.cols), np.uint8)
    for i, ph in enumerate(phases):
        if i:
            scat = _SPECKLE_RHO * scat + k * rng.standard_normal(scat.shape, dtype=np.float32)
        refl = view_fn(u, v, bg, an, float(ph), e, valves=False)
        if look.edge_bias_cm:
            refl = _shifted_edges(refl, look.edge_bias_cm, sample_cm)
        # Every view paints its leaflets last, over whatever it drew: sharp
        # and then faded with the tissue by the decibel blur, or over it.
        faded = look.log_edges and look.leaflets_in_blur
        if valves is not None and faded:
            valves(refl, u, v, an, float(ph), e, leaf)
        if look.log_edges:
            refl = np.exp(cv2.GaussianBlur(np.log(refl), (0, 0), sigmaX=log_blur[0], sigmaY=log_blur[1]))
        if valves is not None and not faded:
            valves(refl, u, v, an, float(ph), valve_e, leaf)
        if look.contrast != 1.0:
            # Scale every level in dB around the myocardium's.
            refl = MYOCARDIUM_REFLECTIVITY * np.power(refl / MYOCARDIUM_REFLECTIVITY, look.contrast,
                                                      dtype=np.float32)
        refl += clutter + rev_gain * refl[rev_rows]
        field_ = scat * np.sqrt(refl)[..., None]
        field_ = cv2.GaussianBlur(field_, (0, 0), sigmaX=sig[0], sigmaY=sig[1])
        inten = (np.square(field_[..., 0]) + np.square(field_[..., 1])) / (2 * psf_energy)
        if look.despeckle:
            inten = cv2.GaussianBlur(inten, (0, 0), sigmaX=look.despeckle * sig[0], sigmaY=look.despeckle * sig[1])
        inten = inten * gain + 3e-5  # electronic noise floor
        # Log compression through a lookup table indexed in 0.1 dB steps.
        idx = np.log10(inten)
        idx *= 100.0
        idx -= lo_db * 10.0
        np.clip(idx, 0, len(lut) - 1, out=idx)
        polar = lut[idx.astype(np.int32)]
        cv2.remap(polar, map_x, map_y, cv2.INTER_LINEAR, dst=out[i],
                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


def render_video(an: Anatomy, plan: VideoPlan, rows: int = 480, cols: int = 640,
                 header: dict[str, str] | None = None) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Render a video as RGB frames.

    Parameters
    ----------
    an : Anatomy
        The anatomy to draw.
    plan : VideoPlan
        Acquisition parameters.
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
    geo = sector_geometry(rows, cols, plan.depth_cm, plan.angle_deg, plan.vendor)
    t = np.arange(plan.frames) / plan.fps
    phases = (plan.phase0 + t * plan.heart_rate_bpm / 60.0) % 1.0
    grey = _render_frames(an, plan, geo, phases)
    return compose(grey, plan, geo, t, header), geo, phases
