"""How each synthetic video is acquired: scanner make, views, geometry, look.

Nothing here reads a label.  A study draws its scanner (:data:`VENDORS`),
depth, sector angle, heart rate, frame rate and gain from its nuisance
stream; each video then draws its own view pose, timing and image quality
(:class:`VideoPlan`) from its own stream.  The image quality parameters span
what real transthoracic loops show, from a clean window to a hazy, cluttered
one with dropout: gain, dynamic range, grey map, point-spread function,
clutter, reverberation, shadowing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train import synth_reports

__all__ = [
    "VENDORS",
    "VIEWS",
    "VIEW_CODES",
    "VIEW_DESCRIPTIONS",
    "Look",
    "StudyPlan",
    "Vendor",
    "VideoPlan",
    "plan_study",
    "plan_video",
    "study_views",
]

VIEWS = ("plax", "a4c", "psax")
VIEW_CODES = {  # CID 12226 Echocardiography Image View
    "plax": ("399139001", "SCT", "Parasternal long axis"),
    "a4c": ("399214001", "SCT", "Apical four chamber"),
    "psax": ("399271003", "SCT", "Parasternal short axis at the Papillary Muscle level"),
}
VIEW_DESCRIPTIONS = {"plax": "2D PLAX", "a4c": "2D A4C", "psax": "2D PSAX PM"}


@dataclass(frozen=True)
class Vendor:
    """The look of one synthetic scanner make (never depends on any label).

    Parameters
    ----------
    manufacturer, model, software : str
        Written to the General Equipment module and burned into the image.
    text_rgb, ecg_rgb : tuple of int
        Colours of the burned-in text and the ECG trace.
    angle_deg, depth_cm : float
        Typical sector angle and depth; studies vary around them.
    gamma, dynamic_range_db : float
        Typical grey map: compression curve and displayed dynamic range.
    psf_axial, psf_lateral : float
        Typical speckle grain in polar samples (axial, lateral).
    text_left : bool
        Whether the settings text block sits on the left or the right.
    report_dialect : str
        How its measurement SR is written (one of
        :data:`train.synth_reports.DIALECTS`).
    """

    manufacturer: str
    model: str
    software: str
    text_rgb: tuple[int, int, int]
    ecg_rgb: tuple[int, int, int]
    angle_deg: float
    depth_cm: float
    gamma: float
    dynamic_range_db: float
    psf_axial: float
    psf_lateral: float
    text_left: bool
    report_dialect: str = synth_reports.DIALECT_TID5300


VENDORS: tuple[Vendor, ...] = (
    Vendor("Northwind Sonics", "NW-C9", "4.2.1", (255, 230, 0), (0, 230, 0),
           80.0, 16.0, 2.3, 58.0, 0.9, 1.3, True, synth_reports.DIALECT_GE),
    Vendor("Helios Imaging", "Helios Cardio 5", "HC5 2.08", (235, 235, 235), (60, 255, 60),
           75.0, 15.0, 2.1, 54.0, 1.1, 1.6, False, synth_reports.DIALECT_PHILIPS),
    Vendor("Orca Medical", "Orca X3", "X3-1.9", (0, 220, 255), (0, 255, 120),
           85.0, 17.0, 2.6, 62.0, 0.8, 1.1, True, synth_reports.DIALECT_TID5300),
    Vendor("Kestrel Echo", "KE-70", "7.0.3", (255, 200, 60), (90, 255, 0),
           70.0, 14.5, 2.2, 56.0, 1.0, 1.4, False, synth_reports.DIALECT_TID5300),
)


@dataclass(frozen=True)
class StudyPlan:
    """Settings a sonographer keeps for a whole study."""

    vendor: Vendor
    depth_cm: float
    angle_deg: float
    heart_rate_bpm: float
    fps: int
    gain_db: float
    freq_mhz: float
    window: float  # acoustic window of this patient today: 0 poor, 1 excellent


@dataclass(frozen=True)
class Look:
    """How renderer A turns tissue into grey, beyond the scanner's usual spread.

    The defaults are renderer A's own look (every archive's unless ``synth
    --look varied`` draws one per video, :mod:`train.synth.look`).

    Attributes
    ----------
    surround_db : float
        Added to the echo strength of the tissue around the heart (dB).
    contrast : float
        Every tissue's level in dB relative to the myocardium is multiplied by
        this: under 1 the blood, the surround and the pericardium all come
        closer to the myocardium (as in a hazy, low-contrast window or a
        harmonic setting), over 1 they move apart.
    despeckle : float
        Smoothing of the detected echo, in units of the point-spread function
        (0 none): scanners' speckle-reduction filters and compounding make
        speckle finer and fainter than the raw Rayleigh pattern.
    log_edges : bool
        Soften tissue boundaries in decibels rather than in linear power.
        A boundary blended in power between the myocardium and blood (27 dB
        apart) is already within a few dB of the myocardium a third of the
        way into the blend, so after log compression the bright side
        spreads and a wall looks up to a quarter of a centimetre thicker
        than it is; blended in decibels, the boundary's middle stays where
        the boundary is.
    leaflet_db : float
        Added to every valve leaflet's echo strength (dB).  A leaflet is a
        thin specular reflector: how bright it looks depends on the angle
        the beam meets it at, the harmonic setting and the gain, and varies
        far more from one study to the next than the myocardium does.
    calcium_scale : float
        The extra brightness of a calcified aortic cusp over a normal one,
        in dB, is multiplied by this: how much calcium stands out depends
        on the scanner, its grey map and the angle as much as on the
        calcium.
    leaflet_bloom_cm : float
        Added to every leaflet's drawn thickness (cm): a bright thin
        reflector spreads over the beam's width, so leaflets look thicker
        (and an opening narrower) on a coarse beam than they are.
    leaflets_in_blur : bool
        With ``log_edges``, draw the leaflets before the boundaries are
        softened in decibels instead of over the softened field, so a thin
        leaflet fades toward the blood around it by how soft the edges are
        (a leaflet thinner than the beam's slice, or crossing it obliquely,
        is averaged with blood; faint, smeared cusps are common in real
        echo, calcified ones included).
    edge_bias_cm : float
        How far bright tissue's edges are moved into (positive) or away from
        (negative) the darker tissue beside them, on each side, in cm: a
        grey-scale dilation or erosion of the echo strength as the views
        draw it (before the decibel blur with ``log_edges``; after the
        views' own soft edges without it).  How thick a wall looks on screen
        depends on the gain and the grey map as much as on the wall: a
        bright band's edge spreads into the blood at high gain (blooming)
        and sits inside the wall when the gain is low or the grey map steep,
        so the same septum measures a few millimetres thicker or thinner
        from one scanner and preset to the next.  The distance holds along
        the beam (walls across it, as PLAX's septum and posterior wall);
        across the beam the kernel lives on the polar grid, so there it
        scales with depth (half at 4 cm, 1.5 times at 12 cm of a 16 cm
        sector).  Erosion removes a bright structure thinner than twice the
        bias (the aortic root's 0.25 cm walls under -0.125 cm), as a faint
        thin reflector drops under the display at low gain.  Valve leaflets
        are not moved (they are drawn afterwards).
    """

    surround_db: float = 0.0
    contrast: float = 1.0
    despeckle: float = 0.0
    log_edges: bool = False
    leaflet_db: float = 0.0
    calcium_scale: float = 1.0
    leaflet_bloom_cm: float = 0.0
    leaflets_in_blur: bool = False
    edge_bias_cm: float = 0.0


@dataclass(frozen=True)
class VideoPlan:
    """The acquisition of one video: geometry, timing and look.

    The look parameters are what a renderer may use to vary image quality;
    each renderer interprets them in its own way.
    """

    view: str
    series_number: int
    vendor: Vendor
    depth_cm: float
    angle_deg: float
    tilt_deg: float
    shift_x_cm: float
    shift_z_cm: float
    heart_rate_bpm: float
    fps: int
    phase0: float
    frames: int
    gain_db: float
    tgc_db: tuple[float, ...]
    atten_db_per_cm: float
    freq_mhz: float
    noise_seed: int
    dynamic_range_db: float = 60.0
    gamma: float = 2.2
    quality: float = 0.7  # 0 poor (haze, clutter, dropout, coarse speckle), 1 excellent
    edge_cm: float = 0.12  # softness of tissue boundaries
    psf_scale: float = 1.0
    reverb: float = 0.3
    shadow_deg: float = 0.0  # centre of a rib shadow (beam angle), or 0 for none
    shadow_width_deg: float = 0.0
    look: Look = Look()


def plan_study(rng: np.random.Generator) -> StudyPlan:
    """Draw a study's scanner and settings from its nuisance stream."""
    vendor = VENDORS[int(rng.integers(0, len(VENDORS)))]
    return StudyPlan(
        vendor=vendor,
        depth_cm=float(np.clip(vendor.depth_cm + rng.uniform(-2.5, 2.5), 12.0, 20.0)),
        angle_deg=float(np.clip(vendor.angle_deg + rng.uniform(-8, 8), 60.0, 90.0)),
        heart_rate_bpm=float(round(rng.uniform(50, 110), 1)),
        fps=int(rng.integers(30, 61)),
        gain_db=float(rng.uniform(-6, 4)),
        freq_mhz=float(rng.choice([1.7, 2.0, 2.5, 3.0, 3.5])),
        window=float(rng.beta(2.2, 1.6)),
    )


def study_views(rng: np.random.Generator) -> list[str]:
    """PLAX, PSAX, A4C in the usual acquisition order; sometimes extra videos.

    Most studies have more than one PLAX clip (a standard protocol records
    the long axis more than once: standard depth, zoomed on the valves, with
    and without colour): one in 30 %, two in 50 %, three in 20 %. Distinct
    PLAX videos of one study are EchoCLR's positive pairs.
    """
    u = rng.random()
    views = ["plax"] * (1 if u < 0.3 else 2 if u < 0.8 else 3)
    views.append("psax")
    views.append("a4c")
    if rng.random() < 0.2:
        views.append("a4c")
    return views


def plan_video(rng: np.random.Generator, view: str, series_number: int, study: StudyPlan,
               frames: int | None, noise_seed: int) -> VideoPlan:
    """Draw one video's acquisition from its own stream.

    Parameters
    ----------
    rng : numpy.random.Generator
        The video's nuisance stream.
    view : str
        One of :data:`VIEWS`.
    series_number : int
        The video's series number in its study.
    study : StudyPlan
        The study's settings, which the video varies around.
    frames : int or None
        Frames per video; None for about two heartbeats (40-64 frames).
    noise_seed : int
        Seed of the renderer's speckle and texture.

    Returns
    -------
    VideoPlan
    """
    vendor = study.vendor
    depth = float(np.clip(study.depth_cm + rng.uniform(-1.0, 1.0), 12.0, 20.0))
    angle = float(np.clip(study.angle_deg + rng.uniform(-4, 4), 60.0, 90.0))
    rr = 60.0 / study.heart_rate_bpm
    n = frames if frames is not None else int(np.clip(round(1.8 * study.fps * rr), 40, 64))
    tilt = {"plax": rng.uniform(-12, 6), "a4c": rng.uniform(-8, 8), "psax": rng.uniform(-10, 10)}[view]
    tgc = tuple(float(x) for x in rng.uniform(-3.0, 3.0, 5))
    quality = float(np.clip(study.window + rng.normal(0.0, 0.12), 0.0, 1.0))
    shadow = rng.random() < 0.35 * (1.2 - quality)
    half = angle / 2
    return VideoPlan(
        view=view, series_number=series_number, vendor=vendor, depth_cm=round(depth, 1),
        angle_deg=round(angle, 1), tilt_deg=float(tilt), shift_x_cm=float(rng.uniform(-0.8, 0.8)),
        shift_z_cm=float(rng.uniform(-0.5, 0.5)), heart_rate_bpm=study.heart_rate_bpm,
        fps=study.fps, phase0=float(rng.random()), frames=int(n),
        gain_db=float(study.gain_db + rng.uniform(-2, 2)), tgc_db=tgc,
        atten_db_per_cm=float(rng.uniform(0.4, 0.9)), freq_mhz=study.freq_mhz,
        noise_seed=noise_seed,
        dynamic_range_db=float(np.clip(vendor.dynamic_range_db + rng.uniform(-10, 10), 40.0, 75.0)),
        gamma=float(np.clip(vendor.gamma + rng.uniform(-0.5, 0.5), 1.5, 3.2)),
        quality=quality,
        edge_cm=float(rng.uniform(0.06, 0.16) + 0.12 * (1 - quality)),
        psf_scale=float(rng.uniform(0.85, 1.15) * (1.0 + 0.35 * (1 - quality))),
        reverb=float(rng.uniform(0.1, 0.6) * (1.3 - quality)),
        shadow_deg=float(rng.uniform(0.45, 0.9) * half * (1 if rng.random() < 0.5 else -1)) if shadow else 0.0,
        shadow_width_deg=float(rng.uniform(4, 12)) if shadow else 0.0,
    )
