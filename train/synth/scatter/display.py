"""Renderer C's display: sector layout, log compression and grey map, scan conversion, overlay.

Part of :mod:`train.synth.render_scatter` (see its independence rule).  It
turns the beamformed envelopes into RGB frames: log compression through a
grey map of its own, scan conversion to a sector with a curved top, burned-in
text, a depth ruler with the focus marker and an ECG sweep.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import ecg_wave
from train.synth.geometry import Geometry
from train.synth.scatter.beamform import beam_grid

R_TOP_CM = 0.3
"""The sector's curved top: the transducer face below the virtual apex (cm)."""


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
        grid (``n_r``, ``n_th``) is the one
        :func:`train.synth.render_scatter.render_video` forms.
    """
    half = math.radians(plan.angle_deg / 2.0)
    sector_px = min(0.86 * rows, 0.47 * cols / math.sin(half))
    delta = plan.depth_cm / sector_px
    n_r, n_th, _ = beam_grid(plan, delta, cols)
    return Geometry(rows=rows, cols=cols, apex_row=int(round(0.045 * rows)), apex_col=cols // 2,
                    depth_cm=plan.depth_cm, angle_deg=plan.angle_deg, delta_cm=delta, n_r=n_r, n_th=n_th)


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


def scan_convert(env: np.ndarray, plan: VideoPlan, geo: Geometry) -> np.ndarray:
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
        (plan.depth_cm - r) / px, (r - R_TOP_CM) / px, (half - np.abs(th)) * r / px,
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


def overlay(frames: np.ndarray, plan: VideoPlan, geo: Geometry, header: dict[str, str], times: np.ndarray,
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
