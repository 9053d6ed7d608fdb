"""How each renderer draws the open aortic valve: the grey profile across the root at mid-systole.

A severe-AS model trained on renderer A that scores renderer B's valves low
and flat whatever their opening (docs/benchmarks.md, the cross-rendering
runs) may have learnt how A draws a cusp rather than where the cusps are.
This diagnostic, like :mod:`bench.wall_appearance` for the walls, looks only
at pictures: it draws the same PLAX acquisitions (hearts drawn without the
label, label seed 777, as ``bench.response_sweep``) with one diseased valve
(cusps 0.22 cm thick, calcification 0.55: the middle of the diseased
distribution in train/synth/truth.py) at each cusp separation of
:data:`SEPARATIONS_CM`, with every renderer, at mid-systole, and reads the
grey level along the line across the root through the cusps, just short of
their tips (0.05 cm from the tip along the root; renderer C's own
:func:`~train.synth.render_scatter.plax_valve_line`, where its leaflets are
found from its tissue map).

From each profile it reports, at the renderer's full resolution:

* **gap**: the grey of the blood between the cusps (the median within
  0.1 cm of the opening's centre);
* **cusp**: the grey along each cusp's centre line from a quarter to three
  quarters of the way from hinge to tip (the median), the mean of the two
  cusps: how bright the cusp's body is drawn;
* **cusp / septum**: the cusp's grey over the septum's (the median of the
  inner 60 % of the septum where walls are measured, in the same
  acquisition's end-diastolic frame), so that renderers with different grey
  maps compare: how bright a cusp is drawn against the myocardium;
* **apparent opening**: the width of the dark band around the centre
  below halfway between the gap's grey and each cusp's brightest grey on
  the line, against the true separation (blurring and blooming of the
  cusps narrow it); unread (and counted as such) where a cusp is less than
  :data:`READABLE_GREY` grey levels over the gap. Renderer B's cusps end
  square, so 0.05 cm short of the tip its line crosses a cusp near the
  inner corner at small separations: the gap there is 0.08-0.10 cm wider
  than the separation by geometry alone at 0.5-0.8 cm (none at 1.4 cm and
  over); A's and C's cusps end round.

With ``--pictures DIR`` it also writes, for the first acquisitions, one PNG
per renderer: the valve at each separation, cropped 5 cm around the root's
centre and resampled to the network's pixel (16 cm over 112 px, the
recipe of the severe-AS runs), magnified 4 times for the eye.

Usage::

    .venv/bin/python -m bench.valve_appearance [--acquisitions 12]
        [--look standard|varied|varied-valves|varied-leaflets|varied-walls] [--renderers A,B,C] [--pictures DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from bench.machine import cpu_flags, cpu_model, load_average
from train.synth import render, render_alt, render_scatter
from train.synth.acquisition import VideoPlan, plan_study, plan_video
from train.synth.anatomy import MID_SYSTOLE_PHASE, Anatomy, sample_anatomy
from train.synth.geometry import Geometry
from train.synth.look import LOOKS, vary_named
from train.synth.scatter.hearts import LEAFLET, MYO
from train.synth.truth import keyed_rng, sample_truth
from train.synth.views import MEASURE_U_CM, av_leaflet_tips

SEPARATIONS_CM = (0.5, 0.8, 1.1, 1.4, 1.8)
LEAFLET_CM = 0.22
CALCIFICATION = 0.55
LABEL_SEED = 777
RENDERERS = ("A", "B", "C")
_ROWS, _COLS = 480, 640
_TIP_BACK_CM = 0.05
READABLE_GREY = 8.0
"""A cusp whose brightest grey on the line is less than this over the gap's leaves the opening unread."""
_NET_CM_PER_PX = 16.0 / 112
_CROP_CM = 5.0

Line = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]
"""Image columns and rows of a line across the root, each point's signed distance (cm) from the
opening's centre, and the true inner edges (cm, same axis) of the anterior and posterior cusp."""


