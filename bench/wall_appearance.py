"""How thick each renderer's septum looks: the grey profile across the wall at end-diastole.

A model that measures walls on renderer A and reads renderer B's walls as
thinner (docs/benchmarks.md, the response sweeps) may have learnt how A
draws a wall's edge rather than where the edge is. This diagnostic draws the
same PLAX acquisitions (hearts drawn without the label, label seed 777, as
``bench.response_sweep``) with each renderer at end-diastole, with only the
septum changed, and reads the grey level along the line across the septum
where it is measured (``u = -2.5 cm`` in each renderer's view frame, the
mean over ``u`` from -3.0 to -2.0 cm). From each profile it reports the
*apparent* thickness: the width of the band brighter than halfway between
the LV cavity's grey (the median of the inner 60 % of the cavity) and the
wall's (the median of the inner 60 % of the true wall), found outward from
the wall's centre, at the renderer's full image resolution.

A renderer whose apparent thickness equals the true one draws the edge where
it is; one that adds a constant draws it wider (blooming: a bright band's
point-spread tail stays above the display floor beside dark blood). The
offset between renderers is what a model trained on one carries to the other.

Usage::

    .venv/bin/python -m bench.wall_appearance [--acquisitions 12] [--look standard|varied|varied-walls|...] [--edges power|db]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys

import cv2
import numpy as np

from bench.machine import cpu_flags, cpu_model, load_average
from train.synth import render, render_alt
from train.synth.acquisition import VideoPlan, plan_study, plan_video
from train.synth.anatomy import Anatomy, sample_anatomy
from train.synth.geometry import Geometry
from train.synth.look import LOOKS, vary_named
from train.synth.truth import keyed_rng, sample_truth
from train.synth.views import MEASURE_U_CM

SEPTA_CM = (0.8, 1.0, 1.2, 1.4, 1.6)
LABEL_SEED = 777
_ROWS, _COLS = 480, 640
_STEP_CM = 0.01


def _pose(renderer: str, an: Anatomy, plan: VideoPlan) -> tuple[float, float, float]:
    """Centre (x, z cm from the apex) and rotation (radians) of the renderer's PLAX frame."""
    return render.view_pose("plax", an, plan) if renderer == "A" else render_alt.view_pose(an, plan)


def _profile(grey: np.ndarray, geo: Geometry, pose: tuple[float, float, float], v: np.ndarray) -> np.ndarray:
    """Mean grey along ``v`` (cm, view frame) over ``u`` from 1/2 cm before to after the measuring point."""
    uu, vv = np.meshgrid(np.linspace(MEASURE_U_CM - 0.5, MEASURE_U_CM + 0.5, 11), v)
    col, row = render.local_to_pixel(geo, pose, uu, vv)
    sampled = cv2.remap(grey, col.astype(np.float32), row.astype(np.float32), cv2.INTER_LINEAR)
    return sampled.mean(axis=1)


def apparent_thickness(profile: np.ndarray, v: np.ndarray, wall: tuple[float, float],
                       cavity: tuple[float, float]) -> float:
    """Width (cm) of the band around the wall's centre brighter than halfway to the cavity's grey."""
    def inner(lo: float, hi: float) -> np.ndarray:
        pad = 0.2 * (hi - lo)
        return profile[(v >= lo + pad) & (v <= hi - pad)]

    wall_grey, cavity_grey = float(np.median(inner(*wall))), float(np.median(inner(*cavity)))
    if wall_grey <= cavity_grey:
        return 0.0
    level = 0.5 * (wall_grey + cavity_grey)
    centre = int(np.argmin(np.abs(v - 0.5 * (wall[0] + wall[1]))))
    above = profile > level
    if not above[centre]:
        return 0.0
    lo = centre
    while lo > 0 and above[lo - 1]:
        lo -= 1
    hi = centre
    while hi < len(profile) - 1 and above[hi + 1]:
        hi += 1
    return float(v[hi] - v[lo] + _STEP_CM)


