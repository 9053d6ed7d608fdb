"""Renderer C ("scatter"): echo videos formed from moving point scatterers.

The third renderer of the synthetic archive, written to measure transfer on
a rendering that nobody tuned anything against.  **Independence rule:** it was
written from the anatomy's definitions (:mod:`train.synth.anatomy`,
:mod:`train.synth.truth`), the acquisition plan
(:mod:`train.synth.acquisition`), the geometry contract
(:mod:`train.synth.geometry`) and ultrasound physics, without reading renderer
A's or B's drawing code (``render.py``, ``views.py``, ``render_alt.py``,
``look.py``, ``overlay.py``) or the notes on how they look; keep it that way
when changing it.  The rule covers the whole :mod:`train.synth.scatter`
package (``train/synth/scatter/``), where the renderer's parts live:
``hearts.py`` (the per-view heart models and tissue classes),
``beamform.py`` (scatterers, beamforming, propagation) and ``display.py``
(sector layout, grey map, scan conversion, overlay); this module is the
public entry point.

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

import numpy as np

from train.synth.acquisition import VideoPlan
from train.synth.anatomy import MID_SYSTOLE_PHASE, Anatomy
from train.synth.geometry import Geometry
from train.synth.scatter import hearts
from train.synth.scatter.beamform import Beamformer
from train.synth.scatter.display import R_TOP_CM, overlay, scan_convert, sector_geometry
from train.synth.scatter.hearts import LEAFLET, MEASURE_LEVEL_CM, TISSUES, Plax

__all__ = [
    "MEASURE_LEVEL_CM",
    "TISSUES",
    "plax_measure_line",
    "plax_valve_line",
    "render_video",
    "sector_geometry",
    "tissue_map",
]

_SEED_SALT = 0x5CA77E2C  # renderer C's own derivation of its random stream from plan.noise_seed
_DEFAULT_HEADER = {"initials": "S.P.", "date": "01/01/2020"}


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
    heart = hearts.heart(an, plan)
    seq = np.random.SeedSequence([(plan.noise_seed ^ _SEED_SALT) & 0xFFFFFFFF, (plan.noise_seed >> 32) & 0xFFFFFFFF,
                                  0xC])
    rng = np.random.default_rng(seq)
    times = np.arange(plan.frames) / plan.fps
    phases = (plan.phase0 + times * plan.heart_rate_bpm / 60.0) % 1.0
    beams = Beamformer(heart, plan, geo, rng)
    polar = np.stack([beams.frame(float(ph), k) for k, ph in enumerate(phases)])
    frames = scan_convert(polar, plan, geo)
    overlay(frames, plan, geo, header, times, phases)
    return frames, geo, phases.astype(np.float64)


def plax_measure_line(an: Anatomy, plan: VideoPlan, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Image points (col, row) of the PLAX wall-measuring line, 1/8 pixel apart.

    The line crosses the LV long axis perpendicularly at :data:`MEASURE_LEVEL_CM`
    from the annulus, from 3 cm in front of the septum to 3 cm behind the
    posterior wall; it goes from anterior to posterior.
    """
    heart = hearts.heart(an, plan)
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
    heart = hearts.heart(an, plan)
    if not isinstance(heart, Plax):
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
    heart = hearts.heart(an, plan)
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
    outside = (r > plan.depth_cm) | (r < R_TOP_CM) | (np.abs(th) > math.radians(plan.angle_deg / 2))
    cls[outside] = -1
    return cls
