"""Renderer D ("fieldwarp"): a warped scattering field convolved on the screen's grid.

How it forms an image
---------------------
Everything happens on the Cartesian pixels of the screen; there is no beam
grid to scan-convert and no list of point scatterers.

* *Anatomy as a deformation field.*  Each view is a set of shapes in a
  heart frame (:mod:`train.synth.fieldwarp.scene`).  A frame maps every
  pixel back to the end-diastolic tissue now under it (short-axis
  contraction that conserves wall area, long-axis shortening toward a fixed
  apex, the fibrous base and its valves moving as one rigid piece) and
  paints the tissue found there, so the walls are the anatomy's exactly at
  end-diastole and thicken and move in systole.  Valve leaflets are posed
  per phase from the anatomy's cycle (aortic and mitral opening).
* *Scattering field.*  Complex Gaussian scatterers are read from a fixed
  random field at each pixel's material coordinate (speckle moves with the
  myocardium), drawn anew every frame in blood, weighted by the tissue's
  echo strength, a static heterogeneity and a gamma texture (K-distributed
  speckle), and by the two-way attenuation integrated along the beam
  (posterior enhancement behind blood, shadows behind calcified cusps and
  ribs, dropout of poor windows).
* *Point-spread function.*  The field is convolved with a Gaussian PSF that
  is oriented along the local beam, as long as the pulse axially and as
  wide as the beam laterally (narrowest at the focus), done as a bank of
  FFT convolutions blended per pixel (:mod:`train.synth.fieldwarp.beam`).
* *Receive chain and display.*  Envelope (modulus), TGC, gain, electronic
  noise, clutter haze, a near-field reverberation ghost, log compression
  over the plan's dynamic range, a grey map of its own with a faint cool
  tint, a sector with a curved top, and its own annotation
  (:mod:`train.synth.fieldwarp.screen`).

Independence
------------
This renderer exists to measure whether models trained on another
rendering transfer to one nobody tuned against.  It was written reading
only ``train/synth/anatomy.py``, ``truth.py``, ``acquisition.py``,
``geometry.py``, ``archive.py`` (how renderers are registered and called),
``dicom.py``, ``cli.py``, ``shortcuts.py``, ``__init__.py``, the argument
parsing of ``bench/cross_rendering.py`` and the project's METHOD, CONTRACT
and STYLE notes; never the other renderers' code (``render.py``,
``views.py``, ``render_alt.py``, ``look.py``, ``overlay.py``,
``render_scatter.py``, ``scatter/``), their tests, the appearance
benchmarks or the training/benchmark docs.  Keep it that way: change it
from the anatomy and physics, not by comparing it with another renderer's
pixels.

It never reads a label: only sizes (walls, cavity, root, cusp separation
and thickness) and calcification, which acts as cusp echo strength and
attenuation.
"""

from __future__ import annotations

import numpy as np

from train.synth.acquisition import VIEWS, VideoPlan
from train.synth.anatomy import Anatomy
from train.synth.fieldwarp.beam import Acoustics, SectorGrid
from train.synth.fieldwarp.scene import OUTSIDE, Scene, build_scene
from train.synth.fieldwarp.screen import Overlay, sector_geometry
from train.synth.geometry import Geometry

__all__ = ["frame_phases", "render_video", "scene_of", "sector_geometry", "tissue_map"]

_TINT = np.array([0.91, 0.96, 1.0], np.float32)  # a faint cool tint of the grey map
_SCENE_KEY = 0x5EED  # the chest wall layering draws from a stream keyed apart from the speckle


def _check(plan: VideoPlan, rows: int, cols: int) -> None:
    if plan.view not in VIEWS:
        raise ValueError(f'Argument "plan.view" must be one of {", ".join(VIEWS)}, got {plan.view!r}.')
    if rows < 32 or cols < 32:
        raise ValueError(f'Arguments "rows" and "cols" must be at least 32, got {rows} x {cols}.')
    if plan.frames < 1 or plan.fps <= 0 or plan.heart_rate_bpm <= 0:
        raise ValueError('Argument "plan" must have frames >= 1, fps > 0 and heart_rate_bpm > 0.')