def measure(acquisitions: int, look: str, edges: str = "look") -> dict[str, np.ndarray]:
    """Each renderer's ``(acquisitions, septa)`` apparent septal thickness (cm).

    Parameters
    ----------
    acquisitions : int
        PLAX acquisitions, each drawn at every septum of :data:`SEPTA_CM`.
    look : str
        Renderer A's look, a name in :data:`train.synth.look.LOOKS`.
    edges : {"look", "power", "db"}
        How renderer A blends tissue boundaries: as the look says, or forced
        to a blend in power or in decibels (``Look.log_edges``).

    Returns
    -------
    dict
        ``{"A": array, "B": array}``, each ``(acquisitions, len(SEPTA_CM))``.
    """
    out = {"A": np.zeros((acquisitions, len(SEPTA_CM))), "B": np.zeros((acquisitions, len(SEPTA_CM)))}
    for i in range(acquisitions):
        truth = sample_truth(keyed_rng(LABEL_SEED, 1, i), force_lvh=False, force_as=False)
        study = plan_study(keyed_rng(LABEL_SEED, 2, i))
        plan = plan_video(keyed_rng(LABEL_SEED, 3, i), "plax", 1, study, 1, 1000 + i)
        plan = dataclasses.replace(plan, phase0=0.0)
        anatomy = sample_anatomy(truth, keyed_rng(LABEL_SEED, 4, i), 2.0)
        plan_a = plan if look == "standard" else vary_named(plan, keyed_rng(LABEL_SEED, 5, i), look)
        if edges != "look":
            plan_a = dataclasses.replace(plan_a, look=dataclasses.replace(plan_a.look, log_edges=edges == "db"))
        for j, septum in enumerate(SEPTA_CM):
            tr = dataclasses.replace(truth, ivs_cm=septum, lvpw_cm=max(0.6, 0.9 * septum))
            an = dataclasses.replace(anatomy, truth=tr)
            h = tr.lvid_cm / 2
            wall = (-h - septum, -h)
            cavity = (-h, h)
            v = np.arange(-h - septum - 1.0, 0.0, _STEP_CM)
            for name, draw, p in (("A", render.render_video, plan_a), ("B", render_alt.render_video, plan)):
                rgb, geo, _ = draw(an, p, _ROWS, _COLS, None)
                grey = cv2.cvtColor(rgb[0], cv2.COLOR_RGB2GRAY).astype(np.float32)
                prof = _profile(grey, geo, _pose(name, an, p), v)
                out[name][i, j] = apparent_thickness(prof, v, wall, cavity)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acquisitions", type=int, default=12)
    p.add_argument("--look", choices=LOOKS, default="standard",
                   help="renderer A's look (renderer B has one)")
    p.add_argument("--edges", choices=("look", "power", "db"), default="look",
                   help="renderer A's boundary blend: as the look draws it, or forced to power or decibels")
    ns = p.parse_args(argv)
    result = measure(ns.acquisitions, ns.look, ns.edges)
    print(f"wall appearance, {dt.date.today()}, {os.cpu_count()} cores, {cpu_model()}, load {load_average()}")
    print(f"CPU flags of note: {' '.join(cpu_flags()) or 'none listed'}")
    print(f"{ns.acquisitions} PLAX acquisitions at end-diastole, {_ROWS}x{_COLS}, renderer A look {ns.look}, "
          f"edges {ns.edges}")
    print(f"| renderer | {' | '.join(f'septum {s:g} cm' for s in SEPTA_CM)} |")
    print("|---|" + "---|" * len(SEPTA_CM))
    for name, arr in result.items():
        excess = arr - np.asarray(SEPTA_CM)[None, :]
        print(f"| {name}: apparent - true, mean (sd) cm | "
              f"{' | '.join(f'{m:+.2f} ({s:.2f})' for m, s in zip(excess.mean(0), excess.std(0), strict=True))} |")
        lo, hi = np.percentile(excess, (10, 90), axis=0)
        print(f"| {name}: 10th to 90th percentile, cm | "
              f"{' | '.join(f'{a:+.2f} to {b:+.2f}' for a, b in zip(lo, hi, strict=True))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
