"""Renderer D's screen: where the sector sits and what is burned in around it.

Layout (this renderer's own): the sector's virtual apex near the top
centre, its curved top a probe face's width below it, its deepest point at
86 % of the height; patient initials and date at the upper left, the
scanner's settings in a column on the vendor's side, a dot scale of depth
(every cm, larger every 5 cm) just outside the right edge of the sector, an
orientation marker by the apex, and the ECG over the whole clip in a strip
along the bottom with a cursor at the current frame.  Nothing touches the
sector, so the preprocessing's sector mask finds it alone.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import ecg_wave
from train.synth.geometry import Geometry

__all__ = ["Overlay", "sector_geometry"]


def sector_geometry(plan: VideoPlan, rows: int, cols: int) -> Geometry:
    """The sector as renderer D lays it out on a ``rows`` x ``cols`` screen.

    Parameters
    ----------
    plan : VideoPlan
        Its depth and angle.
    rows, cols : int
        Screen size.

    Returns
    -------
    Geometry
        Apex pixel and isotropic pixel size.
    """
    half = math.radians(plan.angle_deg / 2)
    apex_row = int(round(0.05 * rows))
    sector_px = min(0.81 * rows, 0.46 * cols / math.sin(half))
    return Geometry(rows=rows, cols=cols, apex_row=apex_row, apex_col=cols // 2, depth_cm=plan.depth_cm,
                    angle_deg=plan.angle_deg, delta_cm=plan.depth_cm / sector_px)


class Overlay:
    """The burned-in annotation: a static layer plus the ECG cursor per frame.

    Parameters
    ----------
    plan : VideoPlan
        Settings to print, the scanner's colours, heart rate and timing.
    geo : Geometry
        The sector (depth marks follow its edge).
    header : dict of str to str, optional
        ``initials`` and ``date`` to print.
    phases : numpy.ndarray
        Cardiac phase of every frame (the ECG is drawn at these times).
    """

    def __init__(self, plan: VideoPlan, geo: Geometry, header: dict[str, str] | None, phases: np.ndarray) -> None:
        rows, cols = geo.rows, geo.cols
        self.layer = np.zeros((rows, cols, 3), np.uint8)
        self.mask = np.zeros((rows, cols), bool)
        v = plan.vendor
        txt = tuple(int(c) for c in v.text_rgb)
        scale = 0.3 * rows / 240.0
        thick = 1
        line = max(int(round(11 * rows / 240.0)), 8)
        img = self.layer
        header = header or {}
        left = [header.get("initials", ""), header.get("date", ""), v.model]
        for k, s in enumerate(left):
            if s:
                cv2.putText(img, s, (int(0.015 * cols), int(0.045 * rows) + k * line), cv2.FONT_HERSHEY_SIMPLEX,
                            scale, txt, thick, cv2.LINE_AA)
        settings = [plan.view.upper(), f"{plan.freq_mhz:.1f}MHz", f"G{plan.gain_db:+.0f}",
                    f"DR{plan.dynamic_range_db:.0f}", f"{plan.fps}Hz", f"{plan.depth_cm:.0f}cm"]
        for k, s in enumerate(settings):
            (w, _), _ = cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
            x = int(0.015 * cols) if not v.text_left else cols - w - int(0.015 * cols)
            cv2.putText(img, s, (x, int(0.2 * rows) + k * line), cv2.FONT_HERSHEY_SIMPLEX, scale, txt, thick,
                        cv2.LINE_AA)
        # Depth dots just outside the sector's right edge.
        half = math.radians(geo.angle_deg / 2)
        off = max(4.0, 0.015 * cols)
        for d in range(1, int(geo.depth_cm) + 1):
            rp = d / geo.delta_cm
            dot = (int(round(geo.apex_col + rp * math.sin(half) + off * math.cos(half))),
                   int(round(geo.apex_row + rp * math.cos(half) - off * math.sin(half))))
            cv2.circle(img, dot, 2 if d % 5 == 0 else 1, txt, -1, cv2.LINE_AA)
        # Orientation marker, up and left of the apex.
        cv2.circle(img, (geo.apex_col - int(0.09 * cols), geo.apex_row + 2), max(2, rows // 120), txt, -1)
        # ECG strip: the whole clip, 0.4 s of lead-in.
        ecg = tuple(int(c) for c in v.ecg_rgb)
        n = len(phases)
        rr = 60.0 / plan.heart_rate_bpm
        dur = n / plan.fps
        t = np.linspace(-0.4, dur, 400)
        ph = phases[0] + t / rr if n else t / rr
        self.x0, self.x1 = 0.12 * cols, 0.88 * cols
        self.t0, self.t1 = -0.4, dur
        base = 0.955 * rows
        amp = 0.06 * rows
        xs = self.x0 + (t - self.t0) / (self.t1 - self.t0) * (self.x1 - self.x0)
        ys = base - amp * ecg_wave(ph % 1.0)
        pts = np.stack([xs, ys], axis=1).round().astype(np.int32)
        cv2.polylines(img, [pts], False, ecg, 1, cv2.LINE_AA)
        self.mask = img.max(axis=2) > 0
        self.cursor_rows = (int(0.89 * rows), int(0.985 * rows))
        self.text_rgb = np.array(txt, np.uint8)
        self.fps = plan.fps

    def burn(self, frame: np.ndarray, i: int) -> None:
        """Burn the static layer and frame ``i``'s ECG cursor into ``frame`` (in place)."""
        frame[self.mask] = self.layer[self.mask]
        t = i / self.fps
        x = int(round(self.x0 + (t - self.t0) / (self.t1 - self.t0) * (self.x1 - self.x0)))
        x = min(max(x, 0), frame.shape[1] - 1)
        frame[self.cursor_rows[0]:self.cursor_rows[1], x] = self.text_rgb