def frame_phases(plan: VideoPlan) -> np.ndarray:
    """Cardiac phase of each frame (0 = end-diastole), from phase0, heart rate and frame rate."""
    t = np.arange(plan.frames) / plan.fps
    return (plan.phase0 + t * plan.heart_rate_bpm / 60.0) % 1.0


def scene_of(an: Anatomy, plan: VideoPlan) -> Scene:
    """The view's scene (shapes, pose, landmarks such as the measuring line)."""
    return build_scene(an, plan, np.random.default_rng([plan.noise_seed & 0xFFFFFFFF, _SCENE_KEY]))


def tissue_map(an: Anatomy, plan: VideoPlan, rows: int = 480, cols: int = 640, phase: float = 0.0,
               points: np.ndarray | None = None) -> np.ndarray:
    """The tissue class this renderer draws at each pixel.

    Parameters
    ----------
    an : Anatomy
        The heart.
    plan : VideoPlan
        View, geometry and pose.
    rows, cols : int
        Screen size (the sector is laid out as in :func:`render_video`).
    phase : float
        Cardiac phase at which the valve leaflets are posed; the walls are
        always at end-diastole.
    points : numpy.ndarray, optional
        ``(n, 2)`` image points as (col, row), fractional allowed: classes
        there instead of the whole screen.

    Returns
    -------
    numpy.ndarray
        int8 classes of :data:`train.synth.fieldwarp.scene.CLASS_NAMES`,
        -1 outside the sector; ``(rows, cols)`` or ``(n,)``.
    """
    _check(plan, rows, cols)
    geo = sector_geometry(plan, rows, cols)
    if points is None:
        cc, rr = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
        pc, pr = cc.ravel(), rr.ravel()
    else:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        pc, pr = pts[:, 0], pts[:, 1]
    x = (pc - geo.apex_col) * geo.delta_cm
    z = (pr - geo.apex_row) * geo.delta_cm
    r, th = np.hypot(x, z), np.arctan2(x, z)
    inside = (r <= geo.depth_cm) & (np.abs(th) <= np.radians(geo.angle_deg / 2)) & (r >= 0.35)
    out = np.full(x.shape, OUTSIDE, np.int8)
    if inside.any():
        painted = scene_of(an, plan).paint(x[inside], z[inside], phase, walls_phase=0.0)
        out[inside] = painted.cls
    return out if points is not None else out.reshape(rows, cols)


