"""Burned-in annotation of a scanner screen: settings text, depth scale, grey bar, ECG.

Drawn in colour so that a consumer's colour conversion is exercised, and so
that the node's sector mask has to tell static overlay from live image.
Nothing drawn here reads a label.
"""

from __future__ import annotations

import cv2
import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import ecg_wave
from train.synth.geometry import Geometry

__all__ = ["compose"]


def compose(grey: np.ndarray, plan: VideoPlan, geo: Geometry, t: np.ndarray,
            header: dict[str, str] | None = None) -> np.ndarray:
    """Grey sector frames ``(T, rows, cols)`` with the screen's overlay, as RGB.

    Parameters
    ----------
    grey : numpy.ndarray
        ``(T, rows, cols)`` uint8 image frames.
    plan : VideoPlan
        The acquisition (vendor look, settings shown, heart rate).
    geo : Geometry
        Where the sector lies.
    t : numpy.ndarray
        Time of each frame in seconds (for the sweeping ECG).
    header : dict, optional
        ``initials`` and ``date`` strings for the burned-in text.

    Returns
    -------
    numpy.ndarray
        ``(T, rows, cols, 3)`` uint8 RGB.
    """
    overlay, alpha = _static_overlay(plan, geo, header or {"initials": "S.P.", "date": "01/01/2020"})
    on = alpha > 0
    # One vectorised composite for all frames; only the ECG differs per frame.
    out = np.empty(grey.shape + (3,), np.uint8)
    out[...] = grey[..., None]
    out[:, on] = overlay[on]
    for i in range(grey.shape[0]):
        _draw_ecg(out[i], plan, geo, float(t[i]))
    return out


def _text(canvas, alpha, s, org, scale, rgb, thick=1) -> None:
    cv2.putText(canvas, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, rgb, thick, cv2.LINE_AA)
    cv2.putText(alpha, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)


def _static_overlay(plan: VideoPlan, geo: Geometry, header: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Burned-in annotation that does not change over the video (RGB, alpha)."""
    canvas = np.zeros((geo.rows, geo.cols, 3), np.uint8)
    alpha = np.zeros((geo.rows, geo.cols), np.uint8)
    vd = plan.vendor
    sc = geo.rows / 480.0
    fs = 0.42 * sc
    lh = int(round(16 * sc))
    left_lines = [vd.manufacturer.upper(), vd.model, header["initials"], header["date"]]
    right_lines = [
        f"{plan.freq_mhz:.1f} MHz",
        f"D {geo.depth_cm:.1f} cm",
        f"FR {plan.fps} Hz",
        f"G {int(round(50 + plan.gain_db))}",
        f"DR {int(round(plan.dynamic_range_db))}",
    ]
    if not vd.text_left:
        left_lines, right_lines = right_lines, left_lines
    for i, s in enumerate(left_lines):
        _text(canvas, alpha, s, (int(6 * sc), lh * (i + 1)), fs, vd.text_rgb)
    for i, s in enumerate(right_lines):
        (w, _), _ = cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
        _text(canvas, alpha, s, (geo.cols - w - int(6 * sc), lh * (i + 1)), fs, vd.text_rgb)
    # Depth scale: a tick every cm beside the sector's right edge, numbers every 5.
    x_scale = int(min(geo.cols - 30 * sc, geo.apex_col + geo.half_width_px + 10 * sc))
    for d in range(0, int(geo.depth_cm) + 1):
        y = int(round(geo.apex_row + d / geo.delta_cm))
        ln = int((8 if d % 5 == 0 else 4) * sc)
        cv2.line(canvas, (x_scale, y), (x_scale + ln, y), (200, 200, 200), 1)
        cv2.line(alpha, (x_scale, y), (x_scale + ln, y), 255, 1)
        if d % 5 == 0 and d:
            _text(canvas, alpha, str(d), (x_scale + ln + 2, y + int(4 * sc)), 0.35 * sc, (200, 200, 200))
    # Probe orientation marker near the sector's upper right, vendor-coloured.
    mk = (int(geo.apex_col + 0.35 * geo.half_width_px), int(geo.apex_row + 6 * sc))
    cv2.circle(canvas, mk, int(4 * sc), vd.text_rgb, -1)
    cv2.circle(alpha, mk, int(4 * sc), 255, -1)
    # Grey bar on the left, as scanners show their grey map.
    x0, y0, hgt = int(8 * sc), int(geo.rows * 0.35), int(geo.rows * 0.3)
    ramp = np.linspace(255, 0, hgt).astype(np.uint8)[:, None]
    canvas[y0:y0 + hgt, x0:x0 + int(6 * sc)] = ramp[..., None]
    alpha[y0:y0 + hgt, x0:x0 + int(6 * sc)] = 255
    return canvas, alpha


def _draw_ecg(img: np.ndarray, plan: VideoPlan, geo: Geometry, t_now: float) -> None:
    """Sweeping ECG trace in the bottom band, synchronised with the heart."""
    band_top = int(geo.rows * 0.89)
    band_h = geo.rows - band_top - 4
    x0, x1 = int(geo.cols * 0.12), int(geo.cols * 0.88)
    width = x1 - x0
    sweep_s = 3.0
    xs = np.arange(width)
    pos_now = (t_now % sweep_s) / sweep_s * width
    age = ((pos_now - xs) % width) / width * sweep_s  # seconds since drawn
    tau = t_now - age
    rr = 60.0 / plan.heart_rate_bpm
    y = band_top + band_h * (0.7 - 0.55 * ecg_wave(plan.phase0 + tau / rr))
    keep = age < sweep_s * (1 - 10 / width)  # the erase gap ahead of the cursor
    pts = np.stack([x0 + xs, y], axis=1).astype(np.int32)
    split = int(pos_now)
    for seg in (pts[:split][keep[:split]], pts[split:][keep[split:]]):
        if len(seg) > 1:
            cv2.polylines(img, [seg.reshape(-1, 1, 2)], False, plan.vendor.ecg_rgb, 1, cv2.LINE_AA)