def _ab_line(pose: tuple[float, float, float], geo: Geometry,
             bars: tuple[tuple[tuple[float, float], tuple[float, float]], ...], leaflet_cm: float) -> Line:
    """The line across the root of renderer A or B, from their cusps' hinges and tips (view-local cm)."""
    (ha, ta), (hp, tp) = bars
    u = 0.5 * (ta[0] + tp[0]) - _TIP_BACK_CM
    centre = 0.5 * (ta[1] + tp[1])
    v = np.arange(ha[1] - 0.2, hp[1] + 0.2, geo.delta_cm / 8.0)
    col, row = render.local_to_pixel(geo, pose, np.full_like(v, u), v)
    edges = (ta[1] + leaflet_cm / 2 - centre, tp[1] - leaflet_cm / 2 - centre)
    return np.asarray(col), np.asarray(row), v - centre, edges


def _a_bars(an: Anatomy) -> tuple[tuple[tuple[float, float], tuple[float, float]], ...]:
    ha, ta, hp, tp = av_leaflet_tips(an, MID_SYSTOLE_PHASE)
    return (ha, ta), (hp, tp)


def _cusp_points(renderer: str, an: Anatomy, plan: VideoPlan, plan_a: VideoPlan,
                 geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Image (col, row) of points on both aortic cusps' centre lines, a quarter to three quarters out."""
    f = np.linspace(0.25, 0.75, 21)
    if renderer == "C":
        heart = render_scatter.hearts.heart(an, plan)
        xs, zs = [], []
        for hs, hn, ang, ell, _, _ in heart.leaflets(MID_SYSTOLE_PHASE)[:2]:
            x, z = heart.to_image(hs + f * ell * np.cos(ang), hn + f * ell * np.sin(ang))
            xs.append(x)
            zs.append(z)
        return geo.to_pixel(np.concatenate(xs), np.concatenate(zs))
    if renderer == "A":
        bars, pose = _a_bars(an), render.view_pose("plax", an, plan_a)
    else:
        bars, pose = render_alt.av_cusp_bars(an, MID_SYSTOLE_PHASE), render_alt.view_pose(an, plan)
    u = np.concatenate([h[0] + f * (t[0] - h[0]) for h, t in bars])
    v = np.concatenate([h[1] + f * (t[1] - h[1]) for h, t in bars])
    col, row = render.local_to_pixel(geo, pose, u, v)
    return np.asarray(col), np.asarray(row)


def _c_line(an: Anatomy, plan: VideoPlan) -> Line:
    """Renderer C's line across the root, ``_TIP_BACK_CM`` short of its cusps' tips (as for A and
    B), and its leaflets' inner edges, from its tissue map."""
    heart = render_scatter.hearts.heart(an, plan)
    geo = render_scatter.sector_geometry(plan, _ROWS, _COLS)
    (hs, hn_a, ang, ell, _, _), (_, hn_p, _, _, _, _) = heart.leaflets(MID_SYSTOLE_PHASE)[:2]
    s_line = hs + ell * math.cos(ang) - _TIP_BACK_CM
    n = np.arange(hn_a + 0.5, hn_p - 0.5, -geo.delta_cm / 8.0)
    x, z = heart.to_image(np.full_like(n, s_line), n)
    col, row = geo.to_pixel(x, z)
    cls = render_scatter.tissue_map(an, plan, _ROWS, _COLS, MID_SYSTOLE_PHASE, points=(col, row))
    dist = np.hypot(np.diff(col), np.diff(row)).cumsum()
    pos = np.concatenate([[0.0], dist]) * geo.delta_cm
    leaf = np.flatnonzero(cls == LEAFLET)
    if leaf.size == 0:
        raise ValueError("renderer C's line across the root crosses no leaflet")
    # Leaflet points form two runs; the inner edges face the gap between them.
    split = int(np.argmax(np.diff(leaf))) if leaf.size > 1 else 0
    inner_a, inner_p = pos[leaf[split]], pos[leaf[split + 1]]
    centre = 0.5 * (inner_a + inner_p)
    return col, row, pos - centre, (inner_a - centre, inner_p - centre)


def _sample(grey: np.ndarray, line: Line) -> np.ndarray:
    col, row = line[0], line[1]
    return cv2.remap(grey, col.astype(np.float32)[None, :], row.astype(np.float32)[None, :],
                     cv2.INTER_LINEAR)[0]


def read_profile(profile: np.ndarray, pos: np.ndarray, edges: tuple[float, float]) -> dict[str, float]:
    """Gap grey and apparent opening (cm) of one profile across the root.

    Parameters
    ----------
    profile : numpy.ndarray
        Grey along the line.
    pos : numpy.ndarray
        Each sample's signed distance (cm) from the opening's centre, increasing.
    edges : tuple of float
        The true inner edges of the anterior (negative) and posterior cusp.

    Returns
    -------
    dict
        ``gap`` (grey levels), ``opening`` in cm (NaN when either cusp's brightest grey on the
        line is less than :data:`READABLE_GREY` over the gap: no edge to read).
    """
    gap = float(np.median(profile[np.abs(pos) <= min(0.1, 0.5 * (edges[1] - edges[0]))]))
    sides = ((pos >= edges[0] - LEAFLET_CM - 0.15) & (pos <= edges[0] + 0.15),
             (pos >= edges[1] - 0.15) & (pos <= edges[1] + LEAFLET_CM + 0.15))
    peaks = [float(profile[m].max()) for m in sides]
    centre = int(np.argmin(np.abs(pos)))
    bounds = []
    for peak, step in zip(peaks, (-1, 1), strict=True):
        level = 0.5 * (gap + peak)
        i = centre
        while 0 <= i + step < len(profile) and profile[i + step] < level:
            i += step
        bounds.append(pos[i])
    readable = min(peaks) - gap >= READABLE_GREY
    width = float(bounds[1] - bounds[0]) if readable else float("nan")
    return {"gap": gap, "opening": width}


def septum_grey(renderer: str, an: Anatomy, plan: VideoPlan, plan_a: VideoPlan) -> float:
    """The median grey of the inner 60 % of the septum at end-diastole, where walls are measured."""
    plan, plan_a = (dataclasses.replace(p, phase0=0.0) for p in (plan, plan_a))
    tr = an.truth
    if renderer == "C":
        rgb, _, _ = render_scatter.render_video(an, plan, _ROWS, _COLS, None)
        col, row = render_scatter.plax_measure_line(an, plan, _ROWS, _COLS)
        # The line's points, 1/8 pixel apart, start 3 cm in front of the septum (whose LV side is
        # at n = b): the right ventricle's free wall comes first, so pick the septum by position.
        heart = render_scatter.hearts.heart(an, plan)
        geo = render_scatter.sector_geometry(plan, _ROWS, _COLS)
        n = heart.b + tr.ivs_cm + 3.0 - np.arange(col.size) * geo.delta_cm / 8.0
        classes = render_scatter.tissue_map(an, plan, _ROWS, _COLS, 0.0, points=(col, row))
        inner = (n >= heart.b + 0.2 * tr.ivs_cm) & (n <= heart.b + 0.8 * tr.ivs_cm) & (classes == MYO)
        idx = np.flatnonzero(inner)
        line: tuple[np.ndarray, np.ndarray] = (col[idx], row[idx])
    else:
        draw, pose_of, p = ((render.render_video, lambda: render.view_pose("plax", an, plan_a), plan_a)
                            if renderer == "A" else (render_alt.render_video, lambda: render_alt.view_pose(an, plan),
                                                     plan))
        rgb, geo, _ = draw(an, p, _ROWS, _COLS, None)
        h = tr.lvid_cm / 2
        vv, uu = np.meshgrid(np.linspace(-h - 0.8 * tr.ivs_cm, -h - 0.2 * tr.ivs_cm, 9),
                             np.linspace(MEASURE_U_CM - 0.5, MEASURE_U_CM + 0.5, 11))
        col, row = render.local_to_pixel(geo, pose_of(), uu.ravel(), vv.ravel())
        line = (np.asarray(col), np.asarray(row))
    grey = cv2.cvtColor(rgb[0], cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.median(_sample(grey, (line[0], line[1], np.zeros(0), (0.0, 0.0)))))


def _acquisition(i: int) -> tuple[Anatomy, VideoPlan]:
    truth = sample_truth(keyed_rng(LABEL_SEED, 1, i), force_lvh=False, force_as=False)
    study = plan_study(keyed_rng(LABEL_SEED, 2, i))
    plan = plan_video(keyed_rng(LABEL_SEED, 3, i), "plax", 1, study, 1, 1000 + i)
    plan = dataclasses.replace(plan, phase0=MID_SYSTOLE_PHASE, frames=1)
    return sample_anatomy(truth, keyed_rng(LABEL_SEED, 4, i), 2.0), plan


def _with_valve(an: Anatomy, sep: float) -> Anatomy:
    tr = dataclasses.replace(an.truth, av_cusp_sep_cm=sep, av_leaflet_cm=LEAFLET_CM,
                             av_calcification=CALCIFICATION, av_state="moderate")
    return dataclasses.replace(an, truth=tr)


def _draw(renderer: str, an: Anatomy, plan: VideoPlan, plan_a: VideoPlan) -> tuple[np.ndarray, Line, Geometry]:
    """The grey mid-systolic frame, the line across its root and its geometry."""
    if renderer == "A":
        rgb, geo, _ = render.render_video(an, plan_a, _ROWS, _COLS, None)
        line = _ab_line(render.view_pose("plax", an, plan_a), geo, _a_bars(an), LEAFLET_CM)
    elif renderer == "B":
        rgb, geo, _ = render_alt.render_video(an, plan, _ROWS, _COLS, None)
        line = _ab_line(render_alt.view_pose(an, plan), geo, render_alt.av_cusp_bars(an, MID_SYSTOLE_PHASE),
                        LEAFLET_CM)
    else:
        rgb, geo, _ = render_scatter.render_video(an, plan, _ROWS, _COLS, None)
        line = _c_line(an, plan)
    return cv2.cvtColor(rgb[0], cv2.COLOR_RGB2GRAY).astype(np.float32), line, geo


def _crop(grey: np.ndarray, line: Line) -> np.ndarray:
    """A square ``_CROP_CM`` across around the opening's centre, at the network's pixel, magnified 4x."""
    col, row, pos = line[0], line[1], line[2]
    k = int(np.argmin(np.abs(pos)))
    step = float(np.hypot(col[1] - col[0], row[1] - row[0]) / (pos[1] - pos[0]))  # pixels per cm
    half = _CROP_CM / 2 * step
    c0, r0 = float(col[k]), float(row[k])
    n = int(round(_CROP_CM / _NET_CM_PER_PX))
    xs = np.linspace(c0 - half, c0 + half, n, dtype=np.float32)
    ys = np.linspace(r0 - half, r0 + half, n, dtype=np.float32)
    mx, my = np.meshgrid(xs, ys)
    small = cv2.remap(cv2.GaussianBlur(grey, (0, 0), max(0.5, 0.5 * half * 2 / n)), mx, my, cv2.INTER_LINEAR)
    return np.kron(small, np.ones((4, 4), np.float32))


def measure(acquisitions: int, look: str, renderers: tuple[str, ...] = RENDERERS,
            pictures: Path | None = None, picture_count: int = 4,
            progress: Callable[[str], None] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Each renderer's readings, ``(acquisitions, separations)`` per quantity.

    Parameters
    ----------
    acquisitions : int
        PLAX acquisitions, each drawn at every separation of :data:`SEPARATIONS_CM`.
    look : str
        One of :data:`~train.synth.look.LOOKS`:
        renderer A's look (B and C have one each).
    renderers : tuple of str
        Which of A, B and C to draw.
    pictures : pathlib.Path, optional
        Where to write the crops of the first ``picture_count`` acquisitions.
    picture_count : int
        How many acquisitions' crops to write.
    progress : callable, optional
        Called with a line after each acquisition.

    Returns
    -------
    dict
        ``{renderer: {"gap" | "cusp" | "contrast" | "relative" | "opening": array}}``.
    """
    keys = ("gap", "cusp", "contrast", "relative", "opening")
    out = {r: {k: np.zeros((acquisitions, len(SEPARATIONS_CM))) for k in keys} for r in renderers}
    crops: dict[str, list[np.ndarray]] = {r: [] for r in renderers}
    for i in range(acquisitions):
        anatomy, plan = _acquisition(i)
        plan_a = plan
        if look != "standard":
            plan_a = vary_named(plan, keyed_rng(LABEL_SEED, 5, i), look)
        for name in renderers:
            row = []
            septum = max(septum_grey(name, anatomy, plan, plan_a), 1.0)
            for j, sep in enumerate(SEPARATIONS_CM):
                valve = _with_valve(anatomy, sep)
                grey, line, geo = _draw(name, valve, plan, plan_a)
                reading = read_profile(_sample(grey, line), line[2], line[3])
                cusp = _cusp_points(name, valve, plan, plan_a, geo)
                half = len(cusp[0]) // 2
                body = _sample(grey, (cusp[0], cusp[1], np.zeros(0), (0.0, 0.0)))
                reading["cusp"] = 0.5 * float(np.median(body[:half]) + np.median(body[half:]))
                reading["contrast"] = reading["cusp"] - reading["gap"]
                reading["relative"] = reading["cusp"] / septum
                for k in keys:
                    out[name][k][i, j] = reading[k]
                if pictures is not None and i < picture_count:
                    row.append(_crop(grey, line))
            if row:
                crops[name].append(np.concatenate([np.pad(c, 2, constant_values=255) for c in row], 1))
        if progress is not None:
            progress(f"acquisition {i + 1}/{acquisitions} drawn")
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
        for name, rows in crops.items():
            if rows:
                cv2.imwrite(str(pictures / f"valves-{name}.png"), np.clip(np.concatenate(rows, 0), 0, 255).astype(np.uint8))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acquisitions", type=int, default=12)
    p.add_argument("--look", choices=LOOKS, default="standard",
                   help="renderer A's look (renderers B and C have one each)")
    p.add_argument("--renderers", default=",".join(RENDERERS), help="comma-separated subset of A,B,C")
    p.add_argument("--pictures", type=Path, help="write crops of the first four acquisitions here")
    ns = p.parse_args(argv)
    renderers = tuple(r.strip() for r in ns.renderers.split(","))
    if not set(renderers) <= set(RENDERERS):
        p.error(f"--renderers takes a subset of {','.join(RENDERERS)}")
    result = measure(ns.acquisitions, ns.look, renderers, ns.pictures,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"valve appearance, {dt.date.today()}, {os.cpu_count()} cores, {cpu_model()}, load {load_average()}")
    print(f"CPU flags of note: {' '.join(cpu_flags()) or 'none listed'}")
    print(f"{ns.acquisitions} PLAX acquisitions at mid-systole, {_ROWS}x{_COLS}, cusps {LEAFLET_CM} cm, "
          f"calcification {CALCIFICATION}, renderer A look {ns.look}; grey levels 0-255, mean (sd) unless said")
    print(f"| renderer | reading | {' | '.join(f'{s:g} cm' for s in SEPARATIONS_CM)} |")
    print("|---|---|" + "---|" * len(SEPARATIONS_CM))
    for name, readings in result.items():
        for key, label in (("gap", "blood between the cusps"), ("cusp", "cusp body, median grey"),
                           ("contrast", "cusp - gap"), ("relative", "cusp / septum, median [10th, 90th pct]"),
                           ("opening", "apparent - true opening, cm")):
            arr = readings[key]
            if key == "opening":
                arr = arr - np.asarray(SEPARATIONS_CM)[None, :]
            if key == "opening":  # over the readable ones, with how many were not
                cells = " | ".join(
                    f"{np.nanmean(col):+.2f} ({np.nanstd(col):.2f}), {int(np.isnan(col).sum())} unread"
                    if not np.isnan(col).all() else f"all {col.size} unread" for col in arr.T)
            elif key == "relative":  # a ratio with a long tail: median [10th, 90th percentile]
                lo, mid, hi = np.percentile(arr, (10, 50, 90), axis=0)
                cells = " | ".join(f"{m:.2f} [{a:.2f}, {b:.2f}]" for a, m, b in zip(lo, mid, hi, strict=True))
            else:
                cells = " | ".join(f"{m:.0f} ({s:.0f})" for m, s in zip(arr.mean(0), arr.std(0), strict=True))
            print(f"| {name} | {label} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