def render_video(an: Anatomy, plan: VideoPlan, rows: int = 480, cols: int = 640,
                 header: dict[str, str] | None = None) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Render one video.

    Parameters
    ----------
    an : Anatomy
        The heart (sizes in cm; no label is read).
    plan : VideoPlan
        Acquisition: view, depth, sector, pose, timing, gain, TGC, dynamic
        range, grey map, frequency, image quality, clutter, shadows, and
        ``noise_seed``, which seeds all of the video's randomness.
    rows, cols : int
        Frame size.
    header : dict of str to str, optional
        ``initials`` and ``date`` burned into the image.

    Returns
    -------
    frames : numpy.ndarray
        ``(plan.frames, rows, cols, 3)`` uint8 RGB.
    geometry : Geometry
        The sector as drawn (apex pixel, isotropic cm per pixel).
    phases : numpy.ndarray
        ``(plan.frames,)`` float64 cardiac phase of each frame, 0 = end-diastole.

    Raises
    ------
    ValueError
        If the view, size or timing is invalid.
    """
    _check(plan, rows, cols)
    geo = sector_geometry(plan, rows, cols)
    grid = SectorGrid.of(geo)
    rng = np.random.default_rng(plan.noise_seed & 0xFFFFFFFFFFFFFFFF)
    scene = scene_of(an, plan)
    ac = Acoustics(plan, geo, grid, rng)
    phases = frame_phases(plan)
    overlay = Overlay(plan, geo, header, phases)
    h, w = grid.shape
    m = 16  # margin of the material textures: tissue seen in one frame may come from just outside the box
    tex_shape = (h + 2 * m, w + 2 * m)
    scat = (rng.standard_normal(tex_shape) + 1j * rng.standard_normal(tex_shape)).astype(np.complex64) / np.sqrt(2)
    # Sparse strong scatterers among weak ones: a few texels per resolution
    # cell carry most of the echo, so tissue reads as bright grains on a
    # darker ground (K-distributed rather than Rayleigh speckle).
    strong = rng.random(tex_shape) < 0.03
    grains = np.where(strong, 20.0, 1.0).astype(np.float32)
    grains /= grains.mean()
    het = _smooth_field(rng, tex_shape, 0.25 / geo.delta_cm)  # fibres, lobules: a few mm
    # Breathing and hand: the whole scene drifts a little relative to the probe.
    resp_hz = float(rng.uniform(0.2, 0.33))
    drift = rng.uniform(0.03, 0.09, 2)
    drift_ph = rng.uniform(0, 2 * np.pi, 2)
    soft = max(0.5 * geo.delta_cm, 0.5 * plan.edge_cm)
    frames = np.zeros((plan.frames, rows, cols, 3), np.uint8)
    x0, y0 = grid.c0, grid.r0
    box_rows, box_cols = np.unravel_index(grid.idx, grid.shape)
    for i, ph in enumerate(phases):
        t = i / plan.fps
        jx = drift[0] * (np.sin(2 * np.pi * resp_hz * t + drift_ph[0]) - np.sin(drift_ph[0]))
        jz = drift[1] * (np.sin(2 * np.pi * resp_hz * t + drift_ph[1]) - np.sin(drift_ph[1]))
        p = scene.paint(grid.x - jx, grid.z - jz, float(ph), soft_cm=soft)
        # Material coordinates -> texture pixels (the texture is laid over the box at end-diastole).
        tc = geo.apex_col + p.mat_x / geo.delta_cm - x0 + m
        tr = geo.apex_row + p.mat_z / geo.delta_cm - y0 + m
        n_mat = _bilinear_unit(scat, tr, tc)
        ic = np.clip(np.rint(tc).astype(np.int64), 0, tex_shape[1] - 1)
        ir = np.clip(np.rint(tr).astype(np.int64), 0, tex_shape[0] - 1)
        power_db = p.db + 3.0 * p.tex * het[ir, ic]
        power = 10 ** (power_db / 10) * grains[ir, ic] ** p.tex
        att = 10 ** (-ac.attenuation_db(p.atten, t) / 20)
        fresh = (rng.standard_normal(grid.idx.size) + 1j * rng.standard_normal(grid.idx.size)) / np.sqrt(2)
        field = (np.sqrt(power * (1 - p.moving)) * att * n_mat
                 + np.sqrt(power * p.moving * att ** 2 + ac.noise_power) * fresh).astype(np.complex64)
        grey = ac.display(ac.beamform(field), t)
        frame = frames[i]
        rgb = (grey[:, None] * (255.0 * _TINT)[None, :]).round().clip(0, 255).astype(np.uint8)
        frame[box_rows + y0, box_cols + x0] = rgb
        overlay.burn(frame, i)
    return frames, geo, phases


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Real Gaussian-filtered noise of unit variance."""
    w = rng.standard_normal(shape)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.fftfreq(shape[1])[None, :]
    out = np.fft.ifft2(np.fft.fft2(w) * np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (kx ** 2 + ky ** 2))).real
    return (out / max(float(out.std()), 1e-12)).astype(np.float32)


def _bilinear_unit(tex: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Bilinear lookup of complex white noise, rescaled to unit variance.

    Interpolating white noise lowers its variance between samples (to a
    quarter at a cell's centre); dividing by the weights' norm keeps the
    scatterer strength the same wherever the tissue has moved to.
    """
    r = np.clip(r, 0, tex.shape[0] - 1.001)
    c = np.clip(c, 0, tex.shape[1] - 1.001)
    i, j = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    a, b = r - i, c - j
    w00, w01, w10, w11 = (1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b
    val = w00 * tex[i, j] + w01 * tex[i, j + 1] + w10 * tex[i + 1, j] + w11 * tex[i + 1, j + 1]
    return val / np.sqrt(w00 ** 2 + w01 ** 2 + w10 ** 2 + w11 ** 2)
